//! The MySQL/MariaDB companion's queue (`sql/mysql/certyo_queue.sql`): the triggers queue each
//! change in the writer's transaction; this reads `certyo_queue` in id order, records each
//! change's fate on its queue row, and writes Certyo's hash back to the source row. The
//! companion's update trigger compares business columns only, so the write-back (bookkeeping
//! columns) queues nothing.
//!
//! Every call is one transaction; nothing is written for a change between `take` and
//! `record`, so a relay killed in between sends the change again after its restart, under the
//! same idempotency key, and Certyo answers it as a replay.

use super::{Anchoring, Change, Delivered, Fate, Operation, Result, SourceError, Status};
use certyo::retry::next_attempt_delay;
use mysql::prelude::Queryable;
use mysql::{Conn, Opts, TxOpts};
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

pub struct MySqlQueue {
    opts: Opts,
    /// Where, without the password: for logs and status.
    place: String,
    database: String,
    conn: Option<Conn>,
    /// The write-back's own session, with short lock waits (see `write_back_conn`).
    write_back_conn: Option<Conn>,
    /// The session that holds the lease (`lease`) while it lives, and whether it does.
    lease_conn: Option<Conn>,
    leased: bool,
    /// The lease's lock name (`lease_name`).
    lease_name: String,
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

/// The queue's columns the relay reads and writes; `sql/mysql/certyo_queue.sql` adds any that
/// an older installation lacks.
const NEEDED_COLUMNS: &[&str] = &[
    "status",
    "attempts",
    "next_attempt_at",
    "last_attempt_at",
    "last_status",
    "last_error",
    "record_hash",
    "delivered_at",
    "anchor_status",
    "next_verify_at",
    "verified_at",
    "verify_attempts",
    "polygon_tx_hash",
    "reported_hash",
    "write_back_at",
    "write_back_attempts",
    "write_back_error",
];

impl MySqlQueue {
    /// `url`: `mysql://user:password@host:port/database` (the mysql crate's URL form, e.g.
    /// `?socket=/run/mysqld/mysqld.sock`). `database`: Certyo's `database` field (default:
    /// the URL's database). `lock_wait`: how long a write-back waits for a lock someone else
    /// holds; `max_retry_interval`: the cap of its back-off.
    pub fn new(
        url: &str,
        database: Option<String>,
        lock_wait: Duration,
        max_retry_interval: Duration,
    ) -> Result<MySqlQueue> {
        let opts = Opts::from_url(url).map_err(|e| {
            SourceError(format!(
                "the source URL is not a MySQL URL ({e}); write it as mysql://user:password@host:3306/database"
            ))
        })?;
        let Some(schema) = opts.get_db_name().map(str::to_string) else {
            return Err(SourceError(
                "the source URL names no database; write it as mysql://user:password@host:3306/database".into(),
            ));
        };
        let user = opts.get_user().unwrap_or("");
        let place = match opts.get_socket() {
            Some(socket) => format!("mysql://{user}@localhost/{schema}?socket={socket}"),
            None => format!(
                "mysql://{user}@{}:{}/{schema}",
                opts.get_ip_or_hostname(),
                opts.get_tcp_port()
            ),
        };
        Ok(MySqlQueue {
            opts,
            place,
            lease_name: lease_name(&schema),
            database: database.unwrap_or(schema),
            conn: None,
            write_back_conn: None,
            lease_conn: None,
            leased: false,
            lock_wait,
            max_retry_interval,
            tables: HashMap::new(),
            failing_tables: HashMap::new(),
        })
    }

    /// The connection, opened (again) on first use after a failure.
    fn conn(&mut self) -> Result<&mut Conn> {
        if self.conn.is_none() {
            let conn = Conn::new(self.opts.clone())
                .map_err(|e| SourceError(format!("cannot connect to {} ({e})", self.place)))?;
            self.conn = Some(conn);
        }
        self.conn
            .as_mut()
            .ok_or_else(|| SourceError("no connection".into()))
    }

    /// Run `work` in one transaction; on any error the connection is dropped (a broken or
    /// half-used connection is never reused) and the transaction rolls back with it.
    fn in_transaction<T>(
        &mut self,
        work: impl FnOnce(&mut mysql::Transaction<'_>) -> mysql::Result<T>,
    ) -> Result<T> {
        let place = self.place.clone();
        let result = (|| {
            let conn = self.conn()?;
            let fail = |e: mysql::Error| SourceError(format!("{place}: {e}"));
            let mut tx = conn.start_transaction(TxOpts::default()).map_err(fail)?;
            let value = work(&mut tx).map_err(fail)?;
            tx.commit().map_err(fail)?;
            Ok(value)
        })();
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
        let (rows, bookkeeping): (Vec<Row>, Vec<String>) = self.in_transaction(|tx| {
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
            Ok((key, bookkeeping))
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
        };
        self.tables.insert(collection.to_string(), found.clone());
        Ok(found)
    }

    /// The write-back connection: a session of its own whose lock waits (row and metadata
    /// locks) are `lock_wait`, so that a row or table someone holds costs that row or table a
    /// retry, never the source a stall. The queue's own statements keep the server's waits.
    fn write_back_conn(&mut self) -> Result<&mut Conn> {
        if self.write_back_conn.is_none() {
            let seconds = self.lock_wait.as_secs_f64().ceil().max(1.0) as u64;
            let opts = mysql::OptsBuilder::from_opts(self.opts.clone()).init(vec![format!(
                "SET SESSION innodb_lock_wait_timeout = {seconds}, SESSION lock_wait_timeout = {seconds}"
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
            self.write_back_conn = Some(conn);
        }
        self.write_back_conn
            .as_mut()
            .ok_or_else(|| SourceError("no connection".into()))
    }

    /// Write back the source rows whose write-back is due (`write_back_at`), table by table,
    /// each in a transaction of its own. A table whose write-back fails backs off as a whole;
    /// a row locked by another transaction backs off alone. Returns how many records were
    /// settled (written, or found to need nothing).
    fn write_back_due(&mut self) -> Result<usize> {
        type Row = (i64, String, String);
        let due: Vec<Row> = self.in_transaction(|tx| {
            tx.exec(
                "SELECT id, collection, record_id FROM certyo_queue
                  WHERE write_back_at <= UTC_TIMESTAMP(6)
                  ORDER BY write_back_at, id
                  LIMIT ?",
                (WRITE_BACK_BATCH,),
            )
        })?;
        let mut by_table: Vec<(String, Vec<(i64, String)>)> = Vec::new();
        for (id, collection, record_id) in due {
            match by_table.iter_mut().find(|(c, _)| *c == collection) {
                Some((_, rows)) => rows.push((id, record_id)),
                None => by_table.push((collection, vec![(id, record_id)])),
            }
        }
        let mut settled = 0;
        for (collection, rows) in by_table {
            let ids: Vec<i64> = rows.iter().map(|(id, _)| *id).collect();
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
                    self.write_back_conn = None;
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
        Ok(settled)
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
    /// 3. Clear this round's write-backs of the locked records and of records whose row is
    ///    gone; back off those of rows locked by someone else.
    fn write_back_table(&mut self, collection: &str, rows: &[(i64, String)]) -> Result<usize> {
        let table = self.table(collection)?;
        let (schema, name) = split_collection(collection)?;
        let mut records: Vec<&str> = rows.iter().map(|(_, r)| r.as_str()).collect();
        records.sort_unstable();
        records.dedup();
        let keyed = |ids: &[&str]| -> String {
            let rows: Vec<serde_json::Value> = ids
                .iter()
                .map(|record_id| {
                    let mut row: Vec<serde_json::Value> =
                        super::record_id_parts(record_id, table.key.len())
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
        let conn = self.write_back_conn()?;
        let fail = |e: mysql::Error| SourceError(format!("{place}: {e}"));
        let mut tx = conn.start_transaction(TxOpts::default()).map_err(fail)?;
        // The lock comes first, before anything in the transaction reads without locking: the
        // transaction's snapshot (REPEATABLE READ) opens at its first plain read, so it then
        // holds every change of these rows committed before the lock, and none can commit
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
            String,
            String,
            Option<String>,
            Option<String>,
            Option<String>,
        );
        let newest: Vec<Newest> = if holding.is_empty() {
            Vec::new()
        } else {
            tx.exec(
                NEWEST_CHANGES,
                (
                    serde_json::Value::from(holding).to_string(),
                    collection,
                    collection,
                ),
            )
            .map_err(fail)?
        };
        let mut marks = Vec::new();
        for (record_id, operation, status, hash, anchor, verified_at) in newest {
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
                super::record_id_parts(&record_id, table.key.len())
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
        let (busy_ids, settled): (Vec<i64>, Vec<i64>) = {
            let mut busy_ids = Vec::new();
            let mut settled = Vec::new();
            for (id, record_id) in rows {
                if busy_set.contains(record_id.as_str()) {
                    busy_ids.push(*id);
                } else {
                    settled.push(*id);
                }
            }
            (busy_ids, settled)
        };
        let marked = marks.len();
        if !marks.is_empty() && (table.hash || table.status || table.verified_at) {
            let mark = mark_statement(schema, name, &table);
            tx.exec_drop(mark, (serde_json::Value::from(marks).to_string(),))
                .map_err(fail)?;
        }
        let settled_count = records.len() - busy.len();
        tracing::debug!(
            source = %place, collection, locked = locked.len(), busy = busy.len(), marked,
            settled = settled_count, "write-back"
        );
        if !settled.is_empty() {
            tx.exec_drop(
                WRITE_BACK_CLEAR,
                (serde_json::Value::from(settled).to_string(),),
            )
            .map_err(fail)?;
        }
        if !busy_ids.is_empty() {
            tracing::debug!(source = %place, collection, rows = busy_ids.len(), "rows locked by another transaction: their write-back is tried again later");
            tx.exec_drop(
                WRITE_BACK_LATER,
                (
                    serde_json::Value::from(busy_ids).to_string(),
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

/// The lease's lock: one per database, `certyo-relay:` and the SHA-1 of the database's name
/// in hex (a lock name has 64 characters at most). Computed here, not by the server: MySQL 9
/// has no `SHA1()` any more, and relays of every version must ask for the same lock.
fn lease_name(schema: &str) -> String {
    use sha1::Digest;
    let digest = sha1::Sha1::digest(schema.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("certyo-relay:{hex}")
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
/// utf8mb4_bin, so it compares byte for byte. The backslash is `CHAR(92)`, the same whatever
/// the session's `NO_BACKSLASH_ESCAPES`.
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
    let on = format!("{on} AND {} = v.rid", own_record_id(&t.key));
    let mut set = Vec::new();
    if t.hash {
        set.push("t.certyo_record_hash = v.h");
    }
    if t.status {
        set.push("t.certyo_anchor_status = v.s");
    }
    if t.verified_at {
        set.push("t.certyo_verified_at = v.at");
    }
    format!(
        "UPDATE {json} v STRAIGHT_JOIN {}.{} t FORCE INDEX (PRIMARY) ON {on} SET {}",
        quote(schema),
        quote(table),
        set.join(", ")
    )
}

/// For each record id: its newest queued change (operation, status, receipt, anchoring).
const NEWEST_CHANGES: &str = "
    SELECT v.rid, CAST(n.operation AS CHAR), CAST(n.status AS CHAR), n.record_hash,
           CAST(n.anchor_status AS CHAR), DATE_FORMAT(n.verified_at, '%Y-%m-%d %H:%i:%s.%f')
      FROM JSON_TABLE(?, '$[*]' COLUMNS (rid VARCHAR(768) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin PATH '$')) v
      JOIN certyo_queue n ON n.id = (SELECT MAX(m.id) FROM certyo_queue m
                                      WHERE m.collection = ? AND m.record_id = v.rid)
     WHERE n.collection = ?";

/// Written back (ids): nothing more to do for them.
const WRITE_BACK_CLEAR: &str = "
    UPDATE JSON_TABLE(?, '$[*]' COLUMNS (id BIGINT PATH '$')) v
      STRAIGHT_JOIN certyo_queue q FORCE INDEX (PRIMARY) ON q.id = v.id
       SET q.write_back_at = NULL, q.write_back_attempts = 0, q.write_back_error = NULL";

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

fn split_collection(collection: &str) -> Result<(&str, &str)> {
    collection.split_once('.').ok_or_else(|| {
        SourceError(format!(
            "queued collection {collection:?} is not schema.table; was the row written by certyo_trigger_ddl's triggers?"
        ))
    })
}

/// A MySQL identifier, quoted.
fn quote(name: &str) -> String {
    format!("`{}`", name.replace('`', "``"))
}

/// Microseconds, as MySQL's `INTERVAL n MICROSECOND` takes them.
fn micros(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

const TAKE: &str = "
    SELECT c.id, c.collection, c.record_id, c.operation, CAST(c.payload AS CHAR),
           DATE_FORMAT(c.source_timestamp, '%Y-%m-%dT%H:%i:%s.%fZ'), c.idempotency_key, c.attempts
      FROM (SELECT id, collection, record_id, operation, payload, source_timestamp, idempotency_key, attempts
              FROM certyo_queue
             WHERE status = 'pending' AND (? OR next_attempt_at IS NULL OR next_attempt_at <= UTC_TIMESTAMP(6))
             ORDER BY id
             LIMIT ?) AS c
     WHERE NOT EXISTS (SELECT 1 FROM certyo_queue o
                        WHERE o.collection = c.collection AND o.record_id = c.record_id
                          AND o.status = 'pending' AND o.id < c.id)
     ORDER BY c.id";

impl super::Source for MySqlQueue {
    fn describe(&self) -> String {
        format!("{} (queue)", self.place)
    }

    fn database(&self) -> &str {
        &self.database
    }

    /// The lease is a named lock of the server (`GET_LOCK`), one per database, held by a
    /// session of its own: the server releases it the moment that session ends, however the
    /// relay ended. Held: checked to be still held (the session may have been lost with the
    /// server); not held: asked for without waiting.
    fn lease(&mut self) -> Result<bool> {
        if self.lease_conn.is_none() {
            self.leased = false;
            let conn = Conn::new(self.opts.clone())
                .map_err(|e| SourceError(format!("cannot connect to {} ({e})", self.place)))?;
            self.lease_conn = Some(conn);
        }
        let leased = self.leased;
        let name = (self.lease_name.as_str(),);
        let asked: mysql::Result<Option<Option<i64>>> = match self.lease_conn.as_mut() {
            Some(conn) if leased => {
                conn.exec_first("SELECT IS_USED_LOCK(?) = CONNECTION_ID()", name)
            }
            Some(conn) => conn.exec_first("SELECT GET_LOCK(?, 0)", name),
            None => Ok(None),
        };
        match asked {
            Ok(held) => {
                self.leased = held.flatten() == Some(1);
                Ok(self.leased)
            }
            Err(e) => {
                self.lease_conn = None;
                self.leased = false;
                Err(SourceError(format!(
                    "{}: the relays' lease: {e}",
                    self.place
                )))
            }
        }
    }

    fn check(&mut self) -> Result<()> {
        let found: Vec<String> = self.in_transaction(|tx| {
            tx.query(
                "SELECT COLUMN_NAME FROM information_schema.COLUMNS
                  WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'certyo_queue'",
            )
        })?;
        if found.is_empty() {
            return Err(SourceError(format!(
                "{}: there is no certyo_queue table; install the companion: mysql DATABASE < sql/mysql/certyo_queue.sql",
                self.place
            )));
        }
        let missing: Vec<&str> = NEEDED_COLUMNS
            .iter()
            .copied()
            .filter(|c| !found.iter().any(|f| f.eq_ignore_ascii_case(c)))
            .collect();
        if !missing.is_empty() {
            return Err(SourceError(format!(
                "{}: certyo_queue lacks the column(s) {} that the relay records deliveries in; run sql/mysql/certyo_queue.sql again (it upgrades the queue in place)",
                self.place,
                missing.join(", ")
            )));
        }
        Ok(())
    }

    fn take(&mut self, limit: usize, probing: bool, in_flight: &[i64]) -> Result<Vec<Change>> {
        // Twice the limit, as the worker does: a candidate whose record has an older pending
        // change drops out, and the batch should still fill.
        let window = (limit * 2 + in_flight.len()) as u64;
        type Row = (
            i64,
            String,
            String,
            String,
            String,
            String,
            Option<String>,
            u32,
        );
        let rows: Vec<Row> = self.in_transaction(|tx| tx.exec(TAKE, (probing, window)))?;
        let mut changes = Vec::with_capacity(limit);
        for (id, collection, record_id, operation, payload, source_timestamp, key, attempts) in rows
        {
            if in_flight.contains(&id) || changes.len() >= limit {
                continue;
            }
            let operation = Operation::parse(&operation).unwrap_or(Operation::Upsert);
            // A row queued by hand without a key still gets a stable one: the queue id.
            let idempotency_key = key.unwrap_or_else(|| format!("{}-{id}", self.database));
            changes.push(Change {
                id,
                collection,
                record_id,
                operation,
                payload,
                source_timestamp,
                idempotency_key,
                attempts,
            });
        }
        Ok(changes)
    }

    fn record(&mut self, fates: &[(Change, Fate)]) -> Result<()> {
        let mut delivered = Vec::new();
        let mut retries = Vec::new();
        let mut dead = Vec::new();
        for (change, fate) in fates {
            match fate {
                Fate::Delivered {
                    record_hash,
                    verify_after,
                    ..
                } => {
                    delivered.push(serde_json::json!([
                        change.id,
                        record_hash,
                        micros(*verify_after)
                    ]));
                }
                Fate::Retry { retry_after, error } => {
                    retries.push(serde_json::json!([change.id, micros(*retry_after), error]))
                }
                Fate::Dead { status, error } => {
                    dead.push(serde_json::json!([change.id, status, error]))
                }
                Fate::Untouched => {}
            }
        }
        let (delivered, retries, dead) = (
            serde_json::Value::from(delivered).to_string(),
            serde_json::Value::from(retries).to_string(),
            serde_json::Value::from(dead).to_string(),
        );
        self.in_transaction(|tx| {
            tx.exec_drop(RECORD_DELIVERED, (delivered,))?;
            tx.exec_drop(RECORD_RETRIES, (retries,))?;
            tx.exec_drop(RECORD_DEAD, (dead,))
        })?;
        // The receipts recorded the write-back as due (write_back_at), in the same transaction:
        // it is done now, in transactions of its own, and whatever is not done (a locked row,
        // a table that refuses it) stays due and is tried again with back-off by
        // `write_back`. Nothing here holds up delivery.
        if let Err(e) = self.write_back_due() {
            tracing::warn!(source = %self.place, error = %e, "the write-back could not be tried; it stays due in certyo_queue and is tried again");
        }
        Ok(())
    }

    fn due_for_verification(&mut self, limit: usize) -> Result<Vec<Delivered>> {
        type Row = (i64, String, String, String, String, u32, i64);
        let rows: Vec<Row> = self.in_transaction(|tx| {
            tx.exec(
                "SELECT id, collection, record_id, operation, record_hash, verify_attempts,
                        TIMESTAMPDIFF(SECOND, delivered_at, UTC_TIMESTAMP(6))
                   FROM certyo_queue
                  WHERE next_verify_at <= UTC_TIMESTAMP(6) AND status = 'delivered'
                    AND anchor_status IN ('pending', 'overdue')
                  ORDER BY next_verify_at
                  LIMIT ?",
                (limit as u64,),
            )
        })?;
        Ok(rows
            .into_iter()
            .map(
                |(id, collection, record_id, operation, record_hash, verify_attempts, age)| {
                    Delivered {
                        id,
                        collection,
                        record_id,
                        operation: Operation::parse(&operation).unwrap_or(Operation::Upsert),
                        record_hash,
                        verify_attempts,
                        accepted_age: Duration::from_secs(age.max(0) as u64),
                    }
                },
            )
            .collect())
    }

    fn record_anchoring(&mut self, results: &[(Delivered, Anchoring)]) -> Result<()> {
        let mut settled = Vec::new();
        let mut later = Vec::new();
        for (due, found) in results {
            match found {
                Anchoring::Anchored { polygon_tx_hash } => {
                    settled.push(serde_json::json!([
                        due.id,
                        "anchored",
                        polygon_tx_hash,
                        null
                    ]));
                }
                Anchoring::Mismatch { reported_hash } => {
                    tracing::warn!(
                        collection = %due.collection, record_id = %due.record_id, held = %due.record_hash,
                        reported = %reported_hash,
                        "Certyo reports another hash for this record than its receipt holds: the anchored record is not the one sent"
                    );
                    settled.push(serde_json::json!([due.id, "mismatch", null, reported_hash]));
                }
                Anchoring::Later { after, overdue, .. } => later.push(serde_json::json!([
                    due.id,
                    micros(*after),
                    i32::from(*overdue)
                ])),
            }
        }
        let (settled, later) = (
            serde_json::Value::from(settled).to_string(),
            serde_json::Value::from(later).to_string(),
        );
        // A settled change's row is to be marked anchored (or mismatch) unless the record has a
        // newer change: that one's state is the row's, and its own receipt writes it back. (Were
        // it marked anyway, the write-back would derive the state from the newest change,
        // which may be cleaned up by then, leaving this older one to look newest.)
        self.in_transaction(|tx| {
            let superseded: Vec<i64> = tx.exec(SUPERSEDED, (settled.clone(),))?;
            tx.exec_drop(
                RECORD_SETTLED,
                (settled, serde_json::Value::from(superseded).to_string()),
            )?;
            tx.exec_drop(RECORD_LATER, (later,))
        })?;
        if let Err(e) = self.write_back_due() {
            tracing::warn!(source = %self.place, error = %e, "the write-back could not be tried; it stays due in certyo_queue and is tried again");
        }
        Ok(())
    }

    fn write_back(&mut self) -> Result<bool> {
        Ok(self.write_back_due()? > 0)
    }

    fn clean_up(&mut self, retention: Duration) -> Result<u64> {
        // Small batches: a long DELETE would hold locks the writers' triggers need. The rows
        // are found by a plain (consistent) read and deleted by id: a DELETE that scanned for
        // them would wait for the row an open application transaction's trigger has just
        // queued (uncommitted), and stall the whole source for as long.
        let mut removed = 0;
        loop {
            let (found, affected) = self.in_transaction(|tx| {
                // A change whose record has an older change still to write back stays: that
                // write-back reads the record's newest change to know what the row holds.
                let ids: Vec<i64> = tx.exec(
                    "SELECT q.id FROM certyo_queue q
                      WHERE q.status = 'delivered' AND q.anchor_status = 'anchored'
                        AND q.delivered_at < UTC_TIMESTAMP(6) - INTERVAL ? MICROSECOND
                        AND q.write_back_at IS NULL
                        AND NOT EXISTS (SELECT 1 FROM certyo_queue o
                                         WHERE o.collection = q.collection AND o.record_id = q.record_id
                                           AND o.id < q.id AND o.write_back_at IS NOT NULL)
                      ORDER BY q.id
                      LIMIT 5000",
                    (micros(retention),),
                )?;
                if ids.is_empty() {
                    return Ok((0, 0));
                }
                tx.exec_drop(
                    "DELETE q FROM JSON_TABLE(?, '$[*]' COLUMNS (id BIGINT PATH '$')) v
                       STRAIGHT_JOIN certyo_queue q FORCE INDEX (PRIMARY) ON q.id = v.id
                      WHERE q.status = 'delivered' AND q.anchor_status = 'anchored'
                        AND q.write_back_at IS NULL",
                    (serde_json::Value::from(ids.clone()).to_string(),),
                )?;
                Ok((ids.len(), tx.affected_rows()))
            })?;
            removed += affected;
            if found < 5000 {
                return Ok(removed);
            }
        }
    }

    fn status(&mut self) -> Result<Status> {
        type Row = (i64, i64, i64, i64, Option<String>, i64, Option<String>);
        let row: Option<Row> = self.in_transaction(|tx| {
            tx.query_first(
                "SELECT COALESCE(SUM(status = 'pending'), 0), COALESCE(SUM(status = 'delivered'), 0),
                        COALESCE(SUM(anchor_status = 'anchored'), 0), COALESCE(SUM(status = 'dead'), 0),
                        (SELECT CONCAT(COALESCE(last_status, 0), ': ', last_error) FROM certyo_queue
                          WHERE last_error IS NOT NULL ORDER BY last_attempt_at DESC LIMIT 1),
                        COALESCE(SUM(write_back_at IS NOT NULL), 0),
                        (SELECT CONCAT(collection, ': ', write_back_error) FROM certyo_queue
                          WHERE write_back_error IS NOT NULL ORDER BY write_back_at DESC LIMIT 1)
                   FROM certyo_queue",
            )
        })?;
        let (pending, delivered, anchored, dead, last_error, not_written_back, write_back_error) =
            row.unwrap_or_default();
        let name = self.lease_name.clone();
        let holder: Option<(Option<i64>, Option<String>)> = self.in_transaction(|tx| {
            tx.exec_first(
                "SELECT CAST(IS_USED_LOCK(?) AS SIGNED),
                        (SELECT CAST(HOST AS CHAR) FROM information_schema.PROCESSLIST
                          WHERE ID = IS_USED_LOCK(?))",
                (&name, &name),
            )
        })?;
        let lease = match holder {
            Some((Some(connection), host)) => format!(
                "held by connection {connection}{}",
                host.map(|h| format!(" from {h}")).unwrap_or_default()
            ),
            _ => "free: no relay works this source".into(),
        };
        Ok(Status {
            pending,
            delivered,
            anchored,
            dead,
            last_error,
            not_written_back,
            write_back_error,
            progress: None,
            lease: Some(lease),
        })
    }
}

// Each records one kind of fate for a whole batch in one statement: the batch arrives as JSON
// rows, so a thousand changes cost one round trip, not a thousand (JSON_TABLE: MySQL 8.0,
// MariaDB 10.6).
const RECORD_DELIVERED: &str = "
    UPDATE JSON_TABLE(?, '$[*]' COLUMNS (id BIGINT PATH '$[0]', hash VARCHAR(100) PATH '$[1]',
                                         verify_us BIGINT PATH '$[2]')) v
      STRAIGHT_JOIN certyo_queue q FORCE INDEX (PRIMARY) ON q.id = v.id
       SET q.status = 'delivered', q.record_hash = v.hash, q.delivered_at = UTC_TIMESTAMP(6),
           q.attempts = q.attempts + 1, q.last_attempt_at = UTC_TIMESTAMP(6), q.last_status = 202,
           q.last_error = NULL, q.next_attempt_at = NULL, q.anchor_status = 'pending',
           q.next_verify_at = UTC_TIMESTAMP(6) + INTERVAL v.verify_us MICROSECOND,
           q.write_back_at = IF(q.operation = 'delete', NULL, UTC_TIMESTAMP(6)),
           q.write_back_attempts = 0, q.write_back_error = NULL
     WHERE q.status = 'pending'";

const RECORD_RETRIES: &str = "
    UPDATE JSON_TABLE(?, '$[*]' COLUMNS (id BIGINT PATH '$[0]', retry_us BIGINT PATH '$[1]',
                                         error TEXT PATH '$[2]')) v
      STRAIGHT_JOIN certyo_queue q FORCE INDEX (PRIMARY) ON q.id = v.id
       SET q.attempts = q.attempts + 1, q.last_attempt_at = UTC_TIMESTAMP(6), q.last_status = 0,
           q.last_error = v.error, q.next_attempt_at = UTC_TIMESTAMP(6) + INTERVAL v.retry_us MICROSECOND
     WHERE q.status = 'pending'";

const RECORD_DEAD: &str = "
    UPDATE JSON_TABLE(?, '$[*]' COLUMNS (id BIGINT PATH '$[0]', http_status INT PATH '$[1]',
                                         error TEXT PATH '$[2]')) v
      STRAIGHT_JOIN certyo_queue q FORCE INDEX (PRIMARY) ON q.id = v.id
       SET q.status = 'dead', q.attempts = q.attempts + 1, q.last_attempt_at = UTC_TIMESTAMP(6),
           q.last_status = v.http_status, q.last_error = v.error, q.next_attempt_at = NULL,
           -- The row holds this version, which has no receipt: an older version's hash (and
           -- anchored) must not stay on it (the write-back clears it).
           q.write_back_at = IF(q.operation = 'delete', NULL, UTC_TIMESTAMP(6)),
           q.write_back_attempts = 0, q.write_back_error = NULL
     WHERE q.status = 'pending'";

const RECORD_SETTLED: &str = "
    UPDATE JSON_TABLE(?, '$[*]' COLUMNS (id BIGINT PATH '$[0]', anchor VARCHAR(10) PATH '$[1]',
                                         tx VARCHAR(100) PATH '$[2]', reported VARCHAR(100) PATH '$[3]')) v
      STRAIGHT_JOIN certyo_queue q FORCE INDEX (PRIMARY)
        ON q.id = v.id
       SET q.anchor_status = v.anchor, q.polygon_tx_hash = v.tx, q.reported_hash = v.reported,
           q.verified_at = UTC_TIMESTAMP(6), q.verify_attempts = q.verify_attempts + 1,
           q.next_verify_at = NULL,
           q.write_back_at = IF(q.operation = 'delete' OR JSON_CONTAINS(?, CAST(q.id AS CHAR)), q.write_back_at,
                                UTC_TIMESTAMP(6))";

/// Of the changes (JSON rows whose first element is the queue id), those whose record has a
/// newer change.
const SUPERSEDED: &str = "
    SELECT d.id
      FROM JSON_TABLE(?, '$[*]' COLUMNS (id BIGINT PATH '$[0]')) v
      JOIN certyo_queue d ON d.id = v.id
     WHERE EXISTS (SELECT 1 FROM certyo_queue n
                    WHERE n.collection = d.collection AND n.record_id = d.record_id AND n.id > d.id)";

const RECORD_LATER: &str = "
    UPDATE JSON_TABLE(?, '$[*]' COLUMNS (id BIGINT PATH '$[0]', after_us BIGINT PATH '$[1]',
                                         overdue INT PATH '$[2]')) v
      STRAIGHT_JOIN certyo_queue q FORCE INDEX (PRIMARY)
        ON q.id = v.id
       SET q.anchor_status = IF(v.overdue = 1, 'overdue', q.anchor_status),
           q.verified_at = UTC_TIMESTAMP(6), q.verify_attempts = q.verify_attempts + 1,
           q.next_verify_at = UTC_TIMESTAMP(6) + INTERVAL v.after_us MICROSECOND";

#[cfg(test)]
mod tests {
    #[test]
    fn the_lease_is_the_lock_earlier_relays_asked_for() {
        // Earlier relays named it in SQL: CONCAT('certyo-relay:', SHA1(DATABASE())).
        assert_eq!(
            super::lease_name("shop"),
            "certyo-relay:5042d146667518a1a5017644946b8650aafca44c"
        );
        assert!(super::lease_name(&"x".repeat(64)).len() <= 64);
    }
}
