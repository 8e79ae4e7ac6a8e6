//! Capture: the write path. `certyo.capture()` runs as an AFTER ROW trigger inside every write
//! to a tracked table and appends the change to `certyo.queue` in the writer's transaction.
//!
//! - `options`: what `track()` decided, stored as the trigger's arguments;
//! - `plan`: per-table layout (payload, record id, timestamp), cached per backend;
//! - `value`: how a column value renders as JSON;
//! - `record`: a row image turned into a queued change;
//! - `queue`: the append itself;
//! - `ids`: queue ids, drawn in blocks and handed out from shared memory;
//! - `never_raise`: server functions called without pgrx's guard, on every row.
//!
//! The same function, fired BEFORE TRUNCATE, refuses the truncate: it would remove rows
//! without a trace in the queue.

pub mod ids;
mod never_raise;
pub mod options;
pub mod plan;
pub mod queue;
pub mod record;
pub mod scan;
pub mod value;

use crate::error::{CertyoError, OrRaise, Result};
use pgrx::pg_sys;
use pgrx::PgSqlErrorCode;
use record::{Operation, Row};
use std::ffi::CStr;

/// Name of the row trigger that captures changes.
pub const CAPTURE_TRIGGER: &str = "certyo_capture";
/// Name of the statement trigger that refuses TRUNCATE.
pub const TRUNCATE_TRIGGER: &str = "certyo_truncate_guard";

#[unsafe(no_mangle)]
#[doc(hidden)]
pub extern "C" fn pg_finfo_certyo_capture() -> &'static pg_sys::Pg_finfo_record {
    const V1: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
    &V1
}

/// `certyo.capture()`: the trigger function.
///
/// # Safety
/// Called by Postgres' trigger manager with a valid `fcinfo`.
#[pgrx::pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn certyo_capture(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    fire(fcinfo).or_raise();
    // AFTER triggers' results are ignored; BEFORE TRUNCATE never gets here.
    pg_sys::Datum::from(0)
}

unsafe fn fire(fcinfo: pg_sys::FunctionCallInfo) -> Result<()> {
    if !pgrx::trigger_support::called_as_trigger(fcinfo) {
        return Err(CertyoError::new(
            PgSqlErrorCode::ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED,
            "certyo_cdc: certyo.capture() can only be called as a trigger",
        )
        .hint("Use certyo.track('schema.table') to install it on a table."));
    }
    let data = &*((*fcinfo).context as *const pg_sys::TriggerData);
    let event = data.tg_event;
    let operation = event & pg_sys::TRIGGER_EVENT_OPMASK;
    if operation == pg_sys::TRIGGER_EVENT_TRUNCATE {
        return Err(truncate_refused(&plan::qualified_name(data.tg_relation)));
    }
    if event & pg_sys::TRIGGER_EVENT_ROW == 0
        || event & pg_sys::TRIGGER_EVENT_TIMINGMASK != pg_sys::TRIGGER_EVENT_AFTER
    {
        let table = plan::qualified_name(data.tg_relation);
        return Err(CertyoError::new(
            PgSqlErrorCode::ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED,
            format!("certyo_cdc: certyo.capture() on {table} must fire AFTER ... FOR EACH ROW"),
        )
        .hint(format!(
            "Drop the hand-made trigger and call certyo.track('{table}')."
        )));
    }
    let rel = data.tg_relation;
    let plan = plan::for_relation(rel, || trigger_args(data.tg_trigger))?;
    let tupdesc = (*rel).rd_att;
    let relid = plan.relid; // for a partition, the tracked partitioned table
    let enqueue = |operation: Operation, row: &Row| -> Result<()> {
        let change = plan.change(operation, row)?;
        queue::append(relid, &plan.collection, &change).map(|_| ())
    };
    match operation {
        pg_sys::TRIGGER_EVENT_INSERT => enqueue(
            Operation::Insert,
            &Row::deform(data.tg_trigtuple, tupdesc, plan.natts),
        ),
        pg_sys::TRIGGER_EVENT_DELETE => enqueue(
            Operation::Delete,
            &Row::deform(data.tg_trigtuple, tupdesc, plan.natts),
        ),
        _ => {
            let old = Row::deform(data.tg_trigtuple, tupdesc, plan.natts);
            let new = Row::deform(data.tg_newtuple, tupdesc, plan.natts);
            if plan.record_id_changed(&old, &new) {
                // Certyo keys records by id: a new id is a new record, and the old one is gone.
                enqueue(Operation::Delete, &old)?;
                enqueue(Operation::Insert, &new)
            } else if plan.business_changed(&old, &new) {
                enqueue(Operation::Update, &new)
            } else {
                Ok(()) // bookkeeping write-back or no-op update: not a change
            }
        }
    }
}

thread_local! {
    static WATCHING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Register, once per backend, the relcache callback that drops the write path's caches
/// (table plans, the queue's location) when a relation they describe changes.
fn watch_invalidations() {
    if !WATCHING.replace(true) {
        // SAFETY: registers a callback once per backend, in its main thread.
        unsafe {
            pg_sys::CacheRegisterRelcacheCallback(
                Some(on_relcache_invalidation),
                pg_sys::Datum::from(0),
            )
        };
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn on_relcache_invalidation(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    plan::forget(relid);
    queue::forget(relid);
}

unsafe fn trigger_args<'a>(trigger: *const pg_sys::Trigger) -> Vec<&'a str> {
    let trigger = &*trigger;
    (0..trigger.tgnargs as usize)
        .filter_map(|i| CStr::from_ptr(*trigger.tgargs.add(i)).to_str().ok())
        .collect()
}

fn truncate_refused(table: &str) -> CertyoError {
    CertyoError::new(
        PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
        format!("certyo_cdc: TRUNCATE of tracked table {table} is refused"),
    )
    .detail("TRUNCATE removes rows without recording their deletion, so Certyo would never hear of it.")
    .hint(format!(
        "Use DELETE to record every deletion. To empty the table deliberately without recording it, do it in one \
         transaction: SELECT certyo.untrack('{table}'); TRUNCATE {table}; then certyo.track('{table}', ...) with \
         the options shown in certyo.tracked_tables."
    ))
}
