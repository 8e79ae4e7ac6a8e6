//! Rows that enter or leave a tracked partitioned table by DDL, not by a write: `ATTACH
//! PARTITION` brings a table's rows in, `DETACH PARTITION` (or a drop) of a partition takes its
//! rows out. No row trigger fires for them, so without this their content would never reach
//! Certyo (`certyo.audit()`: `never captured`), or Certyo would go on holding records the table
//! no longer has (`deleted without capture`). Called from `crate::ddl_hook`, in the statement's
//! transaction:
//!
//! - before `ATTACH PARTITION`: the new partition gets the bookkeeping columns it needs;
//! - after it: an `upsert` of each row it brought is queued (as a backfill queues one), and
//!   what the rows' bookkeeping columns said (a partition detached earlier keeps its marks, and
//!   its rows may have changed since) is cleared: they hold versions no receipt covers yet;
//! - before `DETACH PARTITION`: a `delete` of each of its rows is queued, with the partition
//!   held still (no writer can add a row that would leave uncaptured). `DETACH ...
//!   CONCURRENTLY` lets writers go on while the partition leaves, so it is refused; so is a drop
//!   of a partition (`DROP TABLE`, `DROP SCHEMA ... CASCADE`, `DROP OWNED BY`: detach it
//!   first), and `TRUNCATE` of one (as the table's own is).
//!
//! A session in `session_replication_role = replica` queues nothing, as capture's triggers do
//! not fire there either (the audit names such rows).

use super::installed_options_now;
use super::table::Table;
use crate::capture::options::CaptureOptions;
use crate::capture::queue;
use crate::capture::record::Operation;
use crate::capture::scan::{each_row, Snapshot};
use crate::error::{CertyoError, Result};
use pgrx::pg_sys::{self, Oid};
use pgrx::prelude::*;
use pgrx::PgSqlErrorCode;

/// How a partition's rows leave its tracked table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Leaving {
    /// `ALTER TABLE parent DETACH PARTITION child`.
    Detach,
    /// `ALTER TABLE parent DETACH PARTITION child CONCURRENTLY`.
    DetachConcurrently,
    /// `DROP TABLE child`, or `DROP SCHEMA ... CASCADE` or `DROP OWNED BY` that drops it.
    Drop,
}

/// Before `ALTER TABLE parent ATTACH PARTITION child`: when `parent` is tracked (or a partition
/// of a tracked table), `child` gets the bookkeeping columns it needs to be a partition of it (a
/// partition must have every column of its table). Its triggers are cloned by PostgreSQL.
pub fn before_attach(parent: Oid, child: Oid) -> Result<()> {
    // A tracked table never becomes a partition, of a tracked table or not: its rows would be
    // captured twice under a tracked one, and an untracked one's triggers (a BEFORE UPDATE
    // trigger named to fire after the marks trigger among them) would be cloned onto it.
    if let Some(own) = tracked_within(child)? {
        let (parent, own) = (name_of(parent)?, name_of(own)?);
        return Err(CertyoError::new(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("certyo_cdc: {own} is tracked, and cannot become a partition of {parent}"),
        )
        .detail("A partition is captured with its table when that table is tracked; a tracked table under another would take on that table's triggers, and under a tracked one its rows would be captured twice.")
        .hint(format!("Call certyo.untrack('{own}') first, then track the partitioned table.")));
    }
    let Some((table, options)) = tracked_table_of(parent, true)? else {
        return Ok(());
    };
    // Only a table, attached by whoever owns both (PostgreSQL's own conditions): anything else
    // gets PostgreSQL's refusal, and nothing of it is read here (a view's columns run its
    // owner's functions, as the session that names it).
    if !is_table(child)? || !owns(parent, false)? || !owns(child, false)? {
        return Ok(());
    }
    // A member of another extension would be dropped, as a partition, by its DROP EXTENSION.
    if let Some(extension) = extension_member_within(child)? {
        let (child, table) = (name_of(child)?, name_of(table)?);
        return Err(CertyoError::new(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("certyo_cdc: {child} belongs to extension {extension}, and cannot become a partition of tracked table {table}"),
        )
        .detail(format!("DROP EXTENSION {extension} would drop it (or its schema), and its rows would leave {table} without their deletes captured."))
        .hint(format!("Remove it from the extension first: ALTER EXTENSION {extension} DROP TABLE {child}; (or DROP SCHEMA, when its schema is the member).")));
    }
    // A partition under it left detach pending could get neither the bookkeeping columns nor
    // its rows checked, as for track().
    refuse_detach_pending(child)?;
    super::trigger_order::require_no_trigger_after_marks(child, table, &options)?;
    super::install::refuse_marked_rows(child, options.write_back, &name_of(table)?)?;
    super::install::add_bookkeeping_columns(&Table::inspect(child)?, options.write_back)?;
    // Checked: the outcome check after the statement lets it in (`outcome`).
    super::outcome::note(child, table, super::outcome::Moved::In);
    Ok(())
}

/// Before `track()`, and before `ATTACH PARTITION` of a partitioned table to a tracked one: a
/// partition left "detach pending" by an interrupted `DETACH PARTITION ... CONCURRENTLY` is on
/// its way out of the table and cannot be given the bookkeeping columns (PostgreSQL refuses to
/// alter it until the detach is finished), so its rows could be neither marked nor told apart
/// when it leaves: refused, the owner to finish the detach first.
pub fn refuse_detach_pending(table: Oid) -> Result<()> {
    // One row always (the aggregate): `[parent, child]` of the first pending partition, or NULL.
    let pending = super::latest::one::<Vec<String>>(
        "SELECT (SELECT ARRAY[i.inhparent::pg_catalog.regclass::pg_catalog.text, i.inhrelid::pg_catalog.regclass::pg_catalog.text]
                   FROM pg_catalog.pg_inherits i
                  WHERE i.inhdetachpending
                    AND i.inhparent OPERATOR(pg_catalog.=) ANY (SELECT $1 UNION SELECT relid FROM pg_catalog.pg_partition_tree($1))
                  ORDER BY i.inhrelid LIMIT 1)",
        &[table.into()],
    )?
    .unwrap_or_default();
    let [parent, child] = pending.as_slice() else {
        return Ok(());
    };
    Err(CertyoError::new(
        PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
        format!("certyo_cdc: partition {child} of {parent} is being detached (an interrupted DETACH PARTITION ... CONCURRENTLY)"),
    )
    .detail("A partition that is detach pending can no longer be altered, so it cannot get the bookkeeping columns, and its rows are on their way out of the table.")
    .hint(format!("Finish the detach first: ALTER TABLE {parent} DETACH PARTITION {child} FINALIZE; then run the statement again (and attach the partition again if its rows belong to it).")))
}

/// After `ALTER TABLE ... ATTACH PARTITION child` succeeded: an `upsert` of each row the
/// partition brought is queued. The statement holds `child` and every partition under it in
/// `ACCESS EXCLUSIVE` mode until the transaction ends: no writer changes them meanwhile.
/// (Rows that said something in their bookkeeping columns were refused before the statement:
/// `before_attach`.)
pub fn after_attach(child: Oid) -> Result<()> {
    let Some((table, options)) = tracked_table_of(child, false)? else {
        return Ok(());
    };
    // Again, now that the statement holds `child` locked: rows a writer committed between the
    // check before it and its lock would otherwise come in unchecked.
    super::install::refuse_marked_rows(child, options.write_back, &name_of(table)?)?;
    if crate::capture::replica_session() {
        return Ok(());
    }
    let mut queued = 0;
    each_row(child, &options, Snapshot::Latest, |plan, _, change| {
        queued += 1;
        // SAFETY: inside the statement's transaction, which may write.
        unsafe { queue::append(plan.relid, plan.table_id, &plan.collection, change) }.map(|_| ())
    })?;
    if queued > 0 {
        notice!(
            "certyo_cdc: {queued} row(s) entered tracked table {} with partition {}: an upsert of each is queued",
            name_of(table)?,
            name_of(child)?
        );
    }
    Ok(())
}

/// Before `DETACH PARTITION` of `child`, when it is a partition of a tracked table: a `delete` of
/// each of its rows is queued. Its partition parent and then `child` are locked first as the
/// statement locks them (`ACCESS EXCLUSIVE`, in that order: no circle with it or with writers),
/// so no row is added or changed between this and the statement. A drop of such a partition
/// (`DROP TABLE`, or `DROP SCHEMA ... CASCADE` and `DROP OWNED BY` that would drop it) is
/// refused: detached first, its rows' deletes are captured. (Were the drop to capture them
/// itself, `pg_restore --clean` over a database with tracked tables, which drops each
/// partition before its table, would queue a delete of every row it is about to restore, and
/// its `DROP EXTENSION` would then fail on them.)
pub fn before_rows_leave(child: Oid, how: Leaving) -> Result<()> {
    let Some((table, options)) = tracked_table_of(child, false)? else {
        return Ok(());
    };
    let parent = super::latest::one::<Oid>(
        "SELECT (SELECT inhparent FROM pg_catalog.pg_inherits WHERE inhrelid OPERATOR(pg_catalog.=) $1)",
        &[child.into()],
    )?;
    // Whoever may not do the statement gets PostgreSQL's own refusal: nothing is locked or read
    // for them (a role that may not read a table must not hold it locked, or learn its size).
    let may = match how {
        Leaving::Drop => owns(child, true)?,
        Leaving::Detach | Leaving::DetachConcurrently => {
            parent.map(|p| owns(p, false)).transpose()?.unwrap_or(false)
        }
    };
    if !may {
        return Ok(());
    }
    if how == Leaving::Drop {
        let (table, child, parent) = (
            name_of(table)?,
            name_of(child)?,
            parent.map(name_of).transpose()?.unwrap_or_default(),
        );
        return Err(CertyoError::new(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("certyo_cdc: {child} is a partition of tracked table {table}, and dropping it would take its rows out without their deletes captured"),
        )
        .detail("Rows that leave a tracked table are deletes for Certyo: DETACH PARTITION queues a delete of each.")
        .hint(format!("Detach it first, then drop it: ALTER TABLE {parent} DETACH PARTITION {child}; DROP TABLE {child};")));
    }
    if how == Leaving::DetachConcurrently {
        let (table, child) = (name_of(table)?, name_of(child)?);
        return Err(CertyoError::new(
            PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            format!("certyo_cdc: DETACH PARTITION ... CONCURRENTLY would take the rows of {child} out of tracked table {table} without their deletes captured"),
        )
        .detail("Rows that leave a tracked table are deletes for Certyo: certyo_cdc queues a delete of each in the detaching transaction, which needs the partition held still; a concurrent detach lets writers change it while it leaves.")
        .hint(format!("Detach it without CONCURRENTLY (a delete of each of its rows is queued), or call certyo.untrack('{table}') first.")));
    }
    // Handled: the outcome check after the statement lets the partition go (`outcome`).
    super::outcome::note(child, table, super::outcome::Moved::Out);
    if crate::capture::replica_session() {
        return Ok(());
    }
    hold_still(parent, child)?;
    let mut queued = 0;
    each_row(child, &options, Snapshot::Latest, |plan, row, _| {
        // SAFETY: `each_row` hands over rows of the table it built `plan` for, inside the
        // statement's transaction, which may write.
        unsafe {
            let change = plan.change(Operation::Delete, row)?;
            if change.record_id.is_empty() {
                return Ok(()); // a record Certyo never held (see capture's delete)
            }
            queued += 1;
            queue::append(plan.relid, plan.table_id, &plan.collection, &change).map(|_| ())
        }
    })?;
    if queued > 0 {
        notice!(
            "certyo_cdc: {queued} row(s) leave tracked table {} with partition {}: a delete of each is queued",
            name_of(table)?,
            name_of(child)?
        );
    }
    Ok(())
}

/// Before `TRUNCATE` of the `named` tables (and, `cascade`, of every table whose foreign keys
/// reference them, as `TRUNCATE ... CASCADE` empties them too): refused when one is a partition
/// of a tracked table, as `TRUNCATE` of the table itself is (by its guard trigger, which
/// PostgreSQL does not clone onto partitions): the rows would go without their deletes captured.
pub fn refuse_truncating_partitions(named: Vec<Oid>, cascade: bool) -> Result<()> {
    let truncated = if cascade {
        super::latest::one::<Vec<Oid>>(
            "WITH RECURSIVE t (relid) AS (
               SELECT pg_catalog.unnest($1::pg_catalog.oid[])
               UNION SELECT k.conrelid FROM pg_catalog.pg_constraint k JOIN t ON k.confrelid OPERATOR(pg_catalog.=) t.relid
                      WHERE k.contype OPERATOR(pg_catalog.=) 'f')
             SELECT pg_catalog.array_agg(relid) FROM t",
            &[named.into()],
        )?
        .unwrap_or_default()
    } else {
        named
    };
    truncated
        .into_iter()
        .try_for_each(refuse_truncating_partition)
}

fn refuse_truncating_partition(relid: Oid) -> Result<()> {
    let Some((table, _)) = tracked_table_of(relid, false)? else {
        return Ok(());
    };
    let (table, partition) = (name_of(table)?, name_of(relid)?);
    Err(CertyoError::new(
        PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
        format!("certyo_cdc: TRUNCATE of {partition}, a partition of tracked table {table}, is refused"),
    )
    .detail("TRUNCATE removes rows without recording their deletion, so Certyo would never hear of it.")
    .hint(format!(
        "Use DELETE FROM {partition} to record every deletion, or detach it (DETACH PARTITION queues a delete of every row it takes out of {table})."
    )))
}

/// `pg_trigger t` is a tracked table's own capture trigger: its name, not a partition's clone,
/// and of the extension's function, known by `pg_depend`, never by its name alone, which anyone's
/// function may have where the extension is not installed.
pub(super) const OWN_CAPTURE_TRIGGER: &str = "t.tgname OPERATOR(pg_catalog.=) 'certyo_capture' AND t.tgparentid OPERATOR(pg_catalog.=) 0
    AND EXISTS (SELECT FROM pg_catalog.pg_depend d
                  JOIN pg_catalog.pg_extension e ON e.oid OPERATOR(pg_catalog.=) d.refobjid
                       AND e.extname OPERATOR(pg_catalog.=) 'certyo_cdc'
                 WHERE d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_proc'::pg_catalog.regclass
                   AND d.objid OPERATOR(pg_catalog.=) t.tgfoid
                   AND d.refclassid OPERATOR(pg_catalog.=) 'pg_catalog.pg_extension'::pg_catalog.regclass
                   AND d.deptype OPERATOR(pg_catalog.=) 'e')";

/// Whether `relid` is a table (plain or partitioned), as a partition must be.
fn is_table(relid: Oid) -> Result<bool> {
    Ok(super::latest::one::<bool>(
        "SELECT (SELECT c.relkind OPERATOR(pg_catalog.=) ANY (ARRAY['r', 'p']::pg_catalog.\"char\"[])
                   FROM pg_catalog.pg_class c WHERE c.oid OPERATOR(pg_catalog.=) $1)",
        &[relid.into()],
    )?
    .unwrap_or(false))
}

/// The extension that `relid`, or a table under it, or its schema, is a member of, if any.
fn extension_member_within(relid: Oid) -> Result<Option<String>> {
    super::latest::one::<String>(
        "SELECT (SELECT e.extname::pg_catalog.text
                   FROM (SELECT $1 AS relid UNION SELECT relid FROM pg_catalog.pg_partition_tree($1)) p
                   JOIN pg_catalog.pg_class c ON c.oid OPERATOR(pg_catalog.=) p.relid
                   JOIN pg_catalog.pg_depend d
                     ON d.deptype OPERATOR(pg_catalog.=) 'e'
                    AND d.refclassid OPERATOR(pg_catalog.=) 'pg_catalog.pg_extension'::pg_catalog.regclass
                    AND ((d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_class'::pg_catalog.regclass
                          AND d.objid OPERATOR(pg_catalog.=) c.oid)
                      OR (d.classid OPERATOR(pg_catalog.=) 'pg_catalog.pg_namespace'::pg_catalog.regclass
                          AND d.objid OPERATOR(pg_catalog.=) c.relnamespace))
                   JOIN pg_catalog.pg_extension e ON e.oid OPERATOR(pg_catalog.=) d.refobjid
                  LIMIT 1)",
        &[relid.into()],
    )
}

/// A table tracked on its own in `relid`'s partition tree (`relid` itself, or below it), if any.
fn tracked_within(relid: Oid) -> Result<Option<Oid>> {
    super::latest::one::<Oid>(
        &format!(
            "SELECT (SELECT t.tgrelid
                       FROM (SELECT $1 AS relid UNION SELECT relid FROM pg_catalog.pg_partition_tree($1)) p
                       JOIN pg_catalog.pg_trigger t ON t.tgrelid OPERATOR(pg_catalog.=) p.relid
                      WHERE {OWN_CAPTURE_TRIGGER}
                      LIMIT 1)"
        ),
        &[relid.into()],
    )
}

/// Before `ALTER EXTENSION ... ADD TABLE relid`: refused for a partition of a tracked table. A
/// drop of that extension would drop the partition with it, its rows gone uncaptured (a drop of
/// such a partition is refused; see [`before_rows_leave`]).
pub fn refuse_extension_member(relid: Oid, extension: &str) -> Result<()> {
    let Some((table, _)) = tracked_table_of(relid, false)? else {
        return Ok(());
    };
    let (table, partition) = (name_of(table)?, name_of(relid)?);
    Err(CertyoError::new(
        PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
        format!("certyo_cdc: {partition}, a partition of tracked table {table}, cannot become a member of extension {extension}"),
    )
    .detail(format!("DROP EXTENSION {extension} would drop it, and its rows would leave {table} without their deletes captured."))
    .hint(format!("Detach it from {table} first (DETACH PARTITION queues a delete of each of its rows).")))
}

/// Whether the session's user owns `relid` (as a member of the owning role, or as a superuser),
/// or (`or_schema`) its schema: what PostgreSQL asks of `DROP TABLE` (`DETACH PARTITION` asks it
/// of the partitioned table).
pub fn owns(relid: Oid, or_schema: bool) -> Result<bool> {
    Ok(super::latest::one::<bool>(
        "SELECT (SELECT pg_catalog.pg_has_role(c.relowner, 'USAGE')
                        OR ($2 AND pg_catalog.pg_has_role(n.nspowner, 'USAGE'))
                   FROM pg_catalog.pg_class c
                   JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
                  WHERE c.oid OPERATOR(pg_catalog.=) $1)",
        &[relid.into(), or_schema.into()],
    )?
    .unwrap_or(false))
}

/// The partitions of tracked tables in `schemas`, or owned by `roles` or in a schema they own,
/// whose tracked table is none of these: what `DROP SCHEMA ... CASCADE` or `DROP OWNED BY`
/// (which drops the roles' schemas, with `CASCADE` whatever is in them) takes out of a table
/// that stays.
pub fn partitions_dropped_with(schemas: &[Oid], roles: &[Oid]) -> Result<Vec<Oid>> {
    let candidates = super::latest::one::<Vec<Oid>>(
        "SELECT pg_catalog.array_agg(c.oid) FROM pg_catalog.pg_class c
          WHERE c.relispartition AND c.relkind OPERATOR(pg_catalog.=) ANY (ARRAY['r', 'p']::pg_catalog.\"char\"[])
            AND (c.relnamespace OPERATOR(pg_catalog.=) ANY ($1) OR c.relowner OPERATOR(pg_catalog.=) ANY ($2)
                 OR c.relnamespace IN (SELECT n.oid FROM pg_catalog.pg_namespace n
                                        WHERE n.nspowner OPERATOR(pg_catalog.=) ANY ($2)))",
        &[schemas.to_vec().into(), roles.to_vec().into()],
    )?
    .unwrap_or_default();
    let mut leaving = Vec::new();
    for relid in candidates {
        let Some((table, _)) = tracked_table_of(relid, false)? else {
            continue;
        };
        let table_goes = super::latest::one::<bool>(
            "SELECT (SELECT c.relnamespace OPERATOR(pg_catalog.=) ANY ($2) OR c.relowner OPERATOR(pg_catalog.=) ANY ($3)
                            OR n.nspowner OPERATOR(pg_catalog.=) ANY ($3)
                       FROM pg_catalog.pg_class c
                       JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
                      WHERE c.oid OPERATOR(pg_catalog.=) $1)",
            &[table.into(), schemas.to_vec().into(), roles.to_vec().into()],
        )?
        .unwrap_or(true);
        if !table_goes {
            leaving.push(relid);
        }
    }
    Ok(leaving)
}

/// Of the tables a statement takes out, those not under another of them (`DROP TABLE p, p_1`
/// where `p_1` is a partition of `p`: `p` is the one the statement is refused for).
pub fn outermost(tables: Vec<(Oid, Leaving)>) -> Result<Vec<(Oid, Leaving)>> {
    if tables.len() < 2 {
        return Ok(tables);
    }
    let all: Vec<Oid> = tables.iter().map(|(relid, _)| *relid).collect();
    let mut kept = Vec::with_capacity(tables.len());
    for (relid, how) in tables {
        let under_another = super::latest::one::<bool>(
            "SELECT EXISTS (SELECT FROM pg_catalog.pg_partition_ancestors($1) a
                             WHERE a.relid OPERATOR(pg_catalog.<>) $1 AND a.relid OPERATOR(pg_catalog.=) ANY ($2))",
            &[relid.into(), all.clone().into()],
        )?
        .unwrap_or(false);
        if !under_another {
            kept.push((relid, how));
        }
    }
    Ok(kept)
}

/// The tracked table `relid` belongs to, with its options: an ancestor of a partition, or
/// (`itself`) the table itself. Asked in every database for every table a statement drops,
/// detaches or attaches: a table that is no partition (unless `itself`) is answered without a
/// query, and the capture trigger is known by the extension's function
/// (`pg_depend`), never by its name alone, which anyone's trigger may have where the extension
/// is not installed.
pub(super) fn tracked_table_of(relid: Oid, itself: bool) -> Result<Option<(Oid, CaptureOptions)>> {
    // SAFETY: a catalog lookup inside the statement's transaction.
    if !itself && !unsafe { pg_sys::get_rel_relispartition(relid) } {
        return Ok(None);
    }
    let root = super::latest::one::<Oid>(
        &format!(
            "SELECT (SELECT t.tgrelid
                       FROM (SELECT $1 AS relid UNION SELECT relid FROM pg_catalog.pg_partition_ancestors($1)) a
                       JOIN pg_catalog.pg_trigger t ON t.tgrelid OPERATOR(pg_catalog.=) a.relid
                      WHERE ($2 OR a.relid OPERATOR(pg_catalog.<>) $1) AND {OWN_CAPTURE_TRIGGER}
                      LIMIT 1)"
        ),
        &[relid.into(), itself.into()],
    )?;
    let Some(root) = root else {
        return Ok(None);
    };
    Ok(installed_options_now(root)?.map(|options| (root, options)))
}

/// Lock `parent` (if any) and `child` in `ACCESS EXCLUSIVE` mode, as `DETACH PARTITION` locks
/// them and in its order, then every partition under `child` against writers (`SHARE`; the
/// statement does not lock them, and a writer into one of them would add a row that leaves
/// uncaptured): the rows read next are all the rows there are until the transaction ends. (A
/// writer that holds such a partition and waits for the table would meet these locks in a
/// circle; PostgreSQL's deadlock detection ends one of the two.)
fn hold_still(parent: Option<Oid>, child: Oid) -> Result<()> {
    let exclusive = pg_sys::AccessExclusiveLock as pg_sys::LOCKMODE;
    // SAFETY: lock requests inside a transaction; they are released when it ends.
    unsafe {
        if let Some(parent) = parent {
            pg_sys::LockRelationOid(parent, exclusive);
        }
        pg_sys::LockRelationOid(child, exclusive);
    }
    let below = super::latest::one::<Vec<Oid>>(
        "SELECT pg_catalog.array_agg(relid::pg_catalog.oid ORDER BY level, relid) FROM pg_catalog.pg_partition_tree($1)
          WHERE relid OPERATOR(pg_catalog.<>) $1",
        &[child.into()],
    )?
    .unwrap_or_default();
    for partition in below {
        // SAFETY: as above.
        unsafe { pg_sys::LockRelationOid(partition, pg_sys::ShareLock as pg_sys::LOCKMODE) };
    }
    Ok(())
}

/// The partitioned table `child` is a partition of, if it is one.
pub fn partition_parent(child: Oid) -> Result<Option<Oid>> {
    // SAFETY: a catalog lookup inside the statement's transaction.
    if !unsafe { pg_sys::get_rel_relispartition(child) } {
        return Ok(None);
    }
    super::latest::one::<Oid>(
        "SELECT (SELECT inhparent FROM pg_catalog.pg_inherits WHERE inhrelid OPERATOR(pg_catalog.=) $1)",
        &[child.into()],
    )
}

/// A relation's name as SQL reads it (schema-qualified under the pinned search path).
pub(super) fn name_of(relid: Oid) -> Result<String> {
    Ok(super::latest::one::<String>(
        "SELECT $1::pg_catalog.regclass::pg_catalog.text",
        &[relid.into()],
    )?
    .unwrap_or_default())
}
