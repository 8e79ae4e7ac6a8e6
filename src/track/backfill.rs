//! `track(..., backfill => true)`: queue every existing row as an `upsert`, in the same call.
//!
//! It runs in `track()`'s transaction, after the capture trigger was created: `CREATE TRIGGER`
//! holds a lock that blocks writers until that transaction ends, so no row is both backfilled
//! and captured, and none is missed. Large tables get a chunked, resumable backfill in the
//! operator surface; this one suits small tables.

use crate::capture::options::CaptureOptions;
use crate::capture::plan::TablePlan;
use crate::capture::queue;
use crate::capture::record::{Operation, Row};
use crate::error::Result;
use pgrx::pg_sys::{self, Oid};
use pgrx::PgMemoryContexts;

/// Queue the table's current rows; returns how many were queued.
pub fn backfill(relid: Oid, options: &CaptureOptions) -> Result<i64> {
    unsafe {
        let rel = pg_sys::table_open(relid, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let plan = TablePlan::build(rel, options)?;
        // The latest snapshot sees the rows this transaction wrote before calling track().
        let snapshot = pg_sys::RegisterSnapshot(pg_sys::GetLatestSnapshot());
        let flags = pg_sys::ScanOptions::SO_TYPE_SEQSCAN | pg_sys::ScanOptions::SO_ALLOW_PAGEMODE;
        let scan = pg_sys::heap_beginscan(
            rel,
            snapshot,
            0,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            flags,
        );
        // Rendering allocates per row; a context reset per row keeps memory flat on any size.
        let mut per_row = PgMemoryContexts::new("certyo_cdc backfill row");
        let mut queued = 0i64;
        let mut outcome: Result<i64> = Ok(0);
        loop {
            let tuple = pg_sys::heap_getnext(scan, pg_sys::ScanDirection::ForwardScanDirection);
            if tuple.is_null() {
                break;
            }
            outcome = per_row.switch_to(|_| {
                let row = Row::deform(tuple, (*rel).rd_att, plan.natts);
                let change = plan.change(Operation::Upsert, &row)?;
                queue::append(relid, &plan.collection, &change)
            });
            per_row.reset();
            if outcome.is_err() {
                break;
            }
            queued += 1;
        }
        pg_sys::heap_endscan(scan);
        pg_sys::UnregisterSnapshot(snapshot);
        pg_sys::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
        outcome.map(|_| queued)
    }
}
