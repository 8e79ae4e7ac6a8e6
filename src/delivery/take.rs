//! Taking the next batch, each its own short transaction: the operator's switches and the
//! relink of restored rows before a pass, the batch straight from the queue or from
//! `certyo.delivery`, and when the next retry or verification is due.

use super::backlog::{self, Backlog};
use super::entry::{entries_of, Entry, Fetched};
use super::planner::{Planner, Table};
use super::{for_schema, in_transaction, prepared, SpiResult};
use pgrx::pg_sys::Oid;
use pgrx::prelude::*;
use std::time::Duration;

/// How much one batch may hold.
#[derive(Debug, Clone, Copy)]
pub struct BatchLimit {
    /// Changes (`certyo.batch_size`; 1 for a probe).
    pub changes: usize,
    /// Bytes of payload (`certyo.max_payload_size`): a writer's large changes are taken a few
    /// at a time, never a thousand at once into the worker's memory and one request.
    pub bytes: usize,
}

/// What the worker must know before a pass.
#[derive(Debug, Clone, Copy)]
pub struct Control {
    /// `certyo.pause()` was called (and not yet `certyo.resume()`).
    pub paused: bool,
    /// A backfill is queued or running (so a pass looks for its next chunk).
    pub backfill_open: bool,
}

thread_local! {
    /// Whether a pg_restore session was in the database at the last pass.
    static RESTORING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// None when the extension is not installed in this database (it may be dropped under the
/// worker); otherwise the operator's switches.
pub fn control() -> SpiResult<Option<Control>> {
    in_transaction(|| {
        Spi::connect_mut(|client| {
            let installed = prepared::select(
                client,
                "SELECT EXISTS (SELECT FROM pg_extension WHERE extname = 'certyo_cdc')",
                &[],
            )?
            .first()
            .get_one::<bool>()?
            .unwrap_or(false);
            if !installed {
                return Ok(None);
            }
            let has_ids = crate::track::identity::schema_has_ids();
            if !has_ids {
                // The schema from before 0.2.0: its own relink (by the extension's OID).
                client.update("SELECT certyo.relink_restored()", None, &[])?;
            }
            let (paused, backfill_open, restoring) = prepared::select(
                client,
                "SELECT (SELECT paused FROM certyo.worker_state LIMIT 1),
                        EXISTS (SELECT FROM certyo.backfills WHERE state IN ('queued', 'running')),
                        EXISTS (SELECT FROM pg_stat_activity a JOIN pg_roles r ON r.oid = a.usesysid
                                 WHERE a.datname = current_database() AND a.application_name = 'pg_restore'
                                   AND r.rolsuper)",
                &[],
            )?
            .first()
            .get_three::<bool, bool, bool>()?;
            // Rows restored from a dump carry the old tables' OIDs, which in a fresh cluster
            // may be other tables' now: relink them by table id before any is written back
            // (see certyo.relink_restored() in sql/delivery.sql, and crate::track::identity).
            // Throughout a restore by pg_restore, and once after it (a restore in many
            // transactions or jobs may load rows after the tables' triggers are back). Only a
            // superuser's: anyone may name a session so, and only a superuser can restore the
            // extension's tables (a table owner's restore of its own table is found by its
            // trigger, below).
            let restoring = restoring.unwrap_or(false);
            let was_restoring = RESTORING.replace(restoring);
            let needed = has_ids
                && (restoring || was_restoring || crate::track::identity::relink_wanted() || {
                    let (relids, ids) = crate::track::identity::carried_ids(client)?;
                    prepared::select(
                        client,
                        crate::track::identity::RELINK_NEEDED,
                        &[
                            crate::track::identity::this_installation(client)?.into(),
                            relids.into(),
                            ids.into(),
                        ],
                    )?
                }
                .first()
                .get_one::<bool>()?
                .unwrap_or(false));
            if needed {
                crate::track::identity::relink_unless_held(client)?;
            }
            Ok(Some(Control {
                paused: paused.unwrap_or(false),
                backfill_open: backfill_open.unwrap_or(false),
            }))
        })
    })
}

/// Take the next batch: the oldest pending change of each record whose next attempt is due,
/// in queue order, leaving alone the batch still in flight (whose changes, still pending, also
/// hold back their records' next). A record with an older change still waiting is skipped, so
/// changes of a record reach Certyo in commit order.
///
/// Taking writes nothing: there is one worker, and a crash between taking and recording only
/// means the batch is sent again after the restart, which Certyo answers with
/// `idempotencyReplayed` (a per-row lease would double the writes per change).
/// With `probing` (Certyo seems down) the entries' own retry times are ignored: the probe is
/// the oldest pending change, whenever it was scheduled.
pub fn batch(
    limit: BatchLimit,
    in_flight: &[i64],
    probing: bool,
    planner: &mut Planner,
    backlog: &mut Backlog,
) -> SpiResult<Vec<Entry>> {
    let in_flight = in_flight.to_vec();
    // On an error the transaction is aborted and the counts merely stay approximate; a list
    // whose batch was lost is read again (`Backlog::take`).
    let planner = std::panic::AssertUnwindSafe(planner);
    let backlog = std::panic::AssertUnwindSafe(backlog);
    in_transaction(move || {
        let (planner, backlog) = (planner, backlog);
        Spi::connect_mut(|client| {
            if probing {
                backlog.0.clear();
            } else if let Some(entries) = take_from_queue(client, limit, &in_flight, backlog.0)? {
                return Ok(entries);
            }
            take_from_delivery(client, limit, &in_flight, probing, planner.0)
        })
    })
}

/// The common case, Certyo keeping up: nothing waits in `certyo.delivery` for a retry, and
/// the batch goes straight from the queue; recording the answers deletes the queue rows.
/// Copying each change into `certyo.delivery` first (its row, three index entries, and their
/// removal) was about 40% of the WAL the worker wrote per change, and writers on the same disk
/// paid for it in commit time. A short queue is read whole every pass; a long one is read
/// once into the worker's list (`backlog`), which the following passes take from.
/// None: changes wait for a retry (the general path).
fn take_from_queue(
    client: &mut pgrx::spi::SpiClient<'_>,
    limit: BatchLimit,
    in_flight: &[i64],
    backlog: &mut Backlog,
) -> SpiResult<Option<Vec<Entry>>> {
    let retrying = prepared::select(
        client,
        "SELECT EXISTS (SELECT FROM certyo.delivery WHERE state = 'pending')",
        &[],
    )?
    .first()
    .get_one::<bool>()?
    .unwrap_or(true);
    if retrying {
        backlog.clear();
        return Ok(None);
    }
    if backlog.is_empty() {
        if let Some(short) = read_short_queue(client, limit.changes)? {
            let (rows, ids): (Vec<String>, Vec<i64>) =
                oldest_per_record(short, in_flight, limit.changes)
                    .into_iter()
                    .map(|q| (q.row, q.id))
                    .unzip();
            // What a full batch leaves out is simply taken by a later pass.
            return Ok(Some(
                fetch_from_queue(client, rows, ids, limit.bytes)?.entries,
            ));
        }
        read_backlog(client, backlog)?;
    }
    let taken = match backlog.take(limit.changes, in_flight) {
        Some(taken) => taken,
        None => {
            read_backlog(client, backlog)?;
            backlog.take(limit.changes, in_flight).unwrap_or_default()
        }
    };
    let (rows, ids) = taken;
    let fetched = fetch_from_queue(client, rows, ids.clone(), limit.bytes)?;
    backlog.untake(&fetched.left_out);
    // Changes gone from the queue meanwhile (`certyo.untrack`, an operator) need nothing more.
    if fetched.entries.len() + fetched.left_out.len() < ids.len() {
        let found: std::collections::HashSet<i64> = fetched
            .entries
            .iter()
            .map(|e| e.id)
            .chain(fetched.left_out.iter().copied())
            .collect();
        let gone: Vec<i64> = ids.into_iter().filter(|id| !found.contains(id)).collect();
        backlog.settle(&gone);
    }
    Ok(Some(fetched.entries))
}

/// The whole visible queue if it holds at most `DIRECT_LIMIT` rows (or four batches).
fn read_short_queue(
    client: &mut pgrx::spi::SpiClient<'_>,
    batch_size: usize,
) -> SpiResult<Option<Vec<Queued>>> {
    let limit = (batch_size * 4).max(DIRECT_LIMIT);
    let mut queued = Vec::new();
    for row in prepared::select(
        client,
        "SELECT ctid::text, id, relid, record_id FROM certyo.queue LIMIT $1",
        &[(limit as i64 + 1).into()],
    )? {
        queued.push(Queued {
            row: row.get::<String>(1)?.unwrap_or_default(),
            id: row.get::<i64>(2)?.unwrap_or_default(),
            relid: row.get::<Oid>(3)?.unwrap_or(pg_sys::InvalidOid),
            record_id: row.get::<String>(4)?.unwrap_or_default(),
        });
    }
    Ok((queued.len() <= limit).then_some(queued))
}

/// Read the first `backlog::LIMIT` changes of the queue by id into the worker's list.
fn read_backlog(client: &mut pgrx::spi::SpiClient<'_>, backlog: &mut Backlog) -> SpiResult<()> {
    let mut queued = Vec::new();
    for row in prepared::select(
        client,
        "SELECT ctid::text, id, hashtextextended(record_id, relid::bigint)
           FROM certyo.queue ORDER BY id LIMIT $1",
        &[backlog::LIMIT.into()],
    )? {
        queued.push(backlog::Queued {
            row: row.get::<String>(1)?.unwrap_or_default(),
            id: row.get::<i64>(2)?.unwrap_or_default(),
            record: row.get::<i64>(3)?.unwrap_or_default(),
        });
    }
    backlog.fill(queued);
    Ok(())
}

/// The chosen queue rows, whole, in id order, as many as `max_bytes` of payload allow.
fn fetch_from_queue(
    client: &mut pgrx::spi::SpiClient<'_>,
    rows: Vec<String>,
    ids: Vec<i64>,
    max_bytes: usize,
) -> SpiResult<Fetched> {
    if ids.is_empty() {
        return Ok(Fetched::default());
    }
    let rows = prepared::select(client, TAKE_FROM_QUEUE, &[rows.into(), ids.into()])?;
    entries_of(rows, max_bytes)
}

/// A queued change as the direct path first sees it: enough to choose, not yet the payload.
#[derive(Debug, Clone, PartialEq)]
struct Queued {
    row: String,
    id: i64,
    relid: Oid,
    record_id: String,
}

/// From the whole visible queue: each record's oldest change, unless it is in flight (then
/// the record waits for its answer), the first `batch_size` of them in queue order.
/// The queue seen whole holds every pending change of a record: a record's second change
/// cannot commit before its first (the row lock), so when the second is visible so is the first.
fn oldest_per_record(mut queued: Vec<Queued>, in_flight: &[i64], batch_size: usize) -> Vec<Queued> {
    queued.sort_by_key(|q| q.id);
    let mut seen = std::collections::HashSet::new();
    let mut chosen = Vec::new();
    for q in queued {
        if !seen.insert((q.relid, q.record_id.clone())) {
            continue; // an older change of the record comes first
        }
        if in_flight.contains(&q.id) || chosen.len() == batch_size {
            continue;
        }
        chosen.push(q);
    }
    chosen
}

/// The queue is read whole every pass while it holds at most this many rows (or four
/// batches); a longer one is read into the worker's list.
const DIRECT_LIMIT: usize = 2_000;

/// The general path: move what capture queued into the worker's own indexed table, and take
/// from there.
fn take_from_delivery(
    client: &mut pgrx::spi::SpiClient<'_>,
    limit: BatchLimit,
    in_flight: &[i64],
    probing: bool,
    planner: &mut Planner,
) -> SpiResult<Vec<Entry>> {
    let moved = client
        .update(for_schema(MOVE_QUEUE).as_ref(), None, &[MOVE_LIMIT.into()])?
        .first()
        .get_one::<i64>()?
        .unwrap_or(0);
    planner.refresh(client, Table::Delivery, moved)?;
    // A move that hit its limit left changes in the queue, which has no order; one of them may
    // be an older change of a record taken now. Only what precedes every change left behind
    // may go.
    let bound = if moved >= MOVE_LIMIT {
        client
            .select("SELECT min(id) FROM certyo.queue", None, &[])?
            .first()
            .get_one::<i64>()?
    } else {
        None
    };
    let rows = client.select(
        TAKE,
        None,
        &[
            (limit.changes as i64).into(),
            bound.into(),
            in_flight.to_vec().into(),
            probing.into(),
        ],
    )?;
    // What a full batch leaves out stays pending, for a later pass.
    Ok(entries_of(rows, limit.bytes)?.entries)
}

/// Changes moved from the queue per pass at most: a transaction of bounded size.
const MOVE_LIMIT: i64 = 20_000;

const MOVE_QUEUE: &str = "
    WITH moved AS (
        DELETE FROM certyo.queue
         WHERE ctid = ANY (ARRAY(SELECT ctid FROM certyo.queue LIMIT $1))
        RETURNING id, relid, collection, record_id, operation, payload, source_timestamp, idempotency_key, queued_at, table_id),
    kept AS (
        INSERT INTO certyo.delivery (id, relid, collection, record_id, operation, payload, source_timestamp, idempotency_key, queued_at, table_id)
        SELECT * FROM moved
        ON CONFLICT (id) DO NOTHING)
    SELECT count(*) FROM moved";

// The inner LIMIT walks the pending index in id order, so a pass costs what it takes, not
// what is waiting; the per-record check then runs only on those candidates, one index probe
// each (a scalar subquery, which the planner cannot turn into a join over the whole table).
const TAKE: &str = "
    SELECT c.id, c.relid, c.collection, c.record_id, c.operation, c.payload,
           to_char(c.source_timestamp AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'),
           c.idempotency_key, c.attempts, NULL::text
      FROM (SELECT * FROM certyo.delivery
             WHERE state = 'pending' AND ($4 OR next_attempt_at <= now()) AND ($2::bigint IS NULL OR id < $2)
               AND id <> ALL ($3::bigint[])
             ORDER BY id
             LIMIT $1 * 2) AS c
     WHERE (SELECT o.id FROM certyo.delivery o
             WHERE o.relid = c.relid AND o.record_id = c.record_id AND o.state = 'pending' AND o.id < c.id
             LIMIT 1) IS NULL
     ORDER BY c.id
     LIMIT $1";

// A row is named by its place and its id together: a place freed by a move and a vacuum may
// hold a newer change, whose id is not in the batch. Joined with the pairs (one TID probe
// each), not `ctid = ANY (...) AND id = ANY (...)`: a parameter's array is searched element
// by element for every row (half the statement's time at 1,000 rows).
const TAKE_FROM_QUEUE: &str = "
    SELECT q.id, q.relid, q.collection, q.record_id, q.operation, q.payload,
           to_char(q.source_timestamp AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'),
           q.idempotency_key, 0, q.ctid::text
      FROM unnest($1::text[]::tid[], $2::bigint[]) AS t(ctid, id)
      JOIN certyo.queue q ON q.ctid = t.ctid AND q.id = t.id";

/// How long until the earliest retry or verification is due (None: nothing scheduled). With
/// `verifying` (a batch of receipts is being verified, due but not yet recorded) receipts are
/// left out: the helper thread wakes the worker when it is done.
pub fn next_due(verifying: bool) -> SpiResult<Option<Duration>> {
    in_transaction(move || {
        // NULL when nothing is scheduled (not 0: that would wake the worker at once, forever);
        // greatest() first, because '-infinity' (due now) minus now() is an error.
        let ms = Spi::connect(|client| {
            prepared::select(
                client,
                "SELECT CASE WHEN due IS NULL THEN NULL
                         ELSE (extract(epoch FROM greatest(due, now()) - now()) * 1000)::bigint END
               FROM (SELECT least(
                        (SELECT min(next_attempt_at) FROM certyo.delivery WHERE state = 'pending'),
                        (SELECT min(next_verify_at) FROM certyo.receipt
                          WHERE anchor_status IN ('pending', 'overdue') AND NOT $1)
                    ) AS due) AS s",
                &[verifying.into()],
            )?
            .first()
            .get_one::<i64>()
        })?;
        Ok(ms.map(|ms| Duration::from_millis(ms as u64)))
    })
}

#[cfg(test)]
mod tests {
    use super::{oldest_per_record, Queued};
    use pgrx::pg_sys::Oid;

    fn q(id: i64, record: &str) -> Queued {
        Queued {
            row: format!("(0,{id})"),
            id,
            relid: Oid::from(16384u32),
            record_id: record.into(),
        }
    }

    fn ids(chosen: Vec<Queued>) -> Vec<i64> {
        chosen.into_iter().map(|q| q.id).collect()
    }

    #[test]
    fn each_record_sends_its_oldest_change_first() {
        let queued = vec![q(5, "b"), q(2, "a"), q(7, "a"), q(3, "c")];
        assert_eq!(ids(oldest_per_record(queued, &[], 10)), vec![2, 3, 5]);
    }

    #[test]
    fn a_record_in_flight_waits_for_its_answer() {
        let queued = vec![q(1, "a"), q(2, "b"), q(3, "a"), q(4, "c")];
        assert_eq!(ids(oldest_per_record(queued, &[1], 10)), vec![2, 4]);
    }

    #[test]
    fn a_batch_stops_at_its_size_in_queue_order() {
        let queued = vec![q(9, "d"), q(1, "a"), q(4, "c"), q(2, "b")];
        assert_eq!(ids(oldest_per_record(queued, &[], 2)), vec![1, 2]);
    }
}
