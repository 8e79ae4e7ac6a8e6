//! What `track()` needs to know about a table, read from the catalogs, and the validation of
//! the user's options against it. Everything here only reads: a refused request changes nothing.

use crate::capture::options::{is_bookkeeping, CaptureOptions, RecordIdSource, WriteBack};
use crate::capture::plan::timestamp_column;
use crate::error::{CertyoError, Result};
use pgrx::pg_sys::{self, Oid};
use pgrx::prelude::*;
use pgrx::PgSqlErrorCode;

pub struct Attribute {
    pub name: String,
    pub typid: Oid,
    pub not_null: bool,
}

pub struct Table {
    pub relid: Oid,
    /// `schema.table`, for messages and for Certyo.
    pub display: String,
    /// `"schema"."table"`, for SQL text.
    pub quoted: String,
    pub columns: Vec<Attribute>,
    pub primary_key: Vec<String>,
}

/// The options as the caller gave them; `None` means "decide for me".
#[derive(Clone)]
pub struct Request {
    pub record_id_columns: Option<Vec<String>>,
    pub exclude_columns: Vec<String>,
    pub timestamp_column: Option<String>,
    /// None: the table keeps its mode, a table not tracked yet takes `certyo.write_back`.
    pub write_back: Option<WriteBack>,
}

/// Timestamp columns picked up when `timestamp_column` is not given.
const AUTO_TIMESTAMP_COLUMNS: [&str; 2] = ["updated_at", "modified_at"];

impl Table {
    /// Look the table up and check that the current user may track it.
    pub fn inspect(relid: Oid) -> Result<Table> {
        let found = Spi::connect(|client| {
            let rows = client.select(
                "SELECT c.relkind::text || c.relpersistence::text, n.nspname::text, c.relname::text,
                        pg_catalog.format('%I.%I', n.nspname, c.relname),
                        CASE WHEN c.relispartition THEN pg_catalog.pg_partition_root(c.oid)::regclass::text END,
                        (SELECT pg_catalog.string_agg(i.inhrelid::regclass::text, ', ')
                           FROM pg_catalog.pg_inherits i WHERE i.inhparent = c.oid AND c.relkind = 'r')
                   FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace WHERE c.oid = $1",
                None,
                &[relid.into()],
            )?;
            match rows.into_iter().next() {
                None => Ok(None),
                Some(row) => Ok::<_, pgrx::spi::Error>(Some((
                    row.get::<String>(1)?.unwrap_or_default(),
                    row.get::<String>(2)?.unwrap_or_default(),
                    row.get::<String>(3)?.unwrap_or_default(),
                    row.get::<String>(4)?.unwrap_or_default(),
                    row.get::<String>(5)?,
                    row.get::<String>(6)?,
                ))),
            }
        })?;
        let Some((kind, schema, name, quoted, partition_of, children)) = found else {
            return Err(CertyoError::new(
                PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE,
                format!("certyo_cdc: there is no table with OID {}", relid.to_u32()),
            )
            .hint("Pass the table by name, e.g. certyo.track('public.products')."));
        };
        let display = format!("{schema}.{name}");
        let mut kind = kind.bytes();
        check_kind(kind.next().unwrap_or(b'?'), &display)?;
        if kind.next() == Some(b't') {
            return Err(CertyoError::new(
                PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                format!("certyo_cdc: {display} is a temporary table and cannot be tracked"),
            )
            .detail("The delivery worker cannot read another session's temporary tables, and they vanish with the session.")
            .hint("Track a permanent (or unlogged) table."));
        }
        if let Some(parent) = partition_of {
            return Err(CertyoError::new(
                PgSqlErrorCode::ERRCODE_WRONG_OBJECT_TYPE,
                format!("certyo_cdc: {display} is a partition of {parent}"),
            )
            .detail("Partitions are tracked with their partitioned table, under its name: all of them, present and future.")
            .hint(format!("Call certyo.track('{parent}') on the partitioned table instead.")));
        }
        if let Some(children) = children {
            return Err(CertyoError::new(
                PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                format!("certyo_cdc: {display} has inheritance children ({children}), whose rows its triggers never see"),
            )
            .detail("Rows written to a child table (also through UPDATE or DELETE on the parent) fire only the child's triggers, so they would silently not be captured.")
            .hint("Track each child table on its own after removing the inheritance (ALTER TABLE child NO INHERIT parent), or use declarative partitioning, whose partitions are tracked with their table."));
        }
        if schema == "certyo" {
            return Err(CertyoError::new(
                PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                format!("certyo_cdc: {display} belongs to certyo_cdc itself and cannot be tracked"),
            )
            .hint("Track your own tables, in schemas other than certyo."));
        }
        // SAFETY: a catalog check inside the caller's transaction.
        if !unsafe { crate::compat::owns_table(relid) } {
            return Err(CertyoError::new(
                PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
                format!("certyo_cdc: must be owner of table {display} to change its tracking"),
            )
            .hint("Ask the table's owner (or a superuser) to call certyo.track() or certyo.untrack()."));
        }
        Ok(Table {
            relid,
            display,
            quoted,
            columns: columns(relid)?,
            primary_key: primary_key(relid)?,
        })
    }

    pub fn column(&self, name: &str) -> Option<&Attribute> {
        self.columns.iter().find(|c| c.name == name)
    }

    /// Validate a request and turn it into the options the trigger will carry.
    pub fn resolve(&self, request: &Request) -> Result<CaptureOptions> {
        let (record_id_source, record_id_columns) = self.resolve_record_id(request)?;
        let mut exclude_columns = Vec::new();
        for name in &request.exclude_columns {
            self.require_column(name, "exclude")?;
            if record_id_columns.contains(name) {
                return Err(CertyoError::new(
                    PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                    format!("certyo_cdc: column \"{name}\" is the record id of {} and cannot be excluded", self.display),
                )
                .hint("Remove it from exclude_columns, or choose other record_id_columns."));
            }
            // Bookkeeping columns are always left out (but under write_back => 'none', which has
            // none); saying so again changes nothing.
            let ours = is_bookkeeping(name) && request.write_back != Some(WriteBack::None);
            if !ours && !exclude_columns.contains(name) {
                exclude_columns.push(name.clone());
            }
        }
        let timestamp_column = self.resolve_timestamp(request.timestamp_column.as_deref())?;
        let options = CaptureOptions {
            record_id_source,
            record_id_columns,
            exclude_columns,
            timestamp_column,
            table_id: None,
            write_back: request
                .write_back
                .unwrap_or_else(crate::settings::write_back),
        };
        Ok(options)
    }

    /// In the modes that write back, a captured generated column must be computed from captured
    /// columns only. One computed
    /// from an excluded column changes when only that column does, after every BEFORE trigger
    /// (so the marks trigger could not tell the row's content changed, and the row would keep
    /// an earlier version's `anchored`); one computed from a bookkeeping column changes with
    /// every write-back, so the worker would mark content other than the version it marks.
    /// Stored generated columns only: a virtual one is never captured (`plan::is_virtual`).
    pub fn require_generated_from_captured(&self, options: &CaptureOptions) -> Result<()> {
        if options.write_back == WriteBack::None {
            return Ok(()); // no marks, and capture sees generated columns as stored
        }
        let pairs: Vec<(String, String)> = Spi::connect(|client| {
            let rows = client.select(
                "SELECT g.attname::text, s.attname::text
                   FROM pg_catalog.pg_attrdef ad
                   JOIN pg_catalog.pg_attribute g ON g.attrelid = ad.adrelid AND g.attnum = ad.adnum
                   JOIN pg_catalog.pg_depend d
                     ON d.classid = 'pg_catalog.pg_attrdef'::pg_catalog.regclass AND d.objid = ad.oid
                    AND d.refclassid = 'pg_catalog.pg_class'::pg_catalog.regclass AND d.refobjid = ad.adrelid
                    AND d.refobjsubid > 0 AND d.refobjsubid <> ad.adnum
                   JOIN pg_catalog.pg_attribute s ON s.attrelid = ad.adrelid AND s.attnum = d.refobjsubid
                  WHERE ad.adrelid = $1 AND g.attgenerated = 's' AND NOT g.attisdropped AND NOT s.attisdropped
                  ORDER BY g.attnum, s.attnum",
                None,
                &[self.relid.into()],
            )?;
            rows.map(|row| {
                Ok((
                    row.get::<String>(1)?.unwrap_or_default(),
                    row.get::<String>(2)?.unwrap_or_default(),
                ))
            })
            .collect::<std::result::Result<Vec<_>, pgrx::spi::Error>>()
        })?;
        let captured = |name: &str| {
            !options.is_bookkeeping(name) && !options.exclude_columns.iter().any(|c| c == name)
        };
        let Some((generated, source)) = pairs
            .iter()
            .find(|(generated, source)| captured(generated) && !captured(source))
        else {
            return Ok(());
        };
        // The exclusions the hint proposes: the table's, and the generated column.
        let excluded = options
            .exclude_columns
            .iter()
            .chain(std::iter::once(generated))
            .map(|c| quote_literal(c))
            .collect::<Vec<_>>()
            .join(", ");
        let (detail, hint) = if options.is_bookkeeping(source) {
            (
                format!("\"{source}\" is where the worker writes what Certyo answered: every write-back would change \"{generated}\", so a row would be marked with the hash of content it no longer holds."),
                format!("Compute \"{generated}\" from business columns only, or exclude it: certyo.track('{}', exclude_columns => ARRAY[{excluded}]).", self.display),
            )
        } else {
            (
                format!("\"{generated}\" is sent to Certyo and changes when only \"{source}\", which is excluded, does. PostgreSQL computes it after every BEFORE trigger, so in that UPDATE certyo_cdc could not clear what the row's bookkeeping columns say of its earlier version: they would claim it for the new content until the new version is accepted."),
                format!("Exclude it too: certyo.track('{}', exclude_columns => ARRAY[{excluded}]); or stop excluding \"{source}\".", self.display),
            )
        };
        Err(CertyoError::new(
            PgSqlErrorCode::ERRCODE_INVALID_TABLE_DEFINITION,
            format!(
                "certyo_cdc: generated column \"{generated}\" of {} is computed from column \"{source}\", which is not captured",
                self.display
            ),
        )
        .detail(detail)
        .hint(hint))
    }

    fn resolve_record_id(&self, request: &Request) -> Result<(RecordIdSource, Vec<String>)> {
        let (source, names) = self.record_id(request)?;
        for name in &names {
            if let Some(column) = self.column(name) {
                self.require_scalar_key(column)?;
            }
        }
        // The primary key too: it may be DEFERRABLE.
        self.require_unique_key(&names)?;
        Ok((source, names))
    }

    /// Record id columns must identify one row: a unique index (or the primary key) on some
    /// of them, valid, whole-table and on plain columns. Rows sharing a record id would be one
    /// record at Certyo, each row's change read as a new version of the others; the
    /// write-back would mark all of them with one hash, and a backfill, which pages through
    /// the table by record id, would queue one of them.
    fn require_unique_key(&self, names: &[String]) -> Result<()> {
        let unique = unique_index_covers(self.relid, names, &[])?;
        if unique {
            return Ok(());
        }
        let columns = names
            .iter()
            .map(|n| quote_ident(n))
            .collect::<Vec<_>>()
            .join(", ");
        if deferrable_key_covers(self.relid, names)? {
            return Err(CertyoError::new(
                PgSqlErrorCode::ERRCODE_INVALID_TABLE_DEFINITION,
                format!(
                    "certyo_cdc: the unique key on the record id columns ({columns}) of {} is DEFERRABLE",
                    self.display
                ),
            )
            .detail("Capture records each row's change as the statement makes it. A deferrable key lets rows share a record id until commit (UPDATE ... SET id = 3 - id swaps two ids), so Certyo would see one record deleted whose row still exists.")
            .hint(format!(
                "Make the key NOT DEFERRABLE (recreate the constraint), or add a non-deferrable unique index on ({columns}): CREATE UNIQUE INDEX ON {} ({columns}).",
                self.quoted
            )));
        }
        Err(CertyoError::new(
            PgSqlErrorCode::ERRCODE_INVALID_COLUMN_REFERENCE,
            format!(
                "certyo_cdc: record id columns ({columns}) of {} do not identify a row: no unique index covers them in their types' own order and their collation",
                self.display
            ),
        )
        .detail("Rows sharing a record id would be one record at Certyo: each row's change would read as a new version of the others, and the write-back would mark them all with one hash.")
        .hint(format!(
            "CREATE UNIQUE INDEX ON {} ({columns}), or name columns a unique index or the primary key covers.",
            self.quoted
        )))
    }

    /// A record id column's value must come back from its text: the write-back finds the row
    /// by it. An array or a composite is rendered as JSON, which Postgres does not read back
    /// as that type, so every write-back to the table would fail.
    fn require_scalar_key(&self, column: &Attribute) -> Result<()> {
        // SAFETY: type lookups by OID inside the caller's transaction.
        let (array, composite) = unsafe {
            let base = pg_sys::getBaseType(column.typid);
            (
                pg_sys::get_element_type(base) != pg_sys::InvalidOid,
                pg_sys::get_typtype(base) == pg_sys::TYPTYPE_COMPOSITE as std::ffi::c_char,
            )
        };
        if !array && !composite {
            let owner = crate::rights::owner_of(self.relid).unwrap_or_default();
            let Some(why) = crate::track::key::refusal(column.typid, owner) else {
                return Ok(());
            };
            return Err(CertyoError::new(
                PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                format!(
                    "certyo_cdc: record id column \"{}\" of {} cannot be read back: {why}",
                    column.name, self.display
                ),
            )
            .detail("The worker reads each record id back into the key's type, to find the row its write-back marks and a backfill's place.")
            .hint(format!(
                "Choose other record id columns: certyo.track('{}', record_id_columns => ARRAY['col']).",
                self.display
            )));
        }
        Err(CertyoError::new(
            PgSqlErrorCode::ERRCODE_DATATYPE_MISMATCH,
            format!(
                "certyo_cdc: record id column \"{}\" of {} is {}",
                column.name,
                self.display,
                if array { "an array" } else { "of a composite type" }
            ),
        )
        .detail("A record id is the key's text, read back to find the row for the write-back; an array or a composite value does not read back from it.")
        .hint(format!(
            "Choose scalar columns: certyo.track('{}', record_id_columns => ARRAY['col']).",
            self.display
        )))
    }

    fn record_id(&self, request: &Request) -> Result<(RecordIdSource, Vec<String>)> {
        let Some(names) = &request.record_id_columns else {
            if self.primary_key.is_empty() {
                return Err(CertyoError::new(
                    PgSqlErrorCode::ERRCODE_INVALID_TABLE_DEFINITION,
                    format!(
                        "certyo_cdc: table {} has no primary key to use as the record id",
                        self.display
                    ),
                )
                .hint(format!(
                    "Add a primary key, or name NOT NULL columns that identify a row: \
                     certyo.track('{}', record_id_columns => ARRAY['col']).",
                    self.display
                )));
            }
            return Ok((RecordIdSource::PrimaryKey, self.primary_key.clone()));
        };
        if names.is_empty() {
            return Err(CertyoError::new(
                PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                "certyo_cdc: record_id_columns is empty",
            )
            .hint("Pass NULL to use the primary key, or name at least one column."));
        }
        for (i, name) in names.iter().enumerate() {
            let column = self.require_column(name, "record id")?;
            if names[..i].contains(name) {
                return Err(CertyoError::new(
                    PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                    format!("certyo_cdc: record id column \"{name}\" is listed twice"),
                ));
            }
            if is_bookkeeping(name) {
                return Err(CertyoError::new(
                    PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                    format!(
                        "certyo_cdc: bookkeeping column \"{name}\" cannot be a record id column"
                    ),
                ));
            }
            if !column.not_null && !self.primary_key.contains(name) {
                return Err(CertyoError::new(
                    PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                    format!(
                        "certyo_cdc: record id column \"{name}\" of {} may be NULL",
                        self.display
                    ),
                )
                .detail("A row without a record id could not be sent to Certyo.")
                .hint(format!(
                    "ALTER TABLE {} ALTER COLUMN {} SET NOT NULL, or choose another column.",
                    self.quoted,
                    quote_ident(name)
                )));
            }
        }
        Ok((RecordIdSource::Columns, names.clone()))
    }

    fn resolve_timestamp(&self, requested: Option<&str>) -> Result<Option<String>> {
        let Some(name) = requested else {
            let auto = AUTO_TIMESTAMP_COLUMNS
                .iter()
                .filter_map(|n| self.column(n))
                // SAFETY: a type lookup by OID inside the caller's transaction.
                .find(|c| unsafe { timestamp_column(0, c.typid) }.is_some());
            return Ok(auto.map(|c| c.name.clone()));
        };
        let column = self.require_column(name, "timestamp")?;
        // SAFETY: a type lookup by OID inside the caller's transaction.
        if unsafe { timestamp_column(0, column.typid) }.is_none() {
            let type_name =
                // SAFETY: format_type_be returns a palloc'd NUL-terminated string.
                unsafe { std::ffi::CStr::from_ptr(pg_sys::format_type_be(column.typid)) };
            return Err(CertyoError::new(
                PgSqlErrorCode::ERRCODE_DATATYPE_MISMATCH,
                format!("certyo_cdc: timestamp column \"{name}\" of {} has type {}", self.display, type_name.to_string_lossy()),
            )
            .hint("timestamp_column must be of type timestamp or timestamptz; pass NULL to use the transaction's time."));
        }
        Ok(Some(name.to_owned()))
    }

    fn require_column(&self, name: &str, role: &str) -> Result<&Attribute> {
        self.column(name).ok_or_else(|| {
            // A name longer than any identifier is shown cut short: the message stays readable
            // and a megabyte of input does not become a megabyte of log.
            let shown: String = name
                .chars()
                .take(pgrx::pg_sys::NAMEDATALEN as usize)
                .collect();
            let cut = if shown.len() < name.len() { "..." } else { "" };
            CertyoError::new(
                PgSqlErrorCode::ERRCODE_UNDEFINED_COLUMN,
                format!(
                    "certyo_cdc: {role} column \"{shown}{cut}\" does not exist in table {}",
                    self.display
                ),
            )
            .hint(format!(
                "Column names are case-sensitive; the columns of {} are: {}.",
                self.display,
                self.column_list()
            ))
        })
    }

    fn column_list(&self) -> String {
        self.columns
            .iter()
            .map(|c| c.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn check_kind(kind: u8, display: &str) -> Result<()> {
    let what = match kind {
        b'r' | b'p' => return Ok(()),
        b'v' => "a view",
        b'm' => "a materialized view",
        b'f' => "a foreign table",
        b'S' => "a sequence",
        b'i' | b'I' => "an index",
        _ => "not a table",
    };
    let hint = match kind {
        b'v' | b'm' => "Track the tables it reads from instead.".to_string(),
        _ => "Only ordinary tables can be tracked.".to_string(),
    };
    Err(CertyoError::new(
        PgSqlErrorCode::ERRCODE_WRONG_OBJECT_TYPE,
        format!("certyo_cdc: {display} is {what}, not an ordinary table"),
    )
    .hint(hint))
}

fn columns(relid: Oid) -> Result<Vec<Attribute>> {
    Spi::connect(|client| {
        let rows = client.select(
            "SELECT attname::text, atttypid, attnotnull
               FROM pg_attribute WHERE attrelid = $1 AND attnum > 0 AND NOT attisdropped ORDER BY attnum",
            None,
            &[relid.into()],
        )?;
        let mut columns = Vec::new();
        for row in rows {
            columns.push(Attribute {
                name: row.get::<String>(1)?.unwrap_or_default(),
                typid: row.get::<Oid>(2)?.unwrap_or(pg_sys::InvalidOid),
                not_null: row.get::<bool>(3)?.unwrap_or(false),
            });
        }
        Ok(columns)
    })
}

fn primary_key(relid: Oid) -> Result<Vec<String>> {
    Spi::connect(|client| {
        let rows = client.select(
            "SELECT a.attname::text
               FROM pg_index i
               CROSS JOIN LATERAL unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, n)
               JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
              WHERE i.indrelid = $1 AND i.indisprimary
              ORDER BY k.n",
            None,
            &[relid.into()],
        )?;
        let mut names = Vec::new();
        for row in rows {
            names.extend(row.get::<String>(1)?);
        }
        Ok(names)
    })
}

/// An identifier, always double-quoted: safe for any name, including mixed case and quotes.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A string literal, as Postgres' `quote_literal` writes it.
pub fn quote_literal(value: &str) -> String {
    if value.contains('\\') {
        format!("E'{}'", value.replace('\\', "\\\\").replace('\'', "''"))
    } else {
        format!("'{}'", value.replace('\'', "''"))
    }
}

/// Whether a unique index of `relid` other than `without` makes `names` identify a row:
/// valid, whole-table, on plain columns, its key columns all among `names`.
pub fn unique_index_covers(relid: Oid, names: &[String], without: &[Oid]) -> Result<bool> {
    let without: Vec<Oid> = without.to_vec();
    // Each covering index's key columns: (operator class, collation, column type, column
    // collation), checked below.
    let found = Spi::connect(|client| {
        client
            .select(
                "SELECT ARRAY(SELECT i.indclass[k.n - 1] FROM pg_catalog.unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, n)
                               WHERE k.n <= i.indnkeyatts ORDER BY k.n),
                        ARRAY(SELECT i.indcollation[k.n - 1] FROM pg_catalog.unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, n)
                               WHERE k.n <= i.indnkeyatts ORDER BY k.n),
                        ARRAY(SELECT a.atttypid FROM pg_catalog.unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, n)
                                JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                               WHERE k.n <= i.indnkeyatts ORDER BY k.n),
                        ARRAY(SELECT a.attcollation FROM pg_catalog.unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, n)
                                JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                               WHERE k.n <= i.indnkeyatts ORDER BY k.n)
                   FROM pg_catalog.pg_index i
                  WHERE i.indrelid = $1 AND i.indisunique AND i.indisvalid AND i.indimmediate
                    AND i.indpred IS NULL AND i.indexprs IS NULL
                    AND i.indexrelid <> ALL ($3)
                    AND (SELECT pg_catalog.bool_and(a.attname::text = ANY ($2))
                           FROM pg_catalog.unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, n)
                           JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                          WHERE k.n <= i.indnkeyatts)",
                None,
                &[relid.into(), names.to_vec().into(), without.into()],
            )?
            .map(|row| {
                Ok((
                    row.get::<Vec<Oid>>(1)?.unwrap_or_default(),
                    row.get::<Vec<Oid>>(2)?.unwrap_or_default(),
                    row.get::<Vec<Oid>>(3)?.unwrap_or_default(),
                    row.get::<Vec<Oid>>(4)?.unwrap_or_default(),
                ))
            })
            .collect::<std::result::Result<Vec<_>, pgrx::spi::Error>>()
    })?;
    Ok(found
        .iter()
        .any(|(classes, collations, types, column_collations)| {
            classes.len() == types.len()
                && collations.len() == types.len()
                && column_collations.len() == types.len()
                && (0..types.len()).all(|k| {
                    unique_in_the_types_order(
                        classes[k],
                        collations[k],
                        types[k],
                        column_collations[k],
                    )
                })
        }))
}

/// Whether an index key column (operator class `class`, collation `collation`) is unique in the
/// order the worker pages a backfill by and matches write-backs with: the column type's
/// default btree operator family and the column's collation. A key made unique only by
/// another order (`email text_ops` on a citext column, `k COLLATE "C"` on a case-insensitive
/// one) lets two rows tie in the type's order, and a backfill chunk that ended on one of them
/// began the next past both: it said `done` having skipped rows (an attacker pass of
/// 2026-12-06).
fn unique_in_the_types_order(
    class: Oid,
    collation: Oid,
    column_type: Oid,
    column_collation: Oid,
) -> bool {
    // SAFETY: catalog lookups inside the caller's transaction; the type cache entry is
    // cache-owned and read at once.
    unsafe {
        let cache = pg_sys::lookup_type_cache(column_type, pg_sys::TYPECACHE_BTREE_OPFAMILY as i32);
        !cache.is_null()
            && (*cache).btree_opf != pg_sys::InvalidOid
            && pg_sys::get_opclass_family(class) == (*cache).btree_opf
            && collation == column_collation
    }
}

/// Whether a deferrable unique key (not checked row by row) covers `names`.
fn deferrable_key_covers(relid: Oid, names: &[String]) -> Result<bool> {
    Ok(Spi::get_one_with_args::<bool>(
        "SELECT EXISTS (
             SELECT FROM pg_catalog.pg_index i
              WHERE i.indrelid = $1 AND i.indisunique AND NOT i.indimmediate
                AND (SELECT pg_catalog.bool_and(a.attname::text = ANY ($2))
                       FROM pg_catalog.unnest(i.indkey::int2[]) WITH ORDINALITY AS k(attnum, n)
                       JOIN pg_catalog.pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum
                      WHERE k.n <= i.indnkeyatts))",
        &[relid.into(), names.to_vec().into()],
    )?
    .unwrap_or(false))
}

#[cfg(test)]
mod tests {
    use super::{quote_ident, quote_literal};

    #[test]
    fn identifiers_and_literals_are_quoted_against_injection() {
        assert_eq!(quote_ident("Weird \"Name\""), "\"Weird \"\"Name\"\"\"");
        assert_eq!(quote_literal("exclude=it's"), "'exclude=it''s'");
        assert_eq!(quote_literal("a\\b'"), "E'a\\\\b'''");
    }
}
