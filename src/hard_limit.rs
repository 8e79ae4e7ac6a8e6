//! The hard limit on owners' code in the extension's background workers.
//!
//! Owners' code runs in the slow lane (and backfill chunks in a delivery worker that could
//! start no lane): a table's triggers during a write-back, a backfill's condition. It runs
//! under a statement timeout (see [`crate::rights`]), but that cancellation is an ERROR, and
//! PL/pgSQL catches it: a trigger that loops on `EXCEPTION WHEN query_canceled` held the
//! delivery worker forever, and with it the delivery of every table of the database;
//! `pg_terminate_backend` could not end it (pgrx's SIGTERM handler only sets a flag for the
//! worker's loop), nor could `pg_ctl stop -m fast`.
//!
//! So owners' code runs within two limits. [`GRACE`] after the statement timeout, a second one
//! ends the process as `pg_terminate_backend` ends a backend: a FATAL error, which no code can
//! catch (the server log says "terminating background worker ... due to administrator
//! command"). Its transaction rolls back, so nothing it did stays, and the process is started
//! again (the delivery worker by the postmaster, the lane by the worker). Before it ends, it
//! notes in shared memory what it was running; the database's worker or slow lane then
//! records that table's write-back as failed, retried with back-off (after every table that
//! has not failed), or fails that backfill and its requester's other open ones, so the same
//! code does not end it again at once. SIGTERM ends owners' code the same way.

use pgrx::atomics::PgAtomic;
use pgrx::pg_sys::{self, Oid};
use pgrx::prelude::*;
use pgrx::PGRXSharedMemory;
use std::cell::Cell;
use std::ffi::c_int;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicI64, AtomicU32, AtomicU64, Ordering};
use std::time::Duration;

/// How long owners' code may go on after its statement was canceled before the process ends.
pub const GRACE: Duration = Duration::from_secs(1);

/// What owners' code the process is running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Running {
    /// A write-back to this table (its triggers, and what they call).
    WriteBack(Oid),
    /// A chunk of this backfill (its condition, the table's policies).
    Backfill(i64),
}

/// Owners' code that ran past the hard limit, noted by the process it ended for the next
/// worker or lane of the same database. `database` 0: the place is free; `u32::MAX`: being
/// written.
#[derive(Default)]
struct Ended {
    database: AtomicU32,
    /// 1: a write-back (`id` is the table's OID), 2: a backfill (`id` is its id).
    kind: AtomicU32,
    id: AtomicI64,
    /// When it was noted (seconds since the epoch): with every place taken, the oldest note
    /// gives way (one of a database no worker serves any more is never taken).
    at: AtomicU64,
}

const PLACES: usize = 32;
const BEING_WRITTEN: u32 = u32::MAX;

#[derive(Default)]
struct Registry {
    ended: [Ended; PLACES],
}

// SAFETY: only atomics, valid in shared memory at any address and in any process.
unsafe impl PGRXSharedMemory for Registry {}

// SAFETY: a named shared-memory area, initialized by pg_shmem_init! in _PG_init before any use.
static REGISTRY: PgAtomic<Registry> = unsafe { PgAtomic::new(c"certyo_cdc_hard_limit") };
static PRELOADED: AtomicBool = AtomicBool::new(false);

/// Set by the signal handlers, read by the process's main thread.
static IN_USER_CODE: AtomicBool = AtomicBool::new(false);
static LIMIT_PASSED: AtomicBool = AtomicBool::new(false);
static SIGTERM_RECEIVED: AtomicBool = AtomicBool::new(false);
/// The `TimeoutId` of the hard limit in this process, -1 until registered.
static TIMEOUT_ID: AtomicI32 = AtomicI32::new(-1);

thread_local! {
    static RUNNING: Cell<Option<Running>> = const { Cell::new(None) };
    static EXIT_CALLBACK: Cell<bool> = const { Cell::new(false) };
}

/// From `_PG_init` while the postmaster loads preloaded libraries.
pub fn init_shared_memory() {
    pgrx::pg_shmem_init!(REGISTRY = Registry::default());
    PRELOADED.store(true, Ordering::Relaxed);
}

/// At the start of the delivery worker and the lane: their SIGTERM handler, in place of
/// pgrx's, which sets the flag the main loop reads ([`sigterm_received`]) and ends owners' code
/// running now as the server's own handler (`die`) ends a backend's statement; and the hard
/// limit's timeout.
pub fn install() {
    // SAFETY: installs a handler for this process; the handler only touches atomics and
    // Postgres' interrupt flags and latch, as `die` does.
    unsafe { crate::compat::set_signal_handler(libc::SIGTERM, on_sigterm) };
    timeout_id();
}

/// Has SIGTERM arrived (since [`handle_sigterm`])?
pub fn sigterm_received() -> bool {
    SIGTERM_RECEIVED.load(Ordering::Relaxed)
}

extern "C-unwind" fn on_sigterm(_signal: c_int) {
    // SAFETY: errno is thread-local and restored before returning, as Postgres' handlers do.
    let saved = unsafe { *libc::__errno_location() };
    SIGTERM_RECEIVED.store(true, Ordering::Relaxed);
    if IN_USER_CODE.load(Ordering::Relaxed) {
        end_process();
    }
    // SAFETY: the process's latch is valid once it runs; setting it is signal-safe.
    unsafe { pg_sys::SetLatch(pg_sys::MyLatch) };
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = saved };
}

/// The timeout's handler (called from Postgres' SIGALRM handler, which keeps errno and sets
/// the latch). Not once SIGTERM is ending the process: the code is then not to blame.
extern "C-unwind" fn on_hard_limit() {
    if IN_USER_CODE.load(Ordering::Relaxed) && !SIGTERM_RECEIVED.load(Ordering::Relaxed) {
        LIMIT_PASSED.store(true, Ordering::Relaxed);
        end_process();
    }
}

/// Ask for the process's end at the next interrupt check, as `die` does: `ProcessInterrupts`
/// raises FATAL for it.
fn end_process() {
    // SAFETY: writes of `volatile sig_atomic_t` flags, as Postgres' own handlers make them.
    unsafe {
        std::ptr::write_volatile(&raw mut pg_sys::ProcDiePending, 1);
        std::ptr::write_volatile(&raw mut pg_sys::InterruptPending, 1);
    }
}

/// Run owners' code `f` (`running`), whose statement is canceled after `timeout`: the process
/// ends [`GRACE`] after that if it is still running.
pub fn run<T>(running: Running, timeout: Duration, f: impl FnOnce() -> T) -> T {
    let id = timeout_id();
    if !EXIT_CALLBACK.get() {
        EXIT_CALLBACK.set(true);
        // SAFETY: registers a callback in this process's main thread; it runs at any exit.
        unsafe { pg_sys::before_shmem_exit(Some(note_at_exit), pg_sys::Datum::from(0)) };
    }
    let ms = (timeout + GRACE).as_millis().clamp(1, c_int::MAX as u128) as c_int;
    RUNNING.set(Some(running));
    IN_USER_CODE.store(true, Ordering::Relaxed);
    let _armed = Armed(id);
    if sigterm_received() {
        end_process(); // asked to end before the code started: it does not start
    }
    // SAFETY: a timeout registered in this process (below); its handler only sets flags.
    unsafe { pg_sys::ffi::pg_guard_ffi_boundary(|| enable_timeout_after(id, ms)) };
    f()
}

/// Disarms the hard limit when the code returns or its ERROR unwinds (a FATAL does not unwind:
/// the process ends with [`RUNNING`] still set, for [`note_at_exit`]).
struct Armed(c_int);

impl Drop for Armed {
    fn drop(&mut self) {
        IN_USER_CODE.store(false, Ordering::Relaxed);
        RUNNING.set(None);
        // SAFETY: disarms the timeout registered in this process; it raises no error.
        unsafe { disable_timeout(self.0, false) };
    }
}

/// The hard limit's `TimeoutId` in this process, registered on first use.
fn timeout_id() -> c_int {
    let id = TIMEOUT_ID.load(Ordering::Relaxed);
    if id >= 0 {
        return id;
    }
    // SAFETY: timeouts are initialized in every background worker before its main function
    // runs; an id from USER_TIMEOUT on asks for a free user-defined one (FATAL if none of the
    // ten is left, which no extension of ours takes more than one of).
    let id = unsafe {
        pg_sys::ffi::pg_guard_ffi_boundary(|| {
            RegisterTimeout(crate::compat::USER_TIMEOUT, Some(on_hard_limit))
        })
    };
    TIMEOUT_ID.store(id, Ordering::Relaxed);
    id
}

unsafe extern "C-unwind" {
    /// `utils/timeout.h` (not bound by pgrx); ids are `TimeoutId`s.
    fn RegisterTimeout(id: c_int, handler: Option<unsafe extern "C-unwind" fn()>) -> c_int;
    fn enable_timeout_after(id: c_int, delay_ms: c_int);
    fn disable_timeout(id: c_int, keep_indicator: bool);
}

/// # Safety
/// Called only by PostgreSQL at the process's exit, as the `before_shmem_exit` callback
/// registered above.
#[pg_guard]
unsafe extern "C-unwind" fn note_at_exit(_code: c_int, _arg: pg_sys::Datum) {
    let Some(running) = RUNNING.get() else { return };
    if !LIMIT_PASSED.load(Ordering::Relaxed)
        || SIGTERM_RECEIVED.load(Ordering::Relaxed)
        || !PRELOADED.load(Ordering::Relaxed)
    {
        return; // SIGTERM ended it: the code did nothing wrong
    }
    // SAFETY: a plain read of a Postgres global of this connected process.
    let database = unsafe { pg_sys::MyDatabaseId }.to_u32();
    let (kind, id) = match running {
        Running::WriteBack(relid) => (1, i64::from(relid.to_u32())),
        Running::Backfill(id) => (2, id),
    };
    let places = &REGISTRY.get().ended;
    let free = places.iter().find(|place| {
        place
            .database
            .compare_exchange(0, BEING_WRITTEN, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    });
    // Every place taken: the oldest note gives way.
    let place = free.or_else(|| {
        let oldest = places
            .iter()
            .min_by_key(|place| place.at.load(Ordering::Relaxed))?;
        let was = oldest.database.load(Ordering::Acquire);
        (was != BEING_WRITTEN
            && oldest
                .database
                .compare_exchange(was, BEING_WRITTEN, Ordering::AcqRel, Ordering::Acquire)
                .is_ok())
        .then_some(oldest)
    });
    if let Some(place) = place {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        place.kind.store(kind, Ordering::Relaxed);
        place.id.store(id, Ordering::Relaxed);
        place.at.store(now, Ordering::Relaxed);
        place.database.store(database, Ordering::Release);
    }
}

/// The owners' code that ended a process of `database` since the last call, each once.
pub fn ended(database: Oid) -> Vec<Running> {
    if !PRELOADED.load(Ordering::Relaxed) {
        return Vec::new();
    }
    let database = database.to_u32();
    let mut found = Vec::new();
    for place in &REGISTRY.get().ended {
        if place.database.load(Ordering::Acquire) != database {
            continue;
        }
        let (kind, id) = (
            place.kind.load(Ordering::Relaxed),
            place.id.load(Ordering::Relaxed),
        );
        if place
            .database
            .compare_exchange(database, 0, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
        {
            match kind {
                1 => found.push(Running::WriteBack(Oid::from(id as u32))),
                _ => found.push(Running::Backfill(id)),
            }
        }
    }
    found
}

/// What the log and the status say of `what` (owners' code) that ran past the hard limit,
/// and `to_do` about it.
pub fn ended_message(what: &str, to_do: &str) -> String {
    format!(
        "{what} ran past its hard limit: it went on for more than {} s after it was canceled at the end of its time (certyo.user_code_timeout, {} ms), as code that catches the cancellation does (EXCEPTION WHEN query_canceled or OTHERS); the process running it ended itself to stop it (the log says \"due to administrator command\"), nothing it did was kept, and a new one took over; {to_do}",
        GRACE.as_secs(),
        crate::settings::user_code_timeout().as_millis()
    )
}
