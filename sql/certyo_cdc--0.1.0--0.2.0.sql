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
    installation      text,
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
-- Each tracked table gets an identity of the extension's own (certyo.table_identity), carried
-- by its capture trigger and by every change: restored rows find their table by it, never by
-- an OID that a restore gave another table, and a change of the record key is told from the
-- table's earlier versions. certyo.installation (which told a restore by the extension's OID
-- alone, the same in a fresh cluster) is gone: certyo.table_identity says where each OID was found.
-- Each tracked table's identity of the extension's own, one per table and record key
-- (src/track/identity.rs). The capture trigger carries the id (its argument table_id=N) and
-- every change carries it into the queue, the deliveries and the receipts (table_id). The OID
-- kept with them (relid) is only a cache: a restore gives every table a new OID, in a fresh
-- cluster quite possibly another tracked table's old one. certyo.relink_restored() finds each
-- id's table again by the capture trigger that carries it (the trigger travels with its table
-- through pg_dump), checked against the name kept here, and repoints the rows; a write-back
-- only marks a table whose capture trigger carries the version's id (the rest wait, never
-- guessed). A change of the record key (other record_id_columns, the primary key moved or
-- retyped) gives the table a new id that supersedes the old one: versions captured under the
-- old key keep the record id they were captured with and are never written back (no key finds
-- their row any more: see certyo.receipt.write_back_dropped).
CREATE TABLE certyo.table_identity (
    id            integer     GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,
    schema_name   name        NOT NULL,
    table_name    name        NOT NULL,
    relid         oid         NOT NULL,             -- the table's OID where last found (0: not found)
    installation  text        NOT NULL,             -- where relid was found: certyo.this_installation()
    record_key    text[],                           -- each record id column's name and type; NULL: not known
    created_at    timestamptz NOT NULL DEFAULT now(),
    superseded_at timestamptz,                      -- the record key changed: superseded_by took over
    superseded_by integer
);
SELECT pg_catalog.pg_extension_config_dump('certyo.table_identity', '');
SELECT pg_catalog.pg_extension_config_dump('certyo.table_identity_id_seq', '');

-- This cluster (its system identifier: a fresh initdb gives a new one, where the extension's
-- OID may well be the same), database and extension: an OID found elsewhere means nothing here.
CREATE FUNCTION certyo.this_installation() RETURNS text
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT (SELECT c.system_identifier FROM pg_control_system() c) || '/'
           || (SELECT d.oid FROM pg_database d WHERE d.datname = current_database()) || '/'
           || (SELECT e.oid FROM pg_extension e WHERE e.extname = 'certyo_cdc')
$$;
REVOKE ALL ON FUNCTION certyo.this_installation() FROM PUBLIC;

-- The names kept with the table ids of a schema's tables, made theirs again after ALTER SCHEMA
-- ... RENAME (certyo.on_alter_table(); ALTER TABLE keeps them by certyo.refresh_capture_trigger()):
-- after a restore the relink tells two tables carrying one id apart by them, and someone
-- could otherwise take the old name. For whoever has the schema owner's rights (who renames
-- it), and only where a name is out of date: no one else writes (and so holds)
-- certyo.table_identity through it.
CREATE FUNCTION certyo.refresh_table_names(schema oid) RETURNS void
LANGUAGE plpgsql VOLATILE STRICT SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_namespace s WHERE s.oid = schema AND pg_has_role(session_user, s.nspowner, 'MEMBER'))
       OR NOT EXISTS (SELECT FROM certyo.table_identity i JOIN pg_class c ON c.oid = i.relid
                        JOIN pg_namespace s ON s.oid = c.relnamespace
                       WHERE c.relnamespace = schema AND i.installation = certyo.this_installation()
                         AND (i.schema_name, i.table_name) IS DISTINCT FROM (s.nspname, c.relname)) THEN
        RETURN;
    END IF;
    UPDATE certyo.table_identity i SET schema_name = s.nspname, table_name = c.relname
      FROM pg_class c JOIN pg_namespace s ON s.oid = c.relnamespace
     WHERE c.oid = i.relid AND c.relnamespace = schema AND i.installation = certyo.this_installation()
       AND (i.schema_name, i.table_name) IS DISTINCT FROM (s.nspname, c.relname);
END
$$;

-- ALTER SCHEMA ... RENAME keeps the names kept with its tables' ids (certyo.refresh_table_names()).
CREATE OR REPLACE FUNCTION certyo.on_alter_table() RETURNS event_trigger
    LANGUAGE plpgsql SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    altered oid;
BEGIN
    FOR altered IN
        SELECT DISTINCT c.objid
          FROM pg_catalog.pg_event_trigger_ddl_commands() c
          JOIN pg_catalog.pg_trigger t ON t.tgrelid = c.objid AND t.tgname = 'certyo_capture'
                                       AND t.tgparentid = 0
         WHERE c.classid = 'pg_catalog.pg_class'::regclass
    LOOP
        PERFORM certyo.refresh_capture_trigger(altered::regclass);
    END LOOP;
    -- A schema renamed: the names kept with its tables' ids (see certyo.refresh_table_names()).
    FOR altered IN
        SELECT DISTINCT c.objid FROM pg_catalog.pg_event_trigger_ddl_commands() c
         WHERE c.classid = 'pg_catalog.pg_namespace'::regclass
    LOOP
        PERFORM certyo.refresh_table_names(altered);
    END LOOP;
END
$$;
DROP EVENT TRIGGER certyo_alter_table;
CREATE EVENT TRIGGER certyo_alter_table ON ddl_command_end
    WHEN TAG IN ('ALTER TABLE', 'ALTER SCHEMA')
    EXECUTE FUNCTION certyo.on_alter_table();

DROP FUNCTION certyo.relink_restored();
DROP FUNCTION certyo.tracked_oids();
-- DROP TABLE leaves a configuration table's OID among the extension's (only ALTER EXTENSION
-- ... DROP TABLE takes it out, which an extension's own script may not run): taken out here,
-- or pg_dump would look for a table that is gone.
UPDATE pg_catalog.pg_extension e
   SET extconfig = (SELECT pg_catalog.array_agg(x.c ORDER BY x.o)
                      FROM unnest(e.extconfig, e.extcondition) WITH ORDINALITY AS x(c, t, o)
                     WHERE x.c OPERATOR(pg_catalog.<>) 'certyo.installation'::pg_catalog.regclass),
       extcondition = (SELECT pg_catalog.array_agg(x.t ORDER BY x.o)
                         FROM unnest(e.extconfig, e.extcondition) WITH ORDINALITY AS x(c, t, o)
                        WHERE x.c OPERATOR(pg_catalog.<>) 'certyo.installation'::pg_catalog.regclass)
 WHERE e.extname OPERATOR(pg_catalog.=) 'certyo_cdc';
DROP TABLE certyo.installation;

-- The table id a capture trigger carries; NULL when it carries none or none readable (anyone
-- who may create a trigger can name one certyo_capture, with any arguments).
CREATE FUNCTION certyo.capture_table_id(tgargs bytea) RETURNS integer
    LANGUAGE c IMMUTABLE STRICT PARALLEL SAFE AS 'MODULE_PATHNAME', 'capture_table_id_wrapper';

-- The tracked tables as their capture triggers say: OID, Certyo's collection, the table id
-- the trigger carries (0: none, or arguments over 1 MiB, which track() never writes: a
-- hand-made trigger's would be read at every pass, slowing every table's delivery).
CREATE FUNCTION certyo.tracked_oids() RETURNS TABLE (relid oid, collection text, table_id integer)
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    -- Certyo's collection, as capture names it (src/capture/plan.rs, collection_name): a part
    -- holding a '.' or a '"' is double-quoted.
    SELECT c.oid, (SELECT string_agg(CASE WHEN p ~ '[."]' THEN '"' || replace(p, '"', '""') || '"' ELSE p END, '.'
                                     ORDER BY o)
                     FROM unnest(ARRAY[n.nspname::text, c.relname::text]) WITH ORDINALITY AS x(p, o)),
           coalesce(CASE WHEN octet_length(t.tgargs) <= 1048576 THEN certyo.capture_table_id(t.tgargs) END, 0)
      FROM pg_class c
      JOIN pg_namespace n ON n.oid = c.relnamespace
      JOIN pg_trigger t ON t.tgrelid = c.oid AND t.tgname = 'certyo_capture' AND t.tgparentid = 0
$$;
REVOKE ALL ON FUNCTION certyo.tracked_oids() FROM PUBLIC;

-- Whether an OID kept in certyo.table_identity may be wrong: one found in another installation
-- (a restore), or a capture trigger whose id the catalog places elsewhere.
CREATE FUNCTION certyo.relink_needed() RETURNS boolean
LANGUAGE sql STABLE SET search_path = pg_catalog, pg_temp AS $$
    SELECT EXISTS (SELECT FROM certyo.table_identity i, (SELECT certyo.this_installation() AS here) h
                    WHERE i.installation <> h.here)
        OR EXISTS (SELECT FROM certyo.tracked_oids() t JOIN certyo.table_identity i ON i.id = t.table_id
                     JOIN pg_class c ON c.oid = t.relid JOIN pg_namespace n ON n.oid = c.relnamespace
                    -- not a superseded id: the relink places it with its successor's table
                    WHERE t.table_id <> 0 AND i.superseded_by IS NULL AND i.relid IS DISTINCT FROM t.relid
                      -- not a trigger carrying the id of a table placed here that exists: the
                      -- relink leaves that id where it is (a hand-made trigger, never its table)
                      AND NOT (i.installation = certyo.this_installation()
                               AND EXISTS (SELECT FROM pg_class p WHERE p.oid = i.relid))
                    GROUP BY i.id
                   -- nor an id that two or more tables carry, none under its name, placed at
                   -- none: the relink would do the same again (and so at every pass)
                   HAVING i.relid <> 0 OR count(*) = 1
                          OR bool_or(n.nspname = i.schema_name AND c.relname = i.table_name))
$$;
REVOKE ALL ON FUNCTION certyo.relink_needed() FROM PUBLIC;

-- Point every table id at its table here, and the rows at their tables' OIDs: the table whose
-- capture trigger carries the id (of two, the one under the name kept here); after a restore,
-- a table tracked no more is found by its name. An id whose table cannot be told is said
-- (WARNING) and gets OID 0: its rows are kept and shown by no table, never written back to a
-- guess. Returns how many rows were repointed. Unless `always`, only when
-- certyo.relink_needed() or while a superuser's pg_restore is connected. Called by the worker (always, at a
-- pass where a restore or a write-back asked for it), and by certyo.history() and
-- certyo.audit(), so both are right even before the worker has run.
CREATE FUNCTION certyo.relink_restored(always boolean DEFAULT false) RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    here text := certyo.this_installation();
    ident record;
    candidates oid[];
    found_relid oid;
    moved bigint := 0;
    rows_moved bigint;
    shapes certyo.capture_shape[];
BEGIN
    IF NOT always AND NOT certyo.relink_needed() AND NOT EXISTS (
           SELECT FROM pg_stat_activity a JOIN pg_roles r ON r.oid = a.usesysid  -- a superuser's (see src/delivery/take.rs)
            WHERE a.datname = current_database() AND a.application_name = 'pg_restore' AND r.rolsuper) THEN
        RETURN 0;
    END IF;
    LOCK TABLE certyo.table_identity IN SHARE ROW EXCLUSIVE MODE;  -- one at a time, and no track() meanwhile
    -- A capture trigger whose id the catalog does not know is not adopted: anyone may make
    -- one by hand, with any id (the sequence's last, to take it from the next table tracked).
    -- Its table is tracked anew by certyo.track(), which gives it an id of the catalog's own.
    FOR ident IN SELECT * FROM certyo.table_identity WHERE superseded_by IS NULL ORDER BY id LOOP
        -- Placed in this installation at a table that exists: its OID is its own (an OID never
        -- changes within an installation), whichever other table's trigger carries its id (one
        -- made by hand, to have its changes taken for this table's).
        IF ident.installation = here AND EXISTS (SELECT FROM pg_class c WHERE c.oid = ident.relid) THEN
            UPDATE certyo.table_identity t SET schema_name = s.nspname, table_name = c.relname
              FROM pg_class c JOIN pg_namespace s ON s.oid = c.relnamespace
             WHERE t.id = ident.id AND c.oid = ident.relid
               AND (t.schema_name, t.table_name) IS DISTINCT FROM (s.nspname, c.relname);
            CONTINUE;
        END IF;
        SELECT array_agg(t.relid) INTO candidates FROM certyo.tracked_oids() t WHERE t.table_id = ident.id;
        found_relid := NULL;
        IF cardinality(candidates) = 1 THEN
            found_relid := candidates[1];
        ELSIF cardinality(candidates) > 1 THEN
            SELECT c.oid INTO found_relid FROM pg_class c JOIN pg_namespace s ON s.oid = c.relnamespace
             WHERE c.oid = ANY (candidates) AND s.nspname = ident.schema_name AND c.relname = ident.table_name;
            IF found_relid IS NULL THEN
                RAISE WARNING 'certyo_cdc: % tables carry the capture trigger of table %.% (id %), and none has that name: its changes are written back to none of them',
                    cardinality(candidates), ident.schema_name, ident.table_name, ident.id
                    USING HINT = 'Drop the capture triggers that were copied by hand (DROP TRIGGER certyo_capture ON ...), then call certyo.track() on the table whose changes these are.';
                found_relid := 0;
            END IF;
        ELSIF ident.installation <> here THEN
            -- Restored, and not tracked here (yet): the table of that name, if there is one.
            SELECT c.oid INTO found_relid FROM pg_class c JOIN pg_namespace s ON s.oid = c.relnamespace
             WHERE s.nspname = ident.schema_name AND c.relname = ident.table_name AND c.relkind IN ('r', 'p');
            found_relid := coalesce(found_relid, 0);
        ELSE
            CONTINUE;  -- untracked in this installation: its OID is still its own
        END IF;
        UPDATE certyo.table_identity t
           SET relid = found_relid, installation = here,
               schema_name = coalesce((SELECT s.nspname FROM pg_class c JOIN pg_namespace s ON s.oid = c.relnamespace
                                        WHERE c.oid = found_relid), t.schema_name),
               table_name = coalesce((SELECT c.relname FROM pg_class c WHERE c.oid = found_relid), t.table_name)
         WHERE t.id = ident.id;
    END LOOP;
    -- A superseded id (an earlier record key) is its successor's table.
    LOOP
        UPDATE certyo.table_identity s SET relid = a.relid, installation = a.installation
          FROM certyo.table_identity a
         WHERE s.superseded_by = a.id AND (s.relid, s.installation) IS DISTINCT FROM (a.relid, a.installation);
        EXIT WHEN NOT FOUND;
    END LOOP;
    UPDATE certyo.queue q SET relid = i.relid FROM certyo.table_identity i WHERE q.table_id = i.id AND q.relid <> i.relid;
    GET DIAGNOSTICS rows_moved = ROW_COUNT; moved := moved + rows_moved;
    UPDATE certyo.delivery d SET relid = i.relid FROM certyo.table_identity i WHERE d.table_id = i.id AND d.relid <> i.relid;
    GET DIAGNOSTICS rows_moved = ROW_COUNT; moved := moved + rows_moved;
    UPDATE certyo.receipt r SET relid = i.relid FROM certyo.table_identity i WHERE r.table_id = i.id AND r.relid <> i.relid;
    GET DIAGNOSTICS rows_moved = ROW_COUNT; moved := moved + rows_moved;
    -- The audit's capture shapes and the records removed while untracked are kept by OID and
    -- collection: moved by the collection, among the tracked tables; the shapes deleted and
    -- inserted again, so that two tables that swapped OIDs do not collide on their key.
    SELECT array_agg(ROW(t.relid, s.collection, s.since_id, s.recorded_at, s.columns, s.types, s.attnums,
                         s.record_id_columns, s.installation)::certyo.capture_shape)
      INTO shapes FROM certyo.capture_shape s JOIN certyo.tracked_oids() t ON t.collection = s.collection
     WHERE s.relid <> t.relid;
    IF shapes IS NOT NULL THEN
        DELETE FROM certyo.capture_shape s USING certyo.tracked_oids() t
         WHERE s.collection = t.collection AND s.relid <> t.relid;
        INSERT INTO certyo.capture_shape SELECT * FROM unnest(shapes) ON CONFLICT DO NOTHING;  -- recorded here anew meanwhile
    END IF;
    UPDATE certyo.removed_untracked u SET relid = t.relid FROM certyo.tracked_oids() t
     WHERE u.collection = t.collection AND u.relid <> t.relid;
    FOR ident IN SELECT * FROM certyo.table_identity t WHERE t.relid = 0 AND t.superseded_by IS NULL
                AND (EXISTS (SELECT FROM certyo.queue q WHERE q.table_id = t.id)
                     OR EXISTS (SELECT FROM certyo.delivery d WHERE d.table_id = t.id)) LOOP
        RAISE WARNING 'certyo_cdc: table %.% (id %) whose changes were restored is not in this database: they are kept, delivered, and written back to no table',
            ident.schema_name, ident.table_name, ident.id
            USING HINT = 'Restore the table, or certyo.track() it under its name, and its changes find it again.';
    END LOOP;
    IF moved > 0 THEN
        RAISE LOG 'certyo_cdc: % queued, delivered and accepted changes repointed at their tables'' OIDs', moved;
    END IF;
    RETURN moved;
END
$$;
REVOKE ALL ON FUNCTION certyo.relink_restored(boolean) FROM PUBLIC;

ALTER TABLE certyo.backfills ADD COLUMN installation text;
-- The backfills open now were asked here (an update in place): they go on.
UPDATE certyo.backfills SET installation = certyo.this_installation() WHERE state IN ('queued', 'running');
ALTER TABLE certyo.queue ADD COLUMN table_id integer NOT NULL DEFAULT 0;
ALTER TABLE certyo.delivery ADD COLUMN table_id integer NOT NULL DEFAULT 0;
ALTER TABLE certyo.receipt ADD COLUMN table_id integer NOT NULL DEFAULT 0, ADD COLUMN write_back_dropped text;

-- Every tracked table's capture trigger is rewritten to carry its new id (the library's
-- refresh assigns it); tables with changes but no trigger any more get an id of unknown key.
SELECT certyo.refresh_capture_trigger(t.relid::regclass) FROM certyo.tracked_oids() t;
INSERT INTO certyo.table_identity (schema_name, table_name, relid, installation)
SELECT coalesce(n.nspname, ''), coalesce(c.relname, x.collection), x.relid, certyo.this_installation()
  FROM (SELECT DISTINCT ON (u.relid) u.relid, u.collection
          FROM (SELECT relid, collection FROM certyo.queue UNION ALL SELECT relid, collection FROM certyo.delivery
                UNION ALL SELECT relid, collection FROM certyo.receipt) u
         ORDER BY u.relid) x
  LEFT JOIN pg_catalog.pg_class c ON c.oid = x.relid
  LEFT JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace
 WHERE NOT EXISTS (SELECT FROM certyo.table_identity i WHERE i.relid = x.relid);
UPDATE certyo.queue q SET table_id = i.id FROM certyo.table_identity i WHERE i.relid = q.relid;
UPDATE certyo.delivery d SET table_id = i.id FROM certyo.table_identity i WHERE i.relid = d.relid;
UPDATE certyo.receipt r SET table_id = i.id FROM certyo.table_identity i WHERE i.relid = r.relid;
ALTER TABLE certyo.delivery ALTER COLUMN table_id DROP DEFAULT;
ALTER TABLE certyo.receipt ALTER COLUMN table_id DROP DEFAULT;

-- history(): by table id, so that no other table's restored rows are shown.
-- Every version of one record that was captured, oldest first: the audit trail.
CREATE OR REPLACE FUNCTION certyo.history(rel regclass, record_id text)
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

-- certyo.track() takes write_back: 'anchored' (the default from 0.2.0 on, certyo.write_back)
-- writes hash, status and time back once, when the version is anchored; 'accepted' (0.1.0's
-- behaviour) the hash at acceptance and the status again once anchored. Tables tracked before
-- keep theirs: their capture trigger carries no write_back=, which means 'accepted'. The
-- function is made anew with the argument, keeping who may call it.
CREATE TEMPORARY TABLE certyo_track_acl AS
    SELECT p.proacl FROM pg_catalog.pg_proc p
     WHERE p.oid = 'certyo.track(regclass, text[], text[], name, boolean)'::regprocedure;
DROP FUNCTION certyo.track(regclass, text[], text[], name, boolean);
CREATE FUNCTION certyo.track(
    rel               regclass,
    record_id_columns text[]  DEFAULT NULL,
    exclude_columns   text[]  DEFAULT '{}',
    timestamp_column  name    DEFAULT NULL,
    backfill          boolean DEFAULT false,
    write_back        text    DEFAULT NULL  -- 'anchored', 'accepted' or 'none'; NULL: the table's mode, else certyo.write_back
) RETURNS void
    LANGUAGE c VOLATILE AS 'MODULE_PATHNAME', 'track_write_back_wrapper';
COMMENT ON FUNCTION certyo.track(regclass, text[], text[], name, boolean, text) IS
    'Start capturing every committed change of a table (or change its options)';
DO $$
DECLARE
    acl aclitem[] := (SELECT a.proacl FROM pg_temp.certyo_track_acl a);
    entry record;
BEGIN
    IF acl IS NULL THEN
        RETURN;  -- the default: PUBLIC may call it, as the new one
    END IF;
    REVOKE ALL ON FUNCTION certyo.track(regclass, text[], text[], name, boolean, text) FROM PUBLIC;
    FOR entry IN SELECT x.grantee FROM pg_catalog.aclexplode(acl) x
                  WHERE x.privilege_type = 'EXECUTE'
                    AND x.grantee <> (SELECT p.proowner FROM pg_catalog.pg_proc p
                                       WHERE p.oid = 'certyo.track(regclass, text[], text[], name, boolean, text)'::regprocedure) LOOP
        EXECUTE pg_catalog.format('GRANT EXECUTE ON FUNCTION certyo.track(regclass, text[], text[], name, boolean, text) TO %s',
                                  CASE WHEN entry.grantee = 0 THEN 'PUBLIC' ELSE entry.grantee::regrole::text END);
    END LOOP;
END
$$;
DROP TABLE pg_temp.certyo_track_acl;

CREATE OR REPLACE VIEW certyo.tracked_tables AS
SELECT t.tgrelid::regclass                                        AS "table",
       certyo.capture_option(t.tgargs, 'record_id')               AS record_id_columns,
       (certyo.capture_option(t.tgargs, 'record_id_source'))[1]   AS record_id_source,
       certyo.capture_option(t.tgargs, 'exclude')                 AS exclude_columns,
       (certyo.capture_option(t.tgargs, 'timestamp'))[1]::name    AS timestamp_column,
       -- fires in ordinary sessions ('O', 'A'; not disabled, not replica-only), on the table
       -- and on each of its partitions (DISABLE TRIGGER ALL on one, as pg_restore does)
       -- (the partitions read from pg_inherits: pg_partition_tree() would lock each of them)
       t.tgenabled IN ('O', 'A') AND NOT EXISTS (
           WITH RECURSIVE tree (relid) AS (
               SELECT i.inhrelid FROM pg_catalog.pg_inherits i WHERE i.inhparent = t.tgrelid
               UNION ALL
               SELECT i.inhrelid FROM tree JOIN pg_catalog.pg_inherits i ON i.inhparent = tree.relid)
           SELECT FROM tree
             JOIN pg_catalog.pg_trigger c ON c.tgrelid = tree.relid AND c.tgname = t.tgname
                                         AND c.tgfoid = t.tgfoid
            WHERE c.tgenabled NOT IN ('O', 'A'))                  AS capturing,
       -- a capture trigger from before 0.2.0 carries none: it writes back at acceptance
       coalesce((certyo.capture_option(t.tgargs, 'write_back'))[1], 'accepted') AS write_back
  FROM pg_catalog.pg_trigger t
 WHERE t.tgname = 'certyo_capture' AND t.tgfoid = 'certyo.capture()'::regprocedure
   AND t.tgparentid = 0;  -- not the clones on a tracked partitioned table's partitions

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
REVOKE ALL ON FUNCTION certyo.record_status(regclass) FROM PUBLIC;

-- Only each record's current version is verified by default (certyo.verify): a receipt that a
-- newer version of its record replaced before it was verified is 'superseded'.
ALTER TABLE certyo.receipt DROP CONSTRAINT receipt_anchor_status_check,
    ADD CONSTRAINT receipt_anchor_status_check
        CHECK (anchor_status IN ('pending', 'overdue', 'anchored', 'mismatch', 'superseded'));
