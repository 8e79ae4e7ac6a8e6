//! Verification: is what Certyo accepted on chain yet? Receipts are due `certyo.verify_min_age`
//! after acceptance and then every `certyo.verify_interval`; one not anchored
//! `certyo.anchor_timeout` after acceptance is flagged `overdue` and checked at a doubling
//! interval (at most hourly) instead of at full rate. Like delivery: take the due receipts in
//! one short transaction, ask Certyo on a helper thread (delivery goes on meanwhile), record
//! the answers in another.
//!
//! With `certyo.verify = 'current'` (the default) only each record's current version is asked
//! about: a due receipt that a newer receipt of the same record has replaced is marked
//! `superseded` when it is taken, and never verified. What a row (or its absence, after a
//! delete) shows is its current version; an earlier one is still in the receipts, with the
//! hash Certyo accepted, for `certyo.history()`.

use super::record::Tally;
use super::sending::OffThread;
use super::write_back::{self, Mark, Version};
use crate::settings::Verify;
use certyo::fate::{verdict, Verdict, MAX_VERIFY_DELAY, MAX_VERIFY_DOUBLINGS};
use certyo::{Client, Operation, Outcome, Verification, VerifyRequest};
use pgrx::pg_sys::Oid;
use pgrx::prelude::*;
use std::time::Duration;

type SpiResult<T> = Result<T, pgrx::spi::Error>;

/// A receipt's `anchor_status` (the CHECK of `certyo.receipt.anchor_status` in
/// `sql/delivery.sql` lists the same names).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AnchorStatus {
    /// Accepted, not yet found on chain.
    Pending,
    /// Still not on chain `certyo.anchor_timeout` after acceptance: checked less often.
    Overdue,
    /// Certyo confirmed this version on chain.
    Anchored,
    /// Certyo reports another hash for the record.
    Mismatch,
    /// Replaced by a newer version of the same record before it was verified, and with
    /// `certyo.verify = 'current'` never verified: Certyo accepted it (the receipt keeps its
    /// hash), whether it is on chain was not asked.
    Superseded,
}

impl AnchorStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            AnchorStatus::Pending => "pending",
            AnchorStatus::Overdue => "overdue",
            AnchorStatus::Anchored => "anchored",
            AnchorStatus::Mismatch => "mismatch",
            AnchorStatus::Superseded => "superseded",
        }
    }
}

/// One receipt due for verification.
#[derive(Debug, Clone)]
pub struct Due {
    pub version: Version,
    pub collection: String,
    pub operation: Operation,
}

impl Due {
    pub fn request(&self, tenant_id: &str, database: &str) -> VerifyRequest {
        VerifyRequest {
            tenant_id: tenant_id.to_string(),
            database: database.to_string(),
            collection: self.collection.clone(),
            record_id: self.version.record_id.clone(),
            record_hash: self.version.record_hash.clone(),
        }
    }
}

/// Receipts taken for verification: those to verify, and how many were due in all (the ones
/// `superseded` meanwhile are marked so, in the same transaction, and not verified).
pub struct Taken {
    pub due: Vec<Due>,
    pub taken: usize,
}

/// The receipts whose verification is due, oldest schedule first, at most `limit`. With
/// [`Verify::Current`], those of versions a newer receipt of the same record (and table
/// identity) has replaced are marked [`AnchorStatus::Superseded`] instead.
pub fn take_due(limit: usize, verify: Verify) -> SpiResult<Taken> {
    crate::error::transaction(move || {
        Spi::connect_mut(|client| {
            // A scalar subquery rather than EXISTS: one probe of receipt_record per receipt,
            // whatever the statistics say. The receipts are read once (the CTE), marked and
            // returned with their flag.
            let sql = format!(
                "WITH due AS (
                    SELECT r.id, r.relid, r.collection, r.record_id, r.operation, r.record_hash,
                           $2 AND (SELECT n.id FROM certyo.receipt n
                                    WHERE n.relid = r.relid AND n.record_id = r.record_id
                                      AND n.id > r.id AND n.table_id = r.table_id
                                    LIMIT 1) IS NOT NULL AS superseded
                      FROM certyo.receipt r
                     WHERE r.anchor_status IN ('{pending}', '{overdue}') AND r.next_verify_at <= now()
                     ORDER BY r.next_verify_at
                     LIMIT $1
                 ), marked AS (
                    UPDATE certyo.receipt r SET anchor_status = '{superseded}', next_verify_at = NULL
                      FROM due WHERE r.id = due.id AND due.superseded
                 )
                 SELECT id, relid, collection, record_id, operation, record_hash, superseded FROM due",
                // literals, so that the partial index of due receipts (receipt_verify) serves
                pending = AnchorStatus::Pending.as_str(),
                overdue = AnchorStatus::Overdue.as_str(),
                superseded = AnchorStatus::Superseded.as_str(),
            );
            let rows = super::prepared::update(
                client,
                &sql,
                &[(limit as i64).into(), (verify == Verify::Current).into()],
            )?;
            let mut due = Vec::new();
            let mut taken = 0;
            for row in rows {
                taken += 1;
                if row.get::<bool>(7)?.unwrap_or(false) {
                    continue;
                }
                due.push(Due {
                    version: Version {
                        id: row.get::<i64>(1)?.unwrap_or_default(),
                        relid: row.get::<Oid>(2)?.unwrap_or(pg_sys::InvalidOid),
                        record_id: row.get::<String>(4)?.unwrap_or_default(),
                        record_hash: row.get::<String>(6)?.unwrap_or_default(),
                    },
                    collection: row.get::<String>(3)?.unwrap_or_default(),
                    // Receipts are made from queued changes, whose CHECK admits only the four.
                    operation: row
                        .get::<String>(5)?
                        .as_deref()
                        .and_then(Operation::parse)
                        .unwrap_or(Operation::Upsert),
                });
            }
            Ok(Taken { due, taken })
        })
    })
}

/// Receipts being verified on a helper thread, `VERIFY_IN_FLIGHT` requests at a time.
pub struct Verifying {
    due: Vec<Due>,
    /// The configuration the requests went out with: a refusal answers that one.
    pub config: certyo::ClientConfig,
    /// Each answer with the id of the receipt it answers: a thread that fails loses only its
    /// own answers, and no answer can land on another receipt.
    work: OffThread<Vec<(i64, Verification)>>,
}

/// Verification requests in flight at once, from one thread (`certyo::Client::verify_all`): one
/// request per receipt is all the contract offers, so several at a time keep up with a higher
/// delivery rate.
const VERIFY_IN_FLIGHT: usize = 8;

impl Verifying {
    pub fn start(client: &Client, tenant_id: &str, database: &str, due: Vec<Due>) -> Verifying {
        let requests: Vec<(i64, VerifyRequest)> = due
            .iter()
            .map(|d| (d.version.id, d.request(tenant_id, database)))
            .collect();
        let config = client.config().clone();
        let client = client.clone();
        let work = OffThread::start("certyo_cdc verify", move |_pause| {
            // 429 back-off sleeps here are plain sleeps: a verification waiting is not worth a
            // shared stop flag.
            let (ids, requests): (Vec<i64>, Vec<VerifyRequest>) = requests.into_iter().unzip();
            let answers = client.verify_all(&requests, VERIFY_IN_FLIGHT, &mut |d| {
                std::thread::sleep(d);
                true
            });
            ids.into_iter().zip(answers).collect::<Vec<_>>()
        });
        Verifying { due, config, work }
    }

    /// The receipts and what was found, once the thread is done (None while it runs).
    pub fn try_finish(&mut self) -> Option<Vec<(Due, Verification)>> {
        let found = self.work.try_take()?.unwrap_or_default();
        Some(match_answers(std::mem::take(&mut self.due), found))
    }
}

/// Each receipt with the answer carrying its id, or "no answer" (verified again later).
fn match_answers(due: Vec<Due>, found: Vec<(i64, Verification)>) -> Vec<(Due, Verification)> {
    let mut found: std::collections::HashMap<i64, Verification> = found.into_iter().collect();
    let missing = Verification::Failed(Outcome::Transient("no answer".into()));
    due.into_iter()
        .map(|d| {
            let answer = found
                .remove(&d.version.id)
                .unwrap_or_else(|| missing.clone());
            (d, answer)
        })
        .collect()
}

/// How often receipts are checked, from the settings.
#[derive(Debug, Clone, Copy)]
pub struct Schedule {
    pub interval: Duration,
    pub anchor_timeout: Duration,
}

/// Record what verification found, then mark the source rows that still hold those versions.
pub fn record(results: &[(Due, Verification)], schedule: Schedule) -> SpiResult<Tally> {
    let mut tally = Tally::default();
    // id, status, polygon tx hash, reported hash
    type Settled = (
        Vec<i64>,
        Vec<String>,
        Vec<Option<String>>,
        Vec<Option<String>>,
    );
    let mut settled: Settled = Default::default();
    let mut later: (Vec<i64>, Vec<Option<String>>) = Default::default();
    let (mut rows_anchored, mut rows_mismatched) = (Vec::new(), Vec::new());
    for (due, found) in results {
        let id = due.version.id;
        let keeps_row = due.operation != Operation::Delete;
        // The verdict is the certyo crate's rule, shared with certyo-relay; None: the
        // configuration is wrong, not the receipt, which is left as it is for after the fix.
        let Some(verdict) = verdict(found) else {
            continue;
        };
        match verdict {
            Verdict::Anchored { polygon_tx_hash } => {
                settled.0.push(id);
                settled.1.push(AnchorStatus::Anchored.as_str().into());
                settled.2.push(polygon_tx_hash);
                settled.3.push(None);
                tally.anchored += 1;
                if keeps_row {
                    rows_anchored.push(due.version.clone());
                }
            }
            Verdict::Mismatch { reported_hash } => {
                pgrx::warning!(
                    "certyo_cdc: Certyo reports hash {reported_hash} for {} record {}, but its receipt (change {id}) holds {}: the anchored record is not the one sent",
                    due.collection,
                    due.version.record_id,
                    due.version.record_hash
                );
                settled.0.push(id);
                settled.1.push(AnchorStatus::Mismatch.as_str().into());
                settled.2.push(None);
                settled.3.push(Some(reported_hash));
                tally.mismatched += 1;
                if keeps_row {
                    rows_mismatched.push(due.version.clone());
                }
            }
            Verdict::Later { error } => later_push(&mut later, id, error),
        }
        tally.verified += 1;
    }
    crate::error::transaction(move || {
        Spi::connect_mut(|client| {
            // Settled: anchored (with its transaction) or mismatched (with Certyo's hash).
            client.update(
                "UPDATE certyo.receipt r
                    SET anchor_status = v.status, polygon_tx_hash = v.tx, reported_hash = v.reported,
                        anchored_at = CASE WHEN v.status = 'anchored' THEN now() END,
                        last_verified_at = now(), verify_attempts = r.verify_attempts + 1,
                        next_verify_at = NULL, verify_error = NULL
                   FROM unnest($1::bigint[], $2::text[], $3::text[], $4::text[]) AS v(id, status, tx, reported)
                  WHERE r.id = v.id",
                None,
                &[settled.0.into(), settled.1.into(), settled.2.into(), settled.3.into()],
            )?;
            // Not on chain yet (or the question failed): ask again after the interval; long
            // past the expected anchoring time, flag it and back off, doubling, to at most 1 h
            // (certyo::fate::verify_delay, in SQL for the database's clock).
            client.update(
                "UPDATE certyo.receipt r
                    SET anchor_status = CASE WHEN r.accepted_at < now() - $4 * interval '1 s'
                                             THEN 'overdue' ELSE r.anchor_status END,
                        next_verify_at = now() + CASE
                            WHEN r.accepted_at < now() - $4 * interval '1 s'
                            THEN least($3 * interval '1 ms' * power(2, least(r.verify_attempts, $5)), $6 * interval '1 ms')
                            ELSE $3 * interval '1 ms' END,
                        last_verified_at = now(), verify_attempts = r.verify_attempts + 1,
                        verify_error = v.error
                   FROM unnest($1::bigint[], $2::text[]) AS v(id, error)
                  WHERE r.id = v.id",
                None,
                &[
                    later.0.into(),
                    later.1.into(),
                    (schedule.interval.as_millis() as i64).into(),
                    (schedule.anchor_timeout.as_secs() as i64).into(),
                    (MAX_VERIFY_DOUBLINGS as i32).into(),
                    (MAX_VERIFY_DELAY.as_millis() as i64).into(),
                ],
            )?;
            write_back::mark(client, &rows_anchored, Mark::Anchored)?;
            write_back::mark(client, &rows_mismatched, Mark::Mismatch)
        })
    })?;
    Ok(tally)
}

fn later_push(later: &mut (Vec<i64>, Vec<Option<String>>), id: i64, error: Option<String>) {
    later.0.push(id);
    // Kept in certyo.receipt.verify_error, which certyo.history() shows: never with the key.
    later.1.push(error.map(|e| crate::api_key::masked(&e)));
}

#[cfg(test)]
mod tests {
    use super::{match_answers, Due, Version};
    use certyo::{Operation, Outcome, Verification};

    fn due(id: i64) -> Due {
        Due {
            version: Version {
                relid: pgrx::pg_sys::Oid::from(16384u32),
                record_id: id.to_string(),
                record_hash: format!("sha256:{id}"),
                id,
            },
            collection: "public.t".into(),
            operation: Operation::Insert,
        }
    }

    #[test]
    fn answers_land_on_their_own_receipts_even_when_a_thread_lost_some() {
        // The thread that verified receipts 2 and 3 failed: only 1 and 4 were answered, out
        // of order. By position, 4's answer would have landed on 2.
        let found = vec![
            (
                4,
                Verification::Mismatch {
                    reported_hash: "x".into(),
                },
            ),
            (1, Verification::NotYet),
        ];
        let matched: Vec<(i64, Verification)> = match_answers((1..=4).map(due).collect(), found)
            .into_iter()
            .map(|(d, v)| (d.version.id, v))
            .collect();
        let no_answer = Verification::Failed(Outcome::Transient("no answer".into()));
        assert_eq!(
            matched,
            vec![
                (1, Verification::NotYet),
                (2, no_answer.clone()),
                (3, no_answer),
                (
                    4,
                    Verification::Mismatch {
                        reported_hash: "x".into()
                    }
                ),
            ]
        );
    }
}
