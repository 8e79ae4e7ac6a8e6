//! Everything the worker reads and writes in Postgres. Each function is one short transaction;
//! none is open while HTTP is in flight.

use crate::certyo::{Outcome, Receipt};
use pgrx::bgworkers::BackgroundWorker;
use pgrx::pg_sys::Oid;
use pgrx::prelude::*;
use std::time::Duration;

type SpiResult<T> = Result<T, pgrx::spi::Error>;

/// One change ready to send.
#[derive(Debug, Clone)]
pub struct Entry {
    pub id: i64,
    pub relid: Oid,
    pub collection: String,
    pub record_id: String,
    pub operation: String,
    pub payload: String,
    pub source_timestamp: String,
    pub idempotency_key: String,
}

fn in_transaction<T>(
    f: impl FnOnce() -> SpiResult<T> + std::panic::UnwindSafe + std::panic::RefUnwindSafe,
) -> SpiResult<T> {
    BackgroundWorker::transaction(f)
}

/// Is the extension installed in this database? (It may be dropped under the worker.)
pub fn extension_installed() -> SpiResult<bool> {
    in_transaction(|| {
        Ok(Spi::get_one::<bool>(
            "SELECT EXISTS (SELECT FROM pg_extension WHERE extname = 'certyo_cdc')",
        )?
        .unwrap_or(false))
    })
}

/// Move what capture queued into the worker's own table, and take the next batch: the oldest
/// pending change of each record whose next attempt is due, in queue order. A record with an
/// older change still waiting is skipped, so changes of a record reach Certyo in commit order.
///
/// Taking writes nothing: there is one worker, and a crash between taking and recording only
/// means the batch is sent again after the restart, which Certyo answers with
/// `idempotencyReplayed` (a per-row lease would double the writes per change).
pub fn take_batch(batch_size: usize) -> SpiResult<Vec<Entry>> {
    in_transaction(move || {
        Spi::connect_mut(|client| {
            client.update(MOVE_QUEUE, None, &[])?;
            let rows = client.select(TAKE, None, &[(batch_size as i64).into()])?;
            let mut entries = Vec::new();
            for row in rows {
                entries.push(Entry {
                    id: row.get::<i64>(1)?.unwrap_or_default(),
                    relid: row.get::<Oid>(2)?.unwrap_or(pg_sys::InvalidOid),
                    collection: row.get::<String>(3)?.unwrap_or_default(),
                    record_id: row.get::<String>(4)?.unwrap_or_default(),
                    operation: row.get::<String>(5)?.unwrap_or_default(),
                    payload: row.get::<String>(6)?.unwrap_or_else(|| "{}".into()),
                    source_timestamp: row.get::<String>(7)?.unwrap_or_default(),
                    idempotency_key: row.get::<String>(8)?.unwrap_or_default(),
                });
            }
            entries.sort_by_key(|e| e.id);
            Ok(entries)
        })
    })
}

const MOVE_QUEUE: &str = "
    WITH moved AS (
        DELETE FROM certyo.queue
         WHERE ctid = ANY (ARRAY(SELECT ctid FROM certyo.queue LIMIT 20000))
        RETURNING id, relid, collection, record_id, operation, payload, source_timestamp, idempotency_key, queued_at)
    INSERT INTO certyo.delivery (id, relid, collection, record_id, operation, payload, source_timestamp, idempotency_key, queued_at)
    SELECT * FROM moved
    ON CONFLICT (id) DO NOTHING";

// The inner LIMIT walks the pending index in id order, so a pass costs what it takes, not
// what is waiting; the per-record check then runs only on those candidates.
const TAKE: &str = "
    SELECT c.id, c.relid, c.collection, c.record_id, c.operation, c.payload::text,
           to_char(c.source_timestamp AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'),
           c.idempotency_key
      FROM (SELECT * FROM certyo.delivery
             WHERE state = 'pending' AND next_attempt_at <= now()
             ORDER BY id
             LIMIT $1 * 2) AS c
     WHERE NOT EXISTS (SELECT FROM certyo.delivery o
                        WHERE o.relid = c.relid AND o.record_id = c.record_id
                          AND o.state = 'pending' AND o.id < c.id)
     ORDER BY c.id
     LIMIT $1";

/// How the results of one pass add up, for the worker's status.
#[derive(Debug, Default, Clone, Copy)]
pub struct Tally {
    pub sent: i64,
    pub accepted: i64,
    pub replayed: i64,
    pub failed: i64,
}

/// Record what Certyo said about each entry, and write the accepted hashes back to the rows.
/// `retry_in` gives the delay before the next attempt of a transient failure.
pub fn record(
    results: &[(Entry, Outcome)],
    retry_in: &dyn Fn(&Entry) -> Duration,
) -> SpiResult<Tally> {
    let mut accepted: (Vec<i64>, Vec<String>, Vec<bool>) = Default::default();
    let mut transient: (Vec<i64>, Vec<i64>, Vec<String>) = Default::default();
    let mut failed: (Vec<i64>, Vec<i32>, Vec<String>, Vec<bool>) = Default::default();
    let mut tally = Tally {
        sent: results.len() as i64,
        ..Tally::default()
    };
    for (entry, outcome) in results {
        match outcome {
            Outcome::Accepted(Receipt {
                record_hash,
                idempotency_replayed,
                ..
            }) => {
                accepted.0.push(entry.id);
                accepted.1.push(record_hash.clone());
                accepted.2.push(*idempotency_replayed);
                tally.accepted += 1;
                tally.replayed += i64::from(*idempotency_replayed);
            }
            Outcome::Transient(error) => {
                transient.0.push(entry.id);
                transient.1.push(retry_in(entry).as_millis() as i64);
                transient.2.push(error.clone());
                tally.failed += 1;
            }
            Outcome::Rejected { status, body } | Outcome::Unauthorized { status, body } => {
                failed.0.push(entry.id);
                failed.1.push(i32::from(*status));
                failed.2.push(body.clone());
                failed.3.push(matches!(outcome, Outcome::Rejected { .. }));
                tally.failed += 1;
            }
        }
    }
    let write_back: Vec<(Entry, String)> = results
        .iter()
        .filter_map(|(e, o)| match o {
            Outcome::Accepted(r) if e.operation != "delete" => {
                Some((e.clone(), r.record_hash.clone()))
            }
            _ => None,
        })
        .collect();
    in_transaction(move || {
        Spi::connect_mut(|client| {
            client.update(
                "UPDATE certyo.delivery d
                    SET state = 'accepted', record_hash = v.hash, replayed = v.replayed, accepted_at = now(),
                        attempts = d.attempts + 1, last_attempt_at = now(), last_status = 202, last_error = NULL
                   FROM unnest($1::bigint[], $2::text[], $3::boolean[]) AS v(id, hash, replayed)
                  WHERE d.id = v.id",
                None,
                &[accepted.0.into(), accepted.1.into(), accepted.2.into()],
            )?;
            client.update(
                "UPDATE certyo.delivery d
                    SET attempts = d.attempts + 1, last_attempt_at = now(),
                        next_attempt_at = now() + v.delay * interval '1 ms', last_error = v.error
                   FROM unnest($1::bigint[], $2::bigint[], $3::text[]) AS v(id, delay, error)
                  WHERE d.id = v.id",
                None,
                &[transient.0.into(), transient.1.into(), transient.2.into()],
            )?;
            // 4xx other than 401/403: a dead letter. 401/403: back to pending, the attempt not
            // counted: the configuration is wrong, not the record.
            client.update(
                "UPDATE certyo.delivery d
                    SET state = CASE WHEN v.dead THEN 'dead' ELSE 'pending' END,
                        attempts = CASE WHEN v.dead THEN d.attempts + 1 ELSE d.attempts END,
                        last_attempt_at = now(), last_status = v.status, last_error = v.error
                   FROM unnest($1::bigint[], $2::integer[], $3::text[], $4::boolean[]) AS v(id, status, error, dead)
                  WHERE d.id = v.id",
                None,
                &[failed.0.into(), failed.1.into(), failed.2.into(), failed.3.into()],
            )?;
            Ok(())
        })
    })?;
    write_back_hashes(&write_back)?;
    Ok(tally)
}

/// `certyo_record_hash = <hash>, certyo_anchor_status = 'pending'` on the source rows, per table
/// in one statement, unless a newer change of the record is already queued (its own hash will
/// follow). The update names only bookkeeping columns, so it does not fire capture.
fn write_back_hashes(accepted: &[(Entry, String)]) -> SpiResult<()> {
    let mut tables: Vec<Oid> = accepted.iter().map(|(e, _)| e.relid).collect();
    tables.sort_unstable_by_key(|oid| oid.to_u32());
    tables.dedup();
    for relid in tables {
        let rows: Vec<&(Entry, String)> =
            accepted.iter().filter(|(e, _)| e.relid == relid).collect();
        let rows: Vec<(String, String, i64)> = rows
            .iter()
            .map(|(e, h)| (e.record_id.clone(), h.clone(), e.id))
            .collect();
        in_transaction(move || write_back_table(relid, &rows))?;
    }
    Ok(())
}

fn write_back_table(relid: Oid, rows: &[(String, String, i64)]) -> SpiResult<()> {
    Spi::connect_mut(|client| {
        // The table as it is now: still there, still tracked, with its record id columns and
        // their types (the record id parts are cast to them, so the key's index is used).
        let target = client.select(
            "SELECT format('%I.%I', n.nspname, c.relname),
                    certyo.capture_option(t.tgargs, 'record_id'),
                    ARRAY(SELECT format_type(a.atttypid, a.atttypmod)
                            FROM unnest(certyo.capture_option(t.tgargs, 'record_id')) WITH ORDINALITY AS k(name, n)
                            JOIN pg_attribute a ON a.attrelid = c.oid AND a.attname = k.name AND NOT a.attisdropped
                           ORDER BY k.n)
               FROM pg_class c
               JOIN pg_namespace n ON n.oid = c.relnamespace
               JOIN pg_trigger t ON t.tgrelid = c.oid AND t.tgname = 'certyo_capture'
              WHERE c.oid = $1
                AND EXISTS (SELECT FROM pg_attribute a WHERE a.attrelid = c.oid AND a.attname = 'certyo_record_hash' AND NOT a.attisdropped)",
            None,
            &[relid.into()],
        )?;
        let Some(target) = target.into_iter().next() else {
            return Ok(());
        };
        let (Some(table), Some(columns), Some(types)) = (
            target.get::<String>(1)?,
            target.get::<Vec<String>>(2)?,
            target.get::<Vec<String>>(3)?,
        ) else {
            return Ok(());
        };
        if types.len() != columns.len() {
            return Ok(()); // a record id column is gone: nothing can be matched
        }
        let mut parts: Vec<Vec<String>> = vec![Vec::new(); columns.len()];
        let (mut hashes, mut ids, mut record_ids) = (Vec::new(), Vec::new(), Vec::new());
        for (record_id, hash, id) in rows {
            let Some(split) = split_record_id(record_id, columns.len()) else {
                continue;
            };
            for (column, value) in parts.iter_mut().zip(split) {
                column.push(value);
            }
            hashes.push(hash.clone());
            ids.push(*id);
            record_ids.push(record_id.clone());
        }
        let n = columns.len();
        let unnest: Vec<String> = (1..=n).map(|i| format!("${i}::text[]")).collect();
        let names: Vec<String> = (1..=n).map(|i| format!("k{i}")).collect();
        let matches: Vec<String> = columns
            .iter()
            .enumerate()
            .map(|(i, c)| {
                format!(
                    "t.{} = v.k{}::{}",
                    crate::track::quote_ident(c),
                    i + 1,
                    types[i]
                )
            })
            .collect();
        let sql = format!(
            "UPDATE {table} AS t SET certyo_record_hash = v.hash, certyo_anchor_status = 'pending'
               FROM unnest({unnest}, ${h}::text[], ${q}::bigint[], ${r}::text[]) AS v({names}, hash, qid, rid)
              WHERE {matches}
                AND NOT EXISTS (SELECT FROM certyo.delivery n WHERE n.relid = ${rel} AND n.record_id = v.rid AND n.id > v.qid)",
            unnest = unnest.join(", "),
            names = names.join(", "),
            matches = matches.join(" AND "),
            h = n + 1,
            q = n + 2,
            r = n + 3,
            rel = n + 4,
        );
        let mut args: Vec<pgrx::datum::DatumWithOid> = parts.into_iter().map(Into::into).collect();
        args.push(hashes.into());
        args.push(ids.into());
        args.push(record_ids.into());
        args.push(relid.into());
        client.update(sql.as_str(), None, &args)?;
        Ok(())
    })
}

/// The parts of a record id: one column's text, or `\`-escaped parts joined by `/`.
pub fn split_record_id(record_id: &str, parts: usize) -> Option<Vec<String>> {
    if parts == 1 {
        return Some(vec![record_id.to_string()]);
    }
    let mut out = vec![String::new()];
    let mut chars = record_id.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => out.last_mut()?.push(chars.next()?),
            '/' => out.push(String::new()),
            c => out.last_mut()?.push(c),
        }
    }
    (out.len() == parts).then_some(out)
}

/// Remove accepted entries older than the retention, a bounded number per call.
pub fn expire(retention: Duration) -> SpiResult<()> {
    in_transaction(move || {
        Spi::run_with_args(
            "DELETE FROM certyo.delivery
              WHERE ctid = ANY (ARRAY(SELECT ctid FROM certyo.delivery
                                       WHERE state = 'accepted' AND accepted_at < now() - $1 * interval '1 s'
                                       LIMIT 5000))",
            &[(retention.as_secs() as i64).into()],
        )
    })
}

/// How long until the earliest pending entry is due (None: nothing pending).
pub fn next_due() -> SpiResult<Option<Duration>> {
    in_transaction(|| {
        let ms = Spi::get_one::<i64>(
            "SELECT greatest(0, (extract(epoch FROM min(next_attempt_at) - now()) * 1000))::bigint
               FROM certyo.delivery WHERE state = 'pending' AND next_attempt_at > now()",
        )?;
        Ok(ms.map(|ms| Duration::from_millis(ms as u64)))
    })
}

/// Publish the worker's state for `certyo.worker_status()`.
pub fn set_state(state: &str, detail: &str, error: Option<&str>, tally: Tally) -> SpiResult<()> {
    let (state, detail, error) = (
        state.to_string(),
        detail.to_string(),
        error.map(str::to_string),
    );
    in_transaction(move || {
        Spi::run_with_args(
            "INSERT INTO certyo.worker_state AS w (singleton, pid, started_at, state, detail, last_error, last_error_at,
                                                   last_delivery_at, sent, accepted, replayed, failed, updated_at)
             VALUES (true, pg_backend_pid(), now(), $1, $2, $3, CASE WHEN $3 IS NOT NULL THEN now() END,
                     CASE WHEN $5 > 0 THEN now() END, $4, $5, $6, $7, now())
             ON CONFLICT (singleton) DO UPDATE SET
                 started_at = CASE WHEN w.pid IS DISTINCT FROM pg_backend_pid() THEN now() ELSE w.started_at END,
                 sent = CASE WHEN w.pid IS DISTINCT FROM pg_backend_pid() THEN 0 ELSE w.sent END + $4,
                 accepted = CASE WHEN w.pid IS DISTINCT FROM pg_backend_pid() THEN 0 ELSE w.accepted END + $5,
                 replayed = CASE WHEN w.pid IS DISTINCT FROM pg_backend_pid() THEN 0 ELSE w.replayed END + $6,
                 failed = CASE WHEN w.pid IS DISTINCT FROM pg_backend_pid() THEN 0 ELSE w.failed END + $7,
                 pid = pg_backend_pid(), state = $1, detail = $2,
                 last_error = coalesce($3, w.last_error),
                 last_error_at = CASE WHEN $3 IS NOT NULL THEN now() ELSE w.last_error_at END,
                 last_delivery_at = CASE WHEN $5 > 0 THEN now() ELSE w.last_delivery_at END,
                 updated_at = now()",
            &[state.into(), detail.into(), error.into(), tally.sent.into(), tally.accepted.into(), tally.replayed.into(), tally.failed.into()],
        )
    })
}

#[cfg(test)]
mod tests {
    use super::split_record_id;

    #[test]
    fn record_ids_split_back_into_their_parts() {
        assert_eq!(split_record_id("42", 1), Some(vec!["42".to_string()]));
        assert_eq!(
            split_record_id(r"EU\/West/A\\1", 2),
            Some(vec!["EU/West".to_string(), r"A\1".to_string()])
        );
        assert_eq!(split_record_id("a/b/c", 2), None);
    }
}
