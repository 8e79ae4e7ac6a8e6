//! `#[pg_test]`s: each runs in a rolled-back transaction of a real Postgres.
mod capture;
