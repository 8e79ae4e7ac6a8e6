//! The outcome of a statement that can move tables into or out of a tracked partitioned table,
//! checked after it. The checks before a statement (`partitions`) go by the names it gives, but
//! a drop can cascade to a partition no name gives (`DROP EXTENSION`, `DROP ACCESS METHOD`,
//! `DROP TYPE ... CASCADE`), and a name can mean another table by the time the statement,
//! having waited for a lock, resolves it again (another session renamed a partition, or a
//! schema, to it). So the partitions of the tracked tables are read before such a statement
//! and again after it: one that left without its rows' deletes queued, or came without the
//! checks of its rows, refuses the statement, whose transaction then rolls back.
//!
//! What the checks before statements handled is noted per transaction (`note`), so that a
//! statement run inside another one (by an event trigger, a function) counts for the outer
//! one too; a note goes when its subtransaction is rolled back, as what it noted does. The trees are read from `pg_inherits`, without locking any partition: a `DROP` of
//! anything by anyone must not wait for, or hold, locks on the tracked tables.

use super::partitions::{name_of, OWN_CAPTURE_TRIGGER};
use crate::error::{CertyoError, Result};
use pgrx::pg_sys::{self, Oid};
use pgrx::prelude::*;
use pgrx::PgSqlErrorCode;
use std::cell::RefCell;

/// Which way a partition moved, as a check before a statement handled it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Moved {
    /// Detached, a delete of each of its rows queued.
    Out,
    /// Attached, its rows checked (and queued as upserts after the statement).
    In,
}

/// A partition a check handled, in the subtransaction that did it.
struct Note {
    relid: Oid,
    moved: Moved,
    subtransaction: pg_sys::SubTransactionId,
}

thread_local! {
    /// The partitions handled in the transaction that started at the timestamp kept with them.
    static HANDLED: RefCell<(pg_sys::TimestampTz, Vec<Note>)> =
        const { RefCell::new((0, Vec::new())) };
    static WATCHING_SUBTRANSACTIONS: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// A subtransaction rolled back (`ROLLBACK TO SAVEPOINT`, an exception block) takes back what it
/// did: its notes go with it, and its partitions are where they were. One that commits passes
/// its notes to its parent.
///
/// # Safety
/// Called only by PostgreSQL, as the subtransaction callback registered in `note`, in the
/// backend's main thread.
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn on_subtransaction_end(
    event: pg_sys::SubXactEvent::Type,
    subtransaction: pg_sys::SubTransactionId,
    parent: pg_sys::SubTransactionId,
    _arg: *mut std::ffi::c_void,
) {
    use pg_sys::SubXactEvent::*;
    HANDLED.with_borrow_mut(|(_, handled)| match event {
        SUBXACT_EVENT_ABORT_SUB => handled.retain(|n| n.subtransaction != subtransaction),
        SUBXACT_EVENT_COMMIT_SUB => handled
            .iter_mut()
            .filter(|n| n.subtransaction == subtransaction)
            .for_each(|n| n.subtransaction = parent),
        _ => {}
    });
}

/// This transaction's start, which keys the notes: a note of an earlier transaction is void.
fn this_transaction() -> pg_sys::TimestampTz {
    // SAFETY: reads a variable of this backend's transaction state, in a transaction.
    unsafe { pg_sys::GetCurrentTransactionStartTimestamp() }
}

/// A check before a statement handled `relid` (and the partitions under it) moving this way.
pub fn note(relid: Oid, moved: Moved) {
    if !WATCHING_SUBTRANSACTIONS.replace(true) {
        // SAFETY: registers a callback once per backend, in its main thread.
        unsafe {
            pg_sys::RegisterSubXactCallback(Some(on_subtransaction_end), std::ptr::null_mut())
        };
    }
    let now = this_transaction();
    // SAFETY: reads this backend's transaction state, in a transaction.
    let subtransaction = unsafe { pg_sys::GetCurrentSubTransactionId() };
    HANDLED.with_borrow_mut(|(at, handled)| {
        if *at != now {
            *at = now;
            handled.clear();
        }
        handled.push(Note {
            relid,
            moved,
            subtransaction,
        });
    });
}

/// Whether a check handled `relid` moving this way in this transaction (its last move).
fn noted(relid: Oid, moved: Moved) -> bool {
    let now = this_transaction();
    HANDLED.with_borrow(|(at, handled)| {
        *at == now
            && handled
                .iter()
                .rev()
                .find(|n| n.relid == relid)
                .is_some_and(|n| n.moved == moved)
    })
}

/// The partitions of the tracked tables, at every level.
pub struct Trees(Vec<Member>);

struct Member {
    relid: Oid,
    parent: Oid,
    table: Oid,
    name: String,
    parent_name: String,
}

impl Trees {
    pub fn read() -> Result<Trees> {
        let members = Spi::connect(|client| {
            let rows = client.select(
                &format!(
                    "WITH RECURSIVE tree (relid, parent, tracked, level) AS (
                         SELECT i.inhrelid, i.inhparent, t.tgrelid, 1
                           FROM pg_catalog.pg_trigger t
                           JOIN pg_catalog.pg_inherits i ON i.inhparent OPERATOR(pg_catalog.=) t.tgrelid
                          WHERE {OWN_CAPTURE_TRIGGER}
                         UNION ALL
                         SELECT i.inhrelid, i.inhparent, tree.tracked, tree.level + 1
                           FROM tree JOIN pg_catalog.pg_inherits i ON i.inhparent OPERATOR(pg_catalog.=) tree.relid)
                     SELECT relid, parent, tracked, relid::pg_catalog.regclass::pg_catalog.text,
                            parent::pg_catalog.regclass::pg_catalog.text
                       FROM tree ORDER BY tree.level, tree.relid"
                ),
                None,
                &[],
            )?;
            let mut members = Vec::new();
            for row in rows {
                members.push(Member {
                    relid: row.get::<Oid>(1)?.unwrap_or(pg_sys::InvalidOid),
                    parent: row.get::<Oid>(2)?.unwrap_or(pg_sys::InvalidOid),
                    table: row.get::<Oid>(3)?.unwrap_or(pg_sys::InvalidOid),
                    name: row.get::<String>(4)?.unwrap_or_default(),
                    parent_name: row.get::<String>(5)?.unwrap_or_default(),
                });
            }
            Ok::<_, pgrx::spi::SpiError>(members)
        })?;
        Ok(Trees(members))
    }

    fn find(&self, relid: Oid) -> Option<&Member> {
        self.0.iter().find(|m| m.relid == relid)
    }

    /// Whether `relid`, or a partition above it in these trees, was noted as moved this way.
    fn handled(&self, relid: Oid, moved: Moved) -> bool {
        let mut at = Some(relid);
        // Each step goes up one level of a finite tree.
        for _ in 0..=self.0.len() {
            let Some(relid) = at else { return false };
            if noted(relid, moved) {
                return true;
            }
            at = self.find(relid).map(|m| m.parent);
        }
        false
    }

    /// After the statement: every partition that left a table still tracked was detached by a
    /// check that queued its rows' deletes, and (`attaching`) every partition that came was
    /// attached by one that checked its rows. Otherwise the statement is refused.
    pub fn check_after(&self, attaching: bool) -> Result<()> {
        let after = Trees::read()?;
        for gone in self.0.iter().filter(|m| after.find(m.relid).is_none()) {
            if is_tracked(gone.table)? && !self.handled(gone.relid, Moved::Out) {
                return Err(CertyoError::new(
                    PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                    format!("certyo_cdc: this statement takes partition {} out of tracked table {} without capturing its rows' deletes", gone.name, name_of(gone.table)?),
                )
                .detail("The statement reached a partition that no name in it gave when it began: a drop that cascades to it (DROP EXTENSION, DROP ACCESS METHOD, DROP OWNED BY, DROP TYPE ... CASCADE), or a name that meant another table until it was renamed while the statement waited for a lock.")
                .hint(format!("Detach the partition first (ALTER TABLE {} DETACH PARTITION {} queues a delete of each of its rows), then run the statement again.", gone.parent_name, gone.name)));
            }
        }
        if attaching {
            for came in after.0.iter().filter(|m| self.find(m.relid).is_none()) {
                if !after.handled(came.relid, Moved::In) {
                    return Err(CertyoError::new(
                        PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                        format!("certyo_cdc: this statement attaches {} to tracked table {}, which is not the table its checks saw", came.name, name_of(came.table)?),
                    )
                    .detail("The name in the statement meant another table when it began, and came to mean this one (a table or schema renamed by another session) while the statement waited for a lock: its rows would enter unseen by Certyo, with whatever their bookkeeping columns say.")
                    .hint("Run the statement again, once nothing renames the tables it names.".to_string()));
                }
            }
        }
        Ok(())
    }
}

/// Whether `table` has its own capture trigger still (a read, which assigns no transaction id).
fn is_tracked(table: Oid) -> Result<bool> {
    Ok(Spi::connect(|client| {
        client
            .select(
                &format!(
                    "SELECT EXISTS (SELECT FROM pg_catalog.pg_trigger t
                                     WHERE t.tgrelid OPERATOR(pg_catalog.=) $1 AND {OWN_CAPTURE_TRIGGER})"
                ),
                Some(1),
                &[table.into()],
            )?
            .first()
            .get_one::<bool>()
    })?
    .unwrap_or(false))
}
