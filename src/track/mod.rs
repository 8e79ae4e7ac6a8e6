//! The SQL surface that starts and stops capture: `certyo.track()`, `certyo.untrack()`, and
//! `certyo.refresh_capture_trigger()`, which the DDL event trigger calls after `ALTER TABLE`.
//! Declared in `sql/schema.sql`; each entry point validates everything before it changes
//! anything, so a refused call leaves the table as it was.

mod existing_rows;
pub(crate) mod identity;
mod install;
pub(crate) mod key;
mod latest;
mod outcome;
mod partitions;
mod table;
mod trigger_order;

use crate::capture::options::{
    option_values, CaptureOptions, RecordIdSource, WriteBack, BOOKKEEPING_COLUMNS,
};
use crate::capture::CAPTURE_TRIGGER;
use crate::error::{CertyoError, OrRaise, Result};
use install::TriggerDefinition;
pub use outcome::Trees;
pub use partitions::{
    after_attach, before_attach, before_rows_leave, outermost, owns, partition_parent,
    partitions_dropped_with, refuse_extension_member, refuse_truncating_partitions, Leaving,
};
use pgrx::pg_sys::{self, Oid};
use pgrx::prelude::*;
use pgrx::PgSqlErrorCode;
use std::ffi::CStr;
use table::{quote_literal, Request, Table};
pub use trigger_order::refuse_trigger_after_marks;

/// `certyo.track()` as 0.1.0's SQL declares it (five arguments), between installing the new
/// library and `ALTER EXTENSION certyo_cdc UPDATE`: a table it tracks anew writes back as
/// 0.1.0 did (`'accepted'`); one already tracked keeps its mode.
#[pg_extern(sql = false)]
fn track(
    rel: Option<Oid>,
    record_id_columns: Option<Vec<Option<String>>>,
    exclude_columns: Option<Vec<Option<String>>>,
    timestamp_column: Option<&CStr>,
    backfill: Option<bool>,
) {
    track_any(
        rel,
        record_id_columns,
        exclude_columns,
        timestamp_column,
        backfill,
        None,
        WriteBack::Accepted,
    )
}

/// `certyo.track()` with `write_back` (from 0.2.0 on; its C symbol `track_write_back_wrapper`).
#[pg_extern(sql = false, name = "track")]
fn track_write_back(
    rel: Option<Oid>,
    record_id_columns: Option<Vec<Option<String>>>,
    exclude_columns: Option<Vec<Option<String>>>,
    timestamp_column: Option<&CStr>,
    backfill: Option<bool>,
    write_back: Option<&str>,
) {
    track_any(
        rel,
        record_id_columns,
        exclude_columns,
        timestamp_column,
        backfill,
        write_back,
        crate::settings::write_back(),
    )
}

/// `new_table_mode`: the write-back mode of a table not tracked yet when none is named.
fn track_any(
    rel: Option<Oid>,
    record_id_columns: Option<Vec<Option<String>>>,
    exclude_columns: Option<Vec<Option<String>>>,
    timestamp_column: Option<&CStr>,
    backfill: Option<bool>,
    write_back: Option<&str>,
    new_table_mode: WriteBack,
) {
    let request = || -> Result<Request> {
        Ok(Request {
            record_id_columns: record_id_columns
                .map(|names| column_names(names, "record_id_columns"))
                .transpose()?,
            exclude_columns: column_names(exclude_columns.unwrap_or_default(), "exclude_columns")?,
            timestamp_column: timestamp_column.map(|c| c.to_string_lossy().into_owned()),
            write_back: write_back.map(write_back_mode).transpose()?,
        })
    };
    let relid = required(rel).or_raise();
    crate::rights::with_pinned_search_path(|| {
        track_table(
            relid,
            &request().or_raise(),
            backfill.unwrap_or(false),
            new_table_mode,
        )
    })
    .or_raise()
}

fn write_back_mode(value: &str) -> Result<WriteBack> {
    WriteBack::parse(value).ok_or_else(|| {
        CertyoError::new(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("certyo_cdc: write_back must be 'anchored', 'accepted' or 'none', not {value:?}"),
        )
        .hint("'anchored' writes the hash and status back once, when Certyo confirms the version on chain; 'accepted' writes the hash at acceptance and the status again once anchored; 'none' adds no column and never writes to the rows (certyo.record_status() gives each record's state).")
    })
}

/// The names of an array argument; a NULL element is refused (there is no such column).
fn column_names(names: Vec<Option<String>>, argument: &str) -> Result<Vec<String>> {
    names
        .into_iter()
        .map(|name| {
            name.ok_or_else(|| {
                CertyoError::new(
                    PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED,
                    format!("certyo_cdc: {argument} must not contain NULL"),
                )
                .hint(format!(
                    "Name each column of {argument} as text, e.g. ARRAY['id'].",
                ))
            })
        })
        .collect()
}

#[pg_extern(sql = false)]
fn untrack(rel: Option<Oid>, drop_columns: Option<bool>) -> bool {
    let relid = required(rel).or_raise();
    crate::rights::with_pinned_search_path(|| untrack_table(relid, drop_columns.unwrap_or(false)))
        .or_raise()
}

#[pg_extern(sql = false)]
fn refresh_capture_trigger(rel: Oid) {
    crate::rights::with_pinned_search_path(|| refresh(rel)).or_raise()
}

/// `certyo.capture_option(tgargs, key)`: decodes trigger arguments for `certyo.tracked_tables`.
#[pg_extern(sql = false)]
fn capture_option(tgargs: &[u8], key: &str) -> Vec<String> {
    option_values(tgargs, key)
}

/// `certyo.capture_table_id(tgargs)`: the table id a capture trigger carries, NULL when it
/// carries none or none readable.
#[pg_extern(sql = false)]
fn capture_table_id(tgargs: &[u8]) -> Option<i32> {
    crate::capture::options::table_id(tgargs)
}

fn required(rel: Option<Oid>) -> Result<Oid> {
    rel.ok_or_else(|| {
        CertyoError::new(
            PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED,
            "certyo_cdc: the table to track must not be NULL",
        )
        .hint("Pass the table by name, e.g. certyo.track('public.products').")
    })
}

fn track_table(
    relid: Oid,
    request: &Request,
    backfill: bool,
    new_table_mode: WriteBack,
) -> Result<()> {
    // Whoever may not track it (not its owner, not a table) is refused before anything is
    // locked: a lock request waits for writers, and writers queue behind it.
    let table = Table::inspect(relid)?;
    // Held still from here on, with its partitions (a writer may write to one directly): no
    // writer commits rows between what is checked and read of them below and the capture
    // trigger. In the mode its DDL takes: `SHARE ROW EXCLUSIVE` for the triggers, `ACCESS
    // EXCLUSIVE` when columns are to be added (asked for at once: holding the first and then
    // asking for the second, track() would wait in a circle with a writer that read the table
    // before it wrote). Two track() calls of one table wait for each other.
    let write_back = request
        .write_back
        .or(installed_options(relid)?.map(|o| o.write_back))
        .unwrap_or(new_table_mode);
    let mode = if install::alters_table(&table, write_back)? {
        pg_sys::AccessExclusiveLock
    } else {
        pg_sys::ShareRowExclusiveLock
    };
    // Nor may this session's own statement be writing to them (an INSERT beside the track()
    // call in one statement, its triggers read before they existed).
    for member in crate::rights::lock_tree(relid, mode) {
        // SAFETY: a relation this transaction holds locked, opened and closed by the guard;
        // CheckTableNotInUse raises an ordinary ERROR.
        unsafe {
            let opened = crate::relation::OpenRelation::open(member, pg_sys::NoLock);
            pg_sys::CheckTableNotInUse(opened.get(), c"certyo.track()".as_ptr());
        }
    }
    // What is read next is read as of now, after the wait: statements of a transaction that
    // has no id yet read with the snapshot taken before it (see `rights::lock_table`).
    // SAFETY: assigns the transaction an id, or raises an ordinary ERROR; track() writes anyway.
    unsafe { pg_sys::GetCurrentTransactionId() };
    let table = Table::inspect(relid)?;
    partitions::refuse_detach_pending(relid)?;
    let installed = installed_options(relid)?;
    let mut options = table.resolve(&Request {
        // Re-tracking without naming a mode keeps the table's.
        write_back: Some(
            request
                .write_back
                .or(installed.as_ref().map(|o| o.write_back))
                .unwrap_or(new_table_mode),
        ),
        ..request.clone()
    })?;
    table.require_generated_from_captured(&options)?;
    trigger_order::require_no_trigger_after_marks(relid, relid, &options)?;
    identity::assign(&table, &mut options)?;
    let was_tracked = installed.is_some();
    let mode_changed = installed
        .as_ref()
        .is_some_and(|o| o.write_back != options.write_back);
    if options.write_back == WriteBack::None {
        let conflict = if was_tracked {
            install::SidecarConflict::Tracked
        } else {
            install::SidecarConflict::Untracked
        };
        install::refuse_bookkeeping_columns(&table, conflict)?;
    } else {
        require_bookkeeping_types(&table)?;
        if !was_tracked && !has_receipts(relid)? {
            // What the rows say was written by no tracking of this table (a detached partition's
            // marks, a copy's): refused, the owner to clear it.
            install::refuse_marked_rows(relid, options.write_back, &table.display)?;
        }
        install::add_bookkeeping_columns(&table, options.write_back)?;
    }
    TriggerDefinition::new(&options).install(&table)?;
    crate::shape::record(relid, &options)?;
    if !was_tracked || mode_changed {
        // Under another mode the rows hold what the old one wrote: each record's newest
        // version is written back again as the new mode writes it.
        write_back_again(relid)?;
    }
    if !was_tracked {
        crate::audit::record_removed_while_untracked(relid, &options)?;
    }
    if backfill {
        let queued = existing_rows::queue(relid, &options)?;
        pgrx::notice!(
            "certyo_cdc: queued {queued} existing rows of {} as upserts",
            table.display
        );
    }
    Ok(())
}

/// Has the table any receipt under its present OID and name: was it tracked here before? (Both,
/// as in [`write_back_again`]: a table dropped while untracked leaves its OID to be reused by
/// another, whose rows must not pass for its.)
fn has_receipts(relid: Oid) -> Result<bool> {
    let (schema, name) = Spi::get_two_with_args::<String, String>(
        "SELECT n.nspname::pg_catalog.text, c.relname::pg_catalog.text FROM pg_catalog.pg_class c
           JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
          WHERE c.oid OPERATOR(pg_catalog.=) $1",
        &[relid.into()],
    )?;
    let collection = crate::capture::plan::collection_name(
        &schema.unwrap_or_default(),
        &name.unwrap_or_default(),
    );
    let found = crate::rights::as_superuser(|| {
        Spi::get_one_with_args::<bool>(
            "SELECT EXISTS (SELECT FROM certyo.receipt
                             WHERE relid OPERATOR(pg_catalog.=) $1 AND collection OPERATOR(pg_catalog.=) $2)",
            &[relid.into(), collection.into()],
        )
    })?;
    Ok(found.unwrap_or(false))
}

/// A table tracked again: what its rows hold in their bookkeeping columns may not be what its
/// receipts say was written back. Changes delivered while it was untracked found nothing to
/// write back to (their receipts were recorded as if written back); `untrack(drop_columns =>
/// true)` took the hashes with the columns. Every receipt of the table waits to be written
/// back again (`written_back = false`): the worker writes back the newest version's hash and
/// anchor status of each record, as after a failed write-back, and until then the audit does
/// not take the rows' bookkeeping for a forgery (`crate::audit`). Only the receipts captured
/// under the table's present name: receipts are kept by table OID, and a table dropped while
/// untracked leaves its OID to be reused by another, whose rows must never take its hashes.
fn write_back_again(relid: Oid) -> Result<()> {
    crate::rights::as_superuser(|| {
        Spi::run_with_args(
            "UPDATE certyo.receipt r SET written_back = false
               FROM certyo.tracked_oids() t
              WHERE t.relid OPERATOR(pg_catalog.=) $1 AND r.relid OPERATOR(pg_catalog.=) $1
                AND r.collection OPERATOR(pg_catalog.=) t.collection AND r.written_back",
            &[relid.into()],
        )
    })?;
    Ok(())
}

fn untrack_table(relid: Oid, drop_columns: bool) -> Result<bool> {
    let table = Table::inspect(relid)?;
    // Under write_back => 'none' no column is ours: one of a bookkeeping name is the table's data.
    let sidecar = installed_options(relid)?.is_some_and(|o| o.write_back == WriteBack::None);
    let was_tracked = install::drop_triggers(&table)?;
    if drop_columns && sidecar {
        pgrx::notice!(
            "certyo_cdc: table {} was tracked with write_back => 'none' and has no column of certyo_cdc's: none dropped",
            table.display
        );
    } else if drop_columns {
        install::drop_bookkeeping_columns(&table)?;
    }
    if !was_tracked {
        pgrx::notice!("certyo_cdc: table {} was not tracked", table.display);
    }
    Ok(was_tracked)
}

/// Before `ALTER TABLE ... DROP COLUMN` / `ALTER COLUMN ... TYPE` of `columns` on `relid` (and
/// on its inheritors when the statement recurses), from `crate::ddl_hook`: a tracked table
/// whose capture trigger 0.1.0 installed with an `UPDATE OF` list gets today's, fired
/// by every UPDATE, so the statement does not fail on the trigger's dependency on the column
/// and CASCADE cannot drop the trigger.
/// When the statement ends, the DDL event trigger re-plans capture ([`refresh`]): the next
/// change carries the new shape. Tables the user does not own are left to ALTER TABLE's own
/// permission error.
pub fn release_columns(relid: Oid, recurse: bool) -> Result<()> {
    let tables = Spi::get_one_with_args::<Vec<Oid>>(
        "WITH RECURSIVE family(relid) AS (
             SELECT $1::oid
             UNION SELECT i.inhrelid FROM pg_catalog.pg_inherits i JOIN family f ON i.inhparent = f.relid WHERE $2)
         SELECT pg_catalog.array_agg(f.relid) FROM family f
           JOIN pg_catalog.pg_class c ON c.oid = f.relid
          WHERE pg_catalog.pg_has_role(c.relowner, 'USAGE')",
        &[relid.into(), recurse.into()],
    )?
    .unwrap_or_default();
    for relid in tables {
        let Some(options) = installed_options(relid)? else {
            continue;
        };
        let table = Table::inspect(relid)?;
        let definition = TriggerDefinition::new(&options);
        if !definition.is_installed(&table, !updating_certyo_cdc())? {
            definition.install(&table)?;
        }
    }
    Ok(())
}

/// Before a table inherits from `parent` (`CREATE TABLE ... INHERITS`, `ALTER TABLE ...
/// INHERIT`), from `crate::ddl_hook`: refused when `parent` is tracked.
pub fn refuse_inheriting_from(parent: Oid) -> Result<()> {
    if installed_options(parent)?.is_none() {
        return Ok(());
    }
    let name = Spi::get_one_with_args::<String>("SELECT $1::regclass::text", &[parent.into()])?
        .unwrap_or_default();
    Err(CertyoError::new(
        PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
        format!("certyo_cdc: {name} is tracked, and a table inheriting from it would not be"),
    )
    .detail("Rows of an inheritance child fire only the child's triggers, also when written through the parent, so its changes would silently not be captured.")
    .hint(format!("Use declarative partitioning (CREATE TABLE ... PARTITION OF {name}), whose partitions are captured with the table, or call certyo.untrack('{name}') first.")))
}

/// After `CREATE TABLE ... INHERITS` or `ALTER TABLE ... INHERIT`: refused when `child` now
/// inherits from a tracked table ([`refuse_inheriting_from`]), whatever the statement's names
/// meant when its checks ran.
pub fn refuse_inheriting_child(child: Oid) -> Result<()> {
    let parents = latest::one::<Vec<Oid>>(
        "SELECT pg_catalog.array_agg(inhparent) FROM pg_catalog.pg_inherits WHERE inhrelid OPERATOR(pg_catalog.=) $1",
        &[child.into()],
    )?
    .unwrap_or_default();
    parents.into_iter().try_for_each(refuse_inheriting_from)
}

/// `ALTER TABLE partition ENABLE / DISABLE ... TRIGGER name`, from `crate::ddl_hook`: refused
/// when it would change how a partition's clone of a tracked table's capture or marks trigger
/// fires. That partition's rows would be captured otherwise than the table's, and
/// `certyo.tracked_tables` (which reads the table's own trigger) would not say. (`ALL` and
/// `USER` are let through, as on the table itself: `pg_restore --disable-triggers` brackets
/// each partition's data with them.)
pub fn refuse_firing_change_of_clones(partition: Oid, trigger: &str) -> Result<()> {
    // Run for every such statement in every database, the extension's or not: its function is
    // the one the extension owns (pg_depend), never one found by name, which fails where it does
    // not exist or is anyone's where the extension is not installed.
    let clones = Spi::get_one_with_args::<Vec<String>>(
        "SELECT pg_catalog.array_agg(t.tgname::text ORDER BY t.tgname) FROM pg_catalog.pg_trigger t
          WHERE t.tgrelid = $1 AND t.tgparentid <> 0 AND t.tgname IN ('certyo_capture', 'zz_certyo_marks')
            AND EXISTS (SELECT FROM pg_catalog.pg_depend d
                          JOIN pg_catalog.pg_extension e ON e.oid = d.refobjid AND e.extname = 'certyo_cdc'
                         WHERE d.classid = 'pg_catalog.pg_proc'::pg_catalog.regclass AND d.objid = t.tgfoid
                           AND d.refclassid = 'pg_catalog.pg_extension'::pg_catalog.regclass AND d.deptype = 'e')
            AND t.tgname = $2",
        &[partition.into(), trigger.into()],
    )?
    .unwrap_or_default();
    let Some(clone) = clones.first() else {
        return Ok(());
    };
    let (partition, table) = Spi::get_two_with_args::<String, String>(
        "SELECT $1::regclass::text,
                (SELECT t.tgrelid::regclass::text FROM pg_catalog.pg_partition_ancestors($1) a
                   JOIN pg_catalog.pg_trigger t ON t.tgrelid = a.relid
                  WHERE t.tgname = 'certyo_capture' AND t.tgparentid = 0 LIMIT 1)",
        &[partition.into()],
    )?;
    let (partition, table) = (partition.unwrap_or_default(), table.unwrap_or_default());
    Err(CertyoError::new(
        PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
        format!("certyo_cdc: partition {partition} fires trigger {clone} as its tracked table does"),
    )
    .detail("The trigger is the partition's clone of one certyo.track() installed on the table. Changed on the partition alone, its rows would be captured (or their marks cleared) otherwise than the table's, and certyo.tracked_tables, which reads the table's own trigger, would not say so.")
    .hint(format!("Change it on the tracked table ({table}), or name your own triggers (ALTER TABLE {partition} DISABLE TRIGGER your_trigger).")))
}

/// What a statement does to one of certyo_cdc's triggers (see `crate::ddl_hook`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Touch {
    /// `DROP TRIGGER`, a rename out of its name, or `DEPENDS ON EXTENSION` (dropped with that).
    Drop,
    /// A trigger of the owner's given its name: `CREATE OR REPLACE TRIGGER`, a rename to it.
    TakeName,
}

/// A statement that would drop one of certyo_cdc's triggers, or make a trigger of the owner's
/// one of them, from `crate::ddl_hook`: refused on a tracked table (`table`, None: no such
/// table) unless `certyo.untrack()` or `track()` is the one doing it. Capture never stops, nor
/// narrows, without a word. (A trigger of such a name on a table that is not tracked was made
/// by hand: its owner may do as they like with it.)
pub fn refuse_touching_own_trigger(table: Option<Oid>, trigger: &str, touch: Touch) -> Result<()> {
    if install::untracking() || install::installing() {
        return Ok(());
    }
    // Tracked: a capture trigger whose arguments read as track() writes them. One that does not
    // read so (made by hand, then renamed to the name) is not ours to keep either.
    let table = match (table, table.map(installed_options)) {
        // Under 'none' the table has no marks trigger: one of that name is the owner's.
        (_, Some(Ok(Some(options))))
            if options.write_back == WriteBack::None
                && trigger == crate::capture::marks::MARKS_TRIGGER =>
        {
            return Ok(());
        }
        (Some(table), Some(Ok(Some(_)))) => table,
        _ => return Ok(()),
    };
    let name = Spi::get_one_with_args::<String>("SELECT $1::regclass::text", &[table.into()])?
        .unwrap_or_default();
    if touch == Touch::TakeName {
        return Err(CertyoError::new(
            PgSqlErrorCode::ERRCODE_RESERVED_NAME,
            format!("certyo_cdc: the trigger name {trigger} is certyo_cdc's on tracked table {name}"),
        )
        .detail("certyo.track() installs and keeps that trigger; one made or replaced by hand could capture less than the table's changes, or leave earlier versions' marks on changed rows.")
        .hint("Give your trigger another name."));
    }
    let (what, detail) = if trigger == crate::capture::marks::MARKS_TRIGGER {
        ("keeps this table's rows from showing an earlier version's hash and status", "Without it a row that changes would show what was written back of its earlier version, 'anchored' perhaps, until the new version is accepted.")
    } else if trigger == crate::capture::TRUNCATE_TRIGGER {
        ("refuses TRUNCATE of this table", "Without it TRUNCATE would remove the rows without a trace: Certyo would never hear of their deletion.")
    } else {
        (
            "is how certyo_cdc captures this table's changes",
            "Without it capture would stop without a word: later changes would never reach Certyo.",
        )
    };
    Err(CertyoError::new(
        PgSqlErrorCode::ERRCODE_DEPENDENT_OBJECTS_STILL_EXIST,
        format!("certyo_cdc: trigger {trigger} on {name} {what}"),
    )
    .detail(detail)
    .hint(format!("To stop capturing the table, call certyo.untrack('{name}'); to pause sending, certyo.pause().")))
}

/// `DROP INDEX`, from `crate::ddl_hook`, before it runs: refused when it drops the last
/// unique index that makes a tracked table's record id columns identify a row (`track()`
/// requires one, and `ALTER TABLE ... DROP CONSTRAINT` is refused when the event trigger
/// re-validates; a plain index has no constraint, so only this check sees it go). Checked
/// before the drop, as `DROP INDEX CONCURRENTLY` commits as it goes.
pub fn before_index_drop(indexes: &[Oid]) -> Result<()> {
    for &index in indexes {
        // SAFETY: a catalog lookup inside the statement's transaction.
        let relid = unsafe { pgrx::pg_sys::IndexGetRelation(index, true) };
        if relid == pgrx::pg_sys::InvalidOid {
            continue;
        }
        // As of now: a `DROP INDEX CONCURRENTLY` may have waited for its locks since it began.
        let Some(options) = installed_options_now(relid)? else {
            continue;
        };
        if options.record_id_source != RecordIdSource::Columns
            || table::unique_index_covers(relid, &options.record_id_columns, indexes)?
            || !table::unique_index_covers(relid, &options.record_id_columns, &[])?
        {
            continue; // the primary key's index cannot be dropped on its own
        }
        return Err(index_drop_refused(index, relid, &options.record_id_columns));
    }
    Ok(())
}

fn index_drop_refused(index: Oid, relid: Oid, record_id_columns: &[String]) -> CertyoError {
    let names = Spi::get_two_with_args::<String, String>(
        "SELECT pg_catalog.format('%I.%I', n.nspname, i.relname), pg_catalog.format('%s.%s', n.nspname, t.relname)
           FROM pg_catalog.pg_class i, pg_catalog.pg_class t, pg_catalog.pg_namespace n
          WHERE i.oid = $1 AND t.oid = $2 AND n.oid = t.relnamespace",
        &[index.into(), relid.into()],
    );
    let (index, table) = match names {
        Ok((Some(index), Some(table))) => (index, table),
        _ => (format!("{}", index.to_u32()), format!("{}", relid.to_u32())),
    };
    let columns = record_id_columns
        .iter()
        .map(|n| table::quote_ident(n))
        .collect::<Vec<_>>()
        .join(", ");
    CertyoError::new(
        PgSqlErrorCode::ERRCODE_DEPENDENT_OBJECTS_STILL_EXIST,
        format!(
            "certyo_cdc: index {index} is what makes the record id columns ({columns}) of tracked table {table} identify a row"
        ),
    )
    .detail("Without a unique index on them, rows sharing a record id would be one record at Certyo, each row's change read as a new version of the others, and the write-back would mark them all with one hash.")
    .hint(format!(
        "Create another unique index on ({columns}) first, or call certyo.track('{table}', record_id_columns => ...) with columns that another unique index covers, or certyo.untrack('{table}')."
    ))
}

/// After `ALTER TABLE` on a tracked table: re-validate the options against the new columns
/// and rewrite the triggers if their arguments (the record id) must change. A named column
/// that is gone raises an error, which undoes the `ALTER TABLE` rather than capture breaking.
fn refresh(relid: Oid) -> Result<()> {
    if install::installing() {
        return Ok(()); // the ALTER TABLE of an installation, which re-plans when it is done
    }
    let Some(options) = installed_options(relid)? else {
        return Ok(()); // untracked meanwhile: nothing to keep current
    };
    let table = Table::inspect(relid)?;
    if options.write_back != WriteBack::None {
        require_bookkeeping_columns(&table)?;
    }
    let request = Request {
        record_id_columns: match options.record_id_source {
            RecordIdSource::PrimaryKey => None,
            RecordIdSource::Columns => Some(options.record_id_columns.clone()),
        },
        exclude_columns: options.exclude_columns.clone(),
        timestamp_column: options.timestamp_column.clone(),
        write_back: Some(options.write_back),
    };
    let mut options = table.resolve(&request).map_err(|e| {
        let hint = format!(
            "Before renaming or dropping a column named in the tracking options, call certyo.track('{}', ...) \
             with options that do not name it. {}",
            table.display,
            e.hint.clone().unwrap_or_default()
        );
        CertyoError { hint: Some(hint), ..e }
    })?;
    let checked = table
        .require_generated_from_captured(&options)
        .and_then(|()| trigger_order::require_no_trigger_after_marks(relid, relid, &options));
    if let Err(e) = checked {
        if !updating_certyo_cdc() {
            return Err(e);
        }
        // ALTER EXTENSION ... UPDATE of a table tracked so before: said, not refused (the
        // update would fail for the whole database). The table's next ALTER TABLE refuses it.
        pgrx::warning!(
            "{} ({}) {}",
            e.message,
            e.detail.unwrap_or_default(),
            e.hint.unwrap_or_default()
        );
    }
    identity::assign(&table, &mut options)?;
    let definition = TriggerDefinition::new(&options);
    if !definition.is_installed(&table, !updating_certyo_cdc())? {
        definition.install(&table)?;
    }
    crate::shape::record(relid, &options)
}

/// Is this `CREATE` or `ALTER EXTENSION certyo_cdc` running its script (the update's calls of
/// `certyo.refresh_capture_trigger()`)?
fn updating_certyo_cdc() -> bool {
    // SAFETY: backend globals read in the backend's own thread, and a catalog lookup inside the
    // caller's transaction (missing_ok: InvalidOid when there is no such extension).
    unsafe {
        pgrx::pg_sys::creating_extension
            && pgrx::pg_sys::CurrentExtensionObject
                == pgrx::pg_sys::get_extension_oid(c"certyo_cdc".as_ptr(), true)
    }
}

/// A tracked table keeps its bookkeeping columns: the write-back finds them by name, so one
/// renamed or dropped would stop it without a word.
fn require_bookkeeping_columns(table: &Table) -> Result<()> {
    for name in BOOKKEEPING_COLUMNS {
        if table.column(name).is_none() {
            return Err(CertyoError::new(
                PgSqlErrorCode::ERRCODE_DEPENDENT_OBJECTS_STILL_EXIST,
                format!(
                    "certyo_cdc: column \"{name}\" of tracked table {} is where certyo_cdc writes what Certyo answered",
                    table.display
                ),
            )
            .detail("Without it the worker could not mark the table's rows: their write-back would stop without a word.")
            .hint(format!(
                "Keep the column; to stop tracking the table and remove its bookkeeping columns, call certyo.untrack('{}', drop_columns => true).",
                table.display
            )));
        }
    }
    require_bookkeeping_types(table)
}

/// The bookkeeping columns a table has are of the types capture reads them as.
fn require_bookkeeping_types(table: &Table) -> Result<()> {
    let types = [pg_sys::TEXTOID, pg_sys::TEXTOID, pg_sys::TIMESTAMPTZOID];
    for (name, typid) in BOOKKEEPING_COLUMNS.iter().zip(types) {
        let Some(column) = table.column(name) else {
            continue;
        };
        if column.typid != typid {
            let shown = if typid == pg_sys::TEXTOID {
                "text"
            } else {
                "timestamptz"
            };
            return Err(CertyoError::new(
                PgSqlErrorCode::ERRCODE_DATATYPE_MISMATCH,
                format!(
                    "certyo_cdc: column \"{name}\" of tracked table {} must be of type {shown}",
                    table.display
                ),
            )
            .detail(format!("certyo_cdc writes what Certyo answered into it and reads it back as {shown}. Of another type (a domain over {shown} or varchar among them), capture could not tell what a row claims, and would refuse its writes or let a claim through."))
            .hint(format!(
                "Keep it {shown} (ALTER TABLE {} ALTER COLUMN {name} TYPE {shown} makes it so); to stop tracking the table and remove its bookkeeping columns, call certyo.untrack('{}', drop_columns => true).",
                table.display, table.display
            )));
        }
    }
    Ok(())
}

pub(crate) fn installed_options(relid: Oid) -> Result<Option<CaptureOptions>> {
    // A read-only query (`Spi::connect`): `Spi::get_one_with_args` would assign the transaction
    // an id, and `DROP INDEX CONCURRENTLY`, which this is asked for (`before_index_drop`), must
    // be the first action of a transaction that has none.
    let raw = Spi::connect(|client| {
        client
            .select(&capture_trigger_args_query(), Some(1), &[relid.into()])?
            .first()
            .get_one::<Vec<u8>>()
    })?;
    options_from_trigger_args(raw)
}

/// [`installed_options`] as the catalogs are now (`latest`), whatever the transaction's
/// snapshot: for the checks around partition DDL.
fn installed_options_now(relid: Oid) -> Result<Option<CaptureOptions>> {
    options_from_trigger_args(latest::one::<Vec<u8>>(
        &capture_trigger_args_query(),
        &[relid.into()],
    )?)
}

/// The arguments of table `$1`'s own capture trigger (none for a partition's clone).
fn capture_trigger_args_query() -> String {
    format!(
        "SELECT (SELECT tgargs FROM pg_catalog.pg_trigger
                  WHERE tgrelid OPERATOR(pg_catalog.=) $1 AND tgname OPERATOR(pg_catalog.=) {}
                    AND tgparentid OPERATOR(pg_catalog.=) 0)",
        quote_literal(CAPTURE_TRIGGER)
    )
}

fn options_from_trigger_args(raw: Option<Vec<u8>>) -> Result<Option<CaptureOptions>> {
    let Some(raw) = raw else { return Ok(None) };
    let args = crate::capture::options::split_trigger_args(&raw);
    CaptureOptions::from_trigger_args(args.iter().map(String::as_str)).map(Some)
}
