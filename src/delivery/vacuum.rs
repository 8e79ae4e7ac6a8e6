//! Vacuuming `certyo.queue` from the worker. The queue is an inbox: writers append, the worker
//! deletes what it settled. Its dead rows pile up at the front faster than autovacuum visits
//! (once a minute at most), and every pass reads the whole queue to take what is visible:
//! measured with 4 writers, the scan over dead rows was a fifth of the worker's CPU. So the
//! worker vacuums the queue itself after it has settled `AFTER` changes. The queue has no
//! index, so one heap pass frees the space, and writers refill the same pages.

use pgrx::pg_sys;
use pgrx::PgList;

/// Changes settled between two vacuums of the queue.
pub const AFTER: i64 = 20_000;

/// `SKIP_LOCKED`: if autovacuum (or an operator) is vacuuming it, this turn is skipped.
/// `TRUNCATE false`: shortening the file needs an exclusive lock that writers would wait for.
const VACUUM: &std::ffi::CStr = c"VACUUM (SKIP_LOCKED, TRUNCATE false) certyo.queue";

/// Vacuum the queue as a top-level command, as `exec_simple_query` runs one: VACUUM cannot
/// run inside a transaction or a function (SPI), and it commits and starts transactions of
/// its own. Called between the worker's transactions; an ERROR aborts the one open.
pub fn queue() {
    // SAFETY: the worker's main thread with no transaction open. The transaction started
    // here is the one VACUUM commits first (it pops the snapshot we push, as it does the
    // one exec_simple_query pushes) and the one it starts before returning is committed
    // below. The parse tree is built in that transaction's memory and used only inside it.
    unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
        let parsed = PgList::<pg_sys::RawStmt>::from_pg(pg_sys::raw_parser(
            VACUUM.as_ptr(),
            pg_sys::RawParseMode::RAW_PARSE_DEFAULT,
        ));
        if let Some(raw) = parsed.get_ptr(0) {
            let pstate = pg_sys::make_parsestate(std::ptr::null_mut());
            (*pstate).p_sourcetext = VACUUM.as_ptr();
            pg_sys::ExecVacuum(pstate, (*raw).stmt.cast(), true);
        }
        if pg_sys::ActiveSnapshotSet() {
            pg_sys::PopActiveSnapshot();
        }
        pg_sys::CommitTransactionCommand();
    }
}
