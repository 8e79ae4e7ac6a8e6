//! Delivery: the background worker that drains `certyo.queue` to Certyo, retries what failed,
//! keeps dead letters and receipts, and writes record hashes back to the source rows.
//!
//! - `launcher`: the worker with no database that starts a delivery worker per database;
//! - `worker`: a database's delivery worker, its main loop;
//! - `prepared`: the worker's statements, planned once per session;
//! - `backlog`: a long queue read once, in id order, for the passes that drain it;
//! - `entry`: a change taken for sending, read from its row;
//! - `take`: taking the next batch (from the queue, or from `certyo.delivery` when changes
//!   wait for a retry), and the operator's switches before a pass;
//! - `record`: recording the answers (receipts, retries, dead letters, tallies), the expiry of
//!   receipts and the worker's published state;
//! - `planner`: the worker's own ANALYZE of its tables;
//! - `sending`: the batch on the wire, its HTTP on a helper thread;
//! - `anchor`: verification of accepted receipts;
//! - `vacuum`: the worker vacuums the queue it empties;
//! - `keys`: each table's record key and write-back facts, kept until the catalog changes;
//! - `write_back`: hashes and anchor status written back to the source rows, each owner's
//!   code within its share of a pass;
//! - `write_back_anchored`: the one write-back of a table tracked with `write_back =>
//!   'anchored'`, once its version is anchored;
//! - `slow_lane`: a second worker for what runs owners' code longer (write-backs that wait,
//!   backfill chunks), so that it never holds up delivery.

mod anchor;
mod backlog;
mod entry;
mod keys;
mod launcher;
mod owners;
mod planner;
pub(crate) mod prepared;
mod record;
mod sending;
mod slow_lane;
mod take;
mod vacuum;
mod worker;
mod write_back;
mod write_back_anchored;

use pgrx::bgworkers::BackgroundWorker;
use pgrx::spi::Spi;
use std::sync::atomic::{AtomicBool, Ordering};

type SpiResult<T> = Result<T, pgrx::spi::Error>;

/// Each statement of delivery is its own short transaction; none is open while HTTP is in
/// flight.
fn in_transaction<T>(f: impl FnOnce() -> SpiResult<T>) -> SpiResult<T> {
    crate::error::transaction(f)
}

/// `sql` for the installed schema: one from before 0.2.0 (the library installed, `ALTER
/// EXTENSION certyo_cdc UPDATE` not yet run) has no `table_id` columns, and is delivered as
/// it was until the update (see `crate::track::identity::schema_has_ids`).
fn for_schema(sql: &str) -> std::borrow::Cow<'_, str> {
    if crate::track::identity::schema_has_ids() {
        std::borrow::Cow::Borrowed(sql)
    } else {
        std::borrow::Cow::Owned(
            sql.replace(", d.table_id", "")
                .replace(", q.table_id", "")
                .replace(", table_id", ""),
        )
    }
}

/// The database's name if certyo_cdc is installed in it (None: a database the worker has
/// nothing to do in).
pub fn installed_in_this_database() -> SpiResult<Option<String>> {
    in_transaction(|| {
        Spi::get_one::<String>(
            "SELECT (SELECT current_database()::text FROM pg_extension WHERE extname = 'certyo_cdc')",
        )
    })
}

/// Whether the worker's session is a superuser's, as it must be (a database's own settings
/// could make it another role).
pub fn runs_as_superuser() -> SpiResult<bool> {
    in_transaction(|| {
        Ok(
            Spi::get_one::<bool>("SELECT current_setting('is_superuser')::boolean")?
                .unwrap_or(false),
        )
    })
}

/// Has SIGTERM arrived? pgrx clears its flag when it is read, and several places must see it
/// (the main loop, the wait for a batch in flight), so it is remembered here once seen. The
/// delivery worker and the slow lane have a handler of their own (see `crate::hard_limit`).
pub fn stopping() -> bool {
    static STOPPING: AtomicBool = AtomicBool::new(false);
    if BackgroundWorker::sigterm_received() || crate::hard_limit::sigterm_received() {
        STOPPING.store(true, Ordering::Relaxed);
    }
    STOPPING.load(Ordering::Relaxed)
}

/// Owners' code that ended a process of `database` (the delivery worker or its slow lane)
/// at its hard limit: its table's write-backs wait for the slow lane, with back-off, or its
/// backfill fails, so that it does not end the next process too (see `crate::hard_limit`).
/// At the start of every pass of either: whichever runs first after the end.
fn after_hard_limit() -> Result<(), pgrx::spi::Error> {
    // SAFETY: a plain read of a Postgres global of this connected process.
    let database = unsafe { pgrx::pg_sys::MyDatabaseId };
    for ended in crate::hard_limit::ended(database) {
        match ended {
            crate::hard_limit::Running::WriteBack(relid) => {
                write_back::failing::ended_the_process(relid)?;
            }
            crate::hard_limit::Running::Backfill(id) => crate::backfill::ended_the_process(id)?,
        }
    }
    Ok(())
}

/// The delivery's shared memory (`owners`), from `_PG_init` while preloading.
pub fn init_shared_memory() {
    owners::init_shared_memory();
}

/// Register the launcher, which starts the delivery workers; only possible while the
/// postmaster loads `shared_preload_libraries`.
pub fn register() {
    launcher::register();
}
