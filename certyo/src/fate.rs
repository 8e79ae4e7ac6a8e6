//! What an answer of Certyo means for the change or receipt it is about: one rule book for the
//! extension's worker and `certyo-relay`, which record the results each in its own store.
//!
//! - Delivery ([`fate_of`]): accepted → a receipt, verified from `verify_after` on; transient →
//!   tried again after `retry_after`; refused as a record (other 4xx) → a dead letter with the
//!   HTTP status and body; answered as a replay of another record's change (a reused
//!   idempotency key) → a dead letter with [`NO_HTTP_STATUS`], since the answer was a 202 for
//!   something else; the configuration refused (401/403/404/405) → left untouched.
//! - Verification ([`verdict`], [`verify_delay`], [`anchoring_of`]): anchored or mismatched →
//!   settled; anything else → asked again after `verify_interval`, and once the receipt is
//!   overdue (older than `anchor_timeout`) after a doubling interval of at most an hour.

use crate::{Outcome, Verification};
use std::time::Duration;

/// The status kept with a dead letter that no HTTP status explains: decided by the client (a
/// conflict, a payload too large to send, a payload that is not JSON).
pub const NO_HTTP_STATUS: u16 = 0;

/// What becomes of one change after Certyo's answer.
#[derive(Debug, Clone, PartialEq)]
pub enum Fate {
    /// Accepted: keep the receipt (`record_hash`, `replayed`), write the hash back to the
    /// source row (unless it is a delete), and verify it from `verify_after` on.
    Delivered {
        record_hash: String,
        replayed: bool,
        verify_after: Duration,
    },
    /// Failed transiently: try again after `retry_after`, `error` kept for the operator.
    Retry {
        retry_after: Duration,
        error: String,
    },
    /// Never deliverable as it is: a dead letter, kept with the HTTP status
    /// ([`NO_HTTP_STATUS`]: none) and the body, for an operator; later changes of the record go on.
    Dead { status: u16, error: String },
    /// The configuration was refused (401/403/404/405): not the change's fault, so no attempt
    /// of it is counted; sent again after the fix.
    Untouched,
}

/// The fate of one answer. `retry_after`: the pause before the next attempt should it be
/// transient; `verify_after`: when a receipt is first verified.
pub fn fate_of(
    outcome: &Outcome,
    idempotency_key: &str,
    retry_after: Duration,
    verify_after: Duration,
) -> Fate {
    match outcome {
        Outcome::Accepted(receipt) => Fate::Delivered {
            record_hash: receipt.record_hash.clone(),
            replayed: receipt.idempotency_replayed,
            verify_after,
        },
        Outcome::Transient(error) => Fate::Retry {
            retry_after,
            error: error.clone(),
        },
        Outcome::Rejected { status, body } => Fate::Dead {
            status: *status,
            error: body.clone(),
        },
        Outcome::Conflict { receipt } => Fate::Dead {
            status: NO_HTTP_STATUS,
            error: Outcome::conflict_message(receipt, idempotency_key),
        },
        Outcome::Refused { .. } => Fate::Untouched,
    }
}

/// What verification's answer says of one receipt, before its timing.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    /// On chain: the receipt is `anchored`, and the source row too if it still holds this hash.
    Anchored { polygon_tx_hash: Option<String> },
    /// Certyo holds another hash: `mismatch`, kept for an operator, never papered over.
    Mismatch { reported_hash: String },
    /// Not settled: ask again later, with the reason when there is one.
    Later { error: Option<String> },
}

/// The verdict of one verification answer; None when the configuration was refused (the
/// receipt is left as it is for after the fix: it is not the receipt's fault).
pub fn verdict(found: &Verification) -> Option<Verdict> {
    Some(match found {
        Verification::Anchored { polygon_tx_hash } => Verdict::Anchored {
            polygon_tx_hash: polygon_tx_hash.clone(),
        },
        Verification::Mismatch { reported_hash } => Verdict::Mismatch {
            reported_hash: reported_hash.clone(),
        },
        Verification::Failed(Outcome::Refused { .. }) => return None,
        Verification::NotYet => Verdict::Later { error: None },
        Verification::Unknown => Verdict::Later {
            error: Some("Certyo does not know this version (yet)".into()),
        },
        Verification::Failed(Outcome::Transient(e)) => Verdict::Later {
            error: Some(e.clone()),
        },
        Verification::Failed(Outcome::Rejected { status, body }) => Verdict::Later {
            error: Some(format!("HTTP {status}: {body}")),
        },
        Verification::Failed(Outcome::Accepted(_) | Outcome::Conflict { .. }) => {
            Verdict::Later { error: None }
        }
    })
}

/// The longest wait between two verifications of an overdue receipt.
pub const MAX_VERIFY_DELAY: Duration = Duration::from_secs(3600);
/// The doubling of an overdue receipt's wait stops growing after this many verifications (it
/// has long reached [`MAX_VERIFY_DELAY`] by then); it keeps the arithmetic in range.
pub const MAX_VERIFY_DOUBLINGS: u32 = 16;

/// How long until a receipt not yet settled is asked again: `interval`, or, once it is overdue,
/// `interval` doubled per verification tried before (`verify_attempts`), at most an hour.
pub fn verify_delay(interval: Duration, verify_attempts: u32, overdue: bool) -> Duration {
    if overdue {
        interval
            .saturating_mul(1u32 << verify_attempts.min(MAX_VERIFY_DOUBLINGS))
            .min(MAX_VERIFY_DELAY)
    } else {
        interval
    }
}

/// What verification decided for one receipt, with its timing.
#[derive(Debug, Clone, PartialEq)]
pub enum Anchoring {
    /// On chain: `anchor_status = anchored`, and the source row's too if it still holds
    /// this hash.
    Anchored { polygon_tx_hash: Option<String> },
    /// Certyo holds another hash: `mismatch`, kept for an operator, never papered over.
    Mismatch { reported_hash: String },
    /// Ask again after `after`; `overdue` when long past the expected anchoring time.
    Later {
        after: Duration,
        overdue: bool,
        error: Option<String>,
    },
}

/// The verdict and its timing for a receipt accepted `accepted_age` ago and verified
/// `verify_attempts` times before: overdue past `anchor_timeout`.
pub fn anchoring_of(
    found: &Verification,
    verify_attempts: u32,
    accepted_age: Duration,
    interval: Duration,
    anchor_timeout: Duration,
) -> Option<Anchoring> {
    let overdue = accepted_age > anchor_timeout;
    Some(match verdict(found)? {
        Verdict::Anchored { polygon_tx_hash } => Anchoring::Anchored { polygon_tx_hash },
        Verdict::Mismatch { reported_hash } => Anchoring::Mismatch { reported_hash },
        Verdict::Later { error } => Anchoring::Later {
            after: verify_delay(interval, verify_attempts, overdue),
            overdue,
            error,
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Receipt;

    const SEC: Duration = Duration::from_secs(1);

    fn receipt(record_id: &str, replayed: bool) -> Receipt {
        Receipt {
            record_id: record_id.into(),
            record_hash: "sha256:ab".into(),
            accepted_at: None,
            idempotency_replayed: replayed,
        }
    }

    #[test]
    fn an_accepted_change_becomes_a_receipt_verified_later() {
        assert_eq!(
            fate_of(
                &Outcome::Accepted(receipt("42", true)),
                "k-1",
                SEC,
                60 * SEC
            ),
            Fate::Delivered {
                record_hash: "sha256:ab".into(),
                replayed: true,
                verify_after: 60 * SEC
            }
        );
    }

    #[test]
    fn a_transient_failure_is_retried_after_its_back_off() {
        assert_eq!(
            fate_of(&Outcome::Transient("HTTP 503".into()), "k-1", 4 * SEC, SEC),
            Fate::Retry {
                retry_after: 4 * SEC,
                error: "HTTP 503".into()
            }
        );
    }

    #[test]
    fn a_refused_record_is_a_dead_letter_with_its_status_and_body() {
        let outcome = Outcome::Rejected {
            status: 422,
            body: "recordPayload is required".into(),
        };
        assert_eq!(
            fate_of(&outcome, "k-1", SEC, SEC),
            Fate::Dead {
                status: 422,
                error: "recordPayload is required".into()
            }
        );
    }

    #[test]
    fn a_conflict_is_a_dead_letter_without_an_http_status_naming_the_key() {
        let fate = fate_of(
            &Outcome::Conflict {
                receipt: receipt("7", true),
            },
            "inst-42",
            SEC,
            SEC,
        );
        let Fate::Dead { status, error } = fate else {
            panic!("not a dead letter: {fate:?}");
        };
        assert_eq!(
            status, NO_HTTP_STATUS,
            "the answer was a 202 for another record"
        );
        assert!(
            error.contains("inst-42") && error.contains("\"7\""),
            "{error}"
        );
    }

    #[test]
    fn a_refused_configuration_leaves_the_change_untouched() {
        for status in [401, 403, 404, 405] {
            let outcome = Outcome::Refused {
                status,
                body: String::new(),
            };
            assert_eq!(fate_of(&outcome, "k", SEC, SEC), Fate::Untouched);
        }
    }

    #[test]
    fn verification_settles_anchored_and_mismatched_receipts() {
        assert_eq!(
            verdict(&Verification::Anchored {
                polygon_tx_hash: Some("0x9f".into())
            }),
            Some(Verdict::Anchored {
                polygon_tx_hash: Some("0x9f".into())
            })
        );
        assert_eq!(
            verdict(&Verification::Mismatch {
                reported_hash: "sha256:cd".into()
            }),
            Some(Verdict::Mismatch {
                reported_hash: "sha256:cd".into()
            })
        );
    }

    #[test]
    fn verification_that_settles_nothing_asks_again_with_the_reason() {
        assert_eq!(
            verdict(&Verification::NotYet),
            Some(Verdict::Later { error: None })
        );
        assert_eq!(
            verdict(&Verification::Unknown),
            Some(Verdict::Later {
                error: Some("Certyo does not know this version (yet)".into())
            })
        );
        assert_eq!(
            verdict(&Verification::Failed(Outcome::Transient("timeout".into()))),
            Some(Verdict::Later {
                error: Some("timeout".into())
            })
        );
        assert_eq!(
            verdict(&Verification::Failed(Outcome::Rejected {
                status: 400,
                body: "bad".into()
            })),
            Some(Verdict::Later {
                error: Some("HTTP 400: bad".into())
            })
        );
        assert_eq!(
            verdict(&Verification::Failed(Outcome::Refused {
                status: 401,
                body: String::new()
            })),
            None,
            "a refused configuration leaves the receipt as it is"
        );
    }

    #[test]
    fn an_overdue_receipt_backs_off_doubling_to_at_most_an_hour() {
        let minute = 60 * SEC;
        assert_eq!(
            verify_delay(minute, 5, false),
            minute,
            "not overdue: the interval"
        );
        assert_eq!(verify_delay(minute, 0, true), minute);
        assert_eq!(verify_delay(minute, 3, true), 8 * minute);
        assert_eq!(verify_delay(minute, 6, true), MAX_VERIFY_DELAY);
        assert_eq!(verify_delay(minute, u32::MAX, true), MAX_VERIFY_DELAY);
        assert_eq!(verify_delay(Duration::MAX, 40, true), MAX_VERIFY_DELAY);
    }

    #[test]
    fn anchoring_is_overdue_only_past_the_anchor_timeout() {
        let later = |age| anchoring_of(&Verification::NotYet, 3, age, SEC, 600 * SEC);
        assert_eq!(
            later(600 * SEC),
            Some(Anchoring::Later {
                after: SEC,
                overdue: false,
                error: None
            })
        );
        assert_eq!(
            later(601 * SEC),
            Some(Anchoring::Later {
                after: 8 * SEC,
                overdue: true,
                error: None
            })
        );
        assert_eq!(
            anchoring_of(
                &Verification::Anchored {
                    polygon_tx_hash: None
                },
                0,
                SEC,
                SEC,
                SEC
            ),
            Some(Anchoring::Anchored {
                polygon_tx_hash: None
            })
        );
    }
}
