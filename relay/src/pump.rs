//! The delivery loop of one source, by the worker's rules (shared through the `certyo` crate):
//! take a batch (one change per record, oldest first), send it by the contract's batching
//! rule, record each change's fate in one transaction; during an outage one probe at a time;
//! verification of accepted changes after `verify_min_age`; retention clean-up. Polls with an
//! adaptive wait: at once while changes flow, doubling while idle up to `poll_interval`.

use crate::config::Certyo as Settings;
use crate::metrics::Metrics;
use crate::source::{Change, Delivered, Fate, Source, SourceError};
use certyo::batch::Shape;
use certyo::fate::{anchoring_of, fate_of};
use certyo::outage::{jitter, Change as LinkChange, Link};
use certyo::retry::next_attempt_delay;
use certyo::{Client, Outcome, Record, Verification, VerifyRequest};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Receipts verified per round, and how many requests run at once.
const VERIFY_BATCH: usize = 100;
const VERIFY_IN_FLIGHT: usize = 8;
const CLEAN_UP_EVERY: Duration = Duration::from_secs(60);
const SUMMARY_EVERY: Duration = Duration::from_secs(60);
/// How often the queue's counts are read for the metrics, while they are served.
const METRICS_EVERY: Duration = Duration::from_secs(10);
/// The first wait after an empty poll; it doubles while idle, up to `poll_interval`.
const FIRST_IDLE_WAIT: Duration = Duration::from_millis(10);

/// Counts since the last summary.
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct Tally {
    pub sent: u64,
    pub accepted: u64,
    pub replayed: u64,
    pub retried: u64,
    pub dead: u64,
    pub verified: u64,
    pub anchored: u64,
}

pub struct Pump {
    name: String,
    source: Box<dyn Source>,
    settings: Settings,
    client: Client,
    stop: Arc<AtomicBool>,
    link: Link,
    /// Set by a 401/403/404/405: one change at a time until Certyo takes the key again.
    refused: Option<String>,
    idle_wait: Duration,
    next_verification: Instant,
    next_clean_up: Instant,
    next_summary: Instant,
    /// The last source error and when it was logged: logged again only when it changes or a
    /// minute has passed, so an unreachable database does not flood the log.
    last_error: Option<(String, Instant)>,
    since_summary: Tally,
    pub total: Tally,
    /// Whether this relay held the source's lease at the last round (None: not asked yet).
    leading: Option<bool>,
    metrics: Arc<Metrics>,
    next_metrics: Instant,
}

impl Pump {
    pub fn new(
        name: String,
        source: Box<dyn Source>,
        settings: Settings,
        client: Client,
        stop: Arc<AtomicBool>,
        metrics: Arc<Metrics>,
    ) -> Pump {
        let now = Instant::now();
        metrics.start_source(&name);
        Pump {
            name,
            source,
            settings,
            client,
            stop,
            link: Link::default(),
            refused: None,
            idle_wait: Duration::ZERO,
            next_verification: now,
            next_clean_up: now,
            next_summary: now + SUMMARY_EVERY,
            last_error: None,
            since_summary: Tally::default(),
            total: Tally::default(),
            leading: None,
            metrics,
            next_metrics: now,
        }
    }

    fn stopping(&self) -> bool {
        self.stop.load(Ordering::Relaxed)
    }

    /// Deliver until told to stop (SIGTERM): the batch in flight is finished and recorded
    /// first.
    pub fn run(mut self) -> Tally {
        tracing::info!(source = %self.name, at = %self.source.describe(), "delivering");
        while !self.stopping() {
            let worked = match self.pass() {
                Ok(worked) => {
                    self.metrics.source_up(&self.name, true);
                    worked
                }
                Err(e) => {
                    self.metrics.source_up(&self.name, false);
                    self.note_error(&e);
                    false
                }
            };
            self.refresh_metrics();
            self.idle_wait = if worked {
                Duration::ZERO
            } else {
                (self.idle_wait * 2)
                    .max(FIRST_IDLE_WAIT)
                    .min(self.settings.poll_interval)
            };
            let mut wait = self.idle_wait;
            if let Some(probe) = self.link.waiting_for_probe() {
                wait = wait.max(probe.min(self.settings.poll_interval));
            }
            self.sleep(wait);
            self.summarize(false);
        }
        self.summarize(true);
        tracing::info!(source = %self.name, "stopped");
        self.total
    }

    /// One round: a batch, due verifications, the source's due write-backs (the MySQL/MariaDB
    /// source wakes its write-back thread), clean-up. True when there was work, so the next
    /// round starts at once.
    pub fn pass(&mut self) -> Result<bool, SourceError> {
        let leading = self.source.lease();
        let leading = match leading {
            Ok(leading) => leading,
            Err(e) => {
                self.leading = Some(false);
                return Err(e);
            }
        };
        self.metrics.lease(&self.name, leading);
        if self.leading != Some(leading) {
            if leading {
                tracing::info!(source = %self.name, "this relay holds the source's lease: it delivers, verifies and writes back");
            } else {
                tracing::info!(source = %self.name, "another relay holds the source's lease: standing by until it ends");
            }
            self.leading = Some(leading);
        }
        if !leading {
            self.last_error = None;
            return Ok(false);
        }
        let delivered = self.deliver()?;
        let verified = self.verify()?;
        let written_back = self.source.write_back()?;
        if Instant::now() >= self.next_clean_up {
            self.next_clean_up = Instant::now() + CLEAN_UP_EVERY;
            let removed = self.source.clean_up(self.settings.retention)?;
            if removed > 0 {
                tracing::info!(source = %self.name, removed, "anchored changes past the retention removed");
            }
        }
        self.last_error = None;
        Ok(delivered || verified || written_back)
    }

    /// Take, send, record one batch. True when a batch went out.
    fn deliver(&mut self) -> Result<bool, SourceError> {
        if self.link.waiting_for_probe().is_some() {
            return Ok(false);
        }
        let probing = self.link.probing() || self.refused.is_some();
        let limit = if probing { 1 } else { self.settings.batch_size };
        let started = Instant::now();
        let mut changes = self.source.take(limit, probing, &[])?;
        if changes.is_empty() {
            return Ok(false);
        }
        // At most `max_payload_size` bytes of payload a batch: the rest is taken next round.
        let fit = certyo::batch::fitting(
            changes.iter().map(|c| c.payload.len()),
            self.settings.max_payload_size,
        );
        changes.truncate(fit);
        let taken = started.elapsed();
        // A payload too large or not JSON is answered here, never sent; the others are sent,
        // each answer landing on its own change (`places`).
        let mut answered: Vec<Option<Outcome>> =
            changes.iter().map(|c| self.unsendable(c)).collect();
        let mut places = Vec::new();
        let mut records = Vec::new();
        for (place, change) in changes.iter().enumerate() {
            if answered[place].is_none() {
                places.push(place);
                records.push(self.record_of(change));
            }
        }
        let shape = Shape {
            batch_size: self.settings.batch_size,
            bulk_threshold: self.settings.bulk_threshold,
        };
        let stop = self.stop.clone();
        // 429 back-off sleeps end early at SIGTERM: the rest of the batch is left untouched.
        let mut pause = |delay: Duration| sleep_unless(&stop, delay);
        let answers = if records.is_empty() {
            Vec::new()
        } else {
            certyo::batch::send(
                &self.client,
                &self.settings.tenant_id,
                &records,
                shape,
                &mut pause,
            )
        };
        let sent = started.elapsed();
        self.note_answers(&answers);
        for (place, answer) in places.into_iter().zip(answers) {
            answered[place] = Some(answer);
        }
        let outcomes: Vec<Outcome> = answered
            .into_iter()
            .map(|answer| {
                answer.unwrap_or_else(|| {
                    Outcome::Transient("certyo-relay: no answer for this change".into())
                })
            })
            .collect();
        let fates: Vec<(Change, Fate)> = changes
            .into_iter()
            .zip(&outcomes)
            .map(|(change, outcome)| {
                let fate = self.fate(&change, outcome);
                (change, fate)
            })
            .collect();
        let tally = tally_of(&fates);
        self.source.record(&fates)?;
        self.count(tally);
        let just_fates: Vec<Fate> = fates.into_iter().map(|(_, fate)| fate).collect();
        self.metrics
            .batch(&self.name, &just_fates, &outcomes, started.elapsed());
        // Where a batch's time goes: reading the queue, Certyo, recording the answers.
        tracing::info!(
            source = %self.name, sent = tally.sent, accepted = tally.accepted, replayed = tally.replayed,
            retried = tally.retried, dead = tally.dead, take_ms = taken.as_millis() as u64,
            http_ms = (sent - taken).as_millis() as u64,
            record_ms = (started.elapsed() - sent).as_millis() as u64, "batch"
        );
        Ok(tally.accepted > 0 || tally.dead > 0)
    }

    /// The answer for a change that is not sent, by the extension's rules: a payload larger
    /// than `max_payload_size`, or not JSON, is a dead letter (no HTTP status).
    fn unsendable(&self, change: &Change) -> Option<Outcome> {
        let max = self.settings.max_payload_size;
        certyo::batch::oversized(change.payload.len(), max, || {
            format!(
                "certyo-relay: the payload of {} bytes is larger than max_payload_size ({} kB); it was not sent. Raise the setting and set the queue row's status back to 'pending' to send it",
                change.payload.len(),
                max / 1024
            )
        })
        .or_else(|| {
            serde_json::from_str::<serde::de::IgnoredAny>(&change.payload)
                .is_err()
                .then(|| Outcome::Rejected {
                    status: certyo::fate::NO_HTTP_STATUS,
                    body: "certyo-relay: the queued payload is not valid JSON; it was not sent"
                        .into(),
                })
        })
    }

    /// The record of a change `unsendable` let through (its payload is JSON; were it not, an
    /// empty object would stand in).
    fn record_of(&self, change: &Change) -> Record {
        let payload = serde_json::value::RawValue::from_string(change.payload.clone())
            .or_else(|_| serde_json::value::to_raw_value(&serde_json::Map::new()))
            .unwrap_or_else(|_| serde_json::value::RawValue::NULL.to_owned());
        Record {
            tenant_id: self.settings.tenant_id.clone(),
            database: self.source.database().to_string(),
            collection: change.collection.clone(),
            record_id: change.record_id.clone(),
            record_payload: payload,
            operation_type: change.operation.as_str().to_string(),
            source_timestamp: change.source_timestamp.clone(),
            idempotency_key: change.idempotency_key.clone(),
        }
    }

    fn fate(&self, change: &Change, outcome: &Outcome) -> Fate {
        if self.stopping() && matches!(outcome, Outcome::Transient(_)) {
            return Fate::Untouched; // cut short by SIGTERM: sent again after the restart
        }
        let retry_after = next_attempt_delay(
            change.attempts + 1,
            jitter(),
            self.settings.max_retry_interval,
        );
        fate_of(
            outcome,
            &change.idempotency_key,
            retry_after,
            self.settings.verify_min_age,
        )
    }

    /// Outages and refusals, by the worker's rules: logged when they start and end.
    fn note_answers(&mut self, outcomes: &[Outcome]) {
        match self.link.note(outcomes, self.settings.max_retry_interval) {
            LinkChange::Started(error) => {
                tracing::warn!(source = %self.name, %error, "Certyo does not answer; probing it with one change at a time until it does")
            }
            LinkChange::Ended => {
                tracing::info!(source = %self.name, "Certyo answers again; delivering the backlog")
            }
            LinkChange::Prolonged | LinkChange::Unchanged => {}
        }
        let refusal = outcomes.iter().find_map(|o| match o {
            Outcome::Refused { status, body } => Some(format!("HTTP {status}: {body}")),
            _ => None,
        });
        match (&refusal, &self.refused) {
            (Some(why), None) => {
                tracing::error!(source = %self.name, why = %why, "Certyo refuses the configuration (API key or base URL); nothing is sent but one probe at a time until it is fixed")
            }
            (None, Some(_)) if !outcomes.is_empty() => {
                tracing::info!(source = %self.name, "Certyo takes the configuration again")
            }
            _ => {}
        }
        if refusal.is_some() || !outcomes.is_empty() {
            self.refused = refusal;
        }
        if self.refused.is_some() {
            // A refused configuration waits like an outage: no request storm.
            self.link.note(
                &[Outcome::Transient("refused".into())],
                self.settings.max_retry_interval,
            );
        }
        self.metrics
            .outage(&self.name, self.link.probing() || self.refused.is_some());
    }

    /// Verify the receipts that are due, a few requests at a time. True when any were.
    fn verify(&mut self) -> Result<bool, SourceError> {
        if Instant::now() < self.next_verification || self.link.probing() {
            return Ok(false);
        }
        let due = self.source.due_for_verification(VERIFY_BATCH)?;
        if due.is_empty() {
            // Nothing due: look again in a while, not at every poll.
            self.next_verification = Instant::now() + self.settings.poll_interval;
            return Ok(false);
        }
        let requests: Vec<VerifyRequest> = due
            .iter()
            .map(|d| VerifyRequest {
                tenant_id: self.settings.tenant_id.clone(),
                database: self.source.database().to_string(),
                collection: d.collection.clone(),
                record_id: d.record_id.clone(),
                record_hash: d.record_hash.clone(),
            })
            .collect();
        let answers = verify_all(&self.client, &requests, &self.stop);
        let results: Vec<(Delivered, crate::source::Anchoring)> = due
            .into_iter()
            .zip(answers)
            .filter_map(|(d, found)| {
                let anchoring = anchoring_of(
                    &found,
                    d.verify_attempts,
                    d.accepted_age,
                    self.settings.verify_interval,
                    self.settings.anchor_timeout,
                )?;
                Some((d, anchoring))
            })
            .collect();
        let anchored = results
            .iter()
            .filter(|(_, a)| matches!(a, crate::source::Anchoring::Anchored { .. }))
            .count() as u64;
        self.source.record_anchoring(&results)?;
        self.metrics.anchored(&self.name, anchored);
        self.count(Tally {
            verified: results.len() as u64,
            anchored,
            ..Tally::default()
        });
        Ok(!results.is_empty())
    }

    fn count(&mut self, t: Tally) {
        for tally in [&mut self.since_summary, &mut self.total] {
            tally.sent += t.sent;
            tally.accepted += t.accepted;
            tally.replayed += t.replayed;
            tally.retried += t.retried;
            tally.dead += t.dead;
            tally.verified += t.verified;
            tally.anchored += t.anchored;
        }
    }

    fn note_error(&mut self, error: &SourceError) {
        let text = error.to_string();
        let repeat = matches!(&self.last_error,
            Some((last, at)) if *last == text && at.elapsed() < Duration::from_secs(60));
        if !repeat {
            tracing::error!(source = %self.name, error = %text, "the source failed; trying again (nothing taken is lost)");
            self.last_error = Some((text, Instant::now()));
        }
        // Back off like an idle poll: an unreachable database is not hammered.
        self.idle_wait = self.idle_wait.max(self.settings.poll_interval / 2);
    }

    /// While the metrics are served: the queue's counts, every `METRICS_EVERY`.
    fn refresh_metrics(&mut self) {
        if !self.metrics.serving() || Instant::now() < self.next_metrics {
            return;
        }
        self.next_metrics = Instant::now() + METRICS_EVERY;
        match self.source.status() {
            Ok(status) => self.metrics.queue(&self.name, &status),
            Err(e) => self.note_error(&e),
        }
    }

    /// Once a minute: what happened, and where the source stands.
    fn summarize(&mut self, last: bool) {
        if !last && Instant::now() < self.next_summary {
            return;
        }
        self.next_summary = Instant::now() + SUMMARY_EVERY;
        let t = std::mem::take(&mut self.since_summary);
        let state = match self.source.status() {
            Ok(s) => format!(
                "pending {}, delivered {}, anchored {}, dead letters {}, not written back {}",
                s.pending, s.delivered, s.anchored, s.dead, s.not_written_back
            ),
            Err(e) => format!("status unavailable: {e}"),
        };
        tracing::info!(
            source = %self.name, sent = t.sent, accepted = t.accepted, replayed = t.replayed,
            retried = t.retried, dead = t.dead, verified = t.verified, anchored = t.anchored,
            outage = self.link.describe().unwrap_or_default(), "summary: {state}"
        );
    }

    /// Sleep up to `wait`, waking early at SIGTERM.
    fn sleep(&self, wait: Duration) {
        sleep_unless(&self.stop, wait);
    }
}

fn tally_of(fates: &[(Change, Fate)]) -> Tally {
    let mut t = Tally {
        sent: fates.len() as u64,
        ..Tally::default()
    };
    for (_, fate) in fates {
        match fate {
            Fate::Delivered { replayed, .. } => {
                t.accepted += 1;
                t.replayed += u64::from(*replayed);
            }
            Fate::Retry { .. } => t.retried += 1,
            Fate::Dead { .. } => t.dead += 1,
            Fate::Untouched => {}
        }
    }
    t
}

/// Sleep in short steps; false when `stop` was set (the caller gives up its wait).
fn sleep_unless(stop: &AtomicBool, wait: Duration) -> bool {
    let deadline = Instant::now() + wait;
    loop {
        if stop.load(Ordering::Relaxed) {
            return false;
        }
        let now = Instant::now();
        if now >= deadline {
            return true;
        }
        std::thread::sleep((deadline - now).min(Duration::from_millis(50)));
    }
}

/// Each request's answer, in order; `VERIFY_IN_FLIGHT` requests at once, from this thread. A
/// panic in there costs this round's answers (each verified again later), not the source's pump.
fn verify_all(client: &Client, requests: &[VerifyRequest], stop: &AtomicBool) -> Vec<Verification> {
    let asked = std::panic::AssertUnwindSafe(|| {
        client.verify_all(requests, VERIFY_IN_FLIGHT, &mut |delay| {
            sleep_unless(stop, delay)
        })
    });
    std::panic::catch_unwind(asked).unwrap_or_else(|_| {
        let failed = Outcome::Transient("the verification failed unexpectedly".into());
        vec![Verification::Failed(failed); requests.len()]
    })
}
