//! Each tracked table's identity of the extension's own (`certyo.table_identity`, in
//! `sql/delivery.sql`), one per table and record key, as TimescaleDB keeps its hypertables:
//! names in the extension's catalog, OIDs resolved at run time.
//!
//! The capture trigger carries the id (`table_id=N`, see [`crate::capture::options`]) and every
//! change carries it to the queue, the deliveries and the receipts. An OID is only a cache:
//! a restore gives every table a new one (in a fresh cluster, quite possibly another tracked
//! table's old one), while the trigger travels with its table through `pg_dump`.
//! `certyo.relink_restored()` finds each id's table again by that trigger, checked against the
//! name kept in the catalog, and [`belonging`] lets a write-back mark only a table whose
//! trigger carries the version's id: whatever cannot be told waits, it is never guessed.
//!
//! A change of the record key (other `record_id_columns`, the primary key moved to other
//! columns or retyped) gives the table a new id that supersedes the old: versions captured
//! under the old key keep the record id they were captured with (Certyo gets them so), but no
//! key finds their row any more, so their write-back is dropped and recorded
//! (`certyo.receipt.write_back_dropped`), never retried, and never put on a row whose new key
//! happens to equal the old one.

use super::table::Table;
use crate::capture::options::CaptureOptions;
use crate::error::Result;
use pgrx::pg_sys::{self, Oid};
use pgrx::prelude::*;
use std::cell::Cell;

thread_local! {
    /// A write-back met versions whose table id the OID they carry no longer names: the
    /// worker runs `certyo.relink_restored()` at its next pass.
    static RELINK_WANTED: Cell<bool> = const { Cell::new(false) };
}

/// Whether the extension's tables have the `table_id` columns: a schema from before 0.2.0
/// (the library installed, `ALTER EXTENSION certyo_cdc UPDATE` not yet run) has none, and is
/// served as it was until the update (see [`crate::shape::schema_has`]).
pub fn schema_has_ids() -> bool {
    crate::shape::schema_has(c"receipt", Some(c"table_id"))
}

/// Whether [`belonging`] asked for a relink since the last call.
pub fn relink_wanted() -> bool {
    RELINK_WANTED.replace(false)
}

thread_local! {
    /// `certyo.this_installation()` as last read, with the extension's OID it was read under.
    static INSTALLATION: std::cell::RefCell<Option<(Oid, String)>> = const { std::cell::RefCell::new(None) };
}

/// `certyo.this_installation()` (`sql/delivery.sql`), read once per extension (its OID, the
/// only part that can change in a process's life: dropped and created again): that SQL
/// function reads `pg_control` and is planned anew at every call (its `SET` keeps it from
/// being inlined), which the worker paid several times a pass; its kept statements take this
/// as a parameter instead.
pub fn this_installation(
    client: &pgrx::spi::SpiClient<'_>,
) -> std::result::Result<String, pgrx::spi::Error> {
    // SAFETY: a catalog lookup by name, in a transaction (the caller's SPI connection).
    let extension = unsafe { pg_sys::get_extension_oid(c"certyo_cdc".as_ptr(), true) };
    if let Some(kept) = INSTALLATION.with(|kept| {
        kept.borrow()
            .as_ref()
            .filter(|(oid, _)| *oid == extension)
            .map(|(_, text)| text.clone())
    }) {
        return Ok(kept);
    }
    let Some(text) = client
        .select("SELECT certyo.this_installation()", None, &[])?
        .first()
        .get_one::<String>()?
    else {
        return Ok(String::new()); // no extension: nothing kept, asked again next time
    };
    INSTALLATION.with(|kept| *kept.borrow_mut() = Some((extension, text.clone())));
    Ok(text)
}

/// How long the worker's relink waits for `certyo.table_identity` (and anything else it
/// locks) before it is left to the next pass.
const RELINK_WAIT: &std::ffi::CStr = c"10ms";

/// The worker's relink, `certyo.relink_restored(true)`, unless what it locks is held: a session
/// that tracked a table holds `certyo.table_identity` until it commits (its new id, or its own
/// relink), which may be never. The relink is then asked for again at the next pass, and this
/// pass goes on without it: sending needs no OID, and a write-back writes only the versions the
/// catalog places at its table ([`belonging`]).
pub fn relink_unless_held(
    client: &mut pgrx::spi::SpiClient<'_>,
) -> std::result::Result<(), pgrx::spi::Error> {
    let relinked = crate::error::in_subtransaction_unless(
        pgrx::PgSqlErrorCode::ERRCODE_LOCK_NOT_AVAILABLE,
        std::panic::AssertUnwindSafe(|| {
            crate::rights::with_settings(&[(c"lock_timeout", RELINK_WAIT)], || {
                client
                    .update("SELECT certyo.relink_restored(true)", None, &[])
                    .map(|_| ())
            })
        }),
    );
    match relinked {
        Some(done) => done,
        None => {
            RELINK_WANTED.set(true);
            // Said at most once a minute: restored tables' write-backs wait meanwhile.
            let now = std::time::Instant::now();
            if RELINK_HELD_SAID
                .get()
                .is_none_or(|said| now.duration_since(said).as_secs() >= 60)
            {
                RELINK_HELD_SAID.set(Some(now));
                pgrx::log!(
                    "certyo_cdc: the relink of restored tables waits for a session holding certyo.table_identity (an open transaction that called certyo.track()?): tried again at every pass"
                );
            }
            Ok(())
        }
    }
}

thread_local! {
    /// When [`relink_unless_held`] last said that it waits.
    static RELINK_HELD_SAID: Cell<Option<std::time::Instant>> = const { Cell::new(None) };
}

/// `certyo.relink_needed()` (`sql/delivery.sql`) as the worker asks it at every pass: the same
/// conditions in one kept statement (planned once; the SQL function, which is not inlined,
/// was planned anew at each call with the two it calls), `$1` being [`this_installation`] and
/// `$2`, `$3` the capture triggers' tables and the ids they carry ([`carried_ids`]).
/// `pg_test/test_identity.py` runs both in the states that make either true.
pub const RELINK_NEEDED: &str = "
    SELECT EXISTS (SELECT FROM certyo.table_identity i WHERE i.installation <> $1)
        OR EXISTS (SELECT FROM unnest($2::pg_catalog.oid[], $3::pg_catalog.int4[]) AS t(tgrelid, id)
                     JOIN pg_catalog.pg_class c ON c.oid = t.tgrelid
                     JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
                     JOIN certyo.table_identity i ON i.id = t.id
                    WHERE i.id <> 0 AND i.superseded_by IS NULL AND i.relid IS DISTINCT FROM t.tgrelid
                      AND NOT (i.installation = $1
                               AND EXISTS (SELECT FROM pg_catalog.pg_class p WHERE p.oid = i.relid))
                    GROUP BY i.id
                   HAVING i.relid <> 0 OR count(*) = 1
                          OR bool_or(n.nspname = i.schema_name AND c.relname = i.table_name))";

thread_local! {
    /// The table id each capture trigger carries, by the trigger's OID and row version (its
    /// `xmin`): its arguments change only with a new row version. Anyone may make any number
    /// of triggers named `certyo_capture` with up to a megabyte of arguments each: reading
    /// them all at every pass (400 of them: 285 ms) would slow every table's delivery.
    static CARRIED: std::cell::RefCell<std::collections::HashMap<(u32, i64), i32>> =
        std::cell::RefCell::new(std::collections::HashMap::new());
}

/// Every capture trigger's table (`certyo_capture`, not a partition's clone) and the table id
/// it carries (0: none), as `certyo.tracked_oids()` reads them; each trigger's arguments read
/// once per row version ([`CARRIED`]).
pub fn carried_ids(
    client: &pgrx::spi::SpiClient<'_>,
) -> std::result::Result<(Vec<Oid>, Vec<i32>), pgrx::spi::Error> {
    use crate::delivery::prepared;
    let mut triggers = Vec::new();
    for row in prepared::select(
        client,
        "SELECT t.oid, t.xmin::text::bigint, t.tgrelid FROM pg_catalog.pg_trigger t
          WHERE t.tgname = 'certyo_capture' AND t.tgparentid = 0",
        &[],
    )? {
        if let (Some(oid), Some(xmin), Some(relid)) =
            (row.get::<Oid>(1)?, row.get::<i64>(2)?, row.get::<Oid>(3)?)
        {
            triggers.push(((oid.to_u32(), xmin), relid));
        }
    }
    let unknown: Vec<Oid> = CARRIED.with(|carried| {
        let carried = carried.borrow();
        triggers
            .iter()
            .filter(|(key, _)| !carried.contains_key(key))
            .map(|((oid, _), _)| Oid::from(*oid))
            .collect()
    });
    // Read now, by OID: a trigger changed since the list above is found under its new version.
    let mut read = std::collections::HashMap::new();
    if !unknown.is_empty() {
        for row in prepared::select(
            client,
            "SELECT t.oid, t.xmin::text::bigint,
                    coalesce(CASE WHEN octet_length(t.tgargs) <= 1048576 THEN certyo.capture_table_id(t.tgargs) END, 0)
               FROM pg_catalog.pg_trigger t WHERE t.oid = ANY ($1)",
            &[unknown.into()],
        )? {
            if let (Some(oid), Some(xmin), Some(id)) =
                (row.get::<Oid>(1)?, row.get::<i64>(2)?, row.get::<i32>(3)?)
            {
                read.insert(oid.to_u32(), ((oid.to_u32(), xmin), id));
            }
        }
    }
    Ok(CARRIED.with(|carried| {
        let mut carried = carried.borrow_mut();
        carried.extend(read.values().copied());
        let found: Vec<(Oid, i32)> = triggers
            .iter()
            .map(|(key, relid)| {
                let id = carried
                    .get(key)
                    .or_else(|| read.get(&key.0).map(|(_, id)| id))
                    .copied()
                    .unwrap_or(0);
                (*relid, id)
            })
            .collect();
        // Only the triggers there are now, and the versions just read.
        let keep: std::collections::HashSet<(u32, i64)> = triggers
            .iter()
            .map(|(key, _)| *key)
            .chain(read.values().map(|(key, _)| *key))
            .collect();
        carried.retain(|key, _| keep.contains(key));
        found.into_iter().unzip()
    }))
}

/// Whether capture may queue the changes of table `relid` under table id `table_id`. A capture
/// trigger is made by `certyo.track()` alone, but anyone who may create a trigger can make one
/// that calls `certyo.capture()` with another table's id (the ids are in `pg_trigger`, which
/// everyone reads): its changes would then be taken for that table's, and their hashes written
/// to its rows. So the id must be this table's as `certyo.relink_restored()` would place it:
/// - placed in this installation at a table that exists: that table, by OID (an OID never
///   changes within an installation);
/// - restored and not relinked yet (placed in another installation), or placed at a table gone
///   since (OID 0, or dropped and restored from a dump): the table of the name kept with it;
/// - not in the catalog: none (an id made up could be the next one `certyo.track()` gives,
///   and the changes would follow that table). A table restored alone, with its trigger, into a
///   database whose catalog does not know its id is tracked anew by `certyo.track()`; until
///   then its writes are refused, saying so.
///
/// Read only, once per table and backend (capture's plans are cached): the relink itself is
/// the worker's, never run in a writer's transaction.
pub fn capture_may_use(table_id: i32, relid: Oid) -> Result<bool> {
    if !schema_has_ids() {
        return Ok(true); // a schema from before 0.2.0: no ids to check
    }
    crate::rights::as_superuser(|| {
        Spi::get_one_with_args::<bool>(
            "SELECT CASE
                      WHEN i.id IS NULL THEN false
                      WHEN i.installation OPERATOR(pg_catalog.=) certyo.this_installation()
                           AND EXISTS (SELECT FROM pg_catalog.pg_class c WHERE c.oid OPERATOR(pg_catalog.=) i.relid)
                        THEN i.relid OPERATOR(pg_catalog.=) $2
                      ELSE EXISTS (SELECT FROM pg_catalog.pg_class c
                                     JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) c.relnamespace
                                    WHERE c.oid OPERATOR(pg_catalog.=) $2
                                      AND n.nspname OPERATOR(pg_catalog.=) i.schema_name
                                      AND c.relname OPERATOR(pg_catalog.=) i.table_name)
                    END
               FROM (SELECT $1::integer AS id) x
               LEFT JOIN certyo.table_identity i ON i.id OPERATOR(pg_catalog.=) x.id",
            &[table_id.into(), relid.into()],
        )
        .map(|placed| placed.unwrap_or(false))
    })
    .map_err(Into::into)
}

/// The record key as the catalog keeps it: each record id column's name and type.
fn record_key(table: &Table, options: &CaptureOptions) -> Vec<String> {
    options
        .record_id_columns
        .iter()
        .map(|name| {
            let ty = table.column(name).map_or_else(String::new, |c| {
                // SAFETY: format_type_be returns a palloc'd NUL-terminated string.
                unsafe { std::ffi::CStr::from_ptr(pg_sys::format_type_be(c.typid)) }
                    .to_string_lossy()
                    .into_owned()
            });
            format!("{name} {ty}")
        })
        .collect()
}

/// Set `options.table_id` to the table's identity under this record key: the one its capture
/// trigger carries (or, untracked, the one it had under its present name and OID) when the key
/// is unchanged, its name brought up to date (a rename is an `ALTER TABLE`, which refreshes);
/// a new one that supersedes it when the key changed, or when there is none. The OID is left
/// to `certyo.relink_restored()`, which moves it together with the rows that carry it.
pub fn assign(table: &Table, options: &mut CaptureOptions) -> Result<()> {
    if !crate::shape::schema_has(c"table_identity", None) {
        return Ok(()); // a schema from before 0.2.0: its update assigns the ids
    }
    let key = record_key(table, options);
    let installed = super::installed_options(table.relid)?.and_then(|o| o.table_id);
    if let Some(id) = installed {
        // A capture trigger whose identity is not there yet: a restore that brought the trigger
        // (post-data) before `certyo.table_identity`'s rows and sequence (pg_restore -j runs a
        // table's ALTER TABLE, and with it this, while other jobs still load data). A new
        // identity made now would take a number the restored rows are about to bring back, and
        // their COPY, or this, would fail on it. The trigger's own id is kept.
        let restored_yet = crate::rights::as_superuser(|| {
            Spi::get_one_with_args::<bool>(
                "SELECT EXISTS (SELECT FROM certyo.table_identity WHERE id OPERATOR(pg_catalog.=) $1)",
                &[id.into()],
            )
        })?;
        if restored_yet == Some(false) {
            options.table_id = Some(id);
            return Ok(());
        }
    }
    let (schema, name) = split_display(table);
    let id = crate::rights::as_superuser(|| {
        Spi::connect_mut(|client| {
            // A table untracked when it was dumped carries no trigger to find its identity by:
            // a restored identity is placed by its name first (as history() and audit() do),
            // so that tracking it again keeps it, and the receipts of its id stay its own.
            client.update("SELECT certyo.relink_restored()", None, &[])?;
            client.update(
            "WITH present AS (
                 SELECT i.id, i.record_key FROM certyo.table_identity i
                  WHERE i.superseded_by IS NULL
                    AND (i.id OPERATOR(pg_catalog.=) $1
                         OR ($1 IS NULL AND i.relid OPERATOR(pg_catalog.=) $2
                             AND i.installation OPERATOR(pg_catalog.=) certyo.this_installation()
                             AND i.schema_name OPERATOR(pg_catalog.=) $3 AND i.table_name OPERATOR(pg_catalog.=) $4))
                  ORDER BY i.id DESC LIMIT 1),
             kept AS (
                 UPDATE certyo.table_identity i
                    SET record_key = $5, schema_name = $3, table_name = $4
                   FROM present p
                  WHERE i.id OPERATOR(pg_catalog.=) p.id
                    AND (p.record_key IS NULL OR p.record_key OPERATOR(pg_catalog.=) $5)
                 RETURNING i.id),
             made AS (
                 INSERT INTO certyo.table_identity (schema_name, table_name, relid, installation, record_key)
                 SELECT $3, $4, $2, certyo.this_installation(), $5 WHERE NOT EXISTS (SELECT FROM kept)
                 RETURNING id),
             superseded AS (
                 UPDATE certyo.table_identity i SET superseded_at = pg_catalog.now(), superseded_by = m.id
                   FROM present p, made m
                  WHERE i.id OPERATOR(pg_catalog.=) p.id)
             SELECT id FROM kept UNION ALL SELECT id FROM made",
            None,
            &[
                installed.into(),
                table.relid.into(),
                schema.into(),
                name.into(),
                key.into(),
            ],
        )?
        .first()
        .get_one::<i32>()
        })
    })?;
    options.table_id = id;
    Ok(())
}

/// The table's schema and name, unquoted.
fn split_display(table: &Table) -> (String, String) {
    // SAFETY: catalog lookups of an existing relation's namespace and name, which return
    // palloc'd copies (or NULL, for a relation dropped meanwhile).
    unsafe {
        let text = |p: *mut std::ffi::c_char| {
            if p.is_null() {
                String::new()
            } else {
                std::ffi::CStr::from_ptr(p).to_string_lossy().into_owned()
            }
        };
        let schema = text(pg_sys::get_namespace_name(pg_sys::get_rel_namespace(
            table.relid,
        )));
        (schema, text(pg_sys::get_rel_name(table.relid)))
    }
}

/// Of the versions about to be written back to `relid` (their ids: receipt ids), those that
/// belong there: the table's capture trigger carries the table id they were captured under
/// (or it has none, untracked meanwhile, and the catalog places their id there).
/// Of the others, a version captured under a record key the table no longer has (a superseded
/// id) is dropped and recorded (`write_back_dropped`), never to be retried; any other (an OID
/// that a restore made another table's, an id not found yet) waits to be written back once
/// `certyo.relink_restored()`, asked for here, has found its table.
pub fn belonging(
    client: &mut pgrx::spi::SpiClient<'_>,
    relid: Oid,
    ids: &[i64],
) -> std::result::Result<std::collections::HashSet<i64>, pgrx::spi::Error> {
    if !schema_has_ids() {
        return Ok(ids.iter().copied().collect());
    }
    // Kept (planned once): every write-back asks.
    let sorted = crate::delivery::prepared::update(
        client,
        "WITH current AS (
             SELECT coalesce((SELECT certyo.capture_table_id(t.tgargs)
                                FROM pg_trigger t
                               WHERE t.tgrelid = $2 AND t.tgname = 'certyo_capture' AND t.tgparentid = 0), 0) AS id,
                    $3 AS here),
         versions AS (
             -- Its own: the table's trigger carries the version's id; or the table has no
             -- trigger (untracked meanwhile: nothing is written back) and the catalog, as
             -- found in this installation, places the id here, unless another table's trigger
             -- carries the id: the catalog may then place it at a table dropped and restored
             -- since, not relinked yet (a relink left for later, or not run yet this pass).
             SELECT r.id,
                    coalesce(r.table_id = c.id
                             OR (c.id = 0 AND $2 <> 0 AND i.relid = $2 AND i.installation = c.here
                                 AND NOT EXISTS (
                                     SELECT FROM pg_trigger o
                                      WHERE o.tgname = 'certyo_capture' AND o.tgparentid = 0 AND o.tgrelid <> $2
                                        AND octet_length(o.tgargs) <= 1048576
                                        AND certyo.capture_table_id(o.tgargs) = r.table_id)),
                             false) AS own,
                    coalesce(i.superseded_by IS NOT NULL, false) AS old_key, i.record_key
               FROM certyo.receipt r CROSS JOIN current c
               LEFT JOIN certyo.table_identity i ON i.id = r.table_id
              WHERE r.id = ANY ($1)),
         dropped AS (
             UPDATE certyo.receipt r
                SET written_back = true,
                    write_back_dropped = 'captured under the record key (' || coalesce(array_to_string(v.record_key, ', '), 'unknown')
                                         || '), which the table no longer has: no key finds its row'
               FROM versions v
              WHERE r.id = v.id AND NOT v.own AND v.old_key
             RETURNING r.id),
         elsewhere AS (
             UPDATE certyo.receipt r SET written_back = false,
                    relid = coalesce((SELECT i.relid FROM certyo.table_identity i
                                       WHERE i.id = r.table_id AND i.relid <> $2), 0)
               FROM versions v
              WHERE r.id = v.id AND NOT v.own AND NOT v.old_key
             RETURNING r.id)
         SELECT v.id, v.own, (SELECT count(*) FROM dropped), (SELECT count(*) FROM elsewhere)
           FROM versions v",
        &[
            ids.to_vec().into(),
            relid.into(),
            this_installation(client)?.into(),
        ],
    )?;
    let mut own = std::collections::HashSet::with_capacity(ids.len());
    let (mut dropped, mut elsewhere) = (0, 0);
    for row in sorted {
        if row.get::<bool>(2)?.unwrap_or(false) {
            own.extend(row.get::<i64>(1)?);
        }
        dropped = row.get::<i64>(3)?.unwrap_or(0);
        elsewhere = row.get::<i64>(4)?.unwrap_or(0);
    }
    if dropped > 0 {
        pgrx::log!(
            "certyo_cdc: {dropped} versions of table {} captured under an earlier record key are not written back: no key finds their rows any more (certyo.receipt.write_back_dropped)",
            relid.to_u32()
        );
    }
    if elsewhere > 0 {
        pgrx::warning!(
            "certyo_cdc: {elsewhere} versions to be written back to the table of OID {} were captured for another table (restored from a dump?): they wait until their own table is found",
            relid.to_u32()
        );
        RELINK_WANTED.set(true);
    }
    Ok(own)
}
