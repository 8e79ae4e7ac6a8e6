//! SQL Server and Azure SQL (`sql/sqlserver/`), in three modes:
//! - `queue`: the trigger queue `certyo.Queue` (trigger_queue.sql); the delivery state is kept
//!   on the queue rows, like MySQL's queue.
//! - `cdc`: Change Data Capture (cdc.sql), read through the generated per-table functions;
//!   progress is an LSN per table in `certyo.Progress`.
//! - `change_tracking`: Change Tracking (change_tracking.sql); progress is a version per table.
//!
//! For CDC and Change Tracking nothing is copied into a queue: the relay reads the changes after
//! the persisted progress, and advances the progress past a change only once it and every
//! change before it are delivered (a receipt in `certyo.Receipt`) or dead (`certyo.DeadLetter`).
//! A change delivered after one that is still retrying stays before the progress: it is
//! remembered in memory so that it is not sent again, and after a restart it is read again
//! and sent again with the same idempotency key, which Certyo answers as a replay.
//!
//! The logic (`queue.rs`, `log.rs`) talks to a `db::Db`; `wire::Wire` is the tiberius
//! implementation, and the tests run the logic against an in-memory fake (`fake.rs`).

mod db;
mod log;
mod queue;
pub mod statements;
mod wire;

#[cfg(test)]
mod fake;
#[cfg(test)]
mod tests;

use super::{
    record_id_parts, Anchoring, Change, Delivered, Fate, Result, Source, SourceError, Status,
};
use db::{Db, Value};
use std::time::Duration;

/// Which companion the database runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Queue,
    Cdc,
    ChangeTracking,
}

impl Mode {
    pub fn parse(text: &str) -> Option<Mode> {
        match text {
            "queue" => Some(Mode::Queue),
            "cdc" => Some(Mode::Cdc),
            "change_tracking" => Some(Mode::ChangeTracking),
            _ => None,
        }
    }

    /// As in `certyo.TrackedTable.Mode` and the configuration.
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Queue => "queue",
            Mode::Cdc => "cdc",
            Mode::ChangeTracking => "change_tracking",
        }
    }

    fn script(self) -> &'static str {
        match self {
            Mode::Queue => "sql/sqlserver/trigger_queue.sql",
            Mode::Cdc => "sql/sqlserver/cdc.sql",
            Mode::ChangeTracking => "sql/sqlserver/change_tracking.sql",
        }
    }
}

/// A connection URL `sqlserver://user:password@host:port/database[?options]`, parsed.
/// Options: `encrypt=true|false` (default true: TLS required), `trust_server_certificate=true`
/// (default false). Named instances: give the instance's port.
#[derive(Clone, PartialEq)]
pub struct Url {
    pub user: String,
    pub password: String,
    pub host: String,
    pub port: u16,
    pub database: String,
    pub encrypt: bool,
    pub trust_server_certificate: bool,
}

/// Written by hand so that no `{:?}` ever prints the password.
impl std::fmt::Debug for Url {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Url")
            .field("user", &self.user)
            .field("password", &"[hidden]")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("database", &self.database)
            .field("encrypt", &self.encrypt)
            .field("trust_server_certificate", &self.trust_server_certificate)
            .finish()
    }
}

impl Url {
    pub fn parse(url: &str) -> Result<Url> {
        let bad = |why: &str| {
            SourceError(format!(
                "the SQL Server URL is invalid ({why}); write it as sqlserver://user:password@host:port/database"
            ))
        };
        let rest = url
            .strip_prefix("sqlserver://")
            .ok_or_else(|| bad("it does not start with sqlserver://"))?;
        let (rest, query) = match rest.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (rest, None),
        };
        // The password may contain '@' when not percent-encoded: the host follows the last.
        let (credentials, location) = rest.rsplit_once('@').ok_or_else(|| bad("no user@"))?;
        let (user, password) = credentials.split_once(':').unwrap_or((credentials, ""));
        let (hostport, database) = location
            .split_once('/')
            .ok_or_else(|| bad("no /database"))?;
        let (host, port) = match hostport.rsplit_once(':') {
            Some((h, p)) => (
                h,
                p.parse::<u16>()
                    .map_err(|_| bad("the port is not a number"))?,
            ),
            None => (hostport, 1433),
        };
        let mut parsed = Url {
            user: decode(user).ok_or_else(|| bad("bad %-escape in the user"))?,
            password: decode(password).ok_or_else(|| bad("bad %-escape in the password"))?,
            host: host.to_string(),
            port,
            database: decode(database).ok_or_else(|| bad("bad %-escape in the database"))?,
            encrypt: true,
            trust_server_certificate: false,
        };
        if parsed.user.is_empty() || parsed.host.is_empty() || parsed.database.is_empty() {
            return Err(bad("the user, the host and the database are required"));
        }
        for option in query.unwrap_or("").split('&').filter(|o| !o.is_empty()) {
            let (name, value) = option.split_once('=').unwrap_or((option, "true"));
            let flag = || match value {
                "true" | "yes" | "1" | "on" => Ok(true),
                "false" | "no" | "0" | "off" => Ok(false),
                _ => Err(bad("an option's value is not true or false")),
            };
            match name {
                "encrypt" => parsed.encrypt = flag()?,
                "trust_server_certificate" | "TrustServerCertificate" => {
                    parsed.trust_server_certificate = flag()?
                }
                _ => {
                    return Err(bad(
                        "unknown option (known: encrypt, trust_server_certificate)",
                    ))
                }
            }
        }
        Ok(parsed)
    }

    /// Without the password.
    pub fn describe(&self) -> String {
        format!(
            "sqlserver://{}@{}:{}/{}",
            self.user, self.host, self.port, self.database
        )
    }
}

fn decode(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = text.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// A tracked table, from `certyo.TrackedTable`.
#[derive(Debug, Clone, PartialEq)]
struct Table {
    collection: String,
    key_columns: usize,
    capture_instance: Option<String>,
}

/// Opens another session to the database (the lease's own).
type Connect = Box<dyn FnMut() -> Result<Box<dyn Db>> + Send>;

/// The SQL Server source, in one of its modes.
pub struct SqlServer {
    db: Box<dyn Db>,
    /// The lease (`Source::lease`): an application lock (`sp_getapplock`) owned by a session of
    /// its own, which SQL Server releases the moment that session ends, however the relay ended.
    connect_lease: Connect,
    lease_db: Option<Box<dyn Db>>,
    leased: bool,
    mode: Mode,
    describe: String,
    database: String,
    tables: Vec<Table>,
    /// CDC / Change Tracking: the changes read and not yet passed by the progress.
    log: log::Log,
}

impl SqlServer {
    /// Parse the URL and prepare the connection; it is opened by `check` (and again after a
    /// failure, by the next call).
    pub fn connect(url: &str, mode: Mode, database_override: Option<String>) -> Result<SqlServer> {
        let parsed = Url::parse(url)?;
        let describe = format!("{} ({})", parsed.describe(), mode.as_str());
        let database = database_override.unwrap_or_else(|| parsed.database.clone());
        let wire = wire::Wire::new(&parsed)?;
        let connect_lease: Connect =
            Box::new(move || Ok(Box::new(wire::Wire::new(&parsed)?) as Box<dyn Db>));
        Ok(SqlServer::with_db(
            Box::new(wire),
            connect_lease,
            mode,
            describe,
            database,
        ))
    }

    fn with_db(
        db: Box<dyn Db>,
        connect_lease: Connect,
        mode: Mode,
        describe: String,
        database: String,
    ) -> SqlServer {
        SqlServer {
            db,
            connect_lease,
            lease_db: None,
            leased: false,
            mode,
            describe,
            database,
            tables: Vec::new(),
            log: log::Log::default(),
        }
    }

    fn load_tables(&mut self) -> Result<()> {
        let rows = self.db.query(
            statements::TRACKED_TABLES,
            &[Value::text(self.mode.as_str())],
        )?;
        let mut tables = Vec::with_capacity(rows.len());
        for row in &rows {
            let c = db::Cols {
                row,
                what: "certyo.TrackedTable",
            };
            tables.push(Table {
                collection: c.text(0)?,
                key_columns: usize::try_from(c.i64(1)?).unwrap_or(1).max(1),
                capture_instance: c.opt_text(2)?,
            });
        }
        self.tables = tables;
        Ok(())
    }
}

/// Milliseconds as the statements take them (INT: at most ~24 days).
fn millis(d: Duration) -> Value {
    Value::int(d.as_millis().min(i32::MAX as u128) as i64)
}

fn seconds(d: Duration) -> Value {
    Value::int(d.as_secs().min(i32::MAX as u64) as i64)
}

/// `YYYY-MM-DD HH:MM:SS[.ffffff]` (style 121) → `YYYY-MM-DDTHH:MM:SS.ffffffZ`.
fn rfc3339(text: &str) -> String {
    let text = text.trim();
    let (date_time, fraction) = text.split_once('.').unwrap_or((text, ""));
    let mut fraction: String = fraction
        .chars()
        .filter(char::is_ascii_digit)
        .take(6)
        .collect();
    while fraction.len() < 6 {
        fraction.push('0');
    }
    format!("{}.{}Z", date_time.replacen(' ', "T", 1), fraction)
}

/// After a 202: mark the source row `pending` with the new hash, unless the change was a delete
/// (no row) or a newer change of the record is queued (the row holds newer content, whose own
/// hash follows). Shared by the queue and the CDC / Change Tracking modes.
fn write_back_delivered(
    db: &mut dyn Db,
    tables: &[Table],
    change: &super::Change,
    record_hash: &str,
    newer: bool,
) -> Result<()> {
    if change.operation == super::Operation::Delete || newer {
        return Ok(());
    }
    let table = tables.iter().find(|t| t.collection == change.collection);
    write_back(
        db,
        table,
        &change.collection,
        &change.record_id,
        Some(record_hash),
        "pending",
        None,
    )
}

/// Write the hash / anchor status back to the source row, through `certyo.WriteBack`. A table
/// missing from the registry (tracked before it existed) is skipped with a warning: delivery
/// must go on; re-running its TrackTable procedure registers it.
fn write_back(
    db: &mut dyn Db,
    table: Option<&Table>,
    collection: &str,
    record_id: &str,
    hash: Option<&str>,
    status: &str,
    only_if: Option<&str>,
) -> Result<()> {
    let Some(table) = table else {
        tracing::warn!(
            "{collection} is not in certyo.TrackedTable: the hash is not written back; run its TrackTable procedure again"
        );
        return Ok(());
    };
    let keys = serde_json::to_string(&record_id_parts(record_id, table.key_columns))
        .map_err(|e| SourceError(format!("record id {record_id:?} of {collection}: {e}")))?;
    db.query(
        statements::WRITE_BACK,
        &[
            Value::text(collection),
            Value::Text(Some(keys)),
            Value::opt_text(hash),
            Value::text(status),
            Value::opt_text(only_if),
        ],
    )?;
    Ok(())
}

impl Source for SqlServer {
    fn describe(&self) -> String {
        self.describe.clone()
    }

    fn database(&self) -> &str {
        &self.database
    }

    fn check(&mut self) -> Result<()> {
        let rows = self.db.query(statements::CHECK_OBJECTS, &[])?;
        let row = rows
            .first()
            .ok_or_else(|| SourceError("SQL Server: the object check returned nothing".into()))?;
        let c = db::Cols {
            row,
            what: "the object check",
        };
        let missing = |what: &str, script: &str| {
            Err(SourceError(format!(
                "SQL Server {}: {what} is missing; run {script} in the database",
                self.describe
            )))
        };
        if !c.bool(0)? || !c.bool(1)? {
            return missing(
                "certyo.TrackedTable / certyo.WriteBack",
                "sql/sqlserver/common.sql",
            );
        }
        let mode_ok = match self.mode {
            Mode::Queue => c.bool(2)?,
            Mode::Cdc => c.bool(3)? && c.bool(5)?,
            Mode::ChangeTracking => c.bool(4)? && c.bool(5)?,
        };
        if !mode_ok {
            return missing(
                "the objects of this mode (or columns of this version)",
                self.mode.script(),
            );
        }
        self.load_tables()?;
        if self.mode != Mode::Queue {
            self.log.installation = Some(log::installation(self.db.as_mut())?);
            if self.tables.is_empty() {
                tracing::warn!(
                    "{}: no table is tracked in mode {}; track one with its TrackTable procedure",
                    self.describe,
                    self.mode.as_str()
                );
            }
        }
        Ok(())
    }

    /// One relay works a database at a time: the one whose lease session holds the
    /// application lock `certyo-relay` (asked for without waiting). A relay that takes the
    /// lease over starts from what the database holds, not from what it read before.
    fn lease(&mut self) -> Result<bool> {
        if self.lease_db.is_none() {
            self.leased = false;
            self.lease_db = Some((self.connect_lease)()?);
        }
        let asked = match self.lease_db.as_mut() {
            Some(db) => db.query(statements::LEASE_TAKE, &[]),
            None => Ok(Vec::new()),
        };
        let held = match asked.and_then(|rows| match rows.first() {
            Some(row) => db::Cols {
                row,
                what: "the lease",
            }
            .bool(0),
            None => Ok(false),
        }) {
            Ok(held) => held,
            Err(e) => {
                self.lease_db = None;
                self.leased = false;
                return Err(SourceError(format!(
                    "{}: the relays' lease: {e}",
                    self.describe
                )));
            }
        };
        if held && !self.leased && self.mode != Mode::Queue {
            let installation = self.log.installation.take();
            self.log = log::Log::default();
            self.log.installation = installation;
        }
        self.leased = held;
        Ok(held)
    }

    fn take(&mut self, limit: usize, probing: bool, in_flight: &[i64]) -> Result<Vec<Change>> {
        match self.mode {
            Mode::Queue => queue::take(self.db.as_mut(), limit, probing, in_flight),
            mode => self.log.take(
                self.db.as_mut(),
                mode,
                &self.tables,
                limit,
                probing,
                in_flight,
            ),
        }
    }

    fn record(&mut self, fates: &[(Change, Fate)]) -> Result<()> {
        if fates
            .iter()
            .all(|(_, fate)| matches!(fate, Fate::Untouched))
        {
            return Ok(());
        }
        match self.mode {
            Mode::Queue => {
                let tables = &self.tables;
                db::transaction(self.db.as_mut(), |db| queue::record(db, tables, fates))
            }
            mode => self.log.record(self.db.as_mut(), mode, &self.tables, fates),
        }
    }

    fn due_for_verification(&mut self, limit: usize) -> Result<Vec<Delivered>> {
        let sql = match self.mode {
            Mode::Queue => statements::QUEUE_DUE,
            _ => statements::RECEIPT_DUE,
        };
        let rows = self.db.query(sql, &[Value::int(limit as i64)])?;
        let mut due = Vec::with_capacity(rows.len());
        for row in &rows {
            let c = db::Cols {
                row,
                what: "the due receipts",
            };
            let operation = c.text(3)?;
            due.push(Delivered {
                id: c.i64(0)?,
                collection: c.text(1)?,
                record_id: c.text(2)?,
                operation: super::Operation::parse(&operation).ok_or_else(|| {
                    SourceError(format!(
                        "SQL Server: unknown operation {operation:?} in a receipt"
                    ))
                })?,
                record_hash: c.text(4)?,
                verify_attempts: u32::try_from(c.i64(5)?).unwrap_or(0),
                accepted_age: Duration::from_secs(c.i64(6)?.max(0) as u64),
            });
        }
        Ok(due)
    }

    fn record_anchoring(&mut self, results: &[(Delivered, Anchoring)]) -> Result<()> {
        if results.is_empty() {
            return Ok(());
        }
        let (anchored, mismatch, later) = match self.mode {
            Mode::Queue => (
                statements::QUEUE_ANCHORED,
                statements::QUEUE_MISMATCH,
                statements::QUEUE_LATER,
            ),
            _ => (
                statements::RECEIPT_ANCHORED,
                statements::RECEIPT_MISMATCH,
                statements::RECEIPT_LATER,
            ),
        };
        let tables = &self.tables;
        db::transaction(self.db.as_mut(), |db| {
            for (due, result) in results {
                let table = tables.iter().find(|t| t.collection == due.collection);
                let mark = match result {
                    Anchoring::Anchored { polygon_tx_hash } => {
                        db.query(
                            anchored,
                            &[
                                Value::int(due.id),
                                Value::opt_text(polygon_tx_hash.as_deref()),
                            ],
                        )?;
                        Some("anchored")
                    }
                    Anchoring::Mismatch { reported_hash } => {
                        db.query(mismatch, &[Value::int(due.id), Value::text(reported_hash)])?;
                        Some("mismatch")
                    }
                    Anchoring::Later {
                        after,
                        overdue,
                        error,
                    } => {
                        db.query(
                            later,
                            &[
                                Value::int(due.id),
                                millis(*after),
                                Value::bool(*overdue),
                                Value::opt_text(error.as_deref()),
                            ],
                        )?;
                        None
                    }
                };
                // Only on a row that still holds this hash: a newer change has its own.
                if let (Some(mark), false) = (mark, due.operation == super::Operation::Delete) {
                    write_back(
                        db,
                        table,
                        &due.collection,
                        &due.record_id,
                        None,
                        mark,
                        Some(&due.record_hash),
                    )?;
                }
            }
            Ok(())
        })
    }

    fn clean_up(&mut self, retention: Duration) -> Result<u64> {
        let sql = match self.mode {
            Mode::Queue => statements::QUEUE_CLEAN,
            _ => statements::RECEIPT_CLEAN,
        };
        let mut removed = 0u64;
        // In batches of 10,000 (short transactions); at most 100 batches per call.
        for _ in 0..100 {
            let rows = self.db.query(sql, &[seconds(retention)])?;
            let batch = match rows.first() {
                Some(row) => db::Cols {
                    row,
                    what: "the clean-up",
                }
                .i64(0)?,
                None => 0,
            };
            removed += batch.max(0) as u64;
            if batch < 10_000 {
                break;
            }
        }
        Ok(removed)
    }

    fn status(&mut self) -> Result<Status> {
        let mut status = self.counts()?;
        let rows = self.db.query(statements::LEASE_FREE, &[])?;
        let free = match rows.first() {
            Some(row) => db::Cols {
                row,
                what: "the lease",
            }
            .bool(0)?,
            None => true,
        };
        status.lease = Some(if free {
            "free: no relay works this source".into()
        } else if self.leased {
            "held by this relay".into()
        } else {
            "held by a relay's session".into()
        });
        Ok(status)
    }
}

impl SqlServer {
    fn counts(&mut self) -> Result<Status> {
        match self.mode {
            Mode::Queue => {
                let rows = self.db.query(statements::QUEUE_STATUS, &[])?;
                let row = rows
                    .first()
                    .ok_or_else(|| SourceError("SQL Server: the status returned nothing".into()))?;
                let c = db::Cols {
                    row,
                    what: "the queue status",
                };
                Ok(Status {
                    pending: c.i64(0)?,
                    delivered: c.i64(1)?,
                    anchored: c.i64(2)?,
                    dead: c.i64(3)?,
                    last_error: c.opt_text(4)?,
                    not_written_back: 0,
                    write_back_error: None,
                    progress: None,
                    lease: None,
                })
            }
            mode => self.log.status(self.db.as_mut(), mode),
        }
    }
}
