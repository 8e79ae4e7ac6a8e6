-- The operator surface: status, worker control, dead letters, verification, history, backfill
-- and the tamper audit. Documented in docs/operations.md ("Operating certyo_cdc").
--
-- Rights: every function here runs with the extension owner's rights (SECURITY DEFINER, with a
-- fixed search_path) and is revoked from PUBLIC; an operator role is granted them explicitly
-- (docs/operations.md shows the grant). None returns a payload or the API key.

-- Per table: where its changes are. "in_flight" entries were taken by the worker and not yet
-- answered; "waiting_retry" failed transiently and wait for their next attempt.
CREATE VIEW certyo.status AS
WITH queued AS (
    SELECT relid, count(*) AS n, min(queued_at) AS oldest FROM certyo.queue GROUP BY relid
), delivering AS (
    SELECT relid,
           count(*) FILTER (WHERE state = 'pending' AND attempts = 0) AS in_flight,
           count(*) FILTER (WHERE state = 'pending' AND attempts > 0) AS waiting_retry,
           count(*) FILTER (WHERE state = 'dead')                     AS dead,
           min(queued_at) FILTER (WHERE state = 'pending')            AS oldest,
           (array_agg(last_error ORDER BY last_attempt_at DESC) FILTER (WHERE last_error IS NOT NULL))[1] AS last_error,
           max(last_attempt_at) FILTER (WHERE last_error IS NOT NULL) AS last_error_at
      FROM certyo.delivery GROUP BY relid
), receipts AS (
    SELECT relid,
           count(*) FILTER (WHERE anchor_status = 'pending')  AS awaiting_anchor,
           count(*) FILTER (WHERE anchor_status = 'overdue')  AS overdue,
           count(*) FILTER (WHERE anchor_status = 'anchored') AS anchored,
           count(*) FILTER (WHERE anchor_status = 'mismatch') AS mismatched,
           max(accepted_at)      AS last_delivery_at,
           max(last_verified_at) AS last_verified_at
      FROM certyo.receipt GROUP BY relid
), backfill AS (
    SELECT DISTINCT ON (relid) relid, state, rows_queued FROM certyo.backfills ORDER BY relid, id DESC
), tables AS (
    SELECT "table"::oid AS relid FROM certyo.tracked_tables
    UNION SELECT relid FROM queued UNION SELECT relid FROM delivering UNION SELECT relid FROM receipts
    UNION SELECT relid FROM certyo.write_back_failure
)
SELECT t.relid::regclass                           AS "table",
       coalesce(tt.capturing, false)               AS capturing,
       coalesce(q.n, 0)                            AS queued,
       coalesce(d.in_flight, 0)                    AS in_flight,
       coalesce(d.waiting_retry, 0)                AS waiting_retry,
       coalesce(d.dead, 0)                         AS dead_letters,
       coalesce(r.awaiting_anchor, 0)              AS awaiting_anchor,
       coalesce(r.overdue, 0)                      AS overdue,
       coalesce(r.anchored, 0)                     AS anchored,
       coalesce(r.mismatched, 0)                   AS mismatched,
       now() - least(q.oldest, d.oldest)           AS oldest_queued_age,
       d.last_error,
       d.last_error_at,
       r.last_delivery_at,
       r.last_verified_at,
       b.state                                     AS backfill_state,
       b.rows_queued                               AS backfill_rows_queued,
       wf.error                                    AS write_back_error,
       wf.since                                    AS write_back_failing_since
  FROM tables t
  LEFT JOIN certyo.tracked_tables tt ON tt."table"::oid = t.relid
  LEFT JOIN queued q ON q.relid = t.relid
  LEFT JOIN delivering d ON d.relid = t.relid
  LEFT JOIN receipts r ON r.relid = t.relid
  LEFT JOIN backfill b ON b.relid = t.relid
  LEFT JOIN certyo.write_back_failure wf ON wf.relid = t.relid;
COMMENT ON VIEW certyo.status IS 'certyo_cdc: per tracked table, where its changes are';
REVOKE ALL ON certyo.status FROM PUBLIC;

-- Passes the worker has run since the server started (shared memory; NULL without preloading):
-- an idle worker adds about one per certyo.poll_interval.
CREATE FUNCTION certyo.worker_passes() RETURNS bigint
    LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'worker_passes_wrapper';

CREATE FUNCTION certyo.worker_status(
    OUT running boolean, OUT pid integer, OUT configured boolean, OUT paused boolean,
    OUT state text, OUT detail text, OUT last_error text, OUT last_error_at timestamptz,
    OUT last_delivery_at timestamptz, OUT last_verified_at timestamptz,
    OUT sent bigint, OUT accepted bigint, OUT replayed bigint, OUT failed bigint,
    OUT anchored bigint, OUT mismatched bigint, OUT pending bigint, OUT dead bigint, OUT passes bigint)
LANGUAGE sql STABLE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT a.pid IS NOT NULL,
           a.pid,
           w.state IS DISTINCT FROM 'not configured'
               AND (coalesce(current_setting('certyo.api_key_file', true), '') <> ''
                    OR coalesce(current_setting('certyo.api_key', true), '') <> '')
               AND coalesce(current_setting('certyo.tenant_id', true), '') <> '',
           coalesce(w.paused, false),
           CASE WHEN current_setting('shared_preload_libraries') !~ 'certyo_cdc' THEN 'not delivering'
                WHEN a.pid IS NULL THEN 'not running'
                ELSE w.state END,
           CASE WHEN current_setting('shared_preload_libraries') !~ 'certyo_cdc'
                    THEN 'certyo_cdc is not in shared_preload_libraries, so no worker delivers the queue: '
                         'add it (ALTER SYSTEM SET shared_preload_libraries = ''certyo_cdc'') and restart PostgreSQL'
                WHEN a.pid IS NULL AND coalesce(current_setting('certyo.database_name', true), '') NOT IN ('', current_database())
                    THEN 'certyo.database_name = ' || current_setting('certyo.database_name', true)
                         || ' restricts delivery to that database: empty it (ALTER SYSTEM RESET certyo.database_name) and restart PostgreSQL to deliver this one'
                WHEN a.pid IS NULL
                    THEN 'no delivery worker serves this database: one starts within seconds of CREATE EXTENSION; '
                         'if none does, the server log says why (certyo.max_databases, max_worker_processes)' 
                ELSE w.detail END,
           w.last_error, w.last_error_at, w.last_delivery_at, w.last_verified_at,
           coalesce(w.sent, 0), coalesce(w.accepted, 0), coalesce(w.replayed, 0), coalesce(w.failed, 0),
           coalesce(w.anchored, 0), coalesce(w.mismatched, 0),
           (SELECT count(*) FROM certyo.queue) + (SELECT count(*) FROM certyo.delivery d WHERE d.state = 'pending'),
           (SELECT count(*) FROM certyo.delivery d WHERE d.state = 'dead'),
           certyo.worker_passes()
      FROM (SELECT) AS one
      LEFT JOIN certyo.worker_state w ON true
      LEFT JOIN pg_catalog.pg_stat_activity a ON a.pid = w.pid AND a.backend_type = 'certyo_cdc delivery'
$$;
COMMENT ON FUNCTION certyo.worker_status() IS 'certyo_cdc: is the delivery worker running, configured, paused; what it did';

-- Rings the worker's doorbell: a pass runs now (and again when the caller's transaction commits).
CREATE FUNCTION certyo.wake() RETURNS boolean
    LANGUAGE c VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp
    AS 'MODULE_PATHNAME', 'wake_wrapper';
COMMENT ON FUNCTION certyo.wake() IS 'certyo_cdc: run a delivery pass now; false when no worker runs';

CREATE FUNCTION certyo.pause() RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    UPDATE certyo.worker_state SET paused = true;
    PERFORM certyo.wake();
END
$$;
COMMENT ON FUNCTION certyo.pause() IS 'certyo_cdc: stop sending and verifying (capture continues) until certyo.resume()';

CREATE FUNCTION certyo.resume() RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    UPDATE certyo.worker_state SET paused = false;
    PERFORM certyo.wake();
END
$$;
COMMENT ON FUNCTION certyo.resume() IS 'certyo_cdc: resume after certyo.pause(); the backlog is delivered';

-- Dead letters back to pending: all of them, one table's, or the given delivery ids.
CREATE FUNCTION certyo.retry(rel regclass DEFAULT NULL, ids bigint[] DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    revived bigint;
BEGIN
    UPDATE certyo.delivery
       SET state = 'pending', next_attempt_at = '-infinity'
     WHERE state = 'dead'
       AND (rel IS NULL OR relid = rel::oid)
       AND (ids IS NULL OR id = ANY (ids));
    GET DIAGNOSTICS revived = ROW_COUNT;
    PERFORM certyo.wake();
    RETURN revived;
END
$$;
COMMENT ON FUNCTION certyo.retry(regclass, bigint[]) IS 'certyo_cdc: send dead letters again (all, one table''s, or these ids)';

-- Verify accepted receipts at the next pass, whatever their schedule.
CREATE FUNCTION certyo.verify_now(rel regclass DEFAULT NULL, record_id text DEFAULT NULL) RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    scheduled bigint;
BEGIN
    UPDATE certyo.receipt r
       SET next_verify_at = now()
     WHERE r.anchor_status IN ('pending', 'overdue')
       AND (verify_now.rel IS NULL OR r.relid = verify_now.rel::oid)
       AND (verify_now.record_id IS NULL OR r.record_id = verify_now.record_id);
    GET DIAGNOSTICS scheduled = ROW_COUNT;
    PERFORM certyo.wake();
    RETURN scheduled;
END
$$;
COMMENT ON FUNCTION certyo.verify_now(regclass, text) IS 'certyo_cdc: verify accepted, not yet anchored receipts at the next pass';

-- Every version of one record that was captured, oldest first: the audit trail.
CREATE FUNCTION certyo.history(rel regclass, record_id text)
RETURNS TABLE (id bigint, operation text, source_timestamp timestamptz, queued_at timestamptz,
               state text, attempts integer, last_error text, accepted_at timestamptz,
               record_hash text, replayed boolean, anchor_status text, polygon_tx_hash text,
               anchored_at timestamptz, last_verified_at timestamptz)
LANGUAGE sql VOLATILE STRICT SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT certyo.relink_restored();  -- a restored database's tables are found first (by table id)
    SELECT * FROM (
        SELECT q.id, q.operation, q.source_timestamp, q.queued_at, 'queued', 0, NULL::text,
               NULL::timestamptz, NULL::text, NULL::boolean, NULL::text, NULL::text, NULL::timestamptz, NULL::timestamptz
          FROM certyo.queue q WHERE q.relid = $1::oid AND q.record_id = $2
           AND q.table_id IN (SELECT i.id FROM certyo.table_identity i WHERE i.relid = $1::oid)
        UNION ALL
        SELECT d.id, d.operation, d.source_timestamp, d.queued_at, d.state, d.attempts, d.last_error,
               NULL, NULL, NULL, NULL, NULL, NULL, NULL
          FROM certyo.delivery d WHERE d.relid = $1::oid AND d.record_id = $2
           AND d.table_id IN (SELECT i.id FROM certyo.table_identity i WHERE i.relid = $1::oid)
        UNION ALL
        SELECT r.id, r.operation, r.source_timestamp, r.queued_at, 'accepted', r.attempts, r.verify_error,
               r.accepted_at, r.record_hash, r.replayed, r.anchor_status, r.polygon_tx_hash, r.anchored_at, r.last_verified_at
          FROM certyo.receipt r WHERE r.relid = $1::oid AND r.record_id = $2
           AND r.table_id IN (SELECT i.id FROM certyo.table_identity i WHERE i.relid = $1::oid)
    ) AS versions
    ORDER BY 1
$$;
COMMENT ON FUNCTION certyo.history(regclass, text) IS 'certyo_cdc: every captured version of one record, with its receipt and anchor';

-- Each record's newest captured version and what Certyo said of it, from the worker's own
-- tables: what the bookkeeping columns would show, for tables tracked with write_back => 'none'
-- above all. Records of the table's present record key; a record whose newest version is a
-- delete is gone and not listed. Whether a row still holds that version is certyo.audit()'s
-- question, not this one's.
CREATE FUNCTION certyo.record_status(rel regclass)
RETURNS TABLE (record_id text, id bigint, state text, record_hash text, anchor_status text,
               accepted_at timestamptz, anchored_at timestamptz)
LANGUAGE plpgsql VOLATILE STRICT SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    identity integer;
BEGIN
    PERFORM certyo.relink_restored();  -- a restored database's tables are found first (by table id)
    SELECT certyo.capture_table_id(t.tgargs) INTO identity
      FROM pg_catalog.pg_trigger t
     WHERE t.tgrelid OPERATOR(pg_catalog.=) rel::oid AND t.tgname OPERATOR(pg_catalog.=) 'certyo_capture'
       AND t.tgparentid OPERATOR(pg_catalog.=) 0
       AND t.tgfoid OPERATOR(pg_catalog.=) 'certyo.capture()'::pg_catalog.regprocedure;
    IF NOT FOUND THEN
        IF EXISTS (SELECT FROM pg_catalog.pg_trigger t
                    WHERE t.tgrelid OPERATOR(pg_catalog.=) rel::oid AND t.tgname OPERATOR(pg_catalog.=) 'certyo_capture'
                      AND t.tgparentid OPERATOR(pg_catalog.<>) 0) THEN
            RAISE EXCEPTION 'certyo_cdc: table % is a partition of a tracked table', rel
                USING ERRCODE = 'object_not_in_prerequisite_state',
                      DETAIL = 'Its rows are captured as records of the partitioned table that is tracked.',
                      HINT = 'Ask for the partitioned table''s records: certyo.record_status(''<the partitioned table>'').';
        END IF;
        RAISE EXCEPTION 'certyo_cdc: table % is not tracked', rel
            USING ERRCODE = 'object_not_in_prerequisite_state',
                  DETAIL = 'record_status() lists the records of a table tracked with certyo.track().',
                  HINT = 'certyo.tracked_tables lists the tracked tables; certyo.history() shows what was captured of a record before.';
    END IF;
    RETURN QUERY
    SELECT n.record_id, n.id, n.state, n.record_hash, n.anchor_status, n.accepted_at, n.anchored_at
      FROM (SELECT DISTINCT ON (v.record_id) v.*
              FROM (SELECT q.record_id, q.id, q.operation, 'queued'::text AS state, NULL::text AS record_hash,
                           NULL::text AS anchor_status, NULL::timestamptz AS accepted_at, NULL::timestamptz AS anchored_at
                      FROM certyo.queue q
                     WHERE q.relid OPERATOR(pg_catalog.=) rel::oid AND q.table_id OPERATOR(pg_catalog.=) identity
                    UNION ALL
                    SELECT d.record_id, d.id, d.operation, d.state, NULL, NULL, NULL, NULL
                      FROM certyo.delivery d
                     WHERE d.relid OPERATOR(pg_catalog.=) rel::oid AND d.table_id OPERATOR(pg_catalog.=) identity
                    UNION ALL
                    SELECT r.record_id, r.id, r.operation, 'accepted', r.record_hash, r.anchor_status, r.accepted_at, r.anchored_at
                      FROM certyo.receipt r
                     WHERE r.relid OPERATOR(pg_catalog.=) rel::oid AND r.table_id OPERATOR(pg_catalog.=) identity) AS v
             ORDER BY v.record_id, v.id DESC) AS n
     WHERE n.operation OPERATOR(pg_catalog.<>) 'delete'
     ORDER BY n.record_id;
END
$$;
COMMENT ON FUNCTION certyo.record_status(regclass) IS
    'certyo_cdc: each record''s newest captured version, its hash and anchor status, from the receipts';

-- Queue the table's current rows (all, or those matching where_clause) as upserts; performed by
-- the worker in chunks. Returns the backfill's id (see certyo.backfills and certyo.status).
CREATE FUNCTION certyo.backfill(rel regclass, where_clause text DEFAULT NULL) RETURNS bigint
    LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'backfill_wrapper';
COMMENT ON FUNCTION certyo.backfill(regclass, text) IS
    'certyo_cdc: queue current rows (all or matching a condition) as upserts, in chunks, by the worker';

CREATE FUNCTION certyo.cancel_backfill(backfill_id bigint) RETURNS boolean
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    UPDATE certyo.backfills SET state = 'cancelled', finished_at = now(), updated_at = now()
     WHERE id = backfill_id AND state IN ('queued', 'running');
    RETURN FOUND;
END
$$;
COMMENT ON FUNCTION certyo.cancel_backfill(bigint) IS 'certyo_cdc: stop a queued or running backfill; rows already queued stay queued';

-- Rows whose current business payload is not the last one captured and accepted, and the
-- table's schema changes since rows were captured (record_id NULL).
CREATE FUNCTION certyo.audit(rel regclass)
RETURNS TABLE (record_id text, problem text, last_accepted_at timestamptz, last_record_hash text,
               changed_at timestamptz, detail text)
    LANGUAGE c VOLATILE STRICT SECURITY DEFINER SET search_path = pg_catalog, pg_temp
    AS 'MODULE_PATHNAME', 'audit_wrapper';
COMMENT ON FUNCTION certyo.audit(regclass) IS
    'certyo_cdc: rows that differ from their last accepted version, or have none, and schema changes since capture';

REVOKE ALL ON FUNCTION certyo.worker_status(), certyo.worker_passes(), certyo.wake(), certyo.pause(), certyo.resume(),
    certyo.retry(regclass, bigint[]), certyo.verify_now(regclass, text), certyo.history(regclass, text), certyo.record_status(regclass),
    certyo.cancel_backfill(bigint), certyo.audit(regclass) FROM PUBLIC;
