//! Every row of a table rendered as capture renders it, as an `upsert`: the current state, not
//! how it came about. Used by `track(..., backfill => true)` (to queue the rows) and by the
//! tamper audit (to hash them). A heap scan under one snapshot; rendering allocates per row, and
//! a memory context reset per row keeps memory flat on any table size.

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
    /// The latest: also rows this transaction wrote after its snapshot was taken.
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
    // SAFETY: a catalog lookup inside the caller's transaction.
    let partitioned =
        unsafe { pg_sys::get_rel_relkind(relid) } == pg_sys::RELKIND_PARTITIONED_TABLE as i8;
    if !partitioned {
        return scan(relid, options, snapshot, &mut each);
    }
    let leaves = pgrx::Spi::get_one_with_args::<Vec<Oid>>(
        "SELECT pg_catalog.array_agg(t.relid::oid) FROM pg_catalog.pg_partition_tree($1) t
           JOIN pg_catalog.pg_class c ON c.oid = t.relid WHERE t.isleaf AND c.relkind = 'r'",
        &[relid.into()],
    )?
    .unwrap_or_default();
    let mut rows = 0;
    for leaf in leaves {
        rows += scan(leaf, options, snapshot, &mut each)?;
    }
    Ok(rows)
}

fn scan(
    relid: Oid,
    options: &CaptureOptions,
    snapshot: Snapshot,
    each: &mut impl FnMut(&TablePlan, &Row, &Change) -> Result<()>,
) -> Result<i64> {
    // SAFETY: inside a transaction; the relation is closed by its guard; the scan and the
    // snapshot are ended below on every path once begun (an error from `each` ends the loop,
    // not the function); each tuple is deformed in a per-row context reset after it.
    unsafe {
        let opened = crate::relation::OpenRelation::open(relid, pg_sys::AccessShareLock);
        let rel = opened.get();
        let plan = TablePlan::build(rel, options)?;
        let snapshot = pg_sys::RegisterSnapshot(match snapshot {
            Snapshot::Transaction => pg_sys::GetTransactionSnapshot(),
            Snapshot::Latest => pg_sys::GetLatestSnapshot(),
        });
        let flags = pg_sys::ScanOptions::SO_TYPE_SEQSCAN | pg_sys::ScanOptions::SO_ALLOW_PAGEMODE;
        let scan = pg_sys::heap_beginscan(
            rel,
            snapshot,
            0,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            flags,
        );
        let mut per_row = PgMemoryContexts::new("certyo_cdc row");
        let mut rows = 0i64;
        let mut outcome = Ok(());
        loop {
            let tuple = pg_sys::heap_getnext(scan, pg_sys::ScanDirection::ForwardScanDirection);
            if tuple.is_null() {
                break;
            }
            outcome = per_row.switch_to(|_| {
                let row = Row::deform(tuple, (*rel).rd_att, plan.natts);
                plan.change(Operation::Upsert, &row)
                    .and_then(|change| each(&plan, &row, &change))
            });
            per_row.reset();
            if outcome.is_err() {
                break;
            }
            rows += 1;
        }
        pg_sys::heap_endscan(scan);
        pg_sys::UnregisterSnapshot(snapshot);
        outcome.map(|_| rows)
    }
}
