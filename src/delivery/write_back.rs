//! Writing Certyo's answers back to the source rows: the record hash after acceptance, the
//! anchor status after verification. Per table, one statement per batch, in the transaction
//! that records the answers. They run as the table's owner (see [`crate::rights`]), so the
//! owner's code never runs with the worker's rights. On a table whose UPDATE can run no user
//! code they run in replica mode and name only bookkeeping columns: no trigger of the owner's
//! fires for what is bookkeeping, not a change (the marks trigger, which fires always, leaves
//! the write-back alone). On any other table they run in origin mode, the owner's triggers
//! firing, and capture, which fires on every UPDATE, checks that no trigger changed the row's
//! content meanwhile (it fails the write-back if one did: the row would otherwise be marked
//! with the hash of content it no longer holds). Under a capture trigger 0.1.0 installed (fired
//! `UPDATE OF` the business columns, until `ALTER EXTENSION ... UPDATE` replaces it) they also
//! assign one business column its own value, so that it fires.
//! Origin-mode write-backs are the slow lane's: the delivery worker runs no owner's code.

use crate::capture::options::WriteBack;
use crate::track::key::{split_record_id, RecordKey};
use pgrx::datum::DatumWithOid;
use pgrx::pg_sys::Oid;
use pgrx::PgSqlErrorCode;
use std::collections::HashMap;

/// One version of one record, as Certyo knows it.
#[derive(Debug, Clone)]
pub struct Version {
    pub relid: Oid,
    pub record_id: String,
    pub record_hash: String,
    /// The queue id of the change: orders versions of a record.
    pub id: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    /// Accepted: `certyo_record_hash = <hash>, certyo_anchor_status = 'pending'`, unless a newer
    /// change of the record is already taken or accepted (its own hash follows or came first).
    Accepted,
    /// Verified on chain: `certyo_anchor_status = 'anchored', certyo_verified_at = now()`, only
    /// on a row that still holds this version (its hash) with no newer change waiting.
    Anchored,
    /// Certyo reports another hash: `certyo_anchor_status = 'mismatch'` on a row that still
    /// holds this version.
    Mismatch,
}

impl Mark {
    /// On a table tracked with `write_back => 'anchored'` only [`Mark::Accepted`] comes here
    /// (the others: `super::write_back_anchored`): a newer version is accepted, so whatever
    /// the row says of an earlier one (or an INSERT copied from elsewhere) is cleared, and it
    /// says nothing until this version is anchored.
    fn set(self, mode: WriteBack) -> &'static str {
        match self {
            Mark::Accepted if mode == WriteBack::Anchored => CLEAR,
            Mark::Accepted => "certyo_record_hash = v.hash, certyo_anchor_status = 'pending', certyo_verified_at = NULL",
            Mark::Anchored => "certyo_anchor_status = 'anchored', certyo_verified_at = now()",
            Mark::Mismatch => "certyo_anchor_status = 'mismatch'",
        }
    }

    /// Which versions may still mark their row, judged from the worker's own tables (`$4` is
    /// the table's oid); None: all of them.
    fn still_current(self) -> Option<String> {
        let newer_taken = newer_than("certyo.delivery");
        match self {
            Mark::Accepted => Some(format!(
                "{newer_taken} AND {}",
                newer_than("certyo.receipt")
            )),
            Mark::Anchored => Some(newer_taken),
            Mark::Mismatch => None,
        }
    }

    /// Whether the row must still render to the captured content to take the mark (see
    /// [`render_as_captured`]): a hash, and above all `anchored`, claims that content. Not a
    /// mismatch, which claims nothing about it; nor acceptance under `write_back =>
    /// 'anchored'`, which only clears what an earlier version left.
    fn guarded(self, mode: WriteBack) -> bool {
        match self {
            Mark::Accepted => mode != WriteBack::Anchored,
            Mark::Anchored => true,
            Mark::Mismatch => false,
        }
    }

    /// Which rows may take the mark, judged from the row itself.
    fn row_condition(self, mode: WriteBack) -> &'static str {
        match self {
            Mark::Accepted if mode == WriteBack::Anchored => {
                // Left alone: nothing (no write), or this very content anchored already (a
                // version with the same hash), which is true of the row as it is.
                "(t.certyo_record_hash IS NOT NULL OR t.certyo_anchor_status IS NOT NULL OR t.certyo_verified_at IS NOT NULL)
                 AND NOT (t.certyo_record_hash IS NOT DISTINCT FROM v.hash AND t.certyo_anchor_status IS NOT DISTINCT FROM 'anchored')"
            }
            Mark::Accepted => "true",
            Mark::Anchored | Mark::Mismatch => "t.certyo_record_hash = v.hash",
        }
    }
}

/// What a row that says nothing holds in its bookkeeping columns: set on a row whose content
/// is not a version captured (the content guard refused it), so that no mark an earlier
/// version left claims what the row now holds (a row changed while its table was untracked,
/// then tracked again, kept its earlier version's `anchored`); and, under `write_back =>
/// 'anchored'`, on a row whose newer version was accepted.
pub(super) const CLEAR: &str =
    "certyo_record_hash = NULL, certyo_anchor_status = NULL, certyo_verified_at = NULL";

/// The rows that say something in their bookkeeping columns (the others need no [`CLEAR`]).
pub(super) const HOLDS_MARKS: &str = "(t.certyo_record_hash IS NOT NULL OR t.certyo_anchor_status IS NOT NULL OR t.certyo_verified_at IS NOT NULL)";

/// "No newer change of this record in `table`", as a scalar subquery rather than `NOT EXISTS`:
/// the planner cannot turn it into a join, so it stays one index probe per row whatever the
/// (often stale) statistics say about how many rows the table has for this relation.
fn newer_than(table: &str) -> String {
    format!(
        "(SELECT n.id FROM {table} n WHERE n.relid = $4 AND n.record_id = v.rid AND n.id > v.qid LIMIT 1) IS NULL"
    )
}

/// Mark the source rows of `versions`, one statement per table, in the caller's transaction
/// (the one that records the receipts, so rows and receipts commit together).
pub fn mark(
    client: &mut pgrx::spi::SpiClient<'_>,
    versions: &[Version],
    mark: Mark,
) -> Result<(), pgrx::spi::Error> {
    let mut tables: Vec<Oid> = versions.iter().map(|v| v.relid).collect();
    tables.sort_unstable_by_key(|oid| oid.to_u32());
    tables.dedup();
    let failing = failing::tables(client)?;
    for relid in tables {
        let rows: Vec<Version> = versions
            .iter()
            .filter(|v| v.relid == relid)
            .cloned()
            .collect();
        let ids: Vec<i64> = rows.iter().map(|v| v.id).collect();
        if failing.contains(&relid) {
            // Its earlier write-backs wait (failing, or slow): these wait behind them, in order.
            failing::defer(client, relid, &ids, None)?;
            continue;
        }
        let owner = crate::rights::owner_of(relid).unwrap_or_default();
        let Some(timeout) = budget::left(owner) else {
            failing::defer(client, relid, &ids, Some(budget::spent_message()))?;
            continue;
        };
        let started = std::time::Instant::now();
        let outcome = mark_isolated(client, relid, &rows, mark, timeout);
        budget::spend(owner, started.elapsed());
        match outcome {
            Ok(Marked::Done) => {}
            Ok(Marked::LeftToTheSlowLane) => {
                failing::defer(
                    client,
                    relid,
                    &ids,
                    Some(OWNER_CODE_IN_THE_SLOW_LANE.into()),
                )?;
            }
            Err(failed) if budget::ran_out(failed.code, timeout) => {
                failing::defer(client, relid, &ids, Some(budget::ran_out_message(timeout)))?;
            }
            Err(failed) => failing::record(client, relid, &ids, &failed.message)?,
        }
    }
    Ok(())
}

/// What a write-back did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Marked {
    /// The rows that still hold these versions are marked.
    Done,
    /// The table's UPDATE runs its owner's code (origin mode): the delivery worker leaves it
    /// to the slow lane.
    LeftToTheSlowLane,
}

/// Why the delivery worker leaves a table's write-backs to the slow lane (`certyo.status`).
const OWNER_CODE_IN_THE_SLOW_LANE: &str =
    "its UPDATE runs its owner's code (a trigger that fires in replica mode, a function in a check, index or policy, a type not shipped with PostgreSQL): written back by the slow lane, never by the delivery worker";

/// How long the delivery worker's write-backs to one owner's tables may take: per owner per
/// pass, [`PER_OWNER`] in all. The worker runs no owner's code (those tables are the slow
/// lane's, see [`Marked::LeftToTheSlowLane`]), but its replica-mode write-backs wait for row
/// and table locks that owners hold. An owner whose tables have used the share has their
/// write-backs done by the slow lane (`super::slow_lane`), with the whole
/// `certyo.user_code_timeout` and back-off, so that one owner's locks delay that owner's tables
/// only, never the delivery of the others (the worker sends nothing while a statement of its
/// own runs).
pub mod budget {
    use pgrx::pg_sys::Oid;
    use pgrx::PgSqlErrorCode;
    use std::cell::RefCell;
    use std::collections::HashMap;
    use std::time::Duration;

    /// Each owner's share of a delivery pass.
    pub const PER_OWNER: Duration = Duration::from_millis(250);

    thread_local! {
        /// Whether this process has a budget at all: the delivery worker does; the slow lane
        /// (and a worker that could start none, doing the slow work itself) uses the whole
        /// `certyo.user_code_timeout`.
        static LIMITED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
        static SPENT: RefCell<HashMap<u32, Duration>> = RefCell::new(HashMap::new());
    }

    /// The delivery worker: its write-backs run within their owner's share, and none that runs
    /// an owner's code; false (the slow lane): the whole timeout.
    pub fn limit(limited: bool) {
        LIMITED.set(limited);
    }

    /// Is this the delivery worker (which runs no owner's code in its write-backs)?
    pub fn limited() -> bool {
        LIMITED.get()
    }

    /// A new pass: every owner's share is whole again.
    pub fn new_pass() {
        SPENT.with(|s| s.borrow_mut().clear());
    }

    /// How long `owner`'s code may run now; None when its share of this pass is spent.
    pub fn left(owner: Oid) -> Option<Duration> {
        let whole = crate::settings::user_code_timeout();
        if !LIMITED.get() {
            return Some(whole);
        }
        let spent = SPENT.with(|s| s.borrow().get(&owner.to_u32()).copied().unwrap_or_default());
        let left = PER_OWNER.saturating_sub(spent).min(whole);
        (left >= Duration::from_millis(10)).then_some(left)
    }

    pub fn spend(owner: Oid, time: Duration) {
        if LIMITED.get() {
            SPENT.with(|s| *s.borrow_mut().entry(owner.to_u32()).or_default() += time);
        }
    }

    pub fn spent_message() -> String {
        format!(
            "its write-backs used their owner's {} ms of the delivery worker's pass (waiting for locks): written back by the slow lane",
            PER_OWNER.as_millis()
        )
    }

    /// Was the statement canceled at the end of the owner's share (rather than failing)?
    pub fn ran_out(code: PgSqlErrorCode, timeout: Duration) -> bool {
        LIMITED.get()
            && timeout < crate::settings::user_code_timeout()
            && code == PgSqlErrorCode::ERRCODE_QUERY_CANCELED
    }

    pub fn ran_out_message(timeout: Duration) -> String {
        format!(
            "the write-back ran longer than the {} ms left of its owner's share of the delivery worker's pass: written back by the slow lane",
            timeout.as_millis()
        )
    }
}

/// `mark` on one table's rows in a subtransaction: one table's failure (an owner's trigger
/// that raises, a row lock held too long, a key that no longer casts) must not stop the
/// others, nor the receipts of the batch. Err: what went wrong.
fn mark_isolated(
    client: &mut pgrx::spi::SpiClient<'_>,
    relid: Oid,
    rows: &[Version],
    mark: Mark,
    timeout: std::time::Duration,
) -> Result<Marked, Failed> {
    if rows.is_empty() {
        return Ok(Marked::Done);
    }
    let outcome = crate::error::in_subtransaction(std::panic::AssertUnwindSafe(|| {
        mark_table(client, relid, rows, mark, timeout)
    }));
    match outcome {
        Ok(Ok(marked)) => Ok(marked),
        Ok(Err(e)) => Err(Failed {
            code: PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
            message: e.to_string(),
        }),
        Err((code, message)) => Err(Failed { code, message }),
    }
}

/// Why a table's write-back failed: its SQLSTATE and message.
struct Failed {
    code: PgSqlErrorCode,
    message: String,
}

/// Tables whose write-back failed: their receipts wait (`written_back = false`) and are
/// written back again with a growing back-off; `certyo.write_back_failure` says why, for
/// `certyo.status` and `certyo.worker_status()`.
pub mod failing {
    use super::super::owners;
    use super::super::slow_lane::{self, Lane};
    use super::{mark_isolated, Mark, Marked, Version};
    use certyo::retry::next_attempt_delay;
    use pgrx::pg_sys::Oid;
    use pgrx::prelude::*;
    use std::cell::RefCell;
    use std::collections::HashMap;
    use std::time::{Duration, Instant};

    type SpiResult<T> = Result<T, pgrx::spi::Error>;

    /// Receipts written back again per table per attempt.
    const RETRY_BATCH: i64 = 5_000;
    /// A table's write-back that took this long ends the lane's round: the order is made anew,
    /// so that another owner's table listed meanwhile goes before this owner's next ones.
    const ROUND_ENDS_AFTER: Duration = Duration::from_millis(200);

    thread_local! {
        /// The worker's schedule: per failing table, when to try again. None until loaded
        /// from `certyo.write_back_failure` (which survives restarts).
        static SCHEDULE: RefCell<Option<HashMap<u32, Instant>>> = const { RefCell::new(None) };
        /// When each table's failure was last logged: a WARNING at most once a minute.
        static REPORTED: RefCell<HashMap<u32, Instant>> = RefCell::new(HashMap::new());
        /// Whether this process left write-backs to the slow lane since [`left_to_the_lane`].
        static DEFERRED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    /// Whether write-backs were left to the slow lane since the last call (the delivery worker
    /// then wakes the lane).
    pub fn left_to_the_lane() -> bool {
        DEFERRED.replace(false)
    }

    /// These receipts wait to be written back (`written_back = false`).
    fn leave_waiting(client: &mut pgrx::spi::SpiClient<'_>, ids: &[i64]) -> SpiResult<()> {
        client.update(
            "UPDATE certyo.receipt SET written_back = false WHERE id = ANY ($1) AND written_back",
            None,
            &[ids.to_vec().into()],
        )?;
        Ok(())
    }

    /// After a failed write-back, in the same transaction: the receipts wait, the failure is
    /// recorded, the next attempt scheduled.
    pub(super) fn record(
        client: &mut pgrx::spi::SpiClient<'_>,
        relid: Oid,
        ids: &[i64],
        error: &str,
    ) -> SpiResult<()> {
        leave_waiting(client, ids)?;
        let attempts = client
            .update(
                "INSERT INTO certyo.write_back_failure AS f (relid, error, since, attempts, last_attempt_at)
                 VALUES ($1, $2, now(), 1, now())
                 ON CONFLICT (relid) DO UPDATE SET error = $2, attempts = f.attempts + 1, last_attempt_at = now()
                 RETURNING attempts",
                None,
                &[relid.into(), error.into()],
            )?
            .first()
            .get_one::<i32>()?
            .unwrap_or(1);
        schedule(relid, Some(attempts.max(1) as u32));
        warn(relid, error);
        Ok(())
    }

    /// A write-back to `relid` ran past the hard limit and ended the process (see
    /// `crate::hard_limit`): the table's write-backs are the slow lane's now, with back-off.
    pub fn ended_the_process(relid: Oid) -> SpiResult<()> {
        let message = crate::hard_limit::ended_message(
            "the write-back (its owner's code)",
            "make the table's triggers (and the functions its checks, indexes and policies call) let query_canceled through, or raise certyo.user_code_timeout if they need longer",
        );
        crate::error::transaction(|| {
            // Its owner's code took the whole time and more, in the lane that ended.
            if let Some(owner) = crate::rights::owner_of(relid) {
                let limit = crate::settings::user_code_timeout() + crate::hard_limit::GRACE;
                owners::charge(owner, limit, slow_lane::this() != Some(Lane::SlowOwners));
            }
            Spi::connect_mut(|client| record(client, relid, &[], &message))
        })
    }

    /// The tables with receipts waiting to be written back, listed or not: the list
    /// (`certyo.write_back_failure`) says why for `certyo.status`, but a retry that emptied a
    /// table's list entry just as the delivery worker deferred more of its receipts (neither
    /// saw the other's uncommitted work) must not strand them, so the receipts themselves
    /// are looked at too (one probe of the waiting-receipts index per tracked table).
    fn tables_waiting(client: &pgrx::spi::SpiClient<'_>) -> SpiResult<Vec<Waiting>> {
        client
            .select(
                "SELECT w.relid, w.attempts, w.since_last, c.relowner
                   FROM (SELECT relid, attempts, extract(epoch FROM now() - last_attempt_at)::float8
                           FROM certyo.write_back_failure
                         UNION ALL
                         SELECT t.tgrelid, 0, 0 FROM pg_catalog.pg_trigger t  -- the tracked tables (not their ids: see carried_ids)
                          WHERE t.tgname = 'certyo_capture' AND t.tgparentid = 0
                            AND EXISTS (SELECT FROM certyo.receipt r WHERE r.relid = t.tgrelid AND NOT r.written_back)
                            AND NOT EXISTS (SELECT FROM certyo.write_back_failure f WHERE f.relid = t.tgrelid))
                        AS w (relid, attempts, since_last)
                   LEFT JOIN pg_catalog.pg_class c ON c.oid = w.relid",
                None,
                &[],
            )?
            .map(|row| {
                Ok(Waiting {
                    relid: row.get::<Oid>(1)?.unwrap_or_default(),
                    attempts: row.get::<i32>(2)?.unwrap_or(0).max(0) as u32,
                    since_last: Duration::from_secs_f64(row.get::<f64>(3)?.unwrap_or(0.0).max(0.0)),
                    owner: row.get::<Oid>(4)?.unwrap_or_default(),
                })
            })
            .collect()
    }

    /// A table whose receipts wait: its failed attempts, and how long ago the last one was.
    struct Waiting {
        relid: Oid,
        attempts: u32,
        since_last: Duration,
        /// The table's owner (invalid once the table is gone).
        owner: Oid,
    }

    /// The tables whose write-back fails or waits for the slow lane now.
    pub(super) fn tables(client: &pgrx::spi::SpiClient<'_>) -> SpiResult<Vec<Oid>> {
        client
            .select("SELECT relid FROM certyo.write_back_failure", None, &[])?
            .map(|row| row.get::<Oid>(1).map(Option::unwrap_or_default))
            .collect()
    }

    /// The delivery worker leaves these receipts to the slow lane (`super::super::slow_lane`),
    /// in the transaction that records them: they wait (`written_back = false`) with the
    /// table's earlier ones, and the table is (still) listed in `certyo.write_back_failure`,
    /// where the slow lane finds it. `reason` is why, if the table was not listed yet.
    pub(super) fn defer(
        client: &mut pgrx::spi::SpiClient<'_>,
        relid: Oid,
        ids: &[i64],
        reason: Option<String>,
    ) -> SpiResult<()> {
        DEFERRED.set(true);
        leave_waiting(client, ids)?;
        // Listed if not yet (never waiting for the slow lane's lock on a listed row: the lane
        // finds the waiting receipts themselves too, see `tables_waiting`).
        client.update(
            "INSERT INTO certyo.write_back_failure (relid, error, since, attempts, last_attempt_at)
             VALUES ($1, coalesce($2, 'waiting for the slow lane'), now(), 0, now())
             ON CONFLICT (relid) DO NOTHING",
            None,
            &[relid.into(), reason.into()],
        )?;
        Ok(())
    }

    /// Schedule the next attempt after `attempts` failures, or forget the table (None).
    fn schedule(relid: Oid, attempts: Option<u32>) {
        let now = Instant::now();
        let jitter = f64::from(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.subsec_nanos() % 1000)
                .unwrap_or(0),
        ) / 1000.0;
        // Before the schedule is loaded, the table's row in certyo.write_back_failure is
        // enough: loading picks it up.
        SCHEDULE.with(|s| {
            let mut s = s.borrow_mut();
            let Some(schedule) = s.as_mut() else { return };
            match attempts {
                Some(n) => {
                    let cap = crate::settings::current().max_retry_interval;
                    schedule.insert(relid.to_u32(), now + next_attempt_delay(n, jitter, cap));
                }
                None => {
                    schedule.remove(&relid.to_u32());
                }
            }
        });
    }

    /// Try `relid` again `after` this long (once the schedule is loaded).
    fn retry_after(relid: Oid, after: Duration) {
        SCHEDULE.with(|s| {
            if let Some(schedule) = s.borrow_mut().as_mut() {
                schedule.insert(relid.to_u32(), Instant::now() + after);
            }
        });
    }

    /// How long until the next retry is due (None: no table is failing).
    pub fn next_retry_in() -> Option<Duration> {
        let now = Instant::now();
        SCHEDULE.with(|s| {
            s.borrow().as_ref().and_then(|schedule| {
                schedule
                    .values()
                    .min()
                    .map(|at| at.saturating_duration_since(now))
            })
        })
    }

    /// Try again the tables whose retry is due, each in its own transaction. The listed
    /// tables are read every time: the delivery worker, another process, lists tables for the
    /// slow lane at any moment; a table newly listed is due at once, a table no longer listed
    /// is forgotten.
    pub fn retry_due() -> SpiResult<()> {
        let listed = crate::error::transaction(|| Spi::connect(tables_waiting))?;
        let now = Instant::now();
        let cap = crate::settings::current().max_retry_interval;
        SCHEDULE.with(|s| {
            let mut s = s.borrow_mut();
            let schedule = s.get_or_insert_with(HashMap::new);
            schedule.retain(|relid, _| listed.iter().any(|w| w.relid.to_u32() == *relid));
            for waiting in &listed {
                // A table that failed before this process knew of it (listed by another, or
                // before a restart) keeps its back-off: one whose write-back ended the lane
                // must not end the next lane at once.
                let wait = match waiting.attempts {
                    0 => Duration::ZERO,
                    n => next_attempt_delay(n, 0.5, cap).saturating_sub(waiting.since_last),
                };
                schedule.entry(waiting.relid.to_u32()).or_insert(now + wait);
            }
        });
        let now = Instant::now();
        let mut due: Vec<Oid> = SCHEDULE.with(|s| {
            s.borrow()
                .as_ref()
                .map(|schedule| {
                    schedule
                        .iter()
                        .filter(|(_, at)| **at <= now)
                        .map(|(relid, _)| Oid::from(*relid))
                        .collect()
                })
                .unwrap_or_default()
        });
        // Fewest failed attempts first: a table whose write-back ends the lane at its hard limit
        // (see `crate::hard_limit`) comes after every table that has not failed, in each of the
        // lane's lives, however many such tables an owner has. Then the owners whose code has
        // taken least of the lane's time lately (`owners`): one owner's many slow tables wait
        // behind the others' tables, not the other way round.
        let mut due: Vec<(u32, Duration, Oid, Oid)> = due
            .drain(..)
            .map(|relid| {
                let waiting = listed.iter().find(|w| w.relid == relid);
                let (attempts, owner) =
                    waiting.map_or((0, Oid::INVALID), |w| (w.attempts, w.owner));
                (attempts, owners::used(owner), relid, owner)
            })
            .collect();
        // Slow owners' tables are their lane's (they wait while it starts again after its hard
        // limit), unless the delivery worker could start none.
        let lane = slow_lane::this();
        match lane {
            Some(Lane::SlowOwners) => {
                owners::recover_quiet();
                due.retain(|d| owners::is_slow(d.3, true));
            }
            Some(Lane::Shared) if !owners::slow_owners_have_no_lane() => {
                due.retain(|d| !owners::is_slow(d.3, false));
            }
            _ => {}
        }
        due.sort_by_key(|(attempts, used, relid, _)| (*attempts, *used, relid.to_u32()));
        for (_, _, relid, owner) in due {
            let started = Instant::now();
            crate::error::transaction(|| Spi::connect_mut(|client| retry_table(client, relid)))?;
            let took = started.elapsed();
            owners::charge(owner, took, lane != Some(Lane::SlowOwners));
            if took >= ROUND_ENDS_AFTER {
                // The order is made anew (the caller comes back at once): another owner's table
                // listed meanwhile goes before this owner's next ones.
                break;
            }
        }
        Ok(())
    }

    /// Write back the waiting receipts of one table: the hash, then the anchor status they
    /// reached meanwhile. Done when none wait any more.
    fn retry_table(client: &mut pgrx::spi::SpiClient<'_>, relid: Oid) -> SpiResult<()> {
        let rows = client.select(
            "SELECT id, record_id, record_hash, anchor_status, operation = 'delete' FROM certyo.receipt
              WHERE relid = $1 AND NOT written_back ORDER BY id LIMIT $2",
            None,
            &[relid.into(), RETRY_BATCH.into()],
        )?;
        let mut waiting: Vec<(Version, String, bool)> = Vec::new();
        for row in rows {
            let version = Version {
                relid,
                id: row.get::<i64>(1)?.unwrap_or_default(),
                record_id: row.get::<String>(2)?.unwrap_or_default(),
                record_hash: row.get::<String>(3)?.unwrap_or_default(),
            };
            let deleted = row.get::<bool>(5)?.unwrap_or(false);
            waiting.push((version, row.get::<String>(4)?.unwrap_or_default(), deleted));
        }
        // A delete has no row to mark (as on acceptance and verification): a row holding its
        // record id now was written without capture (while the table was untracked, say),
        // and must not take the hash of a delete. Its receipt is done all the same.
        let with_status = |status: Option<&str>| -> Vec<Version> {
            waiting
                .iter()
                .filter(|(_, s, deleted)| !deleted && status.is_none_or(|wanted| s == wanted))
                .map(|(v, _, _)| v.clone())
                .collect()
        };
        let timeout = crate::settings::user_code_timeout();
        // In the slow lane every write-back here is done. In a delivery worker that could start
        // no lane, a table whose UPDATE runs its owner's code is not: it waits for a lane (the
        // worker runs no owner's code), its receipts untouched.
        let steps = [
            (None, Mark::Accepted),
            (Some("anchored"), Mark::Anchored),
            (Some("mismatch"), Mark::Mismatch),
        ];
        let mut outcome = Ok(Marked::Done);
        for (status, mark) in steps {
            outcome = mark_isolated(client, relid, &with_status(status), mark, timeout);
            if !matches!(outcome, Ok(Marked::Done)) {
                break;
            }
        }
        match outcome {
            Err(failed) => return record(client, relid, &[], &failed.message),
            Ok(Marked::LeftToTheSlowLane) => {
                retry_after(relid, crate::settings::current().poll_interval);
                return Ok(());
            }
            Ok(Marked::Done) => {}
        }
        let ids: Vec<i64> = waiting.iter().map(|(v, _, _)| v.id).collect();
        let statuses: Vec<String> = waiting.iter().map(|(_, s, _)| s.clone()).collect();
        // Only the receipts still in the state they were written back in: one verified
        // meanwhile (by the delivery worker) waits for the next retry, which writes back the
        // status it reached. And only this table's: one found to be another's waits for it.
        client.update(
            "UPDATE certyo.receipt r SET written_back = true
               FROM unnest($1::bigint[], $2::text[]) AS v(id, status)
              WHERE r.id = v.id AND r.anchor_status IS NOT DISTINCT FROM v.status AND r.relid = $3",
            None,
            &[ids.into(), statuses.into(), relid.into()],
        )?;
        let deleted = match client
            .update(
                // Not while receipts of the table wait (deferred before the lock above, or
                // verified meanwhile): they are the next retry's.
                "DELETE FROM certyo.write_back_failure WHERE relid = $1
                    AND NOT EXISTS (SELECT FROM certyo.receipt r WHERE r.relid = $1 AND NOT r.written_back)
                 RETURNING attempts",
                None,
                &[relid.into()],
            )?
            .next()
        {
            Some(row) => Some(row.get::<i32>(1)?.unwrap_or(0)),
            None => None,
        };
        if let Some(attempts) = deleted {
            schedule(relid, None);
            // Said only after failures: a table that merely waited for the lane (its UPDATE
            // runs its owner's code) is written back this way every time.
            if attempts > 0 {
                pgrx::log!(
                    "certyo_cdc: write-back to table {} works again",
                    name_of(relid)
                );
            }
        } else {
            // Receipts still wait (more than a batch, deferred meanwhile, or verified
            // meanwhile): at once again.
            retry_after(relid, Duration::ZERO);
        }
        Ok(())
    }

    /// Whether any table's write-back waits (failing, or left to the slow lane), and what
    /// fails, for the worker's status (None: nothing). One statement, read every pass: the
    /// slow lane, another process, retries and clears the failures. Tables that only wait
    /// for the slow lane (no attempt failed there) are not failing.
    pub fn look() -> SpiResult<(bool, Option<String>)> {
        crate::error::transaction(|| {
            Spi::get_two::<bool, String>(
                // At most five tables named, each error cut short: the text goes into the
                // worker's status every pass, however many tables of however many roles fail.
                "SELECT EXISTS (SELECT FROM certyo.write_back_failure)
                        OR EXISTS (SELECT FROM certyo.receipt WHERE NOT written_back),
                        (SELECT string_agg(format('write-back to %s fails: %s (%s attempts since %s; retried with back-off, its changes are delivered)',
                                                  relid::regclass, left(error, 300), attempts,
                                                  to_char(since, 'YYYY-MM-DD HH24:MI:SS')),
                                           '; ' ORDER BY relid) FILTER (WHERE n <= 5)
                                || CASE WHEN count(*) > 5 THEN format('; and %s more tables', count(*) - 5) ELSE '' END
                           FROM (SELECT *, row_number() OVER (ORDER BY relid) AS n FROM certyo.write_back_failure
                                  WHERE attempts > 0) f)",
            )
            .map(|(waiting, summary)| (waiting.unwrap_or(false), summary))
        })
    }

    fn warn(relid: Oid, error: &str) {
        let now = Instant::now();
        let due = REPORTED.with(|reported| {
            let mut reported = reported.borrow_mut();
            let due = reported
                .get(&relid.to_u32())
                .is_none_or(|at| now.duration_since(*at) >= Duration::from_secs(60));
            if due {
                reported.insert(relid.to_u32(), now);
            }
            due
        });
        if due {
            pgrx::warning!(
                "certyo_cdc: could not write back to table {}: {error}; its changes were delivered and their receipts recorded; the rows are marked when it works again (retried with back-off)",
                name_of(relid)
            );
        }
    }

    pub(super) fn name_of(relid: Oid) -> String {
        // SAFETY: a syscache lookup that returns NULL for a table that is gone.
        let name = unsafe { pgrx::pg_sys::get_rel_name(relid) };
        if name.is_null() {
            relid.to_u32().to_string()
        } else {
            // SAFETY: a palloc'd NUL-terminated string from get_rel_name.
            unsafe { std::ffi::CStr::from_ptr(name) }
                .to_string_lossy()
                .into_owned()
        }
    }
}

/// Two statements: the worker decides from its own tables which versions are still current,
/// then the row update runs as the table's owner (see [`crate::rights`]): it fires the
/// table's index expressions, domain checks and policies, which are the owner's code.
fn mark_table(
    client: &mut pgrx::spi::SpiClient<'_>,
    relid: Oid,
    rows: &[Version],
    mark: Mark,
    timeout: std::time::Duration,
) -> Result<Marked, pgrx::spi::Error> {
    // Locked first: the name looked up below then means this table until the write-back
    // commits (see `rights::lock_table`).
    // The wait counts against the owner's share of the pass (`budget`).
    // Closed to ATTACH PARTITION for replica mode (the delivery worker's, which runs no
    // owner's code), unless the key kept says its owner's code runs. A slow lane does not
    // close: it writes an open partitioned tree back in origin mode (below), so that no one
    // who holds a parent's SHARE UPDATE EXCLUSIVE (an ANALYZE left open in a transaction) stops
    // that tree's write-backs.
    let closed =
        super::slow_lane::this().is_none() && super::keys::kept_user_code(relid) != Some(true);
    crate::rights::lock_table(relid, pgrx::pg_sys::RowExclusiveLock, timeout, closed);
    // Only versions captured for this table under its present record key (see
    // `crate::track::identity`): never another table's after a restore, nor an earlier key's.
    let ids: Vec<i64> = rows.iter().map(|v| v.id).collect();
    let own = crate::track::identity::belonging(client, relid, &ids)?;
    let rows: Vec<Version> = rows
        .iter()
        .filter(|v| own.contains(&v.id))
        .cloned()
        .collect();
    if rows.is_empty() {
        return Ok(Marked::Done);
    }
    // Kept until the catalog changes: a pass writes back to every table it delivered for.
    let Some(key) = super::keys::of(client, relid)? else {
        return Ok(Marked::Done); // dropped or untracked meanwhile: nothing to write back to
    };
    // A partitioned tree left open is never written back in replica mode: a partition attached
    // since the check would bring its triggers in. The slow lane writes it back in origin
    // mode, as its owner (closing it now, its partitions held, could deadlock with an ATTACH,
    // which holds the parent and waits for its default partition).
    let key = if !key.user_code && !closed && crate::rights::is_partitioned(relid) {
        if budget::limited() {
            return Ok(Marked::LeftToTheSlowLane);
        }
        let mut origin = (*key).clone();
        origin.user_code = true;
        std::rc::Rc::new(origin)
    } else {
        key
    };
    if key.write_back == WriteBack::None {
        // Never written to: a column of a bookkeeping name there is the user's own.
        return Ok(Marked::Done);
    }
    if let Err(refused) = key.readable() {
        refused.raise();
    }
    if key.user_code && budget::limited() {
        // Owners' code never runs in the delivery worker: it could hold it (a trigger that
        // catches its cancellation ends the process running it, see `crate::hard_limit`),
        // and every table's delivery waits while a statement of the worker runs.
        return Ok(Marked::LeftToTheSlowLane);
    }
    if key.write_back == WriteBack::Anchored && mark != Mark::Accepted {
        return super::write_back_anchored::mark_settled(client, relid, &key, &rows, mark, timeout);
    }
    let ids: Vec<i64> = rows.iter().map(|v| v.id).collect();
    let rows = still_current(client, relid, &rows, mark)?;
    let captured = if mark.guarded(key.write_back) {
        Some(captured_payloads(client, &ids)?)
    } else {
        None
    };
    let n = key.columns.len();
    let mut parts: Vec<Vec<String>> = vec![Vec::new(); n];
    let mut hashes = Vec::new();
    for (record_id, hash) in rows {
        let Some(split) = split_record_id(&record_id, n) else {
            continue;
        };
        for (column, value) in parts.iter_mut().zip(split) {
            column.push(value);
        }
        hashes.push(hash);
    }
    if hashes.is_empty() {
        return Ok(Marked::Done);
    }
    let params: Vec<String> = (1..=n).map(|i| format!("${i}")).collect();
    let names: Vec<String> = (1..=n).map(|i| format!("k{i}")).collect();
    // The content guard (see [`render_as_captured`]): the rows found by key that still render
    // (the whole row as `(t.*)::table`: a bare `t` is a column of the table if it has one named
    // so, which would be read as a row)
    // to the captured payload, by their tuple id, which the UPDATE requires: a row changed
    // between the two statements is another tuple, and is not marked.
    // The rows the versions' keys find, `v` holding each version's key parts and hash (and
    // `extra` columns), `ordinality` numbering them.
    let keyed =
        |arrays: &str, extra: &str, ordinality: &str, row_condition: &str, condition: &str| {
            format!(
                "unnest({params}, ${h}::text[]{arrays}){ordinality} AS v({names}, hash{extra})
          WHERE {matches} AND {identical} AND {row_condition}{condition}",
                params = params.join(", "),
                names = names.join(", "),
                matches = key.matches("t", "v"),
                identical = key.identical("t", "v"),
                h = n + 1,
            )
        };
    let row_condition = mark.row_condition(key.write_back);
    let guard = format!(
        "/* certyo_cdc content guard, key types {types} */
         SELECT v.n, t.ctid::text, (t.*)::{table}
           FROM {table} AS t, {keyed}",
        types = key.type_list(),
        table = key.table,
        keyed = keyed("", ", n", " WITH ORDINALITY", row_condition, ""),
    );
    let (tid_array, tid_name, tid_condition) = if captured.is_some() {
        (
            format!(", ${}::text[]", n + 2),
            ", tid",
            " AND t.ctid OPERATOR(pg_catalog.=) v.tid::pg_catalog.tid",
        )
    } else {
        (String::new(), "", "")
    };
    let watched = match (&key.update_column, key.user_code) {
        (Some(column), true) => format!(", {column} = t.{column}"),
        _ => String::new(),
    };
    // The mode is part of the statement's text, so a plan kept from one mode is never run in
    // the other; so are the key's types, which its parameters take.
    let mode = if key.user_code { "origin" } else { "replica" };
    let sql = format!(
        "/* certyo_cdc write-back, {mode} mode, key types {types} */
         UPDATE {table} AS t SET {set}{watched}
           FROM {keyed}",
        types = key.type_list(),
        table = key.table,
        set = mark.set(key.write_back),
        keyed = keyed(&tid_array, tid_name, "", row_condition, tid_condition),
    );
    // The rows the guard refused, by the tuple id it judged: whatever marks they hold are not
    // of what they hold now (see [`CLEAR`]).
    let clear = format!(
        "/* certyo_cdc write-back, marks cleared, {mode} mode, key types {types} */
         UPDATE {table} AS t SET {CLEAR}{watched}
           FROM {keyed}",
        types = key.type_list(),
        table = key.table,
        keyed = keyed(&tid_array, tid_name, "", HOLDS_MARKS, tid_condition),
    );
    let refused = crate::rights::writing_back_as(
        relid,
        key.owner,
        key.user_code,
        timeout,
        || -> Result<Vec<String>, pgrx::spi::Error> {
            // Read into the key's types as the owner, settings pinned (see `RecordKey`).
            let (mut args, kept) = crate::rights::with_pinned_io(|| read_keys(&key, &parts));
            if kept.is_empty() {
                return Ok(Vec::new());
            }
            let hashes: Vec<String> = kept.iter().map(|&r| hashes[r].clone()).collect();
            args.push(hashes.clone().into());
            let mut refused = Vec::new();
            if let Some(captured) = &captured {
                let found = super::prepared::select(client, &guard, &args)?;
                let rendered = render_as_captured(relid, found, &hashes, captured)?;
                let mut tids: Vec<Option<String>> = Vec::with_capacity(rendered.len());
                let mut otherwise: Vec<Option<String>> = Vec::with_capacity(rendered.len());
                for (i, row) in rendered.into_iter().enumerate() {
                    let (marked, cleared) = match row {
                        Rendered::AsCaptured(tid) => (Some(tid), None),
                        Rendered::Otherwise(tid) => {
                            refused.push(hashes[i].clone());
                            (None, Some(tid))
                        }
                        Rendered::NoRow => (None, None),
                    };
                    tids.push(marked);
                    otherwise.push(cleared);
                }
                if !refused.is_empty() {
                    // The keys again (arguments are not copied): the rows judged, by tuple id.
                    let (mut cleared, _) =
                        crate::rights::with_pinned_io(|| read_keys(&key, &parts));
                    cleared.push(hashes.clone().into());
                    cleared.push(otherwise.into());
                    super::prepared::update(client, &clear, &cleared)?;
                }
                args.push(tids.into());
            }
            super::prepared::update(client, &sql, &args)?;
            Ok(refused)
        },
    )?;
    if !refused.is_empty() {
        refuse(client, relid, &ids, refused)?;
    }
    Ok(Marked::Done)
}

/// Per version id, the hex SHA-256 of the payload captured (and sent to Certyo), by record hash.
/// What was captured of a version, for the content guard: its receipt, the digest of its
/// payload, and its columns' digests (when kept).
pub(super) struct Captured {
    id: i64,
    sha256: String,
    digests: Option<Vec<u8>>,
}

pub(super) fn captured_payloads(
    client: &mut pgrx::spi::SpiClient<'_>,
    ids: &[i64],
) -> Result<HashMap<String, Captured>, pgrx::spi::Error> {
    // A schema from before 0.2.0 (the library installed, `ALTER EXTENSION certyo_cdc UPDATE`
    // not yet run) keeps no column digests.
    let sql = if crate::shape::schema_has(c"receipt", Some(c"column_sha256")) {
        "SELECT record_hash, encode(payload_sha256, 'hex'), id, column_sha256 FROM certyo.receipt WHERE id = ANY ($1)"
    } else {
        "SELECT record_hash, encode(payload_sha256, 'hex'), id, NULL::bytea FROM certyo.receipt WHERE id = ANY ($1)"
    };
    let found = super::prepared::select(client, sql, &[ids.to_vec().into()])?;
    let mut captured = HashMap::new();
    for row in found {
        if let (Some(hash), Some(sha256), Some(id)) = (
            row.get::<String>(1)?,
            row.get::<String>(2)?,
            row.get::<i64>(3)?,
        ) {
            let digests = row.get::<Vec<u8>>(4)?;
            captured.insert(
                hash,
                Captured {
                    id,
                    sha256,
                    digests,
                },
            );
        }
    }
    Ok(captured)
}

/// The table's capture shapes and its columns now (see [`crate::audit::differing_columns`]),
/// read once per write-back, when a row first renders otherwise than captured.
type Shapes = Option<(Vec<crate::shape::Shape>, HashMap<i16, (String, String)>)>;

/// Whether a row rendering to `payload` holds the content `captured` of a version captured
/// before a schema change (a column added, dropped, renamed or retyped since, or excluded):
/// the same values in the columns that version was captured with that are still there with
/// their type, compared by their digests under the version's shape, as `certyo.audit()` does.
fn renders_under_its_shape(
    relid: Oid,
    captured: &Captured,
    payload: &[u8],
    shapes: &mut Shapes,
) -> bool {
    if shapes.is_none() {
        let loaded = crate::shape::history(relid)
            .and_then(|history| Ok((history, crate::audit::columns_now(relid)?)));
        match loaded {
            Ok(loaded) => *shapes = Some(loaded),
            Err(_) => return false, // the safe side: not marked
        }
    }
    let Some((history, columns_now)) = shapes.as_ref() else {
        return false;
    };
    let after = history.partition_point(|s| s.since_id < captured.id);
    let Some(shape) = after.checked_sub(1).map(|i| &history[i]) else {
        return false; // captured under the present shape: its whole payload was compared
    };
    crate::audit::differing_columns(shape, captured.digests.as_ref(), payload, columns_now)
        .is_some_and(|differ| differ.is_empty())
}

/// What the content guard found for a version.
pub(super) enum Rendered {
    /// No row takes the mark (none has its key, or, to be marked anchored, its hash).
    NoRow,
    /// Its row renders to the captured payload: its tuple id.
    AsCaptured(String),
    /// Its row renders to something else: its tuple id, whose marks are cleared (see
    /// [`CLEAR`]).
    Otherwise(String),
}

/// The content guard: a row is marked with a version's hash (and above all `anchored`) only
/// while its content renders, as capture renders it, to the payload captured for that version.
/// A row changed behind capture's back, or whose rendering changed without a captured change
/// (an enum label renamed, a type's output altered), is not marked, and the marks it holds are
/// cleared ([`CLEAR`]). `found` holds the rows
/// the key finds (`v.n`: the version's position from 1, the row's tuple id, the row); the
/// answer, per version in `hashes`, what its row renders to.
pub(super) fn render_as_captured(
    relid: Oid,
    found: pgrx::spi::SpiTupleTable<'_>,
    hashes: &[String],
    captured: &HashMap<String, Captured>,
) -> Result<Vec<Rendered>, pgrx::spi::Error> {
    let mut tids: Vec<Rendered> = hashes.iter().map(|_| Rendered::NoRow).collect();
    if found.is_empty() {
        return Ok(tids);
    }
    let Some(options) = crate::track::installed_options(relid).unwrap_or_else(|e| e.raise()) else {
        return Ok(tids); // untracked meanwhile
    };
    // SAFETY: inside the write-back's transaction, which holds the table's lock; the relation
    // is closed by its guard; each row is a whole-row value of the table, deformed with the
    // table's descriptor (a row stored before an `ADD COLUMN` gets the missing values).
    unsafe {
        let opened = crate::relation::OpenRelation::open(relid, pgrx::pg_sys::AccessShareLock as _);
        let rel = opened.get();
        let plan =
            crate::capture::plan::TablePlan::build(rel, &options).unwrap_or_else(|e| e.raise());
        // Read as a row only what is one of this table's rows.
        let rowtype = (*(*rel).rd_rel).reltype;
        if found.column_type_oid(3)?.value() != rowtype {
            pgrx::error!(
                "certyo_cdc: the content guard read something other than a row of the table"
            );
        }
        let mut shapes = None; // read once, if a row renders otherwise
        let mut found = found;
        while found.next().is_some() {
            let (Some(n), Some(tid)) = (found.get::<i64>(1)?, found.get::<String>(2)?) else {
                continue;
            };
            let Some(datum) = found.get_datum_by_ordinal(3)? else {
                continue;
            };
            let Some(i) = usize::try_from(n).ok().and_then(|n| n.checked_sub(1)) else {
                continue;
            };
            let Some(expected) = hashes.get(i).map(|h| captured.get(h)) else {
                continue;
            };
            let Some(expected) = expected else {
                tids[i] = Rendered::Otherwise(tid); // no captured payload to compare with
                continue;
            };
            let header = pgrx::pg_sys::pg_detoast_datum(datum.cast_mut_ptr())
                as pgrx::pg_sys::HeapTupleHeader;
            let mut tuple = pgrx::pg_sys::HeapTupleData {
                t_len: pgrx::varsize(header as *const pgrx::pg_sys::varlena) as u32,
                t_self: Default::default(),
                t_tableOid: relid,
                t_data: header,
            };
            let image = crate::capture::record::Row::deform(&mut tuple, (*rel).rd_att, plan.natts);
            let renders = plan
                .change(crate::capture::record::Operation::Upsert, &image)
                .is_ok_and(|change| {
                    certyo::payload_sha256(&change.payload) == expected.sha256
                        || renders_under_its_shape(relid, expected, &change.payload, &mut shapes)
                });
            tids[i] = if renders {
                Rendered::AsCaptured(tid)
            } else {
                Rendered::Otherwise(tid)
            };
        }
    }
    Ok(tids)
}

/// Versions the content guard refused: their rows are not marked, and never will be (their
/// receipts say why, `certyo.receipt.write_back_dropped`; the audit reports the rows).
pub(super) fn refuse(
    client: &mut pgrx::spi::SpiClient<'_>,
    relid: Oid,
    ids: &[i64],
    refused: Vec<String>,
) -> Result<(), pgrx::spi::Error> {
    // A row changed, with capture, after the versions still current were chosen (a writer that
    // committed in between) renders to its newer version: that one is written back next, and
    // this one was merely overtaken. Only the others were changed without capture.
    let reason = if crate::shape::schema_has(c"receipt", Some(c"write_back_dropped")) {
        "'the row no longer renders to the content captured (changed without capture, or its rendering changed: an enum label renamed, a type altered): not marked'"
    } else {
        "NULL"
    };
    let set = if reason == "NULL" {
        "written_back = written_back".to_string()
    } else {
        format!("write_back_dropped = coalesce(write_back_dropped, {reason})")
    };
    let count = client
        .update(
            &format!(
                "UPDATE certyo.receipt r SET {set}
                  WHERE r.id = ANY ($1) AND r.record_hash = ANY ($2)
                    AND NOT EXISTS (SELECT FROM certyo.queue n WHERE n.relid = r.relid AND n.record_id = r.record_id AND n.id > r.id)
                    AND NOT EXISTS (SELECT FROM certyo.delivery n WHERE n.relid = r.relid AND n.record_id = r.record_id AND n.id > r.id)
                    AND NOT EXISTS (SELECT FROM certyo.receipt n WHERE n.relid = r.relid AND n.record_id = r.record_id AND n.id > r.id)
                 RETURNING r.id"
            ),
            None,
            &[ids.to_vec().into(), refused.into()],
        )?
        .len();
    if count > 0 {
        let table = failing::name_of(relid);
        crate::error::CertyoError::new(
            pgrx::PgSqlErrorCode::ERRCODE_WARNING,
            format!("certyo_cdc: {count} rows of table {table} were not marked with their version's hash, and the marks an earlier version left on them were cleared: they no longer render to the content captured"),
        )
        .detail("Changed without capture, or their rendering changed without a change of theirs (an enum label renamed, a type's output altered): the hash Certyo gave is not of what they hold. certyo.receipt.write_back_dropped says so for each version.")
        .hint(format!("SELECT * FROM certyo.audit('{table}') names them; the next captured change of each row is written back as usual, and certyo.backfill('{table}') sends every row as it is now."))
        .warn();
    }
    Ok(())
}

/// The record ids' parts (`parts[column][version]`) read into the key's types, an array per
/// column, and which versions they hold. A part that no longer reads back (a `regclass` key
/// naming a table dropped since, which any role allowed to INSERT can make) is left out with
/// its version, which no row can hold now: it must not stop the table's other write-backs,
/// forever (an attacker pass of 2026-12-06).
pub(super) fn read_keys(
    key: &RecordKey,
    parts: &[Vec<String>],
) -> (Vec<DatumWithOid<'static>>, Vec<usize>) {
    let versions = parts.first().map_or(0, Vec::len);
    let arrays = |kept: &[usize]| -> Vec<DatumWithOid<'static>> {
        parts
            .iter()
            .enumerate()
            .map(|(i, column)| {
                let values: Vec<String> = kept.iter().map(|&r| column[r].clone()).collect();
                key.array_of(i, &values).unwrap_or_else(|e| e.raise())
            })
            .collect()
    };
    let every: Vec<usize> = (0..versions).collect();
    // Only bad input makes a part unreadable (SQLSTATE class 22, or no such object for a
    // name); anything else (the statement's time running out, a lock, memory) is raised.
    let canceled = |code: PgSqlErrorCode, message: &str| {
        // The class is the first two characters: the low 12 bits of the code.
        let class = |code: PgSqlErrorCode| code as isize & 0xfff;
        let unreadable = class(code) == class(PgSqlErrorCode::ERRCODE_DATA_EXCEPTION)
            || matches!(
                code,
                PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE
                    | PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT
                    | PgSqlErrorCode::ERRCODE_INVALID_SCHEMA_NAME
                    | PgSqlErrorCode::ERRCODE_UNDEFINED_FUNCTION
            );
        if !unreadable {
            pgrx::ereport!(ERROR, code, message.to_string());
        }
    };
    match crate::error::in_subtransaction(std::panic::AssertUnwindSafe(|| arrays(&every))) {
        Ok(arrays) => (arrays, every),
        Err((code, message)) => {
            canceled(code, &message);
            let kept: Vec<usize> = every
                .into_iter()
                .filter(|&r| {
                    let read =
                        crate::error::in_subtransaction(std::panic::AssertUnwindSafe(|| {
                            for (i, column) in parts.iter().enumerate() {
                                key.value_of(i, &column[r]).unwrap_or_else(|e| e.raise());
                            }
                        }));
                    match read {
                        Ok(()) => true,
                        Err((code, message)) => {
                            canceled(code, &message);
                            false
                        }
                    }
                })
                .collect();
            (arrays(&kept), kept)
        }
    }
}

/// The (record id, hash) of the versions that may still mark their row.
fn still_current(
    client: &mut pgrx::spi::SpiClient<'_>,
    relid: Oid,
    rows: &[Version],
    mark: Mark,
) -> Result<Vec<(String, String)>, pgrx::spi::Error> {
    let Some(condition) = mark.still_current() else {
        return Ok(rows
            .iter()
            .map(|v| (v.record_id.clone(), v.record_hash.clone()))
            .collect());
    };
    let record_ids: Vec<String> = rows.iter().map(|v| v.record_id.clone()).collect();
    let hashes: Vec<String> = rows.iter().map(|v| v.record_hash.clone()).collect();
    let ids: Vec<i64> = rows.iter().map(|v| v.id).collect();
    let found = super::prepared::select(
        client,
        &format!(
            "SELECT v.rid, v.hash FROM unnest($1::text[], $2::text[], $3::bigint[]) AS v(rid, hash, qid)
              WHERE {condition}"
        ),
        &[record_ids.into(), hashes.into(), ids.into(), relid.into()],
    )?;
    let mut current = Vec::new();
    for row in found {
        if let (Some(record_id), Some(hash)) = (row.get::<String>(1)?, row.get::<String>(2)?) {
            current.push((record_id, hash));
        }
    }
    Ok(current)
}
