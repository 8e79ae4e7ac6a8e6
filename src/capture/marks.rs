//! The marks trigger: `certyo.capture()` fired BEFORE UPDATE. In the writer's own statement, a
//! row whose content changes lets go of what the worker wrote back of its earlier version (its
//! hash, `'anchored'`, when it was verified): from that moment the row holds content that Certyo
//! has not seen, and until its new version is accepted (or anchored, by the table's write-back
//! mode) it says nothing rather than an earlier version's claim. Nothing else is touched, and no
//! row version is added: the writer's UPDATE stores the cleared row.
//!
//! It fires as the capture trigger does: in origin mode, unless the capture trigger was set to
//! fire always (or in replica mode only), which `track()` and every `ALTER TABLE` of the table
//! give the marks trigger too. So by default not in a session in replica mode (a bulk load with
//! `session_replication_role = replica`), whose changes are not captured either
//! (`certyo.audit()` names such rows). Firing always by default would make every dump of a
//! tracked table carry an `ALTER TABLE ... ENABLE ALWAYS TRIGGER`, and with it the DDL event
//! trigger, in the middle of a restore. It leaves alone the worker's own write-back, which sets
//! only these columns (and in replica mode does not fire it at all).
//!
//! Whatever keeps it from clearing a changed row (disabled on one partition, a column changed
//! after it), the capture trigger sees the captured row still holding marks, and refuses the
//! statement ([`refuse_kept_marks`]): a row never stores an earlier version's claim.
//!
//! Its name makes it fire after the table's other BEFORE UPDATE triggers (they fire in name
//! order), so that it judges the row as they leave it: one that stamps `updated_at` changes the
//! content too. A trigger named to fire after it is refused in the modes that write back
//! (`crate::track`'s trigger order), and a change out of its sight is refused by the capture
//! trigger (above). Stored generated columns are
//! computed after every BEFORE trigger, so they are left out of the comparison; `track()` makes
//! sure a captured one is computed from captured columns only, whose change it does see.

use super::plan::{self, TablePlan};
use super::record::{Operation, Row};
use super::CAPTURE_TRIGGER;
use crate::error::{CertyoError, Result};
use pgrx::pg_sys;
use pgrx::PgSqlErrorCode;
use std::ffi::{c_int, CStr};

/// Name of the BEFORE UPDATE row trigger that clears the marks of a row whose content changes.
pub const MARKS_TRIGGER: &str = "zz_certyo_marks";

/// The row the writer's UPDATE stores: `data`'s new row, with the bookkeeping columns set to
/// NULL (the status to `'pending'` under `'accepted'`, as for a new row) when a business column
/// changed and any of them holds something other than that.
///
/// # Safety
/// `data` is the trigger data of a BEFORE UPDATE ... FOR EACH ROW firing.
pub unsafe fn clear(data: &pg_sys::TriggerData) -> Result<pg_sys::HeapTuple> {
    // SAFETY: the caller upholds this function's contract (its `# Safety` section), on which
    // every unsafe operation below relies.
    unsafe {
        let rel = data.tg_relation;
        let new = data.tg_newtuple;
        let plan = plan::for_relation(rel, || capture_args(data))?;
        if plan.marks.is_empty() || crate::rights::writing_back_to(plan.relid) {
            return Ok(new);
        }
        if !names_business_columns(data, &plan) && !other_before_update_triggers(rel) {
            // Only bookkeeping or excluded columns set, and no trigger of the table's own to
            // change others before this one: the content is as it was (a captured generated
            // column is computed from captured columns only, see `track()`).
            return Ok(new);
        }
        let tupdesc = (*rel).rd_att;
        let new_row = Row::deform(new, tupdesc, plan.natts);
        if plan.claims_nothing(&new_row) {
            return Ok(new); // nothing said, or only 'pending' under 'accepted'
        }
        let old_row = Row::deform(data.tg_trigtuple, tupdesc, plan.natts);
        if !plan.assigned_business_changed(&old_row, &new_row) {
            return Ok(new);
        }
        Ok(without_marks(new, tupdesc, &plan))
    }
}

/// Does the UPDATE set a (stored, not generated) business column? `tg_updatedcols` holds the
/// columns it sets, in the fired-on relation's attribute numbers; unknown (NULL): as if it did.
///
/// # Safety
/// `data` is the trigger data of an UPDATE firing on the relation of `plan`.
unsafe fn names_business_columns(data: &pg_sys::TriggerData, plan: &TablePlan) -> bool {
    let set = data.tg_updatedcols;
    if set.is_null() {
        return true;
    }
    plan.payload.iter().filter(|c| !c.generated).any(|c| {
        let member = c.index as c_int + 1 - pg_sys::FirstLowInvalidHeapAttributeNumber;
        // SAFETY: `set` is the trigger manager's bitmap of the statement's updated columns.
        unsafe { pg_sys::bms_is_member(member, set) }
    })
}

/// Has the relation a BEFORE UPDATE row trigger other than the marks trigger (enabled or not:
/// which fire depends on the session)? One may change business columns the statement does not
/// set.
///
/// # Safety
/// `rel` is an open relation.
unsafe fn other_before_update_triggers(rel: pg_sys::Relation) -> bool {
    // SAFETY: `trigdesc`, when set, holds `numtriggers` triggers with their names.
    unsafe {
        let desc = (*rel).trigdesc;
        if desc.is_null() || (*desc).numtriggers <= 0 {
            return false;
        }
        let before_update_row = (pg_sys::TRIGGER_TYPE_ROW
            | pg_sys::TRIGGER_TYPE_BEFORE
            | pg_sys::TRIGGER_TYPE_UPDATE) as i16;
        std::slice::from_raw_parts((*desc).triggers, (*desc).numtriggers as usize)
            .iter()
            .any(|t| {
                t.tgtype & before_update_row == before_update_row
                    && CStr::from_ptr(t.tgname).to_bytes() != MARKS_TRIGGER.as_bytes()
            })
    }
}

/// # Safety
/// `tuple` is a row of the relation whose descriptor is `tupdesc` and whose plan is `plan`.
unsafe fn without_marks(
    tuple: pg_sys::HeapTuple,
    tupdesc: pg_sys::TupleDesc,
    plan: &TablePlan,
) -> pg_sys::HeapTuple {
    let mut columns: Vec<c_int> = plan.marks.iter().map(|&i| i as c_int + 1).collect();
    let mut values = vec![pg_sys::Datum::from(0); columns.len()];
    let mut nulls = vec![true; columns.len()];
    // SAFETY: `columns` are attribute numbers of `tupdesc` (the plan was built from it), each
    // with a value and a null flag, the status a text column (`pending_status`); the new tuple
    // and the text are allocated in the trigger's memory context, as the trigger manager
    // expects of a BEFORE trigger's result.
    unsafe {
        if let Some(status) = plan.pending_status {
            if let Some(n) = plan.marks.iter().position(|&i| i == status) {
                values[n] = pg_sys::Datum::from(pg_sys::cstring_to_text(c"pending".as_ptr()));
                nulls[n] = false;
            }
        }
        pg_sys::heap_modify_tuple_by_cols(
            tuple,
            tupdesc,
            columns.len() as c_int,
            columns.as_mut_ptr(),
            values.as_mut_ptr(),
            nulls.as_mut_ptr(),
        )
    }
}

/// The arguments of the table's capture trigger, from which its plan is built (the marks
/// trigger carries none of its own): a table without one is not tracked.
///
/// # Safety
/// `data` is the trigger data of a firing on an open relation.
unsafe fn capture_args<'a>(data: &pg_sys::TriggerData) -> Result<Vec<&'a str>> {
    // SAFETY: the caller upholds this function's contract (its `# Safety` section), on which
    // every unsafe operation below relies; `trigdesc`, when set, holds `numtriggers` triggers.
    unsafe {
        let rel = data.tg_relation;
        let desc = (*rel).trigdesc;
        let triggers: &[pg_sys::Trigger] = if desc.is_null() || (*desc).numtriggers <= 0 {
            &[]
        } else {
            std::slice::from_raw_parts((*desc).triggers, (*desc).numtriggers as usize)
        };
        let function = (*data.tg_trigger).tgfoid;
        let capture = triggers.iter().find(|t| {
            t.tgfoid == function
                && CStr::from_ptr(t.tgname).to_bytes() == CAPTURE_TRIGGER.as_bytes()
        });
        let Some(capture) = capture else {
            let table = plan::qualified_name(rel);
            return Err(CertyoError::new(
                PgSqlErrorCode::ERRCODE_E_R_I_E_TRIGGER_PROTOCOL_VIOLATED,
                format!("certyo_cdc: {table} is not a tracked table, so its trigger {MARKS_TRIGGER} has nothing to keep true"),
            )
            .detail("The marks trigger works with the capture trigger certyo.track() installs, named certyo_capture.")
            .hint(format!("Drop the hand-made trigger {MARKS_TRIGGER} on {table}; track permanent tables with certyo.track().")));
        };
        super::refuse_untracked(rel, capture)?;
        Ok(super::trigger_args(capture))
    }
}

/// What a captured row's bookkeeping columns may hold: nothing (or the status `'pending'` alone,
/// under `'accepted'`, which a new row starts with) unless the row is the version they speak of.
///
/// After an UPDATE the marks trigger has had its turn: a captured UPDATE whose new row still
/// holds something would store an earlier version's hash, or `'anchored'`, beside content
/// Certyo has not seen. The marks trigger clears them in every such UPDATE, so one that did not
/// fire (disabled on the partition the row is in, or firing in another replication mode) or a
/// column changed after it leaves them. A new row (an INSERT, or an UPDATE that moves the row
/// to another partition, which PostgreSQL runs as a DELETE and an INSERT) that brings them
/// claims another version's. Either statement is refused rather than store the claim. (A
/// session in replica mode, where capture fires only when set to fire always, applies rows as
/// another database wrote them: its INSERTs are left alone.)
///
/// # Safety
/// `row` is a row of the table `plan` was built for.
pub unsafe fn refuse_kept_marks(
    plan: &TablePlan,
    row: &Row,
    operation: Operation,
    partition: impl FnOnce() -> String,
) -> Result<()> {
    // SAFETY: `row` is a row of the plan's table (this function's contract).
    if unsafe { plan.claims_nothing(row) } {
        return Ok(());
    }
    let table = &plan.collection;
    let partition = partition();
    let at = if partition == table.as_str() {
        String::new()
    } else {
        format!(" (partition {partition})")
    };
    if operation == Operation::Insert {
        if crate::capture::replica_session() {
            return Ok(());
        }
        return Err(CertyoError::new(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("certyo_cdc: a new row of {table}{at} brings values in certyo_record_hash, certyo_anchor_status or certyo_verified_at"),
        )
        .detail("What Certyo said of another row or version (copied by an INSERT ... SELECT, an ORM's duplicate, a COPY, or kept by an UPDATE that moved the row to another partition while zz_certyo_marks was off there) would stand beside content Certyo has not seen.")
        .hint(format!("Leave the bookkeeping columns out of the INSERT (or set them to NULL): certyo_cdc writes them once Certyo has the new version. If rows moved between partitions, enable {MARKS_TRIGGER} where it is off: ALTER TABLE {table} ENABLE TRIGGER {MARKS_TRIGGER}; A data-only restore (pg_restore --data-only) brings back rows that are no new changes, with certyo_cdc's own tables: restore it with --disable-triggers.")));
    }
    Err(CertyoError::new(
        PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
        format!("certyo_cdc: this UPDATE changes a row of {table}{at} that keeps what Certyo said of its earlier version"),
    )
    .detail(format!("Trigger {MARKS_TRIGGER} clears a changed row's certyo_record_hash, certyo_anchor_status and certyo_verified_at; it did not here, so the row would claim an earlier version's hash or anchoring for its new content. It does not fire while it is disabled where the row is (ALTER TABLE ... DISABLE TRIGGER USER or ALL on a partition), and a column can change after it (a generated column computed by a function declared IMMUTABLE that is not)."))
    .hint(format!("Enable it where it is off: ALTER TABLE {table} ENABLE TRIGGER {MARKS_TRIGGER}; (it reaches every partition).")))
}
