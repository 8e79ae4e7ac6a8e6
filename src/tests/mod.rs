//! `#[pg_test]`s: each runs inside one transaction of a real Postgres, rolled back at the end.
//! What needs real commits (a rolled-back top-level transaction, roles logging in, DROP
//! EXTENSION) is covered by `pg_test/test_capture.py` against a real cluster.

mod capture;
mod operations;
mod track;

use pgrx::prelude::*;

/// Run SQL, failing the test with Postgres' message if it errors.
pub fn sql(statements: &str) {
    Spi::run(statements).unwrap_or_else(|e| panic!("{statements}: {e}"));
}

pub fn one<T: pgrx::FromDatum + pgrx::IntoDatum>(query: &str) -> Option<T> {
    Spi::get_one::<T>(query).unwrap_or_else(|e| panic!("{query}: {e}"))
}

/// The queue as `(operation, record_id, payload text)`, oldest first.
pub fn queued() -> Vec<(String, String, String)> {
    Spi::connect(|client| {
        client
            .select(
                "SELECT operation, record_id, payload::text FROM certyo.queue ORDER BY id",
                None,
                &[],
            )
            .unwrap()
            .map(|row| {
                (
                    row.get::<String>(1).unwrap().unwrap(),
                    row.get::<String>(2).unwrap().unwrap(),
                    row.get::<String>(3).unwrap().unwrap(),
                )
            })
            .collect()
    })
}

pub fn queue_len() -> i64 {
    one::<i64>("SELECT count(*) FROM certyo.queue").unwrap_or(0)
}

/// Run `statement` in a subtransaction and return `(sqlstate, message, hint)` of its error,
/// or `None` when it succeeds. The subtransaction is rolled back, as a failed statement is.
pub fn error_of(statement: &str) -> Option<(String, String, String)> {
    // Created once per test (the test may have switched to a role that could not replace it).
    if one::<bool>("SELECT to_regprocedure('pg_temp.error_of(text)') IS NULL") == Some(true) {
        define_error_of();
    }
    let (state, message, hint) = Spi::get_three_with_args::<String, String, String>(
        "SELECT * FROM pg_temp.error_of($1)",
        &[statement.into()],
    )
    .unwrap();
    state.map(|s| (s, message.unwrap_or_default(), hint.unwrap_or_default()))
}

fn define_error_of() {
    sql(r#"
        CREATE OR REPLACE FUNCTION pg_temp.error_of(statement text, OUT state text, OUT message text, OUT hint text)
        LANGUAGE plpgsql AS $f$
        BEGIN
            EXECUTE statement;
        EXCEPTION WHEN OTHERS THEN
            GET STACKED DIAGNOSTICS state = RETURNED_SQLSTATE, message = MESSAGE_TEXT, hint = PG_EXCEPTION_HINT;
        END
        $f$"#);
}
