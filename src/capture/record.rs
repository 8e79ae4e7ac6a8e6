//! One row image turned into what the queue stores: payload, record id, source timestamp.

use super::plan::{TablePlan, TimestampColumn};
use crate::error::{CertyoError, Result};
use pgrx::pg_sys::{self, Datum};
use pgrx::PgSqlErrorCode;
use smallvec::{smallvec, SmallVec};

pub use certyo::Operation;

/// A heap tuple deformed into per-attribute values.
/// Columns a row holds without a heap allocation: two allocations and two frees per captured
/// row were 300 instructions (callgrind, a 20,000-row `INSERT ... SELECT`).
const INLINE_COLUMNS: usize = 16;

pub struct Row {
    values: SmallVec<[Datum; INLINE_COLUMNS]>,
    nulls: SmallVec<[bool; INLINE_COLUMNS]>,
}

impl Row {
    /// # Safety
    /// `tuple` must be a valid tuple of a relation whose descriptor is `tupdesc`.
    pub unsafe fn deform(
        tuple: pg_sys::HeapTuple,
        tupdesc: pg_sys::TupleDesc,
        natts: usize,
    ) -> Row {
        // SAFETY: the caller upholds this function's contract (its `# Safety` section), on which
        // every unsafe operation below relies.
        unsafe {
            let mut row = Row {
                values: smallvec![Datum::from(0); natts],
                nulls: smallvec![true; natts],
            };
            super::never_raise::heap_deform_tuple(
                tuple,
                tupdesc,
                row.values.as_mut_ptr(),
                row.nulls.as_mut_ptr(),
            );
            // A row stored before `ADD COLUMN ... DEFAULT` lacks the new attributes on disk; their
            // value is the "missing" default in the catalog, as a SELECT would show it.
            let stored =
                usize::from((*(*tuple).t_data).t_infomask2 & pg_sys::HEAP_NATTS_MASK as u16);
            for i in stored..natts {
                let mut is_null = true;
                row.values[i] = pg_sys::getmissingattr(tupdesc, (i + 1) as i32, &mut is_null);
                row.nulls[i] = is_null;
            }
            row
        }
    }

    fn get(&self, index: usize) -> Option<Datum> {
        (!self.nulls[index]).then(|| self.values[index])
    }

    /// Is column `index` (from 0) NULL in this row?
    pub fn is_null(&self, index: usize) -> bool {
        self.nulls[index]
    }

    /// The value of column `index` (from 0) as text, if it is a text column and not NULL.
    ///
    /// # Safety
    /// `index` must be a column of type `text` of the row's relation.
    pub unsafe fn text(&self, index: usize) -> Option<String> {
        // SAFETY: the caller upholds this function's contract (its `# Safety` section), on which
        // every unsafe operation below relies.
        unsafe {
            let datum = *self.values.get(index)?;
            if *self.nulls.get(index)? {
                return None;
            }
            <String as pgrx::FromDatum>::from_polymorphic_datum(datum, false, pg_sys::TEXTOID)
        }
    }

    /// Whether column `index` (from 0) holds, stored inline as it is, exactly the text
    /// `expected`: read in place, without a copy (the capture trigger asks this of every row).
    /// A compressed or out-of-line value is not compared (a value that short is never either).
    ///
    /// # Safety
    /// `index` must be a column of type `text` of the row's relation.
    pub unsafe fn text_is(&self, index: usize, expected: &str) -> bool {
        let (Some(&datum), Some(false)) = (self.values.get(index), self.nulls.get(index).copied())
        else {
            return false;
        };
        // SAFETY: a non-null text datum is a varlena pointer (the caller's contract); its header
        // gives the length of the bytes read, compressed or out-of-line data compared as stored.
        unsafe {
            let value = datum.cast_mut_ptr::<pg_sys::varlena>();
            !pgrx::varlena::varatt_is_4b_c(value)
                && !pgrx::varlena::varatt_is_1b_e(value)
                && pgrx::varlena::varlena_to_byte_slice(value) == expected.as_bytes()
        }
    }
}

thread_local! {
    /// The rendering buffer `payload` reuses (see there).
    static SCRATCH: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Largest rendering buffer kept between rows: one grown by a large value is let go.
const SCRATCH_KEPT: usize = 64 * 1024;

pub struct Change {
    pub operation: Operation,
    pub record_id: Vec<u8>,
    pub payload: Vec<u8>,
    pub source_timestamp: pg_sys::TimestampTz,
}

impl TablePlan {
    /// # Safety
    /// `row` must be a row of the table this plan was built for.
    pub unsafe fn change(&self, operation: Operation, row: &Row) -> Result<Change> {
        // SAFETY: the caller upholds this function's contract (its `# Safety` section), on which
        // every unsafe operation below relies.
        unsafe {
            let change = Change {
                operation,
                record_id: self.record_id(row)?,
                payload: self.payload(row),
                source_timestamp: self.source_timestamp(row),
            };
            if !database_is_utf8()
                && (std::str::from_utf8(&change.record_id).is_err()
                    || std::str::from_utf8(&change.payload).is_err())
            {
                return Err(not_utf8(&self.collection));
            }
            Ok(change)
        }
    }

    /// The business columns as a JSON object, in table order, names exactly as in the table.
    ///
    /// # Safety
    /// `row` must be a row of the table this plan was built for.
    unsafe fn payload(&self, row: &Row) -> Vec<u8> {
        // SAFETY: the caller upholds this function's contract (its `# Safety` section), on which
        // every unsafe operation below relies.
        unsafe {
            let mut out = Vec::with_capacity(64 + 24 * self.payload.len());
            // Values are rendered through a buffer kept for the backend's life: a new one per row
            // grew by reallocation, several times a row (measured with callgrind). Taken, not
            // borrowed, so a type's output function that writes a tracked table finds it empty.
            let mut scratch = SCRATCH.take();
            out.push(b'{');
            for column in &self.payload {
                out.extend_from_slice(&column.key);
                match row.get(column.index) {
                    None => out.extend_from_slice(b"null"),
                    Some(datum) => column.value.write_json(datum, &mut out, &mut scratch),
                }
            }
            out.push(b'}');
            if scratch.capacity() <= SCRATCH_KEPT {
                SCRATCH.set(scratch);
            }
            out
        }
    }

    /// The record id: one column's text form, or for several columns each text form with `\`
    /// and `/` backslash-escaped, joined by `/` (`42/EU`).
    ///
    /// # Safety
    /// `row` must be a row of the table this plan was built for.
    unsafe fn record_id(&self, row: &Row) -> Result<Vec<u8>> {
        // SAFETY: the caller upholds this function's contract (its `# Safety` section), on which
        // every unsafe operation below relies.
        unsafe { self.record_id_of(row, &self.record_id) }
    }

    /// The record id the row would have with `key` (positions in `payload`) as record id
    /// columns: the audit finds a row's versions captured under an earlier key with it.
    ///
    /// # Safety
    /// `row` must be a row of the table this plan was built for.
    pub unsafe fn record_id_of(&self, row: &Row, key: &[usize]) -> Result<Vec<u8>> {
        // SAFETY: the caller upholds this function's contract (its `# Safety` section), on which
        // every unsafe operation below relies.
        unsafe {
            let columns: Vec<&super::plan::Column> =
                key.iter().map(|&p| &self.payload[p]).collect();
            self.record_id_from(row, &columns)
        }
    }

    /// The record id the row would have with `key` as record id columns, which need not be
    /// payload columns (the audit renders an earlier key whose column is excluded now).
    ///
    /// # Safety
    /// `row` must be a row of the table this plan was built for, `key` columns of it.
    pub unsafe fn record_id_from(
        &self,
        row: &Row,
        key: &[&super::plan::Column],
    ) -> Result<Vec<u8>> {
        // SAFETY: the caller upholds this function's contract (its `# Safety` section), on which
        // every unsafe operation below relies.
        unsafe {
            let composite = key.len() > 1;
            let mut out = Vec::new();
            let mut part = Vec::new();
            for (n, &column) in key.iter().enumerate() {
                let datum = row
                    .get(column.index)
                    .ok_or_else(|| null_record_id(&self.collection, &column.name))?;
                if !composite {
                    column.value.write_text(datum, &mut out);
                    continue;
                }
                if n > 0 {
                    out.push(b'/');
                }
                part.clear();
                column.value.write_text(datum, &mut part);
                escape_record_id_part(&part, &mut out);
            }
            if out.len() > MAX_RECORD_ID {
                return Err(record_id_too_long(&self.collection, out.len()));
            }
            Ok(out)
        }
    }

    /// The timestamp column's value, or the transaction's start when there is none (or NULL).
    ///
    /// # Safety
    /// `row` must be a row of the table this plan was built for, inside a transaction.
    unsafe fn source_timestamp(&self, row: &Row) -> pg_sys::TimestampTz {
        // SAFETY: the caller upholds this function's contract (its `# Safety` section), on which
        // every unsafe operation below relies.
        unsafe {
            let from_column = match self.timestamp {
                Some(TimestampColumn::WithTimeZone(i)) => row.get(i).map(|d| d.value() as i64),
                Some(TimestampColumn::WithoutTimeZone(i)) => row.get(i).map(|d| {
                    // Read as local time in the session's TimeZone, as a cast to timestamptz would.
                    let converted: Option<i64> =
                        pgrx::direct_function_call(pg_sys::timestamp_timestamptz, &[Some(d)]);
                    converted.unwrap_or(d.value() as i64)
                }),
                None => None,
            };
            from_column.unwrap_or_else(|| super::never_raise::GetCurrentTransactionStartTimestamp())
        }
    }

    /// Does the row claim nothing of Certyo's: every bookkeeping column NULL, but for the status
    /// `'pending'` under `'accepted'` (what a new row starts with, and what a changed row is
    /// cleared to)? Any other status (`'anchored'` with no hash beside it) is a claim.
    ///
    /// # Safety
    /// `row` must be a row of the table this plan was built for.
    pub unsafe fn claims_nothing(&self, row: &Row) -> bool {
        self.marks.iter().all(|&i| {
            if row.is_null(i) {
                return true;
            }
            if Some(i) != self.pending_status {
                return false;
            }
            // SAFETY: `pending_status` is a text column of the plan's table (`TablePlan::build`),
            // and `row` one of its rows (this function's contract).
            unsafe { row.text_is(i, "pending") }
        })
    }

    /// Did any business column change between the two images? Compares stored bytes, not JSON.
    ///
    /// # Safety
    /// Both rows must be rows of the table this plan was built for.
    pub unsafe fn business_changed(&self, old: &Row, new: &Row) -> bool {
        // SAFETY: the caller upholds this function's contract (its `# Safety` section), on which
        // every unsafe operation below relies.
        unsafe {
            self.payload
                .iter()
                .any(|c| !same_value(c.len, c.byval, old.get(c.index), new.get(c.index)))
        }
    }

    /// [`TablePlan::business_changed`] as a BEFORE trigger can tell: stored generated columns
    /// are left out, as they are computed after it (what it sees in them is not the new value).
    ///
    /// # Safety
    /// As for [`TablePlan::business_changed`].
    pub unsafe fn assigned_business_changed(&self, old: &Row, new: &Row) -> bool {
        // SAFETY: the caller upholds this function's contract (its `# Safety` section), on which
        // every unsafe operation below relies.
        unsafe {
            self.payload
                .iter()
                .filter(|c| !c.generated)
                .any(|c| !same_value(c.len, c.byval, old.get(c.index), new.get(c.index)))
        }
    }

    /// # Safety
    /// As for [`TablePlan::business_changed`].
    pub unsafe fn record_id_changed(&self, old: &Row, new: &Row) -> bool {
        // SAFETY: the caller upholds this function's contract (its `# Safety` section), on which
        // every unsafe operation below relies.
        unsafe {
            self.record_id
                .iter()
                .map(|&p| &self.payload[p])
                .any(|c| !same_value(c.len, c.byval, old.get(c.index), new.get(c.index)))
        }
    }
}

unsafe extern "C-unwind" {
    /// `utils/datum.h`: byte-image equality, detoasting as needed (not bound by pgrx). Called
    /// through `pg_guard_ffi_boundary`: detoasting may ereport.
    fn datum_image_eq(
        value1: Datum,
        value2: Datum,
        typ_by_val: bool,
        typ_len: std::ffi::c_int,
    ) -> bool;
}

/// # Safety
/// `old` and `new` must be values of one type whose length and by-value flag are `len` and
/// `byval` (a column's, as its plan holds them).
unsafe fn same_value(len: i16, byval: bool, old: Option<Datum>, new: Option<Datum>) -> bool {
    // SAFETY: the caller upholds this function's contract (its `# Safety` section), on which
    // every unsafe operation below relies.
    unsafe {
        match (old, new) {
            (None, None) => true,
            (Some(a), Some(b)) => pg_sys::ffi::pg_guard_ffi_boundary(|| {
                datum_image_eq(a, b, byval, len as std::ffi::c_int)
            }),
            _ => false,
        }
    }
}

fn escape_record_id_part(part: &[u8], out: &mut Vec<u8>) {
    for &byte in part {
        if byte == b'\\' || byte == b'/' {
            out.push(b'\\');
        }
        out.push(byte);
    }
}

/// Longest record id captured, in bytes. The worker finds a record's receipts and pending
/// changes through B-tree indexes on (table, record id, id), whose entries must fit in a third
/// of a page (about 2,700 bytes): a longer id would make every statement that records its batch
/// fail, pass after pass, and hold up the whole database. So it is refused where it is written,
/// in the writer's statement.
pub const MAX_RECORD_ID: usize = 2048;

fn record_id_too_long(table: &str, bytes: usize) -> CertyoError {
    CertyoError::new(
        PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
        format!("certyo_cdc: the record id of this row of {table} is {bytes} bytes, longer than the {MAX_RECORD_ID} certyo_cdc can keep"),
    )
    .detail("The record id (the record_id_columns' text form) is kept in indexes, whose entries are limited in size; the change was not written.")
    .hint(format!("Shorten the key's value, or track {table} by shorter record_id_columns (certyo.untrack(), then certyo.track() with record_id_columns)."))
}

/// Whether this database's encoding is UTF-8 (read once per backend: it never changes). In a
/// UTF-8 database Postgres keeps every text valid UTF-8; in another one (`SQL_ASCII`, `LATIN1`,
/// ...) text holds that encoding's bytes, which a JSON payload cannot carry: one such change
/// made every pass of the worker fail, for every table of the database (an attacker pass of
/// 2026-12-05, one `E'\xfe'` in a `SQL_ASCII` database).
fn database_is_utf8() -> bool {
    thread_local! {
        static UTF8: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
    }
    UTF8.with(|cell| {
        *cell.get().get_or_insert_with(|| {
            // SAFETY: reads the backend's database encoding, set at connection.
            unsafe { pg_sys::GetDatabaseEncoding() == pg_sys::pg_enc::PG_UTF8 as i32 }
        })
    })
}

fn not_utf8(table: &str) -> CertyoError {
    // SAFETY: a static string of the encoding's name.
    let encoding = unsafe { std::ffi::CStr::from_ptr(pg_sys::GetDatabaseEncodingName()) }
        .to_string_lossy()
        .into_owned();
    CertyoError::new(
        PgSqlErrorCode::ERRCODE_CHARACTER_NOT_IN_REPERTOIRE,
        format!("certyo_cdc: this row of {table} holds text that is not valid UTF-8"),
    )
    .detail(format!("Certyo takes records as JSON, which is UTF-8; this database's encoding is {encoding}, whose text is kept as it was written. The change was not written."))
    .hint("Write the text as UTF-8, or keep tracked tables in a database created with ENCODING 'UTF8'.")
}

fn null_record_id(table: &str, column: &str) -> CertyoError {
    CertyoError::new(
        PgSqlErrorCode::ERRCODE_NOT_NULL_VIOLATION,
        format!("certyo_cdc: record id column \"{column}\" of tracked table {table} is NULL"),
    )
    .detail("Every captured row needs a record id; the change was not written.")
    .hint(format!("Give \"{column}\" a value, or make it NOT NULL, or track {table} with other record_id_columns."))
}

#[cfg(test)]
mod tests {
    use super::escape_record_id_part;

    #[test]
    fn composite_record_id_parts_escape_separator_and_backslash() {
        let mut out = Vec::new();
        escape_record_id_part(b"a/b\\c", &mut out);
        assert_eq!(out, b"a\\/b\\\\c");
    }
}
