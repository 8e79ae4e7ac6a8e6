//! Queue mode: `certyo.Queue` (trigger_queue.sql) holds each change and its delivery state.
//! The idempotency key is the queue's own `{installation}-{Id}` (a persisted computed column):
//! the same row has the same key on every attempt and after every restart, and the random
//! installation part keeps a re-created queue (ids from 1 again) from reusing a key.

use super::db::{Cols, Db, Value};
use super::{millis, rfc3339, statements, write_back_delivered, Table};
use crate::source::{Change, Fate, Operation, Result, SourceError};

pub fn take(
    db: &mut dyn Db,
    limit: usize,
    probing: bool,
    in_flight: &[i64],
) -> Result<Vec<Change>> {
    let in_flight =
        serde_json::to_string(in_flight).map_err(|e| SourceError(format!("in-flight ids: {e}")))?;
    let rows = db.query(
        statements::QUEUE_TAKE,
        &[
            Value::int(limit as i64),
            Value::bool(probing),
            Value::Text(Some(in_flight)),
        ],
    )?;
    let mut changes = Vec::with_capacity(rows.len());
    for row in &rows {
        let c = Cols {
            row,
            what: "certyo.Queue",
        };
        let operation = c.text(3)?;
        changes.push(Change {
            id: c.i64(0)?,
            collection: c.text(1)?,
            record_id: c.text(2)?,
            operation: Operation::parse(&operation).ok_or_else(|| {
                SourceError(format!("certyo.Queue: unknown operation {operation:?}"))
            })?,
            payload: c.text(4)?,
            source_timestamp: rfc3339(&c.text(5)?),
            idempotency_key: c.text(6)?,
            attempts: u32::try_from(c.i64(7)?).unwrap_or(0),
        });
    }
    Ok(changes)
}

/// In the caller's transaction.
pub fn record(db: &mut dyn Db, tables: &[Table], fates: &[(Change, Fate)]) -> Result<()> {
    for (change, fate) in fates {
        match fate {
            Fate::Delivered {
                record_hash,
                replayed,
                verify_after,
            } => {
                let rows = db.query(
                    statements::QUEUE_DELIVERED,
                    &[
                        Value::int(change.id),
                        Value::text(record_hash),
                        Value::bool(*replayed),
                        millis(*verify_after),
                    ],
                )?;
                let newer = match rows.first() {
                    Some(row) => Cols {
                        row,
                        what: "the newer-change check",
                    }
                    .bool(0)?,
                    None => false,
                };
                write_back_delivered(db, tables, change, record_hash, newer)?;
            }
            Fate::Retry { retry_after, error } => {
                db.query(
                    statements::QUEUE_RETRY,
                    &[
                        Value::int(change.id),
                        millis(*retry_after),
                        Value::text(error),
                    ],
                )?;
            }
            Fate::Dead { status, error } => {
                db.query(
                    statements::QUEUE_DEAD,
                    &[
                        Value::int(change.id),
                        Value::int(i64::from(*status)),
                        Value::text(error),
                    ],
                )?;
            }
            Fate::Untouched => {}
        }
    }
    Ok(())
}
