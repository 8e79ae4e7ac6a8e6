//! The contract's batching rule, shared by every deliverer: more than `bulk_threshold` records
//! go in bulk requests of at most `batch_size`; fewer go one request each. A bulk refused as a
//! whole is split until only the records Certyo refuses are left refused. A batch carries at
//! most `max_payload_size` bytes of payload, and a payload larger than that is never sent.

use crate::{Client, Outcome, Record};
use std::time::Duration;

/// How a batch is cut into requests (`certyo.batch_size`, `certyo.bulk_threshold`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shape {
    pub batch_size: usize,
    pub bulk_threshold: usize,
}

/// Send `records` by the contract's rule and answer one outcome per record, in order. `pause`
/// sleeps between 429 retries and returns false when the caller must stop.
pub fn send(
    client: &Client,
    tenant: &str,
    records: &[Record],
    shape: Shape,
    pause: &mut dyn FnMut(Duration) -> bool,
) -> Vec<Outcome> {
    if records.len() > shape.bulk_threshold {
        records
            .chunks(shape.batch_size.max(1))
            .flat_map(|part| send_isolating(client, tenant, part, pause))
            .collect()
    } else {
        client.send_each(records, pause)
    }
}

/// A bulk request refused as a whole (a 4xx) is sent again in halves, down to single records,
/// so that only the records Certyo refuses become dead letters, each with its own status and
/// body (a batch of 1,000 with one bad record costs about 20 requests). A refusal of the
/// configuration (401/403/404/405) is not split: it is no record's fault.
fn send_isolating(
    client: &Client,
    tenant: &str,
    part: &[Record],
    pause: &mut dyn FnMut(Duration) -> bool,
) -> Vec<Outcome> {
    let outcomes = client.send_bulk(tenant, part, pause);
    let refused_whole = part.len() > 1
        && outcomes
            .iter()
            .all(|o| matches!(o, Outcome::Rejected { .. }));
    if !refused_whole {
        return outcomes;
    }
    let (first, second) = part.split_at(part.len() / 2);
    let mut outcomes = send_isolating(client, tenant, first, pause);
    outcomes.extend(send_isolating(client, tenant, second, pause));
    outcomes
}

/// The first failure among `outcomes`, as the status line shows it.
pub fn first_error(outcomes: &[Outcome]) -> Option<String> {
    outcomes.iter().find_map(|o| match o {
        Outcome::Transient(e) => Some(e.clone()),
        Outcome::Rejected { status, body } => Some(format!("HTTP {status}: {body}")),
        Outcome::Refused { status, body } => Some(format!("HTTP {status}: {body}")),
        _ => None,
    })
}

/// The default cap of a batch's payload bytes, and of one payload (`certyo.max_payload_size`,
/// the relay's `max_payload_size`): 10 MiB.
pub const DEFAULT_MAX_PAYLOAD_SIZE: usize = 10 * 1024 * 1024;

/// How many of a batch's changes, in order, go in one batch: as many as fit in `max_bytes` of
/// payload, and at least one. A payload larger than that is never sent (see [`oversized`]),
/// so it takes no room.
pub fn fitting(payload_sizes: impl Iterator<Item = usize>, max_bytes: usize) -> usize {
    let mut total = 0usize;
    let mut kept = 0;
    for size in payload_sizes {
        let room = if size > max_bytes { 0 } else { size };
        if kept > 0 && total + room > max_bytes {
            break;
        }
        total += room;
        kept += 1;
    }
    kept
}

/// The answer for a payload larger than `max_bytes`, given without sending it: a dead letter
/// ([`crate::fate::NO_HTTP_STATUS`]) with the text `why` makes. A change that cannot be sent
/// within the request timeout would otherwise fail every attempt and, as an outage probe,
/// hold up every other change. None when it fits.
pub fn oversized(
    payload_size: usize,
    max_bytes: usize,
    why: impl FnOnce() -> String,
) -> Option<Outcome> {
    (payload_size > max_bytes).then(|| Outcome::Rejected {
        status: crate::fate::NO_HTTP_STATUS,
        body: why(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_holds_what_fits_in_the_payload_limit_and_at_least_one_change() {
        assert_eq!(fitting([4, 4, 4].into_iter(), 10), 2);
        assert_eq!(fitting([4, 6, 1].into_iter(), 10), 2);
        assert_eq!(fitting([10, 1].into_iter(), 10), 1);
        assert_eq!(fitting(std::iter::empty(), 10), 0);
        // Too large to send: it takes no room (it is answered at once, never read or sent).
        assert_eq!(fitting([50, 4, 4, 4].into_iter(), 10), 3);
        assert_eq!(fitting([0; 5].into_iter(), 10), 5);
    }

    #[test]
    fn a_payload_over_the_cap_is_a_dead_letter_never_sent() {
        assert_eq!(oversized(10, 10, String::new), None, "the cap itself fits");
        assert_eq!(
            oversized(11, 10, || "too large".into()),
            Some(Outcome::Rejected {
                status: crate::fate::NO_HTTP_STATUS,
                body: "too large".into()
            })
        );
    }
}
