//! The MySQL/MariaDB source's write-back: Certyo's hash and anchor status into the source
//! rows (`certyo_record_hash`, `certyo_anchor_status`, `certyo_verified_at`), on a thread and a
//! session of its own. The queue's session records a batch's receipts with their write-back
//! due (`certyo_queue.write_back_at`) and wakes this thread, then takes and sends the next batch
//! while the rows are written: delivery never waits for a write-back, and a locked row or a
//! table that refuses it costs that row or table a retry with back-off, never the source a
//! stall. A relay killed in between leaves the write-backs due in the queue, and they are done
//! after its restart (or by the relay that takes over the lease).

use super::{micros, quote, split_collection, Result, SourceError};
use certyo::retry::next_attempt_delay;
use mysql::prelude::Queryable;
use mysql::{Conn, Opts, TxOpts};
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The write-back's thread, woken when write-backs may be due: after receipts or
/// verifications are recorded, and on each pass of the source's pump (back-offs that ended).
/// Started at the first wake (`certyo-relay status` and `check` start none), and again should
/// it ever end otherwise than told (a panic): a dead thread would leave every write-back due
/// while delivery went on. Dropped, it finishes its round and ends.
pub(super) struct WriteBackThread {
    shared: Arc<Shared>,
    thread: Option<JoinHandle<()>>,
    opts: Opts,
    place: String,
    lock_wait: Duration,
    max_retry_interval: Duration,
}

/// What the queue's session and the write-back's thread share.
#[derive(Default)]
struct Shared {
    signals: Mutex<Signals>,
    woken: Condvar,
    /// Records written back since the pump last asked (`written_since_last_asked`).
    written: AtomicUsize,
    /// Whether this relay holds the source's lease: only then does the thread write back (a
    /// relay that lost it ends its round and writes back no more).
    leading: AtomicBool,
}

#[derive(Default)]
struct Signals {
    /// Write-backs may be due.
    due: bool,
    /// The source is dropped: the thread ends.
    stop: bool,
}

impl WriteBackThread {
    pub(super) fn new(
        opts: Opts,
        place: String,
        lock_wait: Duration,
        max_retry_interval: Duration,
    ) -> WriteBackThread {
        WriteBackThread {
            shared: Arc::new(Shared::default()),
            thread: None,
            opts,
            place,
            lock_wait,
            max_retry_interval,
        }
    }

    /// Write-backs may be due: the thread looks (at once, or when its round ends).
    pub(super) fn wake(&mut self) -> Result<()> {
        if self.thread.as_ref().is_none_or(JoinHandle::is_finished) {
            if let Some(ended) = self.thread.take() {
                let _panicked = ended.join();
                tracing::error!(source = %self.place, "the write-back's thread ended unexpectedly; started again (what was due stays due)");
            }
            let mut write_back = WriteBack {
                opts: self.opts.clone(),
                place: self.place.clone(),
                conn: None,
                lock_wait: self.lock_wait,
                max_retry_interval: self.max_retry_interval,
                tables: HashMap::new(),
                failing_tables: HashMap::new(),
            };
            let on_thread = self.shared.clone();
            let thread = std::thread::Builder::new()
                .name("write-back".into())
                .spawn(move || write_back.run(&on_thread))
                .map_err(|e| SourceError(format!("cannot start the write-back's thread ({e})")))?;
            self.thread = Some(thread);
        }
        let mut signals = lock(&self.shared.signals);
        signals.due = true;
        self.shared.woken.notify_one();
        Ok(())
    }

    /// How many records the thread wrote back since the last call.
    pub(super) fn written_since_last_asked(&self) -> usize {
        self.shared.written.swap(0, Ordering::Relaxed)
    }

    /// Whether this relay holds the source's lease (`MySqlQueue::lease`).
    pub(super) fn lead(&self, leading: bool) {
        self.shared.leading.store(leading, Ordering::Relaxed);
    }
}

impl Drop for WriteBackThread {
    fn drop(&mut self) {
        lock(&self.shared.signals).stop = true;
        self.shared.woken.notify_one();
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("the write-back's thread panicked");
            }
        }
    }
}

/// The signals, even if a thread panicked while holding them (they are two flags).
fn lock(signals: &Mutex<Signals>) -> std::sync::MutexGuard<'_, Signals> {
    signals
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// After a round that failed as a whole (the server unreachable): the least wait before the
/// next round, unless woken sooner (the pump wakes the thread every pass).
const AFTER_A_FAILED_ROUND: Duration = Duration::from_secs(1);

/// The write-back's state, owned by its thread.
struct WriteBack {
    opts: Opts,
    /// Where, without the password: for logs.
    place: String,
    /// The write-back's session (see `conn`).
    conn: Option<Conn>,
    /// How long a write-back waits for a lock (row or metadata) before it backs off.
    lock_wait: Duration,
    /// The cap of the write-back's back-off.
    max_retry_interval: Duration,
    /// Each source table's primary key and bookkeeping columns (`schema.table` → table).
    tables: HashMap<String, Table>,
    /// Tables whose last write-back failed, and until when they are left alone.
    failing_tables: HashMap<String, FailingTable>,
}

/// A table whose write-back failed: tried again after a back-off that doubles per failure.
struct FailingTable {
    until: Instant,
    failures: u32,
    error: String,
}

/// A change whose write-back is due: its queue id, record id, and `write_back_at` as read
/// (cleared only if still so); `fresh`: no failed try of it recorded (no attempts, no error).
struct Due {
    id: i64,
    record_id: String,
    at: String,
    fresh: bool,
}

impl WriteBack {
    /// Wait to be woken, then write back until nothing more is due now; until told to stop.
    fn run(&mut self, shared: &Shared) {
        loop {
            {
                let mut signals = lock(&shared.signals);
                while !signals.due && !signals.stop {
                    signals = shared
                        .woken
                        .wait(signals)
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                }
                if signals.stop {
                    return;
                }
                signals.due = false;
            }
            while shared.leading.load(Ordering::Relaxed) {
                match self.round(shared) {
                    Ok((written, more)) => {
                        shared.written.fetch_add(written, Ordering::Relaxed);
                        if !more {
                            break;
                        }
                    }
                    Err(e) => {
                        self.conn = None;
                        tracing::warn!(source = %self.place, error = %e, "the write-back could not be tried; it stays due in certyo_queue and is tried again");
                        // At least this long before the next round, unless woken sooner.
                        let signals = lock(&shared.signals);
                        if !signals.stop {
                            let _woken_or_not = shared
                                .woken
                                .wait_timeout(signals, AFTER_A_FAILED_ROUND)
                                .unwrap_or_else(std::sync::PoisonError::into_inner);
                        }
                        break;
                    }
                }
                if lock(&shared.signals).stop {
                    return;
                }
            }
        }
    }

    /// Run `work` in one transaction on the write-back's session; on any error the session is
    /// dropped (a broken or half-used session is never reused) and the transaction rolls back
    /// with it.
    fn in_transaction<T>(
        &mut self,
        work: impl FnOnce(&mut mysql::Transaction<'_>) -> mysql::Result<T>,
    ) -> Result<T> {
        let place = self.place.clone();
        let result = self
            .conn()
            .and_then(|conn| super::one_transaction(conn, &place, work));
        if result.is_err() {
            self.conn = None;
        }
        result
    }

    /// The primary key and bookkeeping columns of `collection` (`schema.table`), read once and
    /// forgotten when a write-back to the table fails (it may have been altered).
    fn table(&mut self, collection: &str) -> Result<Table> {
        if let Some(table) = self.tables.get(collection) {
            return Ok(table.clone());
        }
        let (schema, table) = split_collection(collection)?;
        type Row = (String, String, Option<String>, Option<String>);
        type Found = (Vec<Row>, Vec<String>, Vec<String>);
        let (rows, bookkeeping, set_by_server): Found = self.in_transaction(|tx| {
            let key = tx.exec(
                "SELECT c.COLUMN_NAME, c.COLUMN_TYPE, c.CHARACTER_SET_NAME, c.COLLATION_NAME
                   FROM information_schema.KEY_COLUMN_USAGE k
                   JOIN information_schema.COLUMNS c
                     ON c.TABLE_SCHEMA = k.TABLE_SCHEMA AND c.TABLE_NAME = k.TABLE_NAME
                    AND c.COLUMN_NAME = k.COLUMN_NAME
                  WHERE k.TABLE_SCHEMA = ? AND k.TABLE_NAME = ? AND k.CONSTRAINT_NAME = 'PRIMARY'
                  ORDER BY k.ORDINAL_POSITION",
                (schema, table),
            )?;
            let bookkeeping = tx.exec(
                "SELECT LOWER(COLUMN_NAME) FROM information_schema.COLUMNS
                  WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ?
                    AND COLUMN_NAME IN ('certyo_record_hash', 'certyo_anchor_status', 'certyo_verified_at')",
                (schema, table),
            )?;
            // Columns the server sets on any UPDATE that changes a value (`ON UPDATE
            // CURRENT_TIMESTAMP`): the write-back's too, unless the UPDATE assigns them itself,
            // which it may only with SELECT and UPDATE on them. Another such column (one left
            // out of capture, say) is left to the server; if it is captured, the check after
            // the marks refuses the table and names the grant.
            let set_by_server = tx.exec(
                "SELECT COLUMN_NAME FROM information_schema.COLUMNS
                  WHERE TABLE_SCHEMA = ? AND TABLE_NAME = ?
                    AND LOWER(CAST(EXTRA AS CHAR CHARACTER SET utf8mb4)) LIKE '%on update%'
                    AND FIND_IN_SET('select', PRIVILEGES) AND FIND_IN_SET('update', PRIVILEGES)
                    AND COLUMN_NAME NOT IN ('certyo_record_hash', 'certyo_anchor_status', 'certyo_verified_at')
                  ORDER BY ORDINAL_POSITION",
                (schema, table),
            )?;
            Ok((key, bookkeeping, set_by_server))
        })?;
        let key: Vec<KeyColumn> = rows
            .into_iter()
            .map(|(name, column_type, charset, collation)| KeyColumn {
                name,
                column_type,
                charset,
                collation,
            })
            .collect();
        if key.is_empty() {
            return Err(SourceError(format!(
                "{collection} does not exist or has no primary key: its rows cannot be marked with their hashes; restore the table or its primary key (the record id is the key)"
            )));
        }
        let has = |c: &str| bookkeeping.iter().any(|b| b == c);
        let found = Table {
            key,
            hash: has("certyo_record_hash"),
            status: has("certyo_anchor_status"),
            verified_at: has("certyo_verified_at"),
            set_by_server,
        };
        self.tables.insert(collection.to_string(), found.clone());
        Ok(found)
    }

    /// The write-back's session: its own, whose lock waits (row and metadata locks) are
    /// `lock_wait`, so that a row or table someone holds costs that row or table a retry,
    /// never the source a stall. The queue's own statements keep the server's waits.
    fn conn(&mut self) -> Result<&mut Conn> {
        if self.conn.is_none() {
            let seconds = self.lock_wait.as_secs_f64().ceil().max(1.0) as u64;
            let opts = mysql::OptsBuilder::from_opts(self.opts.clone()).init(vec![format!(
                "SET SESSION innodb_lock_wait_timeout = {seconds}, SESSION lock_wait_timeout = {seconds}, SESSION time_zone = '+00:00'"
            )]);
            let mut conn = Conn::new(opts)
                .map_err(|e| SourceError(format!("cannot connect to {} ({e})", self.place)))?;
            // READ COMMITTED (each statement sees what was committed when it began: the newest
            // changes, read after the rows are locked), unless statements are logged as
            // statements (a binary log in STATEMENT format refuses InnoDB writes under it): then
            // the transaction's one snapshot, opened after the rows are locked, does the same.
            let fail = |e: mysql::Error| SourceError(format!("{}: {e}", self.place));
            let logging: Option<(i64, String)> = conn
                .query_first("SELECT @@log_bin, CAST(@@binlog_format AS CHAR)")
                .map_err(fail)?;
            let statements =
                matches!(&logging, Some((1, format)) if format.eq_ignore_ascii_case("STATEMENT"));
            if !statements {
                conn.query_drop("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
                    .map_err(fail)?;
            }
            self.conn = Some(conn);
        }
        self.conn
            .as_mut()
            .ok_or_else(|| SourceError("no connection".into()))
    }

    /// Write back the source rows whose write-back is due (`write_back_at`), table by table,
    /// each in a transaction of its own. A table whose write-back fails backs off as a whole;
    /// a row locked by another transaction backs off alone. Returns how many records were
    /// settled (written, or found to need nothing), and whether more may be due now.
    fn round(&mut self, shared: &Shared) -> Result<(usize, bool)> {
        type Row = (i64, String, String, String, bool);
        let due: Vec<Row> = self.in_transaction(|tx| {
            tx.exec(
                "SELECT id, collection, record_id, DATE_FORMAT(write_back_at, '%Y-%m-%d %H:%i:%s.%f'),
                        write_back_attempts = 0 AND write_back_error IS NULL
                   FROM certyo_queue
                  WHERE write_back_at <= UTC_TIMESTAMP(6)
                  ORDER BY write_back_at, id
                  LIMIT ?",
                (WRITE_BACK_BATCH,),
            )
        })?;
        let full = due.len() as u64 >= WRITE_BACK_BATCH;
        let mut by_table: Vec<(String, Vec<Due>)> = Vec::new();
        for (id, collection, record_id, at, fresh) in due {
            let due = Due {
                id,
                record_id,
                at,
                fresh,
            };
            match by_table.iter_mut().find(|(c, _)| *c == collection) {
                Some((_, rows)) => rows.push(due),
                None => by_table.push((collection, vec![due])),
            }
        }
        let mut settled = 0;
        for (collection, mut rows) in by_table {
            // Told to stop, or no longer the lease's holder: what is left stays due.
            if lock(&shared.signals).stop || !shared.leading.load(Ordering::Relaxed) {
                return Ok((settled, false));
            }
            // In id order, as every statement of the relay's writes queue rows: two sessions
            // that lock queue rows in one order never wait for each other in a circle.
            rows.sort_unstable_by_key(|due| due.id);
            let ids: Vec<i64> = rows.iter().map(|due| due.id).collect();
            let ids = serde_json::Value::from(ids).to_string();
            // A table that failed is left alone until its back-off ends: its rows due meanwhile
            // (new deliveries) wait with it, so that a table that refuses or waits for a lock
            // costs one try per back-off, not one per batch.
            if let Some(failing) = self.failing_tables.get(&collection) {
                if let Some(wait) = failing.until.checked_duration_since(Instant::now()) {
                    let error = failing.error.clone();
                    self.in_transaction(|tx| {
                        tx.exec_drop(WRITE_BACK_DEFER, (ids, micros(wait), error))
                    })?;
                    continue;
                }
            }
            match self.write_back_table(&collection, &rows) {
                Ok(n) => {
                    settled += n;
                    self.failing_tables.remove(&collection);
                }
                Err(e) => {
                    self.tables.remove(&collection);
                    self.conn = None;
                    tracing::warn!(
                        source = %self.place, %collection, error = %e,
                        "the hash could not be written back to the table's rows; kept as not written back in certyo_queue.write_back_at and tried again with back-off"
                    );
                    let failures = self
                        .failing_tables
                        .get(&collection)
                        .map_or(1, |f| f.failures + 1);
                    let wait = next_attempt_delay(failures, 1.0, self.max_retry_interval);
                    let error = e.to_string();
                    self.failing_tables.insert(
                        collection.clone(),
                        FailingTable {
                            until: Instant::now() + wait,
                            failures,
                            error: error.clone(),
                        },
                    );
                    let cap = micros(self.max_retry_interval);
                    self.in_transaction(|tx| tx.exec_drop(WRITE_BACK_LATER, (ids, cap, error)))?;
                }
            }
        }
        Ok((settled, full))
    }

    /// One table's due write-backs (`rows`: queue id, record id), in one transaction on the
    /// write-back connection:
    ///
    /// 1. Lock the rows that are free (`FOR UPDATE SKIP LOCKED`): a row another transaction
    ///    holds is skipped at once, not waited for.
    /// 2. For each locked row, read the newest queued change of the record the row holds now
    ///    (its own key's text, which differs from the asked-for record id when the key changed
    ///    to text its collation compares equal). The snapshot starts after the locks are held,
    ///    so every committed change of the row is seen and no new one can commit before this
    ///    transaction does; the UPDATE checks again, under the lock, that the row still is that
    ///    record. The row gets the state of that newest
    ///    change: its hash and anchor status once Certyo accepted it; while it is not yet
    ///    delivered, or is a dead letter, no hash and `pending` (the row's content moved on,
    ///    and an older version's hash, above all an older version's `anchored`, must not
    ///    stay on it). So a row is only ever marked with the hash of the version it holds.
    /// 3. Clear this round's write-backs (`rows`, in id order) of the locked records and of
    ///    records whose row is gone, each only if it is still the one read as due (`Due::at`:
    ///    a write-back made due again meanwhile, by a verification recorded while this one
    ///    ran, is the next round's); back off those of rows locked by someone else.
    fn write_back_table(&mut self, collection: &str, rows: &[Due]) -> Result<usize> {
        let table = self.table(collection)?;
        let (schema, name) = split_collection(collection)?;
        let mut records: Vec<&str> = rows.iter().map(|due| due.record_id.as_str()).collect();
        records.sort_unstable();
        records.dedup();
        let keyed = |ids: &[&str]| -> String {
            let rows: Vec<serde_json::Value> = ids
                .iter()
                .map(|record_id| {
                    let mut row: Vec<serde_json::Value> =
                        crate::source::record_id_parts(record_id, table.key.len())
                            .into_iter()
                            .map(serde_json::Value::from)
                            .collect();
                    row.push((*record_id).into());
                    row.into()
                })
                .collect();
            serde_json::Value::from(rows).to_string()
        };
        let lock = find_statement(schema, name, &table.key, " FOR UPDATE SKIP LOCKED");
        let look = find_statement(schema, name, &table.key, "");
        let all = keyed(&records);
        let place = self.place.clone();
        let cap = micros(self.max_retry_interval);
        let conn = self.conn()?;
        let fail = |e: mysql::Error| SourceError(format!("{place}: {e}"));
        let mut tx = conn.start_transaction(TxOpts::default()).map_err(fail)?;
        // The lock comes first, before anything in the transaction reads without locking: each
        // later read (READ COMMITTED: each statement's own snapshot; under a binary log in
        // STATEMENT format, REPEATABLE READ: the transaction's, opened at its first plain read)
        // then sees every change of these rows committed before the lock, and none can commit
        // before this transaction does (a writer of the row waits for its lock).
        let locked: Vec<(String, String)> = tx.exec(&lock, (all,)).map_err(fail)?;
        let locked_set: HashSet<&str> = locked.iter().map(|(rid, _)| rid.as_str()).collect();
        // Each locked row is marked with the newest change of the record it holds now, which
        // is not the record asked for when its key changed to text that compares equal in the
        // column's collation (`tea` → `TEA`): the asked-for record's receipt is not this row's.
        let mut holding: Vec<&str> = locked.iter().map(|(_, own)| own.as_str()).collect();
        holding.sort_unstable();
        holding.dedup();
        let free: Vec<&str> = records
            .iter()
            .copied()
            .filter(|r| !locked_set.contains(r))
            .collect();
        let busy: Vec<(String, String)> = if free.is_empty() {
            Vec::new()
        } else {
            tx.exec(&look, (keyed(&free),)).map_err(fail)?
        };
        type Newest = (
            String,
            i64,
            String,
            String,
            Option<String>,
            Option<String>,
            Option<String>,
        );
        // The newest change of a record is most often this round's own due change of it (the
        // one just delivered): read by its id where the record has none newer (a probe of the
        // record's index each, no sort); the newest of the others is looked for.
        let mut newest_due: HashMap<&str, i64> = HashMap::new();
        for due in rows {
            let id = newest_due.entry(due.record_id.as_str()).or_insert(due.id);
            *id = (*id).max(due.id);
        }
        let (known, mut unknown): (Vec<&str>, Vec<&str>) = holding
            .iter()
            .copied()
            .partition(|rid| newest_due.contains_key(rid));
        let mut newest: Vec<Newest> = Vec::new();
        if !known.is_empty() {
            let asked: Vec<serde_json::Value> = known
                .iter()
                .map(|rid| serde_json::json!([rid, newest_due[rid]]))
                .collect();
            let asked = serde_json::Value::from(asked).to_string();
            newest = tx
                .exec(DUE_CHANGES_NEWEST, (asked, collection, collection))
                .map_err(fail)?;
            // A record not answered (it has a newer change, or its due change is no longer
            // there: removed by hand) is looked for by `NEWEST_CHANGES`.
            let found: HashSet<&str> = newest.iter().map(|n| n.0.as_str()).collect();
            unknown.extend(known.iter().filter(|rid| !found.contains(*rid)));
        }
        if !unknown.is_empty() {
            let rest: Vec<Newest> = tx
                .exec(
                    NEWEST_CHANGES,
                    (
                        serde_json::Value::from(unknown).to_string(),
                        collection,
                        collection,
                    ),
                )
                .map_err(fail)?;
            newest.extend(rest);
        }
        let mut marks = Vec::new();
        let mut read_newest = Vec::new();
        for (record_id, newest_id, operation, status, hash, anchor, verified_at) in newest {
            read_newest.push(serde_json::json!([record_id, newest_id]));
            if operation == "delete" {
                continue; // the row is to go; nothing of it to mark
            }
            let (hash, anchor, verified_at) = match (status.as_str(), hash) {
                ("delivered", Some(hash)) => match anchor.as_deref() {
                    Some("anchored") => (Some(hash), "anchored", verified_at),
                    Some("mismatch") => (Some(hash), "mismatch", verified_at),
                    _ => (Some(hash), "pending", None),
                },
                // Not yet accepted, or a dead letter: the row holds content with no receipt.
                _ => (None, "pending", None),
            };
            let mut row: Vec<serde_json::Value> =
                crate::source::record_id_parts(&record_id, table.key.len())
                    .into_iter()
                    .map(serde_json::Value::from)
                    .collect();
            row.extend([
                hash.into(),
                anchor.into(),
                verified_at.into(),
                record_id.as_str().into(),
            ]);
            marks.push(serde_json::Value::from(row));
        }
        // Rows neither locked nor seen are gone (deleted, or the record id is no row): there is
        // nothing to mark. Every due change of the other records is settled: their rows now show
        // their records' newest state. (A change of such a record still due and not in this
        // round, backing off, is settled when it comes due: it writes the same state again.
        // The clean-up keeps the newer changes of a record while an older one is due, so the
        // newest change is always there to read.)
        let busy_set: HashSet<&str> = busy.iter().map(|(rid, _)| rid.as_str()).collect();
        // Each due change in id order: `[id, write_back_at as read, busy]`.
        let mut busy_count = 0;
        let done: Vec<serde_json::Value> = rows
            .iter()
            .map(|due| {
                let busy = busy_set.contains(due.record_id.as_str());
                busy_count += usize::from(busy);
                serde_json::json!([due.id, due.at, i32::from(busy)])
            })
            .collect();
        let marked = marks.len();
        if !marks.is_empty() && (table.hash || table.status || table.verified_at) {
            let mark = mark_statement(schema, name, &table);
            tx.exec_drop(mark, (serde_json::Value::from(marks).to_string(),))
                .map_err(fail)?;
            // The marks change no business column, so the companion's triggers queue nothing:
            // a change queued by this transaction means the UPDATE changed the rows' content
            // (a column the server sets on UPDATE that the relay cannot see or assign, or a
            // trigger of the table that changes its columns; what a trigger writes to other
            // tables is not seen here). Kept, the rows would hold content no one wrote, whose
            // write-back would change them again, for ever: rolled back, the table fails.
            let changed: Option<i64> = tx
                .exec_first(
                    WRITTEN_BACK_CHANGES_CONTENT,
                    (serde_json::Value::from(read_newest).to_string(), collection),
                )
                .map_err(fail)?;
            if changed.unwrap_or(0) > 0 {
                return Err(SourceError(format!(
                    "{place}: writing the hash back to {collection} changes its rows' content (the triggers captured the write-back as a change): a column the server sets on UPDATE (ON UPDATE CURRENT_TIMESTAMP), which the relay must assign its own value (grant it SELECT and UPDATE on that column), or a trigger of the table that changes its columns; nothing written back (docs/relay.md: the grants)"
                )));
            }
        }
        let settled_count = records.len() - busy.len();
        tracing::debug!(
            source = %place, collection, locked = locked.len(), busy = busy.len(), marked,
            settled = settled_count, "write-back"
        );
        if busy_count > 0 {
            tracing::debug!(source = %place, collection, rows = busy_count, "rows locked by another transaction: their write-back is tried again later");
        }
        // One statement, in id order: the delivery session locks the queue rows it records
        // verifications on in id order too, before it writes them, so the two never wait for
        // each other in a circle. Most often every row was written back at its first try, with
        // no attempts or error to reset: cleared without assigning them (the error is TEXT:
        // assigned, even NULL to NULL, it costs the server a third of the statement). Only this
        // thread records a failed try, so each row is as read, unless made due again since
        // (which neither statement clears).
        if busy_count == 0 && rows.iter().all(|due| due.fresh) {
            let done: Vec<serde_json::Value> = rows
                .iter()
                .map(|due| serde_json::json!([due.id, due.at]))
                .collect();
            tx.exec_drop(
                WRITE_BACK_DONE_FIRST_TIME,
                (serde_json::Value::from(done).to_string(),),
            )
            .map_err(fail)?;
        } else {
            tx.exec_drop(
                WRITE_BACK_DONE,
                (
                    serde_json::Value::from(done).to_string(),
                    cap,
                    "the row is locked by another transaction (it was skipped, not waited for); tried again with back-off",
                ),
            )
            .map_err(fail)?;
        }
        tx.commit().map_err(fail)?;
        Ok(settled_count)
    }
}

/// Receipts whose write-back is due, looked at per round.
const WRITE_BACK_BATCH: u64 = 5000;

/// A tracked table, as the write-back needs it.
#[derive(Debug, Clone)]
struct Table {
    key: Vec<KeyColumn>,
    /// Which bookkeeping columns it has: only those are written.
    hash: bool,
    status: bool,
    verified_at: bool,
    /// Columns the server sets on an UPDATE (`ON UPDATE CURRENT_TIMESTAMP`), kept as they are
    /// by the write-back (see `mark_statement`).
    set_by_server: Vec<String>,
}

/// A primary key column of a source table, with what the write-back's join needs to compare
/// it as the table does (type, character set, collation).
#[derive(Debug, Clone)]
struct KeyColumn {
    name: String,
    column_type: String,
    charset: Option<String>,
    collation: Option<String>,
}

impl KeyColumn {
    /// The JSON_TABLE column the key part is read into: the column's own type, and for text
    /// its character set and collation, so the join compares as a WHERE on the column would
    /// and uses the primary key.
    fn json_table_type(&self) -> String {
        match (&self.charset, &self.collation) {
            (Some(charset), Some(collation)) => {
                format!("VARCHAR(3072) CHARACTER SET {charset} COLLATE {collation}")
            }
            _ => self.column_type.clone(),
        }
    }
}

/// `JSON_TABLE(rows) COLUMNS (k0 ..., kN ..., <extra>)` for rows of `[key part..., extra...]`,
/// and the join condition on the table's key.
fn key_join(columns: &[KeyColumn], extra: &[&str]) -> (String, String) {
    let mut parts: Vec<String> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| format!("k{i} {} PATH '$[{i}]'", c.json_table_type()))
        .collect();
    parts.extend(
        extra
            .iter()
            .enumerate()
            .map(|(j, e)| format!("{e} PATH '$[{}]'", columns.len() + j)),
    );
    let on: Vec<String> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| format!("t.{} = v.k{i}", quote(&c.name)))
        .collect();
    (
        format!("JSON_TABLE(?, '$[*]' COLUMNS ({}))", parts.join(", ")),
        on.join(" AND "),
    )
}

/// The record ids of the rows `[key part..., record id]` that exist, each with the record id
/// the row itself has now (`own_record_id`); `suffix` locks them. The two differ when the key
/// compares equal to the record id in the column's collation but is not the same text (`tea`
/// and `TEA` in a case-insensitive one): the row then holds another record than the one asked
/// for. The rows are read by primary key, one lookup each (JSON_TABLE first, `FORCE INDEX`): a
/// scan of the table would touch, and wait for, rows others hold that are not asked for.
fn find_statement(schema: &str, table: &str, columns: &[KeyColumn], suffix: &str) -> String {
    let (json, on) = key_join(
        columns,
        &["rid VARCHAR(768) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin"],
    );
    // The rows in a derived table: MySQL counts a JSON_TABLE beside the table in the locking
    // clause (`FOR UPDATE`: "Table v appears in multiple locking clauses"), and MariaDB has no
    // `FOR UPDATE OF t` to name the table alone.
    format!(
        "SELECT v.rid, {} FROM (SELECT * FROM {json} j) v STRAIGHT_JOIN {}.{} t FORCE INDEX (PRIMARY) ON {on}{suffix}",
        own_record_id(columns),
        quote(schema),
        quote(table)
    )
}

/// The record id of row `t` as the companion's triggers write it (`certyo_trigger_ddl`): one
/// key column's text, or the parts escaped (`\` → `\\`, `/` → `\/`) and joined by `/`; in
/// utf8mb4_bin, as the queue's `record_id`. The backslash is `CHAR(92)`, the same whatever the
/// session's `NO_BACKSLASH_ESCAPES`.
///
/// It must be the text the triggers write (`certyo_key_text_sql` in the companion's script):
/// for a `TIMESTAMP` key part that is its text in UTC, which `CAST` gives here because the
/// write-back's session is in UTC (`conn`). Keep the two in step.
///
/// Record ids are compared byte for byte wherever a record is told from another (`CAST(... AS
/// BINARY)` beside the indexed `=`): utf8mb4_bin pads with spaces, so `'a'` and `'a '` compare
/// equal in it, yet they are two rows of a table whose key's collation does not pad (MySQL's
/// default `utf8mb4_0900_ai_ci`, MariaDB's `_nopad_` ones).
fn own_record_id(columns: &[KeyColumn]) -> String {
    let text = |c: &KeyColumn| format!("CAST(t.{} AS CHAR CHARACTER SET utf8mb4)", quote(&c.name));
    let id = if columns.len() == 1 {
        text(&columns[0])
    } else {
        let parts: Vec<String> = columns
            .iter()
            .map(|c| {
                format!(
                    "REPLACE(REPLACE({}, CHAR(92 USING utf8mb4), CONCAT(CHAR(92 USING utf8mb4), CHAR(92 USING utf8mb4))), '/', CONCAT(CHAR(92 USING utf8mb4), '/'))",
                    text(c)
                )
            })
            .collect();
        format!("CONCAT_WS('/', {})", parts.join(", "))
    };
    format!("({id} COLLATE utf8mb4_bin)")
}

/// `UPDATE JSON_TABLE(rows) JOIN table ON key SET hash, status, verified_at`: the rows arrive
/// as one JSON array of `[key part..., hash, status, verified_at, record id]`; only the
/// bookkeeping columns the table has are written, and only to a row whose own record id is,
/// byte for byte, the record id whose newest change the state is of (checked by the UPDATE
/// itself, under the row's lock). That change is the newest there can be: it was read after the
/// row was locked, and a writer of the row waits for the lock. The statement reads no other
/// table: a check of the queue here would be a locking read, waiting for applications'
/// uncommitted changes while the write-back holds rows they may wait for (a deadlock, whose
/// victim may be the application's transaction).
fn mark_statement(schema: &str, table: &str, t: &Table) -> String {
    let (json, on) = key_join(
        &t.key,
        &[
            "h VARCHAR(100) CHARACTER SET utf8mb4",
            "s VARCHAR(20) CHARACTER SET utf8mb4",
            "at DATETIME(6)",
            "rid VARCHAR(768) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin",
        ],
    );
    let on = format!(
        "{on} AND CAST({} AS BINARY) = CAST(v.rid AS BINARY)",
        own_record_id(&t.key)
    );
    let mut set = Vec::new();
    if t.hash {
        set.push("t.certyo_record_hash = v.h".to_string());
    }
    if t.status {
        set.push("t.certyo_anchor_status = v.s".to_string());
    }
    if t.verified_at {
        set.push("t.certyo_verified_at = v.at".to_string());
    }
    // A column the server sets on any UPDATE that changes a value (`ON UPDATE
    // CURRENT_TIMESTAMP`) is assigned its own value: set by the server, the row would hold
    // content no one wrote, under the hash just written, and the companion's triggers would
    // capture it as a change, whose write-back would change it again, for ever.
    for column in &t.set_by_server {
        let column = quote(column);
        set.push(format!("t.{column} = t.{column}"));
    }
    format!(
        "UPDATE {json} v STRAIGHT_JOIN {}.{} t FORCE INDEX (PRIMARY) ON {on} SET {}",
        quote(schema),
        quote(table),
        set.join(", ")
    )
}

/// For each record id: its newest queued change (operation, status, receipt, anchoring). The
/// record ids first, each change found by one probe of the record's index and one of the
/// primary key (`STRAIGHT_JOIN`, `FORCE INDEX`): MySQL 9.7 otherwise may plan the subquery per
/// row of the whole queue, for a minute at 10,000 changes.
const NEWEST_CHANGES: &str = "
    SELECT v.rid, CAST(n.id AS SIGNED), CAST(n.operation AS CHAR), CAST(n.status AS CHAR), n.record_hash,
           CAST(n.anchor_status AS CHAR), DATE_FORMAT(n.verified_at, '%Y-%m-%d %H:%i:%s.%f')
      FROM JSON_TABLE(?, '$[*]' COLUMNS (rid VARCHAR(768) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin PATH '$')) v
      STRAIGHT_JOIN certyo_queue n FORCE INDEX (PRIMARY)
        ON n.id = (SELECT m.id FROM certyo_queue m FORCE INDEX (certyo_queue_record)
                    WHERE m.collection = ? AND m.record_id = v.rid
                      AND CAST(m.record_id AS BINARY) = CAST(v.rid AS BINARY)
                    ORDER BY m.id DESC LIMIT 1)
     WHERE n.collection = ?";

/// Of the changes given (`[record id, change id]`), those still queued for that record with no
/// newer change (one probe of the record's index each), read as `NEWEST_CHANGES` reads them; a
/// record not returned is looked up by `NEWEST_CHANGES`.
const DUE_CHANGES_NEWEST: &str = "
    SELECT v.rid, CAST(n.id AS SIGNED), CAST(n.operation AS CHAR), CAST(n.status AS CHAR), n.record_hash,
           CAST(n.anchor_status AS CHAR), DATE_FORMAT(n.verified_at, '%Y-%m-%d %H:%i:%s.%f')
      FROM JSON_TABLE(?, '$[*]' COLUMNS (rid VARCHAR(768) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin PATH '$[0]',
                                         id BIGINT PATH '$[1]')) v
      STRAIGHT_JOIN certyo_queue n FORCE INDEX (PRIMARY) ON n.id = v.id
     WHERE n.collection = ? AND n.record_id = v.rid AND CAST(n.record_id AS BINARY) = CAST(v.rid AS BINARY)
       AND (SELECT m.id FROM certyo_queue m FORCE INDEX (certyo_queue_record)
             WHERE m.collection = ? AND m.record_id = v.rid AND CAST(m.record_id AS BINARY) = CAST(v.rid AS BINARY)
               AND m.id > v.id
             LIMIT 1) IS NULL";

/// How many changes of the records (`[record id, newest change's id as read]`) are newer than
/// read: queued by the write-back's own UPDATE (the rows are locked, no one else's can be).
const WRITTEN_BACK_CHANGES_CONTENT: &str = "
    SELECT COUNT(*)
      FROM JSON_TABLE(?, '$[*]' COLUMNS (rid VARCHAR(768) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin PATH '$[0]',
                                         newest BIGINT PATH '$[1]')) v
      STRAIGHT_JOIN certyo_queue m FORCE INDEX (certyo_queue_record)
        ON m.collection = ? AND m.record_id = v.rid AND CAST(m.record_id AS BINARY) = CAST(v.rid AS BINARY)
       AND m.id > v.newest";

/// This round's due changes (`[id, write_back_at as read, busy]`), in one statement: written
/// back (not busy): nothing more to do for them, unless made due again since they were read as
/// due; their row locked by another transaction (busy): tried again as `WRITE_BACK_LATER` says
/// (the cap in microseconds, and why). See also `WRITE_BACK_DONE_FIRST_TIME`.
const WRITE_BACK_DONE: &str = "
    UPDATE JSON_TABLE(?, '$[*]' COLUMNS (id BIGINT PATH '$[0]', at DATETIME(6) PATH '$[1]',
                                         busy INT PATH '$[2]')) v
      STRAIGHT_JOIN certyo_queue q FORCE INDEX (PRIMARY) ON q.id = v.id
       SET q.write_back_at = IF(v.busy = 1, UTC_TIMESTAMP(6)
               + INTERVAL LEAST(?, 1000000 * POW(2, LEAST(q.write_back_attempts, 16))) MICROSECOND, NULL),
           q.write_back_attempts = IF(v.busy = 1, q.write_back_attempts + 1, 0),
           q.write_back_error = IF(v.busy = 1, ?, NULL)
     WHERE IF(v.busy = 1, q.write_back_at IS NOT NULL, q.write_back_at = v.at)";

/// `WRITE_BACK_DONE` for rows (`[id, write_back_at as read]`) all written back at their first
/// try (no attempts or error recorded). Keep the two in step.
const WRITE_BACK_DONE_FIRST_TIME: &str = "
    UPDATE JSON_TABLE(?, '$[*]' COLUMNS (id BIGINT PATH '$[0]', at DATETIME(6) PATH '$[1]')) v
      STRAIGHT_JOIN certyo_queue q FORCE INDEX (PRIMARY) ON q.id = v.id
       SET q.write_back_at = NULL
     WHERE q.write_back_at = v.at AND q.write_back_attempts = 0 AND q.write_back_error IS NULL";

/// Not written back (ids), why: tried again after 1 s, doubling per failed try, at most the cap
/// (microseconds). `write_back_at` is set before the attempts grow.
const WRITE_BACK_LATER: &str = "
    UPDATE JSON_TABLE(?, '$[*]' COLUMNS (id BIGINT PATH '$')) v
      STRAIGHT_JOIN certyo_queue q FORCE INDEX (PRIMARY) ON q.id = v.id
       SET q.write_back_at = UTC_TIMESTAMP(6)
               + INTERVAL LEAST(?, 1000000 * POW(2, LEAST(q.write_back_attempts, 16))) MICROSECOND,
           q.write_back_attempts = q.write_back_attempts + 1, q.write_back_error = ?
     WHERE q.write_back_at IS NOT NULL";

/// Not tried (ids), because their table backs off: due when it ends (microseconds from now).
const WRITE_BACK_DEFER: &str = "
    UPDATE JSON_TABLE(?, '$[*]' COLUMNS (id BIGINT PATH '$')) v
      STRAIGHT_JOIN certyo_queue q FORCE INDEX (PRIMARY) ON q.id = v.id
       SET q.write_back_at = UTC_TIMESTAMP(6) + INTERVAL ? MICROSECOND, q.write_back_error = ?
     WHERE q.write_back_at IS NOT NULL";
