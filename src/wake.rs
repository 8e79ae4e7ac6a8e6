//! The doorbell between capture and delivery: a transaction that queued changes sets the
//! worker's latch when it commits, so delivery starts at once instead of at the next poll.
//! Only the worker's process number lives in shared memory (which needs preloading); without
//! preloading there is no worker and ringing does nothing.

use pgrx::atomics::PgAtomic;
use pgrx::prelude::*;
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU64, Ordering};

// SAFETY: a named shared-memory slot, initialized by pg_shmem_init! in _PG_init before any use.
static WORKER_PROCNO: PgAtomic<AtomicI32> = unsafe { PgAtomic::new(c"certyo_cdc_worker_procno") };
/// Passes the worker has run since the server started: `certyo.worker_status().passes`, so
/// that anyone can see whether an idle worker sleeps.
// SAFETY: as above.
static PASSES: PgAtomic<AtomicU64> = unsafe { PgAtomic::new(c"certyo_cdc_worker_passes") };
static PRELOADED: AtomicBool = AtomicBool::new(false);

thread_local! {
    static RING_AT_COMMIT: Cell<bool> = const { Cell::new(false) };
    static CALLBACK_REGISTERED: Cell<bool> = const { Cell::new(false) };
}

/// From `_PG_init` while the postmaster loads preloaded libraries.
pub fn init_shared_memory() {
    pgrx::pg_shmem_init!(WORKER_PROCNO = AtomicI32::new(-1));
    pgrx::pg_shmem_init!(PASSES = AtomicU64::new(0));
    PRELOADED.store(true, Ordering::Relaxed);
}

/// The worker announces itself (or withdraws with `None`).
pub fn set_worker(procno: Option<i32>) {
    if PRELOADED.load(Ordering::Relaxed) {
        WORKER_PROCNO
            .get()
            .store(procno.unwrap_or(-1), Ordering::Release);
    }
}

/// The worker starts a pass.
pub fn count_pass() {
    if PRELOADED.load(Ordering::Relaxed) {
        PASSES.get().fetch_add(1, Ordering::Relaxed);
    }
}

/// `certyo.worker_passes()`: passes run since the server started (NULL without preloading).
#[pg_extern(sql = false)]
fn worker_passes() -> Option<i64> {
    PRELOADED
        .load(Ordering::Relaxed)
        .then(|| PASSES.get().load(Ordering::Relaxed) as i64)
}

/// Capture: this transaction queued a change; wake the worker if it commits.
pub fn ring_at_commit() {
    if !PRELOADED.load(Ordering::Relaxed) || RING_AT_COMMIT.replace(true) {
        return;
    }
    if !CALLBACK_REGISTERED.replace(true) {
        // SAFETY: registers a callback once per backend, in its main thread.
        unsafe { pg_sys::RegisterXactCallback(Some(on_transaction_end), std::ptr::null_mut()) };
    }
}

/// `certyo.wake()`: ring now, and again when this transaction commits (so a pass sees what the
/// caller changed, e.g. `certyo.retry()`). False when no worker is there to hear it.
#[pg_extern(sql = false)]
fn wake() -> bool {
    ring_at_commit();
    // SAFETY: reads the worker's process number from shared memory and sets that latch; SetLatch is safe on any live PGPROC latch.
    PRELOADED.load(Ordering::Relaxed) && unsafe { ring() }
}

/// Set the worker's latch, if a worker has announced itself.
unsafe fn ring() -> bool {
    let procno = WORKER_PROCNO.get().load(Ordering::Acquire);
    if procno >= 0 && (procno as u32) < (*pg_sys::ProcGlobal).allProcCount {
        pg_sys::SetLatch(&mut (*(*pg_sys::ProcGlobal).allProcs.add(procno as usize)).procLatch);
        return true;
    }
    false
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn on_transaction_end(
    event: pg_sys::XactEvent::Type,
    _arg: *mut std::ffi::c_void,
) {
    use pg_sys::XactEvent::*;
    match event {
        XACT_EVENT_COMMIT | XACT_EVENT_PARALLEL_COMMIT if RING_AT_COMMIT.replace(false) => {
            ring();
        }
        XACT_EVENT_ABORT | XACT_EVENT_PARALLEL_ABORT | XACT_EVENT_PREPARE => {
            RING_AT_COMMIT.set(false)
        }
        _ => {}
    }
}
