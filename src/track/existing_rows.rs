//! `track(..., backfill => true)`: queue every existing row as an `upsert`, in the same call.
//!
//! It runs in `track()`'s transaction, after the capture trigger was created: `CREATE TRIGGER`
//! holds a lock that blocks writers until that transaction ends, so no row is both backfilled
//! and captured, and none is missed. Large tables get `certyo.backfill()`, chunked and
//! performed by the worker (`crate::backfill`, `src/backfill/`); this one suits small tables.

use crate::capture::options::CaptureOptions;
use crate::capture::queue;
use crate::capture::scan::{each_row, Snapshot};
use crate::error::Result;
use pgrx::pg_sys::Oid;

/// Queue the table's current rows; returns how many were queued.
pub fn queue(relid: Oid, options: &CaptureOptions) -> Result<i64> {
    // The latest snapshot sees the rows this transaction wrote before calling track().
    // SAFETY: called inside track()'s transaction, which may write.
    each_row(relid, options, Snapshot::Latest, |plan, _, change| unsafe {
        queue::append(relid, plan.table_id, &plan.collection, change).map(|_| ())
    })
}
