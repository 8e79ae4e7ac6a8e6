//! The launcher: one background worker, connected to no database, started with the server. It
//! starts a delivery worker (`worker.rs`) for each database that accepts connections; a worker
//! in a database without certyo_cdc ends at once, one with it stays and delivers. Afterwards
//! the launcher sleeps on its latch, which `CREATE EXTENSION certyo_cdc` and `CREATE DATABASE`
//! set when they commit (as do a failed `DROP DATABASE`, whose worker was stopped first, a
//! worker ended by `pg_terminate_backend`, and `certyo.wake()` where no worker runs): it
//! then starts a worker for each database that has none. So a database gets its delivery
//! without a restart, and a database without the extension costs one short-lived process at
//! server start (and at each such request), not a connection kept open.

use crate::settings;
use pgrx::bgworkers::{
    BackgroundWorker, BackgroundWorkerBuilder, BackgroundWorkerStatus, DynamicBackgroundWorker,
    SignalWakeFlags,
};
use pgrx::pg_sys;
use std::collections::{HashMap, HashSet};
use std::ffi::CStr;
use std::time::{Duration, Instant};

/// How long to wait before trying again to start workers that found no free background-worker
/// slot (max_worker_processes).
const RETRY_FULL: Duration = Duration::from_secs(10);
/// While a wanted database's previous worker is still ending: the postmaster's notification
/// wakes the launcher, and this is the fallback.
const RECHECK: Duration = Duration::from_secs(1);
/// Requests are served at most this often.
const LOOK_AT_MOST_EVERY: Duration = Duration::from_secs(1);
/// A repeated "no free slot" is logged at most this often.
const WARN_AT_MOST_EVERY: Duration = Duration::from_secs(60);

/// Register the launcher; only possible while the postmaster loads `shared_preload_libraries`.
pub fn register() {
    BackgroundWorkerBuilder::new("certyo_cdc launcher")
        .set_type("certyo_cdc launcher")
        .set_library("certyo_cdc")
        .set_function("certyo_launcher_main")
        .enable_spi_access()
        .set_restart_time(Some(Duration::from_secs(5)))
        .load();
}

/// Entry point, named in the launcher's registration.
#[pgrx::pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn certyo_launcher_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    // No database: the launcher reads only the shared catalog pg_database.
    BackgroundWorker::connect_worker_to_spi(None, None);
    // SAFETY: the launcher is connected, so its PGPROC is set up.
    crate::wake::set_launcher(Some(unsafe { crate::compat::my_proc_number() }));
    let mut launcher = Launcher::default();
    // At start every database is looked at; later, at each request, at most once a second.
    let mut seen = None;
    let mut looked: Option<Instant> = None;
    while !super::stopping() {
        if BackgroundWorker::sighup_received() {
            // SAFETY: the launcher's main loop, outside any transaction.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
        let requests = crate::wake::launcher_requests();
        let mut wake_in = launcher.start_wanted();
        if seen != Some(requests) {
            let since = looked.map_or(LOOK_AT_MOST_EVERY, |at| at.elapsed());
            if since < LOOK_AT_MOST_EVERY {
                // Requests arriving faster are taken together, a second after the last look:
                // a flood of them cannot make the launcher fork without pause.
                let left = LOOK_AT_MOST_EVERY - since;
                wake_in = Some(wake_in.map_or(left, |w| w.min(left)));
            } else {
                seen = Some(requests);
                looked = Some(Instant::now());
                launcher
                    .wanted
                    .extend(databases().into_iter().map(|(oid, _)| oid));
                wake_in = launcher.start_wanted();
            }
        }
        wait(wake_in);
    }
    crate::wake::set_launcher(None);
}

#[derive(Default)]
struct Launcher {
    /// The workers this launcher started, by database: one is not started again while it
    /// lives (or waits to be restarted after an error).
    started: HashMap<pg_sys::Oid, DynamicBackgroundWorker>,
    /// Databases to start a worker for: all at start, all again at each request. One whose
    /// previous worker is still ending waits here until the postmaster says it has ended
    /// (workers are started with the launcher as the process to notify).
    wanted: HashSet<pg_sys::Oid>,
    /// When "no free slot" was last logged: once a minute at most, not per retry.
    warned_full: Option<Instant>,
}

impl Launcher {
    /// Start a worker for each wanted database that needs one. Returns how long to wait at
    /// most before looking again (None: until the next request or notification).
    fn start_wanted(&mut self) -> Option<Duration> {
        if self.wanted.is_empty() {
            return None;
        }
        let only = settings::only_database();
        let served = crate::wake::served();
        let present = databases();
        let mut short = Vec::new();
        for (database, name) in &present {
            let (database, name) = (*database, name.as_str());
            if !self.wanted.contains(&database) {
                continue;
            }
            if only.as_deref().is_some_and(|only| only != name)
                || served.contains(&database)
                || crate::wake::is_dropped(database)
            {
                self.wanted.remove(&database);
                continue;
            }
            if self.started.get(&database).is_some_and(alive) {
                continue; // still starting or ending: looked at again when it has
            }
            match start(database, name) {
                Ok(worker) => {
                    self.started.insert(database, worker);
                    self.wanted.remove(&database);
                }
                Err(()) => short.push(name.to_string()),
            }
        }
        // Databases gone from pg_database are wanted no more.
        let present: HashSet<pg_sys::Oid> = present.into_iter().map(|(oid, _)| oid).collect();
        self.wanted.retain(|d| present.contains(d));
        self.started.retain(|d, _| present.contains(d));
        if !short.is_empty()
            && self
                .warned_full
                .is_none_or(|at| at.elapsed() >= WARN_AT_MOST_EVERY)
        {
            self.warned_full = Some(Instant::now());
            pgrx::warning!(
                "certyo_cdc: no free background worker slot to start delivery for database(s) {}: raise max_worker_processes (restart); trying again every {} s",
                short.join(", "),
                RETRY_FULL.as_secs()
            );
        }
        if !short.is_empty() {
            Some(RETRY_FULL)
        } else if !self.wanted.is_empty() {
            Some(RECHECK)
        } else {
            None
        }
    }
}

fn alive(worker: &DynamicBackgroundWorker) -> bool {
    !matches!(
        worker.pid(),
        Err(BackgroundWorkerStatus::Stopped | BackgroundWorkerStatus::PostmasterDied)
    )
}

fn start(database: pg_sys::Oid, name: &str) -> Result<DynamicBackgroundWorker, ()> {
    BackgroundWorkerBuilder::new(&format!("certyo_cdc delivery for {name}"))
        .set_type("certyo_cdc delivery")
        .set_library("certyo_cdc")
        .set_function("certyo_delivery_main")
        .enable_spi_access()
        .set_argument(Some(pg_sys::Datum::from(database.to_u32())))
        // SAFETY: a plain read of a Postgres global. The postmaster sets the launcher's latch
        // when the worker starts and ends.
        .set_notify_pid(unsafe { pg_sys::MyProcPid })
        .set_restart_time(Some(Duration::from_secs(5)))
        .load_dynamic()
        .map_err(|_| ())
}

/// The databases a worker may connect to: not templates, connections allowed, not half
/// dropped (a `DROP DATABASE` interrupted leaves `datconnlimit = -2`).
fn databases() -> Vec<(pg_sys::Oid, String)> {
    let mut found = Vec::new();
    let Ok(()) = crate::error::transaction(|| -> Result<(), std::convert::Infallible> {
        // SAFETY: inside a transaction; pg_database is a shared catalog the launcher may read
        // without a database; the relation guard closes it and the scan is ended before.
        unsafe {
            let relation = crate::relation::OpenRelation::open(
                pg_sys::DatabaseRelationId,
                pg_sys::AccessShareLock,
            );
            let scan = pg_sys::table_beginscan_catalog(relation.get(), 0, std::ptr::null_mut());
            loop {
                let tuple = pg_sys::heap_getnext(scan, pg_sys::ScanDirection::ForwardScanDirection);
                if tuple.is_null() {
                    break;
                }
                let row = &*pg_sys::heap_tuple_get_struct::<pg_sys::FormData_pg_database>(tuple);
                if row.datallowconn && !row.datistemplate && row.datconnlimit != -2 {
                    let name = CStr::from_ptr(row.datname.data.as_ptr());
                    found.push((row.oid, name.to_string_lossy().into_owned()));
                }
            }
            pg_sys::table_endscan(scan);
        }
        Ok(())
    });
    found
}

/// Sleep until the latch is set (a request, or a worker started or ended), the timeout passes,
/// or a signal arrives. Postmaster death ends the process.
fn wait(timeout: Option<Duration>) {
    let mut events = pg_sys::WL_LATCH_SET | pg_sys::WL_EXIT_ON_PM_DEATH;
    let millis = timeout.map_or(-1, |t| {
        events |= pg_sys::WL_TIMEOUT;
        t.as_millis() as std::ffi::c_long
    });
    // SAFETY: the launcher's own latch, in its main thread, outside any transaction.
    unsafe {
        pg_sys::WaitLatch(
            pg_sys::MyLatch,
            events as i32,
            millis,
            pg_sys::PG_WAIT_EXTENSION,
        );
        pg_sys::ResetLatch(pg_sys::MyLatch);
    }
    pgrx::check_for_interrupts!();
}
