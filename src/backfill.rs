//! `certyo.backfill(rel, where_clause)`: queue a table's current rows (all, or those matching a
//! condition) as `upsert`s, for tables too large for one transaction. The call only records
//! the request in `certyo.backfills`; the worker performs it one chunk per transaction, in
//! record-key order, remembering the last key it queued, so a crash or restart resumes where it
//! stopped, no transaction holds back vacuum for the whole run, and no writer waits longer than
//! one chunk.
//!
//! Order: a chunk reads its rows `FOR SHARE`. A writer that changed a row first is waited for
//! and its version is the one read (so the backfilled image is the newest, queued after the
//! writer's); a writer that comes later waits for the chunk to commit, and its capture trigger
//! (an AFTER trigger) queues its change after the chunk's. An older image never overtakes a
//! newer change. The same function serves replay: "send these rows again".

use crate::capture::plan::TablePlan;
use crate::capture::queue;
use crate::capture::record::{Operation, Row};
use crate::error::{CertyoError, OrRaise, Result};
use crate::track::key::RecordKey;
use pgrx::bgworkers::BackgroundWorker;
use pgrx::pg_sys::{self, Oid};
use pgrx::prelude::*;
use pgrx::{PgMemoryContexts, PgSqlErrorCode};

/// `certyo.backfill(rel, where_clause)`: validate as the caller, record the request, wake the
/// worker at commit. Returns the backfill's id.
#[pg_extern(sql = false)]
fn backfill(rel: Option<Oid>, where_clause: Option<String>) -> i64 {
    request(rel, where_clause).or_raise()
}

fn request(rel: Option<Oid>, where_clause: Option<String>) -> Result<i64> {
    let relid = rel.ok_or_else(|| {
        CertyoError::new(
            PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED,
            "certyo_cdc: the table to backfill must not be NULL",
        )
        .hint("Pass the table by name, e.g. certyo.backfill('public.products').")
    })?;
    let where_clause = where_clause.filter(|w| !w.trim().is_empty());
    let table = Spi::get_one_with_args::<String>(
        "SELECT CASE WHEN pg_has_role(current_user, c.relowner, 'USAGE') THEN c.oid::regclass::text END
           FROM pg_class c WHERE c.oid = $1",
        &[relid.into()],
    )?;
    let Some(table) = table else {
        return Err(CertyoError::new(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            format!(
                "certyo_cdc: must be owner of table {} to backfill it",
                display(relid)
            ),
        )
        .hint("Ask the table's owner, or a superuser, to call certyo.backfill()."));
    };
    if crate::track::installed_options(relid)?.is_none() {
        return Err(CertyoError::new(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("certyo_cdc: table {table} is not tracked"),
        )
        .hint(format!(
            "Call certyo.track('{table}') first: a backfill queues rows of a tracked table."
        )));
    }
    if let Some(condition) = &where_clause {
        check_condition(&table, condition)?;
    }
    let id = as_superuser(|| {
        Spi::get_one_with_args::<i64>(
            "INSERT INTO certyo.backfills (relid, where_clause, requested_by)
             VALUES ($1, $2, $3) RETURNING id",
            &[
                relid.into(),
                where_clause.clone().into(),
                unsafe { pg_sys::GetUserId() }.into(),
            ],
        )
    })?
    .unwrap_or_default();
    crate::wake::ring_at_commit();
    Ok(id)
}

/// The condition must be one boolean expression over the table, valid now and readable by
/// the caller: it is parsed as such and run once with `LIMIT 0` with the caller's rights.
fn check_condition(table: &str, condition: &str) -> Result<()> {
    let probe = format!("SELECT FROM {table} AS t WHERE ({condition}) LIMIT 0");
    let statements = unsafe {
        let text = std::ffi::CString::new(probe.as_str()).map_err(|_| bad_condition(condition))?;
        let parsed = pg_sys::ffi::pg_guard_ffi_boundary(|| {
            pg_sys::raw_parser(text.as_ptr(), pg_sys::RawParseMode::RAW_PARSE_DEFAULT)
        });
        if parsed.is_null() {
            0
        } else {
            (*parsed).length
        }
    };
    if statements != 1 {
        return Err(bad_condition(condition));
    }
    Spi::run(&probe)?;
    Ok(())
}

fn bad_condition(condition: &str) -> CertyoError {
    CertyoError::new(
        PgSqlErrorCode::ERRCODE_SYNTAX_ERROR,
        format!("certyo_cdc: the backfill condition is not one SQL expression: {condition}"),
    )
    .hint("Pass a WHERE condition without the WHERE keyword, e.g. 'updated_at >= ''2026-01-01''' (columns may be qualified with t.).")
}

fn display(relid: Oid) -> String {
    Spi::get_one_with_args::<String>("SELECT $1::regclass::text", &[relid.into()])
        .ok()
        .flatten()
        .unwrap_or_else(|| relid.to_u32().to_string())
}

/// Run `f` as the bootstrap superuser: writers of `certyo.backfills` have no rights on it.
fn as_superuser<T>(f: impl FnOnce() -> T) -> T {
    as_role(pg_sys::Oid::from(pg_sys::BOOTSTRAP_SUPERUSERID), 0, f)
}

/// Run `f` as `role` with the extra security context flags; an error unwinds through the
/// transaction abort, which restores the previous user.
fn as_role<T>(role: Oid, flags: u32, f: impl FnOnce() -> T) -> T {
    let (mut user, mut context) = (pg_sys::InvalidOid, 0);
    unsafe {
        pg_sys::GetUserIdAndSecContext(&mut user, &mut context);
        pg_sys::SetUserIdAndSecContext(
            role,
            context | (pg_sys::SECURITY_LOCAL_USERID_CHANGE | flags) as i32,
        );
    }
    let result = f();
    unsafe { pg_sys::SetUserIdAndSecContext(user, context) };
    result
}

/// One open backfill, as the worker reads it.
#[derive(Debug, Clone)]
pub struct Job {
    pub id: i64,
    pub relid: Oid,
    pub where_clause: Option<String>,
    pub requested_by: Oid,
    pub last_key: Option<Vec<String>>,
}

/// Worker: queue the next chunk of the oldest open backfill. True when there is more to do.
pub fn step(chunk_size: usize) -> std::result::Result<bool, pgrx::spi::Error> {
    let Some(job) = BackgroundWorker::transaction(next_job)? else {
        return Ok(false);
    };
    let id = job.id;
    let outcome = crate::error::guarded(|| {
        BackgroundWorker::transaction(|| queue_chunk(&job, chunk_size).map_err(|e| e.message))
    });
    if let Err(error) = outcome {
        pgrx::warning!("certyo_cdc: backfill {id} failed: {error}");
        BackgroundWorker::transaction(|| {
            Spi::run_with_args(
                "UPDATE certyo.backfills SET state = 'failed', error = $2, finished_at = now(), updated_at = now()
                  WHERE id = $1",
                &[id.into(), error.into()],
            )
        })?;
    }
    Ok(true)
}

fn next_job() -> std::result::Result<Option<Job>, pgrx::spi::Error> {
    Spi::connect(|client| {
        let rows = client.select(
            "SELECT id, relid, where_clause, requested_by, last_key FROM certyo.backfills
              WHERE state IN ('queued', 'running') ORDER BY id LIMIT 1",
            None,
            &[],
        )?;
        let Some(row) = rows.into_iter().next() else {
            return Ok(None);
        };
        Ok(Some(Job {
            id: row.get::<i64>(1)?.unwrap_or_default(),
            relid: row.get::<Oid>(2)?.unwrap_or(pg_sys::InvalidOid),
            where_clause: row.get::<String>(3)?,
            requested_by: row.get::<Oid>(4)?.unwrap_or(pg_sys::InvalidOid),
            last_key: row.get::<Vec<String>>(5)?,
        }))
    })
}

/// Queue the next `chunk_size` rows of `job` after its last key and record the progress, in
/// the caller's transaction. Returns how many rows were queued.
pub fn queue_chunk(job: &Job, chunk_size: usize) -> Result<i64> {
    let Some(options) = crate::track::installed_options(job.relid)? else {
        return Err(CertyoError::new(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "the table was dropped or is no longer tracked",
        ));
    };
    let key = Spi::connect(|client| RecordKey::of(client, job.relid))?.ok_or_else(|| {
        CertyoError::new(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "the table's record id columns are gone",
        )
    })?;
    let columns = key.columns.join(", ");
    let after = match job.last_key {
        Some(_) => {
            let values: Vec<String> = (1..=key.columns.len())
                .zip(&key.types)
                .map(|(i, ty)| format!("$1[{i}]::{ty}"))
                .collect();
            format!("AND ({columns}) > ({})", values.join(", "))
        }
        None => String::new(),
    };
    let texts: Vec<String> = key.columns.iter().map(|c| format!("{c}::text")).collect();
    let sql = format!(
        "SELECT t, ARRAY[{texts}] FROM {table} AS t WHERE ({condition}) {after}
          ORDER BY {columns} LIMIT {chunk_size} FOR SHARE OF t",
        texts = texts.join(", "),
        table = key.table,
        condition = job.where_clause.as_deref().unwrap_or("true"),
    );
    let last_key = job.last_key.clone().unwrap_or_default();
    // The condition is the requester's: it runs with their rights, restricted as in a
    // security-definer context, never with the worker's.
    let flags = pg_sys::SECURITY_RESTRICTED_OPERATION;
    let (queued, last) = as_role(job.requested_by, flags, || {
        Spi::connect(|client| queue_rows(client, &sql, last_key, job.relid, &options))
    })?;
    let done = (queued as usize) < chunk_size;
    Spi::run_with_args(
        "UPDATE certyo.backfills
            SET state = CASE WHEN $2 THEN 'done' ELSE 'running' END,
                last_key = coalesce($3, last_key), rows_queued = rows_queued + $4, chunks = chunks + 1,
                updated_at = now(), finished_at = CASE WHEN $2 THEN now() END
          WHERE id = $1",
        &[job.id.into(), done.into(), last.into(), queued.into()],
    )?;
    Ok(queued)
}

/// Run the chunk's query and queue each row it returns; returns the count and the last key.
fn queue_rows(
    client: &pgrx::spi::SpiClient<'_>,
    sql: &str,
    last_key: Vec<String>,
    relid: Oid,
    options: &crate::capture::options::CaptureOptions,
) -> Result<(i64, Option<Vec<String>>)> {
    let mut rows = client.select(sql, None, &[last_key.into()])?;
    let mut queued = 0i64;
    let mut last = None;
    unsafe {
        let rel = pg_sys::table_open(relid, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        let plan = TablePlan::build(rel, options);
        let mut per_row = PgMemoryContexts::new("certyo_cdc backfill row");
        let mut outcome: Result<()> = plan.as_ref().map(|_| ()).map_err(Clone::clone);
        while outcome.is_ok() && rows.next().is_some() {
            let (Some(image), Some(key)) =
                (rows.get_datum_by_ordinal(1)?, rows.get::<Vec<String>>(2)?)
            else {
                continue;
            };
            let Ok(plan) = plan.as_ref() else { break };
            outcome = per_row.switch_to(|_| {
                let header =
                    pg_sys::pg_detoast_datum(image.cast_mut_ptr()) as pg_sys::HeapTupleHeader;
                let mut tuple = pg_sys::HeapTupleData {
                    t_len: pgrx::varlena::varsize_any(header.cast()) as u32,
                    t_self: pg_sys::ItemPointerData::default(),
                    t_tableOid: relid,
                    t_data: header,
                };
                let row = Row::deform(&mut tuple, (*rel).rd_att, plan.natts);
                let change = plan.change(Operation::Upsert, &row)?;
                queue::append(relid, &plan.collection, &change).map(|_| ())
            });
            per_row.reset();
            queued += 1;
            last = Some(key);
        }
        pg_sys::table_close(rel, pg_sys::NoLock as pg_sys::LOCKMODE);
        outcome?;
    }
    Ok((queued, last))
}
