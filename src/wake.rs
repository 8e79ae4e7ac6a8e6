//! The doorbells between capture and delivery, and the registry of delivery workers.
//!
//! One delivery worker serves each database in which the extension is installed. Shared
//! memory holds a slot per served database (its OID, its worker's process number, the passes
//! it has run) and the launcher's process number. A transaction that queued changes sets its
//! own database's worker's latch when it commits, so delivery starts at once instead of at the
//! next poll; `CREATE EXTENSION certyo_cdc` sets the launcher's, which then starts a worker for
//! the new database. Shared memory needs preloading; without it there is no worker and ringing
//! does nothing.

use pgrx::atomics::PgAtomic;
use pgrx::prelude::*;
use pgrx::PGRXSharedMemory;
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU32, AtomicU64, AtomicUsize, Ordering};

/// Databases served at most, whatever `certyo.max_databases` says (it is checked against this).
pub const MAX_DATABASES: usize = 64;

/// One served database. `database` is 0 when the slot is free; a worker claims a slot by
/// setting it and frees it when it exits.
#[derive(Default)]
struct Slot {
    database: AtomicU32,
    /// The worker's process number (index of its PGPROC and latch), -1 before it is set.
    procno: AtomicI32,
    /// Passes the worker has run since it started: `certyo.worker_status().passes`, so that
    /// anyone can see whether an idle worker sleeps.
    passes: AtomicU64,
    /// Set while the worker would do nothing with a commit's ring (sending is paused,
    /// disabled, refused, or waits for the next probe of an outage): committing writers do not
    /// ring then, and the worker is not woken thousands of times a second for nothing.
    /// `certyo.wake()` rings all the same.
    muted: AtomicBool,
    /// Changes committed by capture in this database, counted by the committing writers.
    committed: AtomicU64,
    /// While the worker lingers (`certyo.linger`), commits ring only once `committed` reaches
    /// this (a full batch gathered); 0: every commit rings.
    ring_at: AtomicU64,
}

/// Databases being dropped (recently), whose workers must not start again: a worker waiting
/// to be restarted after an error, or started by the launcher in the moment before the drop
/// commits, would otherwise fail to connect to the gone database every few seconds, forever.
const DROPPED: usize = 16;

struct Registry {
    slots: [Slot; MAX_DATABASES],
    launcher_procno: AtomicI32,
    /// Requests for the launcher to look for databases without a worker, counted: a latch
    /// set by a worker's start or end (its notification) is no request.
    launcher_requests: AtomicU64,
    dropped: [AtomicU32; DROPPED],
    next_dropped: AtomicUsize,
}

impl Default for Registry {
    fn default() -> Self {
        Registry {
            slots: std::array::from_fn(|_| Slot {
                procno: AtomicI32::new(-1),
                ..Slot::default()
            }),
            launcher_procno: AtomicI32::new(-1),
            launcher_requests: AtomicU64::new(0),
            dropped: std::array::from_fn(|_| AtomicU32::new(0)),
            next_dropped: AtomicUsize::new(0),
        }
    }
}

// SAFETY: only atomics, valid in shared memory at any address and in any process.
unsafe impl PGRXSharedMemory for Registry {}

// SAFETY: a named shared-memory area, initialized by pg_shmem_init! in _PG_init before any use.
static REGISTRY: PgAtomic<Registry> = unsafe { PgAtomic::new(c"certyo_cdc_workers") };
static PRELOADED: AtomicBool = AtomicBool::new(false);

thread_local! {
    static RING_AT_COMMIT: Cell<bool> = const { Cell::new(false) };
    /// Changes this transaction queued (rows captured, backfill chunks): counted at commit.
    static CHANGES_AT_COMMIT: Cell<u64> = const { Cell::new(0) };
    static RING_LAUNCHER_AT_COMMIT: Cell<bool> = const { Cell::new(false) };
    static CALLBACK_REGISTERED: Cell<bool> = const { Cell::new(false) };
    /// The slot this process's worker claimed (delivery workers only).
    static MY_SLOT: Cell<Option<usize>> = const { Cell::new(None) };
    /// Where this backend last found its database's worker: checked before use.
    static KNOWN_SLOT: Cell<usize> = const { Cell::new(0) };
}

/// From `_PG_init` while the postmaster loads preloaded libraries.
pub fn init_shared_memory() {
    pgrx::pg_shmem_init!(REGISTRY = Registry::default());
    PRELOADED.store(true, Ordering::Relaxed);
}

/// Why a worker may not serve its database.
pub enum Refused {
    /// Another worker serves it already.
    Served,
    /// `cap` databases are served already.
    Full,
}

/// A delivery worker claims the slot of its database, if no other worker has and fewer than
/// `cap` databases are served.
pub fn claim(database: pg_sys::Oid, cap: usize) -> Result<(), Refused> {
    let slots = &REGISTRY.get().slots;
    let id = database.to_u32();
    if slots
        .iter()
        .any(|s| s.database.load(Ordering::Acquire) == id)
    {
        return Err(Refused::Served);
    }
    let index = slots
        .iter()
        .position(|s| {
            s.database
                .compare_exchange(0, id, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        })
        .ok_or(Refused::Full)?;
    // Workers claiming at once each get a slot; the earlier slots win: a second worker of the
    // same database gives way, and so does a worker past the cap.
    let earlier: Vec<u32> = slots[..index]
        .iter()
        .map(|s| s.database.load(Ordering::Acquire))
        .filter(|&d| d != 0)
        .collect();
    let refused = if earlier.contains(&id) {
        Some(Refused::Served)
    } else if earlier.len() >= cap.min(MAX_DATABASES) {
        Some(Refused::Full)
    } else {
        None
    };
    if let Some(refused) = refused {
        slots[index].database.store(0, Ordering::Release);
        return Err(refused);
    }
    slots[index].passes.store(0, Ordering::Relaxed);
    slots[index].muted.store(false, Ordering::Relaxed);
    MY_SLOT.set(Some(index));
    // SAFETY: registers a callback in this process's main thread; it runs at any exit, an
    // ERROR's included, so the slot never outlives its worker.
    unsafe { pg_sys::before_shmem_exit(Some(free_slot), pg_sys::Datum::from(0)) };
    Ok(())
}

/// # Safety
/// Called only by PostgreSQL at the process's exit, as the `before_shmem_exit` callback
/// registered above.
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn free_slot(_code: std::ffi::c_int, _arg: pg_sys::Datum) {
    set_worker(None);
}

/// The worker announces its latch (or withdraws with `None`, and frees its slot).
pub fn set_worker(procno: Option<i32>) {
    let Some(index) = MY_SLOT.get() else { return };
    let slot = &REGISTRY.get().slots[index];
    slot.ring_at.store(0, Ordering::Release); // a worker that ended lingering is not the next one
    slot.procno.store(procno.unwrap_or(-1), Ordering::Release);
    if procno.is_none() {
        slot.database.store(0, Ordering::Release);
        MY_SLOT.set(None);
    }
}

/// The launcher announces its latch (or withdraws with `None`).
pub fn set_launcher(procno: Option<i32>) {
    if PRELOADED.load(Ordering::Relaxed) {
        REGISTRY
            .get()
            .launcher_procno
            .store(procno.unwrap_or(-1), Ordering::Release);
    }
}

/// The databases served now.
pub fn served() -> Vec<pg_sys::Oid> {
    if !PRELOADED.load(Ordering::Relaxed) {
        return Vec::new();
    }
    REGISTRY
        .get()
        .slots
        .iter()
        .map(|s| s.database.load(Ordering::Acquire))
        .filter(|&d| d != 0)
        .map(pg_sys::Oid::from)
        .collect()
}

/// The worker says whether commits should ring (see `Slot::muted`).
pub fn mute(muted: bool) {
    if let Some(index) = MY_SLOT.get() {
        REGISTRY.get().slots[index]
            .muted
            .store(muted, Ordering::Relaxed);
    }
}

/// The worker lingers (`certyo.linger`): until [`ring_every_commit`], commits ring it only once
/// `changes` more have committed than so far.
pub fn ring_after(changes: u64) {
    if let Some(index) = MY_SLOT.get() {
        let slot = &REGISTRY.get().slots[index];
        let at = slot
            .committed
            .load(Ordering::Acquire)
            .saturating_add(changes.max(1));
        slot.ring_at.store(at, Ordering::Release);
    }
}

/// The worker waits for any commit again.
pub fn ring_every_commit() {
    if let Some(index) = MY_SLOT.get() {
        REGISTRY.get().slots[index]
            .ring_at
            .store(0, Ordering::Release);
    }
}

/// Have as many changes committed as [`ring_after`] waits for?
pub fn gathered() -> bool {
    MY_SLOT.get().is_some_and(|index| {
        let slot = &REGISTRY.get().slots[index];
        slot.committed.load(Ordering::Acquire) >= slot.ring_at.load(Ordering::Acquire)
    })
}

/// The worker starts a pass.
pub fn count_pass() {
    if let Some(index) = MY_SLOT.get() {
        REGISTRY.get().slots[index]
            .passes
            .fetch_add(1, Ordering::Relaxed);
    }
}

/// The slot of `database`'s worker, if one serves it.
fn slot_of(database: pg_sys::Oid) -> Option<&'static Slot> {
    if !PRELOADED.load(Ordering::Relaxed) {
        return None;
    }
    let slots = &REGISTRY.get().slots;
    let id = database.to_u32();
    let known = KNOWN_SLOT.get();
    if slots[known].database.load(Ordering::Acquire) == id {
        return Some(&slots[known]);
    }
    let index = slots
        .iter()
        .position(|s| s.database.load(Ordering::Acquire) == id)?;
    KNOWN_SLOT.set(index);
    Some(&slots[index])
}

/// `DROP DATABASE`: mark `database` as being dropped, and return the process id of its worker,
/// if one serves it and has announced itself.
pub fn drop_database(database: pg_sys::Oid) -> Option<i32> {
    if !PRELOADED.load(Ordering::Relaxed) {
        return None;
    }
    let registry = REGISTRY.get();
    let next = registry.next_dropped.fetch_add(1, Ordering::AcqRel) % DROPPED;
    registry.dropped[next].store(database.to_u32(), Ordering::Release);
    let procno = slot_of(database)?.procno.load(Ordering::Acquire);
    // SAFETY: a bounds-checked read of a PGPROC in shared memory.
    unsafe {
        ((procno as u32) < (*pg_sys::ProcGlobal).allProcCount)
            .then(|| (*(*pg_sys::ProcGlobal).allProcs.add(procno as usize)).pid)
            .filter(|&pid| pid > 0)
    }
}

/// The `DROP DATABASE` failed: the database may have a worker again.
pub fn drop_failed(database: pg_sys::Oid) {
    if PRELOADED.load(Ordering::Relaxed) {
        for entry in &REGISTRY.get().dropped {
            let _was_ours =
                entry.compare_exchange(database.to_u32(), 0, Ordering::AcqRel, Ordering::Acquire);
        }
    }
}

/// Is `database` being dropped (or dropped)?
pub fn is_dropped(database: pg_sys::Oid) -> bool {
    PRELOADED.load(Ordering::Relaxed)
        && REGISTRY
            .get()
            .dropped
            .iter()
            .any(|d| d.load(Ordering::Acquire) == database.to_u32())
}

/// `certyo.worker_passes()`: passes run by this database's worker since it started (NULL
/// without preloading, 0 when no worker serves the database).
#[pg_extern(sql = false)]
fn worker_passes() -> Option<i64> {
    if !PRELOADED.load(Ordering::Relaxed) {
        return None;
    }
    // SAFETY: a plain read of a Postgres global in a backend.
    let database = unsafe { pg_sys::MyDatabaseId };
    Some(slot_of(database).map_or(0, |s| s.passes.load(Ordering::Relaxed) as i64))
}

/// Capture: this transaction queued a change; wake the worker if it commits.
pub fn ring_at_commit() {
    if !PRELOADED.load(Ordering::Relaxed) {
        return;
    }
    CHANGES_AT_COMMIT.set(CHANGES_AT_COMMIT.get().saturating_add(1));
    if RING_AT_COMMIT.replace(true) {
        return;
    }
    register_callback();
}

/// `CREATE EXTENSION certyo_cdc`: wake the launcher if this transaction commits, so that it
/// starts a worker for this database.
pub fn ring_launcher_at_commit() {
    if !PRELOADED.load(Ordering::Relaxed) || RING_LAUNCHER_AT_COMMIT.replace(true) {
        return;
    }
    register_callback();
}

fn register_callback() {
    if !CALLBACK_REGISTERED.replace(true) {
        // SAFETY: registers a callback once per backend, in its main thread.
        unsafe { pg_sys::RegisterXactCallback(Some(on_transaction_end), std::ptr::null_mut()) };
    }
}

/// `certyo.wake()`: ring now, and again when this transaction commits (so a pass sees what the
/// caller changed, e.g. `certyo.retry()`). False when no worker is there to hear it; then the
/// launcher is asked to start one.
#[pg_extern(sql = false)]
fn wake() -> bool {
    ring_at_commit();
    // SAFETY: sets the latch of this database's worker, if one has announced itself.
    let heard = PRELOADED.load(Ordering::Relaxed) && unsafe { ring(true, 0) };
    if !heard {
        ring_launcher();
    }
    heard
}

/// Ask the launcher to look for databases without a worker now (a database may need one, or
/// its worker has gone).
pub fn ring_launcher() {
    if PRELOADED.load(Ordering::Relaxed) {
        let registry = REGISTRY.get();
        registry.launcher_requests.fetch_add(1, Ordering::AcqRel);
        // SAFETY: SetLatch is safe on any live PGPROC latch; the number is bounds-checked.
        unsafe { set_latch(registry.launcher_procno.load(Ordering::Acquire)) };
    }
}

/// How many times the launcher has been asked to look (it compares with what it last saw).
pub fn launcher_requests() -> u64 {
    REGISTRY.get().launcher_requests.load(Ordering::Acquire)
}

/// Count `changes` committed, and set the latch of this database's worker, if one has
/// announced itself (and, unless `even_muted`, listens to commits and is not lingering short
/// of a full batch).
///
/// # Safety
/// In a backend's main thread, connected to a database (it reads `MyDatabaseId`).
unsafe fn ring(even_muted: bool, changes: u64) -> bool {
    // SAFETY: the caller upholds this function's contract (its `# Safety` section), on which
    // every unsafe operation below relies.
    unsafe {
        match slot_of(pg_sys::MyDatabaseId) {
            Some(slot) => {
                let committed = slot.committed.fetch_add(changes, Ordering::AcqRel) + changes;
                let listening = !slot.muted.load(Ordering::Relaxed)
                    && committed >= slot.ring_at.load(Ordering::Acquire);
                if even_muted || listening {
                    set_latch(slot.procno.load(Ordering::Acquire))
                } else {
                    true
                }
            }
            None => false,
        }
    }
}

/// # Safety
/// In a process attached to shared memory (`ProcGlobal` set); any `procno` (one out of range
/// sets nothing).
unsafe fn set_latch(procno: i32) -> bool {
    // SAFETY: the caller upholds this function's contract (its `# Safety` section), on which
    // every unsafe operation below relies.
    unsafe {
        if procno >= 0 && (procno as u32) < (*pg_sys::ProcGlobal).allProcCount {
            pg_sys::SetLatch(&mut (*(*pg_sys::ProcGlobal).allProcs.add(procno as usize)).procLatch);
            return true;
        }
        false
    }
}

/// # Safety
/// Called only by PostgreSQL, as the transaction callback registered with
/// `RegisterXactCallback`, in the backend's main thread.
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn on_transaction_end(
    event: pg_sys::XactEvent::Type,
    _arg: *mut std::ffi::c_void,
) {
    // SAFETY: the caller upholds this function's contract (its `# Safety` section), on which
    // every unsafe operation below relies.
    unsafe {
        use pg_sys::XactEvent::*;
        match event {
            XACT_EVENT_COMMIT | XACT_EVENT_PARALLEL_COMMIT => {
                if RING_AT_COMMIT.replace(false) {
                    ring(false, CHANGES_AT_COMMIT.replace(0));
                }
                if RING_LAUNCHER_AT_COMMIT.replace(false) {
                    ring_launcher();
                }
            }
            XACT_EVENT_ABORT | XACT_EVENT_PARALLEL_ABORT | XACT_EVENT_PREPARE => {
                RING_AT_COMMIT.set(false);
                CHANGES_AT_COMMIT.set(0);
                RING_LAUNCHER_AT_COMMIT.set(false);
            }
            _ => {}
        }
    }
}
