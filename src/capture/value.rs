//! How one column value becomes JSON in `recordPayload`, and text in `recordId`.
//!
//! The payload is hashed by Certyo, so the same row must always render to the same bytes: no
//! output here depends on session settings (`DateStyle`, `TimeZone`, `bytea_output`,
//! `extra_float_digits`, `IntervalStyle`). The mapping, documented in docs/design.md (Payload):
//! - integers, `numeric` (full precision), finite floats (shortest round-trip) → JSON numbers;
//!   `NaN`/`Infinity` → strings;
//! - `boolean` → `true`/`false`; `json`/`jsonb` → nested JSON; arrays → JSON arrays;
//! - `date` → `YYYY-MM-DD`, `timestamp` → `YYYY-MM-DDTHH:MM:SS[.ffffff]`, `timestamptz` → the
//!   same in UTC with a trailing `Z`, `interval` → ISO 8601 duration (`P1DT2H`);
//! - `bytea` → the string `\x` followed by lowercase hex;
//! - everything else (enums, uuid, inet, ranges, composites, …) → its text output, as a string,
//!   produced with the output settings pinned (`DateStyle = ISO, YMD`, `IntervalStyle =
//!   iso_8601`, `TimeZone = UTC`, `extra_float_digits = 1`, `bytea_output = hex`), so that a
//!   `tstzrange` or a composite holding a timestamp renders the same in every session.
//!
//! Values arrive as raw datums straight from the heap tuple; this module never calls SPI.

use pgrx::pg_sys::{self, BuiltinOid, Datum, Oid};
use std::ffi::CStr;
use std::io::Write;

/// Whether rendered text is already a JSON literal or must be quoted as a JSON string.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    Literal,
    Text,
}

/// How to render values of one column type; built once per table and cached (see `plan`).
pub enum ValuePlan {
    Bool,
    Int2,
    Int4,
    Int8,
    Float4,
    Float8,
    /// `text`, `varchar`, `bpchar`: the varlena bytes are the text.
    Varlena,
    /// `json`: stored as its own (valid JSON) text.
    Json,
    Bytea,
    Date,
    Timestamp,
    Timestamptz,
    Interval,
    Array(Box<ArrayPlan>),
    /// The type's output function; `literal` for types whose output is valid JSON
    /// (`numeric` except NaN/Infinity, `jsonb`); `qualified` for the object identifier types
    /// (`regclass`, `regtype`, `regproc`, ...), whose output names an object relative to the
    /// session's `search_path`: they are written with it pinned to `pg_catalog, pg_temp`, so
    /// every object outside the catalog comes out schema-qualified (`app.lookup`, never
    /// `lookup` under one path and `app.lookup` under another).
    Output {
        func: Box<pg_sys::FmgrInfo>,
        literal: bool,
        qualified: bool,
    },
}

pub struct ArrayPlan {
    element_type: Oid,
    len: i16,
    byval: bool,
    align: std::ffi::c_char,
    element: ValuePlan,
}

impl ValuePlan {
    /// Choose the rendering for a column type (domains render as their base type).
    ///
    /// # Safety
    /// Must run in a backend with a valid transaction (it reads the type cache).
    pub unsafe fn for_type(typid: Oid) -> ValuePlan {
        // SAFETY: the caller upholds this function's contract (its `# Safety` section), on which
        // every unsafe operation below relies.
        unsafe {
            let base = pg_sys::getBaseType(typid);
            match BuiltinOid::try_from(base) {
                Ok(BuiltinOid::BOOLOID) => ValuePlan::Bool,
                Ok(BuiltinOid::INT2OID) => ValuePlan::Int2,
                Ok(BuiltinOid::INT4OID) => ValuePlan::Int4,
                Ok(BuiltinOid::INT8OID) => ValuePlan::Int8,
                Ok(BuiltinOid::FLOAT4OID) => ValuePlan::Float4,
                Ok(BuiltinOid::FLOAT8OID) => ValuePlan::Float8,
                Ok(BuiltinOid::TEXTOID | BuiltinOid::VARCHAROID | BuiltinOid::BPCHAROID) => {
                    ValuePlan::Varlena
                }
                Ok(BuiltinOid::JSONOID) => ValuePlan::Json,
                Ok(BuiltinOid::BYTEAOID) => ValuePlan::Bytea,
                Ok(BuiltinOid::DATEOID) => ValuePlan::Date,
                Ok(BuiltinOid::TIMESTAMPOID) => ValuePlan::Timestamp,
                Ok(BuiltinOid::TIMESTAMPTZOID) => ValuePlan::Timestamptz,
                Ok(BuiltinOid::INTERVALOID) => ValuePlan::Interval,
                Ok(BuiltinOid::NUMERICOID | BuiltinOid::JSONBOID) => output_plan(base, true),
                Ok(
                    BuiltinOid::REGCLASSOID
                    | BuiltinOid::REGTYPEOID
                    | BuiltinOid::REGPROCOID
                    | BuiltinOid::REGPROCEDUREOID
                    | BuiltinOid::REGOPEROID
                    | BuiltinOid::REGOPERATOROID
                    | BuiltinOid::REGCONFIGOID
                    | BuiltinOid::REGDICTIONARYOID
                    | BuiltinOid::REGCOLLATIONOID,
                ) => match output_plan(base, false) {
                    ValuePlan::Output { func, literal, .. } => ValuePlan::Output {
                        func,
                        literal,
                        qualified: true,
                    },
                    other => other,
                },
                _ => match array_plan(base) {
                    Some(array) => ValuePlan::Array(Box::new(array)),
                    None => output_plan(base, false),
                },
            }
        }
    }

    /// Append the value as JSON.
    ///
    /// # Safety
    /// `datum` must be a non-null value of the type this plan was built for.
    pub unsafe fn write_json(&self, datum: Datum, out: &mut Vec<u8>, scratch: &mut Vec<u8>) {
        // SAFETY: the caller upholds this function's contract (its `# Safety` section), on which
        // every unsafe operation below relies.
        unsafe {
            if let ValuePlan::Array(array) = self {
                return array.write_json(datum, out, scratch);
            }
            scratch.clear();
            match self.render(datum, scratch) {
                Shape::Literal => out.extend_from_slice(scratch),
                Shape::Text => write_json_string(scratch, out),
            }
        }
    }

    /// Append the value's text form (the JSON value without string quoting): the record id.
    ///
    /// # Safety
    /// As for [`ValuePlan::write_json`].
    pub unsafe fn write_text(&self, datum: Datum, out: &mut Vec<u8>) {
        // SAFETY: the caller upholds this function's contract (its `# Safety` section), on which
        // every unsafe operation below relies.
        unsafe {
            if let ValuePlan::Array(array) = self {
                let mut scratch = Vec::new();
                return array.write_json(datum, out, &mut scratch);
            }
            self.render(datum, out);
        }
    }

    /// Append the raw text of a scalar value and say whether it is a JSON literal.
    ///
    /// # Safety
    /// As for [`ValuePlan::write_json`].
    unsafe fn render(&self, datum: Datum, out: &mut Vec<u8>) -> Shape {
        // SAFETY: the caller upholds this function's contract (its `# Safety` section), on which
        // every unsafe operation below relies.
        unsafe {
            match self {
                ValuePlan::Bool => {
                    out.extend_from_slice(if datum.value() != 0 {
                        b"true"
                    } else {
                        b"false"
                    });
                    Shape::Literal
                }
                ValuePlan::Int2 => write_display(out, datum.value() as i16),
                ValuePlan::Int4 => write_display(out, datum.value() as i32),
                ValuePlan::Int8 => write_display(out, datum.value() as i64),
                ValuePlan::Float4 => {
                    write_float(out, f32::from_bits(datum.value() as u32) as f64, true)
                }
                ValuePlan::Float8 => write_float(out, f64::from_bits(datum.value() as u64), false),
                ValuePlan::Varlena => {
                    out.extend_from_slice(varlena_bytes(datum));
                    Shape::Text
                }
                ValuePlan::Json => {
                    out.extend_from_slice(varlena_bytes(datum));
                    Shape::Literal
                }
                ValuePlan::Bytea => {
                    write_bytea_hex(varlena_bytes(datum), out);
                    Shape::Text
                }
                ValuePlan::Date => write_date(out, datum.value() as i32),
                ValuePlan::Timestamp => write_timestamp(out, datum.value() as i64, false),
                ValuePlan::Timestamptz => write_timestamp(out, datum.value() as i64, true),
                ValuePlan::Interval => {
                    let interval = &*datum.cast_mut_ptr::<pg_sys::Interval>();
                    write_interval(out, interval.month, interval.day, interval.time);
                    Shape::Text
                }
                ValuePlan::Output {
                    func,
                    literal,
                    qualified,
                } => {
                    let pinned = PinnedOutputSettings::pin();
                    let call = || pg_sys::OutputFunctionCall(&**func as *const _ as *mut _, datum);
                    let text = if *qualified {
                        crate::rights::with_pinned_search_path(call)
                    } else {
                        call()
                    };
                    drop(pinned);
                    let bytes = CStr::from_ptr(text).to_bytes();
                    out.extend_from_slice(bytes);
                    // numeric's NaN/Infinity are not JSON numbers; jsonb output always is JSON.
                    if *literal && is_json_number_or_structure(bytes) {
                        Shape::Literal
                    } else {
                        Shape::Text
                    }
                }
                ValuePlan::Array(_) => unreachable!("arrays are rendered by ArrayPlan::write_json"),
            }
        }
    }
}

impl ArrayPlan {
    /// # Safety
    /// `datum` must be a non-null array of this plan's array type.
    unsafe fn write_json(&self, datum: Datum, out: &mut Vec<u8>, scratch: &mut Vec<u8>) {
        // SAFETY: the caller upholds this function's contract (its `# Safety` section), on which
        // every unsafe operation below relies.
        unsafe {
            let array = pg_sys::pg_detoast_datum(datum.cast_mut_ptr()) as *mut pg_sys::ArrayType;
            let ndim = (*array).ndim as usize;
            // ARR_DIMS: the dimensions follow the fixed header.
            let dims_ptr =
                (array as *const u8).add(std::mem::size_of::<pg_sys::ArrayType>()) as *const i32;
            let dims: Vec<usize> = (0..ndim).map(|i| *dims_ptr.add(i) as usize).collect();
            let mut elements: *mut Datum = std::ptr::null_mut();
            let mut nulls: *mut bool = std::ptr::null_mut();
            let mut count: i32 = 0;
            pg_sys::deconstruct_array(
                array,
                self.element_type,
                self.len as i32,
                self.byval,
                self.align,
                &mut elements,
                &mut nulls,
                &mut count,
            );
            let (elements, nulls) = if count == 0 {
                (&[][..], &[][..])
            } else {
                (
                    std::slice::from_raw_parts(elements, count as usize),
                    std::slice::from_raw_parts(nulls, count as usize),
                )
            };
            let mut next = 0usize;
            self.write_dimension(&dims, elements, nulls, &mut next, out, scratch);
        }
    }

    /// Write one dimension as a JSON array, recursing into inner dimensions in row-major order.
    ///
    /// # Safety
    /// `elements` and `nulls` must be an array's elements and null flags, deconstructed with this
    /// plan's element type, `dims` the dimensions left to write (their product at most the
    /// elements left after `*next`).
    unsafe fn write_dimension(
        &self,
        dims: &[usize],
        elements: &[Datum],
        nulls: &[bool],
        next: &mut usize,
        out: &mut Vec<u8>,
        scratch: &mut Vec<u8>,
    ) {
        // SAFETY: the caller upholds this function's contract (its `# Safety` section), on which
        // every unsafe operation below relies.
        unsafe {
            out.push(b'[');
            let Some((&len, inner)) = dims.split_first() else {
                out.push(b']');
                return;
            };
            for i in 0..len {
                if i > 0 {
                    out.push(b',');
                }
                if !inner.is_empty() {
                    self.write_dimension(inner, elements, nulls, next, out, scratch);
                    continue;
                }
                if nulls[*next] {
                    out.extend_from_slice(b"null");
                } else {
                    self.element.write_json(elements[*next], out, scratch);
                }
                *next += 1;
            }
            out.push(b']');
        }
    }
}

unsafe extern "C" {
    /// `utils/bytea.h` (not bound by pgrx): the `bytea_output` setting.
    static mut bytea_output: std::ffi::c_int;
}

/// `bytea_output = hex` (`BYTEA_OUTPUT_HEX` in `utils/bytea.h`).
const BYTEA_OUTPUT_HEX: std::ffi::c_int = 1;

/// The session settings that type output functions read, set to fixed values for as long as
/// this lives and restored when it is dropped, also when the output function raises an error
/// (the error unwinds through the drop). The globals are set directly, not through the GUC
/// machinery: nothing else runs in between, and nothing is reported to the client.
struct PinnedOutputSettings {
    date_style: std::ffi::c_int,
    date_order: std::ffi::c_int,
    interval_style: std::ffi::c_int,
    float_digits: std::ffi::c_int,
    time_zone: *mut pg_sys::pg_tz,
    bytea: std::ffi::c_int,
}

impl PinnedOutputSettings {
    /// # Safety
    /// In a backend's main thread; the value must be dropped before control returns to
    /// Postgres.
    unsafe fn pin() -> PinnedOutputSettings {
        // SAFETY: the caller upholds this function's contract (its `# Safety` section), on which
        // every unsafe operation below relies.
        unsafe {
            let saved = PinnedOutputSettings {
                date_style: pg_sys::DateStyle,
                date_order: pg_sys::DateOrder,
                interval_style: pg_sys::IntervalStyle,
                float_digits: pg_sys::extra_float_digits,
                time_zone: pg_sys::session_timezone,
                bytea: bytea_output,
            };
            pg_sys::DateStyle = pg_sys::USE_ISO_DATES as _;
            pg_sys::DateOrder = pg_sys::DATEORDER_YMD as _;
            pg_sys::IntervalStyle = pg_sys::INTSTYLE_ISO_8601 as _;
            pg_sys::extra_float_digits = 1;
            let utc = utc();
            if !utc.is_null() {
                pg_sys::session_timezone = utc;
            }
            bytea_output = BYTEA_OUTPUT_HEX;
            saved
        }
    }
}

/// The UTC zone, looked up once per process (Postgres caches zones for the process's life).
///
/// # Safety
/// In a backend's main thread (Postgres' time zone cache).
unsafe fn utc() -> *mut pg_sys::pg_tz {
    // SAFETY: the caller upholds this function's contract (its `# Safety` section), on which
    // every unsafe operation below relies.
    unsafe {
        thread_local! {
            static UTC: std::cell::Cell<*mut pg_sys::pg_tz> = const { std::cell::Cell::new(std::ptr::null_mut()) };
        }
        UTC.with(|cell| {
            if cell.get().is_null() {
                cell.set(pg_sys::pg_tzset(c"UTC".as_ptr()));
            }
            cell.get()
        })
    }
}

impl Drop for PinnedOutputSettings {
    fn drop(&mut self) {
        // SAFETY: restores the globals `pin` saved, in the same thread.
        unsafe {
            pg_sys::DateStyle = self.date_style;
            pg_sys::DateOrder = self.date_order;
            pg_sys::IntervalStyle = self.interval_style;
            pg_sys::extra_float_digits = self.float_digits;
            pg_sys::session_timezone = self.time_zone;
            bytea_output = self.bytea;
        }
    }
}

/// # Safety
/// In a backend's main thread, inside a transaction (it reads the type cache); `typid` an
/// existing type.
unsafe fn output_plan(typid: Oid, literal: bool) -> ValuePlan {
    // SAFETY: the caller upholds this function's contract (its `# Safety` section), on which
    // every unsafe operation below relies.
    unsafe {
        let mut func_oid = pg_sys::InvalidOid;
        let mut is_varlena = false;
        pg_sys::getTypeOutputInfo(typid, &mut func_oid, &mut is_varlena);
        // The FmgrInfo outlives this call (it is cached with the table's plan), so it lives in
        // CacheMemoryContext rather than the per-row context.
        let mut func: Box<pg_sys::FmgrInfo> = Box::new(std::mem::zeroed());
        pg_sys::fmgr_info_cxt(func_oid, &mut *func, pg_sys::CacheMemoryContext);
        ValuePlan::Output {
            func,
            literal,
            qualified: false,
        }
    }
}

/// # Safety
/// As for [`output_plan`].
unsafe fn array_plan(typid: Oid) -> Option<ArrayPlan> {
    // SAFETY: the caller upholds this function's contract (its `# Safety` section), on which
    // every unsafe operation below relies.
    unsafe {
        let element_type = pg_sys::get_element_type(typid);
        if element_type == pg_sys::InvalidOid || pg_sys::get_typlen(typid) != -1 {
            return None;
        }
        let mut len: i16 = 0;
        let mut byval = false;
        let mut align: std::ffi::c_char = 0;
        pg_sys::get_typlenbyvalalign(element_type, &mut len, &mut byval, &mut align);
        Some(ArrayPlan {
            element_type,
            len,
            byval,
            align,
            element: ValuePlan::for_type(element_type),
        })
    }
}

/// The bytes of a (possibly toasted or short-header) varlena datum.
///
/// # Safety
/// `datum` must be a varlena value (text-like, possibly toasted or with a short header); the
/// bytes must not be used after the datum, or the current memory context (which holds a
/// detoasted copy), is freed: `'a` must not outlive either.
unsafe fn varlena_bytes<'a>(datum: Datum) -> &'a [u8] {
    // SAFETY: the caller upholds this function's contract (its `# Safety` section), on which
    // every unsafe operation below relies.
    unsafe {
        let varlena = pg_sys::pg_detoast_datum_packed(datum.cast_mut_ptr());
        let len = pgrx::varlena::varsize_any_exhdr(varlena);
        let data = pgrx::varlena::vardata_any(varlena) as *const u8;
        std::slice::from_raw_parts(data, len)
    }
}

fn write_display(out: &mut Vec<u8>, value: impl itoa::Integer) -> Shape {
    out.extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
    Shape::Literal
}

/// `value` as exactly `width` digits (zero-padded); the hot path of date and time output.
fn write_padded(out: &mut Vec<u8>, value: u32, width: usize) {
    let mut digits = [b'0'; 10];
    let mut rest = value;
    for slot in digits[..width].iter_mut().rev() {
        *slot = b'0' + (rest % 10) as u8;
        rest /= 10;
    }
    out.extend_from_slice(&digits[..width]);
}

/// Shortest round-trip decimal, exponent form outside [1e-5, 1e16) to keep numbers short.
pub fn write_float(out: &mut Vec<u8>, value: f64, single: bool) -> Shape {
    if value.is_nan() {
        out.extend_from_slice(b"NaN");
        return Shape::Text;
    }
    if value.is_infinite() {
        out.extend_from_slice(if value > 0.0 {
            b"Infinity"
        } else {
            b"-Infinity"
        });
        return Shape::Text;
    }
    let magnitude = value.abs();
    let exponent = magnitude != 0.0 && !(1e-5..1e16).contains(&magnitude);
    // A float4 must print its own shortest digits, not those of the widened f64.
    let _ = match (single, exponent) {
        (true, true) => write!(out, "{:e}", value as f32),
        (true, false) => write!(out, "{}", value as f32),
        (false, true) => write!(out, "{value:e}"),
        (false, false) => write!(out, "{value}"),
    };
    Shape::Literal
}

/// Is this output text usable verbatim as JSON (a number, object or array)?
fn is_json_number_or_structure(text: &[u8]) -> bool {
    match text.first() {
        Some(b'{' | b'[' | b'"') => true,
        Some(b't' | b'f' | b'n') => true, // jsonb scalars true/false/null
        Some(c) => {
            c.is_ascii_digit() || (*c == b'-' && text.get(1).is_some_and(u8::is_ascii_digit))
        }
        None => false,
    }
}

/// Append `text` as a JSON string. The server encoding is ASCII-compatible, so escaping the
/// ASCII specials byte by byte is safe and everything else passes through unchanged.
pub fn write_json_string(text: &[u8], out: &mut Vec<u8>) {
    out.reserve(text.len() + 2);
    out.push(b'"');
    if !needs_escape(text) {
        // Nearly every value: copied whole.
        out.extend_from_slice(text);
        out.push(b'"');
        return;
    }
    let mut start = 0;
    for (i, &byte) in text.iter().enumerate() {
        // Nearly every byte needs no escape: say so in three comparisons, not a match.
        if byte >= 0x20 && byte != b'"' && byte != b'\\' {
            continue;
        }
        let escape: &[u8] = match byte {
            b'"' => b"\\\"",
            b'\\' => b"\\\\",
            b'\n' => b"\\n",
            b'\r' => b"\\r",
            b'\t' => b"\\t",
            0x08 => b"\\b",
            0x0c => b"\\f",
            0x00..=0x1f => {
                out.extend_from_slice(&text[start..i]);
                let _ = write!(out, "\\u{byte:04x}");
                start = i + 1;
                continue;
            }
            _ => continue,
        };
        out.extend_from_slice(&text[start..i]);
        out.extend_from_slice(escape);
        start = i + 1;
    }
    out.extend_from_slice(&text[start..]);
    out.push(b'"');
}

/// Whether `text` holds a byte a JSON string must escape: `"`, `\` or a control character.
/// Tested 16 bytes at a time without a branch per byte, which the compiler turns into vector
/// instructions (callgrind: the byte-by-byte scan was 18 instructions a byte, 950 a row of a
/// table with two short text columns and a timestamp).
fn needs_escape(text: &[u8]) -> bool {
    fn any_special(block: &[u8; 16]) -> bool {
        block.iter().fold(false, |any, &byte| {
            any | (byte < 0x20) | (byte == b'"') | (byte == b'\\')
        })
    }
    let (blocks, rest) = text.as_chunks::<16>();
    let mut last = [b' '; 16];
    last[..rest.len()].copy_from_slice(rest);
    blocks.iter().any(any_special) || any_special(&last)
}

pub fn write_bytea_hex(bytes: &[u8], out: &mut Vec<u8>) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    out.reserve(2 + bytes.len() * 2);
    out.extend_from_slice(b"\\x");
    for byte in bytes {
        out.push(HEX[(byte >> 4) as usize]);
        out.push(HEX[(byte & 0xf) as usize]);
    }
}

const USECS_PER_DAY: i64 = 86_400_000_000;
/// Days from 1970-01-01 to 2000-01-01, the Postgres epoch.
const POSTGRES_EPOCH_DAYS: i64 = 10_957;

/// `date` (days since 2000-01-01) as `YYYY-MM-DD`.
pub fn write_date(out: &mut Vec<u8>, days: i32) -> Shape {
    match days {
        i32::MIN => out.extend_from_slice(b"-infinity"),
        i32::MAX => out.extend_from_slice(b"infinity"),
        _ => write_civil_date(out, days as i64 + POSTGRES_EPOCH_DAYS),
    }
    Shape::Text
}

/// `timestamp[tz]` (microseconds since 2000-01-01 00:00 UTC) in ISO 8601; `Z` for timestamptz.
pub fn write_timestamp(out: &mut Vec<u8>, micros: i64, utc: bool) -> Shape {
    match micros {
        i64::MIN => out.extend_from_slice(b"-infinity"),
        i64::MAX => out.extend_from_slice(b"infinity"),
        _ => {
            let days = micros.div_euclid(USECS_PER_DAY);
            let time = micros.rem_euclid(USECS_PER_DAY);
            write_civil_date(out, days + POSTGRES_EPOCH_DAYS);
            // Digit by digit: `write!` with widths took four times as long, measured as 3% of a
            // tracked bulk INSERT of a table with one timestamp column.
            let seconds = (time / 1_000_000) as u32;
            out.push(b'T');
            write_padded(out, seconds / 3600, 2);
            out.push(b':');
            write_padded(out, seconds / 60 % 60, 2);
            out.push(b':');
            write_padded(out, seconds % 60, 2);
            write_fraction(out, time % 1_000_000);
            if utc {
                out.push(b'Z');
            }
        }
    }
    Shape::Text
}

/// `.ffffff` without trailing zeros; nothing for whole seconds.
fn write_fraction(out: &mut Vec<u8>, micros: i64) {
    if micros != 0 {
        let mut digits = micros as u32;
        let mut width = 6;
        while digits.is_multiple_of(10) {
            digits /= 10;
            width -= 1;
        }
        out.push(b'.');
        write_padded(out, digits, width);
    }
}

/// Proleptic Gregorian date from days since 1970-01-01 (H. Hinnant's `civil_from_days`).
fn write_civil_date(out: &mut Vec<u8>, days_since_unix_epoch: i64) {
    let z = days_since_unix_epoch + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    if (0..=9999).contains(&year) {
        write_padded(out, year as u32, 4);
    } else if year < 0 {
        // ISO 8601's expanded form, astronomical years: -0043 is 44 BC (year 0 is 1 BC).
        out.push(b'-');
        write_padded(out, year.unsigned_abs().min(u32::MAX as u64) as u32, 4);
    } else {
        out.extend_from_slice(itoa::Buffer::new().format(year).as_bytes());
    }
    out.push(b'-');
    write_padded(out, month as u32, 2);
    out.push(b'-');
    write_padded(out, day as u32, 2);
}

/// `interval` as an ISO 8601 duration, each field carrying its own sign (as Postgres prints it
/// with `IntervalStyle = iso_8601`).
pub fn write_interval(out: &mut Vec<u8>, months: i32, days: i32, micros: i64) {
    out.push(b'P');
    let (years, months) = (months / 12, months % 12);
    for (value, unit) in [
        (years as i64, 'Y'),
        (months as i64, 'M'),
        (days as i64, 'D'),
    ] {
        if value != 0 {
            let _ = write!(out, "{value}{unit}");
        }
    }
    if micros != 0 || (years == 0 && months == 0 && days == 0) {
        out.push(b'T');
        let hours = micros / 3_600_000_000;
        let minutes = micros / 60_000_000 % 60;
        let seconds = micros % 60_000_000;
        if hours != 0 {
            let _ = write!(out, "{hours}H");
        }
        if minutes != 0 {
            let _ = write!(out, "{minutes}M");
        }
        if seconds != 0 || micros == 0 {
            if seconds < 0 {
                out.push(b'-');
            }
            let abs = seconds.unsigned_abs();
            let _ = write!(out, "{}", abs / 1_000_000);
            write_fraction(out, (abs % 1_000_000) as i64);
            out.push(b'S');
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_special_byte_is_escaped_wherever_it_sits() {
        // In a whole 16-byte block, in the remainder after one, and alone: each position of
        // strings of 0 to 40 bytes, with each byte JSON must escape.
        for len in 0..=40 {
            let plain: Vec<u8> = (0..len).map(|i| b'a' + (i % 26) as u8).collect();
            let mut out = Vec::new();
            write_json_string(&plain, &mut out);
            assert_eq!(out, [&b"\""[..], &plain, b"\""].concat(), "length {len}");
            for at in 0..len {
                for special in [b'"', b'\\', b'\n', 0x00, 0x1f] {
                    let mut text = plain.clone();
                    text[at] = special;
                    let mut out = Vec::new();
                    write_json_string(&text, &mut out);
                    let parsed: String = serde_json::from_slice(&out).unwrap();
                    assert_eq!(
                        parsed.as_bytes(),
                        text,
                        "byte {special:#x} at {at} of {len}"
                    );
                    assert!(
                        out.len() > text.len() + 2,
                        "byte {special:#x} at {at} of {len}"
                    );
                }
            }
        }
    }

    fn text(f: impl FnOnce(&mut Vec<u8>)) -> String {
        let mut out = Vec::new();
        f(&mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn json_strings_escape_quotes_backslashes_and_controls() {
        assert_eq!(
            text(|o| write_json_string(b"a\"b\\c\nd\x01", o)),
            r#""a\"b\\c\nd\u0001""#
        );
        assert_eq!(
            text(|o| write_json_string("zoë ☃".as_bytes(), o)),
            "\"zoë ☃\""
        );
    }

    #[test]
    fn floats_round_trip_and_non_finite_become_strings() {
        assert_eq!(
            text(|o| assert_eq!(write_float(o, 0.1, false), Shape::Literal)),
            "0.1"
        );
        assert_eq!(text(|o| _ = write_float(o, 1e300, false)), "1e300");
        assert_eq!(text(|o| _ = write_float(o, 0.1f32 as f64, true)), "0.1");
        assert_eq!(text(|o| _ = write_float(o, -2.5e-7, false)), "-2.5e-7");
        assert_eq!(
            text(|o| assert_eq!(write_float(o, f64::NAN, false), Shape::Text)),
            "NaN"
        );
        assert_eq!(
            text(|o| _ = write_float(o, f64::NEG_INFINITY, false)),
            "-Infinity"
        );
    }

    #[test]
    fn dates_and_timestamps_are_iso_8601() {
        assert_eq!(text(|o| _ = write_date(o, 0)), "2000-01-01");
        assert_eq!(text(|o| _ = write_date(o, -1)), "1999-12-31");
        assert_eq!(text(|o| _ = write_date(o, 60)), "2000-03-01"); // 2000 is a leap year
        assert_eq!(text(|o| _ = write_date(o, i32::MAX)), "infinity");
        // 44 BC and 1 BC in astronomical years; the write-back reads them back as BC dates.
        assert_eq!(text(|o| _ = write_date(o, -746_117)), "-0043-03-15");
        assert_eq!(text(|o| _ = write_date(o, -730_485)), "0000-01-01");
        let ts = (9600 * 86_400 + 37_800) * 1_000_000 + 500_000;
        assert_eq!(
            text(|o| _ = write_timestamp(o, ts, true)),
            "2026-04-14T10:30:00.5Z"
        );
        assert_eq!(
            text(|o| _ = write_timestamp(o, -1, false)),
            "1999-12-31T23:59:59.999999"
        );
        assert_eq!(
            text(|o| _ = write_timestamp(o, 0, true)),
            "2000-01-01T00:00:00Z"
        );
        assert_eq!(
            text(|o| _ = write_timestamp(o, 86_399 * 1_000_000 + 10, false)),
            "2000-01-01T23:59:59.00001"
        );
    }

    #[test]
    fn intervals_are_iso_8601_durations() {
        assert_eq!(
            text(|o| write_interval(o, 14, 3, 4 * 3_600_000_000 + 5_500_000)),
            "P1Y2M3DT4H5.5S"
        );
        assert_eq!(text(|o| write_interval(o, 0, 0, 0)), "PT0S");
        assert_eq!(
            text(|o| write_interval(o, 0, -1, -90_000_000)),
            "P-1DT-1M-30S"
        );
    }

    #[test]
    fn bytea_is_backslash_x_hex() {
        assert_eq!(
            text(|o| write_bytea_hex(&[0xde, 0xad, 0x00, 0x0f], o)),
            "\\xdead000f"
        );
    }

    #[test]
    fn only_json_shaped_output_is_literal() {
        assert!(is_json_number_or_structure(b"12.50"));
        assert!(is_json_number_or_structure(b"-0.5"));
        assert!(is_json_number_or_structure(b"{\"a\": 1}"));
        assert!(!is_json_number_or_structure(b"NaN"));
        assert!(!is_json_number_or_structure(b"-Infinity"));
        assert!(!is_json_number_or_structure(b"Infinity"));
    }
}
