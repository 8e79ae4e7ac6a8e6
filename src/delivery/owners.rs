//! How much of the slow lanes' time each table owner's code has taken lately, and which owners
//! are slow: their write-backs go to a lane of their own (`slow_lane::Lane::SlowOwners`), so
//! that one owner's slow triggers delay that owner's tables only, never another owner's.
//!
//! Kept in shared memory: the lanes of a database, and a lane started again after its hard
//! limit (`crate::hard_limit`), see the same account. Time decays by half every minute. An
//! owner becomes slow once their code has taken [`SLOW`] lately, and is an ordinary owner again
//! once it has decayed below [`RECOVERED`]. Only the lane that does not serve an owner changes
//! which lane does: the shared lane marks an owner slow after that owner's statement has ended,
//! the slow owners' lane marks them ordinary again before it takes any of their tables; so two
//! lanes never take the same owner's tables by this account.

use pgrx::lwlock::PgLwLock;
use pgrx::pg_sys::{self, Oid};
use pgrx::prelude::*;
use pgrx::PGRXSharedMemory;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// An owner whose statements have taken this much of the lanes' time lately, past [`QUICK`]
/// each, is slow.
pub const SLOW: Duration = Duration::from_secs(2);
/// What a statement may take without counting: an owner whose table is written back often,
/// in quick statements, is not slow (10 a second of 30 ms each would make 17 s over the
/// half-life).
const QUICK: Duration = Duration::from_millis(100);
/// A slow owner whose time has decayed below this is an ordinary owner again.
pub const RECOVERED: Duration = Duration::from_millis(500);
const HALF_LIFE: Duration = Duration::from_secs(60);
/// Owners accounted for in the whole cluster; past this, the one with least time gives way.
const OWNERS: usize = 256;

#[derive(Clone, Copy, Default)]
struct Owner {
    database: u32,
    owner: u32,
    /// Microseconds, as of `at_ms`.
    used_us: u64,
    /// Milliseconds since the epoch; 0: a free entry.
    at_ms: u64,
    slow: bool,
}

/// Databases whose slow owners' lane could not start (no background worker slot): until when
/// (milliseconds since the epoch) the slow lane does their write-backs too.
const DATABASES: usize = 64;

#[derive(Clone, Copy)]
struct Account {
    owners: [Owner; OWNERS],
    no_lane: [(u32, u64); DATABASES],
}

impl Default for Account {
    fn default() -> Self {
        Account {
            owners: [Owner::default(); OWNERS],
            no_lane: [(0, 0); DATABASES],
        }
    }
}

// SAFETY: plain data, valid in shared memory at any address and in any process.
unsafe impl PGRXSharedMemory for Account {}

// SAFETY: a named shared-memory area, initialized by pg_shmem_init! in _PG_init before any use.
static ACCOUNT: PgLwLock<Account> = unsafe { PgLwLock::new(c"certyo_cdc_owner_time") };
static PRELOADED: AtomicBool = AtomicBool::new(false);

/// From `_PG_init` while the postmaster loads preloaded libraries.
pub fn init_shared_memory() {
    pgrx::pg_shmem_init!(ACCOUNT = Account::default());
    PRELOADED.store(true, Ordering::Relaxed);
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

fn database() -> u32 {
    // SAFETY: a plain read of a Postgres global of this connected process.
    unsafe { pg_sys::MyDatabaseId }.to_u32()
}

impl Owner {
    fn used(&self, now: u64) -> Duration {
        if self.at_ms == 0 {
            return Duration::ZERO;
        }
        let halvings = now.saturating_sub(self.at_ms) as f64 / HALF_LIFE.as_millis() as f64;
        Duration::from_micros(self.used_us).mul_f64(0.5f64.powf(halvings))
    }

    fn is(&self, database: u32, owner: Oid) -> bool {
        self.at_ms != 0 && self.database == database && self.owner == owner.to_u32()
    }

    /// Slow, and not yet quiet long enough to be an ordinary owner again.
    fn slow_now(&self, now: u64) -> bool {
        self.slow && self.used(now) >= RECOVERED
    }
}

/// A statement on a table of `owner` took `time` of a lane (or ended it at its hard limit).
/// `may_mark_slow`: the caller is the lane of ordinary owners (or a delivery worker that has
/// no lane), which hands a slow owner over to their own lane.
pub fn charge(owner: Oid, time: Duration, may_mark_slow: bool) {
    let time = time.saturating_sub(QUICK);
    if !PRELOADED.load(Ordering::Relaxed) || time.is_zero() {
        return;
    }
    let (database, now) = (database(), now_ms());
    let mut account = ACCOUNT.exclusive();
    let index = match account.owners.iter().position(|o| o.is(database, owner)) {
        Some(i) => i,
        None => {
            // A free entry, or the one with least time.
            let mut least = 0;
            for (i, o) in account.owners.iter().enumerate() {
                if o.at_ms == 0 {
                    least = i;
                    break;
                }
                if o.used(now) < account.owners[least].used(now) {
                    least = i;
                }
            }
            account.owners[least] = Owner {
                database,
                owner: owner.to_u32(),
                ..Owner::default()
            };
            least
        }
    };
    let entry = &mut account.owners[index];
    let used = entry.used(now) + time;
    entry.used_us = u64::try_from(used.as_micros()).unwrap_or(u64::MAX);
    entry.at_ms = now;
    if may_mark_slow && used >= SLOW {
        entry.slow = true;
    }
}

/// `owner`'s time lately, in this database.
pub fn used(owner: Oid) -> Duration {
    if !PRELOADED.load(Ordering::Relaxed) {
        return Duration::ZERO;
    }
    let (database, now) = (database(), now_ms());
    let account = ACCOUNT.share();
    account
        .owners
        .iter()
        .find(|o| o.is(database, owner))
        .map_or(Duration::ZERO, |o| o.used(now))
}

/// Whether `owner`'s write-backs are the slow owners' lane's. `may_recover`: the caller is
/// that lane, which hands an owner whose time has decayed back to the lane of ordinary owners
/// (before taking any of their tables). Either way, an owner is slow for both lanes alike.
pub fn is_slow(owner: Oid, may_recover: bool) -> bool {
    if !PRELOADED.load(Ordering::Relaxed) {
        return false;
    }
    let (database, now) = (database(), now_ms());
    let mut account = ACCOUNT.exclusive();
    let Some(entry) = account.owners.iter_mut().find(|o| o.is(database, owner)) else {
        return false;
    };
    if may_recover && !entry.slow_now(now) {
        entry.slow = false;
    }
    entry.slow_now(now)
}

/// Whether some owner of this database is slow now.
pub fn any_slow() -> bool {
    if !PRELOADED.load(Ordering::Relaxed) {
        return false;
    }
    let (database, now) = (database(), now_ms());
    ACCOUNT
        .share()
        .owners
        .iter()
        .any(|o| o.database == database && o.at_ms != 0 && o.slow_now(now))
}

/// The delivery worker could not start this database's slow owners' lane (`for_how_long`
/// Some), or it could again (None).
pub fn no_slow_owners_lane(for_how_long: Option<Duration>) {
    if !PRELOADED.load(Ordering::Relaxed) {
        return;
    }
    let database = database();
    let until = for_how_long.map_or(0, |d| now_ms().saturating_add(d.as_millis() as u64));
    let mut account = ACCOUNT.exclusive();
    let now = now_ms();
    let place = account
        .no_lane
        .iter()
        .position(|(d, _)| *d == database)
        .or_else(|| account.no_lane.iter().position(|(_, at)| *at <= now));
    if let Some(i) = place {
        account.no_lane[i] = (database, until);
    }
}

/// Whether slow owners have no lane of their own in this database now (no worker slot): the
/// slow lane then does their write-backs too, after the others'.
pub fn slow_owners_have_no_lane() -> bool {
    if !PRELOADED.load(Ordering::Relaxed) {
        return true;
    }
    let (database, now) = (database(), now_ms());
    ACCOUNT
        .share()
        .no_lane
        .iter()
        .any(|(d, until)| *d == database && *until > now)
}
