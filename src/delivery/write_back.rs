//! Writing Certyo's answers back to the source rows: the record hash after acceptance, the
//! anchor status after verification. Per table, one statement per batch, in the transaction
//! that records the answers. The statements name only bookkeeping columns, so they never fire
//! capture (the trigger is `UPDATE OF` business columns) and never re-queue a row; they run as
//! the table's owner with `session_replication_role = replica` (see [`crate::rights`]), so the
//! owner's code never runs with the worker's rights and ordinary user triggers do not fire
//! for what is bookkeeping, not a change.

use crate::track::key::{split_record_id, RecordKey};
use pgrx::datum::DatumWithOid;
use pgrx::pg_sys::Oid;

/// One version of one record, as Certyo knows it.
#[derive(Debug, Clone)]
pub struct Version {
    pub relid: Oid,
    pub record_id: String,
    pub record_hash: String,
    /// The queue id of the change: orders versions of a record.
    pub id: i64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    /// Accepted: `certyo_record_hash = <hash>, certyo_anchor_status = 'pending'`, unless a newer
    /// change of the record is already taken or accepted (its own hash follows or came first).
    Accepted,
    /// Verified on chain: `certyo_anchor_status = 'anchored', certyo_verified_at = now()`, only
    /// on a row that still holds this version (its hash) with no newer change waiting.
    Anchored,
    /// Certyo reports another hash: `certyo_anchor_status = 'mismatch'` on a row that still
    /// holds this version.
    Mismatch,
}

impl Mark {
    fn set(self) -> &'static str {
        match self {
            Mark::Accepted => "certyo_record_hash = v.hash, certyo_anchor_status = 'pending'",
            Mark::Anchored => "certyo_anchor_status = 'anchored', certyo_verified_at = now()",
            Mark::Mismatch => "certyo_anchor_status = 'mismatch'",
        }
    }

    /// Which versions may still mark their row, judged from the worker's own tables (`$4` is
    /// the table's oid); None: all of them.
    fn still_current(self) -> Option<String> {
        let newer_taken = newer_than("certyo.delivery");
        match self {
            Mark::Accepted => Some(format!(
                "{newer_taken} AND {}",
                newer_than("certyo.receipt")
            )),
            Mark::Anchored => Some(newer_taken),
            Mark::Mismatch => None,
        }
    }

    /// Which rows may take the mark, judged from the row itself.
    fn row_condition(self) -> &'static str {
        match self {
            Mark::Accepted => "true",
            Mark::Anchored | Mark::Mismatch => "t.certyo_record_hash = v.hash",
        }
    }
}

/// "No newer change of this record in `table`", as a scalar subquery rather than `NOT EXISTS`:
/// the planner cannot turn it into a join, so it stays one index probe per row whatever the
/// (often stale) statistics say about how many rows the table has for this relation.
fn newer_than(table: &str) -> String {
    format!(
        "(SELECT n.id FROM {table} n WHERE n.relid = $4 AND n.record_id = v.rid AND n.id > v.qid LIMIT 1) IS NULL"
    )
}

/// Mark the source rows of `versions`, one statement per table, in the caller's transaction
/// (the one that records the receipts, so rows and receipts commit together).
pub fn mark(
    client: &mut pgrx::spi::SpiClient<'_>,
    versions: &[Version],
    mark: Mark,
) -> Result<(), pgrx::spi::Error> {
    let mut tables: Vec<Oid> = versions.iter().map(|v| v.relid).collect();
    tables.sort_unstable_by_key(|oid| oid.to_u32());
    tables.dedup();
    for relid in tables {
        let rows: Vec<Version> = versions
            .iter()
            .filter(|v| v.relid == relid)
            .cloned()
            .collect();
        // One table's failure (an owner's trigger that raises, a row lock held too long, a key
        // that no longer casts) must not stop the others, nor the receipts of this batch.
        let outcome = crate::error::in_subtransaction(std::panic::AssertUnwindSafe(|| {
            mark_table(client, relid, &rows, mark)
        }));
        match outcome {
            Ok(Ok(())) => {}
            Ok(Err(e)) => report_failure(relid, &e.to_string()),
            Err(e) => report_failure(relid, &e),
        }
    }
    Ok(())
}

thread_local! {
    /// When each table's last write-back failure was logged.
    static REPORTED: std::cell::RefCell<std::collections::HashMap<u32, std::time::Instant>> =
        std::cell::RefCell::new(std::collections::HashMap::new());
}

/// A WARNING per failing table at most once a minute: no storm while it keeps failing.
fn report_failure(relid: Oid, error: &str) {
    let now = std::time::Instant::now();
    let due = REPORTED.with(|reported| {
        let mut reported = reported.borrow_mut();
        let due = reported
            .get(&relid.to_u32())
            .is_none_or(|at| now.duration_since(*at) >= std::time::Duration::from_secs(60));
        if due {
            reported.insert(relid.to_u32(), now);
        }
        due
    });
    if due {
        // SAFETY: a syscache lookup that returns NULL for a table that is gone.
        let name = unsafe { pgrx::pg_sys::get_rel_name(relid) };
        let name = if name.is_null() {
            relid.to_u32().to_string()
        } else {
            unsafe { std::ffi::CStr::from_ptr(name) }
                .to_string_lossy()
                .into_owned()
        };
        pgrx::warning!(
            "certyo_cdc: could not write back to table {name}: {error}; its changes were delivered and their receipts recorded, but its rows keep their previous certyo_* values"
        );
    }
}

/// Two statements: the worker decides from its own tables which versions are still current,
/// then the row update runs as the table's owner (see [`crate::rights`]): it fires the
/// table's index expressions, domain checks and policies, which are the owner's code.
fn mark_table(
    client: &mut pgrx::spi::SpiClient<'_>,
    relid: Oid,
    rows: &[Version],
    mark: Mark,
) -> Result<(), pgrx::spi::Error> {
    let Some(key) = RecordKey::of(client, relid)? else {
        return Ok(()); // dropped or untracked meanwhile: nothing to write back to
    };
    let rows = still_current(client, relid, rows, mark)?;
    let n = key.columns.len();
    let mut parts: Vec<Vec<String>> = vec![Vec::new(); n];
    let mut hashes = Vec::new();
    for (record_id, hash) in rows {
        let Some(split) = split_record_id(&record_id, n) else {
            continue;
        };
        for (column, value) in parts.iter_mut().zip(split) {
            column.push(value);
        }
        hashes.push(hash);
    }
    if hashes.is_empty() {
        return Ok(());
    }
    let unnest: Vec<String> = (1..=n).map(|i| format!("${i}::text[]")).collect();
    let names: Vec<String> = (1..=n).map(|i| format!("k{i}")).collect();
    let sql = format!(
        "UPDATE {table} AS t SET {set}
           FROM unnest({unnest}, ${h}::text[]) AS v({names}, hash)
          WHERE {matches} AND {condition}",
        table = key.table,
        set = mark.set(),
        unnest = unnest.join(", "),
        names = names.join(", "),
        matches = key.matches("t", "v"),
        condition = mark.row_condition(),
        h = n + 1,
    );
    let mut args: Vec<DatumWithOid> = parts.into_iter().map(Into::into).collect();
    args.push(hashes.into());
    crate::rights::writing_back_as(key.owner, || client.update(sql.as_str(), None, &args))?;
    Ok(())
}

/// The (record id, hash) of the versions that may still mark their row.
fn still_current(
    client: &mut pgrx::spi::SpiClient<'_>,
    relid: Oid,
    rows: &[Version],
    mark: Mark,
) -> Result<Vec<(String, String)>, pgrx::spi::Error> {
    let Some(condition) = mark.still_current() else {
        return Ok(rows
            .iter()
            .map(|v| (v.record_id.clone(), v.record_hash.clone()))
            .collect());
    };
    let record_ids: Vec<String> = rows.iter().map(|v| v.record_id.clone()).collect();
    let hashes: Vec<String> = rows.iter().map(|v| v.record_hash.clone()).collect();
    let ids: Vec<i64> = rows.iter().map(|v| v.id).collect();
    let found = client.select(
        &format!(
            "SELECT v.rid, v.hash FROM unnest($1::text[], $2::text[], $3::bigint[]) AS v(rid, hash, qid)
              WHERE {condition}"
        ),
        None,
        &[record_ids.into(), hashes.into(), ids.into(), relid.into()],
    )?;
    let mut current = Vec::new();
    for row in found {
        if let (Some(record_id), Some(hash)) = (row.get::<String>(1)?, row.get::<String>(2)?) {
            current.push((record_id, hash));
        }
    }
    Ok(current)
}
