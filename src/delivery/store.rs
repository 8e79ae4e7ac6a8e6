//! Everything the worker reads and writes in Postgres. Each function is one short transaction;
//! none is open while HTTP is in flight.

use super::backlog::{self, Backlog};
use super::prepared;
use super::write_back::{self, Mark, Version};
use crate::api_key::masked;
use certyo::fate::{fate_of, Fate};
use certyo::Outcome;
use pgrx::pg_sys::Oid;
use pgrx::prelude::*;
use std::time::{Duration, Instant};

type SpiResult<T> = Result<T, pgrx::spi::Error>;

/// One change ready to send.
#[derive(Debug, Clone)]
pub struct Entry {
    pub id: i64,
    pub relid: Oid,
    pub collection: String,
    pub record_id: String,
    pub operation: String,
    /// The payload's text; empty when it is too large to send (`payload_size` says how large),
    /// and once it has gone into the record being sent.
    pub payload: String,
    /// Bytes of the payload's text, read from its header (a large payload is not read).
    pub payload_size: usize,
    /// SHA-256 of the payload sent, in hex: set when the record is made.
    pub payload_sha256: String,
    /// The digests of its columns (`certyo::column_sha256`), in hex: set with `payload_sha256`.
    pub column_sha256: String,
    pub source_timestamp: String,
    pub idempotency_key: String,
    /// Failed attempts so far: the next transient failure waits longer.
    pub attempts: i32,
    /// Where the change was taken from: its row in `certyo.queue` (`ctid` as text), or None
    /// for a row of `certyo.delivery`.
    pub queue_row: Option<String>,
}

fn in_transaction<T>(f: impl FnOnce() -> SpiResult<T>) -> SpiResult<T> {
    crate::error::transaction(f)
}

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

/// The database's name if certyo_cdc is installed in it (None: a database the worker has
/// nothing to do in).
pub fn installed_in_this_database() -> SpiResult<Option<String>> {
    in_transaction(|| {
        Spi::get_one::<String>(
            "SELECT (SELECT current_database()::text FROM pg_extension WHERE extname = 'certyo_cdc')",
        )
    })
}

/// Whether the worker's session is a superuser's, as it must be (a database's own settings
/// could make it another role).
pub fn runs_as_superuser() -> SpiResult<bool> {
    in_transaction(|| {
        Ok(
            Spi::get_one::<bool>("SELECT current_setting('is_superuser')::boolean")?
                .unwrap_or(false),
        )
    })
}

thread_local! {
    /// Whether a pg_restore session was in the database at the last pass.
    static RESTORING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// `sql` for the installed schema: one from before 0.2.0 (the library installed, `ALTER
/// EXTENSION certyo_cdc UPDATE` not yet run) has no `table_id` columns, and is delivered as
/// it was until the update (see `crate::track::identity::schema_has_ids`).
fn for_schema(sql: &str) -> std::borrow::Cow<'_, str> {
    if crate::track::identity::schema_has_ids() {
        std::borrow::Cow::Borrowed(sql)
    } else {
        std::borrow::Cow::Owned(
            sql.replace(", d.table_id", "")
                .replace(", q.table_id", "")
                .replace(", table_id", ""),
        )
    }
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
                        EXISTS (SELECT FROM pg_stat_activity a
                                 WHERE a.datname = current_database() AND a.application_name = 'pg_restore')",
                &[],
            )?
            .first()
            .get_three::<bool, bool, bool>()?;
            // Rows restored from a dump carry the old tables' OIDs, which in a fresh cluster
            // may be other tables' now: relink them by table id before any is written back
            // (see certyo.relink_restored() in sql/delivery.sql, and crate::track::identity).
            // Throughout a restore by pg_restore, and once after it (a restore in many
            // transactions or jobs may load rows after the tables' triggers are back).
            let restoring = restoring.unwrap_or(false);
            let was_restoring = RESTORING.replace(restoring);
            let needed = has_ids
                && (restoring
                    || was_restoring
                    || crate::track::identity::relink_wanted()
                    || prepared::select(client, "SELECT certyo.relink_needed()", &[])?
                        .first()
                        .get_one::<bool>()?
                        .unwrap_or(false));
            if needed {
                client.update("SELECT certyo.relink_restored(true)", None, &[])?;
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
pub fn take_batch(
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

/// A batch read from its table: the entries, in id order, and the ids left out because the
/// payloads before them filled the batch.
#[derive(Default)]
struct Fetched {
    entries: Vec<Entry>,
    left_out: Vec<i64>,
}

/// Entries from rows of `TAKE` or `TAKE_FROM_QUEUE` (the same columns), in id order, as many as
/// `max_bytes` of payload allow (see [`certyo::batch::fitting`]). A payload's size is read from
/// its header before its text: one left out, or too large to send, is never read into memory.
fn entries_of(mut rows: pgrx::spi::SpiTupleTable<'_>, max_bytes: usize) -> SpiResult<Fetched> {
    let mut read = Vec::new();
    while let Some(row) = rows.next() {
        let payload = rows.get_datum_by_ordinal(6)?;
        let entry = Entry {
            id: row.get::<i64>(1)?.unwrap_or_default(),
            relid: row.get::<Oid>(2)?.unwrap_or(pg_sys::InvalidOid),
            collection: row.get::<String>(3)?.unwrap_or_default(),
            record_id: row.get::<String>(4)?.unwrap_or_default(),
            operation: row.get::<String>(5)?.unwrap_or_default(),
            payload: String::new(),
            // SAFETY: column 6 is the payload, a json (varlena) value of a row of this table.
            payload_size: payload.map_or(0, |d| unsafe { text_size(d) }),
            payload_sha256: String::new(),
            column_sha256: String::new(),
            source_timestamp: row.get::<String>(7)?.unwrap_or_default(),
            idempotency_key: row.get::<String>(8)?.unwrap_or_default(),
            attempts: row.get::<i32>(9)?.unwrap_or_default(),
            queue_row: row.get::<String>(10)?,
        };
        read.push((entry, payload));
    }
    read.sort_by_key(|(e, _)| e.id);
    let kept = certyo::batch::fitting(read.iter().map(|(e, _)| e.payload_size), max_bytes);
    let left_out = read
        .split_off(kept)
        .into_iter()
        .map(|(e, _)| e.id)
        .collect();
    let entries = read
        .into_iter()
        .map(|(mut entry, payload)| {
            if entry.payload_size <= max_bytes {
                // SAFETY: as above; the row (and so the datum) lives as long as `rows`.
                entry.payload = payload.map_or_else(|| "{}".into(), |d| unsafe { text_of(d) });
            }
            entry
        })
        .collect();
    Ok(Fetched { entries, left_out })
}

/// Bytes of a text-like value's contents, from its header: a TOASTed value is not read.
///
/// # Safety
/// `datum` must be a varlena value (text, json) that lives while this runs.
unsafe fn text_size(datum: pg_sys::Datum) -> usize {
    pg_sys::toast_raw_datum_size(datum).saturating_sub(pg_sys::VARHDRSZ)
}

/// A text-like value's contents, read (and decompressed) in full.
///
/// # Safety
/// As for [`text_size`].
unsafe fn text_of(datum: pg_sys::Datum) -> String {
    <String as pgrx::FromDatum>::from_polymorphic_datum(datum, false, pg_sys::TEXTOID)
        .unwrap_or_default()
}

/// The worker's tables grow and shrink by tens of thousands of rows within seconds, far faster
/// than autovacuum re-analyzes them; with stale statistics the planner hashes whole tables
/// where a thousand index probes would do (measured: 4x slower passes). So the worker
/// analyzes a table itself once it has added more than a fifth of what the last analysis saw
/// (at least `ANALYZE_AFTER` rows): a bounded sample, amortized over the rows added.
#[derive(Debug, Default)]
pub struct Planner {
    /// Per table: rows added since its last ANALYZE, and the row count that ANALYZE saw.
    tables: [(i64, f64); 2],
}

#[derive(Debug, Clone, Copy)]
pub enum Table {
    Delivery,
    Receipt,
}

const ANALYZE_AFTER: i64 = 5_000;

impl Planner {
    pub fn refresh(
        &mut self,
        client: &mut pgrx::spi::SpiClient<'_>,
        table: Table,
        added: i64,
    ) -> SpiResult<()> {
        // Only the columns the worker's statements filter, join and sort on: the planner needs
        // the row count (which any ANALYZE sets) and these columns' distributions; the others
        // (payload hashes, keys, texts) made the pass that analyzed take twice as long
        // (50k receipts: 10-14 ms with every column, 5 ms with these). Autovacuum's own
        // ANALYZE still covers every column for users' queries.
        let (name, columns, slot) = match table {
            Table::Delivery => (
                "certyo.delivery",
                "(id, relid, record_id, state, next_attempt_at)",
                &mut self.tables[0],
            ),
            Table::Receipt => (
                "certyo.receipt",
                "(id, relid, record_id, operation, accepted_at, anchor_status, next_verify_at, written_back)",
                &mut self.tables[1],
            ),
        };
        slot.0 += added;
        if (slot.0 as f64) < (ANALYZE_AFTER as f64).max(slot.1 * 0.2) {
            return Ok(());
        }
        // The planner needs row counts and rough distributions, not fine histograms: a small
        // sample keeps this pause short (with the default target it took ~170 ms on 100k rows).
        client.update("SET LOCAL default_statistics_target = 10", None, &[])?;
        client.update(&format!("ANALYZE {name} {columns}"), None, &[])?;
        let seen = client
            .select(
                "SELECT reltuples::float8 FROM pg_class WHERE oid = $1::regclass",
                None,
                &[name.into()],
            )?
            .first()
            .get_one::<f64>()?
            .unwrap_or(0.0);
        *slot = (0, seen.max(0.0));
        Ok(())
    }
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
pub fn record(
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
            Outcome::Accepted(r) if e.operation != "delete" => Some(Version {
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

/// Remove receipts that are no longer needed: anchored, older than the retention, and either
/// replaced by a newer version of their record or of a delete. The newest receipt of a live
/// record stays: it is what `certyo.audit` compares the row with. A bounded number per call.
pub fn expire(retention: Duration) -> SpiResult<()> {
    in_transaction(move || {
        Spi::run_with_args(
            "DELETE FROM certyo.receipt
              WHERE id = ANY (ARRAY(
                    SELECT r.id FROM certyo.receipt r
                     WHERE r.anchor_status = 'anchored' AND r.accepted_at < now() - $1 * interval '1 s'
                       AND (r.operation = 'delete'
                            OR EXISTS (SELECT FROM certyo.receipt n
                                        WHERE n.relid = r.relid AND n.record_id = r.record_id AND n.id > r.id))
                     LIMIT 5000))",
            &[(retention.as_secs() as i64).into()],
        )
    })
}

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
    use super::{oldest_per_record, Queued, RECEIPTS_WITHOUT_DIGESTS};

    #[test]
    fn receipts_without_digests_name_no_digest_column() {
        for sql in RECEIPTS_WITHOUT_DIGESTS.iter() {
            assert!(
                !sql.contains("column_sha256") && !sql.contains("NULLIF(cols"),
                "{sql}"
            );
        }
    }
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
