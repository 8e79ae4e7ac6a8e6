//! Queue ids, drawn in blocks from `certyo.queue_id_seq` and handed out from shared memory.
//!
//! Delivery relies on one order: of two changes, the one drawn later has the larger id (a
//! record's second change cannot draw before its first commits, so per record ids are change
//! order). A `CACHE 1` sequence gives that, but `nextval` on every change cost 2,100 of the
//! 33,000 instructions a captured row costs, and a lock on the one buffer every writer shares.
//! So the sequence steps by 1,024 (`INCREMENT BY 1024`): one `nextval` reserves a block, the
//! database's current block lives in shared memory, and its ids are handed out under one lock,
//! in the order they are drawn, across all writers.
//!
//! No id is given twice. The block is drawn under the same lock, so ids handed out never go
//! back; and a block lives only in memory, so after a restart, a crash, a promotion or an
//! eviction from the table below the next `nextval` starts past every block drawn before (the
//! sequence's WAL record precedes the commit of any change that used one of its ids). What is
//! left of a block then is a gap, as a rolled-back `nextval` leaves.
//!
//! Shared memory needs preloading: without it every change calls `nextval` (an id per block),
//! as 0.1.0's library does, which a preloaded server runs in every backend until it restarts
//! after an update. Either way ids stay unique and in order.

use pgrx::lwlock::PgLwLock;
use pgrx::pg_guard;
use pgrx::pg_sys::{self, Oid};
use pgrx::PGRXSharedMemory;
use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};

/// Blocks kept at once, one per (database, sequence). An entry is reused round-robin when
/// all are taken: what its block had left becomes a gap.
const ENTRIES: usize = 128;

#[derive(Clone, Copy, Default)]
struct Block {
    /// 0 when the entry is free.
    database: u32,
    sequence: u32,
    /// The next id to hand out; the block is used up at `end`.
    next: i64,
    end: i64,
}

impl Block {
    fn take(&mut self) -> Option<i64> {
        (self.next < self.end).then(|| {
            self.next += 1;
            self.next - 1
        })
    }
}

struct Blocks {
    entries: [Block; ENTRIES],
    /// The entry to reuse next when every entry is taken.
    reuse: usize,
}

impl Default for Blocks {
    fn default() -> Self {
        Blocks {
            entries: [Block::default(); ENTRIES],
            reuse: 0,
        }
    }
}

// SAFETY: plain data without pointers, valid in shared memory at any address; read and
// written only under the lock.
unsafe impl PGRXSharedMemory for Blocks {}

// SAFETY: a named shared-memory area and lock, initialized by pg_shmem_init! in _PG_init
// before any use (guarded by PRELOADED).
static BLOCKS: PgLwLock<Blocks> = unsafe { PgLwLock::new(c"certyo_cdc_queue_ids") };
static PRELOADED: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// Where this backend last found its block: checked under the lock before use.
    static KNOWN_ENTRY: Cell<usize> = const { Cell::new(0) };
}

unsafe extern "C-unwind" {
    /// `commands/sequence.h` (not bound by pgrx). With `check_permissions = false` the writer
    /// needs no privilege on the sequence. Called through `pg_guard_ffi_boundary`: it may ereport.
    fn nextval_internal(relid: Oid, check_permissions: bool) -> i64;
}

/// From `_PG_init` while the postmaster loads preloaded libraries.
pub fn init_shared_memory() {
    pgrx::pg_shmem_init!(BLOCKS = Blocks::default());
    PRELOADED.store(true, Ordering::Relaxed);
}

/// The next queue id of this database, from `sequence`.
///
/// # Safety
/// In a backend's main thread, inside a transaction that may write.
pub unsafe fn draw(sequence: Oid) -> i64 {
    // SAFETY: the caller upholds this function's contract (its `# Safety` section), on which
    // every unsafe operation below relies.
    unsafe {
        if !PRELOADED.load(Ordering::Relaxed) {
            return nextval(sequence);
        }
        let key = (pg_sys::MyDatabaseId.to_u32(), sequence.to_u32());
        if let Some(id) = take(key) {
            return id;
        }
        refill(key, sequence)
    }
}

/// An id from the current block, if there is one left.
fn take(key: (u32, u32)) -> Option<i64> {
    let mut blocks = BLOCKS.exclusive();
    let index = blocks.find(key)?;
    blocks.entries[index].take()
}

/// Draw a new block and take its first id (or an id of the block another writer drew while
/// this one waited for the lock).
///
/// # Safety
/// As for [`draw`]: in a backend's main thread, inside a transaction that may write;
/// `sequence` the queue's id sequence, the shared memory set up (preloaded).
unsafe fn refill(key: (u32, u32), sequence: Oid) -> i64 {
    // SAFETY: the caller upholds this function's contract (its `# Safety` section), on which
    // every unsafe operation below relies.
    unsafe {
        // `nextval` locks the sequence. Take that lock before ours, never while holding ours: a
        // session that holds a conflicting lock on the sequence (ALTER SEQUENCE) and then writes a
        // tracked table would wait for our lock while we waited for its lock, and a wait for an
        // LWLock is no deadlock Postgres can detect. Once locked, the increment cannot change
        // until this transaction ends.
        pg_sys::LockRelationOid(sequence, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE);
        let size = block_size(sequence);
        let mut blocks = BLOCKS.exclusive();
        let index = blocks.find_or_claim(key);
        if let Some(id) = blocks.entries[index].take() {
            return id;
        }
        // Under the lock: no id is handed out between the old block's last and the new block's
        // first, so ids keep the order they are drawn in.
        let start = nextval(sequence);
        blocks.entries[index] = Block {
            database: key.0,
            sequence: key.1,
            next: start.saturating_add(1),
            end: start.saturating_add(size),
        };
        start
    }
}

impl Blocks {
    fn find(&mut self, key: (u32, u32)) -> Option<usize> {
        let matches = |b: &Block| (b.database, b.sequence) == key;
        let known = KNOWN_ENTRY.get();
        if matches(&self.entries[known]) {
            return Some(known);
        }
        let found = self.entries.iter().position(matches)?;
        KNOWN_ENTRY.set(found);
        Some(found)
    }

    fn find_or_claim(&mut self, key: (u32, u32)) -> usize {
        if let Some(found) = self.find(key) {
            return found;
        }
        let index = match self.entries.iter().position(|b| b.database == 0) {
            Some(free) => free,
            None => {
                self.reuse = (self.reuse + 1) % ENTRIES;
                self.reuse
            }
        };
        self.entries[index] = Block {
            database: key.0,
            sequence: key.1,
            next: 0,
            end: 0,
        };
        KNOWN_ENTRY.set(index);
        index
    }
}

/// Ids one `nextval` reserves: the sequence's increment (1 before `ALTER EXTENSION certyo_cdc
/// UPDATE` made it 1,024, or if it is not positive).
///
/// # Safety
/// In a backend's main thread, inside a transaction (it reads the syscache); `sequence` a
/// sequence's OID (one not found counts as an increment of 1).
unsafe fn block_size(sequence: Oid) -> i64 {
    // SAFETY: the caller upholds this function's contract (its `# Safety` section), on which
    // every unsafe operation below relies.
    unsafe {
        /// `Anum_pg_sequence_seqincrement` (catalog/pg_sequence.h; not bound by pgrx).
        const SEQINCREMENT: pg_sys::AttrNumber = 4;
        let tuple = pg_sys::SearchSysCache1(
            pg_sys::SysCacheIdentifier::SEQRELID as _,
            pg_sys::Datum::from(sequence),
        );
        if tuple.is_null() {
            return 1;
        }
        let mut null = false;
        let datum = pg_sys::SysCacheGetAttr(
            pg_sys::SysCacheIdentifier::SEQRELID as _,
            tuple,
            SEQINCREMENT,
            &mut null,
        );
        let increment = if null { 1 } else { datum.value() as i64 };
        pg_sys::ReleaseSysCache(tuple);
        increment.max(1)
    }
}

/// # Safety
/// In a backend's main thread, inside a transaction that may write; `sequence` a sequence's
/// OID. Its errors (no such sequence, no right, the limit reached) are PostgreSQL errors.
unsafe fn nextval(sequence: Oid) -> i64 {
    // SAFETY: the caller upholds this function's contract (its `# Safety` section), on which
    // every unsafe operation below relies.
    unsafe { pg_sys::ffi::pg_guard_ffi_boundary(|| nextval_internal(sequence, false)) }
}

#[cfg(test)]
mod tests {
    use super::Block;

    #[test]
    fn a_block_hands_out_its_ids_in_order_then_none() {
        let mut block = Block {
            database: 1,
            sequence: 2,
            next: 1025,
            end: 1027,
        };
        assert_eq!(block.take(), Some(1025));
        assert_eq!(block.take(), Some(1026));
        assert_eq!(block.take(), None);
        assert_eq!(block.take(), None);
    }
}
