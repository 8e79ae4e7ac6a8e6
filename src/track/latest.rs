//! Catalog reads with the latest snapshot, as PostgreSQL's own DDL reads the catalogs. The checks
//! around partition DDL must see what the statement will act on: in a `REPEATABLE READ`
//! transaction, pgrx's reads take the transaction's snapshot, which does not show a table tracked,
//! or a partition attached or created, since it was taken (a `TRUNCATE` of such a partition
//! went unrefused, its rows' deletes uncaptured). What this statement changed is made visible
//! first.

use crate::error::{CertyoError, Result};
use pgrx::datum::{DatumWithOid, FromDatum, IntoDatum};
use pgrx::pg_sys;
use pgrx::prelude::*;
use pgrx::PgSqlErrorCode;
use std::ffi::{CStr, CString};

/// The first column of the first row of `query` (its parameters `$1`... are `args`), or `None`
/// when there is no row or the value is NULL.
pub fn one<T: FromDatum + IntoDatum>(query: &str, args: &[DatumWithOid]) -> Result<Option<T>> {
    run(query, args, |table| {
        // SAFETY: `table` is SPI's tuple table of the query just run, in SPI's memory; the
        // first row is read only if there is one, its first column only if the query has one,
        // and only if its type is the one `T` reads.
        unsafe {
            let desc = (*table).tupdesc;
            if pg_sys::SPI_processed == 0 || (*desc).natts < 1 {
                return Ok(None);
            }
            let typid = pg_sys::SPI_gettypeid(desc, 1);
            if !T::is_compatible_with(typid) {
                return Err(typid);
            }
            let tuple = *(*table).vals;
            let mut is_null = true;
            let datum = pg_sys::SPI_getbinval(tuple, desc, 1, &mut is_null);
            Ok(T::from_polymorphic_datum(datum, is_null, typid))
        }
    })?
    .map_err(|typid| {
        CertyoError::new(
            PgSqlErrorCode::ERRCODE_DATATYPE_MISMATCH,
            format!("certyo_cdc: a catalog read of its checks returned type {typid:?}, not the type it reads"),
        )
        .detail(format!("The query: {query}"))
        .hint("This is a bug in certyo_cdc; please report it with the statement that raised it.")
    })
}

/// Every row of `query` (no parameters), each column as text.
pub fn rows(query: &str) -> Result<Vec<Vec<Option<String>>>> {
    run(query, &[], |table| {
        // SAFETY: `table` is SPI's tuple table of the query just run; rows and columns are read
        // within `SPI_processed` and the descriptor's `natts`, and the text is copied out
        // before SPI's memory goes.
        unsafe {
            let desc = (*table).tupdesc;
            let columns = (*desc).natts;
            (0..pg_sys::SPI_processed as usize)
                .map(|i| {
                    let tuple = *(*table).vals.add(i);
                    (1..=columns)
                        .map(|column| {
                            let text = pg_sys::SPI_getvalue(tuple, desc, column);
                            (!text.is_null())
                                .then(|| CStr::from_ptr(text).to_string_lossy().into_owned())
                        })
                        .collect()
                })
                .collect()
        }
    })
}

/// Run `query` read-only with the latest snapshot and hand its tuple table to `read`, inside
/// one SPI connection (what `read` returns must not point into SPI's memory).
fn run<R>(
    query: &str,
    args: &[DatumWithOid],
    read: impl FnOnce(*mut pg_sys::SPITupleTable) -> R,
) -> Result<R> {
    let failed = |what: String| {
        CertyoError::new(
            PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
            format!("certyo_cdc: a catalog read of its checks failed: {what}"),
        )
        .detail(format!("The query: {query}"))
        .hint("This is a bug in certyo_cdc; please report it with the statement that raised it.")
    };
    let text = CString::new(query).map_err(|e| failed(e.to_string()))?;
    let mut types: Vec<pg_sys::Oid> = args.iter().map(DatumWithOid::oid).collect();
    let mut values: Vec<pg_sys::Datum> = args
        .iter()
        .map(|a| {
            a.datum()
                .map_or(pg_sys::Datum::from(0), |d| d.sans_lifetime())
        })
        .collect();
    let nulls: Vec<std::ffi::c_char> = args
        .iter()
        .map(|a| if a.datum().is_some() { b' ' } else { b'n' } as std::ffi::c_char)
        .collect();
    Spi::connect(|_client| {
        // SAFETY: inside `Spi::connect` (connected to SPI), in the statement's transaction; the
        // plan is checked before use, `types`, `values` and `nulls` have one entry per
        // parameter and outlive the call, and the tuple table is checked before `read` gets it.
        unsafe {
            pg_sys::CommandCounterIncrement();
            let plan = pg_sys::SPI_prepare(text.as_ptr(), types.len() as i32, types.as_mut_ptr());
            if plan.is_null() {
                let code = pg_sys::SPI_result;
                return Err(failed(format!("SPI_prepare returned {code}")));
            }
            let done = pg_sys::SPI_execute_snapshot(
                plan,
                values.as_mut_ptr(),
                nulls.as_ptr(),
                pg_sys::GetLatestSnapshot(),
                std::ptr::null_mut(),
                true,
                false,
                0,
            );
            let table = pg_sys::SPI_tuptable;
            if done != pg_sys::SPI_OK_SELECT as i32 || table.is_null() {
                return Err(failed(format!("SPI_execute_snapshot returned {done}")));
            }
            Ok(read(table))
        }
    })
}
