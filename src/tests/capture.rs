//! The trigger: what is queued for each kind of write, and the payload for each type.

use super::{error_of, one, queue_len, queued, sql};
use pgrx::prelude::*;

fn products() {
    sql("CREATE TABLE public.products (id int PRIMARY KEY, sku text, price numeric(12,2), secret text);
         SELECT certyo.track('public.products', exclude_columns => ARRAY['secret']);");
}

#[pg_schema]
mod tests {
    use super::*;

    #[pg_test]
    fn insert_queues_the_business_columns_with_id_operation_and_key() {
        products();
        sql("INSERT INTO products VALUES (42, 'A-1', 9.50, 'hunter2')");
        assert_eq!(
            queued(),
            vec![(
                "insert".into(),
                "42".into(),
                r#"{"id":42,"sku":"A-1","price":9.50}"#.into()
            )]
        );
        assert_eq!(
            one::<String>("SELECT collection FROM certyo.queue"),
            Some("public.products".into())
        );
        // {process: 24 hex digits of random bits}-{queue id}
        let (key, id) =
            Spi::get_two::<String, i64>("SELECT idempotency_key, id FROM certyo.queue").unwrap();
        let (process, queue_id) = key.as_deref().unwrap().split_once('-').unwrap();
        assert!(
            process.len() == 24 && process.chars().all(|c| c.is_ascii_hexdigit()),
            "{key:?}"
        );
        assert_eq!(queue_id.parse::<i64>().ok(), id);
    }

    #[pg_test]
    fn bookkeeping_excluded_and_no_op_updates_queue_nothing() {
        products();
        sql("INSERT INTO products VALUES (1, 'A', 1, 's')");
        sql("UPDATE products SET certyo_record_hash = 'sha256:ab', certyo_anchor_status = 'anchored', certyo_verified_at = now()");
        sql("UPDATE products SET secret = 'changed'");
        sql("UPDATE products SET sku = sku, price = 1.00");
        assert_eq!(queue_len(), 1);
        sql("UPDATE products SET price = 2, certyo_anchor_status = 'pending'");
        assert_eq!(
            queued()[1],
            (
                "update".into(),
                "1".into(),
                r#"{"id":1,"sku":"A","price":2.00}"#.into()
            )
        );
    }

    #[pg_test]
    fn delete_queues_the_old_row() {
        products();
        sql("INSERT INTO products VALUES (7, 'gone', 3, 's'); DELETE FROM products WHERE id = 7");
        assert_eq!(
            queued()[1],
            (
                "delete".into(),
                "7".into(),
                r#"{"id":7,"sku":"gone","price":3.00}"#.into()
            )
        );
    }

    #[pg_test]
    fn changing_the_record_id_queues_a_delete_and_an_insert() {
        products();
        sql("INSERT INTO products VALUES (1, 'A', 1, 's'); UPDATE products SET id = 2");
        let ops: Vec<(String, String)> = queued().into_iter().map(|(op, id, _)| (op, id)).collect();
        assert_eq!(
            ops,
            vec![
                ("insert".into(), "1".into()),
                ("delete".into(), "1".into()),
                ("insert".into(), "2".into())
            ]
        );
    }

    #[pg_test]
    fn a_rolled_back_savepoint_leaves_nothing_queued() {
        products();
        sql("DO $$ BEGIN
                INSERT INTO products VALUES (1, 'A', 1, 's');
                RAISE EXCEPTION 'roll back';
             EXCEPTION WHEN OTHERS THEN NULL;
             END $$");
        assert_eq!(queue_len(), 0);
        sql("INSERT INTO products VALUES (2, 'B', 1, 's')");
        assert_eq!(queued().len(), 1);
    }

    #[pg_test]
    fn truncate_is_refused_and_deletes_nothing() {
        products();
        sql("INSERT INTO products VALUES (1, 'A', 1, 's')");
        let (state, message, hint) = error_of("TRUNCATE products").unwrap();
        assert_eq!(state, "55000");
        assert!(
            message.contains("TRUNCATE of tracked table public.products is refused"),
            "{message}"
        );
        assert!(hint.contains("certyo.untrack('public.products')"), "{hint}");
        assert_eq!(one::<i64>("SELECT count(*) FROM products"), Some(1));
    }

    #[pg_test]
    fn every_change_gets_its_own_idempotency_key() {
        products();
        sql("INSERT INTO products VALUES (1, 'A', 1, 's');
             UPDATE products SET price = 2; UPDATE products SET price = 3; DELETE FROM products");
        assert_eq!(
            one::<i64>("SELECT count(DISTINCT idempotency_key) FROM certyo.queue"),
            Some(4)
        );
    }

    #[pg_test]
    fn payload_types_are_faithful_and_independent_of_session_settings() {
        sql("CREATE TYPE mood AS ENUM ('happy', 'sad');
             CREATE DOMAIN positive AS int CHECK (VALUE > 0);
             SET TimeZone = 'America/New_York'; SET DateStyle = 'SQL, DMY'; SET bytea_output = 'escape';
             SET extra_float_digits = 0; SET IntervalStyle = 'postgres';
             CREATE TABLE kinds (
                 id int PRIMARY KEY, small int2, big int8, exact numeric, real4 float4, real8 float8,
                 not_a_number float8, flag boolean, nothing text, doc jsonb, raw json,
                 grid int[], words text[], ts timestamp, tstz timestamptz, day date, span interval,
                 bin bytea, feeling mood, dom positive, uid uuid, addr inet, fixed char(3));
             SELECT certyo.track('kinds');
             INSERT INTO kinds VALUES (
                 1, -32768, 9223372036854775807, 123456789012345678901234567890.000000000001, 0.1, 0.1,
                 'NaN', true, NULL, '{\"b\": [1, {\"c\": null}], \"a\": \"x\"}', '{\"keep\" : \"as written\"}',
                 '{{1,NULL},{3,4}}', '{\"with \\\"quote\\\"\", ünï}', '2026-04-14 10:30:00.250',
                 '2026-04-14 12:30:00+02', '2026-04-14', '1 year 2 mons 3 days 04:05:06.5',
                 '\\x00ff', 'sad', 5, 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', '10.0.0.1/8', 'ab');");
        let payload = &queued()[0].2;
        let expected = concat!(
            r#"{"id":1,"small":-32768,"big":9223372036854775807,"exact":123456789012345678901234567890.000000000001,"#,
            r#""real4":0.1,"real8":0.1,"not_a_number":"NaN","flag":true,"nothing":null,"#,
            r#""doc":{"a": "x", "b": [1, {"c": null}]},"raw":{"keep" : "as written"},"#,
            r#""grid":[[1,null],[3,4]],"words":["with \"quote\"","ünï"],"ts":"2026-04-14T10:30:00.25","#,
            r#""tstz":"2026-04-14T10:30:00Z","day":"2026-04-14","span":"P1Y2M3DT4H5M6.5S","#,
            r#""bin":"\\x00ff","feeling":"sad","dom":5,"uid":"a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11","#,
            r#""addr":"10.0.0.1/8","fixed":"ab "}"#
        );
        assert_eq!(payload, expected);
        // Postgres itself must read it back as the same JSON.
        assert_eq!(
            one::<bool>("SELECT payload::jsonb->'doc'->'b'->1 = '{\"c\": null}' FROM certyo.queue"),
            Some(true)
        );
    }

    #[pg_test]
    fn values_rendered_by_output_functions_are_the_same_under_every_session_setting() {
        sql("CREATE TYPE stamp AS (at timestamptz, span interval, raw bytea, ratio float8);
             CREATE TABLE shaped (id int PRIMARY KEY, during tstzrange, days daterange, local tsrange,
                 many tstzmultirange, stamp stamp, stamps stamp[], spot point, clock timetz);
             SELECT certyo.track('shaped');");
        let settings = [
            "SET TimeZone = 'UTC'; SET DateStyle = 'ISO, YMD'; SET IntervalStyle = 'postgres';
             SET extra_float_digits = 1; SET bytea_output = 'hex'",
            "SET TimeZone = 'America/New_York'; SET DateStyle = 'SQL, DMY'; SET IntervalStyle = 'sql_standard';
             SET extra_float_digits = 0; SET bytea_output = 'escape'",
            "SET TimeZone = 'Asia/Kolkata'; SET DateStyle = 'German'; SET IntervalStyle = 'postgres_verbose';
             SET extra_float_digits = 3; SET bytea_output = 'hex'",
        ];
        for (i, set) in settings.iter().enumerate() {
            sql(&format!(
                "{set}; INSERT INTO shaped VALUES ({}, '[2026-04-14 12:30:00+02, 2026-04-15 00:00:00+00)',
                 '[2026-04-14,2026-05-01)', '(2026-04-14 10:30,)', '{{[2026-01-01 00:00+00, 2026-01-02 00:00+00)}}',
                 ROW('2026-04-14 12:30:00+02', '1 day 02:00:00', '\\x00ff', 0.1)::stamp,
                 ARRAY[ROW('2026-04-14 12:30:00+02', '-1 mons', '\\x01', 1e100)::stamp],
                 point(0.1, 2.5), '10:30:00+02')",
                i + 1
            ));
        }
        // The session's own settings are untouched by the capture that pinned them.
        assert_eq!(
            one::<String>("SHOW DateStyle").as_deref(),
            Some("German, DMY")
        );
        assert_eq!(
            one::<String>("SELECT '1 day'::interval::text").as_deref(),
            Some("@ 1 day")
        );
        let payloads: Vec<String> = queued()
            .into_iter()
            .map(|(_, id, payload)| payload.replacen(&format!("{{\"id\":{id},"), "{", 1))
            .collect();
        assert_eq!(
            payloads[0], payloads[1],
            "another TimeZone, DateStyle, IntervalStyle, ..."
        );
        assert_eq!(payloads[0], payloads[2], "a third combination");
        assert!(
            payloads[0]
                .contains(r#""during":"[\"2026-04-14 10:30:00+00\",\"2026-04-15 00:00:00+00\")""#),
            "{}",
            payloads[0]
        );
    }

    #[pg_test]
    fn column_names_are_kept_exactly_including_quotes_and_unicode() {
        sql(
            r#"CREATE TABLE "Odd ""Names""" ("Id" int PRIMARY KEY, "Straße" text, "a\b" int);
               SELECT certyo.track('"Odd ""Names"""');
               INSERT INTO "Odd ""Names""" VALUES (1, 'x', 2);"#,
        );
        let (_, id, payload) = queued().remove(0);
        assert_eq!(id, "1");
        assert_eq!(payload, r#"{"Id":1,"Straße":"x","a\\b":2}"#);
        // A name part holding a quote (or a dot) is quoted in the collection, so that no two
        // tables share one (see `capture::plan::collection_name`).
        assert_eq!(
            one::<String>("SELECT collection FROM certyo.queue"),
            Some(r#"public."Odd ""Names""""#.into())
        );
    }

    #[pg_test]
    fn composite_record_ids_join_escaped_parts_with_slashes() {
        sql(
            "CREATE TABLE stock (region text, sku text, qty int, PRIMARY KEY (region, sku));
             SELECT certyo.track('stock');
             INSERT INTO stock VALUES ('EU/West', 'A\\1', 5);",
        );
        assert_eq!(queued()[0].1, r"EU\/West/A\\1");
    }

    #[pg_test]
    fn source_timestamp_comes_from_the_timestamp_column_or_the_transaction() {
        sql("SET TimeZone = 'UTC';
             CREATE TABLE t (id int PRIMARY KEY, modified_at timestamp, note text);
             SELECT certyo.track('t');
             INSERT INTO t VALUES (1, '2020-01-02 03:04:05', 'a'), (2, NULL, 'b');");
        assert_eq!(
            one::<String>("SELECT source_timestamp::text FROM certyo.queue WHERE record_id = '1'"),
            Some("2020-01-02 03:04:05+00".into())
        );
        assert_eq!(one::<bool>("SELECT source_timestamp = transaction_timestamp() FROM certyo.queue WHERE record_id = '2'"), Some(true));
    }

    #[pg_test]
    fn large_values_are_read_through_toast() {
        products();
        sql(
            "INSERT INTO products VALUES (1, repeat('x', 100000), 1, 's');
             UPDATE products SET certyo_record_hash = 'h';
             UPDATE products SET price = 2;",
        );
        assert_eq!(queue_len(), 2);
        assert_eq!(
            one::<i32>(
                "SELECT length(payload->>'sku') FROM certyo.queue WHERE operation = 'update'"
            ),
            Some(100000)
        );
    }

    #[pg_test]
    fn a_chosen_record_id_column_cannot_lose_not_null_while_tracked() {
        sql("CREATE TABLE t (code text NOT NULL UNIQUE, note text); SELECT certyo.track('t', record_id_columns => ARRAY['code']);");
        let (state, message, _) =
            error_of("ALTER TABLE t ALTER COLUMN code DROP NOT NULL").unwrap();
        assert_eq!(state, "22023");
        assert!(
            message.contains("record id column \"code\" of public.t may be NULL"),
            "{message}"
        );
        assert_eq!(one::<bool>("SELECT attnotnull FROM pg_attribute WHERE attrelid = 't'::regclass AND attname = 'code'"), Some(true));
    }
}
