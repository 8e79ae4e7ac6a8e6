//! A table's BEFORE UPDATE row triggers fire in the byte order of their names, and the marks
//! trigger (`zz_certyo_marks`, see `crate::capture::marks`) judges whether a row's content
//! changed as the triggers before it leave the row. One that fires after it (`zzz_...`, a name
//! that starts with a non-ASCII letter) could change the content out of its sight, and the row
//! would go on showing its earlier version's hash and `anchored` until the new version is
//! accepted. So, in the modes that write back, such a trigger is refused on a tracked table and
//! on its partitions: by `track()` and the refresh after `ALTER TABLE`, by `ATTACH PARTITION`,
//! and by `CREATE TRIGGER` and `ALTER TRIGGER ... RENAME` (from `crate::ddl_hook`).

use super::partitions::tracked_table_of;
use crate::capture::marks::MARKS_TRIGGER;
use crate::capture::options::{CaptureOptions, WriteBack};
use crate::error::{CertyoError, Result};
use pgrx::pg_sys::Oid;
use pgrx::prelude::*;
use pgrx::PgSqlErrorCode;

/// `tgtype` bits of a BEFORE ... UPDATE ... FOR EACH ROW trigger.
const BEFORE_UPDATE_ROW: i16 = (pgrx::pg_sys::TRIGGER_TYPE_ROW
    | pgrx::pg_sys::TRIGGER_TYPE_BEFORE
    | pgrx::pg_sys::TRIGGER_TYPE_UPDATE) as i16;

/// Does a trigger of this name fire after the marks trigger (PostgreSQL orders a table's
/// triggers by `strcmp` of their names)?
fn fires_after_marks(name: &str) -> bool {
    name.as_bytes() > MARKS_TRIGGER.as_bytes()
}

/// Before `CREATE TRIGGER name` (a BEFORE UPDATE row trigger) on `relid`, or `ALTER TRIGGER
/// renamed ON relid RENAME TO name` (`renamed`: the trigger's present name, whatever it is).
pub fn refuse_trigger_after_marks(relid: Oid, name: &str, renamed: Option<&str>) -> Result<()> {
    if !fires_after_marks(name) {
        return Ok(());
    }
    let Some((table, options)) = tracked_table_of(relid, true)? else {
        return Ok(());
    };
    if options.write_back == WriteBack::None {
        return Ok(());
    }
    if let Some(renamed) = renamed {
        let tgtype = Spi::get_one_with_args::<i16>(
            "SELECT (SELECT tgtype FROM pg_catalog.pg_trigger
                      WHERE tgrelid OPERATOR(pg_catalog.=) $1 AND tgname OPERATOR(pg_catalog.=) $2)",
            &[relid.into(), renamed.into()],
        )?;
        if tgtype.is_none_or(|t| t & BEFORE_UPDATE_ROW != BEFORE_UPDATE_ROW) {
            return Ok(());
        }
    }
    Err(fires_after(
        name,
        &super::partitions::name_of(relid)?,
        &super::partitions::name_of(table)?,
    ))
}

/// In a mode that writes back: refused when the table, or one of its partitions, has a BEFORE
/// UPDATE row trigger named to fire after the marks trigger (`track()`, the refresh after
/// `ALTER TABLE`, and for `ATTACH PARTITION` the partition that joins).
pub fn require_no_trigger_after_marks(
    relid: Oid,
    table: Oid,
    options: &CaptureOptions,
) -> Result<()> {
    if options.write_back == WriteBack::None {
        return Ok(());
    }
    let (trigger, on) = Spi::get_two_with_args::<String, String>(
        "WITH found AS (
           SELECT t.tgname::text AS trigger, t.tgrelid::pg_catalog.regclass::text AS rel
             FROM (SELECT $1::pg_catalog.oid AS relid, 0 AS level
                   UNION SELECT relid, level FROM pg_catalog.pg_partition_tree($1)) p
             JOIN pg_catalog.pg_trigger t ON t.tgrelid OPERATOR(pg_catalog.=) p.relid
            WHERE t.tgtype OPERATOR(pg_catalog.&) $2 OPERATOR(pg_catalog.=) $2
              AND t.tgname::text COLLATE \"C\" OPERATOR(pg_catalog.>) $3 COLLATE \"C\"
            ORDER BY t.tgname::text COLLATE \"C\", p.level
            LIMIT 1)
         SELECT (SELECT trigger FROM found), (SELECT rel FROM found)",
        &[relid.into(), BEFORE_UPDATE_ROW.into(), MARKS_TRIGGER.into()],
    )?;
    match (trigger, on) {
        (Some(trigger), Some(on)) => Err(fires_after(
            &trigger,
            &on,
            &super::partitions::name_of(table)?,
        )),
        _ => Ok(()),
    }
}

fn fires_after(trigger: &str, on: &str, table: &str) -> CertyoError {
    CertyoError::new(
        PgSqlErrorCode::ERRCODE_INVALID_OBJECT_DEFINITION,
        format!("certyo_cdc: BEFORE UPDATE trigger \"{trigger}\" on {on} would fire after {MARKS_TRIGGER}, which tracked table {table} needs to fire last"),
    )
    .detail(format!("A table's BEFORE UPDATE row triggers fire in the byte order of their names. {MARKS_TRIGGER} clears a row's bookkeeping columns when its content changes; a trigger after it could change the content out of its sight, and the row would go on showing its earlier version's hash and 'anchored'."))
    .hint(format!("Give the trigger a name that sorts before {MARKS_TRIGGER} byte by byte (one that starts with a to y, for instance), or track the table with write_back => 'none'."))
}
