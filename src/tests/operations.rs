//! The operator surface inside one transaction: pause/resume, retry, verify_now, history,
//! status, the tamper audit and backfill chunks. What needs the worker (sending, anchoring,
//! resuming a backfill after a restart) is covered by `pg_test/test_operations.py`.

use super::{error_of, one, queue_len, queued, sql};
use pgrx::prelude::*;

/// Pretend the worker delivered everything queued: move it to receipts, with the SHA-256 of
/// the payload computed by Postgres (so the audit's Rust hash is checked against another).
fn accept_all() {
    sql("WITH moved AS (DELETE FROM certyo.queue RETURNING *)
         INSERT INTO certyo.receipt (id, relid, collection, record_id, operation, source_timestamp,
                                     idempotency_key, queued_at, attempts, accepted_at, record_hash,
                                     replayed, payload_sha256, next_verify_at, table_id)
         SELECT id, relid, collection, record_id, operation, source_timestamp, idempotency_key, queued_at,
                1, now(), 'sha256:' || id, false, sha256(convert_to(payload::text, 'UTF8')), now() + interval '2 min', table_id
           FROM moved");
}

fn audit(table: &str) -> Vec<(String, String)> {
    Spi::connect(|client| {
        client
            .select(
                &format!("SELECT record_id, problem FROM certyo.audit('{table}') ORDER BY 1"),
                None,
                &[],
            )
            .unwrap()
            .map(|r| {
                (
                    r.get::<String>(1).unwrap().unwrap(),
                    r.get::<String>(2).unwrap().unwrap(),
                )
            })
            .collect()
    })
}

fn pairs(items: &[(&str, &str)]) -> Vec<(String, String)> {
    items
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

#[pg_schema]
mod tests {
    use super::*;

    #[pg_test]
    fn pause_and_resume_flip_the_switch_the_worker_reads() {
        sql("SELECT certyo.pause()");
        assert_eq!(
            one::<bool>("SELECT paused FROM certyo.worker_status()"),
            Some(true)
        );
        sql("SELECT certyo.resume()");
        assert_eq!(
            one::<bool>("SELECT paused FROM certyo.worker_status()"),
            Some(false)
        );
        // Without preloading there is no worker to wake, and the answer says so.
        assert_eq!(one::<bool>("SELECT certyo.wake()"), Some(false));
    }

    #[pg_test]
    fn retry_revives_dead_letters_all_by_table_or_by_id() {
        sql("CREATE TABLE a (id int PRIMARY KEY); CREATE TABLE b (id int PRIMARY KEY);
             INSERT INTO certyo.delivery (id, relid, collection, record_id, operation, payload, source_timestamp,
                                          idempotency_key, queued_at, state, attempts, next_attempt_at, last_status, last_error, table_id)
             SELECT g, CASE WHEN g <= 2 THEN 'a'::regclass ELSE 'b'::regclass END, 'public.x', g::text, 'insert', '{}',
                    now(), 'k' || g, now(), 'dead', 1, 'infinity', 422, 'bad', 0
               FROM generate_series(1, 5) g");
        assert_eq!(one::<i64>("SELECT certyo.retry(ids => ARRAY[5])"), Some(1));
        assert_eq!(one::<i64>("SELECT certyo.retry('a')"), Some(2));
        assert_eq!(one::<i64>("SELECT certyo.retry()"), Some(2));
        assert_eq!(one::<i64>("SELECT certyo.retry()"), Some(0));
        assert_eq!(
            one::<i64>("SELECT count(*) FROM certyo.delivery WHERE state = 'pending' AND next_attempt_at = '-infinity'"),
            Some(5)
        );
    }

    #[pg_test]
    fn history_lists_every_version_and_status_counts_them() {
        sql(
            "CREATE TABLE t (id int PRIMARY KEY, v text); SELECT certyo.track('t');
             INSERT INTO t (id, v) VALUES (1, 'a'), (2, 'b');",
        );
        accept_all();
        sql("UPDATE t SET v = 'a2' WHERE id = 1;
             UPDATE certyo.receipt SET anchor_status = 'anchored', polygon_tx_hash = '0xabc', next_verify_at = NULL
              WHERE record_id = '1';");
        let history: Vec<(String, String, Option<String>)> = Spi::connect(|client| {
            client
                .select(
                    "SELECT operation, state, anchor_status FROM certyo.history('t', '1')",
                    None,
                    &[],
                )
                .unwrap()
                .map(|r| {
                    (
                        r.get(1).unwrap().unwrap(),
                        r.get(2).unwrap().unwrap(),
                        r.get(3).unwrap(),
                    )
                })
                .collect()
        });
        assert_eq!(
            history,
            vec![
                ("insert".into(), "accepted".into(), Some("anchored".into())),
                ("update".into(), "queued".into(), None)
            ]
        );
        assert_eq!(
            one::<String>("SELECT format('%s/%s/%s/%s', queued, awaiting_anchor, anchored, mismatched) FROM certyo.status WHERE \"table\" = 't'::regclass"),
            Some("1/1/1/0".into())
        );
        assert_eq!(one::<i64>("SELECT certyo.verify_now('t')"), Some(1));
        assert_eq!(one::<i64>("SELECT certyo.verify_now('t', '2')"), Some(1));
        assert_eq!(one::<i64>("SELECT certyo.verify_now('t', '1')"), Some(0)); // anchored already
    }

    #[pg_test]
    fn audit_is_empty_for_a_clean_table_and_finds_changes_behind_captures_back() {
        // The two-step write-back, which this test plays by hand (no worker here).
        sql("CREATE TABLE t (id int PRIMARY KEY, v text, n numeric, at timestamptz); SELECT certyo.track('t', write_back => 'accepted');
             INSERT INTO t (id, v, n, at) SELECT g, 'v' || g, g / 3.0, '2026-01-01'::timestamptz + g * interval '1 h'
               FROM generate_series(1, 6) g;");
        assert_eq!(
            audit("t"),
            pairs(&[
                ("1", "not yet accepted"),
                ("2", "not yet accepted"),
                ("3", "not yet accepted"),
                ("4", "not yet accepted"),
                ("5", "not yet accepted"),
                ("6", "not yet accepted")
            ])
        );
        accept_all();
        // The worker writes each hash back with its receipt; this test has no worker.
        sql(
            "UPDATE t SET certyo_record_hash = r.record_hash FROM certyo.receipt r
              WHERE r.relid = 't'::regclass AND r.record_id = t.id::text",
        );
        assert_eq!(audit("t"), vec![], "a clean table");
        // Bookkeeping only, so not captured; but Certyo confirmed no anchoring yet.
        sql("UPDATE t SET certyo_anchor_status = 'anchored' WHERE id = 1");
        assert_eq!(
            audit("t"),
            pairs(&[("1", "anchor status changed without capture")])
        );
        sql("UPDATE certyo.receipt SET anchor_status = 'anchored' WHERE relid = 't'::regclass AND record_id = '1'");
        assert_eq!(audit("t"), vec![], "once Certyo confirmed it");
        sql("UPDATE t SET certyo_record_hash = 'sha256:forged' WHERE id = 6");
        assert_eq!(
            audit("t"),
            pairs(&[("6", "record hash changed without capture")])
        );
        sql(
            "UPDATE t SET certyo_record_hash = r.record_hash FROM certyo.receipt r
              WHERE r.relid = 't'::regclass AND r.record_id = t.id::text",
        );
        sql("ALTER TABLE t DISABLE TRIGGER certyo_capture;
             UPDATE t SET v = 'forged' WHERE id = 2;
             DELETE FROM t WHERE id = 3;
             INSERT INTO t (id, v) VALUES (7, 'smuggled');
             ALTER TABLE t ENABLE TRIGGER certyo_capture;
             SET LOCAL session_replication_role = replica;
             UPDATE t SET n = 0 WHERE id = 4;
             SET LOCAL session_replication_role = origin;
             UPDATE t SET v = 'legit' WHERE id = 5;");
        assert_eq!(
            audit("t"),
            pairs(&[
                ("2", "changed without capture"),
                ("3", "deleted without capture"),
                ("4", "changed without capture"),
                ("5", "not yet accepted"),
                ("7", "never captured")
            ])
        );
        let (state, message, _) = error_of("SELECT * FROM certyo.audit('pg_class')").unwrap();
        assert_eq!(
            (state.as_str(), message.contains("not tracked")),
            ("55000", true)
        );
    }

    #[pg_test]
    fn a_fast_default_column_is_captured_with_its_default() {
        sql("CREATE TABLE t (id int PRIMARY KEY); SELECT certyo.track('t'); INSERT INTO t VALUES (1);
             ALTER TABLE t ADD COLUMN c int DEFAULT 5;
             DELETE FROM certyo.queue; UPDATE t SET id = id WHERE id = 1; DELETE FROM t;");
        assert_eq!(queued().last().unwrap().2, r#"{"id":1,"c":5}"#);
    }

    #[pg_test]
    fn backfill_requests_are_validated_as_the_caller() {
        sql(
            "CREATE TABLE t (id int PRIMARY KEY, v text); CREATE TABLE u (id int PRIMARY KEY);
             SELECT certyo.track('t');",
        );
        let refused = |call: &str, code: &str, needle: &str| {
            let (state, message, hint) =
                error_of(call).unwrap_or_else(|| panic!("{call} succeeded"));
            assert_eq!(state, code, "{call}: {message}");
            assert!(message.contains(needle), "{call}: {message}");
            hint
        };
        let hint = refused("SELECT certyo.backfill('u')", "55000", "not tracked");
        assert!(hint.contains("certyo.track('public.u')"), "{hint}");
        // A condition is one expression: nothing it holds may close, comment out or extend
        // the query it is placed in.
        for injection in [
            "id > 1); DROP TABLE u; SELECT (1",
            "1=1) OR (true",
            "true) --",
            "true; DROP TABLE u",
            "true) UNION SELECT (1",
            "true ORDER BY 1",
            "true LIMIT 1",
            "true FOR UPDATE",
            "true GROUP BY id",
            "/* unterminated",
            "id = = 1",
        ] {
            let call = format!("SELECT certyo.backfill('t', {})", quote(injection));
            let (state, _, _) = error_of(&call).unwrap_or_else(|| panic!("{call} succeeded"));
            assert_eq!(state, "42601", "{call}");
        }
        refused("SELECT certyo.backfill('t', 'id')", "42804", "boolean");
        refused(
            "SELECT certyo.backfill('t', 'count(*) > 0')",
            "42803",
            "aggregate",
        );
        refused("SELECT certyo.backfill('t', 'nope > 1')", "42703", "nope");
        refused("SELECT certyo.backfill(NULL)", "22004", "must not be NULL");
        sql("CREATE ROLE certyo_test_stranger; GRANT USAGE ON SCHEMA public TO certyo_test_stranger;
             SET LOCAL ROLE certyo_test_stranger;");
        refused("SELECT certyo.backfill('t')", "42501", "must be owner");
        sql("RESET ROLE");
        assert_eq!(
            one::<i64>("SELECT count(*) FROM certyo.backfills"),
            Some(0),
            "refusals record nothing"
        );
        let id =
            one::<i64>("SELECT certyo.backfill('t', 'id % 2 = 0 OR t.v IS NULL -- note')").unwrap();
        assert_eq!(
            one::<String>("SELECT state || ': ' || where_clause FROM certyo.backfills"),
            Some("queued: (((id % 2) = 0) OR (v IS NULL))".into()),
            "stored as Postgres deparses it: one parenthesized expression"
        );
        assert_eq!(
            one::<bool>("SELECT requested_by = current_user::regrole FROM certyo.backfills"),
            Some(true),
            "requested_by is the caller, not the superuser the request is recorded as"
        );
        let cancel = format!("SELECT certyo.cancel_backfill({id})");
        assert_eq!(one::<bool>(&cancel), Some(true));
        assert_eq!(one::<bool>(&cancel), Some(false), "only once");
        assert_eq!(
            one::<String>("SELECT state FROM certyo.backfills"),
            Some("cancelled".into())
        );
    }

    #[pg_test]
    fn backfill_chunks_queue_matching_rows_in_key_order_and_resume_after_the_last_key() {
        sql("CREATE TABLE t (region text, id int, v text, PRIMARY KEY (region, id));
             INSERT INTO t SELECT CASE WHEN g % 2 = 0 THEN 'EU' ELSE 'US' END, g, 'v' || g FROM generate_series(1, 9) g;
             SELECT certyo.track('t');");
        let id = one::<i64>("SELECT certyo.backfill('t', 'id <> 4')").unwrap();
        let job = || crate::backfill::Job {
            id,
            relid: one::<pgrx::pg_sys::Oid>("SELECT 't'::regclass::oid").unwrap(),
            where_clause: Some("id <> 4".into()),
            requested_by: one::<pgrx::pg_sys::Oid>("SELECT current_user::regrole::oid").unwrap(),
            last_key: one::<Vec<String>>(&format!(
                "SELECT last_key FROM certyo.backfills WHERE id = {id}"
            )),
        };
        let mut sizes = Vec::new();
        loop {
            let n = crate::backfill::queue_chunk(&job(), 3).unwrap();
            sizes.push(n);
            if n < 3 {
                break;
            }
        }
        assert_eq!(sizes, vec![3, 3, 2]);
        let ids: Vec<String> = queued()
            .iter()
            .map(|q| format!("{}:{}", q.0, q.1))
            .collect();
        assert_eq!(
            ids,
            ["EU/2", "EU/6", "EU/8", "US/1", "US/3", "US/5", "US/7", "US/9"]
                .map(|r| format!("upsert:{r}"))
        );
        assert_eq!(
            one::<String>(&format!("SELECT format('%s %s %s', state, rows_queued, last_key) FROM certyo.backfills WHERE id = {id}")),
            Some("done 8 {US,9}".into())
        );
        assert_eq!(queue_len(), 8);
    }

    #[pg_test]
    fn operator_functions_are_not_for_everyone() {
        assert_eq!(error_of("SELECT 1"), None);
        sql("CREATE ROLE certyo_test_clerk; CREATE ROLE certyo_test_operator;
             GRANT SELECT ON certyo.status TO certyo_test_operator;
             GRANT EXECUTE ON FUNCTION certyo.pause(), certyo.worker_status() TO certyo_test_operator;
             SET LOCAL ROLE certyo_test_clerk;");
        for call in [
            "SELECT certyo.pause()",
            "SELECT * FROM certyo.status",
            "SELECT * FROM certyo.worker_status()",
            "SELECT * FROM certyo.history('pg_class', '1')",
            "SELECT certyo.retry()",
        ] {
            let (state, _, _) = error_of(call).unwrap_or_else(|| panic!("{call} succeeded"));
            assert_eq!(state, "42501", "{call}");
        }
        sql("RESET ROLE; SET LOCAL ROLE certyo_test_operator; SELECT certyo.pause();");
        assert_eq!(
            one::<bool>("SELECT paused FROM certyo.worker_status()"),
            Some(true)
        );
        assert_eq!(one::<i64>("SELECT count(*) FROM certyo.status"), Some(0));
        assert!(
            error_of("SELECT count(*) FROM certyo.receipt").is_some(),
            "receipts stay private"
        );
        sql("RESET ROLE");
    }

    fn quote(text: &str) -> String {
        format!("'{}'", text.replace('\'', "''"))
    }
}
