//! The entry: one change taken for sending, read from a row of the queue or of
//! `certyo.delivery`, its payload read only when it fits the batch.

use super::SpiResult;
use certyo::Operation;
use pgrx::pg_sys::Oid;
use pgrx::prelude::*;

/// One change ready to send.
#[derive(Debug, Clone)]
pub struct Entry {
    pub id: i64,
    pub relid: Oid,
    pub collection: String,
    pub record_id: String,
    pub operation: Operation,
    /// The payload's text; empty when it is too large to send (`payload_size` says how large),
    /// and once it has gone into the record being sent.
    pub payload: String,
    /// Bytes of the payload's text, read from its header (a large payload is not read).
    pub payload_size: usize,
    /// SHA-256 of the payload sent, in hex: set when the record is made.
    pub payload_sha256: String,
    /// The digests of its columns (`certyo::column_sha256`), in hex: set with `payload_sha256`.
    pub column_sha256: String,
    pub source_timestamp: String,
    pub idempotency_key: String,
    /// Failed attempts so far: the next transient failure waits longer.
    pub attempts: i32,
    /// Where the change was taken from: its row in `certyo.queue` (`ctid` as text), or None
    /// for a row of `certyo.delivery`.
    pub queue_row: Option<String>,
}

/// A batch read from its table: the entries, in id order, and the ids left out because the
/// payloads before them filled the batch.
#[derive(Default)]
pub(super) struct Fetched {
    pub(super) entries: Vec<Entry>,
    pub(super) left_out: Vec<i64>,
}

/// Entries from rows of `TAKE` or `TAKE_FROM_QUEUE` (the same columns), in id order, as many as
/// `max_bytes` of payload allow (see [`certyo::batch::fitting`]). A payload's size is read from
/// its header before its text: one left out, or too large to send, is never read into memory.
pub(super) fn entries_of(
    mut rows: pgrx::spi::SpiTupleTable<'_>,
    max_bytes: usize,
) -> SpiResult<Fetched> {
    let mut read = Vec::new();
    while let Some(row) = rows.next() {
        let payload = rows.get_datum_by_ordinal(6)?;
        let entry = Entry {
            id: row.get::<i64>(1)?.unwrap_or_default(),
            relid: row.get::<Oid>(2)?.unwrap_or(pg_sys::InvalidOid),
            collection: row.get::<String>(3)?.unwrap_or_default(),
            record_id: row.get::<String>(4)?.unwrap_or_default(),
            // The queue admits only the four operations (its CHECK), and certyo.delivery is
            // filled from the queue.
            operation: row
                .get::<String>(5)?
                .and_then(|text| Operation::parse(&text))
                .unwrap_or(Operation::Upsert),
            payload: String::new(),
            // SAFETY: column 6 is the payload, a json (varlena) value of a row of this table.
            payload_size: payload.map_or(0, |d| unsafe { text_size(d) }),
            payload_sha256: String::new(),
            column_sha256: String::new(),
            source_timestamp: row.get::<String>(7)?.unwrap_or_default(),
            idempotency_key: row.get::<String>(8)?.unwrap_or_default(),
            attempts: row.get::<i32>(9)?.unwrap_or_default(),
            queue_row: row.get::<String>(10)?,
        };
        read.push((entry, payload));
    }
    read.sort_by_key(|(e, _)| e.id);
    let kept = certyo::batch::fitting(read.iter().map(|(e, _)| e.payload_size), max_bytes);
    let left_out = read
        .split_off(kept)
        .into_iter()
        .map(|(e, _)| e.id)
        .collect();
    let entries = read
        .into_iter()
        .map(|(mut entry, payload)| {
            if entry.payload_size <= max_bytes {
                // SAFETY: as above; the row (and so the datum) lives as long as `rows`.
                entry.payload = payload.map_or_else(|| "{}".into(), |d| unsafe { text_of(d) });
            }
            entry
        })
        .collect();
    Ok(Fetched { entries, left_out })
}

/// Bytes of a text-like value's contents, from its header: a TOASTed value is not read.
///
/// # Safety
/// `datum` must be a varlena value (text, json) that lives while this runs.
unsafe fn text_size(datum: pg_sys::Datum) -> usize {
    // SAFETY: the caller upholds this function's contract (its `# Safety` section), on which
    // every unsafe operation below relies.
    unsafe { pg_sys::toast_raw_datum_size(datum).saturating_sub(pg_sys::VARHDRSZ) }
}

/// A text-like value's contents, read (and decompressed) in full.
///
/// # Safety
/// As for [`text_size`].
unsafe fn text_of(datum: pg_sys::Datum) -> String {
    // SAFETY: the caller upholds this function's contract (its `# Safety` section), on which
    // every unsafe operation below relies.
    unsafe {
        <String as pgrx::FromDatum>::from_polymorphic_datum(datum, false, pg_sys::TEXTOID)
            .unwrap_or_default()
    }
}
