//! Appending to `certyo.queue`, the transactional outbox where capture meets delivery.
//!
//! The row is inserted straight into the heap (and into any index, though the queue has none by
//! design), the way Postgres writes its own catalogs: no SPI plan per row, and no permission
//! check, so a role that may write a tracked table but has no rights on schema `certyo` still
//! has its changes queued (and still cannot read them). Being an ordinary heap insert it is WAL-logged and vanishes
//! with a rolled-back transaction or savepoint.
//!
//! Because nothing else checks them here, every column of the queue is set by this module, in
//! the order of `sql/schema.sql`; `append` refuses a queue whose layout it does not know.

use super::record::Change;
use crate::error::{CertyoError, Result};
use pgrx::pg_sys::{self, Datum, Oid};
use pgrx::PgSqlErrorCode;
use std::cell::{Cell, RefCell};

/// Columns of `certyo.queue`, in table order.
const QUEUE_COLUMNS: usize = 10;

/// Queue one change of table `relid` (identity `table_id`).
///
/// # Safety
/// Must run inside a transaction that may write.
pub unsafe fn append(relid: Oid, table_id: i32, collection: &str, change: &Change) -> Result<i64> {
    // SAFETY: the caller upholds this function's contract (its `# Safety` section), on which
    // every unsafe operation below relies.
    unsafe {
        if change.record_id.is_empty() {
            return Err(empty_record_id(collection));
        }
        let (queue, sequence) = target()?;
        let prefix = key_prefix()?;
        let id = super::ids::draw(sequence);
        let me = Locker::now(queue);
        let locked = me.xid != pg_sys::InvalidTransactionId && LOCKED_IN.get() == Some(me);
        let lock = if locked {
            pg_sys::NoLock
        } else {
            pg_sys::RowExclusiveLock
        };
        let now = super::never_raise::GetCurrentTransactionStartTimestamp();
        let mut digits = itoa::Buffer::new();
        let [collection, record_id, operation, payload, key] = text_columns([
            &[collection.as_bytes()],
            &[&change.record_id],
            &[change.operation.as_str().as_bytes()],
            &[&change.payload], // json is stored as its text
            &[&prefix, digits.format(id).as_bytes()],
        ]);
        let mut values: [Datum; QUEUE_COLUMNS] = [
            Datum::from(id),
            Datum::from(relid),
            collection,
            record_id,
            operation,
            payload,
            Datum::from(change.source_timestamp),
            key,
            Datum::from(now),
            Datum::from(table_id),
        ];
        let inserted = insert_row(queue, lock as pg_sys::LOCKMODE, &mut values);
        super::never_raise::pfree(collection.cast_mut_ptr());
        if !inserted {
            return Err(CertyoError::new(
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                "certyo_cdc: certyo.queue does not have the layout this library writes",
            )
            .hint(
                "Run ALTER EXTENSION certyo_cdc UPDATE so the SQL objects match the installed library.",
            ));
        }
        // The insert gave the (sub)transaction its xid, if it had none: the key is complete now.
        LOCKED_IN.set(Some(Locker::now(queue)));
        crate::wake::ring_at_commit();
        Ok(id)
    }
}

/// Open the queue, form the row, insert it and close the queue, all under one guard; false
/// (nothing inserted) when the queue has not the layout this library writes.
///
/// # Safety
/// In a transaction that may write, with `values` in the queue's column order.
unsafe fn insert_row(
    queue: Oid,
    lock: pg_sys::LOCKMODE,
    values: &mut [Datum; QUEUE_COLUMNS],
) -> bool {
    // SAFETY: the caller upholds this function's contract (its `# Safety` section), on which
    // every unsafe operation below relies.
    unsafe {
        let mut nulls = [false; QUEUE_COLUMNS];
        // SAFETY: in the backend's main thread. The closure holds only references and plain
        // values, nothing an error raised by one of its calls would have to drop on the way back
        // to the guard, and it cannot panic.
        pg_sys::ffi::pg_guard_ffi_boundary(|| {
            let rel = unguarded::table_open(queue, lock);
            let tupdesc = (*rel).rd_att;
            // Or the queue of a schema from before 0.2.0 (the library installed, `ALTER EXTENSION
            // certyo_cdc UPDATE` not yet run), which has no last column, `table_id`: the writer's
            // change is queued all the same, without it.
            let natts = (*tupdesc).natts as usize;
            let fits = natts == QUEUE_COLUMNS || natts == QUEUE_COLUMNS - 1;
            if fits {
                let tuple =
                    unguarded::heap_form_tuple(tupdesc, values.as_mut_ptr(), nulls.as_mut_ptr());
                if (*(*rel).rd_rel).relhasindex {
                    unguarded::CatalogTupleInsert(rel, tuple); // someone indexed the queue: keep it whole
                } else {
                    unguarded::simple_heap_insert(rel, tuple); // as designed: no index to open and fill
                }
                super::never_raise::heap_freetuple(tuple);
            }
            // The lock, if taken, is kept to the end of the transaction, as the executor keeps it.
            unguarded::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
            fits
        })
    }
}

/// The server calls that write the queue row, declared without pgrx's guard: they may raise
/// an error, so they are made only inside the one guard of [`insert_row`], which turns the
/// error into a Rust panic as a guard around each would. A guard a call was 100-140
/// instructions, four a row (callgrind, a 20,000-row `INSERT ... SELECT`).
mod unguarded {
    use pgrx::pg_sys::{Datum, HeapTuple, Oid, Relation, TupleDesc, LOCKMODE};

    unsafe extern "C" {
        pub fn table_open(relid: Oid, lockmode: LOCKMODE) -> Relation;
        pub fn table_close(relation: Relation, lockmode: LOCKMODE);
        pub fn heap_form_tuple(
            tupdesc: TupleDesc,
            values: *mut Datum,
            isnull: *mut bool,
        ) -> HeapTuple;
        pub fn simple_heap_insert(relation: Relation, tuple: HeapTuple);
        pub fn CatalogTupleInsert(relation: Relation, tuple: HeapTuple);
    }
}

/// Who holds the queue's `RowExclusiveLock`: a (sub)transaction, known by its own xid, keeps
/// the lock to its end, so its later changes need not ask the lock manager again (420
/// instructions a row). A subtransaction rolled back released its locks, and the next one has
/// another xid; a released one's locks pass to its parent, which has another xid too and so
/// locks again. The transaction's start time tells apart two transactions that would share an
/// xid after wraparound; the queue's OID, a queue dropped and created again in one session.
#[derive(Clone, Copy, PartialEq)]
struct Locker {
    queue: Oid,
    xid: pg_sys::TransactionId,
    started: pg_sys::TimestampTz,
}

impl Locker {
    /// This (sub)transaction (its xid invalid until it first writes).
    ///
    /// # Safety
    /// In a backend's main thread, inside a transaction.
    unsafe fn now(queue: Oid) -> Locker {
        // SAFETY: the caller upholds this function's contract (its `# Safety` section), on which
        // every unsafe operation below relies.
        unsafe {
            Locker {
                queue,
                xid: super::never_raise::GetCurrentTransactionIdIfAny(),
                started: super::never_raise::GetCurrentTransactionStartTimestamp(),
            }
        }
    }
}

/// Where changes go: looked up once per backend, forgotten when the queue's relcache entry is
/// invalidated (so `DROP EXTENSION` / `CREATE EXTENSION` in one session finds the new queue).
struct Target {
    queue: Oid,
    sequence: Oid,
}

thread_local! {
    static TARGET: RefCell<Option<Target>> = const { RefCell::new(None) };
    /// The (sub)transaction that last took the queue's lock (see [`Locker`]).
    static LOCKED_IN: Cell<Option<Locker>> = const { Cell::new(None) };
    /// This process's part of every idempotency key it writes (see [`key_prefix`]).
    static KEY_PREFIX: Cell<Option<[u8; KEY_PREFIX_LEN]>> = const { Cell::new(None) };
}

/// The queue and its sequence, from the backend's cache (looked up on first use).
///
/// # Safety
/// In a backend's main thread, inside a transaction (it reads the catalogs, and registers
/// the invalidation callbacks once).
unsafe fn target() -> Result<(Oid, Oid)> {
    // SAFETY: the caller upholds this function's contract (its `# Safety` section), on which
    // every unsafe operation below relies.
    unsafe {
        if let Some(found) = TARGET.with(|t| t.borrow().as_ref().map(|x| (x.queue, x.sequence))) {
            return Ok(found);
        }
        super::watch_invalidations();
        let namespace = pg_sys::get_namespace_oid(c"certyo".as_ptr(), true);
        let queue = pg_sys::get_relname_relid(c"queue".as_ptr(), namespace);
        let sequence = pg_sys::get_relname_relid(c"queue_id_seq".as_ptr(), namespace);
        if queue == pg_sys::InvalidOid || sequence == pg_sys::InvalidOid {
            return Err(CertyoError::new(
                PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE,
                "certyo_cdc: table certyo.queue does not exist",
            )
            .hint("CREATE EXTENSION certyo_cdc in this database, or remove the capture triggers with certyo.untrack()."));
        }
        let target = Target { queue, sequence };
        TARGET.with(|t| t.replace(Some(target)));
        Ok((queue, sequence))
    }
}

/// A queue id drawn as capture draws them: ordered with the ids of every change captured
/// before and after it. For the shape history (`crate::shape`).
pub fn draw_id() -> Result<i64> {
    // SAFETY: inside a transaction that may write (the caller records what it drew).
    unsafe {
        let (_, sequence) = target()?;
        Ok(super::ids::draw(sequence))
    }
}

/// Idempotency keys are `{process}-{queue id}`, e.g. `9f2c61d0a4b7e3815c0d2e6f-16`, stored
/// with the change so every redelivery sends the same key. `process` is 96 random bits drawn
/// once per backend process (after the fork, from `pg_strong_random`). The queue id alone is
/// unique on one timeline only: a standby promoted while it lagged, or a restored backup, hands
/// out again ids the old primary already sent, and Certyo would answer those changes as
/// replays of others. Random bits make every key new wherever it was written, at the cost of
/// one draw per process. This is the `{process}-` part.
fn key_prefix() -> Result<[u8; KEY_PREFIX_LEN]> {
    KEY_PREFIX.with(|cell| match cell.get() {
        Some(prefix) => Ok(prefix),
        None => {
            let prefix = process_prefix(&random_bits()?);
            cell.set(Some(prefix));
            Ok(prefix)
        }
    })
}

fn random_bits() -> Result<[u8; 12]> {
    let mut bits = [0u8; 12];
    // SAFETY: fills exactly `bits.len()` bytes of a live buffer; it reports failure by its
    // return value, never by ereport.
    let drawn = unsafe { pg_sys::pg_strong_random(bits.as_mut_ptr().cast(), bits.len()) };
    if !drawn {
        return Err(CertyoError::new(
            PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
            "certyo_cdc: could not generate random bits for idempotency keys",
        )
        .detail("pg_strong_random() failed; the change was not written."));
    }
    Ok(bits)
}

/// 24 hex digits and a dash.
const KEY_PREFIX_LEN: usize = 25;

/// `bits` in hex, then `-`.
fn process_prefix(bits: &[u8; 12]) -> [u8; KEY_PREFIX_LEN] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut prefix = [b'-'; KEY_PREFIX_LEN];
    for (i, byte) in bits.iter().enumerate() {
        prefix[2 * i] = HEX[usize::from(byte >> 4)];
        prefix[2 * i + 1] = HEX[usize::from(byte & 0xf)];
    }
    prefix
}

/// Relcache invalidation of `relid` (invalid: of everything).
pub fn forget(relid: Oid) {
    TARGET.with(|t| {
        if let Ok(mut target) = t.try_borrow_mut() {
            if relid == pg_sys::InvalidOid
                || target
                    .as_ref()
                    .is_some_and(|x| x.queue == relid || x.sequence == relid)
            {
                *target = None;
            }
        }
    });
}

/// The queue row's text columns, each the concatenation of its parts, as `text` datums laid out
/// in one allocation: the first datum is the block (`pfree` it once the tuple is formed). One
/// `palloc` and one copy per column, where a `text` per column cost an allocation each (measured
/// with callgrind: 1,200 instructions a queued change for five columns, 350 this way).
///
/// # Safety
/// In a backend's main thread, inside a memory context that may allocate.
unsafe fn text_columns<const N: usize>(columns: [&[&[u8]]; N]) -> [Datum; N] {
    // SAFETY: the caller upholds this function's contract (its `# Safety` section), on which
    // every unsafe operation below relies.
    unsafe {
        let header = pg_sys::VARHDRSZ;
        let sizes = columns.map(|parts| header + parts.iter().map(|p| p.len()).sum::<usize>());
        // Each varlena starts int-aligned, as its 4-byte header is read as an int.
        let aligned = |size: usize| size.next_multiple_of(4);
        let total = sizes.iter().map(|&s| aligned(s)).sum::<usize>();
        // Too large a total (over 1 GB) is refused by palloc with an ordinary error.
        let block = pg_sys::palloc(total) as *mut u8;
        let mut offset = 0;
        let mut datums = [Datum::from(0); N];
        for ((parts, size), datum) in columns.iter().zip(sizes).zip(datums.iter_mut()) {
            let start = block.add(offset);
            pgrx::varlena::set_varsize_4b(start.cast(), size as i32);
            let mut at = start.add(header);
            for part in *parts {
                std::ptr::copy_nonoverlapping(part.as_ptr(), at, part.len());
                at = at.add(part.len());
            }
            *datum = Datum::from(start);
            offset += aligned(size);
        }
        datums
    }
}

/// Certyo requires a `recordId` and refuses an empty one (400): such a change would be a dead
/// letter, each time, never anchored. Refused where it is written (the trigger, a backfill),
/// as a NULL is; the audit still renders such a row (it was never captured). Only a one-column
/// key renders empty: several columns are joined by `/`.
fn empty_record_id(table: &str) -> CertyoError {
    CertyoError::new(
        PgSqlErrorCode::ERRCODE_CHECK_VIOLATION,
        format!("certyo_cdc: the record id of this row of tracked table {table} is empty"),
    )
    .detail("The record id (the text of the record id columns) is sent to Certyo as recordId, which must not be empty: Certyo would refuse every change of this row. The change was not written.")
    .hint(format!("Give the row a non-empty key (a CHECK constraint can keep it so), or track {table} with other record_id_columns."))
}

#[cfg(test)]
mod tests {
    use super::process_prefix;

    #[test]
    fn the_process_prefix_is_the_bits_in_hex_then_a_dash() {
        let prefix = process_prefix(&[0x9f, 0x2c, 0x00, 0xff, 1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&prefix, b"9f2c00ff0102030405060708-");
    }
}
