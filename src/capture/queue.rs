//! Appending to `certyo.queue`, the transactional outbox where capture meets delivery.
//!
//! The row is inserted straight into the heap and its indexes, the way Postgres writes its own
//! catalogs (`CatalogTupleInsert`): no SPI plan per row, and no permission check, so a role that
//! may write a tracked table but has no rights on schema `certyo` still has its changes queued
//! (and still cannot read them). Being an ordinary heap insert it is WAL-logged and vanishes
//! with a rolled-back transaction or savepoint.
//!
//! Because nothing else checks them here, every column of the queue is set by this module, in
//! the order of `sql/schema.sql`; `append` refuses a queue whose layout it does not know.

use super::record::Change;
use crate::error::{CertyoError, Result};
use pgrx::pg_sys::{self, Datum, Oid};
use pgrx::PgSqlErrorCode;
use std::cell::RefCell;

/// Columns of `certyo.queue`, in table order.
const QUEUE_COLUMNS: usize = 9;

unsafe extern "C-unwind" {
    /// `commands/sequence.h` (not bound by pgrx). With `check_permissions = false` the writer
    /// needs no privilege on the sequence. Called through `pg_guard_ffi_boundary`: it may ereport.
    fn nextval_internal(relid: Oid, check_permissions: bool) -> i64;
}

/// Queue one change of table `relid`.
///
/// # Safety
/// Must run inside a transaction that may write.
pub unsafe fn append(relid: Oid, collection: &str, change: &Change) -> Result<i64> {
    let (queue, sequence) = target()?;
    let id = pg_sys::ffi::pg_guard_ffi_boundary(|| nextval_internal(sequence, false));
    let key = idempotency_key(queue, id);
    let opened = crate::relation::OpenRelation::open(queue, pg_sys::RowExclusiveLock);
    let rel = opened.get();
    let tupdesc = (*rel).rd_att;
    if (*tupdesc).natts as usize != QUEUE_COLUMNS {
        return Err(CertyoError::new(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "certyo_cdc: certyo.queue does not have the layout this library writes",
        )
        .hint(
            "Run ALTER EXTENSION certyo_cdc UPDATE so the SQL objects match the installed library.",
        ));
    }
    let now = pg_sys::GetCurrentTransactionStartTimestamp();
    let mut values: [Datum; QUEUE_COLUMNS] = [
        Datum::from(id),
        Datum::from(relid),
        text_datum(collection.as_bytes()),
        text_datum(&change.record_id),
        text_datum(change.operation.as_str().as_bytes()),
        text_datum(&change.payload), // json is stored as its text
        Datum::from(change.source_timestamp),
        text_datum(&key),
        Datum::from(now),
    ];
    let mut nulls = [false; QUEUE_COLUMNS];
    let tuple = pg_sys::heap_form_tuple(tupdesc, values.as_mut_ptr(), nulls.as_mut_ptr());
    pg_sys::CatalogTupleInsert(rel, tuple);
    pg_sys::heap_freetuple(tuple);
    drop(opened);
    crate::wake::ring_at_commit();
    Ok(id)
}

/// Where changes go: looked up once per backend, forgotten when the queue's relcache entry is
/// invalidated (so `DROP EXTENSION` / `CREATE EXTENSION` in one session finds the new queue).
struct Target {
    queue: Oid,
    sequence: Oid,
    /// Idempotency keys are `{installation}-{queue id}`: unique per change and stored with
    /// it, so every redelivery sends the same key. The installation is 12 hex digits of
    /// SHA-256 over (system identifier, database, queue table OID): a re-created extension has
    /// a new queue OID, so ids restarting at 1 never reuse a key Certyo has already seen.
    key_prefix: Vec<u8>,
}

thread_local! {
    static TARGET: RefCell<Option<Target>> = const { RefCell::new(None) };
}

/// The queue and its sequence, from the backend's cache (looked up on first use).
unsafe fn target() -> Result<(Oid, Oid)> {
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
    let key_prefix = installation_prefix(
        pg_sys::GetSystemIdentifier(),
        pg_sys::MyDatabaseId.to_u32(),
        queue.to_u32(),
    );
    let target = Target {
        queue,
        sequence,
        key_prefix,
    };
    TARGET.with(|t| t.replace(Some(target)));
    Ok((queue, sequence))
}

/// `{installation}-{id}`, built in one allocation from the cached prefix. No borrow is held
/// across `nextval` (which may process invalidations); if the cache was dropped meanwhile, the
/// prefix is computed again (it depends only on the cluster, database and queue).
unsafe fn idempotency_key(queue: Oid, id: i64) -> Vec<u8> {
    let mut digits = itoa::Buffer::new();
    let digits = digits.format(id).as_bytes();
    let cached = TARGET.with(|t| {
        t.borrow().as_ref().filter(|x| x.queue == queue).map(|x| {
            let mut key = Vec::with_capacity(x.key_prefix.len() + digits.len());
            key.extend_from_slice(&x.key_prefix);
            key.extend_from_slice(digits);
            key
        })
    });
    cached.unwrap_or_else(|| {
        let mut key = installation_prefix(
            pg_sys::GetSystemIdentifier(),
            pg_sys::MyDatabaseId.to_u32(),
            queue.to_u32(),
        );
        key.extend_from_slice(digits);
        key
    })
}

fn installation_prefix(system_identifier: u64, database: u32, queue: u32) -> Vec<u8> {
    use sha2::{Digest, Sha256};
    let digest = Sha256::new()
        .chain_update(system_identifier.to_be_bytes())
        .chain_update(database.to_be_bytes())
        .chain_update(queue.to_be_bytes())
        .finalize();
    let mut prefix: Vec<u8> = digest[..6]
        .iter()
        .flat_map(|b| format!("{b:02x}").into_bytes())
        .collect();
    prefix.push(b'-');
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

unsafe fn text_datum(bytes: &[u8]) -> Datum {
    Datum::from(pg_sys::cstring_to_text_with_len(
        bytes.as_ptr().cast(),
        bytes.len() as i32,
    ))
}

#[cfg(test)]
mod tests {
    use super::installation_prefix;

    #[test]
    fn installation_prefix_is_twelve_hex_digits_and_differs_per_queue() {
        let a = installation_prefix(7, 5, 16387);
        assert_eq!(a.len(), 13);
        assert!(a[..12].iter().all(u8::is_ascii_hexdigit) && a[12] == b'-');
        assert_ne!(a, installation_prefix(7, 5, 16388));
        assert_eq!(a, installation_prefix(7, 5, 16387));
    }
}
