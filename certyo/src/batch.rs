//! The contract's batching rule, shared by every deliverer: more than `bulk_threshold` records
//! go in bulk requests of at most `batch_size`; fewer go one request each. A bulk refused as a
//! whole is split until only the records Certyo refuses are left refused.

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
