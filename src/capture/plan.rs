//! The capture plan of one table: which attributes form the payload, the record id and the
//! source timestamp, and how each renders. Building it reads catalogs; using it does not.
//!
//! Plans are cached per backend, keyed by table OID, and dropped by a relcache invalidation
//! callback: any `ALTER TABLE` or trigger change on the table invalidates its relcache entry,
//! so the next row rebuilds the plan from the current descriptor and trigger arguments.

use super::options::{CaptureOptions, WriteBack};
use super::value::{write_json_string, ValuePlan};
use crate::error::{CertyoError, Result};
use pgrx::pg_sys::{self, BuiltinOid, Oid};
use pgrx::PgSqlErrorCode;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::ffi::CStr;
use std::rc::Rc;

pub struct Column {
    /// 0-based attribute index in the table's tuple descriptor.
    pub index: usize,
    pub name: String,
    /// `"name":` as JSON, preceded by a comma for all but the first column.
    pub key: Vec<u8>,
    pub value: ValuePlan,
    pub len: i16,
    pub byval: bool,
    /// A stored generated column: computed after the BEFORE triggers, so what they see in it
    /// is not yet the new row's value. (A virtual one is never captured: [`is_virtual`].)
    pub generated: bool,
}

pub enum TimestampColumn {
    WithTimeZone(usize),
    WithoutTimeZone(usize),
}

pub struct TablePlan {
    /// The tracked table: the relation itself, or for a partition of a tracked partitioned
    /// table, that table. Its OID goes with every change (write-back, history, audit).
    pub relid: Oid,
    /// `schema.table` of the tracked table, as Certyo's `collection`.
    pub collection: String,
    /// The tracked table's identity under its record key (the trigger's `table_id`, 0 when it
    /// carries none): goes with every change, as its OID may not (see `crate::track::identity`).
    pub table_id: i32,
    pub natts: usize,
    /// Business columns in table order: everything but bookkeeping and excluded columns.
    pub payload: Vec<Column>,
    /// Positions in `payload` of the record id columns, in record id order.
    pub record_id: Vec<usize>,
    pub timestamp: Option<TimestampColumn>,
    /// Where the worker writes back: the positions of `certyo_record_hash` and
    /// `certyo_anchor_status`, if the table has them as text columns (for the audit).
    pub written_back: WrittenBack,
    /// 0-based positions of the bookkeeping columns the table has under its write-back mode
    /// (none under `'none'`): what the marks trigger clears when a row's content changes.
    pub marks: Vec<usize>,
    /// Under `'accepted'`, the position of `certyo_anchor_status` (a text column): cleared to
    /// `'pending'`, as an INSERT's default says, not to NULL.
    pub pending_status: Option<usize>,
}

#[derive(Default)]
pub struct WrittenBack {
    pub record_hash: Option<usize>,
    pub anchor_status: Option<usize>,
}

impl TablePlan {
    /// # Safety
    /// `rel` must be an open relation.
    pub unsafe fn build(rel: pg_sys::Relation, options: &CaptureOptions) -> Result<TablePlan> {
        // SAFETY: the caller upholds this function's contract (its `# Safety` section), on which
        // every unsafe operation below relies.
        unsafe {
            let tupdesc = (*rel).rd_att;
            let natts = (*tupdesc).natts as usize;
            let attributes: Vec<&pg_sys::FormData_pg_attribute> = (0..natts)
                .map(|i| crate::compat::attribute(tupdesc, i))
                .collect();
            let name_of = |a: &pg_sys::FormData_pg_attribute| {
                CStr::from_ptr(a.attname.data.as_ptr())
                    .to_string_lossy()
                    .into_owned()
            };
            let tracked = tracked_table(rel)?;
            let table = tracked.name.clone();

            let mut payload: Vec<Column> = Vec::new();
            for (index, attribute) in attributes.iter().enumerate() {
                let name = name_of(attribute);
                if attribute.attisdropped
                    || is_virtual(attribute)
                    || options.is_bookkeeping(&name)
                    || options.exclude_columns.contains(&name)
                {
                    continue;
                }
                let mut key = if payload.is_empty() {
                    Vec::new()
                } else {
                    vec![b',']
                };
                write_json_string(name.as_bytes(), &mut key);
                key.push(b':');
                payload.push(Column {
                    index,
                    key,
                    value: ValuePlan::for_type(attribute.atttypid),
                    len: attribute.attlen,
                    byval: attribute.attbyval,
                    generated: attribute.attgenerated != 0,
                    name,
                });
            }
            // A partition renders its columns in the tracked table's order (an attached partition
            // may order them otherwise), so that a row renders the same whichever way it is read.
            if let Some(order) = &tracked.column_order {
                payload.sort_by_key(|c| {
                    order
                        .iter()
                        .position(|n| *n == c.name)
                        .unwrap_or(usize::MAX)
                });
                for (i, column) in payload.iter_mut().enumerate() {
                    column.key.clear();
                    if i > 0 {
                        column.key.push(b',');
                    }
                    write_json_string(column.name.as_bytes(), &mut column.key);
                    column.key.push(b':');
                }
            }
            for excluded in &options.exclude_columns {
                if !attributes
                    .iter()
                    .any(|a| !a.attisdropped && name_of(a) == *excluded)
                {
                    return Err(missing_column(&table, excluded, "excluded"));
                }
            }
            let record_id = options
                .record_id_columns
                .iter()
                .map(|c| {
                    payload.iter().position(|p| p.name == *c).ok_or_else(|| {
                        match attributes.iter().find(|a| name_of(a) == *c) {
                            Some(a) if is_virtual(a) => virtual_column(&table, c, "record id"),
                            _ => missing_column(&table, c, "record id"),
                        }
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            let timestamp = match &options.timestamp_column {
                None => None,
                Some(c) => {
                    let index = attributes
                        .iter()
                        .position(|a| !a.attisdropped && name_of(a) == *c)
                        .ok_or_else(|| missing_column(&table, c, "timestamp"))?;
                    if is_virtual(attributes[index]) {
                        return Err(virtual_column(&table, c, "timestamp"));
                    }
                    Some(timestamp_column(index, attributes[index].atttypid).ok_or_else(|| {
                        CertyoError::new(
                            PgSqlErrorCode::ERRCODE_DATATYPE_MISMATCH,
                            format!("certyo_cdc: timestamp column \"{c}\" of table {table} is not a timestamp"),
                        )
                        .hint(format!("Call certyo.track('{table}', timestamp_column => ...) with a timestamp or timestamptz column."))
                    })?)
                }
            };
            let text_column = |wanted: &str| {
                attributes.iter().position(|a| {
                    !a.attisdropped && a.atttypid == pg_sys::TEXTOID && name_of(a) == wanted
                })
            };
            let written_back = WrittenBack {
                record_hash: text_column("certyo_record_hash"),
                anchor_status: text_column("certyo_anchor_status"),
            };
            let pending_status = match options.write_back {
                WriteBack::Accepted => written_back.anchor_status,
                _ => None,
            };
            let marks = attributes
                .iter()
                .enumerate()
                .filter(|(_, a)| !a.attisdropped && options.is_bookkeeping(&name_of(a)))
                .map(|(index, _)| index)
                .collect();
            Ok(TablePlan {
                relid: tracked.relid,
                collection: table,
                table_id: options.table_id.unwrap_or(0),
                natts,
                payload,
                record_id,
                timestamp,
                written_back,
                marks,
                pending_status,
            })
        }
    }
}

/// The timestamp source for a column of type `typid`, if it is a timestamp type.
///
/// # Safety
/// Reads the type cache: call inside a transaction.
pub unsafe fn timestamp_column(index: usize, typid: Oid) -> Option<TimestampColumn> {
    // SAFETY: the caller upholds this function's contract (its `# Safety` section), on which
    // every unsafe operation below relies.
    unsafe {
        match BuiltinOid::try_from(pg_sys::getBaseType(typid)) {
            Ok(BuiltinOid::TIMESTAMPTZOID) => Some(TimestampColumn::WithTimeZone(index)),
            Ok(BuiltinOid::TIMESTAMPOID) => Some(TimestampColumn::WithoutTimeZone(index)),
            _ => None,
        }
    }
}

/// The table whose tracking a relation's capture trigger carries out.
struct Tracked {
    relid: Oid,
    name: String,
    /// For a partition: the tracked table's column names in its order.
    column_order: Option<Vec<String>>,
}

/// `rel` itself, or, for a partition, the partitioned table its capture trigger was cloned
/// from (the ancestor whose trigger is not a clone). Read once per plan.
///
/// # Safety
/// `rel` must be an open relation, inside a transaction.
unsafe fn tracked_table(rel: pg_sys::Relation) -> Result<Tracked> {
    // SAFETY: the caller upholds this function's contract (its `# Safety` section), on which
    // every unsafe operation below relies.
    unsafe {
        let own = Tracked {
            relid: (*rel).rd_id,
            name: qualified_name(rel),
            column_order: None,
        };
        if !(*(*rel).rd_rel).relispartition {
            return Ok(own);
        }
        let root = pgrx::Spi::get_one_with_args::<Oid>(
            "SELECT t.tgrelid FROM pg_catalog.pg_partition_ancestors($1) a
           JOIN pg_catalog.pg_trigger t ON t.tgrelid = a.relid
          WHERE t.tgname = 'certyo_capture' AND t.tgparentid = 0 LIMIT 1",
            &[own.relid.into()],
        )?;
        let Some(root) = root.filter(|r| *r != own.relid) else {
            return Ok(own);
        };
        let opened = crate::relation::OpenRelation::open(root, pg_sys::AccessShareLock);
        let root_rel = opened.get();
        let desc = (*root_rel).rd_att;
        let order = (0..(*desc).natts as usize)
            .map(|i| crate::compat::attribute(desc, i))
            .filter(|a| !a.attisdropped)
            .map(|a| {
                CStr::from_ptr(a.attname.data.as_ptr())
                    .to_string_lossy()
                    .into_owned()
            })
            .collect();
        Ok(Tracked {
            relid: root,
            name: qualified_name(root_rel),
            column_order: Some(order),
        })
    }
}

/// `schema.table` of an open relation (Certyo's `collection`, see [`collection_name`]).
///
/// # Safety
/// `rel` must be an open relation.
pub unsafe fn qualified_name(rel: pg_sys::Relation) -> String {
    // SAFETY: the caller upholds this function's contract (its `# Safety` section), on which
    // every unsafe operation below relies.
    unsafe {
        let namespace = pg_sys::get_namespace_name((*(*rel).rd_rel).relnamespace);
        let schema = if namespace.is_null() {
            "?".into()
        } else {
            CStr::from_ptr(namespace).to_string_lossy()
        };
        let name = CStr::from_ptr((*(*rel).rd_rel).relname.data.as_ptr()).to_string_lossy();
        collection_name(&schema, &name)
    }
}

/// Certyo's `collection` for table `name` in `schema`: `schema.table`, each part as it is
/// unless it holds a `.` or a `"`, then double-quoted with `"` doubled, so that two tables
/// never share a collection (`"a.b".c` and `a."b.c"` would both be `a.b.c` unquoted).
/// `certyo.tracked_oids()` (sql/delivery.sql) spells the same rule in SQL.
pub fn collection_name(schema: &str, name: &str) -> String {
    let part = |p: &str| {
        if p.contains(['.', '"']) {
            format!("\"{}\"", p.replace('"', "\"\""))
        } else {
            p.to_string()
        }
    };
    format!("{}.{}", part(schema), part(name))
}

#[cfg(test)]
mod tests {
    use super::collection_name;

    #[test]
    fn two_tables_never_share_a_collection() {
        assert_eq!(collection_name("public", "products"), "public.products");
        assert_eq!(collection_name("Sales", "Order Lines"), "Sales.Order Lines");
        assert_eq!(collection_name("a.b", "c"), "\"a.b\".c");
        assert_eq!(collection_name("a", "b.c"), "a.\"b.c\"");
        assert_eq!(collection_name("a", "say \"hi\""), "a.\"say \"\"hi\"\"\"");
        let names = ["a", "b", "a.b", "b.c", "\"", "a\".\"b", ".", ""];
        let mut seen = std::collections::HashMap::new();
        for schema in names {
            for table in names {
                let collection = collection_name(schema, table);
                if let Some(other) = seen.insert(collection.clone(), (schema, table)) {
                    panic!("{other:?} and {:?} share {collection}", (schema, table));
                }
            }
        }
    }
}

/// A virtual generated column (PostgreSQL 18): computed when read, never when a trigger fires
/// (its content in a trigger's row is undefined; it is stored as NULL). Capture leaves it out,
/// as it does an excluded column: a record never claims NULL for a column a SELECT shows a
/// value in. It is computed from the columns that are captured, or from none that matter.
pub fn is_virtual(attribute: &pg_sys::FormData_pg_attribute) -> bool {
    attribute.attgenerated == b'v' as std::ffi::c_char
}

fn virtual_column(table: &str, column: &str, role: &str) -> CertyoError {
    CertyoError::new(
        PgSqlErrorCode::ERRCODE_INVALID_COLUMN_DEFINITION,
        format!("certyo_cdc: {role} column \"{column}\" of table {table} is a virtual generated column"),
    )
    .detail("PostgreSQL computes a virtual generated column when it is read, never when a trigger fires, so capture cannot see its value.")
    .hint(format!("Name a stored column as the {role} column of certyo.track('{table}', ...), or make \"{column}\" GENERATED ALWAYS AS (...) STORED."))
}

fn missing_column(table: &str, column: &str, role: &str) -> CertyoError {
    CertyoError::new(
        PgSqlErrorCode::ERRCODE_UNDEFINED_COLUMN,
        format!("certyo_cdc: {role} column \"{column}\" of tracked table {table} does not exist"),
    )
    .detail("The column was renamed or dropped after certyo.track() was called.")
    .hint(format!("Call certyo.track('{table}', ...) again with the current column names, or certyo.untrack('{table}')."))
}

thread_local! {
    static PLANS: RefCell<HashMap<Oid, Rc<TablePlan>>> = RefCell::new(HashMap::new());
    /// Set when an invalidation arrived while the cache was borrowed: drop everything next time.
    static STALE: Cell<bool> = const { Cell::new(false) };
}

/// The cached plan for the table a trigger fired on, building it on first use.
///
/// # Safety
/// `rel` must be the open relation the trigger fired on; `args` its capture trigger arguments
/// (or why it may not be captured).
pub unsafe fn for_relation<'a>(
    rel: pg_sys::Relation,
    args: impl FnOnce() -> Result<Vec<&'a str>>,
) -> Result<Rc<TablePlan>> {
    // SAFETY: the caller upholds this function's contract (its `# Safety` section), on which
    // every unsafe operation below relies.
    unsafe {
        super::watch_invalidations();
        let relid = (*rel).rd_id;
        if STALE.replace(false) {
            PLANS.with(|plans| plans.borrow_mut().clear());
        }
        if let Some(plan) = PLANS.with(|plans| plans.borrow().get(&relid).cloned()) {
            return Ok(plan);
        }
        // Build without holding the borrow: catalog reads may process invalidations, which call back.
        let options = CaptureOptions::from_trigger_args(args()?)?;
        // In the writer's session: its search_path must not reach the catalog reads of a build.
        let plan = Rc::new(crate::rights::with_pinned_search_path(|| {
            let plan = TablePlan::build(rel, &options)?;
            if plan.table_id != 0
                && !crate::track::identity::capture_may_use(plan.table_id, plan.relid)?
            {
                return Err(identity_of_another_table(&plan));
            }
            Ok(plan)
        })?);
        PLANS.with(|plans| plans.borrow_mut().insert(relid, plan.clone()));
        Ok(plan)
    }
}

/// A capture trigger that carries a table id the catalog gives another table (see
/// `crate::track::identity::capture_may_use`): made by hand, not by `certyo.track()`.
fn identity_of_another_table(plan: &TablePlan) -> CertyoError {
    CertyoError::new(
        PgSqlErrorCode::ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED,
        format!(
            "certyo_cdc: the capture trigger of {} carries an identity that is not this table's (table_id={})",
            plan.collection, plan.table_id
        ),
    )
    .detail("The identity is that of another table, or one the catalog (certyo.table_identity) does not know: its changes could be taken for another table's, and Certyo's hashes for them written to that table's rows. Nothing was queued.")
    .hint("If the table was restored from a dump without the extension's catalog, track it anew: SELECT certyo.track('schema.table'), as its owner. If the trigger was made by hand, not by certyo.track(), remove it with certyo.untrack() on the table.")
}

/// Relcache invalidation of `relid` (invalid: of everything).
pub fn forget(relid: Oid) {
    let done = PLANS.with(|plans| match plans.try_borrow_mut() {
        Ok(mut plans) if relid == pg_sys::InvalidOid => {
            plans.clear();
            true
        }
        Ok(mut plans) => {
            // Also the plans of partitions that render for this (tracked) table.
            plans.retain(|own, plan| *own != relid && plan.relid != relid);
            true
        }
        Err(_) => false,
    });
    if !done {
        STALE.set(true);
    }
}
