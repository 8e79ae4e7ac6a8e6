//! The record key of a tracked table as it is now: the columns that form its Certyo record id,
//! with their types, so text parts of a record id can be matched against the table's index.
//! Read by the worker (write-back, backfill) in its own transactions.

use crate::error::CertyoError;
use pgrx::datum::DatumWithOid;
use pgrx::pg_sys::{self, Oid};
use pgrx::spi::{SpiClient, SpiTupleTable};
use pgrx::PgSqlErrorCode;
use std::ffi::{CStr, CString};

/// Whether an UPDATE of the table's bookkeeping columns in replica mode could run code that
/// PostgreSQL did not ship (`c` is the table's `pg_class` row): a trigger or rule that fires
/// in replica mode (`ENABLE ALWAYS`, `ENABLE REPLICA`; the capture trigger itself only as
/// `track()` installs it), a forced row-level security policy, or a function, operator,
/// operator class or access method that is not a system object (OID past
/// `FirstNormalObjectId`, so extensions' too) used by the table's (or a partition's)
/// constraints, indexes, generated columns, policies or partition key; a domain, range or
/// multirange type not shipped (their checks and support functions run), any type not shipped
/// given to a bookkeeping column; a record id column of a type not shipped (the write-back
/// reads record id parts into it with its input function, a domain's checks included); or one
/// of the built-in functions that run SQL text (`query_to_xml`, `ts_stat`, ...). Only a table for which this is false is written back in replica mode (see
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
          ARRAY(SELECT a.atttypid
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
          ARRAY(SELECT a.atttypmod
                  FROM unnest(certyo.capture_option(t.tgargs, 'record_id')) WITH ORDINALITY AS k(name, n)
                  JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = k.name AND NOT a.attisdropped
                 ORDER BY k.n)
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
    /// Their types.
    pub types: Vec<Oid>,
    /// Their type modifiers (`numeric(10,2)`, `varchar(8)`), as their input functions take them.
    pub typmods: Vec<i32>,
    /// The table's owner: the worker runs its statements on the table with the owner's rights.
    pub owner: Oid,
    /// A business column the capture trigger fires on (`UPDATE OF`), quoted; None when it
    /// fires on every UPDATE.
    pub update_column: Option<String>,
    /// Whether an UPDATE of the table can run code PostgreSQL did not ship (`user_code!`).
    pub user_code: bool,
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
        let (Some(table), Some(columns), Some(types), Some(owner), Some(typmods)) = (
            row.get::<String>(1)?,
            row.get::<Vec<String>>(2)?,
            row.get::<Vec<Oid>>(3)?,
            row.get::<Oid>(4)?,
            row.get::<Vec<i32>>(7)?,
        ) else {
            return Ok(None);
        };
        let update_column = row.get::<String>(5)?;
        // Unknown counts as user code: the owner's ordinary session settings are the safe side.
        let user_code = row.get::<bool>(6)?.unwrap_or(true);
        let complete = !columns.is_empty() && types.len() == columns.len() && typmods.len() == columns.len();
        Ok(complete.then_some(RecordKey {
            table,
            columns,
            types,
            typmods,
            owner,
            update_column,
            user_code,
        }))
    }

    /// Record id parts of column `i`, read into its type by the type's own input function: an
    /// array of that type, for `unnest`. Never a cast: whoever owns a type may create a cast
    /// from text to it at any moment, and `::type` would run its function with the rights of
    /// whoever reads (the table's owner, a superuser too). An input function is the type's
    /// own (written in C by a superuser, or PostgreSQL's for enums and domains, whose checks
    /// are the table owner's choice). Run it as the table's owner: a domain's checks are
    /// user code.
    pub fn array_of(&self, i: usize, parts: &[String]) -> Result<DatumWithOid<'static>, CertyoError> {
        let element = self.types[i];
        // SAFETY: syscache lookups of a type that exists (the key was read in this
        // transaction, with the table locked, so its columns' types cannot be dropped);
        // construct_array copies the datums (made by the type's input function, so of its
        // length, passing and alignment) into a palloc'd array of that element type.
        unsafe {
            let array_type = pg_sys::get_array_type(element);
            if array_type == pg_sys::InvalidOid {
                return Err(self.unreadable(i, "its type has no array type"));
            }
            let mut datums = parts
                .iter()
                .map(|part| self.input(i, part))
                .collect::<Result<Vec<_>, _>>()?;
            let (mut len, mut byval, mut align) = (0i16, false, 0 as std::ffi::c_char);
            pg_sys::get_typlenbyvalalign(element, &mut len, &mut byval, &mut align);
            let array = pg_sys::construct_array(
                datums.as_mut_ptr(),
                datums.len() as i32,
                element,
                len.into(),
                byval,
                align,
            );
            Ok(DatumWithOid::new(pg_sys::Datum::from(array), array_type))
        }
    }

    /// One value of column `i`, read from its text by the type's input function (see
    /// [`Self::array_of`]).
    pub fn value_of(&self, i: usize, part: &str) -> Result<DatumWithOid<'static>, CertyoError> {
        let datum = self.input(i, part)?;
        // SAFETY: the datum was made by the input function of this very type.
        Ok(unsafe { DatumWithOid::new(datum, self.types[i]) })
    }

    /// Column `i`'s value as text, by its type's own output function (never a cast to text, see
    /// [`Self::array_of`]). `found` is the type of the datum as the query returned it: a
    /// value of another type is an error, never read as this one.
    pub fn text_of(&self, i: usize, found: Oid, datum: pg_sys::Datum) -> Result<String, CertyoError> {
        if found != self.types[i] {
            return Err(self.unreadable(i, "the query returned it as another type"));
        }
        // SAFETY: the datum is of the column's type (checked above); the output function
        // returns a palloc'd NUL-terminated string.
        unsafe {
            let (mut output, mut varlena) = (pg_sys::InvalidOid, false);
            pg_sys::getTypeOutputInfo(self.types[i], &mut output, &mut varlena);
            let text = pg_sys::OidOutputFunctionCall(output, datum);
            Ok(CStr::from_ptr(text).to_string_lossy().into_owned())
        }
    }

    fn input(&self, i: usize, part: &str) -> Result<pg_sys::Datum, CertyoError> {
        // SAFETY: syscache lookups of the column's type, which exists (see `array_of`); the
        // input function reads a NUL-terminated string and raises an error for bad input.
        unsafe {
            // A domain over date reads its text as a date does.
            let text = CString::new(postgres_input(part, pg_sys::getBaseType(self.types[i])))
                .map_err(|_| self.unreadable(i, "a record id part holds a NUL byte"))?;
            let (mut input, mut ioparam) = (pg_sys::InvalidOid, pg_sys::InvalidOid);
            pg_sys::getTypeInputInfo(self.types[i], &mut input, &mut ioparam);
            Ok(pg_sys::OidInputFunctionCall(
                input,
                text.as_ptr().cast_mut(),
                ioparam,
                self.typmods[i],
            ))
        }
    }

    fn unreadable(&self, i: usize, why: &str) -> CertyoError {
        CertyoError::new(
            PgSqlErrorCode::ERRCODE_DATATYPE_MISMATCH,
            format!("certyo_cdc cannot read record id column {} of {}: {why}", self.columns[i], self.table),
        )
        .hint("Track the table by record_id_columns of other types (certyo.track's record_id_columns).")
    }

    /// `t.k1 = v.k1 AND ...`: the table's key against the values named k1..kn, of its types.
    pub fn matches(&self, table: &str, values: &str) -> String {
        (1..=self.columns.len())
            .zip(&self.columns)
            .map(|(i, column)| format!("{table}.{column} = {values}.k{i}"))
            .collect::<Vec<_>>()
            .join(" AND ")
    }

    /// `record_image_eq(ROW(t.k1, ...), ROW(v.k1, ...))`: the row's key is byte for
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
        let stored = self.columns.iter().map(|c| format!("{table}.{c}")).collect();
        let sent = (1..=self.columns.len()).map(|i| format!("{values}.k{i}")).collect();
        // The function, not its operator `*=`: between two row constructors an operator is
        // applied column by column (a row comparison), and `integer *= integer` is no operator.
        format!("pg_catalog.record_image_eq({}, {})", row(stored), row(sent))
    }

    /// The key's types, for a kept statement's text: a statement whose parameters are of
    /// these types is kept apart from one planned for others (a column retyped).
    pub fn type_list(&self) -> String {
        self.types.iter().map(|t| t.to_u32().to_string()).collect::<Vec<_>>().join(",")
    }
}

/// A record id part as Postgres reads it back into a column of type `type_oid`. Capture
/// renders dates and timestamps in ISO 8601 with astronomical years (year 0 is 1 BC, -0043 is
/// 44 BC), which Postgres' input refuses; it reads `0044-03-15 BC`. Anything else is as is.
pub fn postgres_input(part: &str, type_oid: Oid) -> String {
    let datelike = [pg_sys::DATEOID, pg_sys::TIMESTAMPOID, pg_sys::TIMESTAMPTZOID].contains(&type_oid);
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
        let tz = pgrx::pg_sys::TIMESTAMPTZOID;
        let date = pgrx::pg_sys::DATEOID;
        assert_eq!(postgres_input("-0043-03-15", date), "0044-03-15 BC");
        assert_eq!(postgres_input("-043-03-15", date), "0044-03-15 BC"); // as 0.2.0 wrote it
        assert_eq!(
            postgres_input("0000-01-01T00:00:00Z", tz),
            "0001-01-01T00:00:00Z BC"
        );
        assert_eq!(
            postgres_input("2026-03-01T00:00:00Z", tz),
            "2026-03-01T00:00:00Z"
        );
        assert_eq!(postgres_input("infinity", date), "infinity");
        assert_eq!(postgres_input("-infinity", date), "-infinity");
        assert_eq!(postgres_input("-5", pgrx::pg_sys::INT4OID), "-5");
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
