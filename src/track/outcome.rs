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
//! one too; a note goes when its subtransaction is rolled back, as what it noted does. Only
//! partitions this session holds in `ACCESS EXCLUSIVE` mode (as dropping, detaching or attaching
//! them takes) are its statement's doing: another session's DDL, committed while the statement
//! ran, is not held against it. The trees are read from `pg_inherits`, without locking any partition: a `DROP` of
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

/// A partition a check handled, for the tracked table it left or joined, in the subtransaction
/// that did it.
struct Note {
    relid: Oid,
    table: Oid,
    moved: Moved,
    subtransaction: pg_sys::SubTransactionId,
}

thread_local! {
    /// The partitions the checks handled in this transaction, in order.
    static HANDLED: RefCell<Vec<Note>> = const { RefCell::new(Vec::new()) };
    static CALLBACKS_REGISTERED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// A transaction's end (commit, abort, or `PREPARE TRANSACTION`, after which the session goes on
/// in a new one) ends its notes.
///
/// # Safety
/// Called only by PostgreSQL, as the transaction callback registered in `note`, in the
/// backend's main thread.
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn on_transaction_end(
    event: pg_sys::XactEvent::Type,
    _arg: *mut std::ffi::c_void,
) {
    use pg_sys::XactEvent::*;
    if matches!(
        event,
        XACT_EVENT_COMMIT
            | XACT_EVENT_PARALLEL_COMMIT
            | XACT_EVENT_ABORT
            | XACT_EVENT_PARALLEL_ABORT
            | XACT_EVENT_PREPARE
    ) {
        HANDLED.with_borrow_mut(Vec::clear);
    }
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
    HANDLED.with_borrow_mut(|handled| match event {
        SUBXACT_EVENT_ABORT_SUB => handled.retain(|n| n.subtransaction != subtransaction),
        SUBXACT_EVENT_COMMIT_SUB => handled
            .iter_mut()
            .filter(|n| n.subtransaction == subtransaction)
            .for_each(|n| n.subtransaction = parent),
        _ => {}
    });
}

/// A check before a statement handled `relid` (and the partitions under it) moving this way, out
/// of or into tracked table `table`.
pub fn note(relid: Oid, table: Oid, moved: Moved) {
    if !CALLBACKS_REGISTERED.get() {
        // SAFETY: registers the callbacks once per backend, in its main thread.
        unsafe {
            pg_sys::RegisterXactCallback(Some(on_transaction_end), std::ptr::null_mut());
            pg_sys::RegisterSubXactCallback(Some(on_subtransaction_end), std::ptr::null_mut());
        }
        CALLBACKS_REGISTERED.set(true);
    }
    // SAFETY: reads this backend's transaction state, in a transaction.
    let subtransaction = unsafe { pg_sys::GetCurrentSubTransactionId() };
    HANDLED.with_borrow_mut(|handled| {
        handled.push(Note {
            relid,
            table,
            moved,
            subtransaction,
        })
    });
}

/// The last note of any of `relids`: which way it says, and for which tracked table.
fn last_note(relids: &[Oid]) -> Option<(Moved, Oid)> {
    HANDLED.with_borrow(|handled| {
        handled
            .iter()
            .rev()
            .find(|n| relids.contains(&n.relid))
            .map(|n| (n.moved, n.table))
    })
}

/// Whether this backend holds `relid` in `ACCESS EXCLUSIVE` mode: what dropping, detaching or
/// attaching it takes, and what another session's doing so leaves this one without.
fn locked_here(relid: Oid) -> Result<bool> {
    Ok(Spi::connect(|client| {
        client
            .select(
                "SELECT EXISTS (SELECT FROM pg_catalog.pg_locks l
                                 WHERE l.pid OPERATOR(pg_catalog.=) pg_catalog.pg_backend_pid()
                                   AND l.locktype OPERATOR(pg_catalog.=) 'relation'
                                   AND l.database OPERATOR(pg_catalog.=) (SELECT d.oid FROM pg_catalog.pg_database d
                                                                          WHERE d.datname OPERATOR(pg_catalog.=) pg_catalog.current_database())
                                   AND l.relation OPERATOR(pg_catalog.=) $1
                                   AND l.mode OPERATOR(pg_catalog.=) 'AccessExclusiveLock' AND l.granted)",
                Some(1),
                &[relid.into()],
            )?
            .first()
            .get_one::<bool>()
    })?
    .unwrap_or(false))
}

/// The partitions of the tracked tables, at every level.
pub struct Trees {
    members: Vec<Member>,
    /// The tracked tables (with partitions or not).
    tracked: Vec<Oid>,
}

struct Member {
    relid: Oid,
    parent: Oid,
    table: Oid,
    name: String,
    parent_name: String,
}

impl Trees {
    /// Read with the latest snapshot, as PostgreSQL's own DDL reads the catalogs: a
    /// transaction's snapshot (`REPEATABLE READ`) would not show a table tracked, or a
    /// partition created, since it was taken.
    pub fn read() -> Result<Trees> {
        let rows = super::latest::rows(&format!(
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
        ))?;
        let oid = |text: &Option<String>| {
            text.as_deref()
                .and_then(|t| t.parse::<u32>().ok())
                .map_or(pg_sys::InvalidOid, Oid::from)
        };
        let members = rows
            .iter()
            .map(|row| Member {
                relid: oid(&row[0]),
                parent: oid(&row[1]),
                table: oid(&row[2]),
                name: row[3].clone().unwrap_or_default(),
                parent_name: row[4].clone().unwrap_or_default(),
            })
            .collect();
        let tracked = super::latest::rows(&format!(
            "SELECT t.tgrelid FROM pg_catalog.pg_trigger t WHERE {OWN_CAPTURE_TRIGGER}"
        ))?
        .iter()
        .map(|row| oid(&row[0]))
        .collect();
        Ok(Trees { members, tracked })
    }

    fn find(&self, relid: Oid) -> Option<&Member> {
        self.members.iter().find(|m| m.relid == relid)
    }

    /// `relid` and the partitions above it in these trees, itself first.
    fn with_ancestors(&self, relid: Oid) -> Vec<Oid> {
        let mut chain = vec![relid];
        // Each step goes up one level of a finite tree.
        while chain.len() <= self.members.len() {
            match self.find(chain[chain.len() - 1]) {
                Some(m) => chain.push(m.parent),
                None => break,
            }
        }
        chain
    }

    /// Whether the last move a check handled of `relid` or of a partition above it (the one that
    /// took it where it is) was this way, out of or into tracked table `table`: a partition
    /// detached, then brought back under a new table that was attached, has come back in; one
    /// detached from one tracked table was not handled leaving another it joined since.
    fn handled(&self, relid: Oid, table: Oid, moved: Moved) -> bool {
        last_note(&self.with_ancestors(relid)) == Some((moved, table))
    }

    /// After the statement: every partition that left a table still tracked was detached by a
    /// check that queued its rows' deletes, and (`attaching`) every partition that came was
    /// attached by one that checked its rows. Otherwise the statement is refused.
    pub fn check_after(&self, attaching: bool) -> Result<()> {
        let after = Trees::read()?;
        // A table tracked by another session while this statement waited for a lock that
        // track() held: the checks before the statement saw it untracked, and its partitions
        // are in neither tree read before. Whatever the statement then did to the table's tree
        // (a partition dropped or detached, one attached), it holds the lock that takes: on the
        // table, or on a partition of it still there (a dropped partition's parent).
        for &table in after.tracked.iter().filter(|t| !self.tracked.contains(t)) {
            let tree = std::iter::once(table).chain(
                after
                    .members
                    .iter()
                    .filter(|m| m.table == table)
                    .map(|m| m.relid),
            );
            for relid in tree {
                if locked_here(relid)? {
                    return Err(CertyoError::new(
                        PgSqlErrorCode::ERRCODE_T_R_SERIALIZATION_FAILURE,
                        format!("certyo_cdc: {} was tracked by another session while this statement waited for a lock on it", name_of(table)?),
                    )
                    .detail("The checks before the statement saw the table untracked, so a partition it took out would leave without its rows' deletes queued, and one it brought in would enter unchecked.")
                    .hint("Run the statement again: its checks then see the table tracked."));
                }
            }
        }
        for gone in self
            .members
            .iter()
            .filter(|m| after.find(m.relid).is_none())
        {
            // Another session's DDL, committed meanwhile, is not this statement's doing.
            if after.tracked.contains(&gone.table)
                && !self.handled(gone.relid, gone.table, Moved::Out)
                && locked_here(gone.relid)?
            {
                return Err(CertyoError::new(
                    PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                    format!("certyo_cdc: this statement takes partition {} out of tracked table {} without capturing its rows' deletes", gone.name, name_of(gone.table)?),
                )
                .detail("The statement reached a partition that no name in it gave when it began: a drop that cascades to it (DROP EXTENSION, DROP ACCESS METHOD, DROP OWNED BY, DROP TYPE ... CASCADE), or a name that meant another table until it was renamed while the statement waited for a lock.")
                .hint(format!("Detach the partition first (ALTER TABLE {} DETACH PARTITION {} queues a delete of each of its rows), then run the statement again.", gone.parent_name, gone.name)));
            }
        }
        for came in after
            .members
            .iter()
            .filter(|m| self.find(m.relid).is_none())
        {
            if after.handled(came.relid, came.table, Moved::In) || !locked_here(came.relid)? {
                continue;
            }
            if attaching {
                return Err(CertyoError::new(
                    PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                    format!("certyo_cdc: this statement attaches {} to tracked table {}, which is not the table its checks saw", came.name, name_of(came.table)?),
                )
                .detail("The name in the statement meant another table when it began, and came to mean this one (a table or schema renamed by another session) while the statement waited for a lock: its rows would enter unseen by Certyo, with whatever their bookkeeping columns say.")
                .hint("Run the statement again, once nothing renames the tables it names.".to_string()));
            }
            // Another session attached it (or the table above it) while this statement waited
            // for its lock: what this statement then took out of it (a partition dropped or
            // detached) left without the checks, which saw it outside the tracked table.
            return Err(CertyoError::new(
                PgSqlErrorCode::ERRCODE_T_R_SERIALIZATION_FAILURE,
                format!("certyo_cdc: {} joined tracked table {} by another session's ATTACH while this statement waited for a lock on it", came.name, name_of(came.table)?),
            )
            .detail("The checks before the statement saw it outside the tracked table, so a partition the statement took out of it would leave without its rows' deletes queued.")
            .hint("Run the statement again: its checks then see it in the tracked table."));
        }
        Ok(())
    }
}
