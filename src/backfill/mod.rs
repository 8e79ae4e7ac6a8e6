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
use pgrx::datum::DatumWithOid;
use pgrx::pg_sys::{self, Oid};
use pgrx::prelude::*;
use pgrx::{PgMemoryContexts, PgSqlErrorCode};

mod condition;
pub mod log_limit;

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
    if let Some(condition) = &where_clause {
        if condition.len() > MAX_CONDITION_BYTES {
            return Err(CertyoError::new(
                PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
                format!(
                    "certyo_cdc: the backfill condition is {} bytes long, more than the {MAX_CONDITION_BYTES} allowed",
                    condition.len()
                ),
            )
            .detail("The worker plans the condition in every chunk, and PostgreSQL's planner cannot be interrupted while it works through a very large expression.")
            .hint("Backfill in several requests with shorter conditions, or put the selection in a table and use EXISTS (SELECT FROM that_table x WHERE x.id = t.id)."));
        }
    }
    // The caller's search_path resolves the names in their condition, and nothing else: the
    // extension's own statements here run with it pinned.
    let table = crate::rights::with_pinned_search_path(|| owned_and_tracked(relid))?;
    let where_clause = match &where_clause {
        Some(condition) => Some(condition::canonical(relid, &table, condition)?),
        None => None,
    };
    let open = crate::rights::as_superuser(|| {
        Spi::get_one_with_args::<i64>(
            "SELECT pg_catalog.count(*) FROM certyo.backfills
              WHERE relid OPERATOR(pg_catalog.=) $1 AND state IN ('queued', 'running')",
            &[relid.into()],
        )
    })?
    .unwrap_or_default();
    if open >= MAX_OPEN_PER_TABLE {
        return Err(CertyoError::new(
            PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
            format!("certyo_cdc: table {table} has {open} backfills open already"),
        )
        .detail(format!("At most {MAX_OPEN_PER_TABLE} backfills of one table may wait or run at once; each is worked through chunk by chunk, in request order."))
        .hint("Wait for them to finish (certyo.backfills), or cancel some with certyo.cancel_backfill(id)."));
    }
    // Who asked, read before the switch below: chunks run only while this role still has the
    // table owner's privileges.
    // SAFETY: GetUserId only reads the backend's current user.
    let requested_by = unsafe { pg_sys::GetUserId() };
    // No operator or function to resolve here: the caller's search_path cannot reach it.
    let id = crate::rights::as_superuser(|| {
        // Where it was asked (see `not_restored`): a schema from before 0.2.0 has no column.
        let sql = if crate::shape::schema_has(c"backfills", Some(c"installation")) {
            "INSERT INTO certyo.backfills (relid, where_clause, requested_by, installation)
             VALUES ($1, $2, $3, certyo.this_installation()) RETURNING id"
        } else {
            "INSERT INTO certyo.backfills (relid, where_clause, requested_by)
             VALUES ($1, $2, $3) RETURNING id"
        };
        Spi::get_one_with_args::<i64>(
            sql,
            &[
                relid.into(),
                where_clause.clone().into(),
                requested_by.into(),
            ],
        )
    })?
    .unwrap_or_default();
    crate::wake::ring_at_commit();
    Ok(id)
}

/// The longest backfill condition accepted, in bytes.
const MAX_CONDITION_BYTES: usize = 10_000;

/// The most backfills of one table that may be open (queued or running) at once.
const MAX_OPEN_PER_TABLE: i64 = 16;

/// The table's name (`schema.table`, quoted as needed), if the caller may backfill it and it
/// is tracked; the reason otherwise.
fn owned_and_tracked(relid: Oid) -> Result<String> {
    let table = Spi::get_one_with_args::<String>(
        "SELECT CASE WHEN pg_catalog.pg_has_role(current_user, c.relowner, 'USAGE')
                     THEN pg_catalog.format('%I.%I', n.nspname, c.relname) END
           FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
          WHERE c.oid = $1",
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
    let temporary = Spi::get_one_with_args::<bool>(
        "SELECT c.relpersistence = 't' FROM pg_catalog.pg_class c WHERE c.oid = $1",
        &[relid.into()],
    )?
    .unwrap_or(false);
    if temporary || crate::track::installed_options(relid)?.is_none() {
        return Err(CertyoError::new(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("certyo_cdc: table {table} is not tracked"),
        )
        .hint(format!(
            "Call certyo.track('{table}') first: a backfill queues rows of a tracked table."
        )));
    }
    Ok(table)
}

fn display(relid: Oid) -> String {
    Spi::get_one_with_args::<String>("SELECT $1::regclass::text", &[relid.into()])
        .ok()
        .flatten()
        .unwrap_or_else(|| relid.to_u32().to_string())
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

/// Worker: queue the next chunk of the oldest open backfill that is not waiting for rows locked
/// by someone else. True when there may be more to do now.
pub fn step(chunk_size: usize) -> std::result::Result<bool, pgrx::spi::Error> {
    let waiting = locked::waiting();
    let Some(job) = crate::error::transaction(|| next_job(&waiting))? else {
        return Ok(false);
    };
    let id = job.id;
    let outcome = crate::error::guarded_with_code(|| {
        crate::error::transaction(|| queue_chunk(&job, chunk_size))
    });
    let Err((code, error)) = outcome else {
        locked::forget(id);
        return Ok(true);
    };
    if code == PgSqlErrorCode::ERRCODE_LOCK_NOT_AVAILABLE {
        // Rows (or the table) locked by another transaction for more than a second: the
        // chunk is tried again later, with back-off; the backfill goes on from where it was.
        let retry_in = locked::wait(id);
        let error = format!(
            "{error}: the chunk's rows are locked by another transaction; tried again in {} s",
            retry_in.as_secs().max(1)
        );
        crate::error::transaction(|| {
            Spi::run_with_args(
                "UPDATE certyo.backfills SET error = $2, updated_at = now() WHERE id = $1",
                &[id.into(), error.into()],
            )
        })?;
        // Another backfill, not waiting, may be taken at once.
        return Ok(true);
    }
    locked::forget(id);
    let error = if code == PgSqlErrorCode::ERRCODE_QUERY_CANCELED {
        format!(
            "{error}: a chunk of {chunk_size} rows took longer than certyo.user_code_timeout ({} ms); raise it, lower certyo.backfill_chunk_size, or give the condition an index, then request the backfill again",
            crate::settings::user_code_timeout().as_millis()
        )
    } else {
        error
    };
    fail(id, &error)?;
    Ok(true)
}

/// Backfill `id` fails with `error`, logged within the log's limit.
fn fail(id: i64, error: &str) -> std::result::Result<(), pgrx::spi::Error> {
    log_limit::warn(id, error);
    crate::error::transaction(|| {
        Spi::run_with_args(
            "UPDATE certyo.backfills SET state = 'failed', error = $2, finished_at = now(), updated_at = now()
              WHERE id = $1 AND state IN ('queued', 'running')",
            &[id.into(), error.into()],
        )
    })
}

/// A chunk of backfill `id` ran past the hard limit and ended the process (see
/// `crate::hard_limit`): the backfill fails, rather than end the next process too, and so do
/// the other open backfills its requester asked for (each one's condition could do the same,
/// and one statement may request many: they would end the slow lane one after another).
pub fn ended_the_process(id: i64) -> std::result::Result<(), pgrx::spi::Error> {
    locked::forget(id);
    let others = crate::error::transaction(|| {
        Spi::connect_mut(|client| {
            client
                .update(
                    "UPDATE certyo.backfills b SET state = 'failed', finished_at = now(), updated_at = now(),
                            error = format('not run: backfill %s of the same requester ran past the hard limit; request it again once its condition lets query_canceled through', $1)
                      WHERE b.state IN ('queued', 'running') AND b.id <> $1
                        AND b.requested_by = (SELECT requested_by FROM certyo.backfills WHERE id = $1)
                     RETURNING b.id",
                    None,
                    &[id.into()],
                )
                .map(|rows| rows.len())
        })
    })?;
    if others > 0 {
        pgrx::warning!("certyo_cdc: {others} more backfills of the requester of backfill {id} failed with it: see certyo.backfills");
    }
    let error = crate::hard_limit::ended_message(
        "a chunk's condition",
        "request the backfill again with a condition that does not catch its cancellation",
    );
    fail(id, &error)
}

/// The backfills that wait while their rows are locked by someone else, each with its own
/// back-off, in the worker's memory (a restart tries them at once). The worker takes the oldest
/// open backfill that is not waiting: one role's locks hold up its own backfill, never the
/// backfills requested after it.
pub mod locked {
    use std::cell::RefCell;
    use std::time::{Duration, Instant};

    thread_local! {
        /// (backfill id, failed attempts, next attempt).
        static WAITING: RefCell<Vec<(i64, u32, Instant)>> = const { RefCell::new(Vec::new()) };
    }

    /// The backfills that wait for their next attempt now (their time has not come).
    pub fn waiting() -> Vec<i64> {
        let now = Instant::now();
        WAITING.with(|w| {
            w.borrow()
                .iter()
                .filter(|(_, _, at)| now < *at)
                .map(|(id, _, _)| *id)
                .collect()
        })
    }

    /// Backfill `id` found its rows locked again: when to try next (1 s, doubling, at most
    /// `certyo.max_retry_interval`).
    pub fn wait(id: i64) -> Duration {
        let cap = crate::settings::current().max_retry_interval;
        WAITING.with(|w| {
            let mut waiting = w.borrow_mut();
            let failures = waiting
                .iter()
                .find(|(job, _, _)| *job == id)
                .map_or(1, |(_, n, _)| n + 1);
            let delay = certyo::retry::next_attempt_delay(failures, 0.5, cap);
            waiting.retain(|(job, _, _)| *job != id);
            waiting.push((id, failures, Instant::now() + delay));
            delay
        })
    }

    /// Backfill `id` went on (or ended): it waits no more.
    pub fn forget(id: i64) {
        WAITING.with(|w| w.borrow_mut().retain(|(job, _, _)| *job != id));
    }

    /// How long until the first waiting backfill is tried again (None: none waits). A backfill
    /// whose time has come is taken by the next pass, or is no longer open (cancelled while it
    /// waited): either way no timer is needed for it, and one of zero would make the worker
    /// run pass after pass without sleeping. Entries long past their time are let go.
    pub fn next_attempt_in() -> Option<Duration> {
        let now = Instant::now();
        WAITING.with(|w| {
            let mut waiting = w.borrow_mut();
            waiting.retain(|(_, _, at)| now.saturating_duration_since(*at) < FORGOTTEN_AFTER);
            waiting
                .iter()
                .filter(|(_, _, at)| *at > now)
                .map(|(_, _, at)| at.duration_since(now))
                .min()
        })
    }

    /// How long past its time a waiting backfill's back-off is remembered (a backfill locked
    /// again within it waits longer than the time before).
    const FORGOTTEN_AFTER: Duration = Duration::from_secs(3600);
}

/// A backfill names its table and the role that asked by OID, which a restore gives to others
/// (in a cluster made anew, quite possibly to another table): one asked in another installation
/// (`certyo.this_installation()`: another cluster, database or extension) and still open, as a
/// dump holds it, is not continued on a guess. It fails, saying why, to be asked again.
fn not_restored(
    client: &mut pgrx::spi::SpiClient<'_>,
) -> std::result::Result<(), pgrx::spi::Error> {
    if !crate::shape::schema_has(c"backfills", Some(c"installation")) {
        return Ok(());
    }
    let failed = client
        .update(
            "UPDATE certyo.backfills
                SET state = 'failed', finished_at = pg_catalog.now(), updated_at = pg_catalog.now(),
                    error = 'not continued: the database was restored from a dump, and a backfill names its table and the role that asked by OID, which a restore changes'
              WHERE state IN ('queued', 'running')
                AND installation OPERATOR(pg_catalog.<>) certyo.this_installation()
             RETURNING id",
            None,
            &[],
        )?
        .len();
    if failed > 0 {
        pgrx::warning!(
            "certyo_cdc: {failed} backfills open at a dump were not continued after its restore; request them again with certyo.backfill()"
        );
    }
    Ok(())
}

/// The oldest open backfill but those in `waiting`.
fn next_job(waiting: &[i64]) -> std::result::Result<Option<Job>, pgrx::spi::Error> {
    Spi::connect_mut(|client| {
        not_restored(client)?;
        let rows = client.select(
            "SELECT id, relid, where_clause, requested_by, last_key FROM certyo.backfills
              WHERE state IN ('queued', 'running') AND id OPERATOR(pg_catalog.<>) ALL ($1)
              ORDER BY id LIMIT 1",
            None,
            &[waiting.to_vec().into()],
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
    // Locked before its name is looked up: the name then means this table until the chunk
    // commits (a rename of it, or of another table onto its name, waits), and the rows read
    // by that name are the rows of the relation deformed below by OID.
    // A table dropped meanwhile is found missing by the lookups below.
    crate::rights::lock_table(
        job.relid,
        pg_sys::RowShareLock,
        std::time::Duration::from_secs(1),
        false,
    );
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
    // Every name of ours is qualified by the alias `t`: a bare name in ORDER BY would match an
    // output column first (the row image is named after the table's type), and the row image is
    // `t.*` cast to the table's row type, a whole-row reference that no column can shadow (a
    // bare `t` means a column named t, if the table has one).
    let columns = key
        .columns
        .iter()
        .map(|c| format!("t.{c}"))
        .collect::<Vec<_>>()
        .join(", ");
    key.readable()?;
    let n = key.columns.len();
    // Parameters of the key's own types, read from text by their input functions (never a
    // cast, see `RecordKey::array_of`), compared by the types' own operators.
    let column = |i: usize| key.ordered("t", i);
    let after = match job.last_key {
        Some(_) => format!("AND {}", key.after(&column, 1)),
        None => String::new(),
    };
    let sql = format!(
        "SELECT (t.*)::{table}, {columns} FROM {table} AS t WHERE ({condition}) {after}
          ORDER BY {columns} LIMIT {chunk_size} FOR SHARE OF t",
        table = key.table,
        condition = job.where_clause.as_deref().unwrap_or("true"),
    );
    let last_key = job.last_key.clone().unwrap_or_default();
    // With the settings that values' text forms depend on pinned: neither the database's
    // (`ALTER DATABASE ... SET extra_float_digits = -15` printed 1.5 as "2", and the next chunk
    // began after 2) nor what the condition set may change the place kept.
    let typed = |texts: &[String]| {
        crate::rights::with_pinned_io(|| {
            (0..n)
                .map(|i| key.value_of(i, texts.get(i).map_or("", String::as_str)))
                .collect::<Result<Vec<_>>>()
        })
    };
    // The query runs the owner's code (domain checks in the key's input, policies) and the
    // requester's condition; the requester was and still is allowed to act as the owner. So it
    // runs as the owner, restricted, never with the worker's rights (see crate::rights).
    let owner = requester_may_still_act_as_owner(job)?;
    let timeout = crate::settings::user_code_timeout();
    let (queued, last) = crate::rights::backfilling_as(job.id, owner, timeout, || {
        let after = if job.last_key.is_some() {
            typed(&last_key)?
        } else {
            Vec::new()
        };
        let (queued, last) =
            Spi::connect(|client| queue_rows(client, &sql, &after, &key, job.relid, &options))?;
        if let (Some(_), Some(new)) = (&job.last_key, &last) {
            // Each chunk must end past the one before, read back as the next chunk will read
            // it, or the backfill would start over, forever: a type whose output does not read
            // back as the same value would do that.
            let mut both = typed(new)?;
            both.extend(typed(&last_key)?);
            let new_param = |i: usize| format!("${}", i + 1);
            let progressed = Spi::get_one_with_args::<bool>(
                &format!("SELECT {}", key.after(&new_param, n + 1)),
                &both,
            )?;
            if progressed != Some(true) {
                return Err(no_progress(&key.table, &last_key, new));
            }
        }
        Ok((queued, last))
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

fn no_progress(table: &str, before: &[String], after: &[String]) -> CertyoError {
    CertyoError::new(
        PgSqlErrorCode::ERRCODE_INVALID_TEXT_REPRESENTATION,
        format!(
            "the backfill of {table} made no progress: a chunk ended at key ({}), read back as not after the previous chunk's ({})",
            after.join(", "),
            before.join(", ")
        ),
    )
    .detail("Between chunks a backfill keeps its place as the record id columns' text form, by their types' output and input functions; a value whose output does not read back as itself would make the backfill start over, forever.")
    .hint("Track the table by other record_id_columns, then request the backfill again.")
}

/// The table's owner, if the role that requested the backfill still has its privileges (it
/// had them when it asked); otherwise the backfill fails.
fn requester_may_still_act_as_owner(job: &Job) -> Result<Oid> {
    let owner = crate::rights::owner_of(job.relid).ok_or_else(|| {
        CertyoError::new(
            PgSqlErrorCode::ERRCODE_UNDEFINED_TABLE,
            "the table was dropped",
        )
    })?;
    let allowed = Spi::get_one_with_args::<bool>(
        "SELECT CASE WHEN EXISTS (SELECT FROM pg_catalog.pg_roles WHERE oid = $1)
                     THEN pg_catalog.pg_has_role($1, $2, 'USAGE') ELSE false END",
        &[job.requested_by.into(), owner.into()],
    )?
    .unwrap_or(false);
    if !allowed {
        return Err(CertyoError::new(
            PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE,
            "the role that requested the backfill no longer has the table owner's privileges",
        ));
    }
    Ok(owner)
}

/// Run the chunk's query and queue each row it returns; returns the count and the last key,
/// as text by the key's output functions.
fn queue_rows(
    client: &pgrx::spi::SpiClient<'_>,
    sql: &str,
    after: &[DatumWithOid<'_>],
    key: &RecordKey,
    relid: Oid,
    options: &crate::capture::options::CaptureOptions,
) -> Result<(i64, Option<Vec<String>>)> {
    let mut rows = client.select(sql, None, after)?;
    let mut queued = 0i64;
    let mut last = None;
    // SAFETY: inside the chunk's transaction; the relation is closed by its guard on every
    // path; each row image is a valid composite datum of this table, deformed under its own
    // memory context, reset per row.
    unsafe {
        let opened = crate::relation::OpenRelation::open(relid, pg_sys::AccessShareLock);
        let rel = opened.get();
        let plan = TablePlan::build(rel, options)?;
        // What the query returns is checked before any of it is deformed: a row image of
        // another type (a name that came to mean something else) is an error for this
        // backfill, never a read of memory as the wrong type; so is a key value (`text_of`).
        let row_type = (*(*rel).rd_rel).reltype;
        let returned = rows.column_type_oid(1)?.value();
        if returned != row_type {
            return Err(CertyoError::new(
                PgSqlErrorCode::ERRCODE_DATATYPE_MISMATCH,
                format!(
                    "the chunk's query returned type {}, not the row type of table {}",
                    returned.to_u32(),
                    plan.collection
                ),
            ));
        }
        let key_types = (0..key.columns.len())
            .map(|i| rows.column_type_oid(i + 2).map(|t| t.value()))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        let mut per_row = PgMemoryContexts::new("certyo_cdc backfill row");
        while rows.next().is_some() {
            // A NULL in the key is not refused here but by `plan.change`, which names the
            // column and the fix.
            let Some(image) = rows.get_datum_by_ordinal(1)? else {
                continue;
            };
            let mut key_text = Vec::with_capacity(key_types.len());
            for (i, found) in key_types.iter().enumerate() {
                match rows.get_datum_by_ordinal(i + 2)? {
                    // Settings pinned (see `queue_chunk`): the condition has run by now, and
                    // what it set must not change the text.
                    Some(datum) => key_text.push(crate::rights::with_pinned_io(|| {
                        key.text_of(i, *found, datum)
                    })?),
                    None => key_text.push(String::new()), // refused by `plan.change` below
                }
            }
            let outcome = per_row.switch_to(|_| {
                let header =
                    pg_sys::pg_detoast_datum(image.cast_mut_ptr()) as pg_sys::HeapTupleHeader;
                // HeapTupleHeaderGetTypeId: a composite datum names its row type.
                if (*header).t_choice.t_datum.datum_typeid != row_type {
                    return Err(CertyoError::new(
                        PgSqlErrorCode::ERRCODE_DATATYPE_MISMATCH,
                        format!(
                            "a row image of table {} is not of its row type",
                            plan.collection
                        ),
                    ));
                }
                let mut tuple = pg_sys::HeapTupleData {
                    t_len: pgrx::varlena::varsize_any(header.cast()) as u32,
                    t_self: pg_sys::ItemPointerData::default(),
                    t_tableOid: relid,
                    t_data: header,
                };
                let row = Row::deform(&mut tuple, (*rel).rd_att, plan.natts);
                let change = plan.change(Operation::Upsert, &row)?;
                queue::append(relid, plan.table_id, &plan.collection, &change).map(|_| ())
            });
            per_row.reset();
            outcome?;
            queued += 1;
            last = Some(key_text);
        }
    }
    Ok((queued, last))
}
