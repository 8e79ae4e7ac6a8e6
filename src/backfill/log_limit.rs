//! The log's account of failed backfills: each failure's error is in `certyo.backfills.error`,
//! and the log names at most ten in any minute, whichever process ran them (the delivery worker,
//! or a slow lane, which ends when idle and starts again). A role that requested 20,000
//! backfills whose condition raises (one statement) made the worker log 330 warnings a second,
//! 63 MB in 20 s (an attacker pass of 2026-12-05); a limit kept in each process's memory let a
//! lane started again, or the worker beside it, log ten more each.

use pgrx::atomics::PgAtomic;
use pgrx::prelude::*;
use pgrx::PGRXSharedMemory;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Failed backfills the log names in any minute, in the whole cluster.
pub const PER_MINUTE: usize = 10;
const MINUTE: Duration = Duration::from_secs(60);

/// When the last `PER_MINUTE` warnings were logged (milliseconds since the epoch, 0 for never),
/// a ring: a failure is logged when the oldest of them is a minute old.
#[derive(Default)]
struct Ring {
    logged_at: [AtomicU64; PER_MINUTE],
    next: AtomicUsize,
    /// Failures not logged since the last warning that said so.
    unlogged: AtomicU64,
}

// SAFETY: only atomics, valid in shared memory at any address and in any process.
unsafe impl PGRXSharedMemory for Ring {}

// SAFETY: a named shared-memory area, initialized by pg_shmem_init! in _PG_init before any use.
static RING: PgAtomic<Ring> = unsafe { PgAtomic::new(c"certyo_cdc_backfill_log") };
static PRELOADED: AtomicBool = AtomicBool::new(false);

/// From `_PG_init` while the postmaster loads preloaded libraries.
pub fn init_shared_memory() {
    pgrx::pg_shmem_init!(RING = Ring::default());
    PRELOADED.store(true, Ordering::Relaxed);
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Whether the log may name one more failure now; takes its place if so.
fn take_place() -> bool {
    if !PRELOADED.load(Ordering::Relaxed) {
        return true; // no worker, no flood: only a test build runs backfills unpreloaded
    }
    let ring = RING.get();
    let now = now_ms();
    let minute = u64::try_from(MINUTE.as_millis()).unwrap_or(u64::MAX);
    let index = ring.next.load(Ordering::Acquire) % PER_MINUTE;
    let oldest = ring.logged_at[index].load(Ordering::Acquire);
    if oldest != 0 && now.saturating_sub(oldest) < minute {
        return false;
    }
    // Two processes that saw the same place: one takes it, the other does not log.
    if ring.logged_at[index]
        .compare_exchange(oldest, now, Ordering::AcqRel, Ordering::Acquire)
        .is_err()
    {
        return false;
    }
    ring.next.store((index + 1) % PER_MINUTE, Ordering::Release);
    true
}

/// Backfill `id` failed with `error` (already in `certyo.backfills`).
pub fn warn(id: i64, error: &str) {
    if take_place() {
        let unlogged = if PRELOADED.load(Ordering::Relaxed) {
            RING.get().unlogged.swap(0, Ordering::AcqRel)
        } else {
            0
        };
        if unlogged > 0 {
            pgrx::warning!("certyo_cdc: {unlogged} more backfills failed that the log does not name (at most {PER_MINUTE} a minute are); certyo.backfills holds each one's error");
        }
        pgrx::warning!("certyo_cdc: backfill {id} failed: {error}");
    } else if PRELOADED.load(Ordering::Relaxed) {
        RING.get().unlogged.fetch_add(1, Ordering::AcqRel);
    }
}
