//! The MySQL/MariaDB companion's queue (`sql/mysql/certyo_queue.sql`): the triggers queue each
//! change in the writer's transaction; this reads `certyo_queue` in id order and records each
//! change's fate on its queue row, with the write-back of Certyo's hash to the source row due
//! (`write_back_at`), which `write_back` does on a thread and a session of its own. The
//! companion's update trigger compares business columns only, so the write-back (bookkeeping
//! columns) queues nothing. A relay holds three sessions per source: this one, the lease's and
//! the write-back's.
//!
//! Every call here is one transaction; nothing is written for a change between `take` and
//! `record`, so a relay killed in between sends the change again after its restart, under the
//! same idempotency key, and Certyo answers it as a replay.

use super::{Anchoring, Change, Delivered, Fate, Operation, Result, SourceError, Status};
use mysql::prelude::Queryable;
use mysql::{Conn, Opts, TxOpts};
use std::time::Duration;
use write_back::WriteBackThread;

mod write_back;

pub struct MySqlQueue {
    opts: Opts,
    /// Where, without the password: for logs and status.
    place: String,
    database: String,
    conn: Option<Conn>,
    /// The write-back, on a thread and a session of its own (see `write_back`).
    write_back: WriteBackThread,
    /// The session that holds the lease (`lease`) while it lives, and whether it does.
    lease_conn: Option<Conn>,
    leased: bool,
    /// The lease's lock name (`lease_name`).
    lease_name: String,
    /// How many candidates beyond the limit a take reads (`take`).
    take_extra: usize,
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
        let write_back =
            WriteBackThread::new(opts.clone(), place.clone(), lock_wait, max_retry_interval);
        Ok(MySqlQueue {
            opts,
            place,
            lease_name: lease_name(&schema),
            database: database.unwrap_or(schema),
            conn: None,
            write_back,
            lease_conn: None,
            leased: false,
            take_extra: 0,
        })
    }

    /// The connection, opened (again) on first use after a failure.
    /// Its metadata-lock waits end after [`QUEUE_LOCK_WAIT`] (the server's default is a year):
    /// on MySQL `LOCK TABLES` of a tracked table also locks `certyo_queue` through the
    /// triggers, and a relay waiting behind it would neither deliver nor stop at SIGTERM.
    fn conn(&mut self) -> Result<&mut Conn> {
        if self.conn.is_none() {
            let opts = mysql::OptsBuilder::from_opts(self.opts.clone()).init(vec![format!(
                "SET SESSION lock_wait_timeout = {}",
                QUEUE_LOCK_WAIT.as_secs()
            )]);
            let conn = Conn::new(opts)
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
        let result = self
            .conn()
            .and_then(|conn| one_transaction(conn, &place, work));
        if result.is_err() {
            self.conn = None;
        }
        result
    }
}

/// `work` in one transaction on `conn`, committed; an error names `place`.
fn one_transaction<T>(
    conn: &mut Conn,
    place: &str,
    work: impl FnOnce(&mut mysql::Transaction<'_>) -> mysql::Result<T>,
) -> Result<T> {
    let fail = |e: mysql::Error| SourceError(format!("{place}: {e}"));
    let mut tx = conn.start_transaction(TxOpts::default()).map_err(fail)?;
    let value = work(&mut tx).map_err(fail)?;
    tx.commit().map_err(fail)?;
    Ok(value)
}

/// How long the queue's session waits for a metadata lock (a table someone locked or alters)
/// before the pass fails and is tried again: short, so that SIGTERM is answered soon (a pass,
/// the metrics and the last summary each read the queue, and each may wait this long).
const QUEUE_LOCK_WAIT: Duration = Duration::from_secs(5);

/// The lease's lock: one per database, `certyo-relay:` and the SHA-1 of the database's name
/// in hex (a lock name has 64 characters at most). Computed here, not by the server: MySQL 9
/// has no `SHA1()` any more, and relays of every version must ask for the same lock.
fn lease_name(schema: &str) -> String {
    use sha1::Digest;
    let digest = sha1::Sha1::digest(schema.as_bytes());
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("certyo-relay:{hex}")
}

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

/// The oldest changes due, each with whether it is free to go: not if its record has an older
/// change still pending (that goes first, in a later batch). The older change is looked for by
/// one probe of the record's index per candidate (a subquery with `LIMIT` is never made a
/// join): as a `NOT EXISTS`, MySQL 9.7 may plan it as a join over the whole queue, for seconds
/// per batch.
const TAKE: &str = "
    SELECT c.id, c.collection, c.record_id, c.operation, CAST(c.payload AS CHAR),
           DATE_FORMAT(c.source_timestamp, '%Y-%m-%dT%H:%i:%s.%fZ'), c.idempotency_key, c.attempts,
           (SELECT o.id FROM certyo_queue o FORCE INDEX (certyo_queue_record)
             WHERE o.collection = c.collection AND o.record_id = c.record_id
               AND CAST(o.record_id AS BINARY) = CAST(c.record_id AS BINARY)
               AND o.status = 'pending' AND o.id < c.id
             LIMIT 1) IS NULL
      FROM (SELECT id, collection, record_id, operation, payload, source_timestamp, idempotency_key, attempts
              FROM certyo_queue
             WHERE status = 'pending' AND (? OR next_attempt_at IS NULL OR next_attempt_at <= UTC_TIMESTAMP(6))
             ORDER BY id
             LIMIT ?) AS c
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
                self.write_back.lead(self.leased);
                Ok(self.leased)
            }
            Err(e) => {
                self.lease_conn = None;
                self.leased = false;
                self.write_back.lead(false);
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
        // A candidate whose record has an older pending change drops out, and the batch should
        // still fill: the take reads an eighth more than the limit, and while candidates that
        // dropped out leave batches short (records changed many times in a row), more: twice
        // the limit at the first such batch, doubling at each next, up to nine times the limit.
        // (A fixed twice the limit cost the server a third more per batch in a plain backlog,
        // and still came out short where each record had a few changes queued.)
        let least = (limit / 8).max(1);
        let extra = self.take_extra.clamp(least, limit * 8);
        let window = (limit + extra + in_flight.len()) as u64;
        type Row = (
            i64,
            String,
            String,
            String,
            String,
            String,
            Option<String>,
            u32,
            bool,
        );
        let rows: Vec<Row> = self.in_transaction(|tx| tx.exec(TAKE, (probing, window)))?;
        let window_full = rows.len() as u64 >= window;
        let mut changes = Vec::with_capacity(limit);
        for (
            id,
            collection,
            record_id,
            operation,
            payload,
            source_timestamp,
            key,
            attempts,
            free,
        ) in rows
        {
            if !free || in_flight.contains(&id) || changes.len() >= limit {
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
        self.take_extra = if changes.len() < limit && window_full {
            (extra * 2).max(limit)
        } else {
            extra / 2
        };
        Ok(changes)
    }

    fn record(&mut self, fates: &[(Change, Fate)]) -> Result<()> {
        let mut delivered = Vec::new();
        let mut first_time = Vec::new();
        let mut sent_before = Vec::new();
        let mut retries = Vec::new();
        let mut dead = Vec::new();
        for (change, fate) in fates {
            match fate {
                Fate::Delivered {
                    record_hash,
                    verify_after,
                    ..
                } => {
                    let receipt =
                        serde_json::json!([change.id, record_hash, micros(*verify_after)]);
                    if change.attempts == 0 {
                        first_time.push(receipt.clone());
                    } else {
                        sent_before.push(receipt.clone());
                    }
                    delivered.push(receipt);
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
        let first_time_count = first_time.len() as u64;
        let (first_time, sent_before, delivered, retries, dead) = (
            serde_json::Value::from(first_time).to_string(),
            (!sent_before.is_empty()).then(|| serde_json::Value::from(sent_before).to_string()),
            serde_json::Value::from(delivered).to_string(),
            serde_json::Value::from(retries).to_string(),
            serde_json::Value::from(dead).to_string(),
        );
        self.in_transaction(|tx| {
            // Most changes are delivered at their first attempt, with nothing to clear: recorded
            // without assigning the error columns (TEXT: assigned, even NULL to NULL, they cost
            // the server a fifth of the statement). Those sent before are recorded by the full
            // statement; so are all, should a row not be as taken (the full statement skips the
            // rows already recorded).
            let mut all_first_time = true;
            if first_time_count > 0 {
                tx.exec_drop(RECORD_DELIVERED_FIRST_TIME, (first_time,))?;
                all_first_time = tx.affected_rows() == first_time_count;
            }
            if !all_first_time {
                tx.exec_drop(RECORD_DELIVERED, (delivered,))?;
            } else if let Some(sent_before) = sent_before {
                tx.exec_drop(RECORD_DELIVERED, (sent_before,))?;
            }
            tx.exec_drop(RECORD_RETRIES, (retries,))?;
            tx.exec_drop(RECORD_DEAD, (dead,))
        })?;
        // The receipts recorded the write-back as due (write_back_at), in the same transaction:
        // the write-back's thread does it now, in transactions of its own, while the next
        // batch is taken and sent; whatever is not done (a locked row, a table that refuses
        // it) stays due and is tried again with back-off. Nothing here holds up delivery.
        if let Err(e) = self.write_back.wake() {
            // Recorded all the same: the write-backs stay due, and the pump's next pass wakes
            // (and fails on) the thread again.
            tracing::warn!(source = %self.place, error = %e, "the write-back could not be started; it stays due in certyo_queue");
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
        // In id order, as every statement of the relay's that writes queue rows (see
        // `write_back`): due for verification in time order, they are recorded in id order.
        let mut results: Vec<&(Delivered, Anchoring)> = results.iter().collect();
        results.sort_unstable_by_key(|(due, _)| due.id);
        let ids: Vec<i64> = results.iter().map(|(due, _)| due.id).collect();
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
            // Every row this records on, locked first, in id order: the write-back's session
            // writes queue rows in id order too, in one statement, so the two never wait for
            // each other in a circle.
            tx.exec_drop(LOCK_IN_ORDER, (serde_json::Value::from(ids).to_string(),))?;
            let superseded: Vec<i64> = tx.exec(SUPERSEDED, (settled.clone(),))?;
            tx.exec_drop(
                RECORD_SETTLED,
                (settled, serde_json::Value::from(superseded).to_string()),
            )?;
            tx.exec_drop(RECORD_LATER, (later,))
        })?;
        if let Err(e) = self.write_back.wake() {
            // Recorded all the same: the write-backs stay due, and the pump's next pass wakes
            // (and fails on) the thread again.
            tracing::warn!(source = %self.place, error = %e, "the write-back could not be started; it stays due in certyo_queue");
        }
        Ok(())
    }

    fn write_back(&mut self) -> Result<bool> {
        // Due write-backs (backed off until now) are looked for each pass; true when the
        // thread settled any since the last pass, so the next pass starts at once.
        self.write_back.wake()?;
        Ok(self.write_back.written_since_last_asked() > 0)
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
                        AND (SELECT o.id FROM certyo_queue o FORCE INDEX (certyo_queue_record)
                              WHERE o.collection = q.collection AND o.record_id = q.record_id
                                AND CAST(o.record_id AS BINARY) = CAST(q.record_id AS BINARY)
                                AND o.id < q.id AND o.write_back_at IS NOT NULL
                              LIMIT 1) IS NULL
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
/// A batch's receipts (`[id, hash, verify after µs]`); see also `RECORD_DELIVERED_FIRST_TIME`.
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

/// `RECORD_DELIVERED` for changes sent for the first time: their rows have no error to clear
/// and no write-back attempts to reset (checked, not assumed: a row that has is left pending,
/// for `RECORD_DELIVERED`). Keep the two in step: the same receipt, but for what is cleared.
const RECORD_DELIVERED_FIRST_TIME: &str = "
    UPDATE JSON_TABLE(?, '$[*]' COLUMNS (id BIGINT PATH '$[0]', hash VARCHAR(100) PATH '$[1]',
                                         verify_us BIGINT PATH '$[2]')) v
      STRAIGHT_JOIN certyo_queue q FORCE INDEX (PRIMARY) ON q.id = v.id
       SET q.status = 'delivered', q.record_hash = v.hash, q.delivered_at = UTC_TIMESTAMP(6),
           q.attempts = 1, q.last_attempt_at = UTC_TIMESTAMP(6), q.last_status = 202,
           q.next_attempt_at = NULL, q.anchor_status = 'pending',
           q.next_verify_at = UTC_TIMESTAMP(6) + INTERVAL v.verify_us MICROSECOND,
           q.write_back_at = IF(q.operation = 'delete', NULL, UTC_TIMESTAMP(6))
     WHERE q.status = 'pending' AND q.attempts = 0 AND q.last_error IS NULL
       AND q.write_back_attempts = 0 AND q.write_back_error IS NULL";

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

/// Queue rows (ids, ascending), locked in that order, one primary-key lookup each (the ids in a
/// derived table: MySQL counts a JSON_TABLE beside the table in the locking clause).
const LOCK_IN_ORDER: &str = "
    SELECT q.id FROM (SELECT * FROM JSON_TABLE(?, '$[*]' COLUMNS (id BIGINT PATH '$')) j) v
      STRAIGHT_JOIN certyo_queue q FORCE INDEX (PRIMARY) ON q.id = v.id
       FOR UPDATE";

/// Of the changes (JSON rows whose first element is the queue id), those whose record has a
/// newer change.
const SUPERSEDED: &str = "
    SELECT d.id
      FROM JSON_TABLE(?, '$[*]' COLUMNS (id BIGINT PATH '$[0]')) v
      STRAIGHT_JOIN certyo_queue d FORCE INDEX (PRIMARY) ON d.id = v.id
     WHERE (SELECT n.id FROM certyo_queue n FORCE INDEX (certyo_queue_record)
             WHERE n.collection = d.collection AND n.record_id = d.record_id
               AND CAST(n.record_id AS BINARY) = CAST(d.record_id AS BINARY) AND n.id > d.id
             LIMIT 1) IS NOT NULL";

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
