//! A long queue, read once: the changes a backlog holds, in id order, kept in the worker's
//! memory for the passes that drain it.
//!
//! A short queue is read whole by every pass and its batch sent straight from it. A long one
//! (after a pause, a bulk load, a slow Certyo) used to be moved into `certyo.delivery` first:
//! a heap insert and three index entries per change, and their removal, that no guarantee
//! needs when Certyo accepts the change at its first attempt (a third of the drain's time).
//! Instead the worker reads the first `LIMIT` changes of the queue by id once (where each
//! change lies, its id, and a hash of its record) and takes batches from this list, straight
//! from the queue, until it is drained; then it reads the queue again.
//!
//! Per-record order holds: a record's later change gets its id after its earlier change
//! committed (the row lock), so every change of a record older than one in the list was
//! visible when the list was read, with a smaller id, and is in the list too. Changes that
//! commit later wait for the next reading. Anything that is not an acceptance (a retry, a dead
//! letter, a batch lost to an error) ends the list: those changes then wait in
//! `certyo.delivery`, where the general path keeps each record's order.
//!
//! This module knows nothing of Postgres: `take` reads the rows and fetches the batches.

use std::collections::HashSet;

/// Changes read from the queue at a time: about 32 bytes each in the worker's memory.
pub const LIMIT: i64 = 50_000;

/// How far past the first unsettled change a pass looks for its batch, in batches: a record
/// with many changes in a row holds back only its own, and a pass stays bounded.
const LOOK_AHEAD: usize = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stage {
    /// In the queue, not taken yet.
    Waiting,
    /// Taken into a batch whose answers are not recorded yet.
    Taken,
    /// Accepted and recorded, or gone from the queue: nothing more to do.
    Settled,
}

#[derive(Debug, Clone, Copy)]
struct Change {
    /// The change's place in the queue's heap: block and offset.
    row: (u32, u16),
    id: i64,
    /// A hash of (relid, record_id): equal for one record. Two records that collide only wait
    /// for each other, a pass at most.
    record: i64,
    stage: Stage,
}

/// A queued change as read for the list: its place (`ctid` as text), id and record hash.
#[derive(Debug, Clone, PartialEq)]
pub struct Queued {
    pub row: String,
    pub id: i64,
    pub record: i64,
}

#[derive(Debug, Default)]
pub struct Backlog {
    /// In id order; everything before `front` is settled.
    changes: Vec<Change>,
    front: usize,
}

impl Backlog {
    pub fn is_empty(&self) -> bool {
        self.front >= self.changes.len()
    }

    /// Start over with what was read from the queue (in any order).
    pub fn fill(&mut self, queued: Vec<Queued>) {
        let mut changes: Vec<Change> = queued
            .into_iter()
            .filter_map(|q| {
                Some(Change {
                    row: parse_ctid(&q.row)?,
                    id: q.id,
                    record: q.record,
                    stage: Stage::Waiting,
                })
            })
            .collect();
        changes.sort_by_key(|c| c.id);
        self.changes = changes;
        self.front = 0;
    }

    /// Forget the list (its memory too): the next pass reads the queue again.
    pub fn clear(&mut self) {
        *self = Backlog::default();
    }

    /// The next batch: each record's first unsettled change, unless it is taken already (in
    /// flight: then the record waits), in id order. Returns their places and ids, now taken;
    /// empty when every change left waits for one in flight. None: a change was taken but is
    /// neither in flight nor settled, so its batch was lost (an error between taking and
    /// recording); only reading the queue again finds it, and its record's order with it.
    pub fn take(
        &mut self,
        batch_size: usize,
        in_flight: &[i64],
    ) -> Option<(Vec<String>, Vec<i64>)> {
        let in_flight: HashSet<i64> = in_flight.iter().copied().collect();
        let mut seen = HashSet::new();
        let (mut rows, mut ids) = (Vec::new(), Vec::new());
        // Taken changes lie within this horizon: it counts unsettled changes, which only
        // become fewer ahead of a change once it is taken.
        let horizon = batch_size.max(1) * LOOK_AHEAD;
        let mut looked = 0;
        for change in self.changes[self.front..].iter_mut() {
            if change.stage == Stage::Settled {
                continue;
            }
            looked += 1;
            if looked > horizon {
                break;
            }
            let first_of_record = seen.insert(change.record);
            match change.stage {
                Stage::Taken if !in_flight.contains(&change.id) => return None,
                Stage::Waiting
                    if first_of_record
                        && ids.len() < batch_size
                        && !in_flight.contains(&change.id) =>
                {
                    change.stage = Stage::Taken;
                    rows.push(format!("({},{})", change.row.0, change.row.1));
                    ids.push(change.id);
                }
                _ => {}
            }
        }
        Some((rows, ids))
    }

    /// These taken changes were left out of their batch (its payloads filled it): they wait
    /// for a later one.
    pub fn untake(&mut self, ids: &[i64]) {
        for id in ids {
            if let Ok(at) = self.changes.binary_search_by_key(id, |c| c.id) {
                if self.changes[at].stage == Stage::Taken {
                    self.changes[at].stage = Stage::Waiting;
                }
            }
        }
    }

    /// These changes need nothing more: accepted and recorded, or no longer in the queue.
    pub fn settle(&mut self, ids: &[i64]) {
        for id in ids {
            if let Ok(at) = self.changes.binary_search_by_key(id, |c| c.id) {
                self.changes[at].stage = Stage::Settled;
            }
        }
        while self
            .changes
            .get(self.front)
            .is_some_and(|c| c.stage == Stage::Settled)
        {
            self.front += 1;
        }
        if self.is_empty() {
            self.clear();
        }
    }
}

/// `(block,offset)`, as `ctid::text` prints it.
fn parse_ctid(text: &str) -> Option<(u32, u16)> {
    let (block, offset) = text.strip_prefix('(')?.strip_suffix(')')?.split_once(',')?;
    Some((block.parse().ok()?, offset.parse().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(id: i64, record: i64) -> Queued {
        Queued {
            row: format!("(0,{id})"),
            id,
            record,
        }
    }

    fn filled(changes: &[(i64, i64)]) -> Backlog {
        let mut backlog = Backlog::default();
        backlog.fill(changes.iter().map(|&(id, r)| q(id, r)).collect());
        backlog
    }

    fn ids(taken: Option<(Vec<String>, Vec<i64>)>) -> Vec<i64> {
        taken.expect("the list is not lost").1
    }

    #[test]
    fn a_batch_is_each_records_oldest_change_in_id_order() {
        let mut backlog = filled(&[(5, 1), (2, 2), (3, 1), (9, 3)]);
        let (rows, ids) = backlog.take(10, &[]).expect("taken");
        assert_eq!(ids, vec![2, 3, 9]);
        assert_eq!(rows, vec!["(0,2)", "(0,3)", "(0,9)"]);
    }

    #[test]
    fn a_record_waits_until_its_taken_change_is_settled() {
        let mut backlog = filled(&[(1, 7), (2, 7), (3, 8)]);
        assert_eq!(ids(backlog.take(10, &[])), vec![1, 3]);
        assert_eq!(ids(backlog.take(10, &[1, 3])), Vec::<i64>::new());
        backlog.settle(&[1, 3]);
        assert_eq!(ids(backlog.take(10, &[])), vec![2]);
        backlog.settle(&[2]);
        assert!(backlog.is_empty());
    }

    #[test]
    fn a_change_in_flight_holds_back_its_record_after_a_new_reading() {
        // The list was read again while the batch with change 1 was on the wire.
        let mut backlog = filled(&[(1, 7), (2, 7), (3, 8)]);
        assert_eq!(ids(backlog.take(10, &[1])), vec![3]);
    }

    #[test]
    fn a_batch_stops_at_its_size_and_a_pass_looks_only_so_far() {
        let mut backlog = filled(&[(1, 1), (2, 2), (3, 3)]);
        assert_eq!(ids(backlog.take(2, &[])), vec![1, 2]);
        // One record with many changes: a batch of 1 looks 4 changes ahead, no further.
        let mut backlog = filled(&[(1, 1), (2, 1), (3, 1), (4, 1), (5, 1), (6, 2)]);
        assert_eq!(ids(backlog.take(1, &[])), vec![1]);
        assert_eq!(ids(backlog.take(1, &[1])), Vec::<i64>::new());
    }

    #[test]
    fn a_taken_change_neither_in_flight_nor_settled_loses_the_list() {
        let mut backlog = filled(&[(1, 1), (2, 1), (3, 2)]);
        assert_eq!(ids(backlog.take(10, &[])), vec![1, 3]);
        backlog.settle(&[3]);
        // Change 1's batch never had its answers recorded.
        assert_eq!(backlog.take(10, &[]), None);
    }

    #[test]
    fn a_change_left_out_of_a_full_batch_is_taken_by_the_next() {
        let mut backlog = filled(&[(1, 1), (2, 2), (3, 3)]);
        assert_eq!(ids(backlog.take(10, &[])), vec![1, 2, 3]);
        backlog.untake(&[2, 3]);
        backlog.settle(&[1]);
        assert_eq!(ids(backlog.take(10, &[])), vec![2, 3]);
    }

    #[test]
    fn settling_everything_frees_the_list() {
        let mut backlog = filled(&[(1, 1), (2, 2)]);
        backlog.take(10, &[]);
        backlog.settle(&[2]);
        assert!(!backlog.is_empty());
        backlog.settle(&[1]);
        assert!(backlog.is_empty());
        assert_eq!(backlog.changes.capacity(), 0);
    }

    #[test]
    fn places_are_read_as_ctid_prints_them() {
        assert_eq!(parse_ctid("(4294967295,65535)"), Some((u32::MAX, u16::MAX)));
        assert_eq!(parse_ctid("4,5"), None);
        assert_eq!(parse_ctid("(4,x)"), None);
    }
}
