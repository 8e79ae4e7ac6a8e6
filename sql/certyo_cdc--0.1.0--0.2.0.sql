-- certyo_cdc 0.1.0 → 0.2.0. 0.2.0 builds for PostgreSQL 17 and 18 as well as 15, and serves
-- every database in which it is installed (a launcher starts a delivery worker per database).
-- ALTER EXTENSION certyo_cdc UPDATE after installing the new library; pg_test/test_upgrade.py
-- checks that the result equals a fresh install.
\echo Use "ALTER EXTENSION certyo_cdc UPDATE" to load this file. \quit

-- Queue ids are drawn in blocks of 1,024 (src/capture/ids.rs): one nextval() reserves a block.
-- A backend still running 0.1.0's library draws a block per change until the server restarts.
ALTER TABLE certyo.queue ALTER COLUMN id SET INCREMENT BY 1024;

-- worker_status(): the reason no worker serves this database names what 0.2.0 offers
-- (certyo.database_name is now only a restriction).
CREATE OR REPLACE FUNCTION certyo.worker_status(
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

-- Certyo's collection quotes a name part that holds a '.' or a '"' (two tables never share one;
-- src/capture/plan.rs, collection_name); the relink after a restore matches by the same rule.
CREATE OR REPLACE FUNCTION certyo.tracked_oids() RETURNS TABLE (relid oid, collection text)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    -- Certyo's collection, as capture names it (src/capture/plan.rs, collection_name): a part
    -- holding a '.' or a '"' is double-quoted.
    SELECT c.oid, (SELECT string_agg(CASE WHEN p ~ '[."]' THEN '"' || replace(p, '"', '""') || '"' ELSE p END, '.'
                                     ORDER BY o)
                     FROM unnest(ARRAY[n.nspname::text, c.relname::text]) WITH ORDINALITY AS x(p, o))
      FROM pg_class c
      JOIN pg_namespace n ON n.oid = c.relnamespace
      JOIN pg_trigger t ON t.tgrelid = c.oid AND t.tgname = 'certyo_capture' AND t.tgparentid = 0
$$;

-- The audit tells a schema change from tampering: receipts keep a digest per payload column,
-- the shape each table is captured with is recorded, and so are records removed while their
-- table was untracked (docs/operations.md, certyo.audit).
ALTER TABLE certyo.receipt ADD COLUMN column_sha256 bytea;
CREATE TABLE certyo.capture_shape (
    relid             oid         NOT NULL,
    collection        text        NOT NULL,
    since_id          bigint      NOT NULL,
    recorded_at       timestamptz NOT NULL DEFAULT now(),
    columns           text[]      NOT NULL,
    types             text[]      NOT NULL,
    attnums           smallint[]  NOT NULL,
    record_id_columns text[]      NOT NULL,
    PRIMARY KEY (relid, since_id)
);
SELECT pg_catalog.pg_extension_config_dump('certyo.capture_shape', '');
CREATE TABLE certyo.removed_untracked (
    version_id  bigint      PRIMARY KEY,
    relid       oid         NOT NULL,
    collection  text        NOT NULL,
    record_id   text        NOT NULL,
    found_at    timestamptz NOT NULL DEFAULT now()
);
SELECT pg_catalog.pg_extension_config_dump('certyo.removed_untracked', '');

CREATE OR REPLACE FUNCTION certyo.relink_restored() RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    running oid := (SELECT e.oid FROM pg_extension e WHERE e.extname = 'certyo_cdc');
    relinked bigint := 0;
    n bigint;
BEGIN
    IF NOT EXISTS (SELECT FROM certyo.installation i WHERE i.extension_oid <> running)
       AND EXISTS (SELECT FROM certyo.installation) THEN
        RETURN 0;
    END IF;
    LOCK TABLE certyo.installation IN EXCLUSIVE MODE;
    IF EXISTS (SELECT FROM certyo.installation i WHERE i.extension_oid <> running) THEN
        UPDATE certyo.queue q SET relid = t.relid FROM certyo.tracked_oids() t
         WHERE q.collection = t.collection AND q.relid <> t.relid;
        GET DIAGNOSTICS n = ROW_COUNT; relinked := relinked + n;
        UPDATE certyo.delivery d SET relid = t.relid FROM certyo.tracked_oids() t
         WHERE d.collection = t.collection AND d.relid <> t.relid;
        GET DIAGNOSTICS n = ROW_COUNT; relinked := relinked + n;
        UPDATE certyo.receipt r SET relid = t.relid FROM certyo.tracked_oids() t
         WHERE r.collection = t.collection AND r.relid <> t.relid;
        GET DIAGNOSTICS n = ROW_COUNT; relinked := relinked + n;
        UPDATE certyo.capture_shape s SET relid = t.relid FROM certyo.tracked_oids() t
         WHERE s.collection = t.collection AND s.relid <> t.relid;
        UPDATE certyo.removed_untracked u SET relid = t.relid FROM certyo.tracked_oids() t
         WHERE u.collection = t.collection AND u.relid <> t.relid;
        RAISE LOG 'certyo_cdc: restored from a dump: % queued, delivered and accepted changes relinked to their tables', relinked;
    END IF;
    DELETE FROM certyo.installation;
    INSERT INTO certyo.installation VALUES (running);
    RETURN relinked;
END
$$;

-- certyo.audit() reports schema changes too (record_id NULL, changed_at, detail): its result
-- has two more columns, so it is made anew, keeping the roles granted it.
CREATE TEMPORARY TABLE certyo_audit_grants AS
    SELECT a.grantee::regrole::text AS grantee
      FROM pg_catalog.pg_proc p, pg_catalog.aclexplode(p.proacl) a
     WHERE p.oid = 'certyo.audit(regclass)'::regprocedure AND a.privilege_type = 'EXECUTE'
       AND a.grantee <> 0 AND a.grantee <> p.proowner;
DROP FUNCTION certyo.audit(regclass);
CREATE FUNCTION certyo.audit(rel regclass)
RETURNS TABLE (record_id text, problem text, last_accepted_at timestamptz, last_record_hash text,
               changed_at timestamptz, detail text)
    LANGUAGE c VOLATILE STRICT SECURITY DEFINER SET search_path = pg_catalog, pg_temp
    AS 'MODULE_PATHNAME', 'audit_wrapper';
COMMENT ON FUNCTION certyo.audit(regclass) IS
    'certyo_cdc: rows that differ from their last accepted version, or have none, and schema changes since capture';
REVOKE ALL ON FUNCTION certyo.audit(regclass) FROM PUBLIC;
DO $$
DECLARE
    role text;
BEGIN
    FOR role IN SELECT grantee FROM pg_temp.certyo_audit_grants LOOP
        EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION certyo.audit(regclass) TO %s', role);
    END LOOP;
END
$$;
DROP TABLE pg_temp.certyo_audit_grants;

-- Every tracked table's present shape, as the shape of what it captured so far.
SELECT certyo.refresh_capture_trigger(t.relid::regclass) FROM certyo.tracked_oids() t;
