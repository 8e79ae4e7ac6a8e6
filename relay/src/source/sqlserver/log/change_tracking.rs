//! Change Tracking: a table's changed rows read with `CHANGETABLE(CHANGES ...)`
//! (`certyo.ReadCtChanges`), by version, in a snapshot transaction.
//!
//! Idempotency key: `{installation}-{schema.table}-{record id}-ct{SYS_CHANGE_VERSION}`. The
//! version reported for a row is that of its latest change, so it moves when the row changes
//! again, the relay's own write-back included. A re-read change whose record has a receipt or
//! dead letter at an earlier (or the same) version, with the same payload and operation, is
//! that change again (only bookkeeping changed since): it is recognised as settled
//! (`SettledChange`), not sent under a new key. Any business change since makes it a new
//! change, with its own key.

use super::{lost, operation, payload, Entry, Pos, Read, SettledChange, State, TableLog};
use crate::source::sqlserver::db::{Cols, Db, Value};
use crate::source::sqlserver::{rfc3339, statements};
use crate::source::{Change, Operation, Result, SourceError};
use std::collections::{HashMap, HashSet};

/// At most `n` changes after the table's progress (`progress`), read in a snapshot so that
/// the bounds and the changes agree.
pub(super) fn read(
    db: &mut dyn Db,
    collection: &str,
    progress: Option<u128>,
    n: usize,
    installation: &str,
) -> Result<Read> {
    db.query(statements::BEGIN_SNAPSHOT, &[])?;
    match read_in_snapshot(db, collection, progress, n, installation) {
        Ok(read) => {
            db.query(statements::END_SNAPSHOT, &[])?;
            Ok(read)
        }
        Err(e) => {
            // The read's own error is the one to report; the rollback only ends the snapshot.
            if let Err(rollback) = db.query(statements::ROLLBACK, &[]) {
                tracing::debug!(%collection, error = %rollback, "ending the snapshot after a failed read failed too");
            }
            Err(e)
        }
    }
}

fn read_in_snapshot(
    db: &mut dyn Db,
    collection: &str,
    progress: Option<u128>,
    n: usize,
    installation: &str,
) -> Result<Read> {
    let bounds = db.query(statements::CT_BOUNDS, &[Value::text(collection)])?;
    let row = bounds.first().ok_or_else(|| {
        SourceError(format!("{collection} is not in certyo.TrackedTable; run certyo.TrackTableChangeTracking for it"))
    })?;
    let c = Cols {
        row,
        what: "the change tracking bounds",
    };
    let current = c.opt_i64(0)?.unwrap_or(0).max(0) as u128;
    let Some(min_valid) = c.opt_i64(1)? else {
        return Err(SourceError(format!(
            "{collection}: change tracking is not enabled on the table (CHANGE_TRACKING_MIN_VALID_VERSION is NULL); \
             run EXEC certyo.TrackTableChangeTracking for it"
        )));
    };
    let Some(progress) = progress else {
        return Err(SourceError(format!(
            "{collection}: certyo.Progress.LastVersion is NULL; run EXEC certyo.TrackTableChangeTracking for it again"
        )));
    };
    if (progress as i64) < min_valid {
        return Err(lost(
            collection,
            format!(
                "change tracking no longer holds the changes after version {progress}: \
                 CHANGE_TRACKING_MIN_VALID_VERSION is {min_valid}"
            ),
        ));
    }
    let read = db.query(
        statements::CT_READ,
        &[
            Value::text(collection),
            Value::int(progress as i64),
            Value::int(n as i64),
        ],
    )?;
    let mut rows = read
        .iter()
        .map(|row| change(row, collection, installation))
        .collect::<Result<Vec<_>>>()?;
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    // WITH TIES: a read cut by the limit still holds every change of its last version.
    let through = match rows.last() {
        Some((last, _)) if rows.len() >= n => last.major,
        _ => current.max(progress),
    };
    Ok(Read { rows, through })
}

fn change(row: &[Value], collection: &str, installation: &str) -> Result<(Pos, Change)> {
    let c = Cols {
        row,
        what: "certyo.ReadCtChanges",
    };
    let version = c.i64(0)?;
    let op = operation(&c.text(1)?, collection)?;
    let record_id = c.text(2)?;
    let pos = Pos {
        major: version.max(0) as u128,
        seqval: Vec::new(),
        record: record_id.clone(),
        operation: String::new(),
    };
    let change = Change {
        id: 0,
        collection: collection.to_string(),
        idempotency_key: format!("{installation}-{collection}-{record_id}-ct{version}"),
        record_id,
        operation: op,
        payload: payload(&c, 3, collection, "TrackTableChangeTracking")?,
        source_timestamp: rfc3339(&c.text(4)?),
        attempts: 0,
    };
    Ok((pos, change))
}

/// Whether `change` is one already settled, read again (see the module's comment).
pub(super) fn settled_before(tl: &TableLog, pos: &Pos, change: &Change) -> bool {
    tl.settled.get(&change.record_id).is_some_and(|s| {
        s.version <= pos.major && s.payload == change.payload && s.operation == change.operation
    })
}

/// What was settled after the persisted progress, loaded once per run: so that a change read
/// again after a restart is recognised.
pub(super) fn load_settled(
    db: &mut dyn Db,
    collection: &str,
    progress: u128,
    tl: &mut TableLog,
) -> Result<()> {
    let rows = db.query(
        statements::CT_SETTLED_SINCE,
        &[Value::text(collection), Value::int(progress as i64)],
    )?;
    for row in &rows {
        let c = Cols {
            row,
            what: "the settled changes",
        };
        let operation = c.text(2)?;
        let settled = SettledChange {
            version: c.i64(0)?.max(0) as u128,
            operation: Operation::parse(&operation).unwrap_or(Operation::Upsert),
            payload: c.text(3)?,
        };
        tl.settled.insert(c.text(1)?, settled); // ordered by version: the latest wins
    }
    Ok(())
}

/// Change Tracking reports one (net) change per row: an unsettled change within the range read
/// (`through`) that is not reported any more (`seen`) was superseded by a later change of its
/// row (which carries the row as it is now), unless it is being sent.
pub(super) fn drop_superseded(
    tl: &mut TableLog,
    ids: &mut HashMap<i64, (String, Pos)>,
    seen: &HashSet<Pos>,
    through: u128,
    in_flight: &HashSet<i64>,
) {
    tl.entries.retain(|pos, e: &mut Entry| {
        let keep = e.state == State::Settled
            || seen.contains(pos)
            || pos.major > through
            || in_flight.contains(&e.change.id);
        if !keep {
            ids.remove(&e.change.id);
        }
        keep
    });
}
