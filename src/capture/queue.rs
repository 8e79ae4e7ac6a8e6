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
    let (queue, sequence) = queue_relations()?;
    let id = pg_sys::ffi::pg_guard_ffi_boundary(|| nextval_internal(sequence, false));
    let key = idempotency_key(queue, id);
    let rel = pg_sys::table_open(queue, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE);
    let tupdesc = (*rel).rd_att;
    if (*tupdesc).natts as usize != QUEUE_COLUMNS {
        pg_sys::table_close(rel, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE);
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
        text_datum(key.as_bytes()),
        Datum::from(now),
    ];
    let mut nulls = [false; QUEUE_COLUMNS];
    let tuple = pg_sys::heap_form_tuple(tupdesc, values.as_mut_ptr(), nulls.as_mut_ptr());
    pg_sys::CatalogTupleInsert(rel, tuple);
    pg_sys::heap_freetuple(tuple);
    // Keep the lock to the end of the transaction, as the executor would.
    pg_sys::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
    Ok(id)
}

/// `certyo.queue` and its id sequence, looked up through the syscache (cheap, and never stale
/// across `DROP EXTENSION` / `CREATE EXTENSION` in the same session).
unsafe fn queue_relations() -> Result<(Oid, Oid)> {
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
    Ok((queue, sequence))
}

/// Unique per change for the life of the cluster and stored with it, so every redelivery of
/// the change sends the same key: cluster (system identifier), database, queue table, queue id.
/// The queue table's OID changes when the extension is re-created, so ids restarting at 1
/// never reuse a key that Certyo has already seen.
unsafe fn idempotency_key(queue: Oid, id: i64) -> String {
    format!(
        "pg-{}-{}-{}-{}",
        pg_sys::GetSystemIdentifier(),
        pg_sys::MyDatabaseId.to_u32(),
        queue.to_u32(),
        id
    )
}

unsafe fn text_datum(bytes: &[u8]) -> Datum {
    Datum::from(pg_sys::cstring_to_text_with_len(
        bytes.as_ptr().cast(),
        bytes.len() as i32,
    ))
}
