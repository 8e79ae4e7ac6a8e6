//! Capture: the write path. `certyo.capture()` runs as an AFTER ROW trigger inside every write
//! to a tracked table and appends the change to `certyo.queue` in the writer's transaction.
//!
//! - `options`: what `track()` decided, stored as the trigger's arguments;
//! - `plan`: per-table layout (payload, record id, timestamp), cached per backend;
//! - `value`: how a column value renders as JSON;
//! - `record`: a row image turned into a queued change;
//! - `queue`: the append itself;
//! - `ids`: queue ids, drawn in blocks and handed out from shared memory;
//! - `marks`: the same function fired BEFORE UPDATE: a row whose content changes lets go of
//!   what was written back of its earlier version, in the writer's statement;
//! - `never_raise`: server functions called without pgrx's guard, on every row.
//!
//! The same function, fired BEFORE TRUNCATE, refuses the truncate: it would remove rows
//! without a trace in the queue.

pub mod ids;
pub mod marks;
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
    // SAFETY: the caller upholds this function's contract (its `# Safety` section), on which
    // every unsafe operation below relies.
    unsafe {
        match fire(fcinfo).or_raise() {
            // BEFORE UPDATE (the marks trigger): the row to store.
            Some(row) => pg_sys::Datum::from(row),
            // AFTER triggers' results are ignored; BEFORE TRUNCATE never gets here.
            None => pg_sys::Datum::from(0),
        }
    }
}

/// What the trigger returns: for the marks trigger (BEFORE UPDATE), the row to store.
///
/// # Safety
/// `fcinfo` is the valid call information that Postgres' function manager passed
/// [`certyo_capture`].
unsafe fn fire(fcinfo: pg_sys::FunctionCallInfo) -> Result<Option<pg_sys::HeapTuple>> {
    // SAFETY: the caller upholds this function's contract (its `# Safety` section), on which
    // every unsafe operation below relies.
    unsafe {
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
        if operation == pg_sys::TRIGGER_EVENT_UPDATE
            && event & pg_sys::TRIGGER_EVENT_ROW != 0
            && event & pg_sys::TRIGGER_EVENT_TIMINGMASK == pg_sys::TRIGGER_EVENT_BEFORE
            && CStr::from_ptr((*data.tg_trigger).tgname).to_bytes()
                == marks::MARKS_TRIGGER.as_bytes()
        {
            return marks::clear(data).map(Some);
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
        let plan = plan::for_relation(rel, || {
            refuse_untracked(rel, data.tg_trigger)?;
            Ok(trigger_args(data.tg_trigger))
        })?;
        let tupdesc = (*rel).rd_att;
        let relid = plan.relid; // for a partition, the tracked partitioned table
        let enqueue = |operation: Operation, row: &Row| -> Result<()> {
            let change = plan.change(operation, row)?;
            if change.record_id.is_empty() && operation == Operation::Delete {
                // Of a record every version of which was refused (`queue::append`), so one Certyo
                // never held: there is nothing to tell it. (A row keyed '' from before the table
                // was tracked can so be deleted, or re-keyed: only the new key's insert is queued.)
                return Ok(());
            }
            queue::append(relid, plan.table_id, &plan.collection, &change).map(|_| ())
        };
        let captured = match operation {
            pg_sys::TRIGGER_EVENT_INSERT => {
                let row = Row::deform(data.tg_trigtuple, tupdesc, plan.natts);
                marks::refuse_kept_marks(&plan, &row, Operation::Insert, || {
                    plan::qualified_name(rel)
                })?;
                enqueue(Operation::Insert, &row)
            }
            pg_sys::TRIGGER_EVENT_DELETE => enqueue(
                Operation::Delete,
                &Row::deform(data.tg_trigtuple, tupdesc, plan.natts),
            ),
            _ => {
                let old = Row::deform(data.tg_trigtuple, tupdesc, plan.natts);
                let new = Row::deform(data.tg_newtuple, tupdesc, plan.natts);
                if crate::rights::writing_back_to(relid)
                    && (plan.record_id_changed(&old, &new) || plan.business_changed(&old, &new))
                {
                    return Err(changed_by_write_back(&plan.collection));
                }
                if plan.record_id_changed(&old, &new) {
                    marks::refuse_kept_marks(&plan, &new, Operation::Update, || {
                        plan::qualified_name(rel)
                    })?;
                    // Certyo keys records by id: a new id is a new record, and the old one is gone.
                    enqueue(Operation::Delete, &old)?;
                    enqueue(Operation::Insert, &new)
                } else if plan.business_changed(&old, &new) {
                    marks::refuse_kept_marks(&plan, &new, Operation::Update, || {
                        plan::qualified_name(rel)
                    })?;
                    enqueue(Operation::Update, &new)
                } else {
                    Ok(()) // bookkeeping write-back or no-op update: not a change
                }
            }
        };
        captured.map(|()| None)
    }
}

/// Whether this session is in `session_replication_role = replica`, where capture's triggers
/// do not fire.
pub(crate) fn replica_session() -> bool {
    // SAFETY: reads a GUC variable of this backend.
    unsafe { pg_sys::SessionReplicationRole == pg_sys::SESSION_REPLICATION_ROLE_REPLICA as i32 }
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

/// # Safety
/// Called only by PostgreSQL, as the relcache invalidation callback that
/// `watch_invalidations` registers, in the backend's main thread.
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn on_relcache_invalidation(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    plan::forget(relid);
    queue::forget(relid);
}

/// Capture queues changes of tracked tables only: a table whose capture trigger is the one
/// `certyo.track()` installs (its name, `certyo_capture`), never a temporary table. A
/// hand-made trigger on a temporary table would have the worker send records that no one can
/// read back, write back to or audit (and that another session cannot even see).
///
/// # Safety
/// `rel` is the open relation the trigger fired on, `trigger` its trigger.
unsafe fn refuse_untracked(rel: pg_sys::Relation, trigger: *const pg_sys::Trigger) -> Result<()> {
    // SAFETY: the caller upholds this function's contract (its `# Safety` section), on which
    // every unsafe operation below relies.
    unsafe {
        let temporary =
            (*(*rel).rd_rel).relpersistence == pg_sys::RELPERSISTENCE_TEMP as std::ffi::c_char;
        let name = CStr::from_ptr((*trigger).tgname);
        if !temporary && name.to_bytes() == CAPTURE_TRIGGER.as_bytes() {
            return Ok(());
        }
        let table = plan::qualified_name(rel);
        Err(CertyoError::new(
            PgSqlErrorCode::ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED,
            format!("certyo_cdc: {table} is not a tracked table, so certyo.capture() queues nothing for it"),
        )
        .detail(if temporary {
            "Temporary tables cannot be tracked: the delivery worker cannot read another session's temporary tables."
        } else {
            "certyo.capture() runs only as the trigger certyo.track() installs, named certyo_capture."
        })
        .hint(format!("Drop the hand-made trigger {} on {table}; track permanent tables with certyo.track().", name.to_string_lossy())))
    }
}

/// # Safety
/// `trigger` must point to a valid `Trigger`, whose `tgargs` holds `tgnargs` NUL-terminated
/// strings that live at least as long as `'a`.
unsafe fn trigger_args<'a>(trigger: *const pg_sys::Trigger) -> Vec<&'a str> {
    // SAFETY: the caller upholds this function's contract (its `# Safety` section), on which
    // every unsafe operation below relies.
    unsafe {
        let trigger = &*trigger;
        (0..trigger.tgnargs as usize)
            .filter_map(|i| CStr::from_ptr(*trigger.tgargs.add(i)).to_str().ok())
            .collect()
    }
}

/// The worker's write-back (which sets bookkeeping columns only) changed business columns:
/// only a trigger of the table can have done that. Refused, so that no row is marked with the
/// hash of content it no longer holds; the write-back is retried with back-off and its
/// failure shown in `certyo.status`.
fn changed_by_write_back(table: &str) -> CertyoError {
    CertyoError::new(
        PgSqlErrorCode::ERRCODE_TRIGGERED_ACTION_EXCEPTION,
        format!("certyo_cdc: a trigger of {table} changed business columns while the worker wrote back Certyo's answer"),
    )
    .detail("The write-back sets only certyo_record_hash, certyo_anchor_status and certyo_verified_at. It runs the table's triggers as its owner because the table has triggers or rules that fire in replica mode, or constraints, indexes or defaults that call functions not shipped with PostgreSQL; a BEFORE UPDATE trigger changed the row's content, so the row would hold content other than the version being marked.")
    .hint(format!("Make the trigger leave rows alone when only certyo_* columns change, or exclude the columns it sets from capture: certyo.track('{table}', exclude_columns => ARRAY[...])."))
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
