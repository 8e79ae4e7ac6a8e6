//! The shape each tracked table's changes are captured with (`certyo.capture_shape`): the
//! payload's columns (names, types, attribute numbers) and the record key. `certyo.track()` and
//! the DDL event trigger record a new shape whenever it changes, under a queue id drawn inside
//! the DDL's transaction: changes captured before have smaller ids, changes after larger ones.
//! The audit compares each row with its newest version on the columns, and under the record
//! key, that version was captured with, and reports each shape change since as its own finding.

use crate::capture::options::CaptureOptions;
use crate::capture::plan::TablePlan;
use crate::error::Result;
use pgrx::datum::TimestampWithTimeZone;
use pgrx::pg_sys::{self, Oid};
use pgrx::prelude::*;

pub struct Shape {
    /// Changes with a larger queue id (and smaller than the next shape's) have this shape.
    pub since_id: i64,
    pub recorded_at: Option<TimestampWithTimeZone>,
    pub columns: Vec<String>,
    pub types: Vec<String>,
    pub attnums: Vec<i16>,
    pub record_id_columns: Vec<String>,
}

impl Shape {
    pub fn same(&self, other: &Shape) -> bool {
        self.columns == other.columns
            && self.types == other.types
            && self.attnums == other.attnums
            && self.record_id_columns == other.record_id_columns
    }

    /// The attribute numbers of the record id columns (None if one is not a payload column).
    pub fn key_attnums(&self) -> Option<Vec<i16>> {
        self.record_id_columns
            .iter()
            .map(|c| {
                let i = self.columns.iter().position(|n| n == c)?;
                self.attnums.get(i).copied()
            })
            .collect()
    }
}

/// The table's present shape under `options`, and its collection.
pub fn current(relid: Oid, options: &CaptureOptions) -> Result<(Shape, String)> {
    // SAFETY: inside a transaction; the relation is closed by its guard.
    let (columns, record_id_columns, collection) = unsafe {
        let opened = crate::relation::OpenRelation::open(relid, pg_sys::AccessShareLock);
        let plan = TablePlan::build(opened.get(), options)?;
        let columns: Vec<String> = plan.payload.iter().map(|c| c.name.clone()).collect();
        let key = plan
            .record_id
            .iter()
            .map(|&p| plan.payload[p].name.clone())
            .collect::<Vec<_>>();
        (columns, key, plan.collection.clone())
    };
    let (types, attnums) = Spi::get_two_with_args::<Vec<String>, Vec<i16>>(
        "SELECT pg_catalog.array_agg(pg_catalog.format_type(a.atttypid, a.atttypmod) ORDER BY u.o),
                pg_catalog.array_agg(a.attnum ORDER BY u.o)
           FROM pg_catalog.unnest($2::pg_catalog.text[]) WITH ORDINALITY AS u(n, o)
           JOIN pg_catalog.pg_attribute a ON a.attrelid OPERATOR(pg_catalog.=) $1
                AND a.attname OPERATOR(pg_catalog.=) u.n AND NOT a.attisdropped",
        &[relid.into(), columns.clone().into()],
    )?;
    let shape = Shape {
        since_id: 0,
        recorded_at: None,
        columns,
        types: types.unwrap_or_default(),
        attnums: attnums.unwrap_or_default(),
        record_id_columns,
    };
    Ok((shape, collection))
}

/// Record `relid`'s present shape, unless it is the newest one recorded. A table's first shape
/// is recorded from id 0: it is the shape of whatever was captured before shapes were recorded.
pub fn record(relid: Oid, options: &CaptureOptions) -> Result<()> {
    if !schema_has(c"capture_shape", None) {
        return Ok(());
    }
    // A restore's shapes (and rows) find their table first, before its shape is compared: the
    // capture trigger is restored before the table's foreign keys, whose `ALTER TABLE` comes here.
    let localized = installation_known()?;
    if localized {
        crate::rights::as_superuser(|| Spi::run("SELECT certyo.relink_restored()"))?;
    }
    let (now, collection) = current(relid, options)?;
    let history = history(relid)?;
    if history.last().is_some_and(|last| last.same(&now)) {
        return Ok(());
    }
    let since_id = if history.is_empty() {
        0
    } else {
        crate::capture::queue::draw_id()?
    };
    crate::rights::as_superuser(|| {
        Spi::run_with_args(
            &format!(
                "INSERT INTO certyo.capture_shape (relid, collection, since_id, columns, types, attnums, record_id_columns{})
                 VALUES ($1, $2, $3, $4, $5, $6, $7{})",
                if localized { ", installation" } else { "" },
                if localized { ", certyo.this_installation()" } else { "" },
            ),
            &[
                relid.into(),
                collection.into(),
                since_id.into(),
                now.columns.into(),
                now.types.into(),
                now.attnums.into(),
                now.record_id_columns.into(),
            ],
        )
    })?;
    Ok(())
}

/// The shapes recorded for `relid`, oldest first, their attribute numbers the table's here.
pub fn history(relid: Oid) -> Result<Vec<Shape>> {
    if !schema_has(c"capture_shape", None) {
        return Ok(Vec::new());
    }
    localize(relid)?;
    crate::rights::as_superuser(|| {
        Ok(Spi::connect(|client| {
            let rows = client.select(
                "SELECT since_id, recorded_at, columns, types, attnums, record_id_columns
                   FROM certyo.capture_shape WHERE relid OPERATOR(pg_catalog.=) $1 ORDER BY since_id",
                None,
                &[relid.into()],
            )?;
            let mut shapes = Vec::new();
            for row in rows {
                shapes.push(Shape {
                    since_id: row.get::<i64>(1)?.unwrap_or_default(),
                    recorded_at: row.get::<TimestampWithTimeZone>(2)?,
                    columns: row.get::<Vec<String>>(3)?.unwrap_or_default(),
                    types: row.get::<Vec<String>>(4)?.unwrap_or_default(),
                    attnums: row.get::<Vec<i16>>(5)?.unwrap_or_default(),
                    record_id_columns: row.get::<Vec<String>>(6)?.unwrap_or_default(),
                });
            }
            Ok::<_, pgrx::spi::Error>(shapes)
        })?)
    })
}

/// Shapes recorded in another installation (restored from a dump) hold that installation's
/// attribute numbers, and a restore numbers the columns anew: a column dropped before the dump
/// leaves no gap, so each later column's number is another's. They are mapped to this table's,
/// once, by name: the newest shape recorded there names every column captured at the dump (the
/// DDL hook records a shape at every rename, so its names are the dumped ones), and an older
/// shape's column numbered as one of those is that column, found here under its name. A column
/// not in the newest shape was dropped (or excluded) before the dump: found here under its own
/// name if no column of the newest shape has it, otherwise it is gone, and gets a number no
/// column has (its old one, negated), so that the shapes still tell it from the others.
fn localize(relid: Oid) -> Result<()> {
    if !installation_known()? {
        return Ok(());
    }
    crate::rights::as_superuser(|| {
        Spi::run_with_args(
            "WITH here AS (SELECT certyo.this_installation() AS installation),
                  newest AS (
                      SELECT DISTINCT ON (s.installation) s.installation, s.columns, s.attnums
                        FROM certyo.capture_shape s, here
                       WHERE s.relid OPERATOR(pg_catalog.=) $1 AND s.installation OPERATOR(pg_catalog.<>) here.installation
                       ORDER BY s.installation, s.since_id DESC),
                  dumped AS (
                      SELECT n.installation, d.name, d.num, a.attnum AS now
                        FROM newest n
                       CROSS JOIN LATERAL ROWS FROM (pg_catalog.unnest(n.columns), pg_catalog.unnest(n.attnums)) AS d(name, num)
                        LEFT JOIN pg_catalog.pg_attribute a ON a.attrelid OPERATOR(pg_catalog.=) $1
                             AND a.attname OPERATOR(pg_catalog.=) d.name AND a.attnum OPERATOR(pg_catalog.>) 0
                             AND NOT a.attisdropped)
             UPDATE certyo.capture_shape s
                SET installation = here.installation,
                    attnums = ARRAY(
                        SELECT coalesce(CASE WHEN EXISTS (SELECT FROM dumped d WHERE d.installation OPERATOR(pg_catalog.=) s.installation
                                                                        AND d.num OPERATOR(pg_catalog.=) u.num)
                                    THEN (SELECT d.now FROM dumped d WHERE d.installation OPERATOR(pg_catalog.=) s.installation
                                                                       AND d.num OPERATOR(pg_catalog.=) u.num)
                                    ELSE (SELECT a.attnum FROM pg_catalog.pg_attribute a
                                           WHERE a.attrelid OPERATOR(pg_catalog.=) $1 AND a.attname OPERATOR(pg_catalog.=) u.name
                                             AND a.attnum OPERATOR(pg_catalog.>) 0 AND NOT a.attisdropped
                                             AND NOT EXISTS (SELECT FROM dumped d WHERE d.installation OPERATOR(pg_catalog.=) s.installation
                                                                                    AND d.name OPERATOR(pg_catalog.=) u.name))
                               END,
                               OPERATOR(pg_catalog.-) u.num)
                          FROM ROWS FROM (pg_catalog.unnest(s.columns), pg_catalog.unnest(s.attnums)) WITH ORDINALITY AS u(name, num, o)
                         ORDER BY u.o)
               FROM here
              WHERE s.relid OPERATOR(pg_catalog.=) $1 AND s.installation OPERATOR(pg_catalog.<>) here.installation",
            &[relid.into()],
        )
    })?;
    Ok(())
}

/// Whether the shapes say where their attribute numbers are valid: the installed schema has
/// `capture_shape.installation` and `certyo.this_installation()` (an update to 0.2.0 adds the
/// column before the function).
fn installation_known() -> Result<bool> {
    Ok(schema_has(c"capture_shape", Some(c"installation"))
        && Spi::get_one::<bool>(
            "SELECT pg_catalog.to_regprocedure('certyo.this_installation()') IS NOT NULL",
        )?
        .unwrap_or(false))
}

/// What changed from one shape to the next, in words: `added "c" integer; dropped "extra"`.
pub fn describe(before: &Shape, after: &Shape) -> String {
    let quoted = |n: &str| format!("\"{}\"", n.replace('"', "\"\""));
    let mut changes = Vec::new();
    let key = |s: &Shape| {
        s.record_id_columns
            .iter()
            .map(|n| quoted(n))
            .collect::<Vec<_>>()
            .join(", ")
    };
    if before.record_id_columns != after.record_id_columns {
        changes.push(format!("record id ({}) to ({})", key(before), key(after)));
    }
    for (i, attnum) in before.attnums.iter().enumerate() {
        match after.attnums.iter().position(|a| a == attnum) {
            None => changes.push(format!("dropped {}", quoted(&before.columns[i]))),
            Some(j) => {
                if before.columns[i] != after.columns[j] {
                    changes.push(format!(
                        "renamed {} to {}",
                        quoted(&before.columns[i]),
                        quoted(&after.columns[j])
                    ));
                }
                if before.types.get(i) != after.types.get(j) {
                    changes.push(format!(
                        "retyped {} {} to {}",
                        quoted(&after.columns[j]),
                        before.types.get(i).map_or("?", |t| t.as_str()),
                        after.types.get(j).map_or("?", |t| t.as_str())
                    ));
                }
            }
        }
    }
    for (j, attnum) in after.attnums.iter().enumerate() {
        if !before.attnums.contains(attnum) {
            changes.push(format!(
                "added {} {}",
                quoted(&after.columns[j]),
                after.types.get(j).map_or("?", |t| t.as_str())
            ));
        }
    }
    if changes.is_empty() {
        changes.push("columns reordered".to_string());
    }
    changes.join("; ")
}

/// Whether the installed extension has `certyo.{table}` (and its `column`): a library newer
/// than the extension's SQL (installed, not yet `ALTER EXTENSION certyo_cdc UPDATE`d) works
/// without what the update adds.
pub fn schema_has(table: &std::ffi::CStr, column: Option<&std::ffi::CStr>) -> bool {
    // SAFETY: catalog lookups inside the caller's transaction.
    unsafe {
        let namespace = pg_sys::get_namespace_oid(c"certyo".as_ptr(), true);
        if namespace == pg_sys::InvalidOid {
            return false;
        }
        let relid = pg_sys::get_relname_relid(table.as_ptr(), namespace);
        if relid == pg_sys::InvalidOid {
            return false;
        }
        column.is_none_or(|c| pg_sys::get_attnum(relid, c.as_ptr()) != 0)
    }
}
