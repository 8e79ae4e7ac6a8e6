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
use mysql::prelude::Queryable;
use mysql::{Conn, Opts, TxOpts};
use std::collections::HashMap;
use std::time::Duration;

pub struct MySqlQueue {
    opts: Opts,
    /// Where, without the password: for logs and status.
    place: String,
    database: String,
    conn: Option<Conn>,
    /// Each source table's primary key, for the write-back (`schema.table` → columns).
    keys: HashMap<String, Vec<KeyColumn>>,
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
];

impl MySqlQueue {
    /// `url`: `mysql://user:password@host:port/database` (the mysql crate's URL form, e.g.
    /// `?socket=/run/mysqld/mysqld.sock`). `database`: Certyo's `database` field (default:
    /// the URL's database).
    pub fn new(url: &str, database: Option<String>) -> Result<MySqlQueue> {
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
            database: database.unwrap_or(schema),
            conn: None,
            keys: HashMap::new(),
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

    /// The primary key columns of `collection` (`schema.table`), in key order.
    fn key_columns(&mut self, collection: &str) -> Result<Vec<KeyColumn>> {
        if let Some(columns) = self.keys.get(collection) {
            return Ok(columns.clone());
        }
        let (schema, table) = split_collection(collection)?;
        type Row = (String, String, Option<String>, Option<String>);
        let rows: Vec<Row> = self.in_transaction(|tx| {
            tx.exec(
                "SELECT c.COLUMN_NAME, c.COLUMN_TYPE, c.CHARACTER_SET_NAME, c.COLLATION_NAME
                   FROM information_schema.KEY_COLUMN_USAGE k
                   JOIN information_schema.COLUMNS c
                     ON c.TABLE_SCHEMA = k.TABLE_SCHEMA AND c.TABLE_NAME = k.TABLE_NAME
                    AND c.COLUMN_NAME = k.COLUMN_NAME
                  WHERE k.TABLE_SCHEMA = ? AND k.TABLE_NAME = ? AND k.CONSTRAINT_NAME = 'PRIMARY'
                  ORDER BY k.ORDINAL_POSITION",
                (schema, table),
            )
        })?;
        let columns: Vec<KeyColumn> = rows
            .into_iter()
            .map(|(name, column_type, charset, collation)| KeyColumn {
                name,
                column_type,
                charset,
                collation,
            })
            .collect();
        self.keys.insert(collection.to_string(), columns.clone());
        Ok(columns)
    }

    /// Write `hash` and `status` to the source rows of `marks` (collection, record id, hash):
    /// one statement per table, whatever the batch's size. With `only_if_hash`, only rows that
    /// still hold that hash (verification must not mark a newer version anchored). Rows since
    /// deleted are skipped.
    fn mark_rows(
        &mut self,
        marks: &[(String, String, String)],
        status: &str,
        only_if_hash: bool,
    ) -> Result<()> {
        let mut by_table: HashMap<&str, Vec<serde_json::Value>> = HashMap::new();
        for (collection, record_id, hash) in marks {
            let columns = self.key_columns(collection)?.len();
            let mut row: Vec<serde_json::Value> = super::record_id_parts(record_id, columns)
                .into_iter()
                .map(serde_json::Value::from)
                .collect();
            row.push(hash.clone().into());
            by_table.entry(collection).or_default().push(row.into());
        }
        let mut statements = Vec::new();
        for (collection, rows) in by_table {
            let columns = self.key_columns(collection)?;
            if columns.is_empty() {
                tracing::warn!(
                    collection,
                    "the table has no primary key any more; its rows are not marked"
                );
                continue;
            }
            let (schema, table) = split_collection(collection)?;
            let sql = mark_statement(schema, table, &columns, status, only_if_hash);
            statements.push((sql, serde_json::Value::from(rows).to_string()));
        }
        self.in_transaction(|tx| {
            for (sql, rows) in statements {
                tx.exec_drop(sql, (rows,))?;
            }
            Ok(())
        })
    }
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

/// `UPDATE table JOIN JSON_TABLE(rows) ON key SET hash, status`: the rows arrive as one JSON
/// array of `[key part..., hash]`.
fn mark_statement(
    schema: &str,
    table: &str,
    columns: &[KeyColumn],
    status: &str,
    only_if_hash: bool,
) -> String {
    let parts: Vec<String> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| format!("k{i} {} PATH '$[{i}]'", c.json_table_type()))
        .collect();
    let on: Vec<String> = columns
        .iter()
        .enumerate()
        .map(|(i, c)| format!("t.{} = v.k{i}", quote(&c.name)))
        .collect();
    let verified = if status == "pending" {
        ""
    } else {
        ", t.certyo_verified_at = UTC_TIMESTAMP(6)"
    };
    format!(
        "UPDATE {}.{} t JOIN JSON_TABLE(?, '$[*]' COLUMNS ({}, h VARCHAR(100) PATH '$[{}]')) v ON {}
            SET t.certyo_record_hash = v.h, t.certyo_anchor_status = '{status}'{verified}{}",
        quote(schema),
        quote(table),
        parts.join(", "),
        columns.len(),
        on.join(" AND "),
        if only_if_hash {
            " WHERE t.certyo_record_hash <=> v.h"
        } else {
            ""
        }
    )
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
        let mut marks = Vec::new();
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
                    if change.operation != Operation::Delete {
                        marks.push((
                            change.collection.clone(),
                            change.record_id.clone(),
                            record_hash.clone(),
                        ));
                    }
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
        // The write-back is a transaction of its own, after the receipts are safe: a source
        // table that refuses it (dropped, altered, locked) must not hold up delivery.
        if let Err(e) = self.mark_rows(&marks, "pending", false) {
            tracing::warn!(source = %self.place, error = %e, "the hash could not be written back to the source rows; the receipts are kept in certyo_queue");
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
        let mut anchored_rows = Vec::new();
        let mut mismatched_rows = Vec::new();
        for (due, found) in results {
            let row = (
                due.collection.clone(),
                due.record_id.clone(),
                due.record_hash.clone(),
            );
            let keeps_row = due.operation != Operation::Delete;
            match found {
                Anchoring::Anchored { polygon_tx_hash } => {
                    settled.push(serde_json::json!([
                        due.id,
                        "anchored",
                        polygon_tx_hash,
                        null
                    ]));
                    if keeps_row {
                        anchored_rows.push(row);
                    }
                }
                Anchoring::Mismatch { reported_hash } => {
                    tracing::warn!(
                        collection = %due.collection, record_id = %due.record_id, held = %due.record_hash,
                        reported = %reported_hash,
                        "Certyo reports another hash for this record than its receipt holds: the anchored record is not the one sent"
                    );
                    settled.push(serde_json::json!([due.id, "mismatch", null, reported_hash]));
                    if keeps_row {
                        mismatched_rows.push(row);
                    }
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
        self.in_transaction(|tx| {
            tx.exec_drop(RECORD_SETTLED, (settled,))?;
            tx.exec_drop(RECORD_LATER, (later,))
        })?;
        for (rows, status) in [(anchored_rows, "anchored"), (mismatched_rows, "mismatch")] {
            if let Err(e) = self.mark_rows(&rows, status, true) {
                tracing::warn!(source = %self.place, error = %e, "the anchor status could not be written back to the source rows");
            }
        }
        Ok(())
    }

    fn clean_up(&mut self, retention: Duration) -> Result<u64> {
        // Small batches: a long DELETE would hold locks the writers' triggers need.
        let mut removed = 0;
        loop {
            let affected = self.in_transaction(|tx| {
                tx.exec_drop(
                    "DELETE FROM certyo_queue
                      WHERE status = 'delivered' AND anchor_status = 'anchored'
                        AND delivered_at < UTC_TIMESTAMP(6) - INTERVAL ? MICROSECOND
                      LIMIT 5000",
                    (micros(retention),),
                )?;
                Ok(tx.affected_rows())
            })?;
            removed += affected;
            if affected < 5000 {
                return Ok(removed);
            }
        }
    }

    fn status(&mut self) -> Result<Status> {
        type Row = (i64, i64, i64, i64, Option<String>);
        let row: Option<Row> = self.in_transaction(|tx| {
            tx.query_first(
                "SELECT COALESCE(SUM(status = 'pending'), 0), COALESCE(SUM(status = 'delivered'), 0),
                        COALESCE(SUM(anchor_status = 'anchored'), 0), COALESCE(SUM(status = 'dead'), 0),
                        (SELECT CONCAT(COALESCE(last_status, 0), ': ', last_error) FROM certyo_queue
                          WHERE last_error IS NOT NULL ORDER BY last_attempt_at DESC LIMIT 1)
                   FROM certyo_queue",
            )
        })?;
        let (pending, delivered, anchored, dead, last_error) = row.unwrap_or_default();
        Ok(Status {
            pending,
            delivered,
            anchored,
            dead,
            last_error,
            progress: None,
        })
    }
}

// Each records one kind of fate for a whole batch in one statement: the batch arrives as JSON
// rows, so a thousand changes cost one round trip, not a thousand (JSON_TABLE: MySQL 8.0,
// MariaDB 10.6).
const RECORD_DELIVERED: &str = "
    UPDATE certyo_queue q
      JOIN JSON_TABLE(?, '$[*]' COLUMNS (id BIGINT PATH '$[0]', hash VARCHAR(100) PATH '$[1]',
                                         verify_us BIGINT PATH '$[2]')) v ON q.id = v.id
       SET q.status = 'delivered', q.record_hash = v.hash, q.delivered_at = UTC_TIMESTAMP(6),
           q.attempts = q.attempts + 1, q.last_attempt_at = UTC_TIMESTAMP(6), q.last_status = 202,
           q.last_error = NULL, q.next_attempt_at = NULL, q.anchor_status = 'pending',
           q.next_verify_at = UTC_TIMESTAMP(6) + INTERVAL v.verify_us MICROSECOND
     WHERE q.status = 'pending'";

const RECORD_RETRIES: &str = "
    UPDATE certyo_queue q
      JOIN JSON_TABLE(?, '$[*]' COLUMNS (id BIGINT PATH '$[0]', retry_us BIGINT PATH '$[1]',
                                         error TEXT PATH '$[2]')) v ON q.id = v.id
       SET q.attempts = q.attempts + 1, q.last_attempt_at = UTC_TIMESTAMP(6), q.last_status = 0,
           q.last_error = v.error, q.next_attempt_at = UTC_TIMESTAMP(6) + INTERVAL v.retry_us MICROSECOND
     WHERE q.status = 'pending'";

const RECORD_DEAD: &str = "
    UPDATE certyo_queue q
      JOIN JSON_TABLE(?, '$[*]' COLUMNS (id BIGINT PATH '$[0]', http_status INT PATH '$[1]',
                                         error TEXT PATH '$[2]')) v ON q.id = v.id
       SET q.status = 'dead', q.attempts = q.attempts + 1, q.last_attempt_at = UTC_TIMESTAMP(6),
           q.last_status = v.http_status, q.last_error = v.error, q.next_attempt_at = NULL
     WHERE q.status = 'pending'";

const RECORD_SETTLED: &str = "
    UPDATE certyo_queue q
      JOIN JSON_TABLE(?, '$[*]' COLUMNS (id BIGINT PATH '$[0]', anchor VARCHAR(10) PATH '$[1]',
                                         tx VARCHAR(100) PATH '$[2]', reported VARCHAR(100) PATH '$[3]')) v
        ON q.id = v.id
       SET q.anchor_status = v.anchor, q.polygon_tx_hash = v.tx, q.reported_hash = v.reported,
           q.verified_at = UTC_TIMESTAMP(6), q.verify_attempts = q.verify_attempts + 1,
           q.next_verify_at = NULL";

const RECORD_LATER: &str = "
    UPDATE certyo_queue q
      JOIN JSON_TABLE(?, '$[*]' COLUMNS (id BIGINT PATH '$[0]', after_us BIGINT PATH '$[1]',
                                         overdue INT PATH '$[2]')) v
        ON q.id = v.id
       SET q.anchor_status = IF(v.overdue = 1, 'overdue', q.anchor_status),
           q.verified_at = UTC_TIMESTAMP(6), q.verify_attempts = q.verify_attempts + 1,
           q.next_verify_at = UTC_TIMESTAMP(6) + INTERVAL v.after_us MICROSECOND";
