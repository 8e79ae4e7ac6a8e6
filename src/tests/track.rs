//! `track()`/`untrack()`: options, re-tracking, refusals that change nothing, permissions and
//! upkeep after `ALTER TABLE`.

use super::{error_of, one, queue_len, queued, sql};
use pgrx::prelude::*;

/// The state a refused `track()` must leave untouched: columns and triggers of `table`.
fn shape_of(table: &str) -> String {
    one::<String>(&format!(
        "SELECT (SELECT string_agg(attname, ',' ORDER BY attnum) FROM pg_attribute
                  WHERE attrelid = '{table}'::regclass AND attnum > 0 AND NOT attisdropped)
             || '|' || coalesce((SELECT string_agg(tgname, ',' ORDER BY tgname) FROM pg_trigger WHERE tgrelid = '{table}'::regclass), '')"
    ))
    .unwrap()
}

/// Assert that `call` fails with `sqlstate` and a message containing `needle`, and that
/// `table` looks exactly as before.
fn assert_refused(table: &str, call: &str, sqlstate: &str, needle: &str) -> String {
    let before = shape_of(table);
    let (state, message, hint) = error_of(call).unwrap_or_else(|| panic!("{call} succeeded"));
    assert_eq!(state, sqlstate, "{call}: {message}");
    assert!(message.contains(needle), "{call}: {message}");
    assert_eq!(shape_of(table), before, "{call} changed the table");
    hint
}

#[pg_schema]
mod tests {
    use super::*;

    #[pg_test]
    fn track_adds_bookkeeping_columns_and_its_triggers() {
        sql("CREATE TABLE t (id int PRIMARY KEY, v text); SELECT certyo.track('t')");
        assert_eq!(shape_of("t"), "id,v,certyo_record_hash,certyo_anchor_status,certyo_verified_at|certyo_capture,certyo_truncate_guard,zz_certyo_marks");
        // The default write-back ('anchored'): nothing on the row until Certyo confirms it, and
        // no column default for every INSERT to evaluate.
        sql("INSERT INTO t (id, v) VALUES (1, 'x')");
        assert_eq!(one::<String>("SELECT certyo_anchor_status FROM t"), None);
        // 'accepted': 'pending' from the start.
        sql("CREATE TABLE u (id int PRIMARY KEY, v text); SELECT certyo.track('u', write_back => 'accepted');
             INSERT INTO u (id, v) VALUES (1, 'x')");
        assert_eq!(
            one::<String>("SELECT certyo_anchor_status FROM u"),
            Some("pending".into())
        );
    }

    #[pg_test]
    fn tracking_again_updates_the_options_without_a_second_trigger() {
        sql(
            "CREATE TABLE t (id int PRIMARY KEY, v text, w text); SELECT certyo.track('t');
             SELECT certyo.track('t', exclude_columns => ARRAY['w']);",
        );
        assert_eq!(
            one::<i64>("SELECT count(*) FROM pg_trigger WHERE tgrelid = 't'::regclass"),
            Some(3)
        );
        assert_eq!(
            one::<Vec<String>>("SELECT exclude_columns FROM certyo.tracked_tables"),
            Some(vec!["w".to_string()])
        );
        sql("INSERT INTO t VALUES (1, 'a', 'b')");
        assert_eq!(queued()[0].2, r#"{"id":1,"v":"a"}"#);
    }

    #[pg_test]
    fn tracked_tables_shows_the_options() {
        sql("CREATE TABLE t (k1 int NOT NULL, k2 text NOT NULL, secret text, changed timestamptz, UNIQUE (k1, k2));
             SELECT certyo.track('t', record_id_columns => ARRAY['k2', 'k1'], exclude_columns => ARRAY['secret'],
                                 timestamp_column => 'changed');");
        let row = Spi::get_three::<Vec<String>, String, String>(
            "SELECT record_id_columns, record_id_source, timestamp_column::text FROM certyo.tracked_tables WHERE \"table\" = 't'::regclass",
        )
        .unwrap();
        assert_eq!(
            row,
            (
                Some(vec!["k2".into(), "k1".into()]),
                Some("columns".into()),
                Some("changed".into())
            )
        );
    }

    #[pg_test]
    fn untrack_removes_the_triggers_but_keeps_queued_changes() {
        sql("CREATE TABLE t (id int PRIMARY KEY); SELECT certyo.track('t'); INSERT INTO t VALUES (1);");
        assert_eq!(one::<bool>("SELECT certyo.untrack('t')"), Some(true));
        sql("INSERT INTO t VALUES (2)");
        assert_eq!(queue_len(), 1);
        assert_eq!(
            one::<i64>("SELECT count(*) FROM certyo.tracked_tables"),
            Some(0)
        );
        assert_eq!(
            one::<bool>("SELECT certyo.untrack('t', drop_columns => true)"),
            Some(false)
        );
        assert_eq!(shape_of("t"), "id|");
    }

    #[pg_test]
    fn backfill_queues_existing_rows_as_upserts() {
        sql("CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 50) g;
             SELECT certyo.track('t', backfill => true);");
        let rows = queued();
        assert_eq!(rows.len(), 50);
        assert!(rows.iter().all(|(op, _, _)| op == "upsert"));
        assert!(rows.contains(&("upsert".into(), "7".into(), r#"{"id":7,"v":"v7"}"#.into())));
    }

    #[pg_test]
    fn record_id_columns_must_be_covered_by_a_unique_index() {
        sql(
            "CREATE TABLE t (id int PRIMARY KEY, k int NOT NULL, j int NOT NULL);
             CREATE UNIQUE INDEX t_partial ON t (k) WHERE k > 0;
             CREATE UNIQUE INDEX t_expression ON t ((k + 1));
             CREATE UNIQUE INDEX t_j ON t (j) INCLUDE (k);",
        );
        let hint = assert_refused(
            "t",
            "SELECT certyo.track('t', record_id_columns => ARRAY['k'])",
            "42P10",
            "record id columns (\"k\") of public.t do not identify a row",
        );
        assert!(
            hint.contains("CREATE UNIQUE INDEX ON public.t (\"k\")"),
            "{hint}"
        );
        // A unique index on some of the columns identifies a row; its INCLUDE columns do not count.
        sql("SELECT certyo.track('t', record_id_columns => ARRAY['k', 'j'])");
        sql("SELECT certyo.track('t', record_id_columns => ARRAY['j'])");
        // The index it stands on cannot be dropped from under it by ALTER TABLE.
        sql(
            "CREATE TABLE u (k int NOT NULL CONSTRAINT u_k UNIQUE, v text);
             SELECT certyo.track('u', record_id_columns => ARRAY['k']);",
        );
        let (state, message, _) = error_of("ALTER TABLE u DROP CONSTRAINT u_k").unwrap();
        assert_eq!(state, "42P10", "{message}");
        assert_eq!(
            one::<i64>("SELECT count(*) FROM pg_constraint WHERE conname = 'u_k'"),
            Some(1)
        );
    }

    #[pg_test]
    fn the_last_unique_index_under_the_record_id_cannot_be_dropped() {
        sql(
            "CREATE TABLE w (id int PRIMARY KEY, k int NOT NULL, v text);
             CREATE UNIQUE INDEX w_k ON w (k);
             CREATE UNIQUE INDEX w_k_v ON w (k) INCLUDE (v);
             CREATE INDEX w_v ON w (v);
             SELECT certyo.track('w', record_id_columns => ARRAY['k']);",
        );
        // Other indexes go as usual, and so does one of two that cover k.
        sql("DROP INDEX w_v; DROP INDEX w_k_v");
        let (state, message, hint) = error_of("DROP INDEX w_k").unwrap();
        assert_eq!(state, "2BP01", "{message}");
        assert!(
            message.contains("index public.w_k is what makes the record id columns (\"k\") of tracked table public.w identify a row"),
            "{message}"
        );
        assert!(hint.contains("certyo.untrack('public.w')"), "{hint}");
        // Two covering indexes dropped in one statement leave none.
        sql("CREATE UNIQUE INDEX w_k2 ON w (k)");
        let (state, message, _) =
            error_of("DROP INDEX IF EXISTS no_such_index, w_k2, w_k").unwrap();
        assert_eq!(state, "2BP01", "{message}");
        assert_eq!(
            one::<i64>("SELECT count(*) FROM pg_class WHERE relname IN ('w_k', 'w_k2')"),
            Some(2)
        );
        // Once the table is no longer tracked, its indexes are its own again.
        sql("SELECT certyo.untrack('w'); DROP INDEX w_k, w_k2");
    }

    #[pg_test]
    fn the_bookkeeping_columns_of_a_tracked_table_cannot_be_renamed_or_dropped() {
        sql("CREATE TABLE t (id int PRIMARY KEY, v text); SELECT certyo.track('t')");
        for statement in [
            "ALTER TABLE t RENAME COLUMN certyo_record_hash TO hash",
            "ALTER TABLE t DROP COLUMN certyo_anchor_status",
        ] {
            let (state, message, hint) = error_of(statement).unwrap();
            assert_eq!(state, "2BP01", "{statement}: {message}");
            assert!(
                message.contains("of tracked table public.t is where certyo_cdc writes"),
                "{message}"
            );
            assert!(
                hint.contains("certyo.untrack('public.t', drop_columns => true)"),
                "{hint}"
            );
        }
        assert_eq!(shape_of("t"), "id,v,certyo_record_hash,certyo_anchor_status,certyo_verified_at|certyo_capture,certyo_truncate_guard,zz_certyo_marks");
        sql("SELECT certyo.untrack('t', drop_columns => true)");
        assert_eq!(shape_of("t"), "id,v|");
    }

    #[pg_test]
    fn refused_inputs_name_the_problem_and_change_nothing() {
        sql("CREATE TABLE keyless (a int, b text, c int);
             CREATE TABLE t (id int PRIMARY KEY, v text, n int, nullable text);
             CREATE VIEW v AS SELECT * FROM t;
             CREATE FOREIGN DATA WRAPPER nothing; CREATE SERVER nowhere FOREIGN DATA WRAPPER nothing;
             CREATE FOREIGN TABLE remote (a int) SERVER nowhere;
             CREATE TABLE certyo.mine (id int PRIMARY KEY);");
        let hint = assert_refused(
            "keyless",
            "SELECT certyo.track('keyless')",
            "42P16",
            "has no primary key",
        );
        assert!(hint.contains("record_id_columns"), "{hint}");
        assert_refused("t", "SELECT certyo.track('v')", "42809", "is a view");
        assert_refused(
            "t",
            "SELECT certyo.track('remote')",
            "42809",
            "is a foreign table",
        );
        let hint = assert_refused(
            "t",
            "SELECT certyo.track('t', record_id_columns => ARRAY['nope'])",
            "42703",
            "\"nope\" does not exist",
        );
        assert!(hint.contains("id, v, n, nullable"), "{hint}");
        assert_refused(
            "t",
            "SELECT certyo.track('t', exclude_columns => ARRAY['ghost'])",
            "42703",
            "\"ghost\" does not exist",
        );
        assert_refused(
            "t",
            "SELECT certyo.track('t', exclude_columns => ARRAY['id'])",
            "22023",
            "cannot be excluded",
        );
        assert_refused(
            "t",
            "SELECT certyo.track('t', timestamp_column => 'n')",
            "42804",
            "has type integer",
        );
        assert_refused(
            "t",
            "SELECT certyo.track('t', record_id_columns => ARRAY['nullable'])",
            "22023",
            "may be NULL",
        );
        assert_refused(
            "t",
            "SELECT certyo.track('t', record_id_columns => '{}')",
            "22023",
            "record_id_columns is empty",
        );
        assert_refused(
            "certyo.mine",
            "SELECT certyo.track('certyo.mine')",
            "22023",
            "cannot be tracked",
        );
        assert_refused(
            "t",
            "SELECT certyo.track(NULL)",
            "22004",
            "must not be NULL",
        );
        assert_refused(
            "t",
            "SELECT certyo.track('t', record_id_columns => ARRAY[NULL]::text[])",
            "22004",
            "record_id_columns must not contain NULL",
        );
        assert_refused(
            "t",
            "SELECT certyo.track('t', exclude_columns => ARRAY['v', NULL])",
            "22004",
            "exclude_columns must not contain NULL",
        );
        sql("CREATE TEMP TABLE scratch (id int PRIMARY KEY)");
        let hint = assert_refused(
            "pg_temp.scratch",
            "SELECT certyo.track('scratch')",
            "0A000",
            "is a temporary table",
        );
        assert!(hint.contains("permanent"), "{hint}");
        let (state, message, _) = error_of("SELECT certyo.track('no_such_table')").unwrap();
        assert_eq!(
            (state.as_str(), message.as_str()),
            ("42P01", "relation \"no_such_table\" does not exist")
        );
    }

    #[pg_test]
    fn only_the_owner_may_track_and_writers_need_no_rights_on_certyo() {
        sql(
            "CREATE ROLE certyo_test_writer; CREATE TABLE t (id int PRIMARY KEY, v text);
             GRANT SELECT, INSERT, UPDATE, DELETE ON t TO certyo_test_writer;
             SET LOCAL ROLE certyo_test_writer;",
        );
        assert_refused(
            "t",
            "SELECT certyo.track('t')",
            "42501",
            "must be owner of table public.t",
        );
        sql("RESET ROLE; SELECT certyo.track('t'); SET LOCAL ROLE certyo_test_writer;
             INSERT INTO t (id, v) VALUES (1, 'written by a role without rights on schema certyo');");
        assert_refused("t", "SELECT certyo.untrack('t')", "42501", "must be owner");
        let (state, message, _) = error_of("SELECT * FROM certyo.queue").unwrap();
        assert_eq!(
            (state.as_str(), message.as_str()),
            ("42501", "permission denied for table queue")
        );
        sql("RESET ROLE");
        assert_eq!(queue_len(), 1);
    }

    #[pg_test]
    fn added_columns_are_captured_and_renamed_primary_keys_followed() {
        sql("CREATE TABLE t (id int PRIMARY KEY, v text); SELECT certyo.track('t'); INSERT INTO t VALUES (1, 'a');
             ALTER TABLE t ADD COLUMN colour text;
             UPDATE t SET colour = 'red';
             ALTER TABLE t RENAME COLUMN id TO product_id;
             UPDATE t SET v = 'b';");
        let rows = queued();
        assert_eq!(rows[1].2, r#"{"id":1,"v":"a","colour":"red"}"#);
        assert_eq!(rows[2].2, r#"{"product_id":1,"v":"b","colour":"red"}"#);
        assert_eq!(
            one::<Vec<String>>("SELECT record_id_columns FROM certyo.tracked_tables"),
            Some(vec!["product_id".to_string()])
        );
    }

    #[pg_test]
    fn dropping_a_column_the_options_name_is_refused() {
        sql("CREATE TABLE t (id int PRIMARY KEY, v text, secret text); SELECT certyo.track('t', exclude_columns => ARRAY['secret'])");
        let hint = assert_refused(
            "t",
            "ALTER TABLE t DROP COLUMN secret",
            "42703",
            "exclude column \"secret\" does not exist",
        );
        assert!(
            hint.contains("Before renaming or dropping a column"),
            "{hint}"
        );
        assert_refused(
            "t",
            "ALTER TABLE t RENAME COLUMN secret TO hidden",
            "42703",
            "\"secret\" does not exist",
        );
    }

    #[pg_test]
    fn a_disabled_capture_trigger_stays_disabled_across_alter_table() {
        sql(
            "CREATE TABLE t (id int PRIMARY KEY); SELECT certyo.track('t');
             ALTER TABLE t DISABLE TRIGGER certyo_capture; ALTER TABLE t ADD COLUMN x int;
             INSERT INTO t VALUES (1, 1);",
        );
        assert_eq!(
            one::<bool>("SELECT capturing FROM certyo.tracked_tables"),
            Some(false)
        );
        assert_eq!(queue_len(), 0);
        // ...and it fires on every UPDATE: no `UPDATE OF` list that a column could be missing from.
        assert_eq!(
            one::<String>("SELECT tgattr::text FROM pg_trigger WHERE tgname = 'certyo_capture'"),
            Some("".into())
        );
    }

    #[pg_test]
    fn the_capture_function_refuses_to_be_called_directly() {
        let (state, message, hint) = error_of("SELECT certyo.capture()").unwrap();
        assert_eq!(state, "39P01", "{message}");
        assert!(
            message.contains("can only be called as a trigger") && hint.contains("certyo.track("),
            "{message} {hint}"
        );
    }
}
