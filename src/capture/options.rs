//! What `certyo.track()` decided for a table, stored as the capture trigger's arguments.
//!
//! The trigger is the registry: its arguments are the one place the options live, so they
//! travel with `pg_dump`, cannot drift from what the trigger does, and are read by the writer
//! without any privilege on schema `certyo`. Each argument is `key=value`; list-valued options
//! repeat the key, in order. `certyo.tracked_tables` decodes them for people.

use crate::error::{CertyoError, Result};
use pgrx::PgSqlErrorCode;

/// The bookkeeping columns: written back by the worker, never part of a payload.
pub const BOOKKEEPING_COLUMNS: [&str; 3] = [
    "certyo_record_hash",
    "certyo_anchor_status",
    "certyo_verified_at",
];

pub fn is_bookkeeping(column: &str) -> bool {
    BOOKKEEPING_COLUMNS.contains(&column)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordIdSource {
    /// Follow the primary key, re-read whenever the table's DDL changes.
    PrimaryKey,
    /// Columns the user named.
    Columns,
}

impl RecordIdSource {
    fn as_str(self) -> &'static str {
        match self {
            RecordIdSource::PrimaryKey => "primary_key",
            RecordIdSource::Columns => "columns",
        }
    }
}

/// When the worker writes back to a row (`certyo.track(..., write_back => ...)`, argument
/// `write_back=` of the capture trigger).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteBack {
    /// Once Certyo confirms the version on chain: hash, `anchored` and `certyo_verified_at` in
    /// one UPDATE; until then the row's bookkeeping columns hold NULL. The default for tables
    /// tracked from 0.2.0 on.
    Anchored,
    /// At acceptance the hash and `pending`, at anchoring the status again (two UPDATEs per
    /// version). Tables tracked before 0.2.0, whose trigger carries no `write_back=`, keep it.
    Accepted,
    /// Never: the table has no bookkeeping columns and its rows are never written to (the
    /// sidecar mode); `certyo.record_status()` gives each record's state from the receipts,
    /// and `certyo.audit()` works from the receipts alone.
    None,
}

impl WriteBack {
    pub fn as_str(self) -> &'static str {
        match self {
            WriteBack::Anchored => "anchored",
            WriteBack::Accepted => "accepted",
            WriteBack::None => "none",
        }
    }

    pub fn parse(value: &str) -> Option<WriteBack> {
        match value {
            "anchored" => Some(WriteBack::Anchored),
            "accepted" => Some(WriteBack::Accepted),
            "none" => Some(WriteBack::None),
            _ => None,
        }
    }

    /// A capture trigger without the argument was installed before 0.2.0: two-step.
    pub fn from_option(value: Option<&str>) -> WriteBack {
        value
            .and_then(WriteBack::parse)
            .unwrap_or(WriteBack::Accepted)
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureOptions {
    pub record_id_source: RecordIdSource,
    pub record_id_columns: Vec<String>,
    pub exclude_columns: Vec<String>,
    pub timestamp_column: Option<String>,
    /// The table's identity of the extension's own under this record key
    /// (`certyo.table_identity`, see `crate::track::identity`): it goes with every change, and
    /// travels with the table through `pg_dump`, where OIDs do not.
    pub table_id: Option<i32>,
    pub write_back: WriteBack,
}

impl CaptureOptions {
    /// Is `column` one of the bookkeeping columns, left out of every payload and every change?
    /// Under `write_back => 'none'` no column is ours: one of those names (come through a parent
    /// table or a composite type, or added after tracking) is the table's own data, captured
    /// like any other.
    pub fn is_bookkeeping(&self, column: &str) -> bool {
        self.write_back != WriteBack::None && is_bookkeeping(column)
    }

    pub fn to_trigger_args(&self) -> Vec<String> {
        let mut args = vec![format!(
            "record_id_source={}",
            self.record_id_source.as_str()
        )];
        args.extend(
            self.record_id_columns
                .iter()
                .map(|c| format!("record_id={c}")),
        );
        args.extend(self.exclude_columns.iter().map(|c| format!("exclude={c}")));
        args.extend(
            self.timestamp_column
                .iter()
                .map(|c| format!("timestamp={c}")),
        );
        args.extend(self.table_id.iter().map(|id| format!("table_id={id}")));
        args.push(format!("write_back={}", self.write_back.as_str()));
        args
    }

    pub fn from_trigger_args<'a>(args: impl IntoIterator<Item = &'a str>) -> Result<Self> {
        let mut options = CaptureOptions {
            record_id_source: RecordIdSource::PrimaryKey,
            record_id_columns: Vec::new(),
            exclude_columns: Vec::new(),
            timestamp_column: None,
            table_id: None,
            write_back: WriteBack::Accepted,
        };
        for arg in args {
            let (key, value) = arg.split_once('=').ok_or_else(|| malformed(arg))?;
            match key {
                "record_id_source" if value == "primary_key" => {
                    options.record_id_source = RecordIdSource::PrimaryKey
                }
                "record_id_source" if value == "columns" => {
                    options.record_id_source = RecordIdSource::Columns
                }
                "record_id" => options.record_id_columns.push(value.to_owned()),
                "exclude" => options.exclude_columns.push(value.to_owned()),
                "timestamp" => options.timestamp_column = Some(value.to_owned()),
                // One id, as `table_id` (below) reads it for the worker's SQL.
                "table_id" if options.table_id.is_none() => {
                    options.table_id = Some(value.parse().map_err(|_| malformed(arg))?)
                }
                "write_back" => {
                    options.write_back = WriteBack::parse(value).ok_or_else(|| malformed(arg))?
                }
                _ => return Err(malformed(arg)),
            }
        }
        if options.record_id_columns.is_empty() {
            return Err(malformed("(no record_id)"));
        }
        Ok(options)
    }
}

/// Raw trigger arguments (`pg_trigger.tgargs`: NUL-terminated strings) as strings.
pub fn split_trigger_args(tgargs: &[u8]) -> Vec<String> {
    tgargs
        .split(|b| *b == 0)
        .filter(|arg| !arg.is_empty())
        .map(|arg| String::from_utf8_lossy(arg).into_owned())
        .collect()
}

/// The values of one key in raw trigger arguments, for `certyo.tracked_tables`.
pub fn option_values(tgargs: &[u8], key: &str) -> Vec<String> {
    split_trigger_args(tgargs)
        .into_iter()
        .filter_map(|arg| {
            arg.split_once('=')
                .filter(|(k, _)| *k == key)
                .map(|(_, v)| v.to_owned())
        })
        .collect()
}

/// Arguments longer than this (1 MiB) are not read for their table id: `certyo.track()` writes
/// at most about 120 kB (1,600 excluded columns), and the worker's SQL skips longer ones
/// without reading them (`octet_length(tgargs) <= 1048576`, which does not detoast).
const MAX_READ_ARGUMENTS: usize = 1_048_576;

/// The table id a capture trigger's raw arguments carry: `None` when they carry none, more
/// than one, or one that is not an `i32`, or are over 1 MiB (a hand-made trigger; capture refuses such a
/// trigger's writes, `CaptureOptions::from_trigger_args`). The worker and `certyo.track()`
/// read every trigger named `certyo_capture` this way (`certyo.capture_table_id()`), so no
/// trigger's arguments can make them fail.
pub fn table_id(tgargs: &[u8]) -> Option<i32> {
    if tgargs.len() > MAX_READ_ARGUMENTS {
        return None;
    }
    match option_values(tgargs, "table_id").as_slice() {
        [one] => one.parse().ok(),
        _ => None,
    }
}

fn malformed(arg: &str) -> CertyoError {
    CertyoError::new(
        PgSqlErrorCode::ERRCODE_INVALID_OBJECT_DEFINITION,
        format!("certyo_cdc: capture trigger has an unreadable argument {arg:?}"),
    )
    .hint("Call certyo.track() on the table again to rewrite its capture trigger.")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trigger_args_round_trip_including_awkward_names() {
        let options = CaptureOptions {
            record_id_source: RecordIdSource::Columns,
            record_id_columns: vec!["Tenant Id".into(), "a=b".into()],
            exclude_columns: vec!["sécret".into()],
            timestamp_column: Some("updated_at".into()),
            table_id: Some(7),
            write_back: WriteBack::Anchored,
        };
        let args = options.to_trigger_args();
        let parsed = CaptureOptions::from_trigger_args(args.iter().map(String::as_str)).unwrap();
        assert_eq!(parsed, options);
    }

    #[test]
    fn raw_tgargs_decode_per_key() {
        let raw = b"record_id_source=primary_key\0record_id=id\0record_id=k2\0exclude=x\0";
        assert_eq!(option_values(raw, "record_id"), vec!["id", "k2"]);
        assert_eq!(option_values(raw, "timestamp"), Vec::<String>::new());
    }

    #[test]
    fn the_table_id_is_read_only_when_it_is_one_integer() {
        assert_eq!(table_id(b"record_id=id\0table_id=7\0"), Some(7));
        assert_eq!(table_id(b"record_id=id\0"), None);
        let huge = format!("table_id=7\0exclude={}\0", "x".repeat(MAX_READ_ARGUMENTS));
        assert_eq!(table_id(huge.as_bytes()), None);
        for bad in ["abc", "", "99999999999", "7 ", "0x7", "7\u{0}table_id=8"] {
            let raw = format!("record_id=id\0table_id={bad}\0");
            assert_eq!(table_id(raw.as_bytes()), None, "table_id={bad:?}");
        }
        // Capture refuses what the worker's SQL does not read, so the two never disagree.
        assert!(
            CaptureOptions::from_trigger_args(["record_id=id", "table_id=7", "table_id=8"])
                .is_err()
        );
        assert!(
            CaptureOptions::from_trigger_args(["record_id=id", "table_id=99999999999"]).is_err()
        );
    }

    #[test]
    fn unknown_or_incomplete_args_are_refused() {
        assert!(CaptureOptions::from_trigger_args(["record_id=id", "colour=red"]).is_err());
        assert!(CaptureOptions::from_trigger_args(["exclude=x"]).is_err());
        assert!(CaptureOptions::from_trigger_args(["record_id=id", "write_back=never"]).is_err());
    }

    #[test]
    fn every_write_back_mode_round_trips_by_its_name() {
        for mode in [WriteBack::Anchored, WriteBack::Accepted, WriteBack::None] {
            assert_eq!(WriteBack::parse(mode.as_str()), Some(mode));
            let arg = format!("write_back={}", mode.as_str());
            let parsed = CaptureOptions::from_trigger_args(["record_id=id", arg.as_str()]).unwrap();
            assert_eq!(parsed.write_back, mode);
        }
    }

    #[test]
    fn a_trigger_from_before_write_back_modes_writes_back_twice() {
        let options = CaptureOptions::from_trigger_args(["record_id=id"]).unwrap();
        assert_eq!(options.write_back, WriteBack::Accepted);
    }
}
