//! Recording what Certyo answered, each its own short transaction: receipts, retries and
//! dead letters, the write-back of accepted hashes, the expiry of old receipts, and the
//! worker's published state and tallies.

use super::entry::Entry;
use super::planner::{Planner, Table};
use super::write_back::{self, Mark, Version};
use super::{for_schema, in_transaction, prepared, SpiResult};
use crate::api_key::masked;
use certyo::fate::{fate_of, Fate};
use certyo::{Operation, Outcome};
use pgrx::prelude::*;
use std::time::{Duration, Instant};

/// How the results of one pass add up, for the worker's status.
#[derive(Debug, Default, Clone, Copy)]
pub struct Tally {
    pub sent: i64,
    pub accepted: i64,
    pub replayed: i64,
    pub failed: i64,
    /// Receipts verified (any answer), found anchored, found mismatched.
    pub verified: i64,
    pub anchored: i64,
    pub mismatched: i64,
}

impl std::ops::Add for Tally {
    type Output = Tally;
    fn add(self, o: Tally) -> Tally {
        Tally {
            sent: self.sent + o.sent,
            accepted: self.accepted + o.accepted,
            replayed: self.replayed + o.replayed,
            failed: self.failed + o.failed,
            verified: self.verified + o.verified,
            anchored: self.anchored + o.anchored,
            mismatched: self.mismatched + o.mismatched,
        }
    }
}

/// The receipts of accepted changes, wherever each waited: in `certyo.delivery` (a retry) or
/// in the queue (`$6`: their places). Parameters: ids, record hashes, replayed flags, payload
/// SHA-256s in hex, the wait before verification in ms, queue places, column digests in hex.
const RECEIPTS: &str = "WITH v AS (SELECT * FROM unnest($1::bigint[], $2::text[], $3::boolean[], $4::text[], $7::text[])
                              AS v(id, hash, replayed, sha, cols)),
          retried AS (DELETE FROM certyo.delivery d USING v WHERE d.id = v.id
                      RETURNING d.id, d.relid, d.collection, d.record_id, d.operation, d.source_timestamp,
                                d.idempotency_key, d.queued_at, d.attempts, v.hash, v.replayed, v.sha, d.table_id, v.cols),
          direct AS (DELETE FROM certyo.queue q USING v
                      WHERE q.ctid = ANY ($6::text[]::tid[]) AND q.id = v.id
                     RETURNING q.id, q.relid, q.collection, q.record_id, q.operation, q.source_timestamp,
                               q.idempotency_key, q.queued_at, 0, v.hash, v.replayed, v.sha, q.table_id, v.cols)
     INSERT INTO certyo.receipt (id, relid, collection, record_id, operation, source_timestamp,
                                 idempotency_key, queued_at, attempts, accepted_at, record_hash,
                                 replayed, payload_sha256, next_verify_at, table_id, column_sha256)
     SELECT id, relid, collection, record_id, operation, source_timestamp, idempotency_key,
            queued_at, attempts + 1, now(), hash, replayed, decode(sha, 'hex'),
            now() + $5 * interval '1 ms', table_id, decode(NULLIF(cols, ''), 'hex')
       FROM (SELECT * FROM retried UNION ALL SELECT * FROM direct) AS done";

/// `RECEIPTS` for a batch whose every accepted change was taken from the queue.
const RECEIPTS_FROM_QUEUE: &str = "WITH v AS (SELECT * FROM unnest($1::bigint[], $2::text[], $3::boolean[], $4::text[], $7::text[])
                              AS v(id, hash, replayed, sha, cols)),
          direct AS (DELETE FROM certyo.queue q USING v
                      WHERE q.ctid = ANY ($6::text[]::tid[]) AND q.id = v.id
                     RETURNING q.id, q.relid, q.collection, q.record_id, q.operation, q.source_timestamp,
                               q.idempotency_key, q.queued_at, v.hash, v.replayed, v.sha, q.table_id, v.cols)
     INSERT INTO certyo.receipt (id, relid, collection, record_id, operation, source_timestamp,
                                 idempotency_key, queued_at, attempts, accepted_at, record_hash,
                                 replayed, payload_sha256, next_verify_at, table_id, column_sha256)
     SELECT id, relid, collection, record_id, operation, source_timestamp, idempotency_key,
            queued_at, 1, now(), hash, replayed, decode(sha, 'hex'), now() + $5 * interval '1 ms', table_id,
            decode(NULLIF(cols, ''), 'hex')
       FROM direct";

/// The accepted entries of a batch, as `RECEIPTS` takes them: ids, record hashes, replayed
/// flags, payload SHA-256s and column digests (in hex).
type AcceptedLists = (Vec<i64>, Vec<String>, Vec<bool>, Vec<String>, Vec<String>);

/// `RECEIPTS` and `RECEIPTS_FROM_QUEUE` for an extension not yet updated to 0.2.0, whose
/// receipts have no `column_sha256` (the library is installed before `ALTER EXTENSION
/// certyo_cdc UPDATE`): the same statements without it.
static RECEIPTS_WITHOUT_DIGESTS: std::sync::LazyLock<[String; 2]> =
    std::sync::LazyLock::new(|| {
        [RECEIPTS, RECEIPTS_FROM_QUEUE].map(|sql| {
            sql.replace(", column_sha256)", ")")
                .replace(", decode(NULLIF(cols, ''), 'hex')", "")
                .replace(",\n            decode(NULLIF(cols, ''), 'hex')", "")
        })
    });

/// Record what Certyo said about each entry and write the accepted hashes back to the rows, in
/// one transaction.
/// `retry_in` gives the delay before the next attempt of a transient failure; receipts are
/// first verified `verify_after` from now.
pub fn answers(
    results: &[(Entry, Outcome)],
    retry_in: &dyn Fn(&Entry) -> Duration,
    verify_after: Duration,
    planner: &mut Planner,
) -> SpiResult<(Tally, RecordTimes)> {
    let started = Instant::now();
    let mut times = RecordTimes::default();
    let mut accepted: AcceptedLists = Default::default();
    let mut transient: (Vec<i64>, Vec<i64>, Vec<String>) = Default::default();
    let mut failed: (Vec<i64>, Vec<i32>, Vec<String>, Vec<bool>) = Default::default();
    // Queue rows of the batch: (ctid, id) of the accepted, and of the others.
    let mut accepted_rows: Vec<String> = Vec::new();
    let mut unsettled: (Vec<String>, Vec<i64>) = Default::default();
    let mut tally = Tally {
        sent: results.len() as i64,
        ..Tally::default()
    };
    for (entry, outcome) in results {
        if let Some(row) = &entry.queue_row {
            if matches!(outcome, Outcome::Accepted(_)) {
                accepted_rows.push(row.clone());
            } else {
                unsettled.0.push(row.clone());
                unsettled.1.push(entry.id);
            }
        }
        // The rules are the certyo crate's, shared with certyo-relay; the retry's delay is
        // asked for only when it is one.
        match fate_of(
            outcome,
            &entry.idempotency_key,
            Duration::ZERO,
            verify_after,
        ) {
            Fate::Delivered {
                record_hash,
                replayed,
                ..
            } => {
                accepted.0.push(entry.id);
                accepted.1.push(record_hash);
                accepted.2.push(replayed);
                accepted.3.push(entry.payload_sha256.clone());
                accepted.4.push(entry.column_sha256.clone());
                tally.accepted += 1;
                tally.replayed += i64::from(replayed);
            }
            Fate::Retry { error, .. } => {
                transient.0.push(entry.id);
                transient.1.push(retry_in(entry).as_millis() as i64);
                transient.2.push(masked(&error));
                tally.failed += 1;
            }
            Fate::Dead { status, error } => {
                failed.0.push(entry.id);
                failed.1.push(i32::from(status));
                failed.2.push(masked(&error));
                failed.3.push(true);
                tally.failed += 1;
            }
            // The configuration was refused: back to pending, the attempt not counted, the
            // answer kept for `certyo.status`.
            Fate::Untouched => {
                if let Outcome::Refused { status, body } = outcome {
                    failed.0.push(entry.id);
                    failed.1.push(i32::from(*status));
                    failed.2.push(masked(body));
                    failed.3.push(false);
                    tally.failed += 1;
                }
            }
        }
    }
    let versions: Vec<Version> = results
        .iter()
        .filter_map(|(e, o)| match o {
            Outcome::Accepted(r) if e.operation != Operation::Delete => Some(Version {
                relid: e.relid,
                record_id: e.record_id.clone(),
                record_hash: r.record_hash.clone(),
                id: e.id,
            }),
            _ => None,
        })
        .collect();
    let planner = std::panic::AssertUnwindSafe(planner);
    let marks = std::panic::AssertUnwindSafe(&mut times);
    in_transaction(move || {
        let (planner, marks) = (planner, marks);
        Spi::connect_mut(|client| {
            // Changes sent straight from the queue that were not accepted join the worker's
            // table, where retries and dead letters are kept.
            if !unsettled.1.is_empty() {
                prepared::update(
                    client,
                    &for_schema("WITH moved AS (
                         DELETE FROM certyo.queue
                          WHERE ctid = ANY ($1::text[]::tid[]) AND id = ANY ($2::bigint[])
                         RETURNING id, relid, collection, record_id, operation, payload, source_timestamp, idempotency_key, queued_at, table_id)
                     INSERT INTO certyo.delivery (id, relid, collection, record_id, operation, payload, source_timestamp, idempotency_key, queued_at, table_id)
                     SELECT * FROM moved
                     ON CONFLICT (id) DO NOTHING"),
                    &[unsettled.0.into(), unsettled.1.into()],
                )?;
            }
            // Accepted: the entry becomes its receipt, in one statement (so a receipt is
            // recorded once even if the same entry is answered twice), wherever it waited.
            if !accepted.0.is_empty() {
                let all_from_queue = accepted_rows.len() == accepted.0.len();
                let count = accepted.0.len();
                let args = [
                    accepted.0.into(),
                    accepted.1.into(),
                    accepted.2.into(),
                    accepted.3.into(),
                    (verify_after.as_millis() as i64).into(),
                    accepted_rows.into(),
                    accepted.4.into(),
                ];
                // A batch taken straight from the queue (Certyo keeping up) skips looking for
                // its changes in certyo.delivery: a probe of its index per change, a tenth of
                // the statement's time, that finds nothing. Unless a change moved there while
                // its batch was in flight (a retry began meanwhile): the general statement
                // then finds it, the others being gone from the queue already.
                let (receipts, from_queue) =
                    if crate::shape::schema_has(c"receipt", Some(c"column_sha256")) {
                        (RECEIPTS, RECEIPTS_FROM_QUEUE)
                    } else {
                        let [receipts, from_queue] = &*RECEIPTS_WITHOUT_DIGESTS;
                        (receipts.as_str(), from_queue.as_str())
                    };
                let recorded = if all_from_queue {
                    prepared::update(client, &for_schema(from_queue), &args)?.len()
                } else {
                    0
                };
                if recorded < count {
                    prepared::update(client, &for_schema(receipts), &args)?;
                }
            }
            if !transient.0.is_empty() {
                prepared::update(
                    client,
                    "UPDATE certyo.delivery d
                        SET attempts = d.attempts + 1, last_attempt_at = now(),
                            next_attempt_at = now() + v.delay * interval '1 ms', last_error = v.error
                       FROM unnest($1::bigint[], $2::bigint[], $3::text[]) AS v(id, delay, error)
                      WHERE d.id = v.id",
                    &[transient.0.into(), transient.1.into(), transient.2.into()],
                )?;
            }
            // 4xx other than 401/403: a dead letter. 401/403: back to pending, the attempt not
            // counted: the configuration is wrong, not the record.
            if !failed.0.is_empty() {
                prepared::update(
                    client,
                    "UPDATE certyo.delivery d
                        SET state = CASE WHEN v.dead THEN 'dead' ELSE 'pending' END,
                            attempts = CASE WHEN v.dead THEN d.attempts + 1 ELSE d.attempts END,
                            last_attempt_at = now(), last_status = v.status, last_error = v.error
                       FROM unnest($1::bigint[], $2::integer[], $3::text[], $4::boolean[]) AS v(id, status, error, dead)
                      WHERE d.id = v.id",
                    &[failed.0.into(), failed.1.into(), failed.2.into(), failed.3.into()],
                )?;
            }
            planner.0.refresh(client, Table::Receipt, tally.accepted)?;
            let receipts_done = Instant::now();
            marks.0.receipts = receipts_done - started;
            write_back::mark(client, &versions, Mark::Accepted)?;
            marks.0.write_back = receipts_done.elapsed();
            Ok(())
        })
    })?;
    times.commit = started.elapsed() - times.receipts - times.write_back;
    Ok((tally, times))
}

/// Where recording a batch's answers spends its time (for the worker's debug1 line, which
/// `bench/delivery.py` sums up): the receipts and the worker's other bookkeeping, the
/// write-back to the source rows, and the commit (with the rest of the transaction).
#[derive(Debug, Default, Clone, Copy)]
pub struct RecordTimes {
    pub receipts: Duration,
    pub write_back: Duration,
    pub commit: Duration,
}

/// Certyo answers again after an outage: every pending change is due now, not at the end of
/// its own back-off.
pub fn release_backlog() -> SpiResult<()> {
    in_transaction(|| {
        Spi::run(
            "UPDATE certyo.delivery SET next_attempt_at = '-infinity'
              WHERE state = 'pending' AND next_attempt_at > now()",
        )
    })
}

/// Remove receipts that are no longer needed: anchored (or superseded), older than the
/// retention, and either replaced by a newer version of their record or the delete that ended
/// it. A record is one record id under one table identity (`table_id`: a record key of its
/// table), so a receipt of another key's record of the same id never stands for it. The newest
/// receipt of a live record stays: it is what `certyo.audit` compares the row with. A delete
/// goes only with every earlier version of its record (no receipt still being verified or
/// younger than the retention, no dead letter or retry in `certyo.delivery`; the queue holds
/// none, as a record's changes are sent in order): else that one would
/// be the record's newest, alive again in `certyo.record_status()`, and the audit would name
/// its missing row. Oldest first, a bounded number per call, so a delete taken comes with the
/// earlier receipts.
pub fn expire(retention: Duration) -> SpiResult<()> {
    in_transaction(move || {
        Spi::run_with_args(
            "DELETE FROM certyo.receipt
              WHERE id = ANY (ARRAY(
                    SELECT r.id FROM certyo.receipt r
                     WHERE r.anchor_status IN ('anchored', 'superseded') AND r.accepted_at < now() - $1 * interval '1 s'
                       AND CASE WHEN r.operation = 'delete'
                                THEN NOT EXISTS (SELECT FROM certyo.receipt o
                                                  WHERE o.relid = r.relid AND o.table_id = r.table_id
                                                    AND o.record_id = r.record_id AND o.id < r.id
                                                    AND NOT (o.anchor_status IN ('anchored', 'superseded')
                                                             AND o.accepted_at < now() - $1 * interval '1 s'))
                                     AND NOT EXISTS (SELECT FROM certyo.delivery d
                                                      WHERE d.relid = r.relid AND d.table_id = r.table_id
                                                        AND d.record_id = r.record_id AND d.id < r.id)
                                ELSE EXISTS (SELECT FROM certyo.receipt n
                                              WHERE n.relid = r.relid AND n.table_id = r.table_id
                                                AND n.record_id = r.record_id AND n.id > r.id) END
                     ORDER BY r.id
                     LIMIT 5000))",
            &[(retention.as_secs() as i64).into()],
        )
    })
}

/// Publish the worker's state for `certyo.worker_status()`.
pub fn set_state(state: &str, detail: &str, error: Option<&str>, tally: Tally) -> SpiResult<()> {
    let (state, detail, error) = (state.to_string(), masked(detail), error.map(masked));
    in_transaction(move || {
        Spi::connect_mut(|client| {
            prepared::update(
                client,
            "INSERT INTO certyo.worker_state AS w (singleton, pid, started_at, state, detail, last_error, last_error_at,
                                                   last_delivery_at, last_verified_at, sent, accepted, replayed, failed,
                                                   anchored, mismatched, updated_at)
             VALUES (true, pg_backend_pid(), now(), $1, $2, $3, CASE WHEN $3 IS NOT NULL THEN now() END,
                     CASE WHEN $5 > 0 THEN now() END, CASE WHEN $8 > 0 THEN now() END, $4, $5, $6, $7, $9, $10, now())
             ON CONFLICT (singleton) DO UPDATE SET
                 started_at = CASE WHEN w.pid IS DISTINCT FROM pg_backend_pid() THEN now() ELSE w.started_at END,
                 sent = CASE WHEN w.pid IS DISTINCT FROM pg_backend_pid() THEN 0 ELSE w.sent END + $4,
                 accepted = CASE WHEN w.pid IS DISTINCT FROM pg_backend_pid() THEN 0 ELSE w.accepted END + $5,
                 replayed = CASE WHEN w.pid IS DISTINCT FROM pg_backend_pid() THEN 0 ELSE w.replayed END + $6,
                 failed = CASE WHEN w.pid IS DISTINCT FROM pg_backend_pid() THEN 0 ELSE w.failed END + $7,
                 anchored = CASE WHEN w.pid IS DISTINCT FROM pg_backend_pid() THEN 0 ELSE w.anchored END + $9,
                 mismatched = CASE WHEN w.pid IS DISTINCT FROM pg_backend_pid() THEN 0 ELSE w.mismatched END + $10,
                 pid = pg_backend_pid(), state = $1, detail = $2,
                 last_error = coalesce($3, w.last_error),
                 last_error_at = CASE WHEN $3 IS NOT NULL THEN now() ELSE w.last_error_at END,
                 last_delivery_at = CASE WHEN $5 > 0 THEN now() ELSE w.last_delivery_at END,
                 last_verified_at = CASE WHEN $8 > 0 THEN now() ELSE w.last_verified_at END,
                 updated_at = now()",
            &[
                state.into(),
                detail.into(),
                error.into(),
                tally.sent.into(),
                tally.accepted.into(),
                tally.replayed.into(),
                tally.failed.into(),
                tally.verified.into(),
                tally.anchored.into(),
                tally.mismatched.into(),
            ],
            )
            .map(drop)
        })
    })
}

#[cfg(test)]
mod tests {
    use super::RECEIPTS_WITHOUT_DIGESTS;

    #[test]
    fn receipts_without_digests_name_no_digest_column() {
        for sql in RECEIPTS_WITHOUT_DIGESTS.iter() {
            assert!(
                !sql.contains("column_sha256") && !sql.contains("NULLIF(cols"),
                "{sql}"
            );
        }
    }
}
