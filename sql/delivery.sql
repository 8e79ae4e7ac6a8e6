-- Delivery and anchoring: the worker's own bookkeeping (src/delivery/take.rs, record.rs and anchor.rs
-- write it; nothing else does, except the operator functions in operations.sql).
--
-- A change's life: certyo.queue (appended by capture) → certyo.receipt once Certyo accepted it
-- (pending → anchored, or mismatch; or superseded: replaced by a newer version of its record
-- before it was verified, see certyo.verify). A change that failed, and the queue behind it while it
-- waits, passes through certyo.delivery (pending; 'dead' when Certyo refused it) on the way.
-- Nothing is ever dropped: a dead letter waits for an operator, and a receipt is kept while it
-- is the newest of its record; receipts of versions a newer one replaced, and of deletes, are
-- removed after certyo.retention once anchored (or superseded).

-- Changes the worker has taken from the queue and not yet delivered: those that failed (retries
-- and dead letters), and the queue behind them while they wait, moved here in bulk (so the write
-- path never pays for these indexes). While nothing waits for a retry, changes go from the
-- queue to their receipt directly, a long backlog too (src/delivery/take.rs, take_from_queue).
CREATE TABLE certyo.delivery (
    id               bigint      PRIMARY KEY,           -- the queue id: change order per record
    relid            oid         NOT NULL,
    collection       text        NOT NULL,
    record_id        text        NOT NULL,
    operation        text        NOT NULL,
    payload          json        NOT NULL,
    source_timestamp timestamptz NOT NULL,
    idempotency_key  text        NOT NULL,
    queued_at        timestamptz NOT NULL,
    state            text        NOT NULL DEFAULT 'pending' CHECK (state IN ('pending', 'dead')),
    attempts         integer     NOT NULL DEFAULT 0,
    next_attempt_at  timestamptz NOT NULL DEFAULT '-infinity',
    last_attempt_at  timestamptz,
    last_status      integer,                           -- HTTP status of the last answer
    last_error       text,                              -- why the last attempt failed (body of a 4xx)
    table_id         integer     NOT NULL               -- see certyo.queue
);
CREATE INDEX delivery_pending ON certyo.delivery (id) WHERE state = 'pending';
CREATE INDEX delivery_record ON certyo.delivery (relid, record_id, id);
SELECT pg_catalog.pg_extension_config_dump('certyo.delivery', '');

-- What Certyo answered for each accepted change, and what verification found since: the audit
-- trail (certyo.history) and the baseline of the tamper audit (certyo.audit). No payload: only
-- its SHA-256, which is all the audit needs.
CREATE TABLE certyo.receipt (
    id               bigint      PRIMARY KEY,           -- the queue id of the change
    relid            oid         NOT NULL,
    collection       text        NOT NULL,
    record_id        text        NOT NULL,
    operation        text        NOT NULL,
    source_timestamp timestamptz NOT NULL,
    idempotency_key  text        NOT NULL,
    queued_at        timestamptz NOT NULL,
    attempts         integer     NOT NULL,              -- deliveries it took
    accepted_at      timestamptz NOT NULL,
    record_hash      text        NOT NULL,              -- Certyo's recordHash
    replayed         boolean     NOT NULL,              -- idempotencyReplayed
    payload_sha256   bytea       NOT NULL,              -- SHA-256 of the payload text sent
    -- pending: accepted, not yet on chain; overdue: still not on chain long after
    -- certyo.anchor_timeout (checked less often); anchored; mismatch: Certyo reports another hash;
    -- superseded: a newer version of the record was accepted before this one was verified, and
    -- with certyo.verify = 'current' only the current version is verified (src/delivery/anchor.rs).
    anchor_status    text        NOT NULL DEFAULT 'pending'
                     CHECK (anchor_status IN ('pending', 'overdue', 'anchored', 'mismatch', 'superseded')),
    next_verify_at   timestamptz,                       -- NULL once anchored, mismatched or superseded
    verify_attempts  integer     NOT NULL DEFAULT 0,
    last_verified_at timestamptz,
    verify_error     text,                              -- why the last verification failed
    polygon_tx_hash  text,                              -- the anchoring transaction
    anchored_at      timestamptz,                       -- when verification found it on chain
    reported_hash    text,                              -- mismatch: the hash Certyo reported
    -- false while the source row could not be marked (its table's write-back failed: an
    -- owner's trigger that raised, a lock held too long); the worker retries with back-off
    written_back     boolean     NOT NULL DEFAULT true,
    -- 16 bytes of SHA-256 per payload column, in payload order (certyo::column_sha256): the
    -- audit compares a row column by column with a version captured before a schema change.
    -- NULL for receipts recorded before 0.2.0.
    column_sha256    bytea,
    table_id         integer     NOT NULL,              -- see certyo.queue
    -- Set when this version is never to be written back, and why: it was captured under a
    -- record key the table no longer has (no key finds its row any more).
    write_back_dropped text
);
CREATE INDEX receipt_record ON certyo.receipt (relid, record_id, id);
CREATE INDEX receipt_verify ON certyo.receipt (next_verify_at) WHERE anchor_status IN ('pending', 'overdue');
CREATE INDEX receipt_not_written_back ON certyo.receipt (relid, id) WHERE NOT written_back;

-- Tables whose write-back fails: what the last attempt said, for certyo.status and
-- certyo.worker_status(). The worker retries them with a growing back-off (at most 5 min) and
-- removes the row once every waiting receipt is written back.
CREATE TABLE certyo.write_back_failure (
    relid           oid         PRIMARY KEY,
    error           text        NOT NULL,
    since           timestamptz NOT NULL,
    attempts        integer     NOT NULL,
    last_attempt_at timestamptz NOT NULL
);
SELECT pg_catalog.pg_extension_config_dump('certyo.receipt', '');

-- Backfills (certyo.backfill): queued by a user, performed by the worker one chunk per
-- transaction, resumable from last_key after a crash or restart.
CREATE TABLE certyo.backfills (
    id           bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    relid        oid         NOT NULL,
    where_clause text,                                  -- NULL: every row; else the condition as Postgres
                                                        -- deparsed it (one expression, names qualified)
    requested_by oid         NOT NULL,                  -- who asked; chunks run as the table's owner while
                                                        -- this role still has the owner's privileges
    requested_at timestamptz NOT NULL DEFAULT now(),
    state        text        NOT NULL DEFAULT 'queued'
                 CHECK (state IN ('queued', 'running', 'done', 'failed', 'cancelled')),
    last_key     text[],                                -- record id columns of the last row queued
    rows_queued  bigint      NOT NULL DEFAULT 0,
    chunks       integer     NOT NULL DEFAULT 0,
    updated_at   timestamptz,
    finished_at  timestamptz,
    error        text,
    installation text                                   -- certyo.this_installation() where it was asked: a
                                                        -- restored one (relid, requested_by are OIDs) is not continued
);
CREATE INDEX backfills_open ON certyo.backfills (id) WHERE state IN ('queued', 'running');
SELECT pg_catalog.pg_extension_config_dump('certyo.backfills', '');
SELECT pg_catalog.pg_extension_config_dump('certyo.backfills_id_seq', '');


-- The shape each tracked table's changes are captured with, recorded by certyo.track() and by
-- the DDL event trigger whenever it changes: a change whose queue id is above since_id (and
-- below the next shape's) was captured with these payload columns and this record key.
-- since_id is drawn as capture draws queue ids, inside the DDL's transaction, which holds the
-- table's lock against writers: every change captured before has a smaller id, every one after
-- a larger. certyo.audit() compares each row on the columns its newest version was captured
-- with, and reports each shape change since as a finding of its own.
CREATE TABLE certyo.capture_shape (
    relid             oid         NOT NULL,
    collection        text        NOT NULL,
    since_id          bigint      NOT NULL,   -- 0 for a table's first shape
    recorded_at       timestamptz NOT NULL DEFAULT now(),
    columns           text[]      NOT NULL,   -- the payload's columns, in payload order
    types             text[]      NOT NULL,   -- their types (format_type)
    attnums           smallint[]  NOT NULL,   -- their attribute numbers in the tracked table
    record_id_columns text[]      NOT NULL,
    -- where attnums are the table's attribute numbers (certyo.this_installation()): a restore
    -- numbers a table's columns anew (a dropped column leaves no gap), and src/shape.rs maps a
    -- restored shape's numbers to the restored table's by the column names of the newest shape
    -- recorded where they were valid
    installation      text,
    PRIMARY KEY (relid, since_id)
);
SELECT pg_catalog.pg_extension_config_dump('certyo.capture_shape', '');

-- Records whose rows were removed while their table was untracked (the documented way to empty
-- a tracked table: untrack, TRUNCATE, track), found by certyo.track() when it tracks the table
-- again: version_id is the record's newest version then. The audit does not report them as
-- deleted without capture while that version is still the record's newest.
CREATE TABLE certyo.removed_untracked (
    version_id  bigint      PRIMARY KEY,
    relid       oid         NOT NULL,
    collection  text        NOT NULL,
    record_id   text        NOT NULL,
    found_at    timestamptz NOT NULL DEFAULT now()
);
SELECT pg_catalog.pg_extension_config_dump('certyo.removed_untracked', '');

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

-- What the worker last said about itself (read through certyo.worker_status()), and the
-- operator's pause switch, which survives restarts.
CREATE TABLE certyo.worker_state (
    singleton         boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    paused            boolean NOT NULL DEFAULT false,
    pid               integer,
    started_at        timestamptz,
    -- src/delivery/worker.rs State; certyo.worker_status() adds 'not running' and 'not delivering'
    state             text CHECK (state IN ('idle', 'delivering', 'paused', 'not configured', 'unauthorized',
                                            'misconfigured', 'unreachable', 'write-back failing')),
    detail            text,
    last_error        text,
    last_error_at     timestamptz,
    last_delivery_at  timestamptz,
    last_verified_at  timestamptz,
    sent              bigint NOT NULL DEFAULT 0,
    accepted          bigint NOT NULL DEFAULT 0,
    replayed          bigint NOT NULL DEFAULT 0,
    failed            bigint NOT NULL DEFAULT 0,
    anchored          bigint NOT NULL DEFAULT 0,
    mismatched        bigint NOT NULL DEFAULT 0,
    updated_at        timestamptz
);
INSERT INTO certyo.worker_state DEFAULT VALUES;
