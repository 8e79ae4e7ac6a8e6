//! The delivery worker's main loop. One worker serves one database, started by the launcher
//! (`launcher.rs`) with the database's OID. Each pass: take a batch (one short transaction),
//! send it (no transaction open), record the results and write the hashes back (short
//! transactions). It sleeps on its latch: a commit that queued changes sets it,
//! `certyo.poll_interval` is the fallback, and SIGTERM or postmaster death ends it, as does
//! `DROP EXTENSION` (the launcher starts a worker again at the next `CREATE EXTENSION`).

use super::anchor;
use super::backlog::Backlog;
use super::entry::Entry;
use super::planner::Planner;
use super::record::{self, Tally};
use super::sending::{with_signals_blocked, Sending};
use super::take;
use super::write_back;
use crate::settings::{self, Settings};
use certyo::outage::{jitter, Change, Link};
use certyo::retry::next_attempt_delay;
use certyo::{Client, ClientConfig, Outcome, Verification};
use pgrx::bgworkers::{BackgroundWorker, SignalWakeFlags};
use pgrx::pg_sys;
use std::time::{Duration, Instant};

/// Entry point, named in the worker's registration; its argument is the database's OID.
/// Returning ends the worker for good (exit code 0: not restarted); an error restarts it.
#[pgrx::pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn certyo_delivery_main(arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    // SIGTERM also ends owners' code that runs when it arrives; owners' code has a hard limit.
    crate::hard_limit::install();
    let database = pg_sys::Oid::from(arg.value() as u32);
    if crate::wake::is_dropped(database) {
        return; // connecting would fail, and the restart after it, forever
    }
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(database), None);
    if !prepare_session(database) {
        return;
    }
    let Some(name) = claim(database) else { return };
    settings::set_served_database(name);
    // No owner's code runs in the worker's write-backs, and its own ones within each owner's
    // share of a pass; the rest is the slow lane's.
    write_back::budget::limit(true);
    // SAFETY: the worker is connected, so its PGPROC is set up.
    crate::wake::set_worker(Some(unsafe { crate::compat::my_proc_number() }));
    let ended = Worker {
        database,
        ..Worker::default()
    }
    .run();
    let again = ended == Ended::Stopped && !crate::wake::is_dropped(database);
    crate::wake::set_worker(None);
    if again {
        // Ended by pg_terminate_backend (or the server's shutdown, when it does not matter):
        // the launcher starts a new worker, as Postgres restarts a failed one.
        crate::wake::ring_launcher();
    }
}

/// The session of a delivery worker, or of its slow lane (`slow_lane.rs`), once connected to
/// `database`. False: it must not serve the database (the log says why).
pub(super) fn prepare_session(database: pg_sys::Oid) -> bool {
    // Every name in the worker's SQL resolves in pg_catalog or is schema-qualified: no one
    // who can create objects in a schema on the default search_path (public, "$user") can
    // place a function or operator where the worker, a superuser, would call it.
    set_for_session(c"search_path", crate::rights::PINNED_SEARCH_PATH);
    if !super::runs_as_superuser().unwrap_or(false) {
        // A database's owner can set `role` or `session_authorization` for every session of
        // the database (ALTER DATABASE ... SET), the worker's too: it then is not the
        // superuser it must be, and serves nothing rather than run as someone else.
        pgrx::warning!(
            "certyo_cdc: the delivery worker of the database with OID {} is not delivering: the database sets role or session_authorization for every session, so the worker would not run as a superuser; ALTER DATABASE ... RESET role (or session_authorization), then SELECT certyo.wake()",
            database.to_u32()
        );
        return false;
    }
    // Every statement sees what committed before it (READ COMMITTED), whatever a database's
    // owner sets for every session (ALTER DATABASE ... SET default_transaction_isolation):
    // under REPEATABLE READ the catalog reads after the write-back's lock kept the snapshot of
    // the transaction's first statement, so a trigger committed meanwhile was not seen as
    // owner code, and fired in replica mode (an attacker pass of 2026-12-07); and a
    // read-only default would stop every write of the worker.
    set_for_session(c"default_transaction_isolation", c"read committed");
    set_for_session(c"default_transaction_read_only", c"off");
    // The worker's own commits need not wait for the WAL flush: if a crash loses the last of
    // them, what they recorded is redone (a change sent again is answered as a replay, a
    // backfill chunk is queued again from the last key that survived), and WAL order means no
    // later commit survives an earlier lost one. Users' commits are untouched.
    set_for_session(c"synchronous_commit", c"off");
    // Its tables and the rows it writes back to are hot in shared buffers: an index probe costs
    // about what a sequential page read does.
    set_for_session(c"random_page_cost", c"1.1");
    // Its statements are kept (see `prepared`) and each is planned once: they touch a few rows
    // by key or ctid whatever the parameters, so the per-call plans Postgres would otherwise
    // keep making cost planning time and gain nothing. One-shot statements are unaffected.
    set_for_session(c"plan_cache_mode", c"force_generic_plan");
    // No JIT: a statement over a long backlog is estimated above `jit_above_cost`, and the
    // compilation costs more than the few rows it then reads by key. Loading LLVM alone made 7.6
    // MiB of the worker's private memory (a 300 s soak: its RssAnon step from 12 to 23 MiB).
    set_for_session(c"jit", c"off");
    // Write-back to a table that runs no user code is done in replica mode (see
    // `rights::writing_back_as`), and every change of this setting throws away every kept
    // plan: measured, two per pass re-planned all of them. The worker's own tables have no
    // triggers, rules or foreign keys for it to skip; user code always runs in origin mode
    // (`rights::as_role` and `rights::writing_back_as` set it back for the owner's code).
    set_for_session(c"session_replication_role", c"replica");
    true
}

/// The database's name if this worker is to serve it: certyo_cdc is installed there, no other
/// worker serves it, and fewer than `certyo.max_databases` databases are served (if as many
/// are, the log says which database is left out).
fn claim(database: pg_sys::Oid) -> Option<String> {
    let name = match super::installed_in_this_database() {
        Ok(name) => name?, // None: a database without certyo_cdc, nothing to serve
        // An ERROR ends the worker with exit code 1: it is started again in 5 s.
        Err(e) => pgrx::error!("certyo_cdc: cannot tell whether certyo_cdc is installed: {e}"),
    };
    match crate::wake::claim(database, settings::max_databases()) {
        Ok(()) => Some(name),
        Err(crate::wake::Refused::Served) => None,
        Err(crate::wake::Refused::Full) => {
            pgrx::warning!(
                "certyo_cdc: database \"{name}\" is not delivered: certyo.max_databases ({}) databases are served already",
                settings::max_databases()
            );
            None
        }
    }
}

/// Why the main loop ended.
#[derive(PartialEq)]
enum Ended {
    /// SIGTERM.
    Stopped,
    /// `DROP EXTENSION`.
    Dropped,
}

fn set_for_session(name: &std::ffi::CStr, value: &std::ffi::CStr) {
    // SAFETY: valid NUL-terminated strings, in the worker's main thread; an invalid value is
    // raised as ERROR through pgrx's guard.
    unsafe {
        pg_sys::SetConfigOption(
            name.as_ptr(),
            value.as_ptr(),
            pg_sys::GucContext::PGC_USERSET,
            pg_sys::GucSource::PGC_S_SESSION,
        )
    };
}

#[derive(Default)]
struct Worker {
    client: Option<Client>,
    /// Set by a 401/403/404/405 and cleared by a configuration reload: nothing is sent
    /// meanwhile.
    refused: Option<Refusal>,
    /// Certyo seems down: one probe at a time until it answers (`certyo::outage`).
    link: Link,
    last_state: Option<(State, String)>,
    /// The last failed pass's warning and when it was logged.
    last_warning: Option<(String, Instant)>,
    expired_at: Option<Instant>,
    planner: Planner,
    /// A long queue's changes, read once for the passes that drain it.
    backlog: Backlog,
    /// The batch whose HTTP requests are in flight, if any.
    sending: Option<Sending>,
    /// The receipts being verified, if any.
    verifying: Option<anchor::Verifying>,
    /// When the last verification batch started, and whether it was full: a batch that was
    /// not waits [`VERIFY_GATHER`] after it for receipts to gather (see [`Worker::verify`]).
    last_verify: Option<(Instant, bool)>,
    /// Due receipts are left to gather: their due time does not wake the worker.
    verify_gathering: bool,
    /// Changes settled since the worker last vacuumed the queue.
    settled_since_vacuum: i64,
    /// The database served.
    database: pg_sys::Oid,
    /// The slow lane, for write-backs that wait and backfill chunks (`slow_lane.rs`).
    lane: super::slow_lane::SlowLane,
    /// When the worker last looked whether write-backs wait, and found none: an idle pass
    /// does not look again for [`LOOK_AGAIN_AFTER`].
    nothing_waiting_at: Option<Instant>,
    /// A linger was cut short by the answers of the batch in flight: the next pass only
    /// records them (it takes no new batch), and the linger goes on until this deadline.
    settle_only: Option<Instant>,
}

/// How long an idle worker trusts that no write-back waits: only its own passes defer
/// write-backs, but the slow lane and a restart after the hard limit record failures too.
const LOOK_AGAIN_AFTER: Duration = Duration::from_secs(5);

/// What the worker is doing, as `certyo.worker_status().state` shows it (the column's CHECK
/// in `sql/delivery.sql` lists the same names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Idle,
    Delivering,
    Paused,
    NotConfigured,
    Unauthorized,
    Misconfigured,
    Unreachable,
    WriteBackFailing,
}

impl State {
    fn as_str(self) -> &'static str {
        match self {
            State::Idle => "idle",
            State::Delivering => "delivering",
            State::Paused => "paused",
            State::NotConfigured => "not configured",
            State::Unauthorized => "unauthorized",
            State::Misconfigured => "misconfigured",
            State::Unreachable => "unreachable",
            State::WriteBackFailing => "write-back failing",
        }
    }
}

/// Why a pass failed: a statement (its Postgres error is caught by `guarded_pass` as text), or
/// no HTTP client could be built from the settings.
#[derive(Debug)]
enum PassError {
    Database(pgrx::spi::Error),
    Client(String),
}

impl From<pgrx::spi::Error> for PassError {
    fn from(e: pgrx::spi::Error) -> Self {
        PassError::Database(e)
    }
}

impl std::fmt::Display for PassError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PassError::Database(e) => write!(f, "{e}"),
            PassError::Client(e) => write!(f, "cannot build the HTTP client: {e}"),
        }
    }
}

/// Certyo refused the configuration, not a record.
struct Refusal {
    status: u16,
    body: String,
}

impl Refusal {
    /// (state, detail) for `certyo.worker_status()`.
    fn describe(&self) -> (State, String) {
        let answer = format!("HTTP {}: {}", self.status, self.body);
        match self.status {
            401 | 403 => (State::Unauthorized, format!("Certyo refused the API key ({answer}): nothing is sent until the API key (certyo.api_key_file or certyo.api_key) is fixed and reloaded")),
            _ => (State::Misconfigured, format!("Certyo has no such endpoint ({answer}): nothing is sent until certyo.base_url is fixed and reloaded")),
        }
    }
}

/// Receipts verified per batch (each is one request).
const VERIFY_BATCH: usize = 1000;
/// After a batch that was not full, receipts gather this long before the next: a batch's own
/// cost (its statements, the write-back's per table) is then shared by all that fell due
/// meanwhile instead of by the few that fall due within one delivery pass. Verification is
/// due `certyo.verify_min_age` after acceptance (two minutes by default): half a second more
/// is nothing a user sees.
const VERIFY_GATHER: Duration = Duration::from_millis(500);
const EXPIRE_EVERY: Duration = Duration::from_secs(60);

enum Next {
    /// More may be ready: run another pass at once.
    Now,
    Wait(Duration),
    /// Changes trickle in: let commits gather until this deadline (`certyo.linger` after the
    /// pass that took few), or until a full batch (this many changes) has committed, then run
    /// the next pass, so that a busy database gets fewer, larger batches.
    Linger(Instant, usize),
    /// The extension is gone from the database: the worker ends.
    Stop,
}

impl Worker {
    fn run(mut self) -> Ended {
        loop {
            if BackgroundWorker::sighup_received() {
                // SAFETY: the worker's main loop, outside any transaction, as Postgres' own
                // workers reload.
                unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
                crate::api_key::forget();
                self.refused = None;
            }
            let next = match self.guarded_pass() {
                Ok(next) => next,
                Err(e) => {
                    self.warn_once_a_minute(format!(
                        "certyo_cdc: delivery pass failed, retrying: {e}"
                    ));
                    self.announce_failed_pass(&e);
                    Next::Wait(settings::current().poll_interval)
                }
            };
            // User code the pass ran (a backfill condition, an owner's trigger) may have taken
            // session-level advisory locks: they are the pass's, not the worker's, and end
            // with it, as they would with the session of a user who had run that code.
            // SAFETY: the worker's main thread, outside any transaction; releases only
            // advisory (user) locks, as pg_advisory_unlock_all() does.
            unsafe { pg_sys::LockReleaseSession(pg_sys::USER_LOCKMETHOD as pg_sys::LOCKMETHODID) };
            // Backends send their table statistics when idle; a background worker must do it
            // itself, or autovacuum never hears of the rows it deletes and updates (at most
            // once a second: Postgres holds back earlier calls).
            // SAFETY: the worker's main thread, outside any transaction.
            unsafe { pg_sys::pgstat_report_stat(false) };
            let keep_going = match next {
                Next::Now => !super::stopping(),
                Next::Wait(wait) => sleep(wait),
                Next::Linger(deadline, batch) => {
                    match linger(deadline, batch, self.sending.as_ref()) {
                        Lingered::Answered => {
                            self.settle_only = Some(deadline);
                            true
                        }
                        Lingered::Done => true,
                        Lingered::Stopped => false,
                    }
                }
                Next::Stop => {
                    pgrx::log!("certyo_cdc: certyo_cdc was dropped from this database; its delivery worker ends");
                    self.lane.stop();
                    return Ended::Dropped;
                }
            };
            if !keep_going {
                self.lane.stop();
                return Ended::Stopped;
            }
        }
    }

    /// A failure that repeats every pass is logged once a minute, not every second.
    fn warn_once_a_minute(&mut self, message: String) {
        let repeated = self
            .last_warning
            .as_ref()
            .is_some_and(|(m, at)| *m == message && at.elapsed() < Duration::from_secs(60));
        if !repeated {
            pgrx::warning!("{message}");
            self.last_warning = Some((message, Instant::now()));
        }
    }

    /// A failed pass says so in `certyo.worker_status()` (the error in `last_error`), rather
    /// than leaving there what the last pass that worked said ("idle": while every pass
    /// failed, nothing showed it but the log).
    fn announce_failed_pass(&mut self, error: &str) {
        let detail = "the last pass failed (last_error says why); it is tried again every certyo.poll_interval";
        let this = std::panic::AssertUnwindSafe(&mut *self);
        let announced = crate::error::guarded(move || {
            let this = this;
            this.0
                .announce(State::Delivering, detail, Some(error), Tally::default())
                .map_err(|e| e.to_string())
        });
        if let Err(e) = announced {
            // The state cannot be written either (the extension dropped meanwhile, say): the
            // pass's own failure is in the log already.
            pgrx::debug1!("certyo_cdc: could not record the failed pass: {e}");
        }
    }

    /// One pass, with any Postgres error (a table dropped meanwhile, `DROP EXTENSION` between
    /// two statements, a lock timeout) caught: its transaction is aborted and the worker goes
    /// on, instead of exiting and being restarted. Nothing is lost: what was not recorded is
    /// sent again and answered as a replay.
    fn guarded_pass(&mut self) -> Result<Next, String> {
        let this = std::panic::AssertUnwindSafe(&mut *self);
        crate::error::guarded(move || {
            let this = this;
            this.0.pass().map_err(|e| e.to_string())
        })
    }

    fn pass(&mut self) -> Result<Next, PassError> {
        crate::wake::count_pass();
        let settle_only = self.settle_only.take();
        let settings = settings::current();
        let Some(control) = take::control()? else {
            return Ok(Next::Stop); // DROP EXTENSION: nothing left to serve here
        };
        super::after_hard_limit()?;
        write_back::budget::new_pass();
        // Backfills only queue rows, like capture: they go on while sending is paused. Their
        // chunks run owners' conditions and wait for row locks: the slow lane's work, never the
        // delivery worker's (a condition that catches its cancellation would end it at its hard
        // limit, and every table's delivery with it). Without a lane they wait for one.
        // The shared lane runs for as long as the worker does (see `slow_lane`).
        let lane = self.lane.ensure(self.database);
        if control.backfill_open {
            self.lane.ring();
        }
        let blocked = self.blocked(&settings, control);
        // Commits ring only when a pass could send what they queued.
        crate::wake::mute(blocked.is_some() || self.waiting_for_probe().is_some());
        if let Some((state, detail)) = blocked {
            if self.sending.is_some() {
                let client = self.client(&settings)?.clone();
                self.deliver(&client, &settings, false)?;
            }
            self.announce(state, &detail, None, Tally::default())?;
            return Ok(Next::Wait(settings.poll_interval));
        }
        let client = self.client(&settings)?.clone();
        if let Some(wait) = self.waiting_for_probe() {
            if self.sending.is_some() {
                self.deliver(&client, &settings, false)?;
            }
            if let Some((state, detail)) = self.outage_state() {
                self.announce(state, &detail, None, Tally::default())?;
            }
            return Ok(Next::Wait(wait));
        }
        let (delivered, error, more_to_send) =
            self.deliver(&client, &settings, settle_only.is_none())?;
        if let Some((state, detail)) = self.outage_state() {
            self.announce(state, &detail, None, delivered)?;
            return Ok(Next::Now); // the next pass waits for the probe's time
        }
        let (verified, verify_again) = self.verify(&client, &settings)?;
        self.expire(&settings)?;
        let tally = delivered + verified;
        let failing = self.look_after_write_backs(&tally, error.is_none(), &control, lane)?;
        self.announce_pass(failing, error.as_deref(), tally)?;
        self.next_pass(
            &settings,
            delivered,
            more_to_send,
            verify_again,
            settle_only,
        )
    }

    /// Write-backs that failed or wait for the slow lane: start the lanes they need, retry
    /// here what runs no owner's code when no lane can start, and say what fails (None: nothing).
    fn look_after_write_backs(
        &mut self,
        tally: &Tally,
        no_error: bool,
        control: &take::Control,
        lane: bool,
    ) -> Result<Option<String>, PassError> {
        // One statement, skipped by an idle pass that looked a moment ago and found nothing
        // (it doubled the CPU of an idle worker).
        let idle = tally.sent + tally.verified == 0 && no_error;
        let recently_clear = idle
            && self
                .nothing_waiting_at
                .is_some_and(|at| at.elapsed() < LOOK_AGAIN_AFTER);
        let (waiting, mut failing) = if recently_clear {
            (false, None)
        } else {
            let found = write_back::failing::look()?;
            self.nothing_waiting_at = (!found.0 && found.1.is_none()).then(Instant::now);
            found
        };
        let left = write_back::failing::left_to_the_lane();
        if waiting && super::owners::any_slow() {
            // One owner's slow code has a lane of its own: it delays that owner's tables only.
            self.lane.ensure_slow_owners(self.database);
        }
        if (waiting || control.backfill_open) && !lane {
            // No slow lane could start: the worker retries what runs no owner's code itself,
            // and says what waits for a slot.
            if waiting {
                write_back::failing::retry_due()?;
                failing = write_back::failing::look()?.1;
            }
            let slot = "no background worker slot is free for the slow lane (max_worker_processes, shared with parallel query): write-backs that run owners' code and backfills wait for one";
            failing = Some(match failing {
                Some(failing) => format!("{failing}; {slot}"),
                None => slot.to_string(),
            });
        } else if left {
            self.lane.ring();
        }
        Ok(failing)
    }

    /// What the pass did, for `certyo.worker_status()`: failing write-backs first (never "idle"
    /// while something fails), else idle or delivering.
    fn announce_pass(
        &mut self,
        failing: Option<String>,
        error: Option<&str>,
        tally: Tally,
    ) -> Result<(), PassError> {
        if let Some(failing) = failing {
            // Never "idle" while something fails: name the table and the error.
            self.announce(State::WriteBackFailing, &failing, error, tally)?;
        } else if tally.sent + tally.verified == 0
            && error.is_none()
            && self.verifying.is_none()
            && self.sending.is_none()
        {
            self.announce(State::Idle, "waiting for changes", None, tally)?;
        } else {
            let detail = format!(
                "delivered {} of {}, verified {} ({} anchored) in the last pass{}",
                tally.accepted,
                tally.sent,
                tally.verified,
                tally.anchored,
                match (self.sending.is_some(), self.verifying.is_some()) {
                    (true, true) => "; a batch and verification requests in flight",
                    (true, false) => "; a batch in flight",
                    (false, true) => "; verification requests in flight",
                    (false, false) => "",
                }
            );
            self.announce(State::Delivering, &detail, error, tally)?;
        }
        Ok(())
    }

    /// When the next pass runs: at once while there is more to send or verify (after a linger
    /// when only a trickle came), else when the next retry, verification or write-back is due.
    fn next_pass(
        &self,
        settings: &Settings,
        delivered: Tally,
        more_to_send: bool,
        verify_again: Option<Duration>,
        settle_only: Option<Instant>,
    ) -> Result<Next, PassError> {
        if more_to_send || verify_again == Some(Duration::ZERO) {
            // A pass that took only a few changes while writers keep committing costs nearly as
            // much as a full one: wait a moment for more.
            let trickling =
                delivered.sent > 0 && (delivered.sent as usize) < settings.batch_size / 4;
            return Ok(if trickling && !settings.linger.is_zero() {
                let deadline = settle_only.unwrap_or_else(|| Instant::now() + settings.linger);
                Next::Linger(deadline, settings.batch_size)
            } else {
                Next::Now
            });
        }
        let mut due = take::next_due(self.verifying.is_some() || self.verify_gathering)?
            .unwrap_or(settings.poll_interval);
        if let Some(again) = verify_again {
            due = due.min(again);
        }
        if let Some(retry) = write_back::failing::next_retry_in() {
            due = due.min(retry);
        }
        Ok(Next::Wait(due.min(settings.poll_interval)))
    }

    /// Why nothing may be sent now, if anything stops it: (state, detail).
    fn blocked(&self, settings: &Settings, control: take::Control) -> Option<(State, String)> {
        if control.paused {
            return Some((State::Paused, "paused by certyo.pause(): changes are captured but not sent; certyo.resume() resumes".into()));
        }
        if !settings.enabled {
            return Some((
                State::Paused,
                "certyo.enabled is off: changes are captured but not sent".into(),
            ));
        }
        if let Some(missing) = settings.missing() {
            return Some((State::NotConfigured, missing));
        }
        self.refused.as_ref().map(Refusal::describe)
    }

    /// During an outage, how long until the next probe (None: no outage, or a probe is due).
    fn waiting_for_probe(&self) -> Option<Duration> {
        self.link.waiting_for_probe()
    }

    fn outage_state(&self) -> Option<(State, String)> {
        Some((State::Unreachable, self.link.describe()?))
    }

    /// After a batch's answers: a batch that failed transiently as a whole starts (or prolongs)
    /// an outage; any real answer ends it and releases the backlog.
    fn note_service(&mut self, outcomes: &[Outcome], cap: Duration) -> Result<(), PassError> {
        match self.link.note(outcomes, cap) {
            Change::Started(error) => pgrx::log!("certyo_cdc: Certyo does not answer ({error}); probing it with one change at a time until it does"),
            Change::Ended => {
                pgrx::log!("certyo_cdc: Certyo answers again; delivering the backlog");
                record::release_backlog()?;
            }
            Change::Prolonged | Change::Unchanged => {}
        }
        Ok(())
    }

    /// Take the next batch (leaving the one in flight alone), collect the answers for the
    /// batch in flight, start sending the new one, and record the answers meanwhile. With
    /// `take_more` false (sending is paused or refused) only the batch in flight is settled.
    /// Returns the tally, the first error met, and whether more may be ready at once.
    fn deliver(
        &mut self,
        client: &Client,
        settings: &Settings,
        take_more: bool,
    ) -> Result<(Tally, Option<String>, bool), PassError> {
        let started = Instant::now();
        let batch = if take_more {
            self.take_batch(settings)?
        } else {
            Vec::new()
        };
        let taken = started.elapsed();
        let finishing = self.sending.take();
        let sent_with = finishing.as_ref().map(|s| s.config.clone());
        let answered = finishing.and_then(Sending::finish);
        let waited = started.elapsed();
        if !batch.is_empty() && !super::stopping() {
            self.sending = Some(Sending::start(client, settings, batch));
        }
        let Some((sent, outcomes)) = answered else {
            return Ok((Tally::default(), None, self.sending.is_some()));
        };
        if let Some(config) = &sent_with {
            self.note_refusal(config, outcomes.iter());
        }
        self.note_service(&outcomes, settings.max_retry_interval)?;
        warn_of_conflicts(&sent, &outcomes);
        let error = first_error(&outcomes);
        let results: Vec<(Entry, Outcome)> = sent.into_iter().zip(outcomes).collect();
        let (tally, times) = record::answers(
            &results,
            &|entry| {
                next_attempt_delay(
                    entry.attempts.max(0) as u32 + 1,
                    jitter(),
                    settings.max_retry_interval,
                )
            },
            settings.verify_min_age,
            &mut self.planner,
        )?;
        self.settle_backlog(&results);
        // Where a pass spends its time, for whoever tunes batch sizes (log_min_messages = debug1).
        pgrx::debug1!(
            "certyo_cdc: delivered {} of {}: take {:.3} ms, wait for answers {:.3} ms, record {:.3} ms (receipts {:.3} ms, write-back {:.3} ms, commit {:.3} ms)",
            tally.accepted,
            tally.sent,
            ms(taken),
            ms(waited - taken),
            ms(started.elapsed() - waited),
            ms(times.receipts),
            ms(times.write_back),
            ms(times.commit),
        );
        // Every answer settled counts, also those a pass that takes nothing new settles (paused,
        // in an outage): the queue rows they delete are dead all the same. (Changes sent from
        // certyo.delivery delete no queue row: they bring the vacuum a little early.)
        self.settled_since_vacuum += tally.sent;
        if self.settled_since_vacuum >= super::vacuum::AFTER {
            self.settled_since_vacuum = 0;
            super::vacuum::queue();
        }
        Ok((tally, error, tally.accepted > 0 || self.sending.is_some()))
    }

    /// The next batch to send, beside the one in flight: during an outage one probe, and only
    /// when no batch is in flight.
    fn take_batch(&mut self, settings: &Settings) -> Result<Vec<Entry>, PassError> {
        let in_flight = self.sending.as_ref().map(Sending::ids).unwrap_or_default();
        let probing = self.link.probing();
        if probing && !in_flight.is_empty() {
            return Ok(Vec::new());
        }
        let limit = take::BatchLimit {
            changes: if probing { 1 } else { settings.batch_size },
            bytes: settings.max_payload_size,
        };
        Ok(take::batch(
            limit,
            &in_flight,
            probing,
            &mut self.planner,
            &mut self.backlog,
        )?)
    }

    /// Anything but an acceptance now waits in certyo.delivery, which keeps each record's
    /// order from here on: the list of a long queue cannot.
    fn settle_backlog(&mut self, results: &[(Entry, Outcome)]) {
        if results
            .iter()
            .all(|(_, o)| matches!(o, Outcome::Accepted(_)))
        {
            let ids: Vec<i64> = results.iter().map(|(e, _)| e.id).collect();
            self.backlog.settle(&ids);
        } else {
            self.backlog.clear();
        }
    }

    /// Verification on a helper thread: record what a finished batch found, or start the
    /// next batch of due receipts. Returns the tally and when to look again (zero: at once).
    fn verify(
        &mut self,
        client: &Client,
        settings: &Settings,
    ) -> Result<(Tally, Option<Duration>), PassError> {
        if let Some(verifying) = self.verifying.as_mut() {
            // Still running: its thread wakes the worker when it is done (see `sleep`).
            let Some(results) = verifying.try_finish() else {
                return Ok((Tally::default(), None));
            };
            let asked_with = verifying.config.clone();
            self.verifying = None;
            self.note_refusal(
                &asked_with,
                results.iter().filter_map(|(_, found)| match found {
                    Verification::Failed(outcome) => Some(outcome),
                    _ => None,
                }),
            );
            let schedule = anchor::Schedule {
                interval: settings.verify_interval,
                anchor_timeout: settings.anchor_timeout,
            };
            let tally = anchor::record(&results, schedule)?;
            return Ok((tally, Some(Duration::ZERO)));
        }
        if let Some((started, false)) = self.last_verify {
            let left = VERIFY_GATHER.saturating_sub(started.elapsed());
            if !left.is_zero() {
                self.verify_gathering = true;
                return Ok((Tally::default(), Some(left)));
            }
        }
        self.verify_gathering = false;
        let anchor::Taken { due, taken } = anchor::take_due(VERIFY_BATCH, settings.verify)?;
        let full = taken == VERIFY_BATCH;
        if due.is_empty() {
            // All superseded (marked so): a full batch may have more due behind it.
            return Ok((Tally::default(), full.then_some(Duration::ZERO)));
        }
        self.last_verify = Some((Instant::now(), full));
        self.verifying = Some(anchor::Verifying::start(
            client,
            &settings.tenant_id,
            &settings.database_name,
            due,
        ));
        Ok((Tally::default(), None))
    }

    /// Remember a refusal of the configuration: nothing is sent until it is reloaded. Work
    /// that went out with a configuration since replaced (a reload fixed `certyo.base_url`
    /// while it was in flight) refuses only the old one: its answer must not stop the fixed
    /// configuration until the next reload.
    fn note_refusal<'a>(
        &mut self,
        sent_with: &ClientConfig,
        outcomes: impl Iterator<Item = &'a Outcome>,
    ) {
        if self.client.as_ref().map(Client::config) != Some(sent_with) {
            return;
        }
        for outcome in outcomes {
            if let Outcome::Refused { status, body } = outcome {
                let refusal = Refusal {
                    status: *status,
                    body: body.chars().take(200).collect(),
                };
                pgrx::warning!("certyo_cdc: {}", refusal.describe().1);
                self.refused = Some(refusal);
                return;
            }
        }
    }

    /// Receipts that are no longer needed go, at most once a minute (the scan is not free).
    fn expire(&mut self, settings: &Settings) -> Result<(), PassError> {
        if self
            .expired_at
            .is_some_and(|at| at.elapsed() < EXPIRE_EVERY)
        {
            return Ok(());
        }
        self.expired_at = Some(Instant::now());
        Ok(record::expire(settings.retention)?)
    }

    /// The HTTP client, built on first use and again when its settings change.
    fn client(&mut self, settings: &Settings) -> Result<&Client, PassError> {
        let wanted = ClientConfig {
            base_url: settings.base_url.clone(),
            api_key: settings.api_key.clone(),
            timeout: settings.request_timeout,
            max_rate_limit_retries: settings.max_rate_limit_retries,
            user_agent: concat!("certyo_cdc/", env!("CARGO_PKG_VERSION")).into(),
        };
        if self.client.as_ref().map(Client::config) != Some(&wanted) {
            self.client = None;
            let client = with_signals_blocked(|| Client::new(wanted));
            self.client = Some(client.map_err(|e| PassError::Client(e.to_string()))?);
        }
        self.client
            .as_ref()
            .ok_or_else(|| PassError::Client("no HTTP client".into()))
    }

    /// Publish the state when it changes, or when there are results to count.
    fn announce(
        &mut self,
        state: State,
        detail: &str,
        error: Option<&str>,
        tally: Tally,
    ) -> Result<(), PassError> {
        let key = (state, detail.to_string());
        if self.last_state.as_ref() == Some(&key)
            && tally.sent + tally.verified == 0
            && error.is_none()
        {
            return Ok(());
        }
        let changed = self.last_state.as_ref().map(|s| s.0) != Some(state);
        if changed && !matches!(state, State::Delivering | State::Idle) {
            pgrx::log!("certyo_cdc: delivery {}: {detail}", state.as_str());
        }
        self.last_state = Some(key);
        Ok(record::set_state(state.as_str(), detail, error, tally)?)
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// How a linger ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lingered {
    /// Its deadline passed, or a full batch has committed.
    Done,
    /// The batch in flight was answered: its answers are recorded before the linger goes on,
    /// so that lingering delays the next batch, not the acceptance of the one sent.
    Answered,
    /// SIGTERM.
    Stopped,
}

/// Linger after a pass that took only a few changes: a pass has a fixed cost (a dozen
/// statements, two commits), so while writers keep committing, waiting until `deadline` for
/// more buys far fewer passes and leaves the CPU to the writers. Commits meanwhile do not ring
/// the worker until `batch` changes have committed (a full batch: no reason to wait longer),
/// so the wait costs neither side a wake-up per commit. The wait is on the latch (SIGTERM,
/// `certyo.wake()` and the postmaster's death end it too) and on the helper threads' eventfd,
/// so that the answers of the batch `in_flight` are recorded as soon as they are there.
fn linger(deadline: Instant, batch: usize, in_flight: Option<&Sending>) -> Lingered {
    crate::wake::ring_after(batch as u64);
    let fd = if in_flight.is_some() {
        super::sending::finished_fd()
    } else {
        -1
    };
    let mut lingered = Lingered::Done;
    loop {
        if in_flight.is_some_and(Sending::answered) {
            lingered = Lingered::Answered;
            break;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || super::stopping() || crate::wake::gathered() {
            break;
        }
        wait_on_latch(left.max(Duration::from_millis(1)), fd);
        // SIGHUP sets the latch too: the reload waits for the main loop, at most a linger.
        pgrx::check_for_interrupts!();
    }
    crate::wake::ring_every_commit();
    if super::stopping() {
        Lingered::Stopped
    } else {
        lingered
    }
}

/// Sleep on the latch until `timeout`, a commit's doorbell, a signal, or a helper thread
/// finishing (it writes to an eventfd the wait also watches: threads never touch Postgres).
/// False when the worker must stop. Postmaster death ends the process.
fn sleep(timeout: Duration) -> bool {
    wait_on_latch(timeout, super::sending::finished_fd());
    pgrx::check_for_interrupts!();
    !super::stopping()
}

/// Wait on the worker's latch up to `timeout`, and on the helper threads' eventfd `fd` (-1: not
/// watched); then take what the threads finished. Postmaster death ends the process.
fn wait_on_latch(timeout: Duration, fd: i32) {
    let mut events = pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH;
    if fd >= 0 {
        events |= pg_sys::WL_SOCKET_READABLE;
    }
    let millis = timeout.as_millis().min(i32::MAX as u128) as std::ffi::c_long;
    // SAFETY: the worker's own latch, in its main thread, outside any transaction; `fd` is an
    // eventfd this process owns for its lifetime (or -1, then not watched).
    unsafe {
        pg_sys::WaitLatchOrSocket(
            pg_sys::MyLatch,
            events as i32,
            fd,
            millis,
            pg_sys::PG_WAIT_EXTENSION,
        );
        pg_sys::ResetLatch(pg_sys::MyLatch);
    }
    super::sending::drain_finished();
}

/// The error a batch's answers report, for `certyo.worker_status()`: the first transient
/// failure or rejection.
fn first_error(outcomes: &[Outcome]) -> Option<String> {
    outcomes.iter().find_map(|o| match o {
        Outcome::Transient(e) => Some(e.clone()),
        Outcome::Rejected { status, body } => Some(format!("HTTP {status}: {body}")),
        _ => None,
    })
}

/// Changes Certyo answered as replays of other records' changes: loudly, once per batch. They
/// are dead letters (see `Outcome::Conflict`); none is marked with the other record's hash.
fn warn_of_conflicts(sent: &[Entry], outcomes: &[Outcome]) {
    let conflicts: Vec<(&Entry, &certyo::Receipt)> = sent
        .iter()
        .zip(outcomes)
        .filter_map(|(entry, outcome)| match outcome {
            Outcome::Conflict { receipt } => Some((entry, receipt)),
            _ => None,
        })
        .collect();
    if let Some((entry, receipt)) = conflicts.first() {
        pgrx::warning!(
            "certyo_cdc: {} change(s) answered by Certyo as replays of other records' changes, kept as dead letters; the first: {} record {}: {}",
            conflicts.len(),
            entry.collection,
            entry.record_id,
            Outcome::conflict_message(receipt, &entry.idempotency_key)
        );
    }
}
