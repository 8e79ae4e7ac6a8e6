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

/// Most statements kept. Write-back statements are built per table (its name and key in the
/// text), so every table written back, and every rename of one, adds a statement: kept without
/// bound, a role renaming its tracked tables in a loop grew the worker by 50 kB a rename, past
/// 500 MB (an attacker pass of 2026-12-05). Past this many, the least recently used is freed.
const MAX_KEPT: usize = 256;

struct Kept {
    statement: OwnedPreparedStatement,
    /// When it was last run (a count of runs), for eviction.
    used: u64,
}

thread_local! {
    /// Per statement text, and whether it writes (SPI runs the two differently).
    static KEPT: RefCell<HashMap<(String, bool), Kept>> = RefCell::new(HashMap::new());
    static RUNS: std::cell::Cell<u64> = const { std::cell::Cell::new(0) };
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
            Some(kept) => client.select(&kept.statement, None, args),
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
            Some(kept) => client.update(&kept.statement, None, args),
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
    let now = RUNS.with(|runs| {
        runs.set(runs.get() + 1);
        runs.get()
    });
    let found = KEPT.with(|kept| match kept.borrow_mut().get_mut(&key) {
        Some(kept) => {
            kept.used = now;
            true
        }
        None => false,
    });
    if found {
        return Ok(());
    }
    let types: Vec<PgOid> = args.iter().map(|a| PgOid::from(a.oid())).collect();
    let statement = if writes {
        client.prepare_mut(sql, &types)?
    } else {
        client.prepare(sql, &types)?
    };
    let statement = statement.keep();
    KEPT.with(|kept| {
        let mut kept = kept.borrow_mut();
        if kept.len() >= MAX_KEPT {
            let oldest = kept
                .iter()
                .min_by_key(|(_, k)| k.used)
                .map(|(key, _)| key.clone());
            if let Some(oldest) = oldest {
                kept.remove(&oldest); // dropped: its plan is freed (SPI_freeplan)
            }
        }
        kept.insert(
            key,
            Kept {
                statement,
                used: now,
            },
        );
    });
    Ok(())
}
