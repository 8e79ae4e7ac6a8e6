//! Writing Certyo's answers back to the source rows: the record hash after acceptance, the
//! anchor status after verification. Per table, one statement per batch, in the transaction
//! that records the answers; the statements name
//! only bookkeeping columns, so they never fire capture (the trigger is `UPDATE OF` business
//! columns) and never re-queue a row.

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

    /// Which rows may take the mark; `$rel` is the table's oid parameter.
    fn condition(self, rel: usize) -> String {
        let newer_taken = newer_than(rel, "certyo.delivery");
        match self {
            Mark::Accepted => format!("{newer_taken} AND {}", newer_than(rel, "certyo.receipt")),
            Mark::Anchored => format!("t.certyo_record_hash = v.hash AND {newer_taken}"),
            Mark::Mismatch => "t.certyo_record_hash = v.hash".to_string(),
        }
    }
}

/// "No newer change of this record in `table`", as a scalar subquery rather than `NOT EXISTS`:
/// the planner cannot turn it into a join, so it stays one index probe per row whatever the
/// (often stale) statistics say about how many rows the table has for this relation.
fn newer_than(rel: usize, table: &str) -> String {
    format!(
        "(SELECT n.id FROM {table} n WHERE n.relid = ${rel} AND n.record_id = v.rid AND n.id > v.qid LIMIT 1) IS NULL"
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
        mark_table(client, relid, &rows, mark)?;
    }
    Ok(())
}

fn mark_table(
    client: &mut pgrx::spi::SpiClient<'_>,
    relid: Oid,
    rows: &[Version],
    mark: Mark,
) -> Result<(), pgrx::spi::Error> {
    let Some(key) = RecordKey::of(client, relid)? else {
        return Ok(()); // dropped or untracked meanwhile: nothing to write back to
    };
    let n = key.columns.len();
    let mut parts: Vec<Vec<String>> = vec![Vec::new(); n];
    let (mut hashes, mut ids, mut record_ids) = (Vec::new(), Vec::new(), Vec::new());
    for version in rows {
        let Some(split) = split_record_id(&version.record_id, n) else {
            continue;
        };
        for (column, value) in parts.iter_mut().zip(split) {
            column.push(value);
        }
        hashes.push(version.record_hash.clone());
        ids.push(version.id);
        record_ids.push(version.record_id.clone());
    }
    let unnest: Vec<String> = (1..=n).map(|i| format!("${i}::text[]")).collect();
    let names: Vec<String> = (1..=n).map(|i| format!("k{i}")).collect();
    let sql = format!(
        "UPDATE {table} AS t SET {set}
           FROM unnest({unnest}, ${h}::text[], ${q}::bigint[], ${r}::text[]) AS v({names}, hash, qid, rid)
          WHERE {matches} AND {condition}",
        table = key.table,
        set = mark.set(),
        unnest = unnest.join(", "),
        names = names.join(", "),
        matches = key.matches("t", "v"),
        condition = mark.condition(n + 4),
        h = n + 1,
        q = n + 2,
        r = n + 3,
    );
    let mut args: Vec<DatumWithOid> = parts.into_iter().map(Into::into).collect();
    args.push(hashes.into());
    args.push(ids.into());
    args.push(record_ids.into());
    args.push(relid.into());
    client.update(sql.as_str(), None, &args)?;
    Ok(())
}
