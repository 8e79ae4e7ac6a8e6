//! Every row of a table rendered as capture renders it, as an `upsert`: the current state, not
//! how it came about. Used by `track(..., backfill => true)` (to queue the rows), by the tamper
//! audit (to hash them), by `ATTACH` and `DETACH PARTITION` (to queue their rows), and,
//! unrendered ([`each_tuple`]), by the check of what rows coming into a tracked table claim.
//! A scan through the table's access method under one snapshot, by OID: no name is resolved
//! and no user code runs (a query by name would run whatever the name comes to mean, a view's
//! functions among them, as the reader). Rendering allocates per row, and a memory context
//! reset per row keeps memory flat on any table size.

use super::options::CaptureOptions;
use super::plan::TablePlan;
use super::record::{Change, Operation, Row};
use crate::error::Result;
use pgrx::pg_sys::{self, Oid};
use pgrx::PgMemoryContexts;

/// Which rows the scan sees.
#[derive(Debug, Clone, Copy)]
pub enum Snapshot {
    /// The transaction's snapshot (what a query would see).
    Transaction,
    /// The latest: also rows this transaction wrote after its snapshot was taken, and rows
    /// others committed while this statement waited for its locks.
    Latest,
}

/// Call `each` with the change of every row; stops at the first error. Returns the row count.
/// A partitioned table is read partition by partition (each renders as capture renders it).
pub fn each_row(
    relid: Oid,
    options: &CaptureOptions,
    snapshot: Snapshot,
    mut each: impl FnMut(&TablePlan, &Row, &Change) -> Result<()>,
) -> Result<i64> {
    let mut rows = 0;
    for leaf in leaves(relid)? {
        rows += each_tuple(
            leaf,
            snapshot,
            // SAFETY: the relation `each_tuple` opened, inside the transaction.
            |rel| unsafe { TablePlan::build(rel, options) },
            |plan, row| {
                // SAFETY: `row` is a row of the table `plan` was built for.
                let change = unsafe { plan.change(Operation::Upsert, row) }?;
                each(plan, row, &change).map(|_| true)
            },
        )?;
    }
    Ok(rows)
}

/// The tables that hold the rows of `relid`: itself, or for a partitioned table its leaf
/// partitions that are tables (a foreign partition's rows are not in this database).
pub fn leaves(relid: Oid) -> Result<Vec<Oid>> {
    // SAFETY: a catalog lookup inside the caller's transaction.
    let kind = unsafe { pg_sys::get_rel_relkind(relid) };
    if kind == pg_sys::RELKIND_RELATION as std::ffi::c_char {
        return Ok(vec![relid]);
    }
    if kind != pg_sys::RELKIND_PARTITIONED_TABLE as std::ffi::c_char {
        return Ok(vec![]);
    }
    // The tree as the catalog is now (`pg_partition_tree` reads it so, as PostgreSQL's DDL does),
    // each leaf's kind too: a query's snapshot, a REPEATABLE READ transaction's, would miss a
    // partition attached since it was taken.
    let leaves = pgrx::Spi::get_one_with_args::<Vec<Oid>>(
        "SELECT pg_catalog.array_agg(relid::pg_catalog.oid) FROM pg_catalog.pg_partition_tree($1) WHERE isleaf",
        &[relid.into()],
    )?
    .unwrap_or_default();
    Ok(leaves
        .into_iter()
        // SAFETY: a catalog lookup inside the caller's transaction.
        .filter(|&leaf| unsafe { pg_sys::get_rel_relkind(leaf) } == pg_sys::RELKIND_RELATION as std::ffi::c_char)
        .collect())
}

/// Call `each` with every row of table `relid` (not a partitioned one: see [`leaves`]), given
/// what `prepare` made of the opened relation first; stops when `each` says `false` or fails.
/// Returns the number of rows `each` accepted. The table is opened with `AccessShareLock`
/// (kept to the end of the transaction) and read through its access method, by OID.
pub fn each_tuple<P>(
    relid: Oid,
    snapshot: Snapshot,
    prepare: impl FnOnce(pg_sys::Relation) -> Result<P>,
    mut each: impl FnMut(&P, &Row) -> Result<bool>,
) -> Result<i64> {
    // SAFETY: inside a transaction; the relation is closed by its guard; the scan, its slot and
    // the snapshot are ended below once begun, when `each` returns an error too (it ends the
    // loop, not the function); an ERROR raised inside PostgreSQL leaves them to the
    // (sub)transaction's abort, which releases them with its resource owner. Each row is
    // fetched and deformed, whatever the access method, as a heap tuple of the relation's own
    // descriptor (copied into the per-row context when the slot holds none), in a per-row
    // context reset after it.
    unsafe {
        let opened = crate::relation::OpenRelation::open(relid, pg_sys::AccessShareLock);
        let rel = opened.get();
        let prepared = prepare(rel)?;
        let natts = (*(*rel).rd_att).natts as usize;
        let snapshot = pg_sys::RegisterSnapshot(match snapshot {
            Snapshot::Transaction => pg_sys::GetTransactionSnapshot(),
            Snapshot::Latest => pg_sys::GetLatestSnapshot(),
        });
        let slot = pg_sys::table_slot_create(rel, std::ptr::null_mut());
        let scan = pg_sys::table_beginscan(rel, snapshot, 0, std::ptr::null_mut());
        let mut per_row = PgMemoryContexts::new("certyo_cdc row");
        let mut rows = 0i64;
        let mut outcome = Ok(());
        while pg_sys::table_scan_getnextslot(
            scan,
            pg_sys::ScanDirection::ForwardScanDirection,
            slot,
        ) {
            let more = per_row.switch_to(|_| {
                let mut should_free = false;
                let tuple = pg_sys::ExecFetchSlotHeapTuple(slot, false, &mut should_free);
                let row = Row::deform(tuple, (*rel).rd_att, natts);
                each(&prepared, &row)
            });
            per_row.reset();
            match more {
                Ok(true) => rows += 1,
                Ok(false) => break,
                Err(error) => {
                    outcome = Err(error);
                    break;
                }
            }
        }
        pg_sys::table_endscan(scan);
        pg_sys::ExecDropSingleTupleTableSlot(slot);
        pg_sys::UnregisterSnapshot(snapshot);
        outcome.map(|_| rows)
    }
}
