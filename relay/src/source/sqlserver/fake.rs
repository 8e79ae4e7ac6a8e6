//! An in-memory SQL Server for the tests: it answers each statement of `statements.rs` the way
//! the companion scripts' objects do (queue rows and their state, CDC change rows by LSN with an
//! update mask reduced to "a business column changed", Change Tracking's net changes by version
//! with the row as it is now and a minimum valid version that can move), with transactions.

use super::db::{Db, Row, Value};
use super::statements as s;
use crate::source::{Result, SourceError};
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

#[derive(Clone, Debug, Default)]
pub struct QueueRow {
    pub id: i64,
    pub collection: String,
    pub record_id: String,
    pub operation: String,
    pub payload: String,
    pub status: String,
    pub attempts: i64,
    pub next_attempt_at: Option<i64>,
    pub last_status: Option<i64>,
    pub last_error: Option<String>,
    pub record_hash: Option<String>,
    pub delivered_at: Option<i64>,
    pub anchor_status: Option<String>,
    pub next_verify_at: Option<i64>,
    pub verify_attempts: i64,
    pub polygon_tx_hash: Option<String>,
    pub reported_hash: Option<String>,
}

#[derive(Clone, Debug, Default)]
pub struct Receipt {
    pub id: i64,
    pub collection: String,
    pub record_id: String,
    pub operation: String,
    pub key: String,
    pub version: Option<i64>,
    pub lsn: Option<Vec<u8>>,
    pub payload: String,
    pub hash: String,
    pub accepted_at: i64,
    pub anchor_status: String,
    pub next_verify_at: Option<i64>,
    pub verify_attempts: i64,
}

#[derive(Clone, Debug, Default)]
pub struct DeadLetter {
    pub collection: String,
    pub record_id: String,
    pub key: String,
    pub version: Option<i64>,
    pub payload: String,
    pub operation: String,
    pub status: i64,
    pub error: String,
}

/// A tracked table's row: its business content and bookkeeping columns.
#[derive(Clone, Debug, Default)]
pub struct SourceRow {
    pub payload: String,
    pub hash: Option<String>,
    pub anchor_status: Option<String>,
}

#[derive(Clone, Debug)]
pub struct CdcRow {
    pub collection: String,
    pub lsn: u128,
    pub seqval: u128,
    pub operation: u8, // 1 delete, 2 insert, 4 update (after image)
    pub record_id: String,
    pub payload: String,
    pub business: bool, // the update mask holds a business column
}

#[derive(Clone, Debug)]
pub struct CtRow {
    pub collection: String,
    pub version: i64,
    pub record_id: String,
    pub operation: char, // I, U, D
    pub business: bool,
}

/// (LastLsn, LastVersion, LastError) of `certyo.Progress`.
pub type ProgressRow = (Option<Vec<u8>>, Option<i64>, Option<String>);
/// (collection, keys JSON, hash, anchor status, only-if hash) of a `certyo.WriteBack` call.
pub type WriteBackCall = (String, String, Option<String>, String, Option<String>);

#[derive(Clone, Debug, Default)]
pub struct State {
    pub now_ms: i64,
    pub installation: String,
    /// (collection, mode, key columns, capture instance)
    pub tracked: Vec<(String, String, i64, Option<String>)>,
    pub queue: Vec<QueueRow>,
    /// collection → (LastLsn, LastVersion, LastError)
    pub progress: BTreeMap<String, ProgressRow>,
    pub receipts: Vec<Receipt>,
    pub dead: Vec<DeadLetter>,
    pub rows: BTreeMap<(String, String), SourceRow>,
    pub cdc: Vec<CdcRow>,
    pub cdc_min: BTreeMap<String, u128>,
    pub ct: Vec<CtRow>,
    pub ct_version: i64,
    pub ct_min_valid: BTreeMap<String, i64>,
    /// Every write-back: (collection, keys JSON, hash, status, only-if hash).
    pub write_backs: Vec<WriteBackCall>,
    /// Statements sent, in order.
    pub sent: Vec<&'static str>,
    /// Fail the next statement equal to this one (once).
    pub fail: Option<&'static str>,
    /// `certyo.Retry`: (collection, key, attempts, next attempt at (ms), error).
    pub retries: Vec<(String, String, i64, i64, String)>,
    /// The session (fake connection) holding the relays' application lock, if any.
    pub applock: Option<u64>,
}

pub fn lsn(n: u128) -> Vec<u8> {
    n.to_be_bytes()[6..].to_vec()
}

fn lsn_n(b: &[u8]) -> u128 {
    b.iter().fold(0u128, |n, x| (n << 8) | u128::from(*x))
}

impl State {
    pub fn mode_of(&self, collection: &str) -> Option<String> {
        self.tracked
            .iter()
            .find(|t| t.0 == collection)
            .map(|t| t.1.clone())
    }

    fn next_lsn(&self) -> u128 {
        self.cdc.iter().map(|r| r.lsn).max().unwrap_or(0x1000) + 1
    }

    /// A change made by a user (or by the write-back, `business` false), captured as the mode
    /// of the table does.
    /// `EXEC certyo.ResetProgress` (common.sql): the progress at the newest LSN or version,
    /// the table's retry state gone.
    pub fn reset_progress(&mut self, collection: &str) {
        let newest_lsn = self.cdc.iter().map(|r| r.lsn).max();
        let version = self.ct_version;
        let mode = self.mode_of(collection);
        if let Some(p) = self.progress.get_mut(collection) {
            match mode.as_deref() {
                Some("cdc") => p.0 = newest_lsn.map(lsn),
                _ => p.1 = Some(version),
            }
            p.2 = Some("progress reset by certyo.ResetProgress".into());
        }
        self.retries.retain(|r| r.0 != collection);
    }

    pub fn write(
        &mut self,
        collection: &str,
        record_id: &str,
        payload: Option<&str>,
        business: bool,
    ) {
        let key = (collection.to_string(), record_id.to_string());
        let existed = self.rows.contains_key(&key);
        let operation = match (existed, payload) {
            (_, None) => 'D',
            (false, Some(_)) => 'I',
            (true, Some(_)) => 'U',
        };
        let image = match payload {
            Some(p) => {
                let row = self.rows.entry(key.clone()).or_default();
                row.payload = p.to_string();
                p.to_string()
            }
            None => self
                .rows
                .remove(&key)
                .map(|r| r.payload)
                .unwrap_or_default(),
        };
        match self.mode_of(collection).as_deref() {
            Some("cdc") => {
                let lsn = self.next_lsn();
                self.cdc.push(CdcRow {
                    collection: collection.into(),
                    lsn,
                    seqval: 1,
                    operation: match operation {
                        'D' => 1,
                        'I' => 2,
                        _ => 4,
                    },
                    record_id: record_id.into(),
                    payload: image,
                    business,
                });
            }
            Some("change_tracking") => {
                self.ct_version += 1;
                self.ct.push(CtRow {
                    collection: collection.into(),
                    version: self.ct_version,
                    record_id: record_id.into(),
                    operation,
                    business,
                });
            }
            Some("queue") if business => {
                // The trigger queues business changes only (its filter leaves out bookkeeping).
                let id = self.queue.len() as i64 + 1;
                self.queue.push(QueueRow {
                    id,
                    collection: collection.into(),
                    record_id: record_id.into(),
                    operation: match operation {
                        'D' => "delete",
                        'I' => "insert",
                        _ => "update",
                    }
                    .into(),
                    payload: image,
                    status: "pending".into(),
                    ..QueueRow::default()
                });
            }
            _ => {}
        }
    }

    fn bookkeeping(
        &mut self,
        collection: &str,
        record_id: &str,
        hash: Option<String>,
        status: &str,
        only_if: Option<String>,
    ) {
        let key = (collection.to_string(), record_id.to_string());
        let Some(row) = self.rows.get_mut(&key) else {
            return;
        };
        if only_if.is_some() && row.hash != only_if {
            return;
        }
        if let Some(h) = hash {
            row.hash = Some(h);
        }
        row.anchor_status = Some(status.to_string());
        let payload = row.payload.clone();
        self.write(collection, record_id, Some(&payload), false);
    }
}

pub struct Fake {
    pub state: Arc<Mutex<State>>,
    saved: Option<State>,
    /// This connection's session, for the application lock it may own.
    session: u64,
}

static SESSIONS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl Fake {
    pub fn new(state: Arc<Mutex<State>>) -> Fake {
        let session = SESSIONS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Fake {
            state,
            saved: None,
            session,
        }
    }
}

/// The session ends (a relay killed, a connection lost): SQL Server releases its locks.
impl Drop for Fake {
    fn drop(&mut self) {
        if let Ok(mut st) = self.state.lock() {
            if st.applock == Some(self.session) {
                st.applock = None;
            }
        }
    }
}

fn int(v: &Value) -> i64 {
    match v {
        Value::Int(Some(i)) => *i,
        Value::Bool(Some(b)) => i64::from(*b),
        _ => 0,
    }
}

fn text(v: &Value) -> Option<String> {
    match v {
        Value::Text(t) => t.clone(),
        _ => None,
    }
}

fn bin(v: &Value) -> Option<Vec<u8>> {
    match v {
        Value::Bin(b) => b.clone(),
        _ => None,
    }
}

const TS: &str = "2026-04-14 10:30:00.1234560";

fn t(v: &str) -> Value {
    Value::text(v)
}

fn record_key(payload_keys: &str) -> String {
    // The fake's tables have a one-column key "Id".
    format!("{{\"Id\":\"{payload_keys}\"}}")
}

impl Db for Fake {
    fn query(&mut self, sql: &'static str, p: &[Value]) -> Result<Vec<Row>> {
        let mut guard = self
            .state
            .lock()
            .map_err(|_| SourceError("fake poisoned".into()))?;
        let st = &mut *guard;
        st.sent.push(sql);
        if st.fail == Some(sql) {
            st.fail = None;
            return Err(SourceError("fake: injected failure".into()));
        }
        let now = st.now_ms;
        let mut out: Vec<Row> = Vec::new();
        match sql {
            x if x == s::BEGIN || x == s::BEGIN_SNAPSHOT => self.saved = Some(st.clone()),
            x if x == s::COMMIT || x == s::END_SNAPSHOT => self.saved = None,
            x if x == s::ROLLBACK => {
                if let Some(saved) = self.saved.take() {
                    let sent = std::mem::take(&mut st.sent);
                    *st = saved;
                    st.sent = sent;
                }
            }
            x if x == s::CHECK_OBJECTS => out.push(vec![Value::int(1); 6]),
            x if x == s::LEASE_TAKE => {
                let held = match st.applock {
                    None => {
                        st.applock = Some(self.session);
                        true
                    }
                    Some(holder) => holder == self.session,
                };
                out.push(vec![Value::int(i64::from(held))]);
            }
            x if x == s::LEASE_FREE => out.push(vec![Value::int(i64::from(st.applock.is_none()))]),
            x if x == s::RETRY_SAVE => {
                let key = text(&p[1]).unwrap_or_default();
                st.retries.retain(|r| r.1 != key);
                st.retries.push((
                    text(&p[0]).unwrap_or_default(),
                    key,
                    int(&p[2]),
                    now + int(&p[3]),
                    text(&p[4]).unwrap_or_default(),
                ));
            }
            x if x == s::RETRY_CLEAR => {
                let key = text(&p[0]).unwrap_or_default();
                st.retries.retain(|r| r.1 != key);
            }
            x if x == s::RETRY_LOAD => {
                let collection = text(&p[0]).unwrap_or_default();
                for r in st.retries.iter().filter(|r| r.0 == collection) {
                    out.push(vec![t(&r.1), Value::int(r.2), Value::int(r.3 - now)]);
                }
            }
            x if x == s::INSTALLATION => out.push(vec![t(&st.installation)]),
            x if x == s::TRACKED_TABLES => {
                let mode = text(&p[0]);
                for (c, m, k, ci) in &st.tracked {
                    if Some(m) == mode.as_ref() {
                        out.push(vec![t(c), Value::int(*k), Value::Text(ci.clone())]);
                    }
                }
            }
            x if x == s::WRITE_BACK => {
                let collection = text(&p[0]).unwrap_or_default();
                let keys = text(&p[1]).unwrap_or_default();
                let parts: Vec<String> =
                    serde_json::from_str(&keys).map_err(|e| SourceError(e.to_string()))?;
                st.write_backs.push((
                    collection.clone(),
                    keys,
                    text(&p[2]),
                    text(&p[3]).unwrap_or_default(),
                    text(&p[4]),
                ));
                st.bookkeeping(
                    &collection,
                    &parts.join("/"),
                    text(&p[2]),
                    &text(&p[3]).unwrap_or_default(),
                    text(&p[4]),
                );
            }
            x if x == s::QUEUE_TAKE => {
                let (limit, probing) = (int(&p[0]) as usize, int(&p[1]) == 1);
                let in_flight: Vec<i64> =
                    serde_json::from_str(&text(&p[2]).unwrap_or_default()).unwrap_or_default();
                for q in &st.queue {
                    let earlier = st.queue.iter().any(|e| {
                        e.collection == q.collection
                            && e.record_id == q.record_id
                            && e.id < q.id
                            && e.status == "pending"
                    });
                    if q.status == "pending"
                        && (probing || q.next_attempt_at.is_none_or(|at| at <= now))
                        && !in_flight.contains(&q.id)
                        && !earlier
                        && out.len() < limit
                    {
                        out.push(vec![
                            Value::int(q.id),
                            t(&q.collection),
                            t(&q.record_id),
                            t(&q.operation),
                            t(&q.payload),
                            t(TS),
                            t(&format!("abcdef012345-{}", q.id)),
                            Value::int(q.attempts),
                        ]);
                    }
                }
            }
            x if x == s::QUEUE_DELIVERED => {
                let id = int(&p[0]);
                let mut record = None;
                if let Some(q) = st
                    .queue
                    .iter_mut()
                    .find(|q| q.id == id && q.status == "pending")
                {
                    q.status = "delivered".into();
                    q.record_hash = text(&p[1]);
                    q.delivered_at = Some(now);
                    q.attempts += 1;
                    q.last_status = Some(202);
                    q.last_error = None;
                    q.anchor_status = Some("pending".into());
                    q.next_verify_at = Some(now + int(&p[3]));
                    record = Some((q.collection.clone(), q.record_id.clone()));
                }
                let newer = record.is_some_and(|(c, r)| {
                    st.queue.iter().any(|l| {
                        l.collection == c && l.record_id == r && l.id > id && l.status != "dead"
                    })
                });
                out.push(vec![Value::int(i64::from(newer))]);
            }
            x if x == s::QUEUE_RETRY => {
                if let Some(q) = st
                    .queue
                    .iter_mut()
                    .find(|q| q.id == int(&p[0]) && q.status == "pending")
                {
                    q.attempts += 1;
                    q.last_error = text(&p[2]);
                    q.next_attempt_at = Some(now + int(&p[1]));
                }
            }
            x if x == s::QUEUE_DEAD => {
                if let Some(q) = st
                    .queue
                    .iter_mut()
                    .find(|q| q.id == int(&p[0]) && q.status == "pending")
                {
                    q.status = "dead".into();
                    q.attempts += 1;
                    q.last_status = Some(int(&p[1]));
                    q.last_error = text(&p[2]);
                }
            }
            x if x == s::QUEUE_DUE => {
                let mut due: Vec<&QueueRow> = st
                    .queue
                    .iter()
                    .filter(|q| {
                        q.status == "delivered"
                            && matches!(q.anchor_status.as_deref(), Some("pending" | "overdue"))
                            && q.next_verify_at.is_some_and(|at| at <= now)
                    })
                    .collect();
                due.sort_by_key(|q| (q.next_verify_at, q.id));
                for q in due.into_iter().take(int(&p[0]) as usize) {
                    out.push(vec![
                        Value::int(q.id),
                        t(&q.collection),
                        t(&q.record_id),
                        t(&q.operation),
                        Value::Text(q.record_hash.clone()),
                        Value::int(q.verify_attempts),
                        Value::int((now - q.delivered_at.unwrap_or(now)) / 1000),
                    ]);
                }
            }
            x if x == s::QUEUE_ANCHORED || x == s::QUEUE_MISMATCH || x == s::QUEUE_LATER => {
                if let Some(q) = st.queue.iter_mut().find(|q| q.id == int(&p[0])) {
                    q.verify_attempts += 1;
                    if x == s::QUEUE_ANCHORED {
                        q.anchor_status = Some("anchored".into());
                        q.polygon_tx_hash = text(&p[1]);
                        q.next_verify_at = None;
                    } else if x == s::QUEUE_MISMATCH {
                        q.anchor_status = Some("mismatch".into());
                        q.reported_hash = text(&p[1]);
                        q.next_verify_at = None;
                    } else {
                        if int(&p[2]) == 1 {
                            q.anchor_status = Some("overdue".into());
                        }
                        q.next_verify_at = Some(now + int(&p[1]));
                    }
                }
            }
            x if x == s::QUEUE_CLEAN => {
                let before = st.queue.len();
                let cutoff = now - int(&p[0]) * 1000;
                st.queue.retain(|q| {
                    !(q.status == "delivered"
                        && q.anchor_status.as_deref() == Some("anchored")
                        && q.delivered_at.is_some_and(|d| d < cutoff))
                });
                out.push(vec![Value::int((before - st.queue.len()) as i64)]);
            }
            x if x == s::QUEUE_STATUS => {
                let count = |f: &dyn Fn(&QueueRow) -> bool| {
                    Value::int(st.queue.iter().filter(|q| f(q)).count() as i64)
                };
                out.push(vec![
                    count(&|q| q.status == "pending"),
                    count(&|q| {
                        q.status == "delivered" && q.anchor_status.as_deref() != Some("anchored")
                    }),
                    count(&|q| {
                        q.status == "delivered" && q.anchor_status.as_deref() == Some("anchored")
                    }),
                    count(&|q| q.status == "dead"),
                    Value::Text(st.queue.iter().rev().find_map(|q| q.last_error.clone())),
                ]);
            }
            x if x == s::PROGRESS_GET => {
                if let Some((l, v, _)) = st.progress.get(&text(&p[0]).unwrap_or_default()) {
                    out.push(vec![Value::Bin(l.clone()), Value::Int(*v)]);
                }
            }
            x if x == s::PROGRESS_SAVE_LSN
                || x == s::PROGRESS_SAVE_VERSION
                || x == s::PROGRESS_ERROR =>
            {
                let saved = match st.progress.get_mut(&text(&p[0]).unwrap_or_default()) {
                    Some(row) => {
                        if x == s::PROGRESS_SAVE_LSN {
                            row.0 = bin(&p[1]);
                        } else if x == s::PROGRESS_SAVE_VERSION {
                            row.1 = Some(int(&p[1]));
                        } else {
                            row.2 = text(&p[1]);
                        }
                        1
                    }
                    None => 0,
                };
                if x != s::PROGRESS_ERROR {
                    out.push(vec![Value::int(saved)]);
                }
            }
            x if x == s::PROGRESS_ALL => {
                for (c, (l, v, _)) in &st.progress {
                    out.push(vec![t(c), Value::Bin(l.clone()), Value::Int(*v)]);
                }
            }
            x if x == s::CDC_BOUNDS => {
                let ci = text(&p[0]).unwrap_or_default();
                let min = st.cdc_min.get(&ci).copied().unwrap_or(1);
                let max = st.cdc.iter().map(|r| r.lsn).max();
                out.push(vec![Value::Bin(Some(lsn(min))), Value::Bin(max.map(lsn))]);
            }
            x if x == s::CDC_READ => {
                let collection = text(&p[0]).unwrap_or_default();
                let (from, to) = (
                    lsn_n(&bin(&p[1]).unwrap_or_default()),
                    lsn_n(&bin(&p[2]).unwrap_or_default()),
                );
                let mut rows: Vec<&CdcRow> = st
                    .cdc
                    .iter()
                    .filter(|r| r.collection == collection && r.lsn >= from && r.lsn <= to)
                    .filter(|r| r.operation != 4 || r.business)
                    .collect();
                rows.sort_by_key(|r| (r.lsn, r.seqval, r.operation));
                for r in rows.into_iter().take(int(&p[3]) as usize) {
                    let op = match r.operation {
                        1 => "delete",
                        2 => "insert",
                        _ => "update",
                    };
                    out.push(vec![
                        Value::Bin(Some(lsn(r.lsn))),
                        Value::Bin(Some(lsn(r.seqval))),
                        t(op),
                        t(&r.record_id),
                        t(&r.payload),
                        t(TS),
                    ]);
                }
            }
            x if x == s::CT_BOUNDS => {
                let collection = text(&p[0]).unwrap_or_default();
                let min_valid = st.ct_min_valid.get(&collection).copied().unwrap_or(0);
                out.push(vec![Value::int(st.ct_version), Value::int(min_valid)]);
            }
            x if x == s::CT_READ => {
                let (collection, last, limit) = (
                    text(&p[0]).unwrap_or_default(),
                    int(&p[1]),
                    int(&p[2]) as usize,
                );
                // Net changes per row after `last`, as CHANGETABLE(CHANGES ...) reports them.
                let mut net: BTreeMap<String, (i64, char, bool)> = BTreeMap::new();
                for r in st
                    .ct
                    .iter()
                    .filter(|r| r.collection == collection && r.version > last)
                {
                    let e =
                        net.entry(r.record_id.clone())
                            .or_insert((r.version, r.operation, false));
                    e.0 = r.version;
                    e.1 = match (e.1, r.operation) {
                        (_, 'D') => 'D',
                        ('I', _) => 'I',
                        (_, 'I') => 'U',
                        (first, _) => first,
                    };
                    e.2 |= r.business && r.operation == 'U';
                }
                let mut rows: Vec<(i64, String, String, String)> = Vec::new();
                for (record, (version, op, business)) in net {
                    if !(op == 'I' || op == 'D' || business) {
                        continue; // tracking-only update: dropped by the column mask
                    }
                    let row = st.rows.get(&(collection.clone(), record.clone()));
                    let (operation, payload) = match row {
                        None => ("delete", record_key(&record)),
                        Some(r) if op == 'I' => ("insert", r.payload.clone()),
                        Some(r) => ("update", r.payload.clone()),
                    };
                    rows.push((version, record, operation.into(), payload));
                }
                rows.sort_by_key(|r| r.0);
                let cut = rows.get(limit.saturating_sub(1)).map(|r| r.0);
                for r in rows
                    .into_iter()
                    .enumerate()
                    .filter(|(i, r)| *i < limit || Some(r.0) == cut)
                    .map(|(_, r)| r)
                {
                    out.push(vec![Value::int(r.0), t(&r.2), t(&r.1), t(&r.3), t(TS)]);
                }
            }
            x if x == s::CT_SETTLED_SINCE => {
                let (collection, since) = (text(&p[0]).unwrap_or_default(), int(&p[1]));
                let mut rows: Vec<(i64, String, String, String)> = st
                    .receipts
                    .iter()
                    .filter(|r| r.collection == collection && r.version.is_some_and(|v| v > since))
                    .map(|r| {
                        (
                            r.version.unwrap_or(0),
                            r.record_id.clone(),
                            r.operation.clone(),
                            r.payload.clone(),
                        )
                    })
                    .chain(
                        st.dead
                            .iter()
                            .filter(|d| {
                                d.collection == collection && d.version.is_some_and(|v| v > since)
                            })
                            .map(|d| {
                                (
                                    d.version.unwrap_or(0),
                                    d.record_id.clone(),
                                    d.operation.clone(),
                                    d.payload.clone(),
                                )
                            }),
                    )
                    .collect();
                rows.sort_by_key(|r| r.0);
                for r in rows {
                    out.push(vec![Value::int(r.0), t(&r.1), t(&r.2), t(&r.3)]);
                }
            }
            x if x == s::RECEIPT_INSERT => {
                let key = text(&p[3]).unwrap_or_default();
                if !st.receipts.iter().any(|r| r.key == key) {
                    let id = st.receipts.iter().map(|r| r.id).max().unwrap_or(0) + 1;
                    st.receipts.push(Receipt {
                        id,
                        collection: text(&p[0]).unwrap_or_default(),
                        record_id: text(&p[1]).unwrap_or_default(),
                        operation: text(&p[2]).unwrap_or_default(),
                        key,
                        version: match &p[4] {
                            Value::Int(v) => *v,
                            _ => None,
                        },
                        lsn: bin(&p[5]),
                        payload: text(&p[6]).unwrap_or_default(),
                        hash: text(&p[7]).unwrap_or_default(),
                        accepted_at: now,
                        anchor_status: "pending".into(),
                        next_verify_at: Some(now + int(&p[9])),
                        verify_attempts: 0,
                    });
                }
            }
            x if x == s::DEAD_INSERT => {
                let key = text(&p[5]).unwrap_or_default();
                if !st.dead.iter().any(|d| d.key == key) {
                    st.dead.push(DeadLetter {
                        collection: text(&p[0]).unwrap_or_default(),
                        record_id: text(&p[1]).unwrap_or_default(),
                        operation: text(&p[2]).unwrap_or_default(),
                        payload: text(&p[3]).unwrap_or_default(),
                        key,
                        version: match &p[6] {
                            Value::Int(v) => *v,
                            _ => None,
                        },
                        status: int(&p[8]),
                        error: text(&p[9]).unwrap_or_default(),
                    });
                }
            }
            x if x == s::RECEIPT_DUE => {
                let mut due: Vec<&Receipt> = st
                    .receipts
                    .iter()
                    .filter(|r| {
                        matches!(r.anchor_status.as_str(), "pending" | "overdue")
                            && r.next_verify_at.is_some_and(|at| at <= now)
                    })
                    .collect();
                due.sort_by_key(|r| (r.next_verify_at, r.id));
                for r in due.into_iter().take(int(&p[0]) as usize) {
                    out.push(vec![
                        Value::int(r.id),
                        t(&r.collection),
                        t(&r.record_id),
                        t(&r.operation),
                        t(&r.hash),
                        Value::int(r.verify_attempts),
                        Value::int((now - r.accepted_at) / 1000),
                    ]);
                }
            }
            x if x == s::RECEIPT_ANCHORED || x == s::RECEIPT_MISMATCH || x == s::RECEIPT_LATER => {
                if let Some(r) = st.receipts.iter_mut().find(|r| r.id == int(&p[0])) {
                    r.verify_attempts += 1;
                    if x == s::RECEIPT_ANCHORED {
                        r.anchor_status = "anchored".into();
                        r.next_verify_at = None;
                    } else if x == s::RECEIPT_MISMATCH {
                        r.anchor_status = "mismatch".into();
                        r.next_verify_at = None;
                    } else {
                        r.next_verify_at = Some(now + int(&p[1]));
                    }
                }
            }
            x if x == s::RECEIPT_CLEAN => {
                let before = st.receipts.len();
                let cutoff = now - int(&p[0]) * 1000;
                st.receipts
                    .retain(|r| !(r.anchor_status == "anchored" && r.accepted_at < cutoff));
                out.push(vec![Value::int((before - st.receipts.len()) as i64)]);
            }
            x if x == s::LOG_STATUS => {
                let count = |f: &dyn Fn(&Receipt) -> bool| {
                    Value::int(st.receipts.iter().filter(|r| f(r)).count() as i64)
                };
                out.push(vec![
                    count(&|r| r.anchor_status != "anchored"),
                    count(&|r| r.anchor_status == "anchored"),
                    Value::int(st.dead.len() as i64),
                    Value::Text(st.dead.last().map(|d| d.error.clone())),
                ]);
            }
            other => {
                return Err(SourceError(format!(
                    "fake: statement not emulated: {other}"
                )))
            }
        }
        Ok(out)
    }
}
