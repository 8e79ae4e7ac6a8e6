//! Whose rights run user code.
//!
//! The delivery worker is a superuser, and some of its statements run code that a table's
//! owner wrote: triggers, index expressions, domain checks, defaults, row-level security
//! policies, the functions of a backfill condition. PostgreSQL's own maintenance commands set
//! the rule for that (VACUUM, ANALYZE, REINDEX, REFRESH MATERIALIZED VIEW since CVE-2022-1552):
//! such code runs as the table's owner, in a security-restricted operation (no `SET ROLE`, no
//! temporary objects, no cursors that outlive it), with `search_path` pinned, and every setting
//! it changes is undone afterwards, so nothing it does survives into the worker's session.
//! [`as_role`] and [`writing_back_as`] are that rule; every statement of the extension that
//! runs user code outside the user's own session goes through one of them.

use pgrx::pg_sys::{self, Oid};
use std::ffi::{c_int, CStr};
use std::time::Duration;

/// The `search_path` user code sees: nothing but the catalog, so no name in a statement of
/// ours resolves to an object someone else created.
pub const PINNED_SEARCH_PATH: &CStr = c"pg_catalog, pg_temp";

/// Run `f` as `role`, security-restricted, with `search_path` pinned; settings that `f`
/// changes (even with `set_config(..., false)`) are rolled back when it returns.
/// `session_replication_role` is `origin` and `plan_cache_mode` `auto`, as in any session of
/// the role's own: the delivery worker's session sets both otherwise (see `delivery::worker`),
/// and in replica mode foreign keys and ordinary triggers do not fire: user code must not
/// inherit that.
pub fn as_role<T>(role: Oid, f: impl FnOnce() -> T) -> T {
    let settings = [
        (c"session_replication_role", c"origin"),
        (c"plan_cache_mode", c"auto"),
    ];
    restricted(role, &settings, f)
}

/// [`as_role`] for the table's owner, for the worker's write-back, which is bookkeeping, not a
/// change: ordinary user triggers should not fire for it. Two ways, and no user code ever runs
/// in replica mode (only a superuser may set it, and code running with it skips foreign keys,
/// triggers and capture of every table it writes to):
/// - `user_code` false (nothing but PostgreSQL's own code can run in an UPDATE of the table,
///   see `crate::track::key`): `session_replication_role = replica`, so no trigger fires;
/// - `user_code` true: the owner's ordinary settings (`origin`), the table's triggers firing as
///   the owner's. Capture then watches the statement: a trigger that changes business columns
///   fails the write-back (see [`writing_back_to`]) rather than leave a row marked with a hash of
///   content it no longer holds.
///
/// A row lock held by someone else is waited for a second at most, and the statement (the
/// owner's code with it) runs `timeout` at most: the worker has other tables to serve.
pub fn writing_back_as<T>(
    table: Oid,
    owner: Oid,
    user_code: bool,
    timeout: Duration,
    f: impl FnOnce() -> T,
) -> T {
    let mode = if user_code { c"origin" } else { c"replica" };
    let settings = [
        (c"session_replication_role", mode),
        (c"plan_cache_mode", c"auto"),
        (c"lock_timeout", c"1s"),
    ];
    WRITING_BACK.set(table);
    let _done = WritingBack;
    restricted(owner, &settings, || {
        within(timeout, crate::hard_limit::Running::WriteBack(table), f)
    })
}

thread_local! {
    static WRITING_BACK: std::cell::Cell<Oid> = const { std::cell::Cell::new(pg_sys::InvalidOid) };
}

/// Is the worker writing back to tracked table `table` right now? Capture refuses a change of
/// its business columns then: only an owner's trigger can have made it, inside a statement
/// that sets bookkeeping columns. (Writes of such a trigger to other tables are captured as
/// usual.)
pub fn writing_back_to(table: Oid) -> bool {
    WRITING_BACK.get() == table
}

/// Clears [`writing_back_to`] when the write-back returns or its ERROR unwinds.
struct WritingBack;

impl Drop for WritingBack {
    fn drop(&mut self) {
        WRITING_BACK.set(pg_sys::InvalidOid);
    }
}

/// Lock table `relid` in `mode` before the worker looks up its name and reads or writes its
/// rows by that name: a rename of it, or of another table onto its name, then waits for the
/// worker's transaction, so the name means this relation throughout. Waits `wait` (a second
/// at most; then ERROR 55P03, as a lock timeout): someone's long ALTER TABLE costs that table a retry,
/// not the worker a stall (each lock of the tree waits that long). `closed`: for a write-back
/// in replica mode, no partition may join the tree either ([`lock_closed_tree`]).
pub fn lock_table(relid: Oid, mode: u32, wait: Duration, closed: bool) {
    // SAFETY: opens a GUC nesting level that AtEOXact_GUC below closes; if the lock times out,
    // the (sub)transaction abort closes it.
    let level = unsafe { pg_sys::NewGUCNestLevel() };
    set_at_level(c"lock_timeout", &lock_timeout(wait));
    // With its partitions, if it has any: the check of what code an UPDATE can run reads
    // them, and no trigger or index may be added to one between that check and the UPDATE.
    if closed {
        lock_closed_tree(relid, mode);
    } else {
        lock_tree(relid, mode);
    }
    // SAFETY: closes the level opened above, restoring lock_timeout.
    unsafe { pg_sys::AtEOXact_GUC(false, level) };
    // What is read next must be read as of now, after the wait: pgrx runs statements of a
    // (sub)transaction that has no transaction id yet read-only, with the snapshot taken when
    // it began, before a rename that the lock waited for (the name looked up would then be
    // the table's old one, now another table's, or none). With an id, each statement takes a
    // new snapshot. The worker writes in these transactions anyway.
    // SAFETY: assigns the current (sub)transaction an id, or raises an ordinary ERROR.
    unsafe { pg_sys::GetCurrentTransactionId() };
}

/// [`as_role`] for a backfill chunk in the worker: a row lock held by someone else is waited
/// for a second at most, and its condition runs `timeout` at most, so that no role holds up
/// the other tables' delivery.
pub fn backfilling_as<T>(backfill: i64, owner: Oid, timeout: Duration, f: impl FnOnce() -> T) -> T {
    // The stored condition's constants are ISO dates and PostgreSQL-style intervals (see
    // `backfill::condition`), read here as the caller meant them.
    let settings = [
        (c"session_replication_role", c"origin"),
        (c"plan_cache_mode", c"auto"),
        (c"lock_timeout", c"1s"),
        (c"DateStyle", c"ISO, YMD"),
        (c"IntervalStyle", c"postgres"),
    ];
    restricted(owner, &settings, || {
        within(timeout, crate::hard_limit::Running::Backfill(backfill), f)
    })
}

/// Whether `relid` is a partitioned table.
pub fn is_partitioned(relid: Oid) -> bool {
    // SAFETY: a syscache lookup by OID (0, no kind, for a relation dropped meanwhile).
    unsafe {
        pg_sys::get_rel_relkind(relid) == pg_sys::RELKIND_PARTITIONED_TABLE as std::ffi::c_char
    }
}

/// `wait` as a value of `lock_timeout` (a second at most).
fn lock_timeout(wait: Duration) -> std::ffi::CString {
    std::ffi::CString::new(format!("{}ms", wait.as_millis().clamp(1, 1000)))
        .unwrap_or_else(|_| c"1s".into())
}

/// [`lock_tree`], the tree also closed to `ATTACH PARTITION` (and `DETACH ... CONCURRENTLY`)
/// until the transaction ends: each partitioned table in it is locked SHARE UPDATE EXCLUSIVE,
/// the lock those take on the parent, which no writer's ROW EXCLUSIVE conflicts with.
/// Otherwise a table attached after the check of what code an UPDATE of the tree can run
/// would bring its triggers into that UPDATE, unchecked. Top down, as `ATTACH` locks (the
/// parent, then its default partition): a parent closed before any lock on what it holds,
/// which no one can then attach to or detach from.
fn lock_closed_tree(relid: Oid, mode: u32) {
    let partitioned = is_partitioned;
    let mut parents = Vec::new();
    // SAFETY: relation locks by OID inside a transaction, held to its end; a lock timeout is
    // an ordinary ERROR through pgrx's guard.
    unsafe {
        if partitioned(relid) {
            pg_sys::LockRelationOid(relid, pg_sys::ShareUpdateExclusiveLock as pg_sys::LOCKMODE);
            // Asked again under the lock: a table dropped while it waited has no partitions
            // to list (and listing them would fail to find it).
            if partitioned(relid) {
                parents.push(relid);
            }
        }
        pg_sys::LockRelationOid(relid, mode as pg_sys::LOCKMODE);
    }
    while let Some(parent) = parents.pop() {
        // SAFETY: the parent is closed: its partitions stay what they are. Each is locked in
        // `mode` (find_inheritance_children_extended skips one dropped meanwhile), one pending
        // detach too; the list is read within its length and left to the transaction's memory.
        let children = unsafe {
            pg_sys::ffi::pg_guard_ffi_boundary(|| {
                find_inheritance_children_extended(
                    parent,
                    false,
                    mode as pg_sys::LOCKMODE,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                )
            })
        };
        // SAFETY: the length of the list just returned (NIL: 0).
        let count = unsafe { pg_sys::list_length(children) };
        for n in 0..count {
            // SAFETY: within the list's length.
            let child = unsafe { pg_sys::list_nth_oid(children, n) };
            if partitioned(child) {
                // SAFETY: as above.
                unsafe {
                    pg_sys::LockRelationOid(
                        child,
                        pg_sys::ShareUpdateExclusiveLock as pg_sys::LOCKMODE,
                    )
                };
                parents.push(child);
            }
        }
    }
}

/// Lock table `relid` and, if it is partitioned, every partition under it, in `mode`, to the end
/// of the transaction (as PostgreSQL locks a tree for DDL: the table first, then its
/// partitions), waiting as long as `lock_timeout` lets the session wait. The tables locked,
/// `relid` first.
pub fn lock_tree(relid: Oid, mode: u32) -> Vec<Oid> {
    // SAFETY: relation locks by OID inside a transaction, held to its end (find_all_inheritors
    // locks each partition in `mode`); a lock timeout is an ordinary ERROR through pgrx's
    // guard; the returned list (of OIDs, the parent first) is read within its length and left
    // to the transaction's memory.
    unsafe {
        pg_sys::LockRelationOid(relid, mode as pg_sys::LOCKMODE);
        if pg_sys::get_rel_relkind(relid) != pg_sys::RELKIND_PARTITIONED_TABLE as std::ffi::c_char {
            return vec![relid];
        }
        // Not bound by pgrx, so guarded here: a lock timeout raises an ERROR.
        let tree = pg_sys::ffi::pg_guard_ffi_boundary(|| {
            find_all_inheritors(relid, mode as pg_sys::LOCKMODE, std::ptr::null_mut())
        });
        (0..pg_sys::list_length(tree))
            .map(|n| pg_sys::list_nth_oid(tree, n))
            .collect()
    }
}

unsafe extern "C-unwind" {
    /// `catalog/pg_inherits.h` (not bound by pgrx): every inheritor of `parent`, each locked
    /// in `lockmode`.
    fn find_all_inheritors(
        parent: Oid,
        lockmode: pg_sys::LOCKMODE,
        numparents: *mut *mut pg_sys::List,
    ) -> *mut pg_sys::List;
    /// `catalog/pg_inherits.h` (not bound by pgrx): the direct inheritors of `parent`, each
    /// locked in `lockmode` (detached ones too unless `omit_detached`).
    fn find_inheritance_children_extended(
        parent: Oid,
        omit_detached: bool,
        lockmode: pg_sys::LOCKMODE,
        detached_exist: *mut bool,
        detached_xmin: *mut pg_sys::TransactionId,
    ) -> *mut pg_sys::List;
    /// `utils/timeout.h` (not bound by pgrx); `id` is a `TimeoutId`.
    fn enable_timeout_after(id: c_int, delay_ms: c_int);
    fn disable_timeout(id: c_int, keep_indicator: bool);
}

/// `TimeoutId`'s `STATEMENT_TIMEOUT`: the fourth reason since PostgreSQL 9.3, in 15 to 18 too.
const STATEMENT_TIMEOUT: c_int = 3;

/// Run `f` canceled after `timeout`, as `statement_timeout` cancels a client's statement:
/// that setting is armed only when a client's statement starts, never for the worker's, whose
/// statements run inside its own transactions. The cancellation is an ERROR with SQLSTATE
/// 57014, "canceling statement due to statement timeout"; code that catches it and goes on
/// ends the process soon after (see [`crate::hard_limit`]).
fn within<T>(timeout: Duration, running: crate::hard_limit::Running, f: impl FnOnce() -> T) -> T {
    let ms = timeout.as_millis().clamp(1, c_int::MAX as u128) as c_int;
    // SAFETY: a predefined timeout, registered by InitPostgres in every backend with a
    // database connection (the worker's too); its handler only sets flags and signals this
    // process, which the next CHECK_FOR_INTERRUPTS turns into the ERROR.
    let _armed = unsafe {
        pg_sys::ffi::pg_guard_ffi_boundary(|| enable_timeout_after(STATEMENT_TIMEOUT, ms));
        Armed
    };
    crate::hard_limit::run(running, timeout, f)
}

/// The statement timeout armed by `within`, disarmed when `f` returns or its ERROR unwinds.
struct Armed;

impl Drop for Armed {
    fn drop(&mut self) {
        // SAFETY: disarms the predefined timeout armed above; it raises no error.
        unsafe { disable_timeout(STATEMENT_TIMEOUT, false) };
    }
}

/// Run `f`, the extension's own statements in a user's session (`track()`, `untrack()`,
/// `backfill()`, the checks before DDL, a capture plan's catalog reads), with `search_path`
/// pinned, as a function declared `SET search_path = pg_catalog, pg_temp` runs. Whoever runs
/// them, a superuser included, keeps their own rights, but no name in our statements can
/// resolve to an object another role planted in a schema on the caller's path: `pg_catalog`
/// comes first on every path, yet an exact-type match elsewhere (an `=(oid, integer)` or an
/// `unnest(smallint[])` in `public`) beats its polymorphic or cast-needing operators and
/// functions, and would run as the caller. A `SET` that runs inside `f` persists, as it would
/// after such a function.
pub fn with_pinned_search_path<T>(f: impl FnOnce() -> T) -> T {
    // SAFETY: opens a GUC nesting level that AtEOXact_GUC below closes; if `f` raises an
    // error instead, the transaction (or subtransaction) abort closes it.
    let level = unsafe { pg_sys::NewGUCNestLevel() };
    set_at_level(c"search_path", PINNED_SEARCH_PATH);
    let result = f();
    // SAFETY: closes the level opened above; `true` keeps what `f` set with SET, as on a
    // function's exit, and restores the caller's search_path.
    unsafe { pg_sys::AtEOXact_GUC(true, level) };
    result
}

/// Run `f` with `settings` in force, every setting restored afterwards (for the extension's
/// own work in a user's session, e.g. writing values out in a form that reads back the same
/// whatever the session's `DateStyle`).
pub fn with_settings<T>(settings: &[(&CStr, &CStr)], f: impl FnOnce() -> T) -> T {
    // SAFETY: opens a GUC nesting level that AtEOXact_GUC below closes; if `f` raises an
    // error instead, the transaction (or subtransaction) abort closes it.
    let level = unsafe { pg_sys::NewGUCNestLevel() };
    for (name, value) in settings {
        set_at_level(name, value);
    }
    let result = f();
    // SAFETY: closes the level opened above, restoring every setting.
    unsafe { pg_sys::AtEOXact_GUC(false, level) };
    result
}

/// The settings values' text forms depend on, pinned to one form that reads back the same.
const PINNED_IO: [(&CStr, &CStr); 6] = [
    (c"DateStyle", c"ISO, YMD"),
    (c"IntervalStyle", c"postgres"),
    (c"extra_float_digits", c"1"),
    (c"bytea_output", c"hex"),
    (c"TimeZone", c"UTC"),
    (c"lc_monetary", c"C"),
];

/// Run `f`, which reads or writes values as text by their types' input and output functions,
/// with the settings those depend on pinned ([`PINNED_IO`]): whatever the database's settings
/// (its owner may `ALTER DATABASE ... SET extra_float_digits = -15`) or an owner's code set
/// before, a value's text reads back as the same value.
pub fn with_pinned_io<T>(f: impl FnOnce() -> T) -> T {
    with_settings(&PINNED_IO, f)
}

/// Run `f` as the bootstrap superuser, for the extension's own statements on its own tables
/// (which have no user triggers): callers of `certyo.backfill()` have no rights on them.
pub fn as_superuser<T>(f: impl FnOnce() -> T) -> T {
    let superuser = Oid::from(pg_sys::BOOTSTRAP_SUPERUSERID);
    switched_to(superuser, pg_sys::SECURITY_LOCAL_USERID_CHANGE, f)
}

fn restricted<T>(role: Oid, settings: &[(&CStr, &CStr)], f: impl FnOnce() -> T) -> T {
    // SAFETY: opens a GUC nesting level that AtEOXact_GUC below closes; if `f` raises an
    // error instead, the transaction (or subtransaction) abort closes it.
    let level = unsafe { pg_sys::NewGUCNestLevel() };
    set_at_level(c"search_path", PINNED_SEARCH_PATH);
    for (name, value) in settings {
        set_at_level(name, value);
    }
    let flags = pg_sys::SECURITY_LOCAL_USERID_CHANGE | pg_sys::SECURITY_RESTRICTED_OPERATION;
    let result = switched_to(role, flags, f);
    // SAFETY: closes the level opened above; `false` rolls back every change made inside it,
    // including session-level ones, as after REFRESH MATERIALIZED VIEW.
    unsafe { pg_sys::AtEOXact_GUC(false, level) };
    result
}

/// Run `f` as `role` with the extra security-context `flags`, as ExecRefreshMatView and
/// SECURITY DEFINER functions do; the previous user is restored when `f` returns, or by the
/// (sub)transaction abort when it raises an error.
fn switched_to<T>(role: Oid, flags: u32, f: impl FnOnce() -> T) -> T {
    let (mut user, mut context) = (pg_sys::InvalidOid, 0);
    // SAFETY: reads and sets the backend's current user and security context; main thread,
    // inside a transaction.
    unsafe {
        pg_sys::GetUserIdAndSecContext(&mut user, &mut context);
        pg_sys::SetUserIdAndSecContext(role, context | flags as i32);
    }
    let result = f();
    // SAFETY: restores what was saved above.
    unsafe { pg_sys::SetUserIdAndSecContext(user, context) };
    result
}

/// Set `name` for the current GUC nesting level only. Called while still the worker (or the
/// caller), before the switch to the owner: superuser-only settings are allowed to us, never to
/// the code that runs afterwards.
fn set_at_level(name: &CStr, value: &CStr) {
    // SAFETY: valid NUL-terminated strings; errors (an unknown setting) are raised as ERROR
    // through pgrx's guard and abort the transaction.
    unsafe {
        pg_sys::set_config_option(
            name.as_ptr(),
            value.as_ptr(),
            pg_sys::GucContext::PGC_SUSET,
            pg_sys::GucSource::PGC_S_SESSION,
            pg_sys::GucAction::GUC_ACTION_SAVE,
            true,
            pgrx::PgLogLevel::ERROR as i32,
            false,
        );
    }
}

/// The owner of relation `relid`, None if there is no such relation.
pub fn owner_of(relid: Oid) -> Option<Oid> {
    // SAFETY: a syscache lookup by OID; the tuple is released before returning.
    unsafe {
        let tuple = pg_sys::SearchSysCache1(
            pg_sys::SysCacheIdentifier::RELOID as i32,
            pg_sys::Datum::from(relid),
        );
        if tuple.is_null() {
            return None;
        }
        let class = pg_sys::GETSTRUCT(tuple) as pg_sys::Form_pg_class;
        let owner = (*class).relowner;
        pg_sys::ReleaseSysCache(tuple);
        Some(owner)
    }
}
