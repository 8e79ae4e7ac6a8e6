//! The DDL that `track()` performs on a table: bookkeeping columns, the triggers, and the
//! dependency that lets `DROP EXTENSION` remove the triggers with it.

use super::table::{quote_ident, quote_literal, Table};
use crate::capture::marks::MARKS_TRIGGER;
use crate::capture::options::{split_trigger_args, CaptureOptions, WriteBack, BOOKKEEPING_COLUMNS};
use crate::capture::record::Row;
use crate::capture::scan::{each_tuple, leaves, Snapshot};
use crate::capture::{CAPTURE_TRIGGER, TRUNCATE_TRIGGER};
use crate::error::{CertyoError, Result};
use pgrx::pg_sys::{self, Oid};
use pgrx::prelude::*;
use pgrx::PgSqlErrorCode;

/// Add the missing bookkeeping columns. Skipped entirely when all exist: `ALTER TABLE` takes
/// an exclusive lock, which a re-`track()` that only changes options should not need.
/// `certyo_anchor_status` defaults to `'pending'` only under [`WriteBack::Accepted`], whose
/// rows say `pending` from their first version on; under [`WriteBack::Anchored`] a row holds
/// NULL until its version is anchored, and no INSERT evaluates a default for it.
/// Under [`WriteBack::None`] there are none to add.
pub fn add_bookkeeping_columns(table: &Table, write_back: WriteBack) -> Result<()> {
    add_missing(table, write_back)
}

/// A thread-local flag raised for as long as the guard lives: set back to what it was when the
/// guard is dropped, also while an error unwinds out of the work it marks (the backend goes on
/// to other statements).
struct Flag {
    flag: &'static std::thread::LocalKey<std::cell::Cell<bool>>,
    was: bool,
}

impl Flag {
    fn raise(flag: &'static std::thread::LocalKey<std::cell::Cell<bool>>) -> Flag {
        let was = flag.with(|f| f.replace(true));
        Flag { flag, was }
    }
}

impl Drop for Flag {
    fn drop(&mut self) {
        self.flag.with(|f| f.set(self.was));
    }
}

/// Whether [`add_bookkeeping_columns`] would alter the table (a column to add, or the status
/// column's default to change): `ALTER TABLE`, which takes `ACCESS EXCLUSIVE`.
pub fn alters_table(table: &Table, write_back: WriteBack) -> Result<bool> {
    if write_back == WriteBack::None {
        return Ok(false);
    }
    Ok(BOOKKEEPING_COLUMNS
        .iter()
        .any(|c| table.column(c).is_none())
        || status_default_change(table, write_back)?.is_some())
}

/// A status column kept from another mode (re-tracked, or tracked again after untrack): its
/// default follows the mode. The change to make, if it differs.
fn status_default_change(table: &Table, write_back: WriteBack) -> Result<Option<&'static str>> {
    let has_default = Spi::get_one_with_args::<bool>(
        "SELECT atthasdef FROM pg_catalog.pg_attribute
          WHERE attrelid OPERATOR(pg_catalog.=) $1 AND attname OPERATOR(pg_catalog.=) 'certyo_anchor_status' AND NOT attisdropped",
        &[table.relid.into()],
    )?
    .unwrap_or(false);
    Ok(match (write_back, has_default) {
        (WriteBack::Accepted, false) => Some("SET DEFAULT 'pending'"),
        (WriteBack::Anchored, true) => Some("DROP DEFAULT"),
        _ => None,
    })
}

fn add_missing(table: &Table, write_back: WriteBack) -> Result<()> {
    let status = match write_back {
        WriteBack::Accepted => "text DEFAULT 'pending'",
        WriteBack::Anchored => "text",
        WriteBack::None => return Ok(()),
    };
    let definitions = [
        ("certyo_record_hash", "text"),
        ("certyo_anchor_status", status),
        ("certyo_verified_at", "timestamptz"),
    ];
    debug_assert!(definitions.iter().map(|d| d.0).eq(BOOKKEEPING_COLUMNS));
    let missing: Vec<String> = definitions
        .iter()
        .filter(|(name, _)| table.column(name).is_none())
        .map(|(name, definition)| format!("ADD COLUMN {} {definition}", quote_ident(name)))
        .collect();
    if !missing.is_empty() {
        Spi::run(&format!(
            "ALTER TABLE {} {}",
            table.quoted,
            missing.join(", ")
        ))?;
    }
    if let Some(change) = status_default_change(table, write_back)? {
        Spi::run(&format!(
            "ALTER TABLE {} ALTER COLUMN certyo_anchor_status {change}",
            table.quoted
        ))?;
    }
    Ok(())
}

/// Where a bookkeeping column met the sidecar mode (see [`refuse_bookkeeping_columns`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SidecarConflict {
    /// `track(..., write_back => 'none')` of a table tracked in a mode that writes back.
    Tracked,
    /// `track(..., write_back => 'none')` of a table not tracked, that has such a column.
    Untracked,
}

/// `write_back => 'none'` is refused on a table that has a column of a bookkeeping name: it may
/// hold what an earlier mode wrote (an earlier version's `anchored`, above all), which nothing
/// would keep true any more. (A column of such a name that comes later, through a parent table,
/// a composite type or `ALTER TABLE`, is the table's own data: under this mode capture takes it
/// like any other, see [`CaptureOptions::is_bookkeeping`].)
pub fn refuse_bookkeeping_columns(table: &Table, conflict: SidecarConflict) -> Result<()> {
    let present: Vec<&str> = BOOKKEEPING_COLUMNS
        .iter()
        .copied()
        .filter(|name| table.column(name).is_some())
        .collect();
    if present.is_empty() {
        return Ok(());
    }
    let names = present.join(", ");
    let literal = quote_literal(&table.quoted);
    let (message, hint) = match conflict {
        SidecarConflict::Tracked => (
            format!("certyo_cdc: table {} has bookkeeping columns ({names}), which write_back => 'none' would leave as they are", table.display),
            format!(
                "Untrack it with its columns and track it again, in one transaction so that no change goes uncaptured: BEGIN; SELECT certyo.untrack({literal}, drop_columns => true); SELECT certyo.track({literal}, write_back => 'none'); COMMIT;"
            ),
        ),
        SidecarConflict::Untracked => (
            format!("certyo_cdc: table {} has columns named as certyo_cdc's bookkeeping columns ({names}), which write_back => 'none' would leave as they are", table.display),
            format!(
                "Rename or drop them first (ALTER TABLE {} {}), then track again; or track it with write_back => 'anchored', which writes them.",
                table.quoted,
                present.iter().map(|c| format!("DROP COLUMN {}", quote_ident(c))).collect::<Vec<_>>().join(", ")
            ),
        ),
    };
    Err(CertyoError::new(PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE, message)
        .detail("Those names are certyo_cdc's bookkeeping columns in the modes that write back. Under write_back => 'none' the worker never writes to the table's rows, so what such a column says (an earlier mode's hash and 'anchored', perhaps) would stay on rows whose content moves on, looking like certyo_cdc's.")
        .hint(hint))
}

pub fn drop_bookkeeping_columns(table: &Table) -> Result<()> {
    let drops: Vec<String> = BOOKKEEPING_COLUMNS
        .iter()
        .map(|c| format!("DROP COLUMN IF EXISTS {}", quote_ident(c)))
        .collect();
    Spi::run(&format!(
        "ALTER TABLE {} {}",
        table.quoted,
        drops.join(", ")
    ))?;
    Ok(())
}

/// `pg_trigger.tgtype` of the marks trigger: FOR EACH ROW (1), BEFORE (2), UPDATE (16).
const MARKS_TYPE: i16 = 1 | 2 | 16;

/// The capture trigger as it should be for these options: its arguments; and whether the table
/// has the marks trigger (in the modes that write back, see `crate::capture::marks`).
pub struct TriggerDefinition {
    pub args: Vec<String>,
    pub marks: bool,
}

impl TriggerDefinition {
    pub fn new(options: &CaptureOptions) -> TriggerDefinition {
        TriggerDefinition {
            marks: options.write_back != WriteBack::None,
            args: options.to_trigger_args(),
        }
    }

    /// Does the installed capture trigger already match (same arguments, fired by every
    /// UPDATE), and the marks trigger exist exactly when wanted, as installed (fired where the
    /// capture trigger fires, before every UPDATE of a row, unconditionally)? One disabled, renamed back, or replaced
    /// by hand is installed again by the next `ALTER TABLE` (`refresh`) or `track()`.
    ///
    /// `missing_marks`: whether a marks trigger that is missing altogether counts as installed.
    /// So it does for the DDL event trigger outside `ALTER EXTENSION`: a restore creates the
    /// table's triggers one by one, and an `ALTER TABLE` of the table between them (the dump's
    /// own, for a capture trigger it disabled) must not create the ones still to come.
    pub fn is_installed(&self, table: &Table, missing_marks: bool) -> Result<bool> {
        let (args, attnums, marks) = Spi::get_three_with_args::<Vec<u8>, Vec<i16>, i32>(
            &format!(
                "SELECT t.tgargs, t.tgattr::int2[],
                        (SELECT CASE WHEN m.tgenabled = CASE WHEN t.tgenabled IN ('A', 'R') THEN 'A' ELSE 'O' END
                                      AND m.tgtype = {MARKS_TYPE} AND m.tgqual IS NULL
                                      AND m.tgnargs = 0 AND pg_catalog.cardinality(m.tgattr::pg_catalog.int2[]) = 0
                                      AND m.tgfoid = 'certyo.capture()'::pg_catalog.regprocedure
                                     THEN 2 ELSE 1 END
                           FROM pg_trigger m WHERE m.tgrelid = $1 AND m.tgname = {})
                   FROM (SELECT) AS one
                   LEFT JOIN pg_trigger t ON t.tgrelid = $1 AND t.tgname = {}",
                quote_literal(MARKS_TRIGGER),
                quote_literal(CAPTURE_TRIGGER)
            ),
            &[table.relid.into()],
        )?;
        // None: no marks trigger; 1: one, not as installed; 2: as installed.
        let marks_as_wanted = match (self.marks, marks) {
            (true, Some(2)) | (false, None) => true,
            (true, None) => missing_marks,
            _ => false,
        };
        let args = args.map(|raw| split_trigger_args(&raw));
        Ok(args.as_ref() == Some(&self.args)
            && attnums.unwrap_or_default().is_empty()
            && marks_as_wanted)
    }

    /// Create or replace the triggers. The capture trigger fires on every UPDATE, not `UPDATE OF`
    /// the business columns: a business column can change without being named in the statement
    /// (a BEFORE trigger of the table stamps it, a generated column follows an excluded one), and
    /// `UPDATE OF` would miss that change. A statement that leaves the business columns equal is
    /// filtered in the trigger, by value.
    pub fn install(&self, table: &Table) -> Result<()> {
        let _installing = Flag::raise(&INSTALLING);
        let args: Vec<String> = self.args.iter().map(|a| quote_literal(a)).collect();
        let firing = firing_mode(table)?;
        Spi::run(&format!(
            "CREATE OR REPLACE TRIGGER {} AFTER INSERT OR DELETE OR UPDATE ON {} \
             FOR EACH ROW EXECUTE FUNCTION certyo.capture({})",
            quote_ident(CAPTURE_TRIGGER),
            table.quoted,
            args.join(", ")
        ))?;
        Spi::run(&format!(
            "CREATE OR REPLACE TRIGGER {} BEFORE TRUNCATE ON {} FOR EACH STATEMENT EXECUTE FUNCTION certyo.capture()",
            quote_ident(TRUNCATE_TRIGGER),
            table.quoted
        ))?;
        if self.marks {
            refuse_owners_marks_trigger(table)?;
            // Fired in origin mode, and below in the capture trigger's own (crate::capture::marks).
            Spi::run(&format!(
                "CREATE OR REPLACE TRIGGER {marks} BEFORE UPDATE ON {table} FOR EACH ROW EXECUTE FUNCTION certyo.capture()",
                marks = quote_ident(MARKS_TRIGGER),
                table = table.quoted
            ))?;
        } else {
            drop_marks(table)?;
        }
        // CREATE OR REPLACE enables the trigger; a user who disabled it (or set it to fire in
        // replica mode) keeps that choice.
        if let Some(mode) = firing {
            Spi::run(&format!(
                "ALTER TABLE {} {} TRIGGER {}",
                table.quoted,
                mode.clause(),
                quote_ident(CAPTURE_TRIGGER)
            ))?;
            // The marks trigger fires wherever capture does: a change captured in replica mode
            // (capture `ENABLE ALWAYS`, as on a logical replication subscriber, or `ENABLE
            // REPLICA`) lets go of its row's marks as any other, and so does one made in origin
            // mode, captured or not. (Disabled capture leaves it in origin mode.)
            if self.marks && firing.is_some_and(FiringMode::fires_in_replica_mode) {
                Spi::run(&format!(
                    "ALTER TABLE {} ENABLE ALWAYS TRIGGER {}",
                    table.quoted,
                    quote_ident(MARKS_TRIGGER)
                ))?;
            }
        }
        depend_on_extension(table.relid)
    }
}

/// A trigger of the owner's named as the marks trigger (another function than
/// `certyo.capture()`) is not replaced by `track()`: refused (nor dropped, see [`drop_marks`]).
fn refuse_owners_marks_trigger(table: &Table) -> Result<()> {
    if !has_owners_marks_trigger(table)? {
        return Ok(());
    }
    Err(CertyoError::new(
        PgSqlErrorCode::ERRCODE_DUPLICATE_OBJECT,
        format!("certyo_cdc: table {} has a trigger of its own named {MARKS_TRIGGER}", table.display),
    )
    .detail(format!("{MARKS_TRIGGER} is the name of the trigger certyo_cdc installs to clear a changed row's bookkeeping columns; yours would be replaced."))
    .hint(format!("Rename it first: ALTER TRIGGER {MARKS_TRIGGER} ON {} RENAME TO another_name;", table.quoted)))
}

/// Has the table a trigger named as the marks trigger with another function than ours?
fn has_owners_marks_trigger(table: &Table) -> Result<bool> {
    Ok(Spi::get_one_with_args::<bool>(
        &format!(
            "SELECT EXISTS (SELECT FROM pg_catalog.pg_trigger WHERE tgrelid = $1 AND tgname = {}
                              AND tgfoid <> 'certyo.capture()'::pg_catalog.regprocedure)",
            quote_literal(MARKS_TRIGGER)
        ),
        &[table.relid.into()],
    )?
    .unwrap_or(false))
}

/// A capture trigger's firing mode other than the default (origin mode).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FiringMode {
    Disabled,
    Replica,
    Always,
}

impl FiringMode {
    /// The `ALTER TABLE ... <clause> TRIGGER` that sets it.
    fn clause(self) -> &'static str {
        match self {
            FiringMode::Disabled => "DISABLE",
            FiringMode::Replica => "ENABLE REPLICA",
            FiringMode::Always => "ENABLE ALWAYS",
        }
    }

    fn fires_in_replica_mode(self) -> bool {
        matches!(self, FiringMode::Replica | FiringMode::Always)
    }
}

/// The non-default firing mode of the installed capture trigger, if it has one: restored after
/// `CREATE OR REPLACE TRIGGER`.
fn firing_mode(table: &Table) -> Result<Option<FiringMode>> {
    let enabled = Spi::get_one_with_args::<String>(
        &format!(
            "SELECT (SELECT tgenabled::text FROM pg_trigger WHERE tgrelid = $1 AND tgname = {})",
            quote_literal(CAPTURE_TRIGGER)
        ),
        &[table.relid.into()],
    )?;
    Ok(match enabled.as_deref() {
        Some("D") => Some(FiringMode::Disabled),
        Some("R") => Some(FiringMode::Replica),
        Some("A") => Some(FiringMode::Always),
        _ => None,
    })
}

thread_local! {
    /// Set while `certyo.untrack()` drops the triggers: the one `DROP TRIGGER` of a capture
    /// trigger that `crate::ddl_hook` lets through.
    static UNTRACKING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    /// Set while the triggers are installed: `crate::ddl_hook` lets their `CREATE OR REPLACE
    /// TRIGGER` through, and the `ALTER TABLE` that restores the capture trigger's firing mode
    /// ends in the DDL event trigger, which must not install them again meanwhile.
    static INSTALLING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Are the triggers being installed right now (see `INSTALLING`)?
pub fn installing() -> bool {
    INSTALLING.with(std::cell::Cell::get)
}

/// Is `certyo.untrack()` dropping the triggers right now?
pub fn untracking() -> bool {
    UNTRACKING.with(std::cell::Cell::get)
}

pub fn drop_triggers(table: &Table) -> Result<bool> {
    let _untracking = Flag::raise(&UNTRACKING);
    drop_both(table)
}

fn drop_both(table: &Table) -> Result<bool> {
    let tracked = Spi::get_one_with_args::<bool>(
        &format!(
            "SELECT EXISTS (SELECT FROM pg_trigger WHERE tgrelid = $1 AND tgname = {})",
            quote_literal(CAPTURE_TRIGGER)
        ),
        &[table.relid.into()],
    )?
    .unwrap_or(false);
    for trigger in [CAPTURE_TRIGGER, TRUNCATE_TRIGGER] {
        Spi::run(&format!(
            "DROP TRIGGER IF EXISTS {} ON {}",
            quote_ident(trigger),
            table.quoted
        ))?;
    }
    drop_marks(table)?;
    Ok(tracked)
}

/// Drop the marks trigger: when the table is untracked, or tracked again with `write_back =>
/// 'none'`, under which it has no marks. A trigger of the owner's of that name stays.
fn drop_marks(table: &Table) -> Result<()> {
    if has_owners_marks_trigger(table)? {
        return Ok(()); // the owner's, not ours to drop
    }
    let _untracking = Flag::raise(&UNTRACKING);
    Spi::run(&format!(
        "DROP TRIGGER IF EXISTS {} ON {}",
        quote_ident(MARKS_TRIGGER),
        table.quoted
    ))?;
    Ok(())
}

/// Record that our triggers depend on the extension (automatically), so `DROP EXTENSION`
/// removes them instead of failing on them. `CREATE OR REPLACE TRIGGER` may drop the record, so
/// it is checked each time rather than assumed.
fn depend_on_extension(relid: Oid) -> Result<()> {
    // SAFETY: a catalog lookup inside the caller's transaction; missing_ok false raises an ordinary error.
    let extension = unsafe { pg_sys::get_extension_oid(c"certyo_cdc".as_ptr(), false) };
    let triggers: Vec<Oid> = Spi::connect(|client| {
        let rows = client.select(
            &format!(
                "SELECT t.oid FROM pg_trigger t
                  WHERE t.tgrelid = $1 AND t.tgname IN ({}, {}, {})
                    AND NOT EXISTS (SELECT FROM pg_depend d
                                     WHERE d.classid = 'pg_trigger'::regclass AND d.objid = t.oid
                                       AND d.refclassid = 'pg_extension'::regclass AND d.refobjid = $2)",
                quote_literal(CAPTURE_TRIGGER),
                quote_literal(TRUNCATE_TRIGGER),
                quote_literal(MARKS_TRIGGER)
            ),
            None,
            &[relid.into(), extension.into()],
        )?;
        rows.map(|row| row.get::<Oid>(1).map(Option::unwrap_or_default))
            .collect::<std::result::Result<Vec<_>, _>>()
    })?;
    for trigger in triggers {
        let dependent = pg_sys::ObjectAddress {
            classId: pg_sys::TriggerRelationId,
            objectId: trigger,
            objectSubId: 0,
        };
        let referenced = pg_sys::ObjectAddress {
            classId: pg_sys::ExtensionRelationId,
            objectId: extension,
            objectSubId: 0,
        };
        // SAFETY: valid object addresses of a trigger and the extension, inside the caller's transaction.
        unsafe {
            pg_sys::recordDependencyOn(
                &dependent,
                &referenced,
                pg_sys::DependencyType::DEPENDENCY_AUTO,
            )
        };
    }
    Ok(())
}

/// Refused (`table_name` the tracked table `relid` is to join or become): rows of `relid` whose
/// bookkeeping columns hold anything but what a new row holds in `write_back`'s mode. No receipt
/// of the tracked table backs what they say (a partition detached earlier keeps its marks, a
/// copy of a tracked table has them, and the rows may have changed since), yet they would claim
/// it, `anchored` perhaps, from the moment they are tracked. Clearing them is left to the table's
/// owner, in the owner's own session: an UPDATE here would run the table's triggers (and change
/// what they stamp) inside someone else's `track()` or `ALTER TABLE`. Only the columns that
/// exist are read, and only of PostgreSQL's own types (the comparison runs their operators, in
/// the session of whoever attaches or tracks the table; `ATTACH` refuses other types itself,
/// after this); a table without them has nothing to say.
pub(super) fn refuse_marked_rows(
    relid: Oid,
    write_back: WriteBack,
    table_name: &str,
) -> Result<()> {
    let cleared_status = match write_back {
        WriteBack::None => return Ok(()),
        WriteBack::Accepted => "'pending'",
        WriteBack::Anchored => "NULL",
    };
    // Locked first, and only a table is read.
    // SAFETY: a lock request and a catalog lookup inside the caller's transaction.
    let kind = unsafe {
        pg_sys::LockRelationOid(relid, pg_sys::AccessShareLock as pg_sys::LOCKMODE);
        pg_sys::get_rel_relkind(relid)
    };
    if kind != pg_sys::RELKIND_RELATION as std::ffi::c_char
        && kind != pg_sys::RELKIND_PARTITIONED_TABLE as std::ffi::c_char
    {
        return Ok(());
    }
    let present: Vec<String> = Spi::get_one_with_args::<Vec<String>>(
        "SELECT pg_catalog.array_agg(attname::pg_catalog.text) FROM pg_catalog.pg_attribute
          WHERE attrelid OPERATOR(pg_catalog.=) $1 AND attnum OPERATOR(pg_catalog.>) 0 AND NOT attisdropped
            AND attname OPERATOR(pg_catalog.=) ANY ($2) AND atttypid OPERATOR(pg_catalog.<) 16384",
        &[relid.into(), BOOKKEEPING_COLUMNS.iter().map(|c| c.to_string()).collect::<Vec<_>>().into()],
    )?
    .unwrap_or_default();
    if present.is_empty() {
        return Ok(());
    }
    // Read by OID through the table's access method, under the latest snapshot (rows committed
    // while this statement waited for its lock included): no name is resolved, no operator
    // looked up and no user code runs as the reader.
    let mut marked = false;
    for leaf in leaves(relid)? {
        each_tuple(
            leaf,
            Snapshot::Latest,
            // SAFETY: the relation `each_tuple` opened.
            |rel| Ok(unsafe { Claim::of(rel, &present, write_back) }),
            |claims, row| {
                marked = claims.iter().any(|c| c.made_by(row));
                Ok(!marked)
            },
        )?;
        if marked {
            break;
        }
    }
    let conditions: Vec<String> = present
        .iter()
        .map(|c| match (c.as_str(), write_back) {
            // NULL says nothing in either mode (a table tracked under 'anchored' before, its
            // columns kept by untrack()); under 'accepted' neither does 'pending'.
            ("certyo_anchor_status", WriteBack::Accepted) => {
                format!("{} <> 'pending'", quote_ident(c))
            }
            _ => format!("{} IS NOT NULL", quote_ident(c)),
        })
        .collect();
    let name = Spi::get_one_with_args::<String>(
        "SELECT $1::pg_catalog.regclass::pg_catalog.text",
        &[relid.into()],
    )?
    .unwrap_or_default();
    if !marked {
        return Ok(());
    }
    let set: Vec<String> = present
        .iter()
        .map(|c| match c.as_str() {
            "certyo_anchor_status" => format!("{} = {cleared_status}", quote_ident(c)),
            _ => format!("{} = NULL", quote_ident(c)),
        })
        .collect();
    Err(CertyoError::new(
        PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
        format!("certyo_cdc: rows of {name} hold bookkeeping values that no receipt of {table_name} backs"),
    )
    .detail("Tracked, they would go on claiming a hash and an anchor status, 'anchored' perhaps, for content Certyo may never have anchored (a partition detached earlier keeps its marks, a copy of a tracked table has them, and the rows may have changed since).")
    .hint(format!("Clear them first: UPDATE {name} SET {} WHERE {};", set.join(", "), conditions.join(" OR "))))
}

/// What a row claims in a bookkeeping column of one table (a partition's columns may lie
/// elsewhere than its parent's): any value, or under `'accepted'` a status other than
/// `'pending'` (as capture tells, `crate::capture::marks`).
enum Claim {
    AnyValue(usize),
    NotPending(usize),
}

impl Claim {
    /// # Safety
    /// `rel` must be an open relation.
    unsafe fn of(rel: pg_sys::Relation, present: &[String], write_back: WriteBack) -> Vec<Claim> {
        // SAFETY: the caller's contract: the descriptor of an open relation, read within `natts`.
        let attributes: Vec<&pg_sys::FormData_pg_attribute> = unsafe {
            let desc = (*rel).rd_att;
            (0..(*desc).natts as usize)
                .map(|i| crate::compat::attribute(desc, i))
                .collect()
        };
        attributes
            .into_iter()
            .enumerate()
            .filter(|(_, a)| !a.attisdropped)
            .filter(|(_, a)| {
                present
                    .iter()
                    .any(|c| pgrx::name_data_to_str(&a.attname) == c)
            })
            .map(|(index, a)| {
                let text = a.atttypid == pg_sys::TEXTOID || a.atttypid == pg_sys::VARCHAROID;
                match (pgrx::name_data_to_str(&a.attname), write_back) {
                    ("certyo_anchor_status", WriteBack::Accepted) if text => {
                        Claim::NotPending(index)
                    }
                    _ => Claim::AnyValue(index),
                }
            })
            .collect()
    }

    fn made_by(&self, row: &Row) -> bool {
        match *self {
            Claim::AnyValue(index) => !row.is_null(index),
            Claim::NotPending(index) => {
                // SAFETY: `NotPending` only for a column of type text or varchar (one
                // representation), checked in `of`.
                !row.is_null(index) && !unsafe { row.text_is(index, "pending") }
            }
        }
    }
}
