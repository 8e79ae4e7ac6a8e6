//! A backfill condition is one SQL expression over the table, nothing more.
//!
//! The worker later pastes the condition into a query of its own, so the text the user gave
//! must not be able to close that query's parentheses, comment out the rest, add a `UNION`, an
//! `ORDER BY` or a second statement. So the condition is never kept as the user wrote it:
//! Postgres' own parser reads it as the `WHERE` clause of `SELECT FROM <table> AS t`, the parse
//! tree must be exactly that query, parse analysis resolves it with the caller's
//! `search_path`, and Postgres' deparser writes the analyzed expression back out under a
//! pinned `search_path`, so every name outside `pg_catalog` comes out schema-qualified. That
//! text, one parenthesized expression by construction, is what is stored and run.

use crate::error::{CertyoError, Result};
use crate::rights;
use pgrx::pg_sys::{self, Oid};
use pgrx::prelude::*;
use pgrx::PgSqlErrorCode;
use std::ffi::{CStr, CString};

/// The condition, validated and in its canonical form; runs `LIMIT 0` once with the caller's
/// rights so that missing privileges (on the table or on the functions it calls) show now.
pub fn canonical(relid: Oid, table: &str, condition: &str) -> Result<String> {
    // The newline ends a trailing `--` comment inside the condition: it cannot reach past it.
    let probe = format!("SELECT FROM {table} AS t WHERE {condition}\n");
    let text = CString::new(probe).map_err(|_| not_one_expression(condition))?;
    let quals = {
        let _context = ErrorContext::push();
        // SAFETY: parse and analysis of a NUL-terminated string inside the caller's
        // transaction; a syntax or analysis error is raised as an ordinary ERROR by pgrx's
        // guard on each call, with a CONTEXT line that says it is about the backfill condition.
        unsafe { analyzed_where_clause(text.as_c_str()) }
    }
    .ok_or_else(|| not_one_expression(condition))?;
    // Deparsed under the pinned search_path the worker will use; and the stored text must mean
    // the same when the worker runs it: checked under that path, as the caller.
    // SAFETY: GetUserId only reads the backend's current user.
    let caller = unsafe { pg_sys::GetUserId() };
    rights::as_role(caller, || {
        // Constants are written out in forms that read back the same in the worker's session,
        // whatever the caller's settings: dates as ISO year-month-day (not `01/02/2026`, which
        // DateStyle 'SQL, DMY' reads one way and the worker another), intervals in
        // PostgreSQL's own style, floats with every digit.
        let canonical = rights::with_settings(
            &[
                (c"DateStyle", c"ISO, YMD"),
                (c"IntervalStyle", c"postgres"),
                (c"extra_float_digits", c"3"),
                (c"standard_conforming_strings", c"on"),
            ],
            // SAFETY: `quals` is the analyzed WHERE clause of a query over `relid`.
            || unsafe { deparse(quals, relid) },
        );
        Spi::run(&format!(
            "SELECT FROM {table} AS t WHERE ({canonical}) LIMIT 0"
        ))?;
        Ok(canonical)
    })
}

/// The analyzed WHERE clause of `probe`, or None if `probe` is anything but one
/// `SELECT FROM <table> AS t WHERE <expression>`.
///
/// # Safety
/// In a backend's main thread, inside a transaction (it parses and analyzes, reading the
/// catalogs); its errors are PostgreSQL errors, raised through pgrx's guard.
unsafe fn analyzed_where_clause(probe: &CStr) -> Option<*mut pg_sys::Node> {
    // SAFETY: the caller upholds this function's contract (its `# Safety` section), on which
    // every unsafe operation below relies.
    unsafe {
        let statements = pg_sys::pg_parse_query(probe.as_ptr());
        if statements.is_null() || (*statements).length != 1 {
            return None;
        }
        let raw = (*(*statements).elements).ptr_value as *mut pg_sys::RawStmt;
        let select = (*raw).stmt as *mut pg_sys::SelectStmt;
        if select.is_null()
            || (*select).type_ != pg_sys::NodeTag::T_SelectStmt
            || !only_where(&*select)
        {
            return None;
        }
        let query = pg_sys::parse_analyze_fixedparams(
            raw,
            probe.as_ptr(),
            std::ptr::null(),
            0,
            std::ptr::null_mut(),
        );
        let jointree = (*query).jointree;
        if jointree.is_null() || (*jointree).quals.is_null() {
            return None;
        }
        let quals = (*jointree).quals;
        ((*quals).type_ != pg_sys::NodeTag::T_List).then_some(quals)
    }
}

/// One table, one WHERE clause, and nothing else a condition could have smuggled in.
fn only_where(select: &pg_sys::SelectStmt) -> bool {
    // SAFETY: a non-null List pointer from the parser, read only.
    let one_table = !select.fromClause.is_null() && unsafe { (*select.fromClause).length } == 1;
    one_table
        && !select.whereClause.is_null()
        && select.op == pg_sys::SetOperation::SETOP_NONE
        && select.distinctClause.is_null()
        && select.intoClause.is_null()
        && select.targetList.is_null()
        && select.groupClause.is_null()
        && !select.groupDistinct
        && select.havingClause.is_null()
        && select.windowClause.is_null()
        && select.valuesLists.is_null()
        && select.sortClause.is_null()
        && select.limitOffset.is_null()
        && select.limitCount.is_null()
        && select.lockingClause.is_null()
        && select.withClause.is_null()
}

/// The expression as SQL text, column names relative to the alias `t`.
///
/// # Safety
/// `quals` must be an expression [`analyzed_where_clause`] returned for the table `relid`, in
/// the same transaction.
unsafe fn deparse(quals: *mut pg_sys::Node, relid: Oid) -> String {
    // SAFETY: the caller upholds this function's contract (its `# Safety` section), on which
    // every unsafe operation below relies.
    unsafe {
        let context = pg_sys::deparse_context_for(c"t".as_ptr(), relid);
        let text = pg_sys::deparse_expression(quals, context, false, false);
        CStr::from_ptr(text).to_string_lossy().into_owned()
    }
}

unsafe extern "C-unwind" {
    /// `utils/elog.h`'s `errcontext_msg` (variadic, so not bound by pgrx).
    fn errcontext_msg(fmt: *const std::ffi::c_char, ...) -> std::ffi::c_int;
}

/// An error context entry for the parse of a condition, removed when dropped, also while an
/// error unwinds (so the stack never points at a frame that is gone).
struct ErrorContext {
    entry: Box<pg_sys::ErrorContextCallback>,
}

impl ErrorContext {
    fn push() -> ErrorContext {
        // SAFETY: links a heap entry (its address is stable) onto Postgres' error context
        // stack, in the main thread; Drop unlinks it.
        unsafe {
            let mut entry = Box::new(pg_sys::ErrorContextCallback {
                previous: pg_sys::error_context_stack,
                callback: Some(describe_condition),
                arg: std::ptr::null_mut(),
            });
            pg_sys::error_context_stack = &mut *entry;
            ErrorContext { entry }
        }
    }
}

impl Drop for ErrorContext {
    fn drop(&mut self) {
        // SAFETY: restores the stack as it was before push().
        unsafe { pg_sys::error_context_stack = self.entry.previous };
    }
}

/// # Safety
/// Called only by PostgreSQL's error reporting, as the error context callback
/// [`ErrorContext::push`] installs, while an error is being built.
unsafe extern "C-unwind" fn describe_condition(_arg: *mut std::ffi::c_void) {
    // SAFETY: called by errfinish while an error is being built, as errcontext callbacks are.
    unsafe {
        pg_sys::set_errcontext_domain(c"certyo_cdc".as_ptr());
        errcontext_msg(
            c"%s".as_ptr(),
            c"certyo_cdc: reading the backfill condition, which must be one SQL expression over the table (a WHERE condition without the WHERE keyword)".as_ptr(),
        );
    }
}

fn not_one_expression(condition: &str) -> CertyoError {
    let shown: String = condition.chars().take(200).collect();
    CertyoError::new(
        PgSqlErrorCode::ERRCODE_SYNTAX_ERROR,
        "certyo_cdc: the backfill condition is not one SQL expression",
    )
    .detail(format!("The condition was: {shown}"))
    .hint("Pass a WHERE condition without the WHERE keyword and without ORDER BY, LIMIT, UNION or a second statement, e.g. 'updated_at >= ''2026-01-01''' (columns may be qualified with t.).")
}
