//! certyo_cdc: every committed change of a tracked table, captured in the writer's own
//! transaction and queued for anchoring on Certyo.
//!
//! Map of the crate:
//! - [`track`]: the SQL surface that starts and stops capture (`certyo.track`, `certyo.untrack`)
//!   and keeps capture triggers current after `ALTER TABLE`;
//! - [`capture`]: the write path, the trigger that turns a row into a queued change;
//! - [`backfill`]: queue a large table's current rows, in chunks the worker performs;
//! - [`delivery`]: the launcher and the background worker per database that sends queued
//!   changes to Certyo, writes hashes back, and verifies anchoring;
//! - [`audit`]: the tamper audit, rows that differ from what was captured and accepted;
//! - [`ddl_hook`]: checks before DDL that would lose changes or stop capture (`DROP EXTENSION`
//!   with a backlog, dropping or retyping a captured column, `DROP TRIGGER` of capture), and
//!   the statements that start or end a database's worker (`CREATE EXTENSION`, `DROP DATABASE`);
//! - the Certyo API client and its delivery rules are the workspace crate `certyo` (`certyo/`),
//!   shared with `certyo-relay`: it knows nothing of Postgres;
//! - [`wake`]: the registry of delivery workers (one per database) in shared memory, and the
//!   doorbells: a committing writer rings its database's worker, `CREATE EXTENSION` the launcher;
//! - [`settings`]: the `certyo.*` settings (GUCs), read by delivery, backfill and `track()`;
//! - [`api_key`]: the API key from its file or setting, kept out of the server log;
//! - [`error`]: the one error type, raised with an SQLSTATE, detail and hint;
//! - [`relation`]: a `table_open`ed relation, closed on every path;
//! - [`rights`]: whose rights run user code (the table owner's, restricted, never the worker's);
//! - [`hard_limit`]: owners' code that catches its cancellation ends the worker's process,
//!   and is left to the slow lane afterwards;
//! - [`compat`]: the server APIs that differ between the PostgreSQL versions built for;
//! - `sql/schema.sql`: the queue, the `tracked_tables` view and the DDL event trigger;
//!   `sql/delivery.sql`: the worker's tables (delivery, receipt, backfills, worker state);
//!   `sql/operations.sql`: the operator surface (status, pause/resume, retry, history, ...).
//!
//! Capture and delivery meet only at the `certyo.queue` table (and the doorbell).

mod api_key;
mod audit;
mod backfill;
pub mod capture;
mod compat;
mod ddl_hook;
mod delivery;
pub mod error;
mod hard_limit;
mod relation;
mod rights;
mod settings;
mod shape;
mod track;
mod wake;

::pgrx::pg_module_magic!(name, version);

pgrx::extension_sql_file!("../sql/schema.sql", name = "schema", bootstrap);
pgrx::extension_sql_file!(
    "../sql/delivery.sql",
    name = "delivery",
    requires = ["schema"]
);
pgrx::extension_sql_file!(
    "../sql/operations.sql",
    name = "operations",
    requires = ["delivery"]
);

/// Settings everywhere; the worker and its shared memory only when preloaded.
#[pgrx::pg_guard]
pub extern "C-unwind" fn _PG_init() {
    // SAFETY: a plain read of a Postgres global, in the process's main thread.
    let preloading = unsafe { pgrx::pg_sys::process_shared_preload_libraries_in_progress };
    // Errors are for people: a Rust backtrace never reaches an error's DETAIL or the log,
    // whatever RUST_BACKTRACE the server was started with. Set before any thread exists.
    std::env::set_var("RUST_LIB_BACKTRACE", "0");
    settings::define(preloading);
    api_key::redact_from_log(settings::api_key_setting);
    ddl_hook::install();
    if preloading {
        wake::init_shared_memory();
        capture::ids::init_shared_memory();
        backfill::log_limit::init_shared_memory();
        hard_limit::init_shared_memory();
        delivery::init_shared_memory();
        // Not while pg_upgrade runs the server: nothing may write to the databases then.
        // SAFETY: a plain read of a Postgres global, in the postmaster's main thread.
        if !unsafe { pgrx::pg_sys::IsBinaryUpgrade } {
            delivery::register();
        }
    }
}

#[cfg(any(test, feature = "pg_test"))]
mod tests;

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec![]
    }
}
