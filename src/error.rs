//! The one error type of the extension.
//!
//! Every failure a user can meet is raised as an `ereport(ERROR)` with an SQLSTATE, a message
//! that names the problem, and, where there is one, a hint that names the fix. Functions return
//! `Result<_, CertyoError>` and the SQL entry points raise at the boundary, so the reasoning stays
//! in plain Rust and the error leaves through one door.

use pgrx::pg_sys::{self, panic::ErrorReport};
use pgrx::{PgLogLevel, PgSqlErrorCode};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertyoError {
    pub code: PgSqlErrorCode,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

pub type Result<T> = std::result::Result<T, CertyoError>;

impl CertyoError {
    pub fn new(code: PgSqlErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            detail: None,
            hint: None,
        }
    }

    pub fn detail(mut self, detail: impl Into<String>) -> Self {
        self.detail = Some(detail.into());
        self
    }

    pub fn hint(mut self, hint: impl Into<String>) -> Self {
        self.hint = Some(hint.into());
        self
    }

    /// Raise as `ERROR`: aborts the current (sub)transaction, so nothing the caller did stays.
    pub fn raise(self) -> ! {
        self.report(PgLogLevel::ERROR);
        unreachable!("ereport(ERROR) does not return")
    }

    /// Say as `WARNING`, with its detail and hint; nothing is aborted.
    pub fn warn(self) {
        self.report(PgLogLevel::WARNING);
    }

    fn report(self, level: PgLogLevel) {
        let mut report = ErrorReport::new(self.code, self.message, "certyo_cdc");
        if let Some(detail) = self.detail {
            report = report.set_detail(detail);
        }
        if let Some(hint) = self.hint {
            report = report.set_hint(hint);
        }
        report.report(level);
    }
}

impl From<pgrx::spi::Error> for CertyoError {
    fn from(e: pgrx::spi::Error) -> Self {
        CertyoError::new(
            PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
            format!("certyo_cdc: SPI failed: {e}"),
        )
    }
}

/// Run `f`, turning a Postgres ERROR raised inside it (or a panic) into `Err` with its message,
/// after aborting the transaction it left open. For the worker, which must outlive errors: a
/// table dropped under it, `DROP EXTENSION` between two statements, a bad backfill condition.
pub fn guarded<T>(
    f: impl FnOnce() -> std::result::Result<T, String> + std::panic::UnwindSafe,
) -> std::result::Result<T, String> {
    pgrx::PgTryBuilder::new(f)
        .catch_others(|caught| {
            // SAFETY: pgrx flushed the error state when it caught the error; the worker's
            // transaction is aborted as Postgres' own error recovery would.
            unsafe { pgrx::pg_sys::AbortCurrentTransaction() };
            Err(message_of(&caught))
        })
        .execute()
}

/// [`guarded`] for work whose failures differ by kind: the SQLSTATE of a Postgres error
/// caught (or of the `CertyoError` returned) comes with its message.
pub fn guarded_with_code<T>(
    f: impl FnOnce() -> Result<T> + std::panic::UnwindSafe,
) -> std::result::Result<T, (PgSqlErrorCode, String)> {
    pgrx::PgTryBuilder::new(|| f().map_err(|e| (e.code, e.message)))
        .catch_others(|caught| {
            // SAFETY: as in `guarded`.
            unsafe { pgrx::pg_sys::AbortCurrentTransaction() };
            Err((code_of(&caught), message_of(&caught)))
        })
        .execute()
}

/// Run `f` in a transaction of its own (for the worker, which is outside one between steps):
/// committed when `f` returns `Ok`, rolled back when it returns `Err`, so that a step that fails
/// halfway leaves nothing behind. (pgrx's `BackgroundWorker::transaction` commits whatever `f`
/// returns.) A Postgres error or panic inside unwinds to [`guarded`], which aborts.
pub fn transaction<T, E>(
    f: impl FnOnce() -> std::result::Result<T, E>,
) -> std::result::Result<T, E> {
    // SAFETY: the worker's main thread, between transactions; ended below on both paths (or
    // by the abort in `guarded` when `f` raises an error).
    unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
    }
    let result = f();
    // SAFETY: ends the transaction started above.
    unsafe {
        pg_sys::PopActiveSnapshot();
        match &result {
            Ok(_) => pg_sys::CommitTransactionCommand(),
            Err(_) => pg_sys::AbortCurrentTransaction(),
        }
    }
    result
}

/// Run `f` in a subtransaction: an ERROR (or panic) inside rolls back only what `f` did and
/// comes back as `Err` with its SQLSTATE and message, and the enclosing transaction goes on, as around a
/// PL/pgSQL `EXCEPTION` block. The user, security context and settings that `f` changed are
/// restored by the subtransaction's abort.
pub fn in_subtransaction<T>(
    f: impl FnOnce() -> T + std::panic::UnwindSafe,
) -> std::result::Result<T, (PgSqlErrorCode, String)> {
    subtransaction(f).map_err(|caught| (code_of(&caught), message_of(&caught)))
}

/// [`in_subtransaction`] for an ERROR of SQLSTATE `code` alone: that one rolls back what `f`
/// did and comes back as `None`; any other is raised again as it was (its detail and hint
/// too), after the rollback.
pub fn in_subtransaction_unless<T>(
    code: PgSqlErrorCode,
    f: impl FnOnce() -> T + std::panic::UnwindSafe,
) -> Option<T> {
    match subtransaction(f) {
        Ok(value) => Some(value),
        Err(caught) if code_of(&caught) == code => None,
        Err(caught) => caught.rethrow(),
    }
}

/// `f` in a subtransaction, rolled back with what it did if it raises: the error as caught
/// (boxed: it is large).
fn subtransaction<T>(
    f: impl FnOnce() -> T + std::panic::UnwindSafe,
) -> std::result::Result<T, Box<pgrx::pg_sys::panic::CaughtError>> {
    // SAFETY: main thread, inside a transaction; the caller's memory context and resource
    // owner are restored on both paths, as PL/pgSQL does around an exception block.
    let (context, owner) = unsafe { (pg_sys::CurrentMemoryContext, pg_sys::CurrentResourceOwner) };
    // SAFETY: as above: the values just read, put back in the same process and transaction.
    let restore = move || unsafe {
        pg_sys::MemoryContextSwitchTo(context);
        pg_sys::CurrentResourceOwner = owner;
    };
    // SAFETY: as above; ended by one of the two calls below.
    unsafe { pg_sys::BeginInternalSubTransaction(std::ptr::null()) };
    pgrx::PgTryBuilder::new(move || {
        let value = f();
        // SAFETY: commits the subtransaction begun above.
        unsafe { pg_sys::ReleaseCurrentSubTransaction() };
        restore();
        Ok(value)
    })
    .catch_others(move |caught| {
        // SAFETY: the error state was flushed when pgrx caught the error; this aborts the
        // subtransaction begun above and everything it did.
        unsafe { pg_sys::RollbackAndReleaseCurrentSubTransaction() };
        restore();
        Err(Box::new(caught))
    })
    .execute()
}

fn code_of(caught: &pgrx::pg_sys::panic::CaughtError) -> PgSqlErrorCode {
    use pgrx::pg_sys::panic::CaughtError;
    match caught {
        CaughtError::PostgresError(report) | CaughtError::ErrorReport(report) => {
            report.sql_error_code()
        }
        CaughtError::RustPanic { ereport, .. } => ereport.sql_error_code(),
    }
}

fn message_of(caught: &pgrx::pg_sys::panic::CaughtError) -> String {
    use pgrx::pg_sys::panic::CaughtError;
    let message = match caught {
        CaughtError::PostgresError(report) | CaughtError::ErrorReport(report) => report.message(),
        CaughtError::RustPanic { ereport, .. } => ereport.message(),
    };
    bounded(message)
}

/// Longest text of a caught error that the worker keeps, stores and logs.
const MAX_ERROR_TEXT: usize = 1000;

/// `message`, cut to [`MAX_ERROR_TEXT`] bytes (at a character boundary) with a note of how much
/// was cut. Errors the worker catches may come from users' code (a write-back trigger's `RAISE`,
/// a backfill condition): one of 100 MB, kept per table, stored, put in the worker's status and
/// logged once a minute, filled the log disk and the worker's memory (an attacker pass of
/// 2026-12-05).
fn bounded(message: &str) -> String {
    if message.len() <= MAX_ERROR_TEXT {
        return message.to_string();
    }
    let mut end = MAX_ERROR_TEXT;
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    format!(
        "{}... ({} more bytes)",
        &message[..end],
        message.len() - end
    )
}

/// Raise `Err` as an ERROR, return `Ok` as is: the single place where a `Result` meets SQL.
pub trait OrRaise<T> {
    fn or_raise(self) -> T;
}

impl<T> OrRaise<T> for Result<T> {
    fn or_raise(self) -> T {
        self.unwrap_or_else(|e| e.raise())
    }
}

#[cfg(test)]
mod tests {
    use super::{bounded, MAX_ERROR_TEXT};

    #[test]
    fn long_error_text_is_cut_at_a_character_boundary() {
        assert_eq!(bounded("short"), "short");
        let long = "é".repeat(MAX_ERROR_TEXT);
        let cut = bounded(&long);
        assert!(cut.len() < MAX_ERROR_TEXT + 40, "{}", cut.len());
        assert!(cut.ends_with(&format!("... ({} more bytes)", long.len() - MAX_ERROR_TEXT)));
    }
}
