//! What certyo_cdc checks before a utility statement runs, where an event trigger would be too
//! late (the statement has failed on, or already dropped, what capture needs):
//! - `DROP EXTENSION certyo_cdc` takes the queue and the worker's tables with it. Changes that
//!   were captured but not yet delivered exist nowhere else, so a plain `DROP EXTENSION` with
//!   such changes is refused, naming how many and what to do; `DROP EXTENSION ... CASCADE`
//!   discards them, with a WARNING that counts them.
//! - `ALTER TABLE ... DROP COLUMN` / `ALTER COLUMN ... TYPE` of a business column of a tracked
//!   table: a capture trigger installed by 0.1.0 with an `UPDATE OF` list is replaced
//!   first (one fired by every UPDATE), so the statement neither fails on the trigger's
//!   dependency nor (with CASCADE) drops the trigger; the DDL event trigger re-plans capture
//!   when the statement ends (see `crate::track`).
//! - `DROP TRIGGER` of one of certyo_cdc's triggers on a tracked table is refused, and so are
//!   renaming it, tying it to another extension (`DEPENDS ON EXTENSION`), and giving a trigger
//!   of the owner's its name (`CREATE OR REPLACE TRIGGER`, a rename): `certyo.untrack()` stops
//!   capture.
//! - `DROP INDEX` of the last unique index on a tracked table's record id columns is refused:
//!   they would no longer identify a row.
//! - `ATTACH PARTITION` to a tracked partitioned table gives the new partition the bookkeeping
//!   columns first (the partition must have every column of the table), and afterwards queues
//!   an upsert of each row it brought; `DETACH PARTITION` queues a delete of each row that
//!   leaves; a drop of a partition, `DETACH ... CONCURRENTLY` and `TRUNCATE` of a partition are
//!   refused (`crate::track`'s partitions), and so is making a partition another extension's
//!   member; inheriting from a tracked table (`INHERITS`, `INHERIT`) is refused: the parent's
//!   triggers never see the child's rows.
//! - In the modes that write back, `CREATE TRIGGER` and `ALTER TRIGGER ... RENAME` of a BEFORE
//!   UPDATE row trigger named to fire after the marks trigger are refused on a tracked table and
//!   its partitions (`crate::track`'s trigger order).
//!
//! - Databases and their delivery workers (`crate::delivery`'s launcher starts one per
//!   database): `CREATE EXTENSION certyo_cdc` and `CREATE DATABASE` wake the launcher, which
//!   starts a worker for the new database; `DROP DATABASE` by its owner first asks the
//!   database's worker to end (it would otherwise hold a connection that makes the drop fail),
//!   and wakes the launcher afterwards, so a drop that failed gets its worker back.
//!
//! A `ProcessUtility_hook`, installed whenever the library is loaded: with the library
//! preloaded (as delivery needs) every session has it. A session that never loaded the library
//! runs these statements unchecked, as without the extension.

use crate::error::{CertyoError, OrRaise};
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::PgSqlErrorCode;
use std::ffi::CStr;

static mut PREVIOUS: pg_sys::ProcessUtility_hook_type = None;

/// From `_PG_init`: put the check in front of every utility statement.
pub fn install() {
    // SAFETY: `_PG_init` runs once per process, in its main thread, before any statement; the
    // hook that was there is kept and called after ours.
    unsafe {
        PREVIOUS = pg_sys::ProcessUtility_hook;
        pg_sys::ProcessUtility_hook = Some(process_utility);
    }
}

/// # Safety
/// Called only by PostgreSQL, as its `ProcessUtility_hook`, with the arguments it would pass
/// `standard_ProcessUtility`.
#[pg_guard]
#[allow(clippy::too_many_arguments)]
unsafe extern "C-unwind" fn process_utility(
    pstmt: *mut pg_sys::PlannedStmt,
    query: *const std::ffi::c_char,
    read_only_tree: bool,
    context: pg_sys::ProcessUtilityContext::Type,
    params: pg_sys::ParamListInfo,
    env: *mut pg_sys::QueryEnvironment,
    dest: *mut pg_sys::DestReceiver,
    qc: *mut pg_sys::QueryCompletion,
) {
    // SAFETY: Postgres passes a valid planned utility statement.
    let statement = unsafe { (*pstmt).utilityStmt };
    // The checks run in the session of whoever runs the DDL, a superuser's too: each with
    // search_path pinned, so that no operator or function planted on that session's path runs
    // in them (pinned only for the statements they concern, not for every utility statement).
    use crate::rights::with_pinned_search_path as pinned;
    // The tracked tables' partitions before a statement that may move tables in or out of them
    // (with whether it may bring some in), to check its outcome by (see `Trees`).
    // SAFETY: `statement` is null or a valid parse node, read-only here.
    let reshapes = unsafe { reshapes_partition_trees(statement) };
    let installed = reshapes.is_some() && installed_here();
    let trees = reshapes
        .filter(|_| installed)
        .map(|attaching| (pinned(crate::track::Trees::read).or_raise(), attaching));
    // The names the checks below go by, as they resolve now, to compare with what they mean
    // after the statement (see `NamedRelation`).
    // SAFETY: `statement` is null or a valid parse node, read-only here.
    let named = unsafe { named_relations(statement) };
    let named = if !named.is_empty() && installed_here() {
        named
    } else {
        Vec::new()
    };
    // SAFETY: `statement` is null or a valid parse node, read-only here.
    unsafe {
        if let Some(cascade) = drops_this_extension(statement) {
            pinned(|| check_backlog(cascade));
        }
        if let Some((relid, _, recurse)) = alters_column_types_or_drops(statement) {
            pinned(|| crate::track::release_columns(relid, recurse)).or_raise();
        }
        for (partition, trigger) in fires_triggers_of_a_partition(statement) {
            pinned(|| crate::track::refuse_firing_change_of_clones(partition, &trigger)).or_raise();
        }
        if let Some((table, trigger, touch)) = touches_own_trigger(statement) {
            pinned(|| crate::track::refuse_touching_own_trigger(table, &trigger, touch)).or_raise();
        }
        let indexes = dropped_indexes(statement);
        if !indexes.is_empty() {
            pinned(|| crate::track::before_index_drop(&indexes)).or_raise();
        }
        for (parent, child) in attaches_or_inherits(statement) {
            pinned(|| match child {
                Attach::Partition(child) => crate::track::before_attach(parent, child),
                Attach::Inheritance => crate::track::refuse_inheriting_from(parent),
            })
            .or_raise();
        }
        let leaving = leaving_tables(statement);
        if !leaving.is_empty() {
            pinned(|| {
                crate::track::outermost(leaving)?
                    .into_iter()
                    .try_for_each(|(child, how)| crate::track::before_rows_leave(child, how))
            })
            .or_raise();
        }
        if let Some((named, cascade)) = truncated(statement) {
            pinned(|| crate::track::refuse_truncating_partitions(named, cascade)).or_raise();
        }
        if let Some((relid, extension)) = adds_table_to_extension(statement) {
            pinned(|| crate::track::refuse_extension_member(relid, &extension)).or_raise();
        }
        if let Some((relid, name, renamed)) = names_a_before_update_trigger(statement) {
            pinned(|| crate::track::refuse_trigger_after_marks(relid, &name, renamed.as_deref()))
                .or_raise();
        }
    }
    // SAFETY: as above.
    let attached: Vec<pg_sys::Oid> = unsafe { attaches_or_inherits(statement) }
        .into_iter()
        .filter_map(|(_, how)| match how {
            Attach::Partition(child) => Some(child),
            Attach::Inheritance => None,
        })
        .collect();
    // SAFETY: as above.
    let database_statement = unsafe { database_statement(statement) };
    // SAFETY: a catalog lookup inside the statement's transaction.
    let new_extension = matches!(database_statement, Some(DatabaseStatement::CreateExtension))
        && unsafe { pg_sys::get_extension_oid(c"certyo_cdc".as_ptr(), true) } == pg_sys::InvalidOid;
    let dropping = match &database_statement {
        // SAFETY: a catalog lookup inside the statement's transaction.
        Some(DatabaseStatement::Drop(name)) => unsafe { stop_worker_of(name) },
        _ => None,
    };
    let Some(database) = dropping else {
        // SAFETY: as below.
        unsafe { run_previous(pstmt, query, read_only_tree, context, params, env, dest, qc) };
        for name in &named {
            // SAFETY: the statement's parse tree outlives its execution.
            unsafe { name.refuse_if_it_moved() }.or_raise();
        }
        // SAFETY: the statement's parse tree outlives its execution.
        unsafe { check_again_after(statement) };
        if let Some((trees, attaching)) = &trees {
            crate::rights::with_pinned_search_path(|| trees.check_after(*attaching)).or_raise();
        }
        for child in attached {
            crate::rights::with_pinned_search_path(|| crate::track::after_attach(child)).or_raise();
        }
        // Only a statement that did something wakes the launcher (one that failed raised an
        // error and never gets here; `IF NOT EXISTS` of an installed extension did nothing),
        // and only when its transaction commits: the launcher must see the new database or
        // extension. Anyone can try CREATE EXTENSION; only a superuser's succeeds.
        if new_extension || matches!(database_statement, Some(DatabaseStatement::Create)) {
            crate::wake::ring_launcher_at_commit();
        }
        return;
    };
    PgTryBuilder::new(|| {
        // SAFETY: as below.
        unsafe { run_previous(pstmt, query, read_only_tree, context, params, env, dest, qc) }
    })
    .catch_others(|error| {
        // The database stays (another session is connected, say): its worker may return.
        crate::wake::drop_failed(database);
        crate::wake::ring_launcher();
        error.rethrow()
    })
    .execute();
}

/// Whether certyo_cdc is installed in this database.
fn installed_here() -> bool {
    // SAFETY: a catalog lookup inside the statement's transaction.
    unsafe { pg_sys::get_extension_oid(c"certyo_cdc".as_ptr(), true) != pg_sys::InvalidOid }
}

/// The checks of a `TRUNCATE`, a `DROP TRIGGER` (or rename, or replacement) of certyo_cdc's
/// triggers, an `INHERIT` (`CREATE TABLE ... INHERITS`), an `ENABLE` / `DISABLE TRIGGER` of a
/// partition's clone of them, an `ALTER EXTENSION ... ADD TABLE` and a BEFORE UPDATE trigger
/// named to fire after the marks trigger, run again after the statement on
/// the relations it acted on, which it now holds locked. Before it, they went by what its names
/// meant then; while it waited for a lock another session may have tracked the table (or
/// attached it to a tracked one), or renamed a tracked table, or a partition, to the name. Each
/// raises as before the statement, and the statement rolls back.
///
/// # Safety
/// `statement` is null or a valid parse node, after it ran, inside its transaction.
unsafe fn check_again_after(statement: *mut pg_sys::Node) {
    use crate::rights::with_pinned_search_path as pinned;
    // Only these statements read the catalog here: every other utility statement, `SET` and
    // `BEGIN` among them, pays nothing.
    // SAFETY: the caller upholds this function's contract (its `# Safety` section).
    let (truncating, trigger, child, firing, member, before_update) = unsafe {
        (
            truncated(statement),
            touches_own_trigger(statement),
            inheriting_child(statement),
            fires_triggers_of_a_partition(statement),
            adds_table_to_extension(statement),
            names_a_before_update_trigger(statement),
        )
    };
    if (truncating.is_none()
        && trigger.is_none()
        && child.is_none()
        && firing.is_empty()
        && member.is_none()
        && before_update.is_none())
        || !installed_here()
    {
        return;
    }
    for (partition, trigger) in firing {
        pinned(|| crate::track::refuse_firing_change_of_clones(partition, &trigger)).or_raise();
    }
    if let Some((relid, extension)) = member {
        pinned(|| crate::track::refuse_extension_member(relid, &extension)).or_raise();
    }
    if let Some((relid, name, renamed)) = before_update {
        // A renamed trigger has its new name now.
        let renamed = renamed.map(|_| name.as_str());
        pinned(|| crate::track::refuse_trigger_after_marks(relid, &name, renamed)).or_raise();
    }
    if let Some((named, cascade)) = truncating {
        pinned(|| crate::track::refuse_truncating_partitions(named, cascade)).or_raise();
    }
    if let Some((table, trigger, touch)) = trigger {
        pinned(|| crate::track::refuse_touching_own_trigger(table, &trigger, touch)).or_raise();
    }
    if let Some(child) = child {
        pinned(|| crate::track::refuse_inheriting_child(child)).or_raise();
    }
}

/// The table a `CREATE TABLE ... INHERITS` made, or an `ALTER TABLE ... INHERIT` changed, as its
/// name resolves after the statement.
///
/// # Safety
/// `stmt` is null or a valid parse node.
unsafe fn inheriting_child(stmt: *mut pg_sys::Node) -> Option<pg_sys::Oid> {
    // SAFETY: the caller upholds this function's contract (its `# Safety` section), on which
    // every unsafe operation below relies.
    unsafe {
        if stmt.is_null() {
            return None;
        }
        match (*stmt).type_ {
            // `CreateForeignTableStmt` begins with its `CreateStmt`.
            pg_sys::NodeTag::T_CreateStmt | pg_sys::NodeTag::T_CreateForeignTableStmt => {
                let create = stmt.cast::<pg_sys::CreateStmt>();
                let inherits = (*create).partbound.is_null()
                    && !pgrx::PgList::<pg_sys::RangeVar>::from_pg((*create).inhRelations)
                        .is_empty();
                if inherits {
                    resolve((*create).relation)
                } else {
                    None
                }
            }
            pg_sys::NodeTag::T_AlterTableStmt => {
                let alter = stmt.cast::<pg_sys::AlterTableStmt>();
                let commands = pgrx::PgList::<pg_sys::AlterTableCmd>::from_pg((*alter).cmds);
                let inherits = commands
                    .iter_ptr()
                    .any(|c| !c.is_null() && (*c).subtype == pg_sys::AlterTableType::AT_AddInherit);
                if inherits && !(*alter).relation.is_null() {
                    resolve((*alter).relation)
                } else {
                    None
                }
            }
            _ => None,
        }
    }
}

/// A name a statement gives to a table or index that the checks before it went by: for a
/// `TRUNCATE`, a `DROP TRIGGER ... ON`, a `DROP INDEX`, an `INHERIT`. Resolved before the
/// statement, the name may mean another relation by the time the statement, having waited for a
/// lock, resolves it again (another session renamed its relation away and a tracked table, or
/// its index or partition, to the name): the checks then judged one relation and the statement
/// acted on another. Checked after the statement, while it holds what it locked: it is refused
/// (40001), and rolls back, when the name no longer means what the checks saw.
struct NamedRelation {
    name: *mut pg_sys::RangeVar,
    /// What it meant before the statement.
    relid: Option<pg_sys::Oid>,
    /// The statement drops it (`DROP INDEX`): the relation the checks saw must be gone.
    dropped: bool,
}

impl NamedRelation {
    /// # Safety
    /// `self.name` is still valid (the statement's parse tree), inside the statement's
    /// transaction.
    unsafe fn refuse_if_it_moved(&self) -> crate::error::Result<()> {
        // SAFETY: the caller upholds this function's contract (its `# Safety` section).
        let (moved, shown) = unsafe {
            let moved = if self.dropped {
                // Something else went, if what the checks saw is still there.
                self.relid
                    .is_some_and(|relid| !pg_sys::get_rel_name(relid).is_null())
            } else {
                resolve(self.name) != self.relid
            };
            let text =
                |p: *const std::ffi::c_char| CStr::from_ptr(p).to_string_lossy().into_owned();
            let relname = text((*self.name).relname);
            let shown = if (*self.name).schemaname.is_null() {
                relname
            } else {
                format!("{}.{relname}", text((*self.name).schemaname))
            };
            (moved, shown)
        };
        if !moved {
            return Ok(());
        }
        Err(CertyoError::new(
            PgSqlErrorCode::ERRCODE_T_R_SERIALIZATION_FAILURE,
            format!("certyo_cdc: \"{shown}\" came to mean another relation while this statement waited for a lock"),
        )
        .detail("certyo_cdc's checks went by what the name meant when the statement began; another session renamed relations while it waited, and the statement acted on one the checks did not see (a tracked table, its index or one of its partitions, perhaps).")
        .hint("Run the statement again."))
    }
}

/// The names of the statements whose checks go by a relation's name ([`NamedRelation`]), each
/// resolved now.
///
/// # Safety
/// `stmt` is null or a valid parse node.
unsafe fn named_relations(stmt: *mut pg_sys::Node) -> Vec<NamedRelation> {
    // SAFETY: the caller upholds this function's contract (its `# Safety` section), on which
    // every unsafe operation below relies.
    unsafe {
        let mut names: Vec<(*mut pg_sys::RangeVar, bool)> = Vec::new();
        if stmt.is_null() {
            return Vec::new();
        }
        if (*stmt).type_ == pg_sys::NodeTag::T_DropStmt {
            let drop = stmt.cast::<pg_sys::DropStmt>();
            if (*drop).removeType == pg_sys::ObjectType::OBJECT_INDEX {
                let objects = pgrx::PgList::<pg_sys::List>::from_pg((*drop).objects);
                for name in objects.iter_ptr().filter(|n| !n.is_null()) {
                    names.push((pg_sys::makeRangeVarFromNameList(name), true));
                }
            }
        }
        names
            .into_iter()
            .filter(|(name, _)| !name.is_null())
            .map(|(name, dropped)| NamedRelation {
                name,
                relid: resolve(name),
                dropped,
            })
            .collect()
    }
}

/// Pass the statement on, as received, to the previous hook or the standard implementation,
/// as every ProcessUtility hook must.
///
/// # Safety
/// The arguments are those Postgres passed to the hook.
#[allow(clippy::too_many_arguments)]
unsafe fn run_previous(
    pstmt: *mut pg_sys::PlannedStmt,
    query: *const std::ffi::c_char,
    read_only_tree: bool,
    context: pg_sys::ProcessUtilityContext::Type,
    params: pg_sys::ParamListInfo,
    env: *mut pg_sys::QueryEnvironment,
    dest: *mut pg_sys::DestReceiver,
    qc: *mut pg_sys::QueryCompletion,
) {
    // SAFETY: the caller passes the hook's arguments unchanged.
    unsafe {
        match PREVIOUS {
            Some(previous) => {
                previous(pstmt, query, read_only_tree, context, params, env, dest, qc)
            }
            None => pg_sys::standard_ProcessUtility(
                pstmt,
                query,
                read_only_tree,
                context,
                params,
                env,
                dest,
                qc,
            ),
        }
    }
}

enum DatabaseStatement {
    CreateExtension,
    Create,
    Drop(String),
}

/// `CREATE EXTENSION certyo_cdc`, `CREATE DATABASE` or `DROP DATABASE name`.
///
/// # Safety
/// `stmt` is null or a valid parse node.
unsafe fn database_statement(stmt: *mut pg_sys::Node) -> Option<DatabaseStatement> {
    // SAFETY: the caller upholds this function's contract (its `# Safety` section), on which
    // every unsafe operation below relies.
    unsafe {
        if stmt.is_null() {
            return None;
        }
        match (*stmt).type_ {
            pg_sys::NodeTag::T_CreateExtensionStmt => {
                let create = stmt.cast::<pg_sys::CreateExtensionStmt>();
                (CStr::from_ptr((*create).extname) == c"certyo_cdc")
                    .then_some(DatabaseStatement::CreateExtension)
            }
            pg_sys::NodeTag::T_CreatedbStmt => Some(DatabaseStatement::Create),
            pg_sys::NodeTag::T_DropdbStmt => {
                let drop = stmt.cast::<pg_sys::DropdbStmt>();
                let name = CStr::from_ptr((*drop).dbname)
                    .to_string_lossy()
                    .into_owned();
                Some(DatabaseStatement::Drop(name))
            }
            _ => None,
        }
    }
}

/// Ask the delivery worker of database `name` to end, and keep it from starting again, if the
/// current user may drop that database (anyone else's `DROP DATABASE` fails on its own, and
/// must not stop delivery). `DROP DATABASE` waits a few seconds for other connections to go;
/// the worker ends within one, abandoning a batch in flight (sent again later, answered as a
/// replay). Returns the database's OID when it did.
///
/// # Safety
/// Inside a transaction.
unsafe fn stop_worker_of(name: &str) -> Option<pg_sys::Oid> {
    // SAFETY: the caller upholds this function's contract (its `# Safety` section), on which
    // every unsafe operation below relies.
    unsafe {
        let name = std::ffi::CString::new(name).ok()?;
        let database = pg_sys::get_database_oid(name.as_ptr(), true);
        if database == pg_sys::InvalidOid || !crate::compat::owns_database(database) {
            return None;
        }
        if let Some(pid) = crate::wake::drop_database(database) {
            // The worker runs as the same operating-system user as this backend.
            if libc::kill(pid, libc::SIGTERM) != 0 {
                pgrx::warning!(
                    "certyo_cdc: could not ask the delivery worker (pid {pid}) of the database to end: {}",
                    std::io::Error::last_os_error()
                );
            }
        }
        Some(database)
    }
}

/// `Some(cascade)` when `stmt` is a `DROP EXTENSION` naming certyo_cdc.
///
/// # Safety
/// `stmt` is null or a valid parse node.
unsafe fn drops_this_extension(stmt: *mut pg_sys::Node) -> Option<bool> {
    // SAFETY: the caller upholds this function's contract (its `# Safety` section), on which
    // every unsafe operation below relies.
    unsafe {
        if stmt.is_null() || (*stmt).type_ != pg_sys::NodeTag::T_DropStmt {
            return None;
        }
        let drop = stmt.cast::<pg_sys::DropStmt>();
        if (*drop).removeType != pg_sys::ObjectType::OBJECT_EXTENSION {
            return None;
        }
        let names = pgrx::PgList::<pg_sys::Node>::from_pg((*drop).objects);
        let ours = names.iter_ptr().any(|name| {
            !name.is_null()
                && (*name).type_ == pg_sys::NodeTag::T_String
                && CStr::from_ptr((*name.cast::<pg_sys::String>()).sval) == c"certyo_cdc"
        });
        ours.then(|| (*drop).behavior == pg_sys::DropBehavior::DROP_CASCADE)
    }
}

/// `Some((table, columns, recurse))` for an `ALTER TABLE` that drops or retypes `columns`.
///
/// # Safety
/// `stmt` is null or a valid parse node.
unsafe fn alters_column_types_or_drops(
    stmt: *mut pg_sys::Node,
) -> Option<(pg_sys::Oid, Vec<String>, bool)> {
    // SAFETY: the caller upholds this function's contract (its `# Safety` section), on which
    // every unsafe operation below relies.
    unsafe {
        if stmt.is_null() || (*stmt).type_ != pg_sys::NodeTag::T_AlterTableStmt {
            return None;
        }
        let alter = stmt.cast::<pg_sys::AlterTableStmt>();
        if (*alter).objtype != pg_sys::ObjectType::OBJECT_TABLE || (*alter).relation.is_null() {
            return None;
        }
        let commands = pgrx::PgList::<pg_sys::AlterTableCmd>::from_pg((*alter).cmds);
        let columns: Vec<String> = commands
            .iter_ptr()
            .filter(|cmd| {
                !cmd.is_null()
                    && !(**cmd).name.is_null()
                    && matches!(
                        (**cmd).subtype,
                        pg_sys::AlterTableType::AT_DropColumn
                            | pg_sys::AlterTableType::AT_AlterColumnType
                    )
            })
            .map(|cmd| CStr::from_ptr((*cmd).name).to_string_lossy().into_owned())
            .collect();
        if columns.is_empty() {
            return None;
        }
        // Resolved without a lock: ALTER TABLE locks the table itself, and a name that resolves
        // to nothing or to an untracked table leaves nothing to do here.
        let relid = pg_sys::RangeVarGetRelidExtended(
            (*alter).relation,
            pg_sys::NoLock as pg_sys::LOCKMODE,
            pg_sys::RVROption::RVR_MISSING_OK,
            None,
            std::ptr::null_mut(),
        );
        (relid != pg_sys::InvalidOid).then(|| (relid, columns, (*(*alter).relation).inh))
    }
}

/// How a table comes under another.
enum Attach {
    /// `ALTER TABLE parent ATTACH PARTITION child`.
    Partition(pg_sys::Oid),
    /// `CREATE TABLE ... INHERITS (parent)` or `ALTER TABLE ... INHERIT parent`.
    Inheritance,
}

/// The (parent, how) pairs of a statement that attaches a partition or makes a table inherit.
///
/// # Safety
/// `stmt` is null or a valid parse node.
unsafe fn attaches_or_inherits(stmt: *mut pg_sys::Node) -> Vec<(pg_sys::Oid, Attach)> {
    // SAFETY: the caller upholds this function's contract (its `# Safety` section), on which
    // every unsafe operation below relies.
    unsafe {
        let mut found = Vec::new();
        if stmt.is_null() {
            return found;
        }
        // `CREATE FOREIGN TABLE ... INHERITS` too: its statement begins with a `CreateStmt`.
        if matches!(
            (*stmt).type_,
            pg_sys::NodeTag::T_CreateStmt | pg_sys::NodeTag::T_CreateForeignTableStmt
        ) {
            let create = stmt.cast::<pg_sys::CreateStmt>();
            if (*create).partbound.is_null() {
                let parents = pgrx::PgList::<pg_sys::RangeVar>::from_pg((*create).inhRelations);
                for parent in parents.iter_ptr() {
                    if let Some(parent) = resolve(parent) {
                        found.push((parent, Attach::Inheritance));
                    }
                }
            }
        } else if (*stmt).type_ == pg_sys::NodeTag::T_AlterTableStmt {
            let alter = stmt.cast::<pg_sys::AlterTableStmt>();
            if (*alter).relation.is_null() {
                return found;
            }
            let commands = pgrx::PgList::<pg_sys::AlterTableCmd>::from_pg((*alter).cmds);
            for cmd in commands.iter_ptr() {
                if cmd.is_null() || (*cmd).def.is_null() {
                    continue;
                }
                match (*cmd).subtype {
                    pg_sys::AlterTableType::AT_AttachPartition => {
                        let partition = (*cmd).def.cast::<pg_sys::PartitionCmd>();
                        if let (Some(parent), Some(child)) =
                            (resolve((*alter).relation), resolve((*partition).name))
                        {
                            found.push((parent, Attach::Partition(child)));
                        }
                    }
                    pg_sys::AlterTableType::AT_AddInherit => {
                        if let Some(parent) = resolve((*cmd).def.cast::<pg_sys::RangeVar>()) {
                            found.push((parent, Attach::Inheritance));
                        }
                    }
                    _ => {}
                }
            }
        }
        found
    }
}

/// The tables whose rows a statement takes out of their partitioned table, and how:
/// `ALTER TABLE ... DETACH PARTITION child [CONCURRENTLY]` and `DROP TABLE child, ...` (of any
/// table: `crate::track::before_rows_leave` finds the partitions of tracked tables among them),
/// and the partitions of tracked tables that `DROP SCHEMA ... CASCADE` and `DROP OWNED BY` drop
/// without naming them (those of a tracked table the statement drops too are not taken out).
/// `DETACH ... FINALIZE` completes a concurrent detach begun earlier: not one.
///
/// # Safety
/// `stmt` is null or a valid parse node.
unsafe fn leaving_tables(stmt: *mut pg_sys::Node) -> Vec<(pg_sys::Oid, crate::track::Leaving)> {
    use crate::track::Leaving;
    // SAFETY: the caller upholds this function's contract (its `# Safety` section), on which
    // every unsafe operation below relies.
    unsafe {
        let mut found = Vec::new();
        if stmt.is_null() {
            return found;
        }
        if (*stmt).type_ == pg_sys::NodeTag::T_AlterTableStmt {
            let alter = stmt.cast::<pg_sys::AlterTableStmt>();
            let commands = pgrx::PgList::<pg_sys::AlterTableCmd>::from_pg((*alter).cmds);
            for cmd in commands.iter_ptr() {
                if cmd.is_null()
                    || (*cmd).def.is_null()
                    || (*cmd).subtype != pg_sys::AlterTableType::AT_DetachPartition
                {
                    continue;
                }
                let partition = (*cmd).def.cast::<pg_sys::PartitionCmd>();
                // Only a partition of the table the statement names leaves: with `IF EXISTS` a
                // table that is not there makes the statement do nothing, and PostgreSQL refuses
                // a table that is no partition of it (no delete may be queued for either).
                let Some(parent) = resolve((*alter).relation) else {
                    continue;
                };
                // A concurrent detach commits its first transaction inside the statement, before
                // any check after it could refuse it: its partition is resolved here as the
                // statement resolves it, waiting for the lock it takes (so no rename while it
                // waits makes the name mean another table than the one checked).
                // (Only for whoever may detach from the table: anyone else gets PostgreSQL's
                // refusal, and holds nothing of another's.)
                let may = || {
                    crate::rights::with_pinned_search_path(|| crate::track::owns(parent, false))
                        .or_raise()
                };
                let child = if (*partition).concurrent && may() {
                    resolve_locked(
                        (*partition).name,
                        pg_sys::ShareUpdateExclusiveLock as pg_sys::LOCKMODE,
                    )
                } else {
                    resolve((*partition).name)
                };
                if let Some(child) = child.filter(|&child| {
                    crate::track::partition_parent(child).or_raise() == Some(parent)
                }) {
                    let how = if (*partition).concurrent {
                        Leaving::DetachConcurrently
                    } else {
                        Leaving::Detach
                    };
                    found.push((child, how));
                }
            }
        } else if (*stmt).type_ == pg_sys::NodeTag::T_DropOwnedStmt {
            // The roles' tables go, partitions of others' tracked tables among them.
            let drop = stmt.cast::<pg_sys::DropOwnedStmt>();
            let roles: Vec<pg_sys::Oid> = pgrx::PgList::<pg_sys::RoleSpec>::from_pg((*drop).roles)
                .iter_ptr()
                .filter(|role| !role.is_null())
                .map(|role| pg_sys::get_rolespec_oid(role, true))
                .filter(|role| *role != pg_sys::InvalidOid)
                .collect();
            return crate::rights::with_pinned_search_path(|| {
                crate::track::partitions_dropped_with(&[], &roles)
            })
            .or_raise()
            .into_iter()
            .map(|relid| (relid, Leaving::Drop))
            .collect();
        } else if (*stmt).type_ == pg_sys::NodeTag::T_DropStmt {
            let drop = stmt.cast::<pg_sys::DropStmt>();
            if (*drop).removeType == pg_sys::ObjectType::OBJECT_SCHEMA
                && (*drop).behavior == pg_sys::DropBehavior::DROP_CASCADE
            {
                // The schemas' tables go, partitions of tracked tables elsewhere among them.
                let schemas: Vec<pg_sys::Oid> =
                    pgrx::PgList::<pg_sys::Node>::from_pg((*drop).objects)
                        .iter_ptr()
                        .filter(|name| {
                            !name.is_null() && (**name).type_ == pg_sys::NodeTag::T_String
                        })
                        .map(|name| {
                            pg_sys::get_namespace_oid((*name.cast::<pg_sys::String>()).sval, true)
                        })
                        .filter(|schema| *schema != pg_sys::InvalidOid)
                        .collect();
                return crate::rights::with_pinned_search_path(|| {
                    crate::track::partitions_dropped_with(&schemas, &[])
                })
                .or_raise()
                .into_iter()
                .map(|relid| (relid, Leaving::Drop))
                .collect();
            }
            if (*drop).removeType != pg_sys::ObjectType::OBJECT_TABLE {
                return found;
            }
            let names = pgrx::PgList::<pg_sys::List>::from_pg((*drop).objects);
            for name in names.iter_ptr() {
                if name.is_null() {
                    continue;
                }
                if let Some(child) = resolve(pg_sys::makeRangeVarFromNameList(name)) {
                    found.push((child, Leaving::Drop));
                }
            }
        }
        found
    }
}

/// The table and the new name of a trigger that `CREATE TRIGGER` makes BEFORE UPDATE ... FOR
/// EACH ROW, or that `ALTER TRIGGER old ON table RENAME TO new` renames (with its old name:
/// whether it is such a trigger is looked up). Only when the table exists.
///
/// # Safety
/// `stmt` is null or a valid parse node.
unsafe fn names_a_before_update_trigger(
    stmt: *mut pg_sys::Node,
) -> Option<(pg_sys::Oid, String, Option<String>)> {
    // SAFETY: the caller upholds this function's contract (its `# Safety` section), on which
    // every unsafe operation below relies.
    unsafe {
        if stmt.is_null() {
            return None;
        }
        let text = |name: *const std::ffi::c_char| {
            (!name.is_null()).then(|| CStr::from_ptr(name).to_string_lossy().into_owned())
        };
        if (*stmt).type_ == pg_sys::NodeTag::T_CreateTrigStmt {
            let create = stmt.cast::<pg_sys::CreateTrigStmt>();
            let before_update = (*create).row
                && i32::from((*create).timing) & pg_sys::TRIGGER_TYPE_BEFORE as i32 != 0
                && i32::from((*create).events) & pg_sys::TRIGGER_TYPE_UPDATE as i32 != 0;
            if !before_update || (*create).relation.is_null() {
                return None;
            }
            return Some((
                resolve((*create).relation)?,
                text((*create).trigname)?,
                None,
            ));
        }
        if (*stmt).type_ == pg_sys::NodeTag::T_RenameStmt {
            let rename = stmt.cast::<pg_sys::RenameStmt>();
            if (*rename).renameType != pg_sys::ObjectType::OBJECT_TRIGGER
                || (*rename).relation.is_null()
            {
                return None;
            }
            return Some((
                resolve((*rename).relation)?,
                text((*rename).newname)?,
                Some(text((*rename).subname)?),
            ));
        }
        None
    }
}

/// The table and the extension of `ALTER EXTENSION extension ADD TABLE table`.
///
/// # Safety
/// `stmt` is null or a valid parse node.
unsafe fn adds_table_to_extension(stmt: *mut pg_sys::Node) -> Option<(pg_sys::Oid, String)> {
    // SAFETY: the caller upholds this function's contract (its `# Safety` section), on which
    // every unsafe operation below relies.
    unsafe {
        if stmt.is_null() || (*stmt).type_ != pg_sys::NodeTag::T_AlterExtensionContentsStmt {
            return None;
        }
        let alter = stmt.cast::<pg_sys::AlterExtensionContentsStmt>();
        if (*alter).action <= 0
            || (*alter).objtype != pg_sys::ObjectType::OBJECT_TABLE
            || (*alter).object.is_null()
            || (*(*alter).object).type_ != pg_sys::NodeTag::T_List
            || (*alter).extname.is_null()
        {
            return None;
        }
        let relid = resolve(pg_sys::makeRangeVarFromNameList(
            (*alter).object.cast::<pg_sys::List>(),
        ))?;
        Some((
            relid,
            CStr::from_ptr((*alter).extname)
                .to_string_lossy()
                .into_owned(),
        ))
    }
}

/// The tables a `TRUNCATE` names, and whether it cascades (to the tables whose foreign keys
/// reference them).
///
/// # Safety
/// `stmt` is null or a valid parse node.
unsafe fn truncated(stmt: *mut pg_sys::Node) -> Option<(Vec<pg_sys::Oid>, bool)> {
    // SAFETY: the caller upholds this function's contract (its `# Safety` section), on which
    // every unsafe operation below relies.
    unsafe {
        if stmt.is_null() || (*stmt).type_ != pg_sys::NodeTag::T_TruncateStmt {
            return None;
        }
        let truncate = stmt.cast::<pg_sys::TruncateStmt>();
        let named = pgrx::PgList::<pg_sys::RangeVar>::from_pg((*truncate).relations)
            .iter_ptr()
            .filter(|name| !name.is_null())
            .filter_map(|name| resolve(name))
            .collect();
        Some((
            named,
            (*truncate).behavior == pg_sys::DropBehavior::DROP_CASCADE,
        ))
    }
}

/// The relation a statement names, resolved without a lock (the statement locks it itself),
/// or None when there is none of that name (left to the statement's own error).
///
/// # Safety
/// `name` is a valid `RangeVar`, inside a transaction.
unsafe fn resolve(name: *mut pg_sys::RangeVar) -> Option<pg_sys::Oid> {
    // SAFETY: the caller upholds this function's contract (its `# Safety` section).
    unsafe { resolve_locked(name, pg_sys::NoLock as pg_sys::LOCKMODE) }
}

/// [`resolve`], locking the relation in `mode` (held until the transaction ends), waiting for
/// whoever holds it, and resolving the name again after the wait, as PostgreSQL's own lookups do.
///
/// # Safety
/// As for [`resolve`].
unsafe fn resolve_locked(
    name: *mut pg_sys::RangeVar,
    mode: pg_sys::LOCKMODE,
) -> Option<pg_sys::Oid> {
    // SAFETY: the caller upholds this function's contract (its `# Safety` section).
    let relid = unsafe {
        pg_sys::RangeVarGetRelidExtended(
            name,
            mode,
            pg_sys::RVROption::RVR_MISSING_OK,
            None,
            std::ptr::null_mut(),
        )
    };
    (relid != pg_sys::InvalidOid).then_some(relid)
}

/// Whether `stmt` may move tables into or out of partitioned tables (`Some`), and whether it may
/// bring some in (`Some(true)`: `ALTER TABLE ... ATTACH PARTITION`): a `DROP` of tables,
/// schemas or extensions, any `DROP ... CASCADE` (it reaches tables whatever it names), `DROP
/// OWNED BY`, and `ALTER TABLE` with `ATTACH` or `DETACH PARTITION`. Other statements (a `DROP
/// INDEX`, `DROP FUNCTION` without `CASCADE`) cannot, and pay nothing for the check.
///
/// # Safety
/// `stmt` is null or a valid parse node.
unsafe fn reshapes_partition_trees(stmt: *mut pg_sys::Node) -> Option<bool> {
    // SAFETY: the caller upholds this function's contract (its `# Safety` section), on which
    // every unsafe operation below relies.
    unsafe {
        use pg_sys::AlterTableType as At;
        use pg_sys::ObjectType as Ob;
        if stmt.is_null() {
            return None;
        }
        match (*stmt).type_ {
            pg_sys::NodeTag::T_DropOwnedStmt => Some(false),
            pg_sys::NodeTag::T_DropStmt => {
                let drop = stmt.cast::<pg_sys::DropStmt>();
                let drops_tables = matches!(
                    (*drop).removeType,
                    Ob::OBJECT_TABLE
                        | Ob::OBJECT_FOREIGN_TABLE
                        | Ob::OBJECT_SCHEMA
                        | Ob::OBJECT_EXTENSION
                );
                (drops_tables || (*drop).behavior == pg_sys::DropBehavior::DROP_CASCADE)
                    .then_some(false)
            }
            pg_sys::NodeTag::T_AlterTableStmt => {
                let alter = stmt.cast::<pg_sys::AlterTableStmt>();
                if (*alter).objtype != Ob::OBJECT_TABLE {
                    return None;
                }
                let commands = pgrx::PgList::<pg_sys::AlterTableCmd>::from_pg((*alter).cmds);
                let kinds: Vec<At::Type> = commands
                    .iter_ptr()
                    .filter(|cmd| !cmd.is_null())
                    .map(|cmd| (*cmd).subtype)
                    .collect();
                if kinds.contains(&At::AT_AttachPartition) {
                    Some(true)
                } else if kinds.contains(&At::AT_DetachPartition)
                    || kinds.contains(&At::AT_DetachPartitionFinalize)
                {
                    Some(false)
                } else {
                    None
                }
            }
            _ => None,
        }
    }
}

/// The relation and the trigger name of each `ALTER TABLE ... ENABLE / DISABLE ... TRIGGER name`
/// of a statement: on a partition, it changes the partition's clone of its table's trigger
/// alone, where `certyo.tracked_tables` does not show it.
///
/// # Safety
/// `stmt` is null or a valid parse node.
unsafe fn fires_triggers_of_a_partition(stmt: *mut pg_sys::Node) -> Vec<(pg_sys::Oid, String)> {
    // SAFETY: the caller upholds this function's contract (its `# Safety` section), on which
    // every unsafe operation below relies.
    unsafe {
        use pg_sys::AlterTableType as At;
        if stmt.is_null() || (*stmt).type_ != pg_sys::NodeTag::T_AlterTableStmt {
            return Vec::new();
        }
        let alter = stmt.cast::<pg_sys::AlterTableStmt>();
        if (*alter).objtype != pg_sys::ObjectType::OBJECT_TABLE || (*alter).relation.is_null() {
            return Vec::new();
        }
        // The names first: any other ALTER TABLE (run before and after, see
        // `check_again_after`) resolves nothing.
        let commands = pgrx::PgList::<pg_sys::AlterTableCmd>::from_pg((*alter).cmds);
        let triggers: Vec<String> = commands
            .iter_ptr()
            .filter(|cmd| !cmd.is_null())
            .filter_map(|cmd| match (*cmd).subtype {
                At::AT_EnableTrig
                | At::AT_EnableAlwaysTrig
                | At::AT_EnableReplicaTrig
                | At::AT_DisableTrig => {
                    let name = (*cmd).name;
                    (!name.is_null()).then(|| CStr::from_ptr(name).to_string_lossy().into_owned())
                }
                _ => None,
            })
            .collect();
        if triggers.is_empty() {
            return Vec::new();
        }
        let Some(relid) = resolve((*alter).relation) else {
            return Vec::new();
        };
        triggers.into_iter().map(|name| (relid, name)).collect()
    }
}

/// certyo_cdc's own triggers on a tracked table (see `crate::track::install`).
const OWN_TRIGGERS: [&str; 3] = [
    crate::capture::CAPTURE_TRIGGER,
    crate::capture::TRUNCATE_TRIGGER,
    crate::capture::marks::MARKS_TRIGGER,
];

/// The table (when it exists), the name of one of certyo_cdc's own triggers and what `stmt` does
/// to it: `DROP TRIGGER`, `ALTER TRIGGER ... DEPENDS ON EXTENSION` (whose `DROP EXTENSION` drops
/// it), `ALTER TRIGGER ... RENAME` from its name (out of sight, to be dropped next), or a trigger
/// of the owner's given its name (`CREATE OR REPLACE TRIGGER`, a rename to it).
///
/// # Safety
/// `stmt` is null or a valid parse node.
unsafe fn touches_own_trigger(
    stmt: *mut pg_sys::Node,
) -> Option<(Option<pg_sys::Oid>, String, crate::track::Touch)> {
    use crate::track::Touch;
    // SAFETY: the caller upholds this function's contract (its `# Safety` section), on which
    // every unsafe operation below relies.
    unsafe {
        let own = |name: *const std::ffi::c_char| {
            if name.is_null() {
                return None;
            }
            let name = CStr::from_ptr(name).to_str().ok()?;
            OWN_TRIGGERS.contains(&name).then(|| name.to_string())
        };
        if stmt.is_null() {
            return None;
        }
        if (*stmt).type_ == pg_sys::NodeTag::T_RenameStmt {
            let rename = stmt.cast::<pg_sys::RenameStmt>();
            if (*rename).renameType != pg_sys::ObjectType::OBJECT_TRIGGER
                || (*rename).relation.is_null()
            {
                return None;
            }
            let (name, touch) = match own((*rename).subname) {
                Some(name) => (name, Touch::Drop),
                None => (own((*rename).newname)?, Touch::TakeName),
            };
            return Some((resolve((*rename).relation), name, touch));
        }
        if (*stmt).type_ == pg_sys::NodeTag::T_CreateTrigStmt {
            // Only OR REPLACE: a plain CREATE of a name the table has fails on its own, and of
            // one it lacks is how a restore (pg_restore, after the data) puts ours back.
            let create = stmt.cast::<pg_sys::CreateTrigStmt>();
            if !(*create).replace {
                return None;
            }
            let name = own((*create).trigname)?;
            return Some((resolve((*create).relation), name, Touch::TakeName));
        }
        if (*stmt).type_ == pg_sys::NodeTag::T_AlterObjectDependsStmt {
            let depends = stmt.cast::<pg_sys::AlterObjectDependsStmt>();
            // NO DEPENDS removes such a tie; one to certyo_cdc itself changes nothing.
            let ours = !(*depends).extname.is_null()
                && CStr::from_ptr((*(*depends).extname).sval).to_bytes() == b"certyo_cdc";
            if (*depends).objectType != pg_sys::ObjectType::OBJECT_TRIGGER
                || (*depends).remove
                || ours
                || (*depends).relation.is_null()
                || (*depends).object.is_null()
                || (*(*depends).object).type_ != pg_sys::NodeTag::T_List
            {
                return None;
            }
            let names =
                pgrx::PgList::<pg_sys::Node>::from_pg((*depends).object.cast::<pg_sys::List>());
            let last = names.get_ptr(names.len().checked_sub(1)?)?;
            if (*last).type_ != pg_sys::NodeTag::T_String {
                return None;
            }
            let name = own((*last.cast::<pg_sys::String>()).sval)?;
            return Some((resolve((*depends).relation), name, Touch::Drop));
        }
        if (*stmt).type_ != pg_sys::NodeTag::T_DropStmt {
            return None;
        }
        let drop = stmt.cast::<pg_sys::DropStmt>();
        if (*drop).removeType != pg_sys::ObjectType::OBJECT_TRIGGER {
            return None;
        }
        // Each object is a list of names: [schema,] table, trigger.
        let objects = pgrx::PgList::<pg_sys::List>::from_pg((*drop).objects);
        let found = objects.iter_ptr().find_map(|names| {
            let count = pgrx::PgList::<pg_sys::Node>::from_pg(names).len();
            let last =
                pgrx::PgList::<pg_sys::Node>::from_pg(names).get_ptr(count.checked_sub(1)?)?;
            if (*last).type_ != pg_sys::NodeTag::T_String {
                return None;
            }
            let name = own((*last.cast::<pg_sys::String>()).sval)?;
            let table = pg_sys::list_truncate(pg_sys::list_copy(names), (count - 1) as i32);
            Some((
                resolve(pg_sys::makeRangeVarFromNameList(table)),
                name,
                Touch::Drop,
            ))
        });
        found
    }
}

/// The indexes a `DROP INDEX` names that exist (`IF EXISTS` may name others).
///
/// # Safety
/// `stmt` is null or a valid parse node.
unsafe fn dropped_indexes(stmt: *mut pg_sys::Node) -> Vec<pg_sys::Oid> {
    // SAFETY: the caller upholds this function's contract (its `# Safety` section), on which
    // every unsafe operation below relies.
    unsafe {
        if stmt.is_null() || (*stmt).type_ != pg_sys::NodeTag::T_DropStmt {
            return Vec::new();
        }
        let drop = stmt.cast::<pg_sys::DropStmt>();
        if (*drop).removeType != pg_sys::ObjectType::OBJECT_INDEX {
            return Vec::new();
        }
        // Each object is a list of names: [schema,] index. Resolved without a lock, as
        // `alters_column_types_or_drops` does: DROP INDEX locks what it drops itself, and a name
        // that comes to mean another index meanwhile is refused after it (`NamedRelation`).
        // `CONCURRENTLY` commits inside the statement, before any check after it could refuse
        // it: its index is resolved here as the statement resolves it, its table and then it
        // locked as the statement locks them (so no rename while it waits makes the name mean
        // an index other than the one checked, nor its table become tracked unseen).
        // (Only for whoever may drop it: anyone else gets PostgreSQL's refusal, and holds
        // nothing of another's.)
        let concurrent = (*drop).concurrent;
        let objects = pgrx::PgList::<pg_sys::List>::from_pg((*drop).objects);
        objects
            .iter_ptr()
            .filter(|names| !names.is_null())
            .filter_map(|names| {
                let name = pg_sys::makeRangeVarFromNameList(names);
                let index = resolve(name)?;
                let may = || {
                    crate::rights::with_pinned_search_path(|| crate::track::owns(index, true))
                        .or_raise()
                };
                if !concurrent || !may() {
                    return Some(index);
                }
                let mode = pg_sys::ShareUpdateExclusiveLock as pg_sys::LOCKMODE;
                let table = pg_sys::IndexGetRelation(index, true);
                if table != pg_sys::InvalidOid {
                    pg_sys::LockRelationOid(table, mode);
                }
                let locked = resolve_locked(name, mode)?;
                let other = pg_sys::IndexGetRelation(locked, true);
                if locked != index && other != table && other != pg_sys::InvalidOid {
                    // Its name went to an index of another table while this waited: that
                    // table is locked too, as the statement will lock it (after the index, not
                    // before as the statement does: a wait in a circle with it ends in
                    // PostgreSQL's deadlock error, not a hang), if this role may drop it.
                    let may =
                        crate::rights::with_pinned_search_path(|| crate::track::owns(locked, true))
                            .or_raise();
                    if may {
                        pg_sys::LockRelationOid(other, mode);
                    }
                }
                Some(locked)
            })
            .collect()
    }
}

/// Refuse (RESTRICT) or warn (CASCADE) when changes would be discarded.
fn check_backlog(cascade: bool) {
    let Some((pending, dead)) = undelivered() else {
        return;
    };
    let total = pending + dead;
    if total == 0 {
        return;
    }
    let what = format!(
        "{total} captured change(s) not delivered to Certyo ({pending} waiting to be sent, {dead} dead letter(s))"
    );
    if cascade {
        pgrx::warning!("certyo_cdc: DROP EXTENSION ... CASCADE discards {what}");
        return;
    }
    Err::<(), _>(
        CertyoError::new(
            PgSqlErrorCode::ERRCODE_DEPENDENT_OBJECTS_STILL_EXIST,
            format!("certyo_cdc: DROP EXTENSION would discard {what}"),
        )
        .detail("They exist only in this database's certyo.queue and certyo.delivery.")
        .hint("Wait until SELECT pending FROM certyo.worker_status() returns 0 and settle dead letters (certyo.retry() or DELETE FROM certyo.delivery WHERE state = 'dead'), or discard them with DROP EXTENSION certyo_cdc CASCADE."),
    )
    .or_raise()
}

/// Wait for every transaction that writes to the queue or the worker's delivery table to end,
/// and keep new ones out, before the backlog is counted: a writer whose change was captured
/// but not yet committed holds `RowExclusiveLock` on `certyo.queue`, and counted before it
/// commits, its change would be dropped with the extension although it committed while DROP
/// waited for its locks. `ACCESS EXCLUSIVE`, the lock DROP takes on these tables anyway, so
/// it is not upgraded later (no deadlock of DROP with itself); held to the end of the
/// transaction. A writer that comes after waits, and fails once the extension is gone: its
/// change is never committed. An error here (a lock timeout, a cancel, a deadlock) aborts
/// the DROP: it is never taken as "nothing to count".
fn lock_out_writers() {
    // SAFETY: a catalog lookup inside the statement's transaction; missing_ok.
    let schema = unsafe { pg_sys::get_namespace_oid(c"certyo".as_ptr(), true) };
    if schema == pg_sys::InvalidOid {
        return;
    }
    for table in [c"queue", c"delivery"] {
        // SAFETY: as above; InvalidOid when the table is not there (a broken installation,
        // whose drop is never blocked).
        let relid = unsafe { pg_sys::get_relname_relid(table.as_ptr(), schema) };
        if relid != pg_sys::InvalidOid {
            // SAFETY: inside the statement's transaction; the lock is released at its end.
            unsafe {
                pg_sys::LockRelationOid(relid, pg_sys::AccessExclusiveLock as pg_sys::LOCKMODE)
            };
        }
    }
}

/// (pending, dead letters) in this database, or None when the extension or its tables are
/// not there (a drop of a broken installation is never blocked).
fn undelivered() -> Option<(i64, i64)> {
    if !installed_here() {
        return None;
    }
    // Only for whoever may drop it: the counts are the operator's (certyo.worker_status() is
    // revoked from PUBLIC), and anyone else's DROP EXTENSION is refused by Postgres anyway.
    let owner = crate::error::in_subtransaction(|| {
        Spi::get_one::<bool>(
            "SELECT pg_catalog.pg_has_role(e.extowner, 'USAGE') FROM pg_catalog.pg_extension e
              WHERE e.extname OPERATOR(pg_catalog.=) 'certyo_cdc'",
        )
    });
    if !matches!(owner, Ok(Ok(Some(true)))) {
        return None;
    }
    lock_out_writers();
    let counted = crate::error::in_subtransaction(|| {
        crate::rights::as_superuser(|| {
            Spi::get_two::<i64, i64>(
                // In the dropping session, whose search_path is its own: every name qualified.
                "SELECT (SELECT pg_catalog.count(*) FROM certyo.queue)
                        OPERATOR(pg_catalog.+) (SELECT pg_catalog.count(*) FROM certyo.delivery
                                                 WHERE state OPERATOR(pg_catalog.=) 'pending'),
                        (SELECT pg_catalog.count(*) FROM certyo.delivery
                          WHERE state OPERATOR(pg_catalog.=) 'dead')",
            )
        })
    });
    match counted {
        Ok(Ok((Some(pending), Some(dead)))) => Some((pending, dead)),
        _ => None,
    }
}
