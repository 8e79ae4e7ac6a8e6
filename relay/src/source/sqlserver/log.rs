//! CDC and Change Tracking: changes are read where SQL Server keeps them, after the progress
//! persisted in `certyo.Progress`, and nothing is copied into a queue. The progress of a table
//! advances past a change only when that change and every change before it are delivered
//! (receipt) or dead (dead letter), in the same transaction as their receipts. Changes read
//! after the progress are kept here, by position, with their state: one delivered after a change
//! that is still retrying is not sent again while the relay runs; after a restart it is read
//! again and sent again with the same idempotency key (Certyo answers it as a replay and the
//! receipt is kept once, by key).
//!
//! Idempotency keys, and why each is the same on every read of the same change:
//! - CDC: `{installation}-{schema.table}-{__$start_lsn hex}-{__$seqval hex}-{operation}`. Rows
//!   of a CDC change table never change; cdc.sql reads them with fn_cdc_get_all_changes (not the
//!   net changes, whose LSN is that of the latest change in the range read and so moves).
//! - Change Tracking: `{installation}-{schema.table}-{record id}-ct{SYS_CHANGE_VERSION}`. The
//!   version reported for a row is that of its latest change, so it moves when the row changes
//!   again, the relay's own write-back included. A re-read change whose record has a receipt or
//!   dead letter at an earlier (or the same) version, with the same payload and operation, is
//!   that change again (only bookkeeping changed since): it is recognised as settled, not sent
//!   under a new key. Any business change since makes it a new change, with its own key.
//! - The installation (`certyo.Installation`, random per database) keeps a re-created database,
//!   whose LSNs or versions may repeat, from reusing keys Certyo has seen.

use super::db::{self, Cols, Db, Value};
use super::{millis, rfc3339, statements, write_back_delivered, Mode, Table};
use crate::source::{Change, Fate, Operation, Result, SourceError, Status};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Instant;

/// At most this many changes are read per table and call.
const MAX_READ: usize = 10_000;

#[derive(Default)]
pub struct Log {
    pub installation: Option<String>,
    tables: BTreeMap<String, TableLog>,
    next_id: i64,
    /// Change id → (collection, position), for the changes in the tables' windows.
    ids: HashMap<i64, (String, Pos)>,
}

#[derive(Default)]
struct TableLog {
    loaded: bool,
    /// Persisted: every change at or before it is delivered or dead. CDC: an LSN as an 80-bit
    /// number (None: from the oldest change CDC holds); Change Tracking: a version.
    progress: Option<u128>,
    /// Every change up to this position was returned by the latest read.
    read_through: Option<u128>,
    entries: BTreeMap<Pos, Entry>,
    /// Change Tracking: per record, the latest change settled after the progress.
    settled: HashMap<String, SettledChange>,
    /// The retry state kept in `certyo.Retry` (idempotency key → attempts, milliseconds until
    /// the next attempt), loaded once per run and taken by each change when it is read again:
    /// a restart neither resets a failing change's back-off nor its count of attempts.
    retries: HashMap<String, (u32, i64)>,
}

/// A change's place: CDC (start LSN, seqval, operation); Change Tracking (version, record id).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
struct Pos {
    major: u128,
    seqval: Vec<u8>,
    record: String,
    operation: String,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    Fresh,
    Waiting(Instant),
    Settled,
}

struct Entry {
    change: Change,
    state: State,
}

#[derive(Debug, Clone)]
struct SettledChange {
    version: u128,
    operation: Operation,
    payload: String,
}

pub fn installation(db: &mut dyn Db) -> Result<String> {
    let rows = db.query(statements::INSTALLATION, &[])?;
    match rows.first() {
        Some(row) => Cols {
            row,
            what: "certyo.Installation",
        }
        .text(0),
        None => Err(SourceError(
            "certyo.Installation is empty; run sql/sqlserver/common.sql again".into(),
        )),
    }
}

fn lsn_number(bytes: &[u8]) -> Result<u128> {
    if bytes.len() != 10 {
        return Err(SourceError(format!(
            "SQL Server returned an LSN of {} bytes, not 10",
            bytes.len()
        )));
    }
    Ok(bytes.iter().fold(0u128, |n, b| (n << 8) | u128::from(*b)))
}

fn lsn_bytes(n: u128) -> Vec<u8> {
    n.to_be_bytes()[6..].to_vec()
}

fn split_collection(collection: &str) -> (&str, &str) {
    collection.split_once('.').unwrap_or(("dbo", collection))
}

fn lost(collection: &str, what: String) -> SourceError {
    let (schema, table) = split_collection(collection);
    SourceError(format!(
        "{collection}: {what}. Changes after the saved progress were removed before they were delivered: \
         they cannot be sent any more, and the relay does not skip them silently. To go on, \
         re-initialise the table: EXEC certyo.ResetProgress @SchemaName = N'{schema}', @TableName = N'{table}'; \
         then backfill its current rows (sql/sqlserver/common.sql explains how), and keep the \
         relay running within the retention (or raise the retention)"
    ))
}

impl Log {
    #[allow(clippy::too_many_arguments)]
    fn refresh(
        &mut self,
        db: &mut dyn Db,
        mode: Mode,
        table: &Table,
        limit: usize,
        in_flight: &HashSet<i64>,
        installation: &str,
    ) -> Result<()> {
        let collection = table.collection.as_str();
        let tl = self.tables.entry(collection.to_string()).or_default();
        if !tl.loaded {
            load(db, mode, collection, tl)?;
        }
        let n = (limit + tl.entries.len()).clamp(1, MAX_READ);
        let rows: Vec<(Pos, Change)>;
        let read_through: u128;
        match mode {
            Mode::Cdc => {
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
                    return Ok(()); // the capture job has harvested nothing yet
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
                    rows = Vec::new();
                    read_through = max.max(from - 1);
                } else {
                    let read = db.query(
                        statements::CDC_READ,
                        &[
                            Value::text(collection),
                            Value::Bin(Some(lsn_bytes(from))),
                            Value::Bin(Some(lsn_bytes(max))),
                            Value::int(n as i64),
                        ],
                    )?;
                    rows = read
                        .iter()
                        .map(|row| cdc_change(row, collection, installation))
                        .collect::<Result<_>>()?;
                    read_through = match rows.last() {
                        // Cut by the limit: the last LSN may have more changes.
                        Some((last, _)) if rows.len() >= n => last.major - 1,
                        _ => max,
                    };
                }
            }
            _ => {
                db.query(statements::BEGIN_SNAPSHOT, &[])?;
                let read = ct_read(db, collection, tl.progress, n, installation);
                match read {
                    Ok(r) => {
                        db.query(statements::END_SNAPSHOT, &[])?;
                        (rows, read_through) = r;
                    }
                    Err(e) => {
                        let _ = db.query(statements::ROLLBACK, &[]);
                        return Err(e);
                    }
                }
            }
        }

        let mut seen = HashSet::with_capacity(rows.len());
        for (pos, change) in rows {
            seen.insert(pos.clone());
            if tl.entries.contains_key(&pos) {
                continue;
            }
            let again = mode == Mode::ChangeTracking
                && tl.settled.get(&change.record_id).is_some_and(|s| {
                    s.version <= pos.major
                        && s.payload == change.payload
                        && s.operation == change.operation
                });
            self.next_id += 1;
            let mut change = change;
            change.id = self.next_id;
            self.ids
                .insert(change.id, (collection.to_string(), pos.clone()));
            let mut state = if again { State::Settled } else { State::Fresh };
            if let Some((attempts, due_in_ms)) = tl.retries.remove(&change.idempotency_key) {
                change.attempts = attempts;
                if !again && due_in_ms > 0 {
                    let wait = std::time::Duration::from_millis(due_in_ms as u64);
                    state = State::Waiting(Instant::now() + wait);
                }
            }
            tl.entries.insert(pos, Entry { change, state });
        }
        if mode == Mode::ChangeTracking {
            // Change Tracking reports one (net) change per row: an unsettled change within the
            // range read that is not reported any more was superseded by a later change of its
            // row (which carries the row as it is now).
            let ids = &mut self.ids;
            tl.entries.retain(|pos, e| {
                let keep = e.state == State::Settled
                    || seen.contains(pos)
                    || pos.major > read_through
                    || in_flight.contains(&e.change.id);
                if !keep {
                    ids.remove(&e.change.id);
                }
                keep
            });
        }
        tl.read_through = Some(read_through.max(tl.progress.unwrap_or(0)));
        if let Some(target) = target(tl, &HashMap::new()) {
            save(db, mode, collection, target)?;
            apply_progress(tl, &mut self.ids, target);
        }
        Ok(())
    }

    pub fn take(
        &mut self,
        db: &mut dyn Db,
        mode: Mode,
        tables: &[Table],
        limit: usize,
        probing: bool,
        in_flight: &[i64],
    ) -> Result<Vec<Change>> {
        let installation = self.installation.clone().ok_or_else(|| {
            SourceError(
                "SQL Server: check() has not succeeded yet (installation id unknown)".into(),
            )
        })?;
        let in_flight: HashSet<i64> = in_flight.iter().copied().collect();
        let now = Instant::now();
        let mut per_table = Vec::new();
        for table in tables {
            self.refresh(db, mode, table, limit, &in_flight, &installation)?;
            let Some(tl) = self.tables.get(&table.collection) else {
                continue;
            };
            // Oldest first, at most one per record: a record waits for its earlier change.
            let mut blocked = HashSet::new();
            let mut ready = Vec::new();
            for entry in tl.entries.values() {
                if entry.state == State::Settled {
                    continue;
                }
                if !blocked.insert(entry.change.record_id.clone())
                    || in_flight.contains(&entry.change.id)
                {
                    continue;
                }
                let due = match entry.state {
                    State::Waiting(at) => probing || at <= now,
                    _ => true,
                };
                if due {
                    ready.push(entry.change.clone());
                }
            }
            per_table.push(ready.into_iter());
        }
        // Round robin over the tables, so that a busy table does not starve the others.
        let mut out = Vec::new();
        while out.len() < limit {
            let before = out.len();
            for ready in per_table.iter_mut() {
                if out.len() < limit {
                    if let Some(change) = ready.next() {
                        out.push(change);
                    }
                }
            }
            if out.len() == before {
                break;
            }
        }
        Ok(out)
    }

    pub fn record(
        &mut self,
        db: &mut dyn Db,
        mode: Mode,
        tables: &[Table],
        fates: &[(Change, Fate)],
    ) -> Result<()> {
        let mut states: HashMap<i64, (State, u32)> = HashMap::new();
        let mut touched: HashSet<String> = HashSet::new();
        let ids = &self.ids;
        let logs = &self.tables;
        let targets = db::transaction(db, |db| {
            for (change, fate) in fates {
                let located = ids.get(&change.id);
                let pos = located.map(|(_, p)| p);
                let (version, lsn) = match (mode, pos) {
                    (Mode::ChangeTracking, Some(p)) => {
                        (Value::int(p.major as i64), Value::Bin(None))
                    }
                    (Mode::Cdc, Some(p)) => {
                        (Value::Int(None), Value::Bin(Some(lsn_bytes(p.major))))
                    }
                    _ => (Value::Int(None), Value::Bin(None)),
                };
                match fate {
                    Fate::Delivered {
                        record_hash,
                        replayed,
                        verify_after,
                    } => {
                        db.query(
                            statements::RECEIPT_INSERT,
                            &[
                                Value::text(&change.collection),
                                Value::text(&change.record_id),
                                Value::text(change.operation.as_str()),
                                Value::text(&change.idempotency_key),
                                version,
                                lsn,
                                Value::text(&change.payload),
                                Value::text(record_hash),
                                Value::bool(*replayed),
                                millis(*verify_after),
                            ],
                        )?;
                        // Not over a newer change of the record: the row holds newer content.
                        let newer = match (logs.get(&change.collection), pos) {
                            (Some(tl), Some(pos)) => tl
                                .entries
                                .range(pos.clone()..)
                                .skip(1)
                                .any(|(_, e)| e.change.record_id == change.record_id),
                            _ => false,
                        };
                        write_back_delivered(db, tables, change, record_hash, newer)?;
                        clear_retry(db, change)?;
                        states.insert(change.id, (State::Settled, change.attempts + 1));
                    }
                    Fate::Dead { status, error } => {
                        db.query(
                            statements::DEAD_INSERT,
                            &[
                                Value::text(&change.collection),
                                Value::text(&change.record_id),
                                Value::text(change.operation.as_str()),
                                Value::text(&change.payload),
                                Value::text(&change.source_timestamp),
                                Value::text(&change.idempotency_key),
                                version,
                                lsn,
                                Value::int(i64::from(*status)),
                                Value::text(error),
                            ],
                        )?;
                        clear_retry(db, change)?;
                        states.insert(change.id, (State::Settled, change.attempts + 1));
                    }
                    Fate::Retry { retry_after, error } => {
                        db.query(
                            statements::PROGRESS_ERROR,
                            &[Value::text(&change.collection), Value::text(error)],
                        )?;
                        db.query(
                            statements::RETRY_SAVE,
                            &[
                                Value::text(&change.collection),
                                Value::text(&change.idempotency_key),
                                Value::int(i64::from(change.attempts) + 1),
                                millis(*retry_after),
                                Value::text(error),
                            ],
                        )?;
                        states.insert(
                            change.id,
                            (
                                State::Waiting(Instant::now() + *retry_after),
                                change.attempts + 1,
                            ),
                        );
                    }
                    Fate::Untouched => continue,
                }
                touched.insert(change.collection.clone());
            }
            let mut targets = Vec::new();
            for collection in &touched {
                if let Some(tl) = logs.get(collection) {
                    if let Some(t) = target(tl, &states) {
                        save(db, mode, collection, t)?;
                        targets.push((collection.clone(), t));
                    }
                }
            }
            Ok(targets)
        })?;
        // Committed: now the memory follows.
        for (id, (state, attempts)) in &states {
            if let Some((collection, pos)) = self.ids.get(id) {
                if let Some(entry) = self
                    .tables
                    .get_mut(collection)
                    .and_then(|tl| tl.entries.get_mut(pos))
                {
                    entry.state = *state;
                    entry.change.attempts = *attempts;
                    if *state == State::Settled && mode == Mode::ChangeTracking {
                        let settled = SettledChange {
                            version: pos.major,
                            operation: entry.change.operation,
                            payload: entry.change.payload.clone(),
                        };
                        if let Some(tl) = self.tables.get_mut(collection) {
                            tl.settled.insert(pos.record.clone(), settled);
                        }
                    }
                }
            }
        }
        for (collection, t) in targets {
            if let Some(tl) = self.tables.get_mut(&collection) {
                apply_progress(tl, &mut self.ids, t);
            }
        }
        Ok(())
    }

    pub fn status(&mut self, db: &mut dyn Db, mode: Mode) -> Result<Status> {
        let rows = db.query(statements::LOG_STATUS, &[])?;
        let row = rows
            .first()
            .ok_or_else(|| SourceError("SQL Server: the status returned nothing".into()))?;
        let c = Cols {
            row,
            what: "the receipt status",
        };
        let mut progress = Vec::new();
        for row in &db.query(statements::PROGRESS_ALL, &[Value::text(mode.as_str())])? {
            let p = Cols {
                row,
                what: "certyo.Progress",
            };
            let at = match mode {
                Mode::Cdc => p
                    .opt_bin(1)?
                    .map(|b| format!("LSN 0x{}", certyo::to_hex(&b))),
                _ => p.opt_i64(2)?.map(|v| format!("version {v}")),
            };
            progress.push(format!(
                "{} {}",
                p.text(0)?,
                at.unwrap_or_else(|| "not started".into())
            ));
        }
        // Read and not yet delivered or dead, as of the latest read (not persisted anywhere).
        let pending = self
            .tables
            .values()
            .map(|tl| {
                tl.entries
                    .values()
                    .filter(|e| e.state != State::Settled)
                    .count() as i64
            })
            .sum();
        Ok(Status {
            pending,
            delivered: c.i64(0)?,
            anchored: c.i64(1)?,
            dead: c.i64(2)?,
            last_error: c.opt_text(3)?,
            not_written_back: 0,
            write_back_error: None,
            progress: if progress.is_empty() {
                None
            } else {
                Some(progress.join(", "))
            },
            lease: None,
        })
    }
}

/// The persisted progress; for Change Tracking also what was settled after it (so that a
/// change re-read after a restart is recognised).
fn load(db: &mut dyn Db, mode: Mode, collection: &str, tl: &mut TableLog) -> Result<()> {
    let rows = db.query(statements::PROGRESS_GET, &[Value::text(collection)])?;
    let row = rows.first().ok_or_else(|| {
        SourceError(format!(
            "{collection} has no row in certyo.Progress; run its TrackTable procedure again"
        ))
    })?;
    let c = Cols {
        row,
        what: "certyo.Progress",
    };
    tl.progress = match mode {
        Mode::Cdc => c.opt_bin(0)?.map(|b| lsn_number(&b)).transpose()?,
        _ => c.opt_i64(1)?.map(|v| v.max(0) as u128),
    };
    if mode == Mode::ChangeTracking {
        if let Some(progress) = tl.progress {
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
        }
    }
    let rows = db.query(statements::RETRY_LOAD, &[Value::text(collection)])?;
    for row in &rows {
        let c = Cols {
            row,
            what: "certyo.Retry",
        };
        let attempts = u32::try_from(c.i64(1)?.max(0)).unwrap_or(u32::MAX);
        tl.retries.insert(c.text(0)?, (attempts, c.i64(2)?));
    }
    tl.loaded = true;
    Ok(())
}

/// A change delivered or dead has no retry state any more (none was kept before its first
/// failure).
fn clear_retry(db: &mut dyn Db, change: &Change) -> Result<()> {
    if change.attempts > 0 {
        db.query(
            statements::RETRY_CLEAR,
            &[Value::text(&change.idempotency_key)],
        )?;
    }
    Ok(())
}

fn ct_read(
    db: &mut dyn Db,
    collection: &str,
    progress: Option<u128>,
    n: usize,
    installation: &str,
) -> Result<(Vec<(Pos, Change)>, u128)> {
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
        .map(|row| ct_change(row, collection, installation))
        .collect::<Result<Vec<_>>>()?;
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    // WITH TIES: a read cut by the limit still holds every change of its last version.
    let through = match rows.last() {
        Some((last, _)) if rows.len() >= n => last.major,
        _ => current.max(progress),
    };
    Ok((rows, through))
}

fn operation(text: &str, collection: &str) -> Result<Operation> {
    Operation::parse(text)
        .ok_or_else(|| SourceError(format!("{collection}: unknown operation {text:?} read")))
}

fn payload(c: &Cols, i: usize, collection: &str, function: &str) -> Result<String> {
    c.opt_text(i)?.ok_or_else(|| {
        SourceError(format!(
            "{collection}: a change was read without a payload; re-run EXEC certyo.{function} for the table \
             (this version sends the key columns as a delete's payload)"
        ))
    })
}

fn cdc_change(row: &[Value], collection: &str, installation: &str) -> Result<(Pos, Change)> {
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

fn ct_change(row: &[Value], collection: &str, installation: &str) -> Result<(Pos, Change)> {
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

/// The progress the table may advance to, given `overrides` of entries' states: up to the
/// first change not settled (exclusive), at most what the latest read covered. None when it
/// would not advance.
fn target(tl: &TableLog, overrides: &HashMap<i64, (State, u32)>) -> Option<u128> {
    let mut to = tl.read_through?;
    let state = |e: &Entry| overrides.get(&e.change.id).map(|s| s.0).unwrap_or(e.state);
    if let Some((pos, _)) = tl.entries.iter().find(|(_, e)| state(e) != State::Settled) {
        to = to.min(pos.major.saturating_sub(1));
    }
    match tl.progress {
        Some(p) if to <= p => None,
        _ => Some(to),
    }
}

fn save(db: &mut dyn Db, mode: Mode, collection: &str, to: u128) -> Result<()> {
    let rows = match mode {
        Mode::Cdc => db.query(
            statements::PROGRESS_SAVE_LSN,
            &[Value::text(collection), Value::Bin(Some(lsn_bytes(to)))],
        )?,
        _ => db.query(
            statements::PROGRESS_SAVE_VERSION,
            &[Value::text(collection), Value::int(to as i64)],
        )?,
    };
    let saved = match rows.first() {
        Some(row) => Cols {
            row,
            what: "the progress update",
        }
        .i64(0)?,
        None => 0,
    };
    if saved == 0 {
        return Err(SourceError(format!(
            "{collection} has no row in certyo.Progress; run its TrackTable procedure again"
        )));
    }
    Ok(())
}

fn apply_progress(tl: &mut TableLog, ids: &mut HashMap<i64, (String, Pos)>, to: u128) {
    tl.progress = Some(to);
    let kept = tl.entries.split_off(&Pos {
        major: to + 1,
        seqval: Vec::new(),
        record: String::new(),
        operation: String::new(),
    });
    for entry in std::mem::replace(&mut tl.entries, kept).into_values() {
        ids.remove(&entry.change.id);
    }
    tl.settled.retain(|_, s| s.version > to);
}
