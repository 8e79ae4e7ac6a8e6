//! `certyo.audit(rel)`: the tamper audit. For each row of a tracked table, render its business
//! payload exactly as capture does, hash it, and compare with the newest version captured for
//! that record (the receipt keeps the SHA-256 of the payload Certyo accepted). Rows changed or
//! deleted behind capture's back (triggers disabled, `session_replication_role = replica`, an
//! old backup restored) show up; a clean table returns nothing.

use crate::capture::scan::{each_row, Snapshot};
use crate::error::{CertyoError, OrRaise, Result};
use certyo::payload_sha256;
use pgrx::datum::TimestampWithTimeZone;
use pgrx::pg_sys::Oid;
use pgrx::prelude::*;
use pgrx::PgSqlErrorCode;
use std::collections::HashMap;

/// The newest captured version of one record.
struct Known {
    sha256: String,
    accepted: bool,
    deleted: bool,
}

/// The last accepted version of one record, for the report and the bookkeeping check.
struct Accepted {
    at: Option<TimestampWithTimeZone>,
    record_hash: Option<String>,
    /// Certyo confirmed its content (under its receipt or an earlier one with its hash).
    anchored: bool,
    written_back: bool,
}

/// A row's `certyo_record_hash` and `certyo_anchor_status`.
type Written = (Option<String>, Option<String>);

type Finding = (
    String,
    String,
    Option<TimestampWithTimeZone>,
    Option<String>,
);

#[pg_extern(sql = false)]
fn audit(
    rel: Oid,
) -> TableIterator<
    'static,
    (
        name!(record_id, String),
        name!(problem, String),
        name!(last_accepted_at, Option<TimestampWithTimeZone>),
        name!(last_record_hash, Option<String>),
    ),
> {
    TableIterator::new(findings(rel).or_raise())
}

/// The audit reads `certyo_record_hash` and `certyo_anchor_status` as text, to find values
/// the worker never wrote. A column retyped (to `varchar`, say) would be skipped, and a
/// forged status with it: the audit says so instead of reporting a clean table.
fn require_text_bookkeeping(relid: Oid) -> Result<()> {
    let retyped = Spi::get_one_with_args::<String>(
        "SELECT pg_catalog.string_agg(pg_catalog.format('%I is %s', a.attname, pg_catalog.format_type(a.atttypid, a.atttypmod)), ', ')
           FROM pg_catalog.pg_attribute a
          WHERE a.attrelid = $1 AND NOT a.attisdropped
            AND a.attname IN ('certyo_record_hash', 'certyo_anchor_status')
            AND a.atttypid OPERATOR(pg_catalog.<>) 'pg_catalog.text'::pg_catalog.regtype",
        &[relid.into()],
    )?;
    match retyped {
        None => Ok(()),
        Some(columns) => Err(CertyoError::new(
            PgSqlErrorCode::ERRCODE_DATATYPE_MISMATCH,
            format!("certyo_cdc: cannot audit the bookkeeping of this table: {columns}, not text"),
        )
        .detail("The audit compares the hash and anchor status held by each row with what Certyo answered; it reads them only as the text columns certyo.track() added.")
        .hint("Give them back their type, e.g. ALTER TABLE ... ALTER COLUMN certyo_anchor_status TYPE text, then audit again.")),
    }
}

fn findings(relid: Oid) -> Result<Vec<Finding>> {
    // A restored database's rows find their tables first (see certyo.relink_restored()).
    Spi::run("SELECT certyo.relink_restored()")?;
    let Some(options) = crate::track::installed_options(relid)? else {
        return Err(CertyoError::new(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "certyo_cdc: the table is not tracked, so there is nothing to audit it against",
        )
        .hint("certyo.tracked_tables lists the tracked tables."));
    };
    require_text_bookkeeping(relid)?;
    let mut known = newest_versions(relid)?;
    let accepted = last_accepted(relid, None)?;
    let report = |record_id: String, problem: &str| -> Finding {
        let last = accepted.get(&record_id);
        (
            record_id,
            problem.to_string(),
            last.and_then(|a| a.at),
            last.and_then(|a| a.record_hash.clone()),
        )
    };
    let mut found = Vec::new();
    let mut suspects: Vec<(String, Written)> = Vec::new();
    each_row(
        relid,
        &options,
        Snapshot::Transaction,
        |plan, row, change| {
            let record_id = String::from_utf8_lossy(&change.record_id).into_owned();
            let sha256 = payload_sha256(&change.payload);
            let problem = match known.remove(&record_id) {
                None => Some("never captured"),
                Some(k) if k.deleted || k.sha256 != sha256 => Some("changed without capture"),
                Some(k) if !k.accepted => Some("not yet accepted"),
                Some(_) => {
                    // SAFETY: the positions of text columns of the row's relation (`TablePlan`).
                    let written = unsafe {
                        (
                            plan.written_back.record_hash.and_then(|i| row.text(i)),
                            plan.written_back.anchor_status.and_then(|i| row.text(i)),
                        )
                    };
                    let last = accepted.get(&record_id);
                    if last.is_some_and(|last| forged_bookkeeping(last, &written).is_some()) {
                        suspects.push((record_id.clone(), written));
                    }
                    None
                }
            };
            if let Some(problem) = problem {
                found.push(report(record_id, problem));
            }
            Ok(())
        },
    )?;
    // The receipts were read before the rows: a write-back that committed in between (it
    // commits with its receipts) makes a row look ahead of them. Read again, after the rows.
    let ids: Vec<String> = suspects.iter().map(|(id, _)| id.clone()).collect();
    let again = if ids.is_empty() {
        HashMap::new()
    } else {
        last_accepted(relid, Some(ids))?
    };
    for (record_id, written) in suspects {
        let last = again.get(&record_id);
        if let Some(problem) = last.and_then(|last| forged_bookkeeping(last, &written)) {
            found.push(report(record_id, problem));
        }
    }
    let mut gone: Vec<String> = known
        .into_iter()
        .filter(|(_, k)| !k.deleted)
        .map(|(record_id, _)| record_id)
        .collect();
    gone.sort();
    found.extend(
        gone.into_iter()
            .map(|r| report(r, "deleted without capture")),
    );
    Ok(found)
}

/// What is wrong with the written-back columns of a row whose payload is the accepted one:
/// anyone who may UPDATE the table can set them (capture skips such updates by design), so
/// the audit compares them with the receipt. A hash not written back yet (a failing
/// write-back: `written_back` is false) or an anchoring not yet written back is not a finding.
///
/// A receipt not written back leaves the row with an older version's hash and status (or none,
/// after `untrack(drop_columns => true)`): a row marked `anchored` then is a forgery only when
/// it claims this version (its hash), which is not anchored.
fn forged_bookkeeping(last: &Accepted, (hash, status): &Written) -> Option<&'static str> {
    if last.written_back && *hash != last.record_hash {
        return Some("record hash changed without capture");
    }
    let claims_this_version = last.written_back || *hash == last.record_hash;
    if status.as_deref() == Some("anchored") && claims_this_version && !last.anchored {
        return Some("anchor status changed without capture");
    }
    None
}

/// Per record id, the newest version captured: queued, being delivered, or accepted.
fn newest_versions(relid: Oid) -> Result<HashMap<String, Known>> {
    Ok(Spi::connect(|client| {
        let rows = client.select(
            "SELECT DISTINCT ON (record_id) record_id, accepted, operation = 'delete', sha256, payload
               FROM (SELECT record_id, id, true AS accepted, operation, encode(payload_sha256, 'hex') AS sha256,
                            NULL::text AS payload
                       FROM certyo.receipt WHERE relid = $1
                     UNION ALL
                     SELECT record_id, id, false, operation, NULL, payload::text FROM certyo.delivery WHERE relid = $1
                     UNION ALL
                     SELECT record_id, id, false, operation, NULL, payload::text FROM certyo.queue WHERE relid = $1
                    ) AS versions
              ORDER BY record_id, id DESC",
            None,
            &[relid.into()],
        )?;
        let mut known = HashMap::new();
        for row in rows {
            let record_id = row.get::<String>(1)?.unwrap_or_default();
            let sha256 = match row.get::<String>(4)? {
                Some(sha256) => sha256,
                None => payload_sha256(row.get::<String>(5)?.unwrap_or_default().as_bytes()),
            };
            known.insert(
                record_id,
                Known {
                    sha256,
                    accepted: row.get::<bool>(2)?.unwrap_or(false),
                    deleted: row.get::<bool>(3)?.unwrap_or(false),
                },
            );
        }
        Ok::<_, pgrx::spi::Error>(known)
    })?)
}

/// Per record id, its last accepted version; only of the records `only` names, if given.
fn last_accepted(relid: Oid, only: Option<Vec<String>>) -> Result<HashMap<String, Accepted>> {
    Ok(Spi::connect(|client| {
        let rows = client.select(
            // Anchored: Certyo confirmed this content, under this version's receipt or an
            // earlier one with the same hash (a backfill's image of a row already captured).
            "SELECT l.record_id, l.accepted_at, l.record_hash,
                    EXISTS (SELECT FROM certyo.receipt a
                             WHERE a.relid = $1 AND a.record_id = l.record_id
                               AND a.record_hash = l.record_hash AND a.anchor_status = 'anchored'),
                    l.written_back
               FROM (SELECT DISTINCT ON (record_id) record_id, accepted_at, record_hash, written_back
                       FROM certyo.receipt WHERE relid = $1 AND ($2::text[] IS NULL OR record_id = ANY ($2))
                      ORDER BY record_id, id DESC) AS l",
            None,
            &[relid.into(), only.into()],
        )?;
        let mut last = HashMap::new();
        for row in rows {
            last.insert(
                row.get::<String>(1)?.unwrap_or_default(),
                Accepted {
                    at: row.get::<TimestampWithTimeZone>(2)?,
                    record_hash: row.get::<String>(3)?,
                    anchored: row.get::<bool>(4)?.unwrap_or(false),
                    written_back: row.get::<bool>(5)?.unwrap_or(false),
                },
            );
        }
        Ok::<_, pgrx::spi::Error>(last)
    })?)
}
