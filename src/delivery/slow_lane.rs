//! The slow lane: a second background worker of a database, for the work that runs owners'
//! code for as long as `certyo.user_code_timeout` allows, so that it never holds up delivery.
//!
//! The delivery worker sends nothing while a statement of its own runs. So it runs no owner's
//! code: a table whose write-back would run some (origin mode), or whose write-back waited
//! for locks longer than its owner's share of a pass (`write_back::budget`), or failed, waits
//! in `certyo.write_back_failure`, and backfill chunks (an owner's condition, row locks) are
//! never its work. The slow lane does both, with back-off, one statement at a time: one
//! owner's slow triggers or conditions delay that owner's tables (and the slow lane's other
//! work), never another owner's delivery.
//!
//! The delivery worker starts the lane with itself (it is a dynamic background worker, like
//! the delivery worker itself, and keeps one of `max_worker_processes` for the worker's life),
//! and wakes it when it leaves it write-backs or a backfill is open; the lane ends when the
//! delivery worker ends or the extension is dropped. A second lane, for slow owners
//! (`Lane::SlowOwners`), runs while their write-backs wait, and ends after 30 s without. Should no slot be free,
//! the delivery worker does the lane's replica-mode write-backs itself meanwhile (they run no
//! owner's code); backfills and write-backs that run owners' code wait for a lane.

use super::write_back;
use crate::settings;
use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BackgroundWorkerStatus, DynamicBackgroundWorker,
    SignalWakeFlags,
};
use pgrx::pg_sys;
use std::time::{Duration, Instant};

/// How long the slow owners' lane stays with nothing to do before it ends (the shared lane
/// stays).
const IDLE_FOR: Duration = Duration::from_secs(30);
/// How often an idle lane looks for work by itself.
const IDLE_LOOK: Duration = Duration::from_secs(10);
/// After no slot was free, how long before the delivery worker tries to start a lane again.
const NO_SLOT_FOR: Duration = Duration::from_secs(10);
/// The lanes of a database.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lane {
    /// Write-backs that wait (of every owner that is not slow) and backfill chunks.
    Shared,
    /// The write-backs of owners whose code has taken much of the lanes' time lately
    /// (`super::owners`): one owner's slow triggers delay that owner's tables only.
    SlowOwners,
}

impl Lane {
    /// The lane's `backend_type`, as `pg_stat_activity` shows it.
    pub fn backend_type(self) -> &'static str {
        match self {
            Lane::Shared => "certyo_cdc slow lane",
            Lane::SlowOwners => "certyo_cdc slow owners' lane",
        }
    }

    /// The lane's argument: the database's OID in the low 32 bits, the lane above them.
    fn argument(self, database: pg_sys::Oid) -> pg_sys::Datum {
        let lane: u64 = match self {
            Lane::Shared => 0,
            Lane::SlowOwners => 1,
        };
        pg_sys::Datum::from(u64::from(database.to_u32()) | lane << 32)
    }

    fn of_argument(arg: pg_sys::Datum) -> (Lane, pg_sys::Oid) {
        let value = arg.value() as u64;
        let lane = if value >> 32 == 1 {
            Lane::SlowOwners
        } else {
            Lane::Shared
        };
        (lane, pg_sys::Oid::from(value as u32))
    }
}

thread_local! {
    static THIS: std::cell::Cell<Option<Lane>> = const { std::cell::Cell::new(None) };
}

/// The lane this process is; None: the delivery worker.
pub fn this() -> Option<Lane> {
    THIS.get()
}

/// The delivery worker's handles on its lanes.
#[derive(Default)]
pub struct SlowLane {
    shared: LaneHandle,
    slow_owners: LaneHandle,
}

#[derive(Default)]
struct LaneHandle {
    worker: Option<DynamicBackgroundWorker>,
    no_slot_until: Option<Instant>,
}

impl SlowLane {
    /// The shared lane runs (or is starting) for `database`: true. False when none could be
    /// started, and the caller does the slow work that runs no owner's code itself.
    pub fn ensure(&mut self, database: pg_sys::Oid) -> bool {
        self.shared.ensure(database, Lane::Shared)
    }

    /// Start the slow owners' lane if it does not run (some owner is slow, and write-backs wait).
    /// If it cannot start, the shared lane does their write-backs meanwhile.
    pub fn ensure_slow_owners(&mut self, database: pg_sys::Oid) {
        let runs = self.slow_owners.ensure(database, Lane::SlowOwners);
        super::owners::no_slow_owners_lane((!runs).then_some(NO_SLOT_FOR + Duration::from_secs(1)));
    }

    /// Wake the lanes at once: the delivery worker has just left them write-backs.
    pub fn ring(&self) {
        self.shared.ring();
        self.slow_owners.ring();
    }

    /// End the lanes, and wait until they have ended (the delivery worker is ending).
    pub fn stop(&mut self) {
        self.shared.stop();
        self.slow_owners.stop();
    }
}

impl LaneHandle {
    fn ensure(&mut self, database: pg_sys::Oid, lane: Lane) -> bool {
        // Registered but not yet forked counts as running: another would be a second lane.
        let alive = |worker: &DynamicBackgroundWorker| {
            matches!(
                worker.pid(),
                Ok(_) | Err(BackgroundWorkerStatus::NotYetStarted)
            )
        };
        if self.worker.as_ref().is_some_and(alive) {
            return true;
        }
        self.worker = None;
        if self
            .no_slot_until
            .is_some_and(|until| Instant::now() < until)
        {
            return false;
        }
        let started = BackgroundWorkerBuilder::new(lane.backend_type())
            .set_type(lane.backend_type())
            .set_library("certyo_cdc")
            .set_function("certyo_slow_lane_main")
            .enable_spi_access()
            .set_argument(Some(lane.argument(database)))
            // SAFETY: a plain read of a Postgres global: the postmaster tells this worker when
            // the lane starts and ends (for `stop`).
            .set_notify_pid(unsafe { pg_sys::MyProcPid })
            .set_restart_time(None)
            .load_dynamic();
        match started {
            Ok(worker) => {
                // Not waited for: it finds its work in the tables.
                self.worker = Some(worker);
                true
            }
            Err(_) if lane == Lane::SlowOwners => {
                pgrx::log!("certyo_cdc: no background worker slot is free for the slow owners' lane (max_worker_processes): the slow lane does their write-backs meanwhile, after the others'");
                self.no_slot_until = Some(Instant::now() + NO_SLOT_FOR);
                false
            }
            Err(_) => {
                pgrx::log!("certyo_cdc: no background worker slot is free for the slow lane (max_worker_processes): backfills and write-backs that run owners' code wait for one");
                self.no_slot_until = Some(Instant::now() + NO_SLOT_FOR);
                false
            }
        }
    }

    fn ring(&self) {
        let Some(Ok(pid)) = self.worker.as_ref().map(DynamicBackgroundWorker::pid) else {
            return;
        };
        // SAFETY: looks the lane's PGPROC up by its process id (NULL once it has ended; the
        // array of PGPROCs is in shared memory for the server's life), and sets its latch,
        // which any process may do.
        unsafe {
            let lane = pg_sys::BackendPidGetProc(pid as std::ffi::c_int);
            if !lane.is_null() {
                pg_sys::SetLatch(&raw mut (*lane).procLatch);
            }
        }
    }

    fn stop(&mut self) {
        if let Some(worker) = self.worker.take() {
            if let Err(status) = worker.terminate().wait_for_shutdown() {
                // It had ended already, or the postmaster is gone: nothing left to wait for.
                pgrx::debug1!("certyo_cdc: the slow lane's end was not awaited: {status:?}");
            }
        }
    }
}

/// Entry point, named in the lane's registration; its argument is the database's OID and
/// which lane (`Lane::argument`).
#[pgrx::pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn certyo_slow_lane_main(arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    // SIGTERM also ends owners' code that runs when it arrives; owners' code has a hard limit.
    crate::hard_limit::install();
    let (lane, database) = Lane::of_argument(arg);
    THIS.set(Some(lane));
    if crate::wake::is_dropped(database) {
        return;
    }
    BackgroundWorker::connect_worker_to_spi_by_oid(Some(database), None);
    if !super::worker::prepare_session(database) || another_lane_runs(lane) {
        return;
    }
    let mut idle_since = Instant::now();
    loop {
        if super::stopping() || !crate::wake::served().contains(&database) {
            return; // the delivery worker ended: so does its lane
        }
        if BackgroundWorker::sighup_received() {
            // SAFETY: the lane's main loop, outside any transaction.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
        let worked = crate::error::guarded(|| lane_pass(lane).map_err(|e| e.to_string()));
        // Advisory locks taken by owners' code end with the pass (see `worker.rs`).
        // SAFETY: the lane's main thread, outside any transaction.
        unsafe { pg_sys::LockReleaseSession(pg_sys::USER_LOCKMETHOD as pg_sys::LOCKMETHODID) };
        // SAFETY: the lane's main thread, outside any transaction.
        unsafe { pg_sys::pgstat_report_stat(false) };
        let idle = matches!(worked, Ok(Some(Work::None)));
        match worked {
            Ok(Some(Work::More)) => {
                idle_since = Instant::now();
                continue;
            }
            Ok(Some(Work::Waiting)) => idle_since = Instant::now(),
            // The shared lane keeps its background worker slot for the delivery worker's life:
            // ended when idle, its slot went to whoever asked next, and a LOGIN role's parallel
            // queries (which use the same slots) kept every lane out, and with it every
            // other owner's write-backs and backfills (an attacker pass of 2026-12-06).
            Ok(Some(Work::None))
                if lane == Lane::SlowOwners && idle_since.elapsed() >= IDLE_FOR =>
            {
                return
            }
            Ok(Some(Work::None)) => {}
            Ok(None) => return, // DROP EXTENSION
            Err(e) => pgrx::warning!("certyo_cdc: slow lane pass failed, retrying: {e}"),
        }
        // Idle, it waits to be rung (the delivery worker rings when it leaves it work, and
        // while a backfill is open), looking by itself only now and then.
        let mut wait = if idle {
            IDLE_LOOK
        } else {
            settings::current().poll_interval
        };
        if let Some(retry) = write_back::failing::next_retry_in() {
            wait = wait.min(retry);
        }
        if let Some(retry) =
            crate::backfill::locked::next_attempt_in().filter(|_| lane == Lane::Shared)
        {
            wait = wait.min(retry);
        }
        if !BackgroundWorker::wait_latch(Some(wait.max(Duration::from_millis(10)))) {
            return; // postmaster death
        }
    }
}

enum Work {
    /// More may be ready at once.
    More,
    /// Work waits for its time (back-off).
    Waiting,
    /// Nothing to do.
    None,
}

/// One pass of the lane: the write-backs whose retry is due, then a backfill chunk (the shared
/// lane's). None once the extension is gone from the database.
fn lane_pass(lane: Lane) -> Result<Option<Work>, pgrx::spi::Error> {
    let Some(control) = super::take::control()? else {
        return Ok(None);
    };
    super::after_hard_limit()?;
    let settings = settings::current();
    // Write-backs first: a backfill whose condition ends the lane at its hard limit must not
    // keep the lane from them.
    write_back::failing::retry_due()?;
    let backfills = lane == Lane::Shared && control.backfill_open;
    let more = backfills && crate::backfill::step(settings.backfill_chunk_size)?;
    let waiting = write_back::failing::next_retry_in().is_some()
        || (backfills && crate::backfill::locked::next_attempt_in().is_some());
    Ok(Some(if more {
        Work::More
    } else if waiting {
        Work::Waiting
    } else {
        Work::None
    }))
}

/// Whether another process is `lane` of this database, in the caller's transaction.
fn runs(lane: Lane) -> Result<bool, pgrx::spi::Error> {
    Ok(pgrx::Spi::get_one_with_args::<bool>(
        "SELECT EXISTS (SELECT FROM pg_catalog.pg_stat_activity
                         WHERE backend_type = $1 AND datname = pg_catalog.current_database()
                           AND pid <> pg_catalog.pg_backend_pid())",
        &[lane.backend_type().into()],
    )?
    .unwrap_or(false))
}

/// Another lane serves this database already (one left by a delivery worker that crashed).
fn another_lane_runs(lane: Lane) -> bool {
    crate::error::transaction(|| runs(lane).map(Some))
    .unwrap_or_else(|e| {
        pgrx::warning!("certyo_cdc: the slow lane cannot tell whether another lane serves this database, and ends: {e}");
        Some(true)
    })
    .unwrap_or(false)
}
