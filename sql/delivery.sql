-- Delivery and anchoring: the worker's own bookkeeping (src/delivery/store.rs and anchor.rs
-- write it; nothing else does, except the operator functions in operations.sql).
--
-- A change's life: certyo.queue (appended by capture) → certyo.receipt once Certyo accepted it
-- (pending → anchored, or mismatch). A change that failed, and the queue behind it while it
-- waits, passes through certyo.delivery (pending; 'dead' when Certyo refused it) on the way.
-- Nothing is ever dropped: a dead letter waits for an operator, and a receipt is kept while it
-- is the newest of its record; receipts of versions a newer one replaced, and of deletes, are
-- removed after certyo.retention once anchored.

-- Changes the worker has taken from the queue and not yet delivered: those that failed (retries
-- and dead letters), and the queue behind them while they wait, moved here in bulk (so the write
-- path never pays for these indexes). While nothing waits for a retry, changes go from the
-- queue to their receipt directly, a long backlog too (src/delivery/store.rs, take_from_queue).
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
    last_error       text                               -- why the last attempt failed (body of a 4xx)
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
    -- certyo.anchor_timeout (checked less often); anchored; mismatch: Certyo reports another hash.
    anchor_status    text        NOT NULL DEFAULT 'pending'
                     CHECK (anchor_status IN ('pending', 'overdue', 'anchored', 'mismatch')),
    next_verify_at   timestamptz,                       -- NULL once anchored or mismatched
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
    column_sha256    bytea
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
    error        text
);
CREATE INDEX backfills_open ON certyo.backfills (id) WHERE state IN ('queued', 'running');
SELECT pg_catalog.pg_extension_config_dump('certyo.backfills', '');
SELECT pg_catalog.pg_extension_config_dump('certyo.backfills_id_seq', '');

-- Which installation of the extension wrote the OIDs (relid) in the queue, delivery and
-- receipt tables. pg_dump carries these tables' rows, but a restore gives every table a new
-- OID: when the extension OID recorded here is not the running extension's, the rows came
-- from a dump, and certyo.relink_restored() finds each table again by the name its changes
-- were captured under (collection). A restore adds the dumped row to the one written here.
CREATE TABLE certyo.installation (
    extension_oid oid NOT NULL
);
INSERT INTO certyo.installation
    SELECT e.oid FROM pg_catalog.pg_extension e WHERE e.extname = 'certyo_cdc';
SELECT pg_catalog.pg_extension_config_dump('certyo.installation', '');

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

-- After a restore (see certyo.installation): point the restored rows at the tables' new OIDs,
-- matching each by its schema-qualified name among the tracked tables. Rows of a table that
-- is not tracked under that name in this database keep their old OID. Returns how many rows
-- were relinked; called by the worker when it notices a restore, and by certyo.history() and
-- certyo.audit(), so both work even before the worker has run.
CREATE FUNCTION certyo.tracked_oids() RETURNS TABLE (relid oid, collection text)
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
REVOKE ALL ON FUNCTION certyo.tracked_oids() FROM PUBLIC;

CREATE FUNCTION certyo.relink_restored() RETURNS bigint
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
REVOKE ALL ON FUNCTION certyo.relink_restored() FROM PUBLIC;

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
