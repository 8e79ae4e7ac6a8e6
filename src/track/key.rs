//! The record key of a tracked table as it is now: the columns that form its Certyo record id,
//! with their types, so text parts of a record id can be matched against the table's index.
//! Read by the worker (write-back, backfill) in its own transactions.

use crate::capture::options::WriteBack;
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
/// constraints, indexes, generated columns, policies or partition key; any type not shipped
/// that those expressions use (a composite or an array read from text runs its domains'
/// checks, an enum constant too is counted: the safe side); a column of a domain, range or
/// multirange type not shipped (their checks and support functions run), any type not shipped
/// given to a bookkeeping column; a record id column of a type not shipped (the write-back
/// reads record id parts into it with its input function, a domain's checks included); or, in
/// any of those expressions, a built-in function that runs SQL text (`query_to_xml`, `ts_stat`,
/// ...), converts to or from JSON (`to_json`, `row_to_json`, `json_build_object`,
/// `json_populate_record`, the SQL/JSON constructors, ...) or reads a value of a type it is
/// given when it runs (any input function, `record_in(..., to_regtype(...)::oid, ...)`,
/// `pg_input_is_valid`). Those look up the owner's casts to `json` of a type not shipped (a
/// column's, the table's own row type) and run its domains' checks, code that no catalog row
/// links to them; and PostgreSQL records no dependency on its own functions at all, so they are
/// found in the expressions' node trees (defaults included, the safe side). Only a table for
/// which this is false is written back in replica mode (see `crate::rights::writing_back_as`).
/// A macro so that [`LOOKUP`] can be one constant.
macro_rules! user_code {
    () => {
        "EXISTS (
            WITH tree AS (SELECT c.oid AS relid UNION SELECT p.relid FROM pg_partition_tree(c.oid) p),
            objects (classid, objid, expression) AS (
                SELECT 'pg_class'::regclass, tree.relid, false FROM tree
                UNION ALL SELECT 'pg_class'::regclass, i.indexrelid, true FROM pg_index i JOIN tree ON i.indrelid = tree.relid
                UNION ALL SELECT 'pg_constraint'::regclass, k.oid, true FROM pg_constraint k JOIN tree ON k.conrelid = tree.relid
                UNION ALL SELECT 'pg_attrdef'::regclass, d.oid, true FROM pg_attrdef d JOIN tree ON d.adrelid = tree.relid
                     JOIN pg_attribute a ON a.attrelid = d.adrelid AND a.attnum = d.adnum AND a.attgenerated <> ''
                UNION ALL SELECT 'pg_policy'::regclass, p.oid, true FROM pg_policy p JOIN tree ON p.polrelid = tree.relid)
            SELECT FROM objects o JOIN pg_depend d ON d.classid = o.classid AND d.objid = o.objid
             WHERE (d.refobjid >= 16384
                    AND (d.refclassid IN ('pg_proc'::regclass, 'pg_operator'::regclass, 'pg_opclass'::regclass,
                                          'pg_opfamily'::regclass, 'pg_am'::regclass)
                         OR (d.refclassid = 'pg_type'::regclass
                             AND (o.expression
                                  OR EXISTS (SELECT FROM pg_type y WHERE y.oid = d.refobjid AND y.typtype IN ('d', 'r', 'm'))
                                  OR (d.objsubid > 0
                                      AND EXISTS (SELECT FROM pg_attribute b
                                                   WHERE b.attrelid = d.objid AND b.attnum = d.objsubid
                                                     AND b.attname IN ('certyo_record_hash', 'certyo_anchor_status',
                                                                       'certyo_verified_at')))))))
            UNION ALL
            SELECT FROM (SELECT k.conbin AS expr FROM pg_constraint k JOIN tree ON k.conrelid = tree.relid
                         UNION ALL SELECT i.indexprs FROM pg_index i JOIN tree ON i.indrelid = tree.relid
                         UNION ALL SELECT i.indpred FROM pg_index i JOIN tree ON i.indrelid = tree.relid
                         UNION ALL SELECT d.adbin FROM pg_attrdef d JOIN tree ON d.adrelid = tree.relid
                         UNION ALL SELECT p.polqual FROM pg_policy p JOIN tree ON p.polrelid = tree.relid
                         UNION ALL SELECT p.polwithcheck FROM pg_policy p JOIN tree ON p.polrelid = tree.relid
                         UNION ALL SELECT x.partexprs FROM pg_partitioned_table x JOIN tree ON x.partrelid = tree.relid) e
             WHERE e.expr::text ~ '[{]JSON(CONSTRUCTOR)?EXPR '
                OR EXISTS (SELECT FROM regexp_matches(e.expr::text, ':(?:funcid|opfuncid|aggfnoid|winfnoid) (\\d+) ', 'g') m
                             JOIN pg_proc f ON f.oid = m[1]::oid
                            WHERE f.pronamespace = 'pg_catalog'::regnamespace
                              AND ('cstring'::regtype = ANY (f.proargtypes::oid[])
                                   OR f.proname IN ('pg_input_is_valid', 'pg_input_error_info',
                                                    'query_to_xml', 'query_to_xmlschema', 'query_to_xml_and_xmlschema',
                                                    'table_to_xml', 'table_to_xmlschema', 'table_to_xml_and_xmlschema',
                                                    'schema_to_xml', 'schema_to_xmlschema', 'schema_to_xml_and_xmlschema',
                                                    'database_to_xml', 'database_to_xmlschema',
                                                    'database_to_xml_and_xmlschema', 'cursor_to_xml',
                                                    'cursor_to_xmlschema', 'ts_stat', 'ts_rewrite',
                                                    'to_json', 'to_jsonb', 'row_to_json', 'array_to_json',
                                                    'json_build_array', 'json_build_object', 'jsonb_build_array',
                                                    'jsonb_build_object', 'json_agg', 'jsonb_agg', 'json_agg_strict',
                                                    'jsonb_agg_strict', 'json_object_agg', 'jsonb_object_agg',
                                                    'json_object_agg_strict', 'jsonb_object_agg_strict',
                                                    'json_object_agg_unique', 'jsonb_object_agg_unique',
                                                    'json_object_agg_unique_strict', 'jsonb_object_agg_unique_strict',
                                                    'json_populate_record', 'jsonb_populate_record',
                                                    'jsonb_populate_record_valid', 'json_populate_recordset',
                                                    'jsonb_populate_recordset', 'json_to_record', 'jsonb_to_record',
                                                    'json_to_recordset', 'jsonb_to_recordset')))
            UNION ALL
            SELECT FROM pg_trigger g JOIN tree ON g.tgrelid = tree.relid
             WHERE g.tgenabled IN ('A', 'R')
               AND NOT (g.tgname IN ('certyo_capture', 'certyo_truncate_guard', 'zz_certyo_marks') AND g.tgqual IS NULL
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
                 ORDER BY k.n),
          ARRAY(SELECT CASE WHEN co.oid IS NULL THEN '' ELSE format('%I.%I', cn.nspname, co.collname) END
                  FROM unnest(certyo.capture_option(t.tgargs, 'record_id')) WITH ORDINALITY AS k(name, n)
                  JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = k.name AND NOT a.attisdropped
                  LEFT JOIN pg_collation co ON co.oid = a.attcollation
                  LEFT JOIN pg_namespace cn ON cn.oid = co.collnamespace
                 ORDER BY k.n),
          (certyo.capture_option(t.tgargs, 'write_back'))[1]
     FROM pg_class c
     JOIN pg_namespace n ON n.oid = c.relnamespace
     JOIN pg_trigger t ON t.tgrelid = c.oid AND t.tgname = 'certyo_capture'
    WHERE c.oid = $1 AND c.relpersistence <> 't'
      AND ((certyo.capture_option(t.tgargs, 'write_back'))[1] IS NOT DISTINCT FROM 'none'
           OR EXISTS (SELECT FROM pg_attribute a
                       WHERE a.attrelid = c.oid AND a.attname = 'certyo_record_hash' AND NOT a.attisdropped))"
);

#[derive(Clone)]
pub struct RecordKey {
    /// `schema.table`, quoted for SQL.
    pub table: String,
    /// Record id columns, in record id order, quoted for SQL.
    pub columns: Vec<String>,
    /// Their types.
    pub types: Vec<Oid>,
    /// How the worker reads and compares each column (see [`Reading`]).
    reading: Vec<Reading>,
    /// Each column's collation, qualified for SQL (empty: not collatable): values read from
    /// record ids are compared in it, as the column's own values are.
    collations: Vec<String>,
    /// The table's owner: the worker runs its statements on the table with the owner's rights.
    pub owner: Oid,
    /// A business column the capture trigger fires on, quoted, when 0.1.0 installed it with an
    /// `UPDATE OF` list; None when it fires on every UPDATE (as installed today).
    pub update_column: Option<String>,
    /// Whether an UPDATE of the table can run code PostgreSQL did not ship (`user_code!`).
    pub user_code: bool,
    /// When the table's rows are written back (its capture trigger's `write_back=`).
    pub write_back: WriteBack,
}

/// How the worker reads one record id column back from text and compares it, decided from the
/// catalog, never from names resolved on a search path.
///
/// - **Read as its base type.** A domain's value is read with its base type's input function:
///   the value was the row's, so it passed the domain's checks when it was written, and a
///   check its owner adds later (`ALTER DOMAIN ... ADD CONSTRAINT ... NOT VALID`, at any
///   moment) must not run with the table owner's rights, a superuser's too (an attacker pass of
///   2026-12-06). A type that holds a domain inside (a range over one, an array of one, a
///   composite with one) is refused: its input function would run the checks.
/// - **Never a name someone may rename.** A record id of an object identifier type
///   (`regclass`, ...) or of an enum another role owns is the name of something its owner may
///   rename at any moment: swapping two labels (an attacker pass of 2026-12-06) made each row
///   read back as the other, and both took the other's hash, marked `anchored`. Such a key is
///   refused (the enum's own owner renaming labels changes rows' content, which `audit()`
///   reports).
/// - **Compared by its type's own operators.** `=` and `>` are the default btree operator
///   class's, as `ORDER BY` uses them, written `OPERATOR(schema.op)`: resolved by name on the
///   worker's pinned `search_path`, a `citext` key was compared with text's (case-sensitive)
///   `>` while ordered by citext's, and a backfill skipped rows; an `ltree` key had no `=` at
///   all, and its write-back failed forever.
#[derive(Clone)]
enum Reading {
    Readable {
        /// The type read (a domain's base type) and its type modifier.
        base: Oid,
        typmod: i32,
        /// `OPERATOR(schema.=)` and `OPERATOR(schema.>)` of the base type's default btree class.
        eq: String,
        gt: String,
        /// Whether `>` is PostgreSQL's own `pg_catalog.>` (a row comparison may then use it).
        plain_gt: bool,
        /// `CAST(... AS base)` is needed to compare the column byte for byte with a value read
        /// (`record_image_eq` compares values of one type): the column is of a domain.
        relabel: Option<String>,
    },
    Refused(&'static str),
}

impl Reading {
    fn of(column_type: Oid, column_typmod: i32, table_owner: Oid) -> Reading {
        // SAFETY: catalog lookups of a type that exists (the key was read in this transaction,
        // with the table locked, so its columns' types cannot be dropped); the strings
        // returned are palloc'd and NUL-terminated.
        unsafe {
            let mut typmod = column_typmod;
            let base = pg_sys::getBaseTypeAndTypmod(column_type, &mut typmod);
            if let Some(why) = unreadable_within(base, table_owner, 0) {
                return Reading::Refused(why);
            }
            let cache = pg_sys::lookup_type_cache(
                base,
                (pg_sys::TYPECACHE_EQ_OPR | pg_sys::TYPECACHE_GT_OPR) as i32,
            );
            if cache.is_null()
                || (*cache).eq_opr == pg_sys::InvalidOid
                || (*cache).gt_opr == pg_sys::InvalidOid
            {
                return Reading::Refused("its type has no default btree operator class, so the worker cannot order or match its values");
            }
            let (Some((eq, _)), Some((gt, plain_gt))) =
                (operator_sql((*cache).eq_opr), operator_sql((*cache).gt_opr))
            else {
                return Reading::Refused("its type's operators cannot be named");
            };
            let relabel = (base != column_type).then(|| {
                CStr::from_ptr(pg_sys::format_type_be_qualified(base))
                    .to_string_lossy()
                    .into_owned()
            });
            Reading::Readable {
                base,
                typmod,
                eq,
                gt,
                plain_gt,
                relabel,
            }
        }
    }
}

/// The object identifier types: their text is an object's name.
const OBJECT_NAMES: [Oid; 11] = [
    pg_sys::REGCLASSOID,
    pg_sys::REGTYPEOID,
    pg_sys::REGPROCOID,
    pg_sys::REGPROCEDUREOID,
    pg_sys::REGOPEROID,
    pg_sys::REGOPERATOROID,
    pg_sys::REGCONFIGOID,
    pg_sys::REGDICTIONARYOID,
    pg_sys::REGNAMESPACEOID,
    pg_sys::REGROLEOID,
    pg_sys::REGCOLLATIONOID,
];

/// The owner of type `t`.
///
/// # Safety
/// Inside a transaction (a syscache lookup).
unsafe fn type_owner(t: Oid) -> Option<Oid> {
    // SAFETY: the caller upholds this function's contract (its `# Safety` section), on which
    // every unsafe operation below relies.
    unsafe {
        let tuple = pg_sys::SearchSysCache1(
            pg_sys::SysCacheIdentifier::TYPEOID as i32,
            pg_sys::Datum::from(t),
        );
        if tuple.is_null() {
            return None;
        }
        let owner = (*(pg_sys::GETSTRUCT(tuple) as pg_sys::Form_pg_type)).typowner;
        pg_sys::ReleaseSysCache(tuple);
        Some(owner)
    }
}

/// Why the worker could not read a record id column of type `column_type` of a table owned by
/// `table_owner` back, if it could not (see [`Reading`]): `track()` refuses such a key. Inside
/// a transaction.
pub fn refusal(column_type: Oid, table_owner: Oid) -> Option<&'static str> {
    match Reading::of(column_type, -1, table_owner) {
        Reading::Refused(why) => Some(why),
        Reading::Readable { .. } => None,
    }
}

/// `OPERATOR("schema".op)` for operator `opno`, and whether it is `pg_catalog.>` or `=`.
///
/// # Safety
/// Inside a transaction (a syscache lookup).
unsafe fn operator_sql(opno: Oid) -> Option<(String, bool)> {
    // SAFETY: the caller upholds this function's contract (its `# Safety` section), on which
    // every unsafe operation below relies.
    unsafe {
        let tuple = pg_sys::SearchSysCache1(
            pg_sys::SysCacheIdentifier::OPEROID as i32,
            pg_sys::Datum::from(opno),
        );
        if tuple.is_null() {
            return None;
        }
        let form = pg_sys::GETSTRUCT(tuple) as pg_sys::Form_pg_operator;
        let name = CStr::from_ptr((*form).oprname.data.as_ptr())
            .to_string_lossy()
            .into_owned();
        let namespace = (*form).oprnamespace;
        pg_sys::ReleaseSysCache(tuple);
        let schema = pg_sys::get_namespace_name(namespace);
        if schema.is_null() || !name.bytes().all(|b| b"+-*/<>=~!@#%^&|`?".contains(&b)) {
            return None;
        }
        let quoted = CStr::from_ptr(pg_sys::quote_identifier(schema))
            .to_string_lossy()
            .into_owned();
        let plain = namespace == pg_sys::PG_CATALOG_NAMESPACE.into();
        Some((format!("OPERATOR({quoted}.{name})"), plain))
    }
}

/// Why a value of type `t` (a key's base type, or a type within it: a range's subtype, a
/// multirange's range, an array's element, a composite's attributes) cannot be read back from
/// its text by the worker, if it cannot. The type's input function reads every type within,
/// so each is judged as the key itself would be.
///
/// # Safety
/// Inside a transaction (syscache lookups).
unsafe fn unreadable_within(t: Oid, table_owner: Oid, depth: u32) -> Option<&'static str> {
    // SAFETY: the caller upholds this function's contract (its `# Safety` section), on which
    // every unsafe operation below relies.
    unsafe {
        if depth > 32 {
            return Some(
                "its type is nested past reason (ranges, arrays and composite types within each other)",
            );
        }
        // A record id that is a name reads back as whatever bears that name now.
        if OBJECT_NAMES.contains(&t) {
            return Some("its values are, or hold, names of database objects, which their owners may rename at any moment: a record id would then name another row, and take its hash (store the object's oid instead)");
        }
        match pg_sys::get_typtype(t) as u8 {
            b'd' if depth > 0 => Some("its type holds a domain (in a range, an array or a composite type), whose checks would run, as the table's owner, when a record id is read back"),
            b'e' if type_owner(t) != Some(table_owner) => Some("its type is, or holds, an enum of another role, who may rename its labels at any moment (ALTER TYPE ... RENAME VALUE): a record id would then name another row, and take its hash"),
            b'r' => unreadable_within(pg_sys::get_range_subtype(t), table_owner, depth + 1),
            b'm' => unreadable_within(pg_sys::get_multirange_range(t), table_owner, depth + 1),
            b'c' => {
                let desc = pg_sys::lookup_rowtype_tupdesc_copy(t, -1);
                (0..(*desc).natts as usize).find_map(|i| {
                    let a = crate::compat::attribute(desc, i);
                    if a.attisdropped {
                        None
                    } else {
                        unreadable_within(a.atttypid, table_owner, depth + 1)
                    }
                })
            }
            _ => {
                let element = pg_sys::get_element_type(t);
                if element == pg_sys::InvalidOid {
                    None
                } else {
                    unreadable_within(element, table_owner, depth + 1)
                }
            }
        }
    }
}

impl RecordKey {
    /// None when the table is gone, no longer tracked, lacks the bookkeeping columns (unless
    /// tracked with `write_back => 'none'`, which has none), or a
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
        let (Some(table), Some(columns), Some(types), Some(owner), Some(typmods), Some(collations)) = (
            row.get::<String>(1)?,
            row.get::<Vec<String>>(2)?,
            row.get::<Vec<Oid>>(3)?,
            row.get::<Oid>(4)?,
            row.get::<Vec<i32>>(7)?,
            row.get::<Vec<String>>(8)?,
        ) else {
            return Ok(None);
        };
        let update_column = row.get::<String>(5)?;
        // Unknown counts as user code: the owner's ordinary session settings are the safe side.
        let user_code = row.get::<bool>(6)?.unwrap_or(true);
        let write_back = WriteBack::from_option(row.get::<String>(9)?.as_deref());
        let complete = !columns.is_empty()
            && types.len() == columns.len()
            && typmods.len() == columns.len()
            && collations.len() == columns.len();
        if !complete {
            return Ok(None);
        }
        let reading = types
            .iter()
            .zip(&typmods)
            .map(|(t, m)| Reading::of(*t, *m, owner))
            .collect();
        Ok(Some(RecordKey {
            table,
            columns,
            types,
            reading,
            collations,
            owner,
            update_column,
            user_code,
            write_back,
        }))
    }

    /// Whether the worker can read every record id column back (see [`Reading`]); the error
    /// that says why not otherwise.
    pub fn readable(&self) -> Result<(), CertyoError> {
        for (i, reading) in self.reading.iter().enumerate() {
            if let Reading::Refused(why) = reading {
                return Err(self.unreadable(i, why));
            }
        }
        Ok(())
    }

    fn read(&self, i: usize) -> Result<(Oid, i32), CertyoError> {
        match &self.reading[i] {
            Reading::Readable { base, typmod, .. } => Ok((*base, *typmod)),
            Reading::Refused(why) => Err(self.unreadable(i, why)),
        }
    }

    /// Record id parts of column `i`, read by its (base) type's own input function: an array
    /// of that type, for `unnest`. Never a cast: whoever owns a type may create a cast from
    /// text to it at any moment, and `::type` would run its function with the rights of
    /// whoever reads (the table's owner, a superuser too). An input function is the type's own
    /// (written in C by a superuser, or PostgreSQL's).
    pub fn array_of(
        &self,
        i: usize,
        parts: &[String],
    ) -> Result<DatumWithOid<'static>, CertyoError> {
        let (element, _) = self.read(i)?;
        // SAFETY: syscache lookups of a type that exists (see `Reading::of`); construct_array
        // copies the datums (made by the type's input function, so of its length, passing and
        // alignment) into a palloc'd array of that element type.
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

    /// One value of column `i`, read from its text by the (base) type's input function (see
    /// [`Self::array_of`]).
    pub fn value_of(&self, i: usize, part: &str) -> Result<DatumWithOid<'static>, CertyoError> {
        let (base, _) = self.read(i)?;
        let datum = self.input(i, part)?;
        // SAFETY: the datum was made by the input function of this very type.
        Ok(unsafe { DatumWithOid::new(datum, base) })
    }

    /// Column `i`'s value as text, by its type's own output function (never a cast to text, see
    /// [`Self::array_of`]). `found` is the type of the datum as the query returned it: a
    /// value of another type is an error, never read as this one.
    pub fn text_of(
        &self,
        i: usize,
        found: Oid,
        datum: pg_sys::Datum,
    ) -> Result<String, CertyoError> {
        if found != self.types[i] {
            return Err(self.unreadable(i, "the query returned it as another type"));
        }
        let (base, _) = self.read(i)?;
        // SAFETY: the datum is of the column's type (checked above), so of its base type; the
        // output function returns a palloc'd NUL-terminated string.
        unsafe {
            let (mut output, mut varlena) = (pg_sys::InvalidOid, false);
            pg_sys::getTypeOutputInfo(base, &mut output, &mut varlena);
            let text = pg_sys::OidOutputFunctionCall(output, datum);
            Ok(CStr::from_ptr(text).to_string_lossy().into_owned())
        }
    }

    fn input(&self, i: usize, part: &str) -> Result<pg_sys::Datum, CertyoError> {
        let (base, typmod) = self.read(i)?;
        let text = CString::new(postgres_input(part, base))
            .map_err(|_| self.unreadable(i, "a record id part holds a NUL byte"))?;
        // SAFETY: a syscache lookup of the type, which exists (see `Reading::of`); the input
        // function reads a NUL-terminated string and raises an error for bad input.
        unsafe {
            let (mut input, mut ioparam) = (pg_sys::InvalidOid, pg_sys::InvalidOid);
            pg_sys::getTypeInputInfo(base, &mut input, &mut ioparam);
            Ok(pg_sys::OidInputFunctionCall(
                input,
                text.as_ptr().cast_mut(),
                ioparam,
                typmod,
            ))
        }
    }

    fn unreadable(&self, i: usize, why: &str) -> CertyoError {
        CertyoError::new(
            PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            format!("certyo_cdc cannot read record id column {} of {} back: {why}", self.columns[i], self.table),
        )
        .hint("Track the table by record_id_columns of other types (certyo.track's record_id_columns).")
    }

    fn operators(&self, i: usize) -> (&str, &str, bool) {
        match &self.reading[i] {
            Reading::Readable {
                eq, gt, plain_gt, ..
            } => (eq, gt, *plain_gt),
            // Never built for such a key (`readable` is checked first); a statement naming no
            // operator fails to parse rather than compare anything.
            Reading::Refused(_) => ("", "", false),
        }
    }

    /// Column `i` of `table` as the type it is read as: a domain column relabeled as its base
    /// type (no code runs), so that the base type's operators apply and no operator declared
    /// on the domain itself (`=(domain, base)`, made by whoever may create in the schema of
    /// the base type's operators) can be chosen instead.
    fn column_as_read(&self, table: &str, i: usize) -> String {
        match &self.reading[i] {
            Reading::Readable {
                relabel: Some(base),
                ..
            } => format!("CAST({table}.{} AS {base})", self.columns[i]),
            _ => format!("{table}.{}", self.columns[i]),
        }
    }

    /// `t.k1 OPERATOR(s.=) v.k1 AND ...`: the table's key against the values named k1..kn.
    pub fn matches(&self, table: &str, values: &str) -> String {
        (0..self.columns.len())
            .map(|i| {
                format!(
                    "{} {} {values}.k{}",
                    self.column_as_read(table, i),
                    self.operators(i).0,
                    i + 1
                )
            })
            .collect::<Vec<_>>()
            .join(" AND ")
    }

    /// Column `i` of alias `table`, as the key's order compares it (see [`Self::after`]).
    pub fn ordered(&self, table: &str, i: usize) -> String {
        self.column_as_read(table, i)
    }

    /// Whether the key `left(0), left(1), ...` comes after the values `$first`.. in the key's
    /// order (the order `ORDER BY` of the key columns gives: each type's default btree class).
    pub fn after(&self, left: &dyn Fn(usize) -> String, first: usize) -> String {
        let n = self.columns.len();
        let column = left;
        // In the column's collation, whatever the left side is: a parameter's would be the
        // database's, and a text key collated otherwise compared in two orders.
        let param = |i: usize| match self.collations[i].as_str() {
            "" => format!("${}", first + i),
            collation => format!("(${} COLLATE {collation})", first + i),
        };
        if n == 1 {
            return format!("{} {} {}", column(0), self.operators(0).1, param(0));
        }
        if (0..n).all(|i| self.operators(i).2) {
            // PostgreSQL's own `>` for every column: a row comparison, which an index serves.
            let columns: Vec<String> = (0..n).map(column).collect();
            let params: Vec<String> = (0..n).map(param).collect();
            return format!(
                "({}) OPERATOR(pg_catalog.>) ({})",
                columns.join(", "),
                params.join(", ")
            );
        }
        // (k1 > $1) OR (k1 = $1 AND k2 > $2) OR ...
        let branches: Vec<String> = (0..n)
            .map(|last| {
                let mut terms: Vec<String> = (0..last)
                    .map(|i| format!("{} {} {}", column(i), self.operators(i).0, param(i)))
                    .collect();
                terms.push(format!(
                    "{} {} {}",
                    column(last),
                    self.operators(last).1,
                    param(last)
                ));
                format!("({})", terms.join(" AND "))
            })
            .collect();
        format!("({})", branches.join(" OR "))
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
    /// the row by its index. A domain column is relabeled as its base type (no code runs).
    pub fn identical(&self, table: &str, values: &str) -> String {
        let row = |items: Vec<String>| format!("ROW({})", items.join(", "));
        let stored = (0..self.columns.len())
            .map(|i| self.column_as_read(table, i))
            .collect();
        let sent = (1..=self.columns.len())
            .map(|i| format!("{values}.k{i}"))
            .collect();
        // The function, not its operator `*=`: between two row constructors an operator is
        // applied column by column (a row comparison), and `integer *= integer` is no operator.
        format!("pg_catalog.record_image_eq({}, {})", row(stored), row(sent))
    }

    /// The key's types, for a kept statement's text: a statement whose parameters are of
    /// these types is kept apart from one planned for others (a column retyped).
    pub fn type_list(&self) -> String {
        self.types
            .iter()
            .map(|t| t.to_u32().to_string())
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// A record id part as Postgres reads it back into a column of type `type_oid`. Capture
/// renders dates and timestamps in ISO 8601 with astronomical years (year 0 is 1 BC, -0043 is
/// 44 BC), which Postgres' input refuses; it reads `0044-03-15 BC`. Anything else is as is.
pub fn postgres_input(part: &str, type_oid: Oid) -> String {
    let datelike = [
        pg_sys::DATEOID,
        pg_sys::TIMESTAMPOID,
        pg_sys::TIMESTAMPTZOID,
    ]
    .contains(&type_oid);
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
