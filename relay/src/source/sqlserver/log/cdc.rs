//! Change Data Capture: a table's changes read from its capture instance's change table
//! (`certyo.ReadCdcChanges`, over `fn_cdc_get_all_changes`), by LSN.
//!
//! Idempotency key: `{installation}-{schema.table}-{__$start_lsn hex}-{__$seqval hex}-{operation}`.
//! Rows of a CDC change table never change, and all changes are read (not the net changes,
//! whose LSN is that of the latest change in the range read and so moves): the same change
//! always has the same key.

use super::{lost, operation, payload, Pos, Read, TableLog};
use crate::source::sqlserver::db::{Cols, Db, Value};
use crate::source::sqlserver::{rfc3339, statements, Table};
use crate::source::{Change, Result, SourceError};

/// An LSN's 10 bytes as an 80-bit number (positions and progress are numbers).
pub(super) fn lsn_number(bytes: &[u8]) -> Result<u128> {
    if bytes.len() != 10 {
        return Err(SourceError(format!(
            "SQL Server returned an LSN of {} bytes, not 10",
            bytes.len()
        )));
    }
    Ok(bytes.iter().fold(0u128, |n, b| (n << 8) | u128::from(*b)))
}

pub(super) fn lsn_bytes(n: u128) -> Vec<u8> {
    n.to_be_bytes()[6..].to_vec()
}

/// At most `n` changes after the table's progress, up to the newest LSN the capture job has
/// harvested. None: it has harvested nothing yet.
pub(super) fn read(
    db: &mut dyn Db,
    table: &Table,
    tl: &TableLog,
    n: usize,
    installation: &str,
) -> Result<Option<Read>> {
    let collection = table.collection.as_str();
    let instance = table.capture_instance.as_deref().ok_or_else(|| {
        SourceError(format!(
            "{collection} has no capture instance in certyo.TrackedTable; run certyo.TrackTableCdc for it again"
        ))
    })?;
    let bounds = db.query(statements::CDC_BOUNDS, &[Value::text(instance)])?;
    let row = bounds
        .first()
        .ok_or_else(|| SourceError("CDC bounds returned nothing".into()))?;
    let c = Cols {
        row,
        what: "the CDC bounds",
    };
    let min = match c.opt_bin(0)? {
        Some(b) => lsn_number(&b)?,
        None => 0,
    };
    if min == 0 {
        return Err(SourceError(format!(
            "{collection}: CDC knows no capture instance {instance} (is CDC still enabled on the table?); \
             run EXEC certyo.TrackTableCdc for it again"
        )));
    }
    let Some(max) = c.opt_bin(1)?.map(|b| lsn_number(&b)).transpose()? else {
        return Ok(None); // the capture job has harvested nothing yet
    };
    let from = match tl.progress {
        None => min,
        Some(p) => p + 1,
    };
    if tl.progress.is_some() && from < min {
        return Err(lost(
            collection,
            format!(
                "CDC cleanup removed changes: the saved progress is LSN 0x{} and the oldest LSN CDC holds \
                 for {instance} (sys.fn_cdc_get_min_lsn) is 0x{}",
                certyo::to_hex(&lsn_bytes(from - 1)),
                certyo::to_hex(&lsn_bytes(min))
            ),
        ));
    }
    if from > max {
        return Ok(Some(Read {
            rows: Vec::new(),
            through: max.max(from - 1),
        }));
    }
    let read = db.query(
        statements::CDC_READ,
        &[
            Value::text(collection),
            Value::Bin(Some(lsn_bytes(from))),
            Value::Bin(Some(lsn_bytes(max))),
            Value::int(n as i64),
        ],
    )?;
    let rows = read
        .iter()
        .map(|row| change(row, collection, installation))
        .collect::<Result<Vec<_>>>()?;
    let through = match rows.last() {
        // Cut by the limit: the last LSN may have more changes.
        Some((last, _)) if rows.len() >= n => last.major - 1,
        _ => max,
    };
    Ok(Some(Read { rows, through }))
}

fn change(row: &[Value], collection: &str, installation: &str) -> Result<(Pos, Change)> {
    let c = Cols {
        row,
        what: "certyo.ReadCdcChanges",
    };
    let start = c.opt_bin(0)?.unwrap_or_default();
    let seqval = c.opt_bin(1)?.unwrap_or_default();
    let op = operation(&c.text(2)?, collection)?;
    let record_id = c.text(3)?;
    let pos = Pos {
        major: lsn_number(&start)?,
        seqval: seqval.clone(),
        record: String::new(),
        operation: op.as_str().into(),
    };
    let change = Change {
        id: 0,
        collection: collection.to_string(),
        idempotency_key: format!(
            "{installation}-{collection}-{}-{}-{}",
            certyo::to_hex(&start),
            certyo::to_hex(&seqval),
            op.as_str()
        ),
        record_id,
        operation: op,
        payload: payload(&c, 4, collection, "TrackTableCdc")?,
        source_timestamp: rfc3339(&c.text(5)?),
        attempts: 0,
    };
    Ok((pos, change))
}
