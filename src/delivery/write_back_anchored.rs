//! The one write-back of a table tracked with `write_back => 'anchored'`: once verification
//! settles a version, its row takes the hash and the status (`anchored`, with
//! `certyo_verified_at`, or `mismatch`) in one UPDATE. Until then the row holds NULL in its
//! bookkeeping columns, so nothing on it says which version it holds: the row may take the
//! mark only if it still holds this version, which the worker knows from its own tables (no
//! change of the record captured after it, queued, being delivered or accepted).
//!
//! That must hold when the row is written, not only when the worker looked: a writer that
//! changes the row between the look and the UPDATE would otherwise have its new content marked
//! with the old hash (the UPDATE re-reads a row changed under it, but its subqueries keep their
//! snapshot). So, in three statements: the rows are locked (as their owner, as the write-back
//! itself runs); then, with a snapshot taken after the locks were granted, the worker keeps
//! the versions of which no newer change exists (every change committed before the lock is in
//! one of its tables by then); then exactly the locked row versions are updated, by their
//! place, which no one else can change while the lock is held. And a locked row takes the mark
//! only while it renders to the content captured for the version (the content guard, see
//! [`super::write_back::render_as_captured`]): a row changed behind capture's back, or whose
//! rendering changed (an enum label renamed), is never marked `anchored` with that hash.

use super::write_back::{
    captured_payloads, read_keys, refuse, render_as_captured, Mark, Marked, Rendered, Version,
    CLEAR, HOLDS_MARKS,
};
use crate::track::key::{split_record_id, RecordKey};
use pgrx::pg_sys::Oid;

type SpiResult<T> = Result<T, pgrx::spi::Error>;

/// Mark the rows that still hold `rows`' versions: `mark` is [`Mark::Anchored`] or
/// [`Mark::Mismatch`] (acceptance writes nothing in this mode).
pub(super) fn mark_settled(
    client: &mut pgrx::spi::SpiClient<'_>,
    relid: Oid,
    key: &RecordKey,
    rows: &[Version],
    mark: Mark,
    timeout: std::time::Duration,
) -> SpiResult<Marked> {
    let (status, verified_at) = match mark {
        Mark::Anchored => ("anchored", "now()"),
        Mark::Mismatch => ("mismatch", "NULL"),
        Mark::Accepted => return Ok(Marked::Done),
    };
    let n = key.columns.len();
    let mut parts: Vec<Vec<String>> = vec![Vec::new(); n];
    let mut versions: Vec<&Version> = Vec::new();
    for version in rows {
        let Some(split) = split_record_id(&version.record_id, n) else {
            continue;
        };
        for (column, value) in parts.iter_mut().zip(split) {
            column.push(value);
        }
        versions.push(version);
    }
    if versions.is_empty() {
        return Ok(Marked::Done);
    }
    let mode = if key.user_code { "origin" } else { "replica" };
    let params: Vec<String> = (1..=n).map(|i| format!("${i}")).collect();
    let names: Vec<String> = (1..=n).map(|i| format!("k{i}")).collect();
    // The rows the versions' keys find, `v` holding each version's key parts and one more
    // array (`extra` of type `extra_type`).
    let keyed = |extra_type: &str, ordinality: &str, extra: &str| {
        format!(
            "{table} AS t, unnest({params}, ${o}::{extra_type}){ordinality} AS v({names}, {extra})
          WHERE {matches} AND {identical}",
            table = key.table,
            params = params.join(", "),
            names = names.join(", "),
            matches = key.matches("t", "v"),
            identical = key.identical("t", "v"),
            o = n + 1,
        )
    };
    let types = key.type_list();
    let lock = format!(
        "/* certyo_cdc write-back lock, {mode} mode, key types {types} */
         SELECT t.tableoid, t.ctid::text, v.ord FROM {} FOR NO KEY UPDATE OF t",
        keyed("int4[]", "", "ord"),
    );
    // The locked rows again, whole (`(t.*)::table`: a bare `t` may be a column of the table),
    // for the content guard: under the lock they are the versions the UPDATE will write.
    let guard = format!(
        "/* certyo_cdc content guard, key types {types} */
         SELECT v.n, t.ctid::text, (t.*)::{table} FROM {keyed}",
        table = key.table,
        keyed = keyed("text[]", " WITH ORDINALITY", "hash, n"),
    );
    let ids: Vec<i64> = versions.iter().map(|v| v.id).collect();
    let captured = captured_payloads(client, &ids)?;
    // 1. The rows, locked as their owner (the key is read as the owner, settings pinned), and
    // which of them render to the content captured for their version.
    let (locked, as_captured, refused) =
        crate::rights::writing_back_as(relid, key.owner, key.user_code, timeout, || {
            let (mut args, kept) = crate::rights::with_pinned_io(|| read_keys(key, &parts));
            if kept.is_empty() {
                return Ok((Vec::new(), Vec::new(), Vec::new()));
            }
            let ords: Vec<i32> = kept.iter().map(|&r| r as i32).collect();
            args.push(ords.into());
            let found = super::prepared::update(client, &lock, &args)?;
            let mut locked = Vec::new();
            for row in found {
                if let (Some(table), Some(place), Some(ord)) = (
                    row.get::<Oid>(1)?,
                    row.get::<String>(2)?,
                    row.get::<i32>(3)?,
                ) {
                    locked.push((table, place, ord as usize));
                }
            }
            let hashes: Vec<String> = kept
                .iter()
                .map(|&r| versions[r].record_hash.clone())
                .collect();
            args.pop(); // the ords: the keys are the guard's too
            args.push(hashes.clone().into());
            let found = super::prepared::select(client, &guard, &args)?;
            let rendered = render_as_captured(relid, found, &hashes, &captured)?;
            let (mut as_captured, mut refused) = (Vec::new(), Vec::new());
            for (position, row) in rendered.into_iter().enumerate() {
                match row {
                    Rendered::AsCaptured(_) => as_captured.push(kept[position]),
                    Rendered::Otherwise(_) => {
                        refused.push((kept[position], hashes[position].clone()))
                    }
                    Rendered::NoRow => {}
                }
            }
            Ok::<_, pgrx::spi::Error>((locked, as_captured, refused))
        })?;
    let watched = match (&key.update_column, key.user_code) {
        (Some(column), true) => format!(", {column} = t.{column}"),
        _ => String::new(),
    };
    if !refused.is_empty() {
        // Whatever marks a refused row holds are not of what it holds now (an earlier
        // version's `anchored` on a row changed while its table was untracked): cleared, on
        // exactly the row versions locked above.
        let refused_ords: std::collections::HashSet<usize> =
            refused.iter().map(|(ord, _)| *ord).collect();
        let (tables, places): (Vec<Oid>, Vec<String>) = locked
            .iter()
            .filter(|(_, _, ord)| refused_ords.contains(ord))
            .map(|(table, place, _)| (*table, place.clone()))
            .unzip();
        let clear = format!(
            "/* certyo_cdc write-back, marks cleared, {mode} mode */
             UPDATE {table} AS t SET {CLEAR}{watched}
               FROM unnest($1::oid[], $2::text[]) AS v(toid, place)
              WHERE t.tableoid = v.toid AND t.ctid = v.place::tid AND {HOLDS_MARKS}",
            table = key.table,
        );
        crate::rights::writing_back_as(relid, key.owner, key.user_code, timeout, || {
            super::prepared::update(client, &clear, &[tables.into(), places.into()]).map(|_| ())
        })?;
        let hashes = refused.into_iter().map(|(_, hash)| hash).collect();
        refuse(client, relid, &ids, hashes)?;
    }
    let locked: Vec<(Oid, String, usize)> = locked
        .into_iter()
        .filter(|(_, _, ord)| as_captured.contains(ord))
        .collect();
    if locked.is_empty() {
        return Ok(Marked::Done);
    }
    // 2. Which of them still hold their version: a statement that may write, so that it takes
    // a snapshot of its own, after the locks above. The queue has no index (capture writes it
    // without one): it is read once for the whole batch (a hashed subplan), not once per
    // version as a correlated NOT EXISTS would be. A version in the queue is any change taken
    // after this one (this one left the queue when it became a receipt).
    let ords: Vec<i32> = locked.iter().map(|l| l.2 as i32).collect();
    let record_ids: Vec<String> = locked
        .iter()
        .map(|l| versions[l.2].record_id.clone())
        .collect();
    let ids: Vec<i64> = locked.iter().map(|l| versions[l.2].id).collect();
    let current = super::prepared::update(
        client,
        "/* certyo_cdc write-back, no newer change */
         SELECT v.ord FROM unnest($1::int4[], $2::text[], $3::int8[]) AS v(ord, rid, qid)
          WHERE v.rid NOT IN (SELECT n.record_id FROM certyo.queue n WHERE n.relid = $4)
            AND (SELECT n.id FROM certyo.delivery n WHERE n.relid = $4 AND n.record_id = v.rid AND n.id > v.qid LIMIT 1) IS NULL
            AND (SELECT n.id FROM certyo.receipt n WHERE n.relid = $4 AND n.record_id = v.rid AND n.id > v.qid LIMIT 1) IS NULL",
        &[ords.into(), record_ids.into(), ids.into(), relid.into()],
    )?;
    let mut still: Vec<usize> = Vec::new();
    for row in current {
        if let Some(ord) = row.get::<i32>(1)? {
            still.push(ord as usize);
        }
    }
    let (mut tables, mut places, mut hashes) = (Vec::new(), Vec::new(), Vec::new());
    for (table, place, ord) in &locked {
        if still.contains(ord) {
            tables.push(*table);
            places.push(place.clone());
            hashes.push(versions[*ord].record_hash.clone());
        }
    }
    if hashes.is_empty() {
        return Ok(Marked::Done);
    }
    // 3. Exactly the row versions locked above. In origin mode one business column is also
    // assigned its own value (`watched`), so that capture checks no owner's trigger changed
    // the row.
    let update = format!(
        "/* certyo_cdc write-back, {status}, {mode} mode */
         UPDATE {table} AS t
            SET certyo_record_hash = v.hash, certyo_anchor_status = '{status}',
                certyo_verified_at = {verified_at}{watched}
           FROM unnest($1::oid[], $2::text[], $3::text[]) AS v(toid, place, hash)
          WHERE t.tableoid = v.toid AND t.ctid = v.place::tid",
        table = key.table,
    );
    crate::rights::writing_back_as(relid, key.owner, key.user_code, timeout, || {
        super::prepared::update(
            client,
            &update,
            &[tables.into(), places.into(), hashes.into()],
        )
        .map(|_| ())
    })?;
    Ok(Marked::Done)
}
