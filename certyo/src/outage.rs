//! Certyo stops answering: rather than every pending change retrying on its own schedule, one
//! change at a time probes the service on a growing interval (jittered, up to the retry cap)
//! until one is answered; then the backlog is released at once. Pure state, no clock of its
//! own but `Instant::now()`, so both deliverers keep the same rule.

use crate::retry::next_attempt_delay;
use crate::Outcome;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct Outage {
    pub failed_probes: u32,
    pub next_probe: Instant,
    /// The last failure, for the status line.
    pub error: String,
}

/// What a batch's answers changed.
#[derive(Debug, Clone, PartialEq)]
pub enum Change {
    /// Everything failed transiently: the service seems down (the error says why).
    Started(String),
    /// Still down; the next probe is later.
    Prolonged,
    /// A real answer: the backlog may go at once.
    Ended,
    Unchanged,
}

/// The outage state of one deliverer: `None` while Certyo answers.
#[derive(Debug, Clone, Default)]
pub struct Link {
    pub outage: Option<Outage>,
}

impl Link {
    /// After a batch's answers: a batch that failed transiently as a whole starts (or
    /// prolongs) an outage; any real answer ends it.
    pub fn note(&mut self, outcomes: &[Outcome], cap: Duration) -> Change {
        let failed = outcomes.iter().find_map(|o| match o {
            Outcome::Transient(e) => Some(e.clone()),
            _ => None,
        });
        let all_failed =
            !outcomes.is_empty() && outcomes.iter().all(|o| matches!(o, Outcome::Transient(_)));
        match (all_failed, self.outage.as_mut()) {
            (true, Some(outage)) => {
                outage.failed_probes += 1;
                outage.next_probe =
                    Instant::now() + next_attempt_delay(outage.failed_probes, jitter(), cap);
                outage.error = failed.unwrap_or_default();
                Change::Prolonged
            }
            (true, None) => {
                let error = failed.unwrap_or_default();
                self.outage = Some(Outage {
                    failed_probes: 1,
                    next_probe: Instant::now() + next_attempt_delay(1, jitter(), cap),
                    error: error.clone(),
                });
                Change::Started(error)
            }
            (false, Some(_)) if !outcomes.is_empty() => {
                self.outage = None;
                Change::Ended
            }
            _ => Change::Unchanged,
        }
    }

    /// During an outage a batch is one change, the probe.
    pub fn probing(&self) -> bool {
        self.outage.is_some()
    }

    /// During an outage, how long until the next probe (None: no outage, or a probe is due).
    pub fn waiting_for_probe(&self) -> Option<Duration> {
        let outage = self.outage.as_ref()?;
        let now = Instant::now();
        (outage.next_probe > now).then(|| outage.next_probe - now)
    }

    /// The status line during an outage.
    pub fn describe(&self) -> Option<String> {
        let outage = self.outage.as_ref()?;
        let wait = outage.next_probe.saturating_duration_since(Instant::now());
        Some(format!(
            "Certyo does not answer ({}): {} probe(s) failed, next in {} s; changes wait, nothing is lost",
            outage.error,
            outage.failed_probes,
            wait.as_secs()
        ))
    }
}

/// In [0, 1): enough randomness to spread retries, from the clock.
pub fn jitter() -> f64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    f64::from(nanos % 1000) / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn down() -> Outcome {
        Outcome::Transient("connection refused".into())
    }

    #[test]
    fn a_batch_that_fails_as_a_whole_starts_an_outage_and_one_answer_ends_it() {
        let mut link = Link::default();
        let cap = Duration::from_secs(60);
        assert_eq!(link.note(&[], cap), Change::Unchanged);
        assert_eq!(
            link.note(&[down(), down()], cap),
            Change::Started("connection refused".into())
        );
        assert!(link.probing());
        assert!(link.waiting_for_probe().is_some(), "the next probe waits");
        assert_eq!(link.note(&[down()], cap), Change::Prolonged);
        assert_eq!(link.outage.as_ref().map(|o| o.failed_probes), Some(2));
        assert!(link
            .describe()
            .unwrap_or_default()
            .contains("2 probe(s) failed"));
        let rejected = Outcome::Rejected {
            status: 422,
            body: "bad".into(),
        };
        assert_eq!(link.note(&[rejected], cap), Change::Ended);
        assert!(!link.probing());
        assert_eq!(link.describe(), None);
    }

    #[test]
    fn a_batch_with_one_real_answer_is_no_outage() {
        let mut link = Link::default();
        let rejected = Outcome::Rejected {
            status: 422,
            body: "bad".into(),
        };
        assert_eq!(
            link.note(&[down(), rejected], Duration::from_secs(60)),
            Change::Unchanged
        );
        assert!(!link.probing());
    }

    #[test]
    fn jitter_stays_in_the_unit_interval() {
        for _ in 0..100 {
            let j = jitter();
            assert!((0.0..1.0).contains(&j), "{j}");
        }
    }
}
