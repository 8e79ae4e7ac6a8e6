//! `certyo.audit(rel)`: the tamper audit. For each row of a tracked table, render its business
//! payload exactly as capture does, hash it, and compare with the newest version captured for
//! that record (the receipt keeps the SHA-256 of the payload Certyo accepted). Rows changed or
//! deleted behind capture's back (triggers disabled, `session_replication_role = replica`, an
//! old backup restored) show up; a clean table returns nothing.

use crate::capture::options::{CaptureOptions, WriteBack};
use crate::capture::plan::{Column, TablePlan};
use crate::capture::record::Row;
use crate::capture::scan::{each_row, Snapshot};
use crate::capture::value::ValuePlan;
use crate::error::{CertyoError, OrRaise, Result};
use crate::shape::{self, Shape};
use certyo::{column_digest, column_sha256, payload_columns, payload_sha256, COLUMN_DIGEST_LEN};
use pgrx::datum::TimestampWithTimeZone;
use pgrx::pg_sys::Oid;
use pgrx::prelude::*;
use pgrx::PgSqlErrorCode;
use std::collections::{HashMap, HashSet};

/// A row's own newest version, as a [`Fallback`] settles with it.
struct Own {
    id: i64,
    /// A new row's first version.
    inserted: bool,
    /// Of the present key's columns the values it holds (their digests), if it holds them.
    values: Option<Vec<u8>>,
}

impl Own {
    /// Whether the row was inserted after `version` (it continues no record of before).
    fn inserted_after(&self, version: i64) -> bool {
        self.inserted && self.id > version
    }
}

/// A row whose record under an earlier key is settled after the scan (see `examine`).
struct Fallback {
    /// The row's record id now.
    record_id_now: String,
    /// That record: its era and record id.
    record: (Era, String),
    payload: Vec<u8>,
    /// The row's own version since, if it has one.
    own: Option<Own>,
    /// What its bookkeeping columns claim, if anything ([`unbacked_claim`]).
    claim: Option<&'static str>,
}

/// A captured version of one record: queued, being delivered, or accepted.
struct Version {
    id: i64,
    sha256: String,
    /// Its columns' digests (`certyo::column_sha256`), when known.
    digests: Option<Vec<u8>>,
    accepted: bool,
    deleted: bool,
    /// A new row's first version (`insert`): it continues no other record.
    inserted: bool,
    /// The newest insert of its record up to it (a row that took the record id then).
    last_insert: Option<i64>,
}

/// The last accepted version of one record, for the report and the bookkeeping check.
struct Accepted {
    id: i64,
    at: Option<TimestampWithTimeZone>,
    record_hash: Option<String>,
    /// Certyo confirmed its content (under its receipt or an earlier one with its hash).
    anchored: bool,
    /// Certyo reported another hash for it.
    mismatched: bool,
    /// Certyo confirmed this version itself (its own receipt says `anchored`).
    settled_itself: bool,
    /// Its columns' digests (`certyo::column_sha256`), when known.
    digests: Option<Vec<u8>>,
    written_back: bool,
}

/// A row's `certyo_record_hash` and `certyo_anchor_status`.
type Written = (Option<String>, Option<String>);

/// record_id (NULL for a finding about the table), problem, last_accepted_at,
/// last_record_hash, changed_at, detail.
type Finding = (
    Option<String>,
    String,
    Option<TimestampWithTimeZone>,
    Option<String>,
    Option<TimestampWithTimeZone>,
    Option<String>,
);

// pgrx takes the result's column names from the signature, so the type is spelled out.
#[allow(clippy::type_complexity)]
#[pg_extern(sql = false)]
fn audit(
    rel: Oid,
) -> TableIterator<
    'static,
    (
        name!(record_id, Option<String>),
        name!(problem, String),
        name!(last_accepted_at, Option<TimestampWithTimeZone>),
        name!(last_record_hash, Option<String>),
        name!(changed_at, Option<TimestampWithTimeZone>),
        name!(detail, Option<String>),
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
    // A library newer than the extension's SQL: the receipts lack what the audit compares.
    if !crate::shape::schema_has(c"receipt", Some(c"column_sha256")) {
        return Err(CertyoError::new(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "certyo_cdc: the extension's SQL is older than its library, and audit() needs the newer catalog",
        )
        .hint("ALTER EXTENSION certyo_cdc UPDATE, then audit again."));
    }
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
    Ok(examine(relid, &options)?.findings)
}

/// What an examination of a table against its versions found.
struct Examination {
    findings: Vec<Finding>,
    /// Records whose newest version is not a delete and that have no row: (record id, version).
    gone: Vec<(String, i64)>,
    /// Records under an earlier record key whose row no longer holds the values of the
    /// present key's columns they held (changed without capture): (record id, version).
    superseded: Vec<(String, i64)>,
}

/// Which key a record id was made under: an index into the distinct record keys (attribute
/// numbers of the tracked table) the table's shapes have had.
type Era = usize;

fn examine(relid: Oid, options: &CaptureOptions) -> Result<Examination> {
    let shapes = shape::history(relid)?;
    let (now, _) = shape::current(relid, options)?;
    let columns_now = columns_now(relid)?;
    // The record keys the table has had; versions from before any shape was recorded were
    // captured under the present one.
    let mut eras: Vec<Option<Vec<i16>>> = vec![now.key_attnums()];
    let mut era_of_shape = Vec::with_capacity(shapes.len());
    for s in &shapes {
        let key = s.key_attnums();
        let era = match eras.iter().position(|k| *k == key) {
            Some(e) => e,
            None => {
                eras.push(key);
                eras.len() - 1
            }
        };
        era_of_shape.push(era);
    }
    let shape_of = |id: i64| -> Option<usize> {
        let after = shapes.partition_point(|s| s.since_id < id);
        after.checked_sub(1)
    };
    let era_of = |id: i64| shape_of(id).map_or(0, |i| era_of_shape[i]);
    let mut known: HashMap<(Era, String), Version> = HashMap::new();
    let boundaries: Vec<i64> = shapes
        .windows(2)
        .filter(|w| w[0].key_attnums() != w[1].key_attnums())
        .map(|w| w[1].since_id)
        .collect();
    // A row's values of the columns of each record key the table has had, as each version
    // captured them (the digests of those columns; each version's own shape says where they
    // are). A record without a row went on under another key if a later version captured under
    // that key is of the row holding the same values of that key's columns as the record's
    // last version held (its record id under that key): deleted or changed there with capture,
    // it is no record "deleted without capture". Not a later insert: that is a new row, which
    // continues no record. Nor a later version that merely took the record's old key values
    // (another row, changed to them): it is matched under its own key, not the old one.
    let key_values = |version: &Version, era: usize| -> Option<Vec<u8>> {
        let key = eras[era].as_ref()?;
        let shape = shape_of(version.id).map_or(&now, |i| &shapes[i]);
        let digests = version.digests.as_ref()?;
        if digests.len() != shape.columns.len() * COLUMN_DIGEST_LEN {
            return None;
        }
        let mut out = Vec::with_capacity(key.len() * COLUMN_DIGEST_LEN);
        for attnum in key {
            let i = shape.attnums.iter().position(|a| a == attnum)?;
            out.extend_from_slice(&digests[i * COLUMN_DIGEST_LEN..(i + 1) * COLUMN_DIGEST_LEN]);
        }
        Some(out)
    };
    // Whether a version held, of the present key's columns it was captured with, the values a
    // row renders to now (`payload`): `Some(true)` also where it held none of them (nothing to
    // tell by); `None` where a key column was retyped since (its values render otherwise).
    let holds_present_key = |version: &Version, payload: &[u8]| -> Option<bool> {
        let Some(key) = eras[0].as_ref() else {
            return Some(true);
        };
        let shape = shape_of(version.id).map_or(&now, |i| &shapes[i]);
        let Some(digests) = version
            .digests
            .as_ref()
            .filter(|d| d.len() == shape.columns.len() * COLUMN_DIGEST_LEN)
        else {
            return Some(true);
        };
        let Some(values) = std::str::from_utf8(payload).ok().and_then(payload_columns) else {
            return Some(true);
        };
        let values: HashMap<String, &str> = values.into_iter().collect();
        let mut holds = Some(true);
        for attnum in key {
            let Some(i) = shape.attnums.iter().position(|a| a == attnum) else {
                continue; // not a column then
            };
            let Some((name, type_now)) = columns_now.get(attnum) else {
                continue;
            };
            let Some(value) = values.get(name) else {
                continue;
            };
            if shape.types.get(i) != Some(type_now) {
                holds = None; // retyped since: nothing to tell by, unless another column differs
            } else if column_digest(&shape.columns[i], value)
                != digests[i * COLUMN_DIGEST_LEN..(i + 1) * COLUMN_DIGEST_LEN]
            {
                return Some(false);
            }
        }
        holds
    };
    // Per era and key values, the newest version that is not an insert, with the newest insert
    // of its record before it: the row that held those values went on (was changed or deleted
    // through capture) after a version of another record if no row took the values between.
    let mut went_on: HashMap<(usize, Vec<u8>), (i64, Option<i64>)> = HashMap::new();
    for (record_id, version) in newest_versions(relid, boundaries)? {
        // Under its own record key: the row it is a version of is the one with those values.
        let era = era_of(version.id);
        if let Some(values) = key_values(&version, era).filter(|_| !version.inserted) {
            let newest = went_on
                .entry((era, values))
                .or_insert((version.id, version.last_insert));
            if newest.0 < version.id {
                *newest = (version.id, version.last_insert);
            }
        }
        let key = (era_of(version.id), record_id);
        if known.get(&key).is_none_or(|k| k.id < version.id) {
            known.insert(key, version);
        }
    }
    // Whether a record of era `era` went on under another record id (a later version of the row
    // that held its values of that other key's columns).
    let went_on_elsewhere = |version: &Version, era: usize| -> bool {
        (0..eras.len()).filter(|&k| k != era).any(|k| {
            key_values(version, k)
                .and_then(|values| went_on.get(&(k, values)))
                .is_some_and(|&(newer, inserted)| {
                    newer > version.id && inserted.is_none_or(|i| i < version.id)
                })
        })
    };
    let accepted = last_accepted(relid, None)?;
    let removed = removed_untracked(relid)?;
    let report = |record_id: String, problem: &str, detail: Option<String>| -> Finding {
        let last = accepted.get(&record_id);
        (
            Some(record_id),
            problem.to_string(),
            last.and_then(|a| a.at),
            last.and_then(|a| a.record_hash.clone()),
            None,
            detail,
        )
    };
    let plan_columns: HashSet<String> = now.columns.iter().cloned().collect();
    let excluded = excluded_key_columns(relid, &eras, &plan_columns, &columns_now);
    let mut found = Vec::new();
    // Rows with no version under any key the table has had (see "never captured" below).
    // With what the row's bookkeeping columns claim (nothing wrote them: no version).
    let mut uncaptured: Vec<(String, Option<&'static str>)> = Vec::new();
    // Shapes some row was last captured under, older than the present one.
    let mut stale: std::collections::BTreeSet<usize> = Default::default();
    let mut suspects: Vec<(String, i64, Written)> = Vec::new();
    // Rows whose version was not accepted when the receipts were read, but which say something.
    // With the row's payload.
    let mut unaccepted: Vec<(String, i64, Written, Vec<u8>)> = Vec::new();
    // A record of an earlier key that a row holds by that key's values (its record id under it),
    // but whose last version held other values of the present key's columns, and that went on
    // nowhere else: the row's, whose key column changed without capture (while untracked, say),
    // or a row's that went, whose old key values this one took. Settled after the scan, so that
    // a row holding the record's present key values too wins.
    let mut fallbacks: Vec<Fallback> = Vec::new();
    let mut superseded: Vec<(String, i64)> = Vec::new();
    // Per earlier era, the records whose last version held given values of the present key's
    // columns: the rows' earlier records, where those values stayed.
    let mut held: HashMap<(Era, Vec<u8>), Vec<String>> = HashMap::new();
    // (A record whose last version is a delete held nothing since.)
    for ((era, record_id), version) in known
        .iter()
        .filter(|((era, _), version)| *era != 0 && !version.deleted)
    {
        if let Some(values) = key_values(version, 0) {
            held.entry((*era, values))
                .or_default()
                .push(record_id.clone());
        }
    }
    each_row(
        relid,
        options,
        Snapshot::Transaction,
        |plan, row, change| {
            let record_id_now = String::from_utf8_lossy(&change.record_id).into_owned();
            // SAFETY: the positions of text columns of the row's relation (`TablePlan`).
            let written = unsafe {
                (
                    plan.written_back.record_hash.and_then(|i| row.text(i)),
                    plan.written_back.anchor_status.and_then(|i| row.text(i)),
                )
            };
            // What the row claims where no accepted version backs a claim.
            let claim = unbacked_claim(&written, options.write_back);
            // The row's newest version under any key the table has had (its record id under
            // each); every other version of it under those keys is its too, not a deleted one.
            let mut newest: Option<(String, Version)> = None;
            let mut fallback: Option<(Era, String)> = None;
            for (era, key) in eras.iter().enumerate() {
                let record_id = if era == 0 {
                    Some(record_id_now.clone())
                } else {
                    key.as_ref()
                        .and_then(|key| record_id_under(plan, row, key, &columns_now, &excluded))
                };
                let Some(record_id) = record_id else { continue };
                // Under an earlier key, the record is this row's only if its last version held
                // the row's present key values too, where it held those columns: else it was
                // another row, whose old key values this one took (changed to them), and that
                // row's fate is the record's own (gone, or found under the present key). Where a
                // key column was retyped since, that cannot be told: the record is the row's.
                if era != 0
                    && known
                        .get(&(era, record_id.clone()))
                        .is_some_and(|v| holds_present_key(v, &change.payload) == Some(false))
                {
                    let v = &known[&(era, record_id.clone())];
                    // (One found removed while untracked is judged as such: as gone.)
                    if !v.deleted && !went_on_elsewhere(v, era) && !removed.contains_key(&v.id) {
                        fallback = Some((era, record_id));
                    }
                    continue;
                }
                if let Some(version) = known.remove(&(era, record_id.clone())) {
                    if newest.as_ref().is_none_or(|(_, n)| n.id < version.id) {
                        newest = Some((record_id, version));
                    }
                }
            }
            if let Some(fallback) = fallback {
                // Compared with that record after the scan, whether or not the row has a
                // version of its own since: the record was captured with other values of the
                // key's columns, which changed without capture (or its row was deleted without
                // capture and this one took its old key values), and no capture of this row
                // under another record id tells which.
                fallbacks.push(Fallback {
                    record_id_now: record_id_now.clone(),
                    record: fallback,
                    payload: change.payload.clone(),
                    own: newest.as_ref().map(|(_, v)| Own {
                        id: v.id,
                        inserted: v.inserted,
                        values: key_values(v, 0),
                    }),
                    claim,
                });
            } else if newest.is_none() {
                uncaptured.push((record_id_now, claim));
                return Ok(());
            }
            let Some((record_id, version)) = newest else {
                return Ok(());
            };
            if version.deleted {
                found.push(report(record_id, "changed without capture", None));
                return Ok(());
            }
            if version.sha256 != payload_sha256(&change.payload) {
                // Captured before a schema change: compare the columns it was captured with.
                let shape = shape_of(version.id).filter(|&i| !shapes[i].same(&now));
                let Some(shape) = shape else {
                    found.push(report(record_id, "changed without capture", None));
                    return Ok(());
                };
                match differing_columns(
                    &shapes[shape],
                    version.digests.as_ref(),
                    &change.payload,
                    &columns_now,
                ) {
                    Some(differ) if differ.is_empty() => {
                        stale.insert(shape);
                    }
                    Some(differ) => {
                        found.push(report(
                            record_id,
                            "changed without capture",
                            Some(format!("differs in {}", differ.join(", "))),
                        ));
                        return Ok(());
                    }
                    None => {
                        found.push(report(
                            record_id,
                            "changed without capture",
                            Some("captured before a schema change, without the digests of its columns: compared as a whole".to_string()),
                        ));
                        return Ok(());
                    }
                }
            } else if let Some(shape) = shape_of(version.id).filter(|&i| !shapes[i].same(&now)) {
                stale.insert(shape);
            }
            if !version.accepted {
                // Nothing is written to a row before its version is accepted: what it says
                // was written otherwise (unless the acceptance committed since: read again).
                if claim.is_some() {
                    unaccepted.push((record_id, version.id, written, change.payload.clone()));
                } else {
                    found.push(report(record_id, "not yet accepted", None));
                }
                return Ok(());
            }
            let last = accepted.get(&record_id).filter(|a| a.id == version.id);
            if last.is_some_and(|last| {
                forged_bookkeeping(last, &written, options.write_back).is_some()
            }) {
                suspects.push((record_id, version.id, written));
            }
            Ok(())
        },
    )?;
    // The receipts were read before the rows: a write-back that committed in between (it
    // commits with its receipts) makes a row look ahead of them. Read again, after the rows.
    let ids: Vec<String> = suspects
        .iter()
        .map(|(id, _, _)| id)
        .chain(unaccepted.iter().map(|(id, _, _, _)| id))
        .cloned()
        .collect();
    let again = if ids.is_empty() {
        HashMap::new()
    } else {
        last_accepted(relid, Some(ids))?
    };
    for (record_id, version, written, payload) in unaccepted {
        let last = again.get(&record_id);
        // An accepted version of its record whose content the row still holds (this one,
        // accepted meanwhile, or an earlier one whose marks the row keeps while a backfill's
        // image of it waits): the row is judged as any accepted version's row is. Content
        // changed since that version (its marks cleared then), the row claims nothing.
        let holds = |last: &&Accepted| {
            last.id == version
                || differing_columns(
                    shape_of(last.id).map_or(&now, |i| &shapes[i]),
                    last.digests.as_ref(),
                    &payload,
                    &columns_now,
                )
                .is_none_or(|differ| differ.is_empty())
        };
        let problem = match last.filter(holds) {
            Some(last) => forged_bookkeeping(last, &written, options.write_back),
            None => unbacked_claim(&written, options.write_back),
        };
        match problem {
            Some(problem) => found.push(report(record_id, problem, None)),
            None if last.is_none_or(|last| last.id != version) => {
                found.push(report(record_id, "not yet accepted", None))
            }
            None => {}
        }
    }
    for (record_id, version, written) in suspects {
        let last = again.get(&record_id).filter(|a| a.id == version);
        if let Some(problem) =
            last.and_then(|last| forged_bookkeeping(last, &written, options.write_back))
        {
            found.push(report(record_id, problem, None));
        }
    }
    for Fallback {
        record_id_now,
        record,
        payload,
        own,
        claim,
    } in fallbacks
    {
        match (known.remove(&record), own) {
            (None, Some(_)) => {} // another row's; this one has its own version
            (None, None) => uncaptured.push((record_id_now, claim)),
            // Captured again since, under its present record id: the record is its earlier
            // one (a change without capture of its key columns, then a capture of it all, is
            // forgiven as any change is), unless another record of that key held the values
            // the row's own version holds: that one is the row's (it went on), and this one a
            // row's that went (back to be judged as gone).
            // So too when the row's own version is a new row's insert after the record's: a row
            // inserted since is none of the record's.
            (Some(version), Some(own)) => {
                let another = own
                    .values
                    .as_ref()
                    .and_then(|values| held.get(&(record.0, values.clone())))
                    .is_some_and(|ids| ids.iter().any(|id| *id != record.1));
                if another || own.inserted_after(version.id) {
                    known.insert(record, version);
                } else {
                    superseded.push((record.1, version.id));
                }
            }
            (Some(version), None) => {
                superseded.push((record.1.clone(), version.id));
                let differ = shape_of(version.id)
                    .and_then(|i| {
                        differing_columns(
                            &shapes[i],
                            version.digests.as_ref(),
                            &payload,
                            &columns_now,
                        )
                    })
                    .filter(|d| !d.is_empty())
                    .map(|d| format!("differs in {}", d.join(", ")));
                found.push(report(record.1, "changed without capture", differ));
            }
        }
    }
    // Records without a row. Under a record key whose columns are gone, a row cannot be told
    // from its versions: those are left to the schema change's finding.
    let mut gone: Vec<(String, i64)> = Vec::new();
    let mut unfindable = 0usize;
    for ((era, record_id), version) in known {
        if version.deleted {
            continue;
        }
        let findable = eras[era]
            .as_ref()
            .is_some_and(|key| key.iter().all(|a| columns_now.contains_key(a)));
        if !findable {
            if let Some(shape) = shape_of(version.id) {
                stale.insert(shape);
            }
            unfindable += 1;
            continue;
        }
        if went_on_elsewhere(&version, era) {
            continue; // went on under another record id
        }
        gone.push((record_id, version.id));
    }
    // A row without a version may be one of those captured under a record key whose columns
    // are gone (no key finds them now): while there are no more such rows than such versions,
    // they are the schema change's finding; more, and each is reported, saying so.
    if uncaptured.len() > unfindable {
        let detail = (unfindable > 0).then(|| {
            format!("or one of {unfindable} versions captured under a record key whose columns are gone, which cannot be told apart")
        });
        uncaptured.sort();
        // One that says something was written by hand (or kept from before it was tracked, or
        // written while the table was untracked): a claim no receipt backs.
        found.extend(uncaptured.into_iter().map(|(r, claim)| match claim {
            Some(problem) if unfindable == 0 => {
                report(r, problem, Some("never captured".to_string()))
            }
            Some(_) => report(r, "never captured", detail.clone()),
            None => report(r, "never captured", detail.clone()),
        }));
    }
    gone.sort();
    found.extend(
        gone.iter()
            .filter(|(_, version)| !removed.contains_key(version))
            .map(|(r, _)| report(r.clone(), "deleted without capture", None)),
    );
    // Records whose rows were removed while the table was untracked (the documented way to
    // empty a tracked table): no tampering, but removed without capture all the same, and
    // Certyo's last word on each is not a delete. Said once per track() that found them.
    let mut untracked: std::collections::BTreeMap<i64, (Option<TimestampWithTimeZone>, usize)> =
        Default::default();
    for found_at in gone.iter().filter_map(|(_, version)| removed.get(version)) {
        untracked
            .entry(found_at.micros)
            .or_insert((found_at.at, 0))
            .1 += 1;
    }
    let removals: Vec<Finding> = untracked
        .into_values()
        .map(|(at, count)| {
            (
                None,
                "removed while untracked".to_string(),
                None,
                None,
                at,
                Some(format!(
                    "{count} records whose rows were removed while the table was untracked, found by certyo.track() (certyo.removed_untracked): Certyo's last version of each is not a delete"
                )),
            )
        })
        .collect();
    // Each schema change since the oldest shape a row was last captured under, once.
    let mut changes: Vec<Finding> = Vec::new();
    if let Some(&oldest) = stale.iter().next() {
        for j in oldest + 1..shapes.len() {
            changes.push((
                None,
                "schema changed since capture".to_string(),
                None,
                None,
                shapes[j].recorded_at,
                Some(shape::describe(&shapes[j - 1], &shapes[j])),
            ));
        }
    }
    changes.extend(removals);
    changes.extend(found);
    Ok(Examination {
        findings: changes,
        gone,
        superseded,
    })
}

/// The tracked table's columns now: attribute number to (name, type).
pub(crate) fn columns_now(relid: Oid) -> Result<HashMap<i16, (String, String)>> {
    Ok(Spi::connect(|client| {
        let rows = client.select(
            "SELECT a.attnum, a.attname::text, pg_catalog.format_type(a.atttypid, a.atttypmod)
               FROM pg_catalog.pg_attribute a
              WHERE a.attrelid OPERATOR(pg_catalog.=) $1 AND a.attnum > 0 AND NOT a.attisdropped",
            None,
            &[relid.into()],
        )?;
        let mut columns = HashMap::new();
        for row in rows {
            columns.insert(
                row.get::<i16>(1)?.unwrap_or_default(),
                (
                    row.get::<String>(2)?.unwrap_or_default(),
                    row.get::<String>(3)?.unwrap_or_default(),
                ),
            );
        }
        Ok::<_, pgrx::spi::Error>(columns)
    })?)
}

/// The row's record id under an earlier record key (attribute numbers of the tracked table),
/// rendered as capture rendered it then; None when one of its columns is gone.
fn record_id_under(
    plan: &TablePlan,
    row: &Row,
    key: &[i16],
    columns_now: &HashMap<i16, (String, String)>,
    excluded: &HashMap<i16, Column>,
) -> Option<String> {
    let columns = key
        .iter()
        .map(|a| {
            let (name, _) = columns_now.get(a)?;
            plan.payload
                .iter()
                .find(|c| c.name == *name)
                .or_else(|| excluded.get(a))
        })
        .collect::<Option<Vec<&Column>>>()?;
    // SAFETY: `row` is a row of the relation `plan` was built for, and so are the columns.
    let id = unsafe { plan.record_id_from(row, &columns) }.ok()?;
    Some(String::from_utf8_lossy(&id).into_owned())
}

/// The columns of the earlier record keys that are no payload columns now (excluded since, by
/// `track(..., exclude_columns => ...)`): to find a row's versions captured under such a key,
/// its record id under it is rendered from them. Only of a table that is not partitioned (the
/// rows of a partition are laid out by the partition).
fn excluded_key_columns(
    relid: Oid,
    eras: &[Option<Vec<i16>>],
    plan_columns: &HashSet<String>,
    columns_now: &HashMap<i16, (String, String)>,
) -> HashMap<i16, Column> {
    let mut excluded = HashMap::new();
    // SAFETY: catalog lookups of an open table's attributes.
    unsafe {
        if pgrx::pg_sys::get_rel_relkind(relid) != pgrx::pg_sys::RELKIND_RELATION as i8 {
            return excluded;
        }
        for &attnum in eras.iter().flatten().flatten() {
            let Some((name, _)) = columns_now.get(&attnum) else {
                continue;
            };
            if plan_columns.contains(name) || excluded.contains_key(&attnum) {
                continue;
            }
            let mut typid = pgrx::pg_sys::InvalidOid;
            let mut typmod = 0;
            let mut collation = pgrx::pg_sys::InvalidOid;
            pgrx::pg_sys::get_atttypetypmodcoll(
                relid,
                attnum,
                &mut typid,
                &mut typmod,
                &mut collation,
            );
            let mut len = 0i16;
            let mut byval = false;
            pgrx::pg_sys::get_typlenbyval(typid, &mut len, &mut byval);
            excluded.insert(
                attnum,
                Column {
                    index: (attnum - 1) as usize,
                    name: name.clone(),
                    key: Vec::new(),
                    value: ValuePlan::for_type(typid),
                    len,
                    byval,
                    generated: false,
                },
            );
        }
    }
    excluded
}

/// The columns a row differs in from a version captured with `shape`, compared on the columns
/// that version was captured with and that are still there with the same type (a column
/// dropped or retyped since is the schema change's finding). None when the version's column
/// digests are unknown (a receipt recorded before they were kept) or do not fit its shape.
pub(crate) fn differing_columns(
    shape: &Shape,
    digests: Option<&Vec<u8>>,
    payload: &[u8],
    columns_now: &HashMap<i16, (String, String)>,
) -> Option<Vec<String>> {
    let digests = digests?;
    if digests.len() != shape.columns.len() * COLUMN_DIGEST_LEN {
        return None;
    }
    let rendered = std::str::from_utf8(payload).ok()?;
    let values: HashMap<String, &str> = payload_columns(rendered)?.into_iter().collect();
    let mut differ = Vec::new();
    for (i, name) in shape.columns.iter().enumerate() {
        let Some((name_now, type_now)) = shape.attnums.get(i).and_then(|a| columns_now.get(a))
        else {
            continue; // dropped since
        };
        if shape.types.get(i) != Some(type_now) {
            continue; // retyped since
        }
        let Some(value) = values.get(name_now) else {
            continue; // no longer captured
        };
        let captured = &digests[i * COLUMN_DIGEST_LEN..(i + 1) * COLUMN_DIGEST_LEN];
        if column_digest(name, value) != captured {
            differ.push(format!("\"{}\"", name_now.replace('"', "\"\"")));
        }
    }
    Some(differ)
}

/// When a `track()` found records removed while the table was untracked.
struct Found {
    at: Option<TimestampWithTimeZone>,
    /// `found_at` in microseconds: the `track()` it was.
    micros: i64,
}

/// Records removed while the table was untracked (`certyo.removed_untracked`): their versions,
/// and when `track()` found them.
fn removed_untracked(relid: Oid) -> Result<HashMap<i64, Found>> {
    if !shape::schema_has(c"removed_untracked", None) {
        return Ok(HashMap::new());
    }
    crate::rights::as_superuser(|| {
        Ok(Spi::connect(|client| {
            let rows = client.select(
                "SELECT version_id, found_at, (pg_catalog.date_part('epoch', found_at) * 1000000)::pg_catalog.int8
                   FROM certyo.removed_untracked WHERE relid OPERATOR(pg_catalog.=) $1",
                None,
                &[relid.into()],
            )?;
            let mut removed = HashMap::new();
            for row in rows {
                removed.insert(
                    row.get::<i64>(1)?.unwrap_or_default(),
                    Found {
                        at: row.get::<TimestampWithTimeZone>(2)?,
                        micros: row.get::<i64>(3)?.unwrap_or_default(),
                    },
                );
            }
            Ok::<_, pgrx::spi::Error>(removed)
        })?)
    })
}

/// `certyo.track()` of a table that was untracked: records whose rows were removed meanwhile
/// (the documented way to empty a tracked table is `untrack`, `TRUNCATE`, `track`) are
/// recorded with their newest version, so the audit does not report them as deleted without
/// capture. Returns how many.
pub fn record_removed_while_untracked(relid: Oid, options: &CaptureOptions) -> Result<usize> {
    if !shape::schema_has(c"removed_untracked", None) {
        return Ok(0);
    }
    let has_versions = crate::rights::as_superuser(|| {
        Spi::get_one_with_args::<bool>(
            "SELECT EXISTS (SELECT FROM certyo.receipt WHERE relid OPERATOR(pg_catalog.=) $1)
                 OR EXISTS (SELECT FROM certyo.delivery WHERE relid OPERATOR(pg_catalog.=) $1)
                 OR EXISTS (SELECT FROM certyo.queue WHERE relid OPERATOR(pg_catalog.=) $1)",
            &[relid.into()],
        )
    })?;
    if has_versions != Some(true) {
        return Ok(0);
    }
    // Also the records whose rows took other values of the present key's columns meanwhile:
    // under their record ids, as those of removed rows, the rows are gone.
    let Examination {
        mut gone,
        superseded,
        ..
    } = examine(relid, options)?;
    gone.extend(superseded);
    if gone.is_empty() {
        return Ok(0);
    }
    let (records, versions): (Vec<String>, Vec<i64>) = gone.into_iter().unzip();
    let count = records.len();
    crate::rights::as_superuser(|| {
        Spi::run_with_args(
            "INSERT INTO certyo.removed_untracked (version_id, relid, collection, record_id)
             SELECT v.id, $1, t.collection, v.record_id
               FROM ROWS FROM (pg_catalog.unnest($2::pg_catalog.text[]), pg_catalog.unnest($3::pg_catalog.int8[])) AS v(record_id, id)
               JOIN certyo.tracked_oids() t ON t.relid OPERATOR(pg_catalog.=) $1
             ON CONFLICT (version_id) DO NOTHING",
            &[relid.into(), records.into(), versions.into()],
        )
    })?;
    Ok(count)
}

/// What a row's bookkeeping columns claim where no accepted version of its record backs a claim
/// (it has none: nothing is written to such a row): a hash, or a status other than `'pending'`,
/// the finding that names it.
fn unbacked_claim((hash, status): &Written, mode: WriteBack) -> Option<&'static str> {
    if mode == WriteBack::None {
        None // the worker writes nothing to the rows: any such column is the user's
    } else if hash.is_some() {
        Some("record hash changed without capture")
    } else if status.as_deref().is_some_and(|s| s != "pending") {
        Some("anchor status changed without capture")
    } else {
        None
    }
}

/// What is wrong with the written-back columns of a row whose payload is the accepted one:
/// anyone who may UPDATE the table can set them (capture skips such updates by design), so
/// the audit compares them with the receipt. A hash not written back yet (a failing
/// write-back: `written_back` is false) or an anchoring not yet written back is not a finding.
///
/// A receipt not written back leaves the row with an older version's hash and status (or none,
/// after `untrack(drop_columns => true)`): a row marked `anchored` then is a forgery only when
/// it claims this version (its hash), which is not anchored; marked `mismatch` likewise when
/// Certyo never reported another hash for it. A status the worker never writes is a forgery.
///
/// Under `write_back => 'anchored'` nothing is written at acceptance (an earlier version's
/// marks are cleared): until Certyo settles the version the row holds NULL, as after a
/// write-back not done yet.
fn forged_bookkeeping(
    last: &Accepted,
    (hash, status): &Written,
    mode: WriteBack,
) -> Option<&'static str> {
    if mode == WriteBack::None {
        return None; // the worker writes nothing to the rows: any such column is the user's
    }
    // Under 'anchored' the row holds the hash once this version itself is settled: an earlier
    // receipt with the same hash may be anchored without its mark written (skipped, this newer
    // version being taken), and this one's own verification still pending.
    let written_back = last.written_back
        && (mode == WriteBack::Accepted || last.settled_itself || last.mismatched);
    if written_back && *hash != last.record_hash {
        return Some("record hash changed without capture");
    }
    // 'anchored': until Certyo confirms the version, its acceptance cleared the row (done:
    // `written_back`), and nothing puts a hash on it but the confirmation: of this version, or
    // of an earlier one with its hash (the same content), whose hash alone it may hold.
    if mode == WriteBack::Anchored
        && last.written_back
        && !last.mismatched
        && hash.is_some()
        && (!last.anchored || *hash != last.record_hash)
    {
        return Some("record hash changed without capture");
    }
    let claims_this_version = written_back || *hash == last.record_hash;
    let forged = match status.as_deref() {
        None | Some("pending") => false,
        Some("anchored") => claims_this_version && !last.anchored,
        Some("mismatch") => claims_this_version && !last.mismatched,
        Some(_) => true, // never written by the worker
    };
    forged.then_some("anchor status changed without capture")
}

/// Per record id, the newest version captured (queued, being delivered, or accepted) between
/// each two of `boundaries` (the queue ids at which the record key changed, ascending); and
/// where that is an insert, also the newest version before it that is not (a delete, say: its
/// row went on under another record id, and another row took the record id since), each with
/// the newest insert of its record up to it.
fn newest_versions(relid: Oid, boundaries: Vec<i64>) -> Result<Vec<(String, Version)>> {
    crate::rights::as_superuser(|| {
        Ok(Spi::connect(|client| {
            let rows = client.select(
                "SELECT DISTINCT ON (record_id, era, operation = 'insert') record_id, id, accepted, operation = 'delete', sha256, payload, digests,
                        operation = 'insert', last_insert
                   FROM (SELECT *, max(id) FILTER (WHERE operation = 'insert') OVER (PARTITION BY record_id, era ORDER BY id) AS last_insert
                   FROM (SELECT *, (SELECT count(*) FROM pg_catalog.unnest($2::int8[]) b WHERE b < v.id) AS era
                           FROM (SELECT record_id, id, true AS accepted, operation, encode(payload_sha256, 'hex') AS sha256,
                                        NULL::text AS payload, column_sha256 AS digests
                                   FROM certyo.receipt WHERE relid = $1
                                 UNION ALL
                                 SELECT record_id, id, false, operation, NULL, payload::text, NULL
                                   FROM certyo.delivery WHERE relid = $1
                                 UNION ALL
                                 SELECT record_id, id, false, operation, NULL, payload::text, NULL
                                   FROM certyo.queue WHERE relid = $1) AS v
                        ) AS versions) AS numbered
                  ORDER BY record_id, era, operation = 'insert', id DESC",
                None,
                &[relid.into(), boundaries.into()],
            )?;
            let mut versions = Vec::new();
            for row in rows {
                let record_id = row.get::<String>(1)?.unwrap_or_default();
                let payload = row.get::<String>(6)?;
                let (sha256, digests) = match (row.get::<String>(5)?, payload) {
                    (Some(sha256), _) => (sha256, row.get::<Vec<u8>>(7)?),
                    (None, payload) => {
                        let payload = payload.unwrap_or_default();
                        (payload_sha256(payload.as_bytes()), column_sha256(&payload))
                    }
                };
                versions.push((
                    record_id,
                    Version {
                        id: row.get::<i64>(2)?.unwrap_or_default(),
                        sha256,
                        digests,
                        accepted: row.get::<bool>(3)?.unwrap_or(false),
                        deleted: row.get::<bool>(4)?.unwrap_or(false),
                        inserted: row.get::<bool>(8)?.unwrap_or(false),
                        last_insert: row.get::<i64>(9)?,
                    },
                ));
            }
            Ok::<_, pgrx::spi::Error>(versions)
        })?)
    })
}

/// Per record id, its last accepted version; only of the records `only` names, if given.
fn last_accepted(relid: Oid, only: Option<Vec<String>>) -> Result<HashMap<String, Accepted>> {
    crate::rights::as_superuser(|| last_accepted_as_is(relid, only))
}

fn last_accepted_as_is(relid: Oid, only: Option<Vec<String>>) -> Result<HashMap<String, Accepted>> {
    // A version whose write-back was dropped (captured under a record key the table no longer
    // has, see crate::track::identity) never reached its row: as if not written back.
    let written_back = if shape::schema_has(c"receipt", Some(c"write_back_dropped")) {
        "written_back AND write_back_dropped IS NULL AS written_back"
    } else {
        "written_back"
    };
    Ok(Spi::connect(|client| {
        let rows = client.select(&format!(
            // Anchored: Certyo confirmed this content, under this version's receipt or an
            // earlier one with the same hash (a backfill's image of a row already captured).
            "SELECT l.record_id, l.accepted_at, l.record_hash,
                    EXISTS (SELECT FROM certyo.receipt a
                             WHERE a.relid = $1 AND a.record_id = l.record_id
                               AND a.record_hash = l.record_hash AND a.anchor_status = 'anchored'),
                    l.written_back, l.id, l.anchor_status = 'mismatch', l.anchor_status = 'anchored', l.column_sha256
               FROM (SELECT DISTINCT ON (record_id) record_id, accepted_at, record_hash, {written_back}, id, anchor_status, column_sha256
                       FROM certyo.receipt WHERE relid = $1 AND ($2::text[] IS NULL OR record_id = ANY ($2))
                      ORDER BY record_id, id DESC) AS l"),
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
                    id: row.get::<i64>(6)?.unwrap_or_default(),
                    mismatched: row.get::<bool>(7)?.unwrap_or(false),
                    settled_itself: row.get::<bool>(8)?.unwrap_or(false),
                    digests: row.get::<Vec<u8>>(9)?,
                },
            );
        }
        Ok::<_, pgrx::spi::Error>(last)
    })?)
}

#[cfg(test)]
mod tests {
    use super::{forged_bookkeeping, unbacked_claim, Accepted, WriteBack};

    fn receipt(hash: &str, anchored: bool, settled_itself: bool) -> Accepted {
        Accepted {
            id: 2,
            at: None,
            record_hash: Some(hash.to_string()),
            anchored,
            mismatched: false,
            settled_itself,
            written_back: true,
            digests: None,
        }
    }

    fn row(hash: Option<&str>, status: Option<&str>) -> (Option<String>, Option<String>) {
        (hash.map(str::to_string), status.map(str::to_string))
    }

    #[test]
    fn under_anchored_a_row_waits_for_its_own_versions_confirmation() {
        // The newest receipt's own verification is pending; an earlier one with the same hash
        // (the same content: a backfill's image of the row) is anchored, its mark not written.
        let last = receipt("h", true, false);
        let mode = WriteBack::Anchored;
        assert_eq!(forged_bookkeeping(&last, &row(None, None), mode), None);
        assert_eq!(
            forged_bookkeeping(&last, &row(Some("h"), Some("anchored")), mode),
            None
        );
        assert_eq!(
            forged_bookkeeping(&last, &row(Some("other"), Some("anchored")), mode),
            Some("record hash changed without capture")
        );
        // Confirmed itself, the row holds its hash.
        let settled = receipt("h", true, true);
        assert_eq!(
            forged_bookkeeping(&settled, &row(None, None), mode),
            Some("record hash changed without capture")
        );
        assert_eq!(
            forged_bookkeeping(&settled, &row(Some("h"), Some("anchored")), mode),
            None
        );
        // Not confirmed at all: no hash.
        let pending = receipt("h", false, false);
        assert_eq!(
            forged_bookkeeping(&pending, &row(Some("h"), None), mode),
            Some("record hash changed without capture")
        );
    }

    #[test]
    fn a_row_with_no_accepted_version_claims_nothing() {
        for mode in [WriteBack::Anchored, WriteBack::Accepted] {
            assert_eq!(unbacked_claim(&row(None, None), mode), None);
            assert_eq!(unbacked_claim(&row(None, Some("pending")), mode), None);
            assert_eq!(
                unbacked_claim(&row(None, Some("anchored")), mode),
                Some("anchor status changed without capture")
            );
            assert_eq!(
                unbacked_claim(&row(Some("h"), None), mode),
                Some("record hash changed without capture")
            );
        }
        assert_eq!(
            unbacked_claim(&row(Some("h"), Some("anchored")), WriteBack::None),
            None
        );
    }
}
