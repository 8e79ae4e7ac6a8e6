//! The record key of a tracked table as it is now: the columns that form its Certyo record id,
//! with their types, so text parts of a record id can be matched against the table's index.
//! Read by the worker (write-back, backfill) in its own transactions.

use pgrx::pg_sys::Oid;
use pgrx::spi::{SpiClient, SpiTupleTable};

/// Whether an UPDATE of the table's bookkeeping columns in replica mode could run code that
/// PostgreSQL did not ship (`c` is the table's `pg_class` row): a trigger or rule that fires
/// in replica mode (`ENABLE ALWAYS`, `ENABLE REPLICA`; the capture trigger itself only as
/// `track()` installs it), a forced row-level security policy, or a function, operator,
/// operator class or access method that is not a system object (OID past
/// `FirstNormalObjectId`, so extensions' too) used by the table's (or a partition's)
/// constraints, indexes, generated columns, policies or partition key; a domain, range or
/// multirange type not shipped (their checks and support functions run), any type not shipped
/// given to a bookkeeping column; a cast from text that was not shipped to a column's type, or
/// a record id column of a type not shipped (the write-back reads record id parts back with
/// `::type`, and whoever owns the type may create such a cast at any moment, between this check
/// and the planning of the write-back included); or one of the built-in functions that
/// run SQL text (`query_to_xml`, `ts_stat`, ...). Only a table for which this is false is written back in replica mode (see
/// `crate::rights::writing_back_as`). A macro so that [`LOOKUP`] can be one constant.
macro_rules! user_code {
    () => {
        "EXISTS (
            WITH tree AS (SELECT c.oid AS relid UNION SELECT p.relid FROM pg_partition_tree(c.oid) p),
            objects (classid, objid) AS (
                SELECT 'pg_class'::regclass, tree.relid FROM tree
                UNION ALL SELECT 'pg_class'::regclass, i.indexrelid FROM pg_index i JOIN tree ON i.indrelid = tree.relid
                UNION ALL SELECT 'pg_constraint'::regclass, k.oid FROM pg_constraint k JOIN tree ON k.conrelid = tree.relid
                UNION ALL SELECT 'pg_attrdef'::regclass, d.oid FROM pg_attrdef d JOIN tree ON d.adrelid = tree.relid
                     JOIN pg_attribute a ON a.attrelid = d.adrelid AND a.attnum = d.adnum AND a.attgenerated <> ''
                UNION ALL SELECT 'pg_policy'::regclass, p.oid FROM pg_policy p JOIN tree ON p.polrelid = tree.relid)
            SELECT FROM objects o JOIN pg_depend d ON d.classid = o.classid AND d.objid = o.objid
             WHERE (d.refobjid >= 16384
                    AND (d.refclassid IN ('pg_proc'::regclass, 'pg_operator'::regclass, 'pg_opclass'::regclass,
                                          'pg_opfamily'::regclass, 'pg_am'::regclass)
                         OR (d.refclassid = 'pg_type'::regclass
                             AND (EXISTS (SELECT FROM pg_type y WHERE y.oid = d.refobjid AND y.typtype IN ('d', 'r', 'm'))
                                  OR (d.objsubid > 0
                                      AND EXISTS (SELECT FROM pg_attribute b
                                                   WHERE b.attrelid = d.objid AND b.attnum = d.objsubid
                                                     AND b.attname IN ('certyo_record_hash', 'certyo_anchor_status',
                                                                       'certyo_verified_at')))))))
                OR (d.refclassid = 'pg_proc'::regclass
                    AND EXISTS (SELECT FROM pg_proc f WHERE f.oid = d.refobjid
                                   AND f.proname IN ('query_to_xml', 'query_to_xmlschema', 'query_to_xml_and_xmlschema',
                                                     'table_to_xml', 'table_to_xmlschema', 'table_to_xml_and_xmlschema',
                                                     'schema_to_xml', 'schema_to_xmlschema', 'schema_to_xml_and_xmlschema',
                                                     'database_to_xml', 'database_to_xmlschema',
                                                     'database_to_xml_and_xmlschema', 'cursor_to_xml',
                                                     'cursor_to_xmlschema', 'ts_stat', 'ts_rewrite')))
            UNION ALL
            SELECT FROM pg_trigger g JOIN tree ON g.tgrelid = tree.relid
             WHERE g.tgenabled IN ('A', 'R')
               AND NOT (g.tgname IN ('certyo_capture', 'certyo_truncate_guard') AND g.tgqual IS NULL
                        AND g.tgfoid = 'certyo.capture()'::regprocedure)
            UNION ALL
            SELECT FROM pg_rewrite r JOIN tree ON r.ev_class = tree.relid WHERE r.ev_enabled IN ('A', 'R')
            UNION ALL
            SELECT FROM pg_class f JOIN tree ON f.oid = tree.relid
             WHERE f.relrowsecurity AND f.relforcerowsecurity
            UNION ALL
            SELECT FROM pg_attribute a JOIN tree ON a.attrelid = tree.relid
              JOIN pg_cast k ON k.castsource = 'text'::regtype AND k.casttarget = a.atttypid
             WHERE a.attnum > 0 AND NOT a.attisdropped AND k.oid >= 16384
            UNION ALL
            SELECT FROM pg_attribute a
             WHERE a.attrelid = c.oid AND a.attnum > 0 AND NOT a.attisdropped AND a.atttypid >= 16384
               AND a.attname = ANY (certyo.capture_option(t.tgargs, 'record_id')))"
    };
}

/// The record key of the table `$1`: at most one row (see [`RecordKey::of`]). Also what the
/// write-back needs to know: a business column the capture trigger fires on, and whether an
/// UPDATE of the table can run code that is not PostgreSQL's own (`user_code!`).
pub const LOOKUP: &str = concat!(
    "SELECT format('%I.%I', n.nspname, c.relname),
          ARRAY(SELECT quote_ident(k.name) FROM unnest(certyo.capture_option(t.tgargs, 'record_id')) k(name)),
          ARRAY(SELECT format_type(a.atttypid, a.atttypmod)
                  FROM unnest(certyo.capture_option(t.tgargs, 'record_id')) WITH ORDINALITY AS k(name, n)
                  JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = k.name AND NOT a.attisdropped
                 ORDER BY k.n),
          c.relowner,
          (SELECT quote_ident(a.attname) FROM pg_attribute a
            WHERE a.attrelid = c.oid AND a.attnum = ANY (t.tgattr::int2[]) AND NOT a.attisdropped
              AND a.attidentity <> 'a' AND a.attgenerated = ''
            ORDER BY a.attnum LIMIT 1),
          ",
    user_code!(),
    ",
          EXISTS (SELECT FROM pg_attribute a
                    JOIN pg_cast k ON (k.castsource = 'text'::regtype AND k.casttarget = a.atttypid)
                                   OR (k.casttarget = 'text'::regtype AND k.castsource = a.atttypid)
                    JOIN pg_proc f ON f.oid = k.castfunc
                   WHERE a.attrelid = c.oid AND NOT a.attisdropped AND k.oid >= 16384
                     AND f.proowner <> c.relowner
                     AND a.attname = ANY (certyo.capture_option(t.tgargs, 'record_id')))
     FROM pg_class c
     JOIN pg_namespace n ON n.oid = c.relnamespace
     JOIN pg_trigger t ON t.tgrelid = c.oid AND t.tgname = 'certyo_capture'
    WHERE c.oid = $1 AND c.relpersistence <> 't'
      AND EXISTS (SELECT FROM pg_attribute a
                   WHERE a.attrelid = c.oid AND a.attname = 'certyo_record_hash' AND NOT a.attisdropped)"
);

pub struct RecordKey {
    /// `schema.table`, quoted for SQL.
    pub table: String,
    /// Record id columns, in record id order, quoted for SQL.
    pub columns: Vec<String>,
    /// Their types, as `format_type` spells them.
    pub types: Vec<String>,
    /// The table's owner: the worker runs its statements on the table with the owner's rights.
    pub owner: Oid,
    /// A business column the capture trigger fires on (`UPDATE OF`), quoted; None when it
    /// fires on every UPDATE.
    pub update_column: Option<String>,
    /// Whether an UPDATE of the table can run code PostgreSQL did not ship (`user_code!`).
    pub user_code: bool,
    /// Whether a record id column's type has a cast from or to text that PostgreSQL did not
    /// ship, whose function another role than the table's owner owns. The worker reads record id parts back with `::type` and writes keys out with
    /// `::text`, as the table's owner: such a cast is its creator's code (whoever owns the
    /// type may create one), which would run with the owner's rights, a superuser's too (an
    /// attacker pass of 2026-12-06). The worker refuses such a table ([`Self::refuse_foreign_cast`]).
    pub foreign_cast: bool,
}

impl RecordKey {
    /// None when the table is gone, no longer tracked, lacks the bookkeeping columns, or a
    /// record id column was dropped: nothing can be matched then. Also None for a temporary
    /// table (a hand-made capture trigger could queue its rows): no other session can read it.
    pub fn of(client: &SpiClient<'_>, relid: Oid) -> Result<Option<RecordKey>, pgrx::spi::Error> {
        Self::from_found(client.select(LOOKUP, None, &[relid.into()])?)
    }

    /// The key from the rows of [`LOOKUP`] (run by the caller, e.g. as a kept statement).
    pub fn from_found(found: SpiTupleTable<'_>) -> Result<Option<RecordKey>, pgrx::spi::Error> {
        let Some(row) = found.into_iter().next() else {
            return Ok(None);
        };
        let (Some(table), Some(columns), Some(types), Some(owner)) = (
            row.get::<String>(1)?,
            row.get::<Vec<String>>(2)?,
            row.get::<Vec<String>>(3)?,
            row.get::<Oid>(4)?,
        ) else {
            return Ok(None);
        };
        let update_column = row.get::<String>(5)?;
        // Unknown counts as user code: the owner's ordinary session settings are the safe side.
        let user_code = row.get::<bool>(6)?.unwrap_or(true);
        let foreign_cast = row.get::<bool>(7)?.unwrap_or(true);
        Ok(
            (!columns.is_empty() && types.len() == columns.len()).then_some(RecordKey {
                table,
                columns,
                types,
                owner,
                update_column,
                user_code,
                foreign_cast,
            }),
        )
    }

    /// The error for a table whose key type has a cast with text not shipped with PostgreSQL
    /// (see [`Self::foreign_cast`]): nothing is read or written back until it is dropped.
    pub fn refuse_foreign_cast(&self) -> crate::error::CertyoError {
        crate::error::CertyoError::new(
            pgrx::PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!("certyo_cdc: the type of a record id column of {} has a cast from or to text whose function another role owns, and certyo_cdc never runs one as the table's owner", self.table),
        )
        .detail("The worker reads record ids back into the key's type and writes keys out as text, with the table owner's rights; a cast function of another role (whoever owns the type may create one) would run with them.")
        .hint(format!("Drop the cast (DROP CAST), or track {} by record_id_columns of PostgreSQL's own types; its changes are delivered meanwhile, and written back once it is gone.", self.table))
    }

    /// `t.k1 = v.k1::type1 AND ...`: the table's key against text parts named k1..kn.
    pub fn matches(&self, table: &str, values: &str) -> String {
        self.columns
            .iter()
            .zip(&self.types)
            .enumerate()
            .map(|(i, (column, ty))| format!("{table}.{column} = {values}.k{}::{ty}", i + 1))
            .collect::<Vec<_>>()
            .join(" AND ")
    }

    /// `record_image_eq(ROW(t.k1, ...), ROW(v.k1::type1, ...))`: the row's key is byte for
    /// byte the one the record id was rendered from, not merely equal to it. Equality is not
    /// identity: under a nondeterministic collation `'abc' = 'ABC'`, and `1001.5 = 1001.50`,
    /// yet capture renders (and Certyo keys) them as two records, and a key changed from one
    /// to the other is the delete of one and the insert of the other. Matched on equality
    /// alone, the old record's hash was written back to the row that now holds the new one.
    /// (Capture's rendering reads back into the same image: a value's output, with settings
    /// pinned, is what its input reads.) `record_image_eq` is PostgreSQL's own, as `REFRESH
    /// MATERIALIZED VIEW CONCURRENTLY` uses it; the key's equality (`matches`) still finds
    /// the row by its index.
    pub fn identical(&self, table: &str, values: &str) -> String {
        let row = |items: Vec<String>| format!("ROW({})", items.join(", "));
        let stored = self
            .columns
            .iter()
            .map(|c| format!("{table}.{c}"))
            .collect();
        let sent = self
            .types
            .iter()
            .enumerate()
            .map(|(i, ty)| format!("{values}.k{}::{ty}", i + 1))
            .collect();
        // The function, not its operator `*=`: between two row constructors an operator is
        // applied column by column (a row comparison), and `integer *= integer` is no operator.
        format!("pg_catalog.record_image_eq({}, {})", row(stored), row(sent))
    }
}

/// A record id part as Postgres reads it back into a column of type `type_name`. Capture
/// renders dates and timestamps in ISO 8601 with astronomical years (year 0 is 1 BC, -0043 is
/// 44 BC), which Postgres' input refuses; it reads `0044-03-15 BC`. Anything else is as is.
pub fn postgres_input(part: &str, type_name: &str) -> String {
    let datelike = matches!(
        type_name,
        "date" | "timestamp without time zone" | "timestamp with time zone"
    );
    let (negative, unsigned) = match part.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, part),
    };
    let year_len = unsigned.find('-').unwrap_or(0);
    let year = match unsigned[..year_len].parse::<i64>() {
        Ok(year) if datelike => {
            if negative {
                -year
            } else {
                year
            }
        }
        _ => return part.to_string(),
    };
    if year > 0 {
        return part.to_string();
    }
    format!("{:04}{} BC", 1 - year, &unsigned[year_len..])
}

/// The parts of a record id: one column's text, or `\`-escaped parts joined by `/`.
pub fn split_record_id(record_id: &str, parts: usize) -> Option<Vec<String>> {
    if parts == 1 {
        return Some(vec![record_id.to_string()]);
    }
    let mut out = vec![String::new()];
    let mut chars = record_id.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.last_mut()?.push(chars.next()?),
            '/' => out.push(String::new()),
            c => out.last_mut()?.push(c),
        }
    }
    (out.len() == parts).then_some(out)
}

#[cfg(test)]
mod tests {
    use super::{postgres_input, split_record_id};

    #[test]
    fn astronomical_years_are_read_back_as_bc() {
        let tz = "timestamp with time zone";
        assert_eq!(postgres_input("-0043-03-15", "date"), "0044-03-15 BC");
        assert_eq!(postgres_input("-043-03-15", "date"), "0044-03-15 BC"); // as 0.2.0 wrote it
        assert_eq!(
            postgres_input("0000-01-01T00:00:00Z", tz),
            "0001-01-01T00:00:00Z BC"
        );
        assert_eq!(
            postgres_input("2026-03-01T00:00:00Z", tz),
            "2026-03-01T00:00:00Z"
        );
        assert_eq!(postgres_input("infinity", "date"), "infinity");
        assert_eq!(postgres_input("-infinity", "date"), "-infinity");
        assert_eq!(postgres_input("-5", "integer"), "-5");
    }

    #[test]
    fn record_ids_split_back_into_their_parts() {
        assert_eq!(split_record_id("42", 1), Some(vec!["42".to_string()]));
        assert_eq!(
            split_record_id(r"EU\/West/A\\1", 2),
            Some(vec!["EU/West".to_string(), r"A\1".to_string()])
        );
        assert_eq!(split_record_id("a/b/c", 2), None);
    }
}
