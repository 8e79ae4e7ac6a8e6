//! CDC and Change Tracking: changes are read where SQL Server keeps them, after the progress
//! persisted in `certyo.Progress`, and nothing is copied into a queue. The progress of a table
//! advances past a change only when that change and every change before it are delivered
//! (receipt) or dead (dead letter), in the same transaction as their receipts. Changes read
//! after the progress are kept here, by position, with their state: one delivered after a change
//! that is still retrying is not sent again while the relay runs; after a restart it is read
//! again and sent again with the same idempotency key (Certyo answers it as a replay and the
//! receipt is kept once, by key).
//!
//! How each mode reads, and why a change's idempotency key is the same on every read of it:
//! `cdc` and `change_tracking`. The installation (`certyo.Installation`, random per database)
//! keeps a re-created database, whose LSNs or versions may repeat, from reusing keys Certyo has
//! seen.

mod cdc;
mod change_tracking;

use super::db::{self, Cols, Db, Value};
use super::{millis, statements, write_back_delivered, Mode, Table};
use crate::source::{Change, Fate, Operation, Result, SourceError, Status};
use cdc::lsn_bytes;
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

/// What a read returned: changes with their positions, and the position every change up to
/// which it covered.
struct Read {
    rows: Vec<(Pos, Change)>,
    through: u128,
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
    /// Read the table's changes after what is kept, and keep the new ones; advance the
    /// progress past what is settled.
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
        let read = match mode {
            Mode::Cdc => match cdc::read(db, table, tl, n, installation)? {
                Some(read) => read,
                None => return Ok(()),
            },
            _ => change_tracking::read(db, collection, tl.progress, n, installation)?,
        };
        let mut seen = HashSet::with_capacity(read.rows.len());
        for (pos, change) in read.rows {
            seen.insert(pos.clone());
            if tl.entries.contains_key(&pos) {
                continue;
            }
            let again =
                mode == Mode::ChangeTracking && change_tracking::settled_before(tl, &pos, &change);
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
            change_tracking::drop_superseded(tl, &mut self.ids, &seen, read.through, in_flight);
        }
        tl.read_through = Some(read.through.max(tl.progress.unwrap_or(0)));
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

    /// Record each change's fate (receipt and write-back, dead letter, or retry state) and the
    /// progress it allows, in one transaction; then the kept changes follow what committed.
    pub fn record(
        &mut self,
        db: &mut dyn Db,
        mode: Mode,
        tables: &[Table],
        fates: &[(Change, Fate)],
    ) -> Result<()> {
        let mut states: HashMap<i64, (State, u32)> = HashMap::new();
        let mut touched: HashSet<String> = HashSet::new();
        let logs = &self.tables;
        let ids = &self.ids;
        let targets = db::transaction(db, |db| {
            for (change, fate) in fates {
                let pos = ids.get(&change.id).map(|(_, p)| p);
                let newer = || match (logs.get(&change.collection), pos) {
                    (Some(tl), Some(pos)) => tl
                        .entries
                        .range(pos.clone()..)
                        .skip(1)
                        .any(|(_, e)| e.change.record_id == change.record_id),
                    _ => false,
                };
                if let Some(state) = write_fate(db, mode, tables, change, fate, pos, newer)? {
                    states.insert(change.id, (state, change.attempts + 1));
                    touched.insert(change.collection.clone());
                }
            }
            let mut targets = Vec::new();
            for collection in &touched {
                if let Some(t) = logs.get(collection).and_then(|tl| target(tl, &states)) {
                    save(db, mode, collection, t)?;
                    targets.push((collection.clone(), t));
                }
            }
            Ok(targets)
        })?;
        // Committed: now the memory follows.
        for (id, (state, attempts)) in &states {
            self.settle(mode, *id, *state, *attempts);
        }
        for (collection, t) in targets {
            if let Some(tl) = self.tables.get_mut(&collection) {
                apply_progress(tl, &mut self.ids, t);
            }
        }
        Ok(())
    }

    /// A kept change takes the state its fate committed; a settled Change Tracking change is
    /// remembered as settled for its record (see `change_tracking`).
    fn settle(&mut self, mode: Mode, id: i64, state: State, attempts: u32) {
        let Some((collection, pos)) = self.ids.get(&id) else {
            return;
        };
        let Some(tl) = self.tables.get_mut(collection) else {
            return;
        };
        let Some(entry) = tl.entries.get_mut(pos) else {
            return;
        };
        entry.state = state;
        entry.change.attempts = attempts;
        if state == State::Settled && mode == Mode::ChangeTracking {
            let settled = SettledChange {
                version: pos.major,
                operation: entry.change.operation,
                payload: entry.change.payload.clone(),
            };
            tl.settled.insert(pos.record.clone(), settled);
        }
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

/// Write one change's fate in the caller's transaction: a receipt (and the row's write-back,
/// unless a newer change of the record is kept: the row holds newer content), a dead letter, or
/// its retry state. Returns the change's new state; None when the fate leaves it untouched.
fn write_fate(
    db: &mut dyn Db,
    mode: Mode,
    tables: &[Table],
    change: &Change,
    fate: &Fate,
    pos: Option<&Pos>,
    newer: impl FnOnce() -> bool,
) -> Result<Option<State>> {
    let (version, lsn) = match (mode, pos) {
        (Mode::ChangeTracking, Some(p)) => (Value::int(p.major as i64), Value::Bin(None)),
        (Mode::Cdc, Some(p)) => (Value::Int(None), Value::Bin(Some(lsn_bytes(p.major)))),
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
            write_back_delivered(db, tables, change, record_hash, newer())?;
            clear_retry(db, change)?;
            Ok(Some(State::Settled))
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
            Ok(Some(State::Settled))
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
            Ok(Some(State::Waiting(Instant::now() + *retry_after)))
        }
        Fate::Untouched => Ok(None),
    }
}

/// The persisted progress; for Change Tracking also what was settled after it (so that a
/// change re-read after a restart is recognised); the retry state of changes that failed.
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
        Mode::Cdc => c.opt_bin(0)?.map(|b| cdc::lsn_number(&b)).transpose()?,
        _ => c.opt_i64(1)?.map(|v| v.max(0) as u128),
    };
    if mode == Mode::ChangeTracking {
        if let Some(progress) = tl.progress {
            change_tracking::load_settled(db, collection, progress, tl)?;
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
