//! The worker's statements, parsed and planned once per session and kept. A pass runs about a
//! dozen statements on a few rows each; parsing and planning them anew every time was about
//! half of the worker's CPU while writers committed single rows (`perf`, 4 writers), CPU
//! that the writers on the same cores lost.
//!
//! Postgres re-plans a kept statement by itself when a table it uses changes, and chooses
//! between a generic and a per-call plan as it does for any prepared statement. The key is the
//! statement's text: a statement built per table (write-back) is kept per table.

use pgrx::datum::DatumWithOid;
use pgrx::spi::{OwnedPreparedStatement, SpiClient, SpiResult, SpiTupleTable};
use pgrx::PgOid;
use std::cell::RefCell;
use std::collections::HashMap;

thread_local! {
    /// Per statement text, and whether it writes (SPI runs the two differently).
    static KEPT: RefCell<HashMap<(String, bool), OwnedPreparedStatement>> =
        RefCell::new(HashMap::new());
}

/// Run a statement that only reads.
pub fn select<'conn>(
    client: &SpiClient<'conn>,
    sql: &str,
    args: &[DatumWithOid<'_>],
) -> SpiResult<SpiTupleTable<'conn>> {
    keep(client, sql, args, false)?;
    KEPT.with(|kept| {
        let kept = kept.borrow();
        match kept.get(&(sql.to_string(), false)) {
            Some(statement) => client.select(statement, None, args),
            None => client.select(sql, None, args),
        }
    })
}

/// Run a statement that writes.
pub fn update<'conn>(
    client: &mut SpiClient<'conn>,
    sql: &str,
    args: &[DatumWithOid<'_>],
) -> SpiResult<SpiTupleTable<'conn>> {
    keep(client, sql, args, true)?;
    KEPT.with(|kept| {
        let kept = kept.borrow();
        match kept.get(&(sql.to_string(), true)) {
            Some(statement) => client.update(statement, None, args),
            None => client.update(sql, None, args),
        }
    })
}

/// Prepare and keep `sql` unless it is kept already. Its parameters take the types of the
/// first call's arguments: each call site passes the same Rust types every time.
fn keep(
    client: &SpiClient<'_>,
    sql: &str,
    args: &[DatumWithOid<'_>],
    writes: bool,
) -> SpiResult<()> {
    let key = (sql.to_string(), writes);
    if KEPT.with(|kept| kept.borrow().contains_key(&key)) {
        return Ok(());
    }
    let types: Vec<PgOid> = args.iter().map(|a| PgOid::from(a.oid())).collect();
    let statement = if writes {
        client.prepare_mut(sql, &types)?
    } else {
        client.prepare(sql, &types)?
    };
    let statement = statement.keep();
    KEPT.with(|kept| kept.borrow_mut().insert(key, statement));
    Ok(())
}
