//! Where changes come from: one trait, implemented by each companion's reader. The pump
//! (`crate::pump`) owns the rules (batches, back-off, outages, verification schedule); a source
//! only reads changes and records what became of them, each call in one transaction of its own
//! database, so a crash between two calls loses nothing (what was taken and not recorded is
//! taken again and answered by Certyo as a replay of the same idempotency key).

pub mod mysql;
pub mod sqlserver;

use std::time::Duration;

/// One captured change, as the companion queued (or CDC/Change Tracking reported) it.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    /// The change's place in its source: the queue id, or (CDC, Change Tracking) the change's
    /// ordinal in the source's own order. Unique among the changes a source has handed out
    /// and not yet had recorded.
    pub id: i64,
    /// `schema.table`: Certyo's collection.
    pub collection: String,
    /// The primary key as text (composite keys `a/b`, parts escaped `\` → `\\`, `/` → `\/`).
    pub record_id: String,
    pub operation: Operation,
    /// The business columns as JSON text, exactly as sent.
    pub payload: String,
    /// RFC 3339 in UTC, `YYYY-MM-DDTHH:MM:SS.ffffffZ`.
    pub source_timestamp: String,
    pub idempotency_key: String,
    /// Deliveries tried before (0 for a new change): the back-off grows with it.
    pub attempts: u32,
}

pub use certyo::Operation;

/// A change Certyo accepted whose anchoring is to be verified.
#[derive(Debug, Clone, PartialEq)]
pub struct Delivered {
    /// The change's id in the source's record of deliveries (queue id, or receipt id).
    pub id: i64,
    pub collection: String,
    pub record_id: String,
    pub operation: Operation,
    pub record_hash: String,
    /// Verifications tried before: an overdue receipt backs off with it.
    pub verify_attempts: u32,
    /// How long ago Certyo accepted it: past `anchor_timeout`, a receipt still not anchored is
    /// overdue (the pump decides).
    pub accepted_age: Duration,
}

/// What the pump decided for one change (the rules: `certyo::fate`); the source writes it in
/// one transaction. What verification decided for one delivered change.
pub use certyo::fate::{Anchoring, Fate};

/// Counts for `certyo-relay status` and the per-minute summary.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Status {
    pub pending: i64,
    pub delivered: i64,
    pub anchored: i64,
    pub dead: i64,
    /// The most recent failure kept in the source, if any.
    pub last_error: Option<String>,
    /// Delivered (or dead) changes whose source row is not written back yet: it is tried
    /// again with back-off (a locked row, a table that refuses it).
    pub not_written_back: i64,
    /// Why the last write-back that failed did (the table first), if any still fails.
    pub write_back_error: Option<String>,
    /// CDC / Change Tracking: the persisted LSN (hex) or version up to which everything was
    /// accepted. None for queues.
    pub progress: Option<String>,
    /// Sources with a lease (see `Source::lease`): which relay session holds it, or that none
    /// does. None for sources without one.
    pub lease: Option<String>,
}

/// A source's failure: the database is unreachable, or a statement failed. The pump logs it
/// and tries again later; nothing taken is lost (see the module comment).
#[derive(Debug, Clone, PartialEq)]
pub struct SourceError(pub String);

impl std::fmt::Display for SourceError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for SourceError {}

pub type Result<T> = std::result::Result<T, SourceError>;

/// A companion's reader. Implementations: `mysql::MySqlQueue` (`sql/mysql/certyo_queue.sql`),
/// `sqlserver::SqlServer` in its three modes (`sql/sqlserver/`).
pub trait Source: Send {
    /// For logs and status: the kind and where, never a password.
    fn describe(&self) -> String;

    /// Certyo's `database` field for this source's records.
    fn database(&self) -> &str;

    /// Connect (again) and check that the companion's objects are there. Named in errors:
    /// what is missing and which script installs it.
    fn check(&mut self) -> Result<()>;

    /// Whether this relay is the one working this source now. Relays run side by side on one
    /// source (replicas, for availability) take turns by a lease the source's database keeps
    /// for the holder's session: one delivers, verifies and writes back; the others stand by,
    /// and the first to ask after the holder's session ends (a crash, `kill -9`, a lost
    /// connection) carries on. Asked before every round. Sources without one: always true.
    fn lease(&mut self) -> Result<bool> {
        Ok(true)
    }

    /// Up to `limit` changes ready to send, oldest first, at most one per record (a record's
    /// later change waits until its earlier one is delivered or dead: per-record order).
    /// `probing`: Certyo seems down; ignore the changes' own retry times (the pump asks for
    /// one change, the oldest). `in_flight` are ids handed out and not yet recorded: skip them.
    fn take(&mut self, limit: usize, probing: bool, in_flight: &[i64]) -> Result<Vec<Change>>;

    /// Record the fate of changes taken earlier, in one transaction. For CDC and Change
    /// Tracking, progress advances past a change only when it and every change before it
    /// are delivered or dead.
    fn record(&mut self, fates: &[(Change, Fate)]) -> Result<()>;

    /// Up to `limit` delivered changes whose verification is due, oldest schedule first.
    fn due_for_verification(&mut self, limit: usize) -> Result<Vec<Delivered>>;

    /// Record what verification found, in one transaction.
    fn record_anchoring(&mut self, results: &[(Delivered, Anchoring)]) -> Result<()>;

    /// The write-backs to source rows that are due: those recorded since, and those tried
    /// before and backed off (a locked row, a table that refused it), now due again. True when
    /// any was done since the last call. Called every pass; the MySQL/MariaDB source wakes its
    /// write-back thread here. Sources that write back in `record`'s own transaction have
    /// nothing to do here.
    fn write_back(&mut self) -> Result<bool> {
        Ok(false)
    }

    /// Remove delivered changes that are settled (anchored, or deletes anchored) and older
    /// than `retention`; dead letters and mismatches stay for an operator. Returns how many.
    fn clean_up(&mut self, retention: Duration) -> Result<u64>;

    fn status(&mut self) -> Result<Status>;
}

/// Split a record id into its `columns` key parts: the inverse of how the companions join
/// composite keys (`a/b`, parts escaped `\` → `\\`, `/` → `\/`). A single-column key is the
/// column's text as it is, unescaped.
pub fn record_id_parts(record_id: &str, columns: usize) -> Vec<String> {
    if columns <= 1 {
        return vec![record_id.to_string()];
    }
    let mut parts = vec![String::new()];
    let mut chars = record_id.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let (Some(next), Some(part)) = (chars.next(), parts.last_mut()) {
                    part.push(next);
                }
            }
            '/' => parts.push(String::new()),
            c => {
                if let Some(part) = parts.last_mut() {
                    part.push(c);
                }
            }
        }
    }
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_ids_split_into_their_escaped_parts() {
        assert_eq!(record_id_parts("42", 1), vec!["42"]);
        assert_eq!(
            record_id_parts("a/b", 1),
            vec!["a/b"],
            "one column: as it is"
        );
        assert_eq!(
            record_id_parts(r"EU\/West/A\\1", 2),
            vec!["EU/West", r"A\1"]
        );
        assert_eq!(record_id_parts("a/b/c", 3), vec!["a", "b", "c"]);
    }
}
