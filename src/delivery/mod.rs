//! Delivery: the background worker that drains `certyo.queue` to Certyo, retries what failed,
//! keeps dead letters and receipts, and writes record hashes back to the source rows.
//!
//! - `launcher`: the worker with no database that starts a delivery worker per database;
//! - `worker`: a database's delivery worker, its main loop;
//! - `prepared`: the worker's statements, planned once per session;
//! - `backlog`: a long queue read once, in id order, for the passes that drain it;
//! - `store`: the statements of delivery (take, record, expire, status), each its own short
//!   transaction;
//! - `sending`: the batch on the wire, its HTTP on a helper thread;
//! - `anchor`: verification of accepted receipts;
//! - `vacuum`: the worker vacuums the queue it empties;
//! - `write_back`: hashes and anchor status written back to the source rows, each owner's
//!   code within its share of a pass;
//! - `write_back_anchored`: the one write-back of a table tracked with `write_back =>
//!   'anchored'`, once its version is anchored;
//! - `slow_lane`: a second worker for what runs owners' code longer (write-backs that wait,
//!   backfill chunks), so that it never holds up delivery.

mod anchor;
mod backlog;
mod launcher;
mod owners;
mod prepared;
mod sending;
mod slow_lane;
mod store;
mod vacuum;
mod worker;
mod write_back;
mod write_back_anchored;

use pgrx::bgworkers::BackgroundWorker;
use std::sync::atomic::{AtomicBool, Ordering};

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
