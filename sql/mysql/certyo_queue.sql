-- certyo_cdc companion for MySQL 8.0.16+ / MariaDB 10.5+: the same capture design as the
-- PostgreSQL extension. Run once per database, and again after every update of this file (it
-- upgrades what an earlier version created and changes nothing when run twice):
--   mysql shop < sql/mysql/certyo_queue.sql
-- then generate and install the triggers of each table to track (see certyo_trigger_ddl below):
--   mysql -N -r -e "CALL certyo_trigger_ddl('shop', 'products', NULL, NULL)" shop | mysql shop
--
-- A queue row maps to a Certyo record exactly as certyo.queue does in PostgreSQL:
--   collection → collection, record_id → recordId, operation → operationType,
--   payload → recordPayload, source_timestamp → sourceTimestamp (UTC),
--   idempotency_key → idempotencyKey.
--
-- The script and the routines it creates work whatever the database's and the client's character
-- set and collation: it sets its own session's to utf8mb4_bin (so the routines' string literals are
-- utf8mb4_bin), declares every string parameter, variable and result utf8mb4_bin, and reads
-- information_schema's names converted to it. Otherwise a database created with, say,
-- utf8mb4_unicode_ci and a utf8mb4_general_ci client make an illegal mix of collations.
SET NAMES utf8mb4 COLLATE utf8mb4_bin;

-- Every DATETIME in certyo_queue is UTC. MySQL stores no zone with a DATETIME, so the triggers
-- write UTC_TIMESTAMP() (never NOW()), and certyo-relay writes UTC too.

-- The transactional outbox: written by the triggers in the writer's transaction (InnoDB), so a
-- rolled-back write leaves nothing. certyo-relay takes pending rows in id order, sends them,
-- records each answer on the row, verifies anchoring later, and deletes old delivered rows
-- itself (no event scheduler needed).
CREATE TABLE IF NOT EXISTS certyo_queue (
    id               BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    collection       VARCHAR(192)  NOT NULL,            -- schema.table
    record_id        VARCHAR(768)  NOT NULL,            -- primary key as text (composite: a/b)
    operation        ENUM('insert', 'update', 'delete', 'upsert') NOT NULL,
    payload          JSON          NOT NULL,            -- business columns only
    source_timestamp DATETIME(6)   NOT NULL,            -- UTC
    idempotency_key  VARCHAR(80)   NULL,                -- {installation}-{id}, set by the trigger
    queued_at        DATETIME(6)   NOT NULL DEFAULT (UTC_TIMESTAMP(6)), -- UTC; the triggers set it
    -- Delivery, written by certyo-relay. pending: to send (again) once next_attempt_at is due;
    -- delivered: Certyo accepted it (the receipt below); dead: Certyo refused it (4xx), kept
    -- with the answer in last_status/last_error until an operator acts.
    status           ENUM('pending', 'delivered', 'dead') NOT NULL DEFAULT 'pending',
    attempts         INT           NOT NULL DEFAULT 0,
    next_attempt_at  DATETIME(6)   NULL,                -- UTC; NULL: due now
    last_attempt_at  DATETIME(6)   NULL,                -- UTC
    last_status      SMALLINT      NULL,                -- HTTP status of the last answer; 0: no answer
    last_error       TEXT          NULL,                -- why the last attempt failed (a dead letter: the 4xx body)
    -- The receipt.
    record_hash      VARCHAR(100)  NULL,                -- Certyo's recordHash
    delivered_at     DATETIME(6)   NULL,                -- UTC, when Certyo accepted it
    -- Anchoring, verified by certyo-relay after delivery. NULL until delivered; pending: not yet
    -- on chain; overdue: still not on chain long after delivery; anchored; mismatch: Certyo
    -- reports another hash than the receipt's.
    anchor_status    ENUM('pending', 'overdue', 'anchored', 'mismatch') NULL,
    next_verify_at   DATETIME(6)   NULL,                -- UTC; NULL: no verification due
    verified_at      DATETIME(6)   NULL,                -- UTC, when verification last answered
    verify_attempts  INT           NOT NULL DEFAULT 0,  -- verifications asked: an overdue one backs off with it
    polygon_tx_hash  VARCHAR(100)  NULL,
    reported_hash    VARCHAR(100)  NULL,                -- mismatch: the hash Certyo reported instead
    -- The source row's write-back (certyo_record_hash, certyo_anchor_status, certyo_verified_at),
    -- still to do since delivery or verification when write_back_at is set: certyo-relay tries it
    -- from then on, backing off per table (a locked row, a table that refuses it), and clears it
    -- once the row shows the state of the record's newest change.
    write_back_at       DATETIME(6) NULL,               -- UTC; NULL: nothing to write back
    write_back_attempts INT         NOT NULL DEFAULT 0, -- failed tries: the back-off grows with them
    write_back_error    TEXT        NULL,               -- why the last try failed
    KEY certyo_queue_take (status, id),                                          -- the next rows to send
    KEY certyo_queue_record (collection(64), record_id(128), status, id),        -- a record's changes, in order
    KEY certyo_queue_verify (next_verify_at),                                    -- receipts due for verification
    KEY certyo_queue_write_back (write_back_at)                                  -- source rows still to mark
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- One row: the installation id that prefixes idempotency keys, so a re-created queue whose ids
-- restart at 1 never reuses a key Certyo has seen. The generator bakes it into the triggers.
CREATE TABLE IF NOT EXISTS certyo_installation (
    singleton       TINYINT     NOT NULL PRIMARY KEY DEFAULT 1,
    installation_id VARCHAR(36) NOT NULL,
    CONSTRAINT certyo_installation_single CHECK (singleton = 1)
) ENGINE = InnoDB DEFAULT CHARSET = ascii;
INSERT IGNORE INTO certyo_installation (singleton, installation_id) VALUES (1, LEFT(REPLACE(UUID(), '-', ''), 12));

-- The first version deleted delivered rows with this event; certyo-relay does it now.
DROP EVENT IF EXISTS certyo_queue_cleanup;

DELIMITER //
-- Upgrade of a certyo_queue created by an earlier version of this script. CREATE TABLE IF NOT
-- EXISTS leaves an existing table as it is, so each missing column and index is added here, after
-- a look at information_schema: a second run finds everything in place and changes nothing.
-- The columns are placed as in CREATE TABLE above, so an upgraded queue equals a new one.
DROP PROCEDURE IF EXISTS certyo_queue_add_column //
CREATE PROCEDURE certyo_queue_add_column(
    IN p_name VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin, IN p_definition TEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin)
    MODIFIES SQL DATA
BEGIN
    IF NOT EXISTS (SELECT 1 FROM information_schema.COLUMNS
                    WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'certyo_queue' AND COLUMN_NAME = p_name) THEN
        -- PREPARE takes only a literal or a user variable.
        SET @certyo_ddl = CONCAT('ALTER TABLE certyo_queue ADD COLUMN ', p_name, ' ', p_definition);
        PREPARE certyo_stmt FROM @certyo_ddl;
        EXECUTE certyo_stmt;
        DEALLOCATE PREPARE certyo_stmt;
        SET @certyo_ddl = NULL;
    END IF;
END //

DROP PROCEDURE IF EXISTS certyo_queue_add_index //
CREATE PROCEDURE certyo_queue_add_index(
    IN p_name VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin, IN p_columns TEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin)
    MODIFIES SQL DATA
BEGIN
    IF NOT EXISTS (SELECT 1 FROM information_schema.STATISTICS
                    WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'certyo_queue' AND INDEX_NAME = p_name) THEN
        SET @certyo_ddl = CONCAT('ALTER TABLE certyo_queue ADD KEY ', p_name, ' (', p_columns, ')');
        PREPARE certyo_stmt FROM @certyo_ddl;
        EXECUTE certyo_stmt;
        DEALLOCATE PREPARE certyo_stmt;
        SET @certyo_ddl = NULL;
    END IF;
END //

DROP PROCEDURE IF EXISTS certyo_upgrade_queue //
CREATE PROCEDURE certyo_upgrade_queue()
    MODIFIES SQL DATA
BEGIN
    -- Delivery state.
    CALL certyo_queue_add_column('status', 'ENUM(''pending'', ''delivered'', ''dead'') NOT NULL DEFAULT ''pending'' AFTER queued_at');
    CALL certyo_queue_add_column('attempts', 'INT NOT NULL DEFAULT 0 AFTER status');
    CALL certyo_queue_add_column('next_attempt_at', 'DATETIME(6) NULL AFTER attempts');
    CALL certyo_queue_add_column('last_attempt_at', 'DATETIME(6) NULL AFTER next_attempt_at');
    CALL certyo_queue_add_column('last_status', 'SMALLINT NULL AFTER last_attempt_at');
    CALL certyo_queue_add_column('last_error', 'TEXT NULL AFTER last_status');
    -- Anchoring.
    CALL certyo_queue_add_column('anchor_status', 'ENUM(''pending'', ''overdue'', ''anchored'', ''mismatch'') NULL AFTER delivered_at');
    CALL certyo_queue_add_column('next_verify_at', 'DATETIME(6) NULL AFTER anchor_status');
    CALL certyo_queue_add_column('verified_at', 'DATETIME(6) NULL AFTER next_verify_at');
    CALL certyo_queue_add_column('verify_attempts', 'INT NOT NULL DEFAULT 0 AFTER verified_at');
    CALL certyo_queue_add_column('polygon_tx_hash', 'VARCHAR(100) NULL AFTER verify_attempts');
    CALL certyo_queue_add_column('reported_hash', 'VARCHAR(100) NULL AFTER polygon_tx_hash');
    -- Write-back (added below, after the delivered rows are settled).
    SET @certyo_add_write_back = NOT EXISTS (
        SELECT 1 FROM information_schema.COLUMNS
         WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'certyo_queue' AND COLUMN_NAME = 'write_back_at');
    CALL certyo_queue_add_column('write_back_at', 'DATETIME(6) NULL AFTER reported_hash');
    CALL certyo_queue_add_column('write_back_attempts', 'INT NOT NULL DEFAULT 0 AFTER write_back_at');
    CALL certyo_queue_add_column('write_back_error', 'TEXT NULL AFTER write_back_attempts');

    -- queued_at was DEFAULT CURRENT_TIMESTAMP(6), the session's local time, not UTC. (MODIFY
    -- with the whole definition: the form documented for expression defaults in both servers.)
    IF EXISTS (SELECT 1 FROM information_schema.COLUMNS
                WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'certyo_queue' AND COLUMN_NAME = 'queued_at'
                  AND LOWER(COLUMN_DEFAULT) NOT LIKE '%utc_timestamp%') THEN
        ALTER TABLE certyo_queue MODIFY COLUMN queued_at DATETIME(6) NOT NULL DEFAULT (UTC_TIMESTAMP(6));
    END IF;

    -- Rows an earlier reader delivered (it set delivered_at only) are delivered, and their
    -- anchoring is to be verified. Runs before the old index on delivered_at goes away.
    UPDATE certyo_queue
       SET status = 'delivered',
           anchor_status = IF(record_hash IS NULL, NULL, 'pending'),
           next_verify_at = IF(record_hash IS NULL, NULL, UTC_TIMESTAMP(6))
     WHERE status = 'pending' AND delivered_at IS NOT NULL;

    -- A relay before the write-back was recorded gave up on a write-back that failed (a locked
    -- row, a lock wait timeout), and could mark a row with an earlier version's hash: the rows
    -- of such an installation may show a hash, even anchored, that is not their content's. So
    -- when the column is new, each record's newest delivered (or dead) change is written back
    -- once more: the relay then gives every row the state of the version it holds. (A derived
    -- table with GROUP BY is materialized, which MySQL needs to read the table it updates. The
    -- record ids byte for byte: utf8mb4_bin pads, and 'a' and 'a ' are two rows of a table whose
    -- key does not.)
    IF @certyo_add_write_back THEN
        UPDATE certyo_queue q
          JOIN (SELECT MAX(id) AS id FROM certyo_queue GROUP BY collection, CAST(record_id AS BINARY)) n ON q.id = n.id
           SET q.write_back_at = UTC_TIMESTAMP(6)
         WHERE q.status IN ('delivered', 'dead') AND q.operation <> 'delete';
    END IF;
    SET @certyo_add_write_back = NULL;

    CALL certyo_queue_add_index('certyo_queue_take', 'status, id');
    CALL certyo_queue_add_index('certyo_queue_record', 'collection(64), record_id(128), status, id');
    CALL certyo_queue_add_index('certyo_queue_verify', 'next_verify_at');
    CALL certyo_queue_add_index('certyo_queue_write_back', 'write_back_at');
    -- Replaced by certyo_queue_take.
    IF EXISTS (SELECT 1 FROM information_schema.STATISTICS
                WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'certyo_queue' AND INDEX_NAME = 'certyo_queue_pending') THEN
        ALTER TABLE certyo_queue DROP INDEX certyo_queue_pending;
    END IF;
END //
DELIMITER ;

CALL certyo_upgrade_queue();
DROP PROCEDURE certyo_upgrade_queue;
DROP PROCEDURE certyo_queue_add_column;
DROP PROCEDURE certyo_queue_add_index;

DROP PROCEDURE IF EXISTS certyo_trigger_ddl;
DELIMITER //
-- Prints the complete DDL of the capture triggers of one table, from information_schema (after
-- insert, update and delete; and before update, which resets the bookkeeping columns when the
-- business columns change):
-- every business column (all but certyo_* and p_exclude), identifiers quoted. MySQL cannot run
-- CREATE TRIGGER from dynamic SQL, so the output is piped back into the mysql client.
--   p_exclude:           comma-separated columns never sent (NULL: none)
--   p_timestamp_column:  source of sourceTimestamp (NULL: updated_at or modified_at if present,
--                        else the time of the change)
CREATE PROCEDURE certyo_trigger_ddl(
    IN p_schema VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin, IN p_table VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin,
    IN p_exclude TEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin, IN p_timestamp_column VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin)
    READS SQL DATA
BEGIN
    DECLARE v_pk_count INT;
    DECLARE v_qtable TEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin DEFAULT CONCAT('`', REPLACE(p_schema, '`', '``'), '`.`', REPLACE(p_table, '`', '``'), '`');
    DECLARE v_collection TEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin DEFAULT CONCAT(p_schema, '.', p_table);
    DECLARE v_installation VARCHAR(36) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin;
    DECLARE v_ts_column VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin;
    DECLARE v_ts_type VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin;
    DECLARE v_checks_per_table BOOLEAN;
    DECLARE v_group_concat_max_len BIGINT UNSIGNED DEFAULT @@session.group_concat_max_len;
    DECLARE v_refused, v_reason TEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin;
    DECLARE v_key_column, v_key_type, v_key_charset, v_fk_name VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin;
    DECLARE v_fk_rule VARCHAR(32) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin;
    DECLARE v_id_length BIGINT;
    DECLARE v_old_payload, v_new_payload, v_old_id, v_new_id, v_business_same, v_id_same, v_old_ts, v_new_ts, v_clear
        LONGTEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin;

    SELECT installation_id INTO v_installation FROM certyo_installation WHERE singleton = 1;

    SELECT COUNT(*) INTO v_pk_count FROM information_schema.KEY_COLUMN_USAGE
     WHERE TABLE_SCHEMA = p_schema AND TABLE_NAME = p_table AND CONSTRAINT_NAME = 'PRIMARY';
    IF v_pk_count = 0 THEN
        SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'certyo_trigger_ddl: the table does not exist or has no primary key; add one (the record id is the primary key)';
    END IF;

    -- The record id is the primary key's text: one text per row, the same in every session, and
    -- another for every other row. Keys whose text is not that are refused, each saying why.
    SELECT CONVERT(k.COLUMN_NAME USING utf8mb4) COLLATE utf8mb4_bin, CONVERT(c.DATA_TYPE USING utf8mb4) COLLATE utf8mb4_bin,
           CONVERT(c.CHARACTER_SET_NAME USING utf8mb4) COLLATE utf8mb4_bin,
           CASE
             WHEN c.DATA_TYPE IN ('float', 'double', 'real') THEN 'rounds'
             WHEN c.DATA_TYPE IN ('binary', 'varbinary', 'tinyblob', 'blob', 'mediumblob', 'longblob', 'bit') THEN 'binary'
             WHEN c.CHARACTER_SET_NAME IS NOT NULL
              AND c.CHARACTER_SET_NAME NOT IN ('utf8mb4', 'utf8mb3', 'utf8', 'latin1', 'ascii', 'ucs2', 'utf16', 'utf16le', 'utf32') THEN 'charset'
             WHEN p_exclude IS NOT NULL AND FIND_IN_SET(k.COLUMN_NAME, p_exclude) > 0 THEN 'excluded'
           END AS reason
      INTO v_key_column, v_key_type, v_key_charset, v_reason
      FROM information_schema.KEY_COLUMN_USAGE k
      JOIN information_schema.COLUMNS c
        ON c.TABLE_SCHEMA = k.TABLE_SCHEMA AND c.TABLE_NAME = k.TABLE_NAME AND c.COLUMN_NAME = k.COLUMN_NAME
     WHERE k.TABLE_SCHEMA = p_schema AND k.TABLE_NAME = p_table AND k.CONSTRAINT_NAME = 'PRIMARY'
     ORDER BY reason IS NULL, k.ORDINAL_POSITION
     LIMIT 1;
    -- MySQL takes 128 characters of a message: the reason first, the name last (cut, if
    -- long, at the end); the reasons in full are in docs/relay.md.
    SET v_refused = CASE v_reason
        WHEN 'rounds' THEN CONCAT('certyo_trigger_ddl: a FLOAT/DOUBLE key rounds as text (rows could share a record id); use an exact type: ',
                                  v_key_column)
        WHEN 'binary' THEN CONCAT('certyo_trigger_ddl: binary keys are not supported (bytes are no text; a UUID as CHAR(36) is): ',
                                  v_key_column, ' ', v_key_type)
        WHEN 'charset' THEN CONCAT('certyo_trigger_ddl: a key in this character set is not supported; convert it to utf8mb4: ',
                                   v_key_column, ' ', v_key_charset)
        WHEN 'excluded' THEN CONCAT('certyo_trigger_ddl: p_exclude names a key column (the record id is always captured): ', v_key_column)
    END;
    -- Rows changed by a foreign key's cascade fire no trigger in MySQL and MariaDB: those
    -- changes would never reach Certyo, and a row whose key cascaded would keep another
    -- record's hash.
    IF v_refused IS NULL THEN
        SELECT CONVERT(CONSTRAINT_NAME USING utf8mb4) COLLATE utf8mb4_bin,
               CONVERT(IF(UPDATE_RULE IN ('CASCADE', 'SET NULL', 'SET DEFAULT'), CONCAT('ON UPDATE ', UPDATE_RULE), CONCAT('ON DELETE ', DELETE_RULE)) USING utf8mb4) COLLATE utf8mb4_bin
          INTO v_fk_name, v_fk_rule
          FROM information_schema.REFERENTIAL_CONSTRAINTS
         WHERE CONSTRAINT_SCHEMA = p_schema AND TABLE_NAME = p_table
           AND (UPDATE_RULE IN ('CASCADE', 'SET NULL', 'SET DEFAULT') OR DELETE_RULE IN ('CASCADE', 'SET NULL', 'SET DEFAULT'))
         ORDER BY CONSTRAINT_NAME
         LIMIT 1;
        IF v_fk_name IS NOT NULL THEN
            SET v_refused = CONCAT('certyo_trigger_ddl: a cascade fires no trigger; make the foreign key RESTRICT: ', v_fk_name, ' ', v_fk_rule);
        END IF;
    END IF;
    IF v_refused IS NOT NULL THEN
        SET v_refused = LEFT(v_refused, 128);
        SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = v_refused;
    END IF;

    -- The columns that make the payload, with how each renders as JSON. Strings compare as
    -- bytes (BINARY) so that a change of case or trailing spaces is a change, whatever the collation.
    DROP TEMPORARY TABLE IF EXISTS certyo_columns;
    CREATE TEMPORARY TABLE certyo_columns AS
    SELECT c.ORDINAL_POSITION AS pos,
           CONVERT(c.COLUMN_NAME USING utf8mb4) COLLATE utf8mb4_bin AS name,
           CONCAT('`', REPLACE(CONVERT(c.COLUMN_NAME USING utf8mb4) COLLATE utf8mb4_bin, '`', '``'), '`') AS quoted,
           CAST(c.DATA_TYPE AS CHAR(64) CHARACTER SET utf8mb4) COLLATE utf8mb4_bin AS data_type,
           c.DATETIME_PRECISION AS fsp
      FROM information_schema.COLUMNS c
     WHERE c.TABLE_SCHEMA = p_schema AND c.TABLE_NAME = p_table
       AND c.COLUMN_NAME NOT IN ('certyo_record_hash', 'certyo_anchor_status', 'certyo_verified_at')
       AND (p_exclude IS NULL OR FIND_IN_SET(c.COLUMN_NAME, p_exclude) = 0);

    -- MariaDB's JSON is LONGTEXT with a column CHECK (json_valid(`col`)) named after the column:
    -- such a string column is json. TABLE_CONSTRAINTS (MySQL 8.0.16+, MariaDB) names the checks
    -- of the table; CHECK_CONSTRAINTS gives their clauses, matched by schema and name. MySQL
    -- names constraints uniquely per schema, so that match is exact there and its
    -- CHECK_CONSTRAINTS has no TABLE_NAME. MariaDB names them per table (two tables may each
    -- have a check `tags`), so the match also needs CHECK_CONSTRAINTS.TABLE_NAME, a column only
    -- MariaDB has: the statement is prepared with it only where information_schema has it.
    SELECT COUNT(*) > 0 INTO v_checks_per_table FROM information_schema.COLUMNS
     WHERE TABLE_SCHEMA = 'information_schema' AND TABLE_NAME = 'CHECK_CONSTRAINTS' AND COLUMN_NAME = 'TABLE_NAME';
    SET @certyo_sql = CONCAT(
        'UPDATE certyo_columns c SET c.data_type = ''json''',
        ' WHERE c.data_type IN (''char'', ''varchar'', ''tinytext'', ''text'', ''mediumtext'', ''longtext'')',
        '   AND EXISTS (SELECT 1 FROM information_schema.TABLE_CONSTRAINTS t',
        '                 JOIN information_schema.CHECK_CONSTRAINTS k',
        '                   ON k.CONSTRAINT_SCHEMA = t.CONSTRAINT_SCHEMA AND k.CONSTRAINT_NAME = t.CONSTRAINT_NAME',
        IF(v_checks_per_table, ' AND k.TABLE_NAME = t.TABLE_NAME', ''),
        '                WHERE t.TABLE_SCHEMA = ? AND t.TABLE_NAME = ? AND t.CONSTRAINT_TYPE = ''CHECK''',
        '                  AND LOCATE(CONCAT(''json_valid('', c.quoted, '')''), k.CHECK_CLAUSE) > 0)');
    SET @certyo_schema = p_schema, @certyo_table = p_table;
    PREPARE certyo_stmt FROM @certyo_sql;
    EXECUTE certyo_stmt USING @certyo_schema, @certyo_table;
    DEALLOCATE PREPARE certyo_stmt;
    SET @certyo_sql = NULL, @certyo_schema = NULL, @certyo_table = NULL;

    -- GROUP_CONCAT cuts its result at group_concat_max_len, 1024 bytes by default in MySQL (1 MiB
    -- in MariaDB): too short for the column list of a wide table. Raised for this call only.
    -- (MySQL types GREATEST of an unsigned and a signed integer DECIMAL, which the setting
    -- refuses: "Incorrect argument type"; hence the cast.)
    SET SESSION group_concat_max_len = CAST(GREATEST(v_group_concat_max_len, 67108864) AS UNSIGNED);

    -- JSON_OBJECT('name', <value>, ...) for OLD and NEW; the value expression per type:
    --   datetime → 'YYYY-MM-DDTHH:MM:SS[.ffffff]' as written (MySQL stores no zone with it);
    --   timestamp → the same, in UTC; date → 'YYYY-MM-DD'; time → 'HH:MM:SS[.fff]';
    --   binary types → '\x' + lowercase hex; json → nested JSON;
    --   numbers, strings, enums, NULL → as JSON_OBJECT renders them.
    SELECT GROUP_CONCAT(CONCAT(QUOTE(name), ', ', REPLACE(certyo_value_sql(data_type, fsp), '@', CONCAT('OLD.', quoted))) ORDER BY pos SEPARATOR ', ')
      INTO v_old_payload FROM certyo_columns;
    SET v_old_payload = CONCAT('JSON_OBJECT(', v_old_payload, ')');
    SET v_new_payload = REPLACE(v_old_payload, 'OLD.`', 'NEW.`');

    SELECT GROUP_CONCAT(CONCAT(certyo_compare_sql(data_type, CONCAT('OLD.', quoted)), ' <=> ',
                               certyo_compare_sql(data_type, CONCAT('NEW.', quoted))) ORDER BY pos SEPARATOR ' AND ')
      INTO v_business_same FROM certyo_columns;

    -- Record id: one key column's text; several: each escaped (\ → \\, / → \/), joined by '/'.
    -- A TIMESTAMP in UTC (an instant: its text in the writer's time zone would be another record
    -- id in each zone, and in the hour clocks go back one for two instants), as the relay, whose
    -- session is in UTC, renders it. The backslash is CHAR(92): a string literal's meaning
    -- depends on the sql_mode (NO_BACKSLASH_ESCAPES) of the session that creates the triggers.
    -- Also an upper bound of the key's text length, for the check below.
    SELECT IF(COUNT(*) = 1,
              MAX(certyo_key_text_sql(c.DATA_TYPE, c.DATETIME_PRECISION, CONCAT('OLD.`', REPLACE(k.COLUMN_NAME, '`', '``'), '`'))),
              CONCAT('CONCAT_WS(''/'', ', GROUP_CONCAT(CONCAT(
                  'REPLACE(REPLACE(', certyo_key_text_sql(c.DATA_TYPE, c.DATETIME_PRECISION, CONCAT('OLD.`', REPLACE(k.COLUMN_NAME, '`', '``'), '`')),
                  ', CHAR(92 USING utf8mb4), CONCAT(CHAR(92 USING utf8mb4), CHAR(92 USING utf8mb4))), ''/'', CONCAT(CHAR(92 USING utf8mb4), ''/''))')
                  ORDER BY k.ORDINAL_POSITION SEPARATOR ', '), ')')),
           SUM(COALESCE(c.CHARACTER_MAXIMUM_LENGTH, 64)) * IF(COUNT(*) = 1, 1, 2) + COUNT(*) - 1
      INTO v_old_id, v_id_length
      FROM information_schema.KEY_COLUMN_USAGE k
      JOIN information_schema.COLUMNS c
        ON c.TABLE_SCHEMA = k.TABLE_SCHEMA AND c.TABLE_NAME = k.TABLE_NAME AND c.COLUMN_NAME = k.COLUMN_NAME
     WHERE k.TABLE_SCHEMA = p_schema AND k.TABLE_NAME = p_table AND k.CONSTRAINT_NAME = 'PRIMARY';
    SET v_new_id = REPLACE(v_old_id, 'OLD.`', 'NEW.`');
    -- Another record when its text changed, byte for byte: in a case-insensitive collation 'tea'
    -- and 'TEA' are one key to the table, and two records to Certyo (the delete of the one is
    -- sent, then the insert of the other). Compared per key column, each part's text as bytes
    -- (escaping and joining the parts change nothing of which ids are equal, and would cost
    -- every update).
    SELECT GROUP_CONCAT(CONCAT(
               'CAST(', certyo_key_text_sql(c.DATA_TYPE, c.DATETIME_PRECISION, CONCAT('OLD.`', REPLACE(k.COLUMN_NAME, '`', '``'), '`')),
               ' AS BINARY) <=> CAST(', certyo_key_text_sql(c.DATA_TYPE, c.DATETIME_PRECISION, CONCAT('NEW.`', REPLACE(k.COLUMN_NAME, '`', '``'), '`')),
               ' AS BINARY)') ORDER BY k.ORDINAL_POSITION SEPARATOR ' AND ')
      INTO v_id_same
      FROM information_schema.KEY_COLUMN_USAGE k
      JOIN information_schema.COLUMNS c
        ON c.TABLE_SCHEMA = k.TABLE_SCHEMA AND c.TABLE_NAME = k.TABLE_NAME AND c.COLUMN_NAME = k.COLUMN_NAME
     WHERE k.TABLE_SCHEMA = p_schema AND k.TABLE_NAME = p_table AND k.CONSTRAINT_NAME = 'PRIMARY';

    -- The bookkeeping columns the table has: a change of business columns resets them in the
    -- same statement (BEFORE UPDATE), so a row never shows an earlier version's hash as its own,
    -- least of all as anchored, while its new version waits for delivery and the relay's write-back.
    SELECT GROUP_CONCAT(CONCAT('NEW.`', COLUMN_NAME, '` = ', IF(COLUMN_NAME = 'certyo_anchor_status', '''pending''', 'NULL'))
                        ORDER BY ORDINAL_POSITION SEPARATOR ', ')
      INTO v_clear FROM information_schema.COLUMNS
     WHERE TABLE_SCHEMA = p_schema AND TABLE_NAME = p_table
       AND COLUMN_NAME IN ('certyo_record_hash', 'certyo_anchor_status', 'certyo_verified_at');
    SET SESSION group_concat_max_len = v_group_concat_max_len;

    -- Source timestamp (UTC): the timestamp column, else the time of the change.
    SELECT COLUMN_NAME, DATA_TYPE INTO v_ts_column, v_ts_type FROM information_schema.COLUMNS
     WHERE TABLE_SCHEMA = p_schema AND TABLE_NAME = p_table AND DATA_TYPE IN ('datetime', 'timestamp')
       AND COLUMN_NAME = COALESCE(p_timestamp_column, IF(COLUMN_NAME IN ('updated_at', 'modified_at'), COLUMN_NAME, NULL))
     ORDER BY FIELD(COLUMN_NAME, 'updated_at', 'modified_at') LIMIT 1;
    IF p_timestamp_column IS NOT NULL AND v_ts_column IS NULL THEN
        SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'certyo_trigger_ddl: p_timestamp_column is no DATETIME/TIMESTAMP column of the table; name one, or pass NULL';
    END IF;
    -- A TIMESTAMP is an instant: read it in UTC. A DATETIME is a wall-clock time without zone,
    -- taken as written in the writer's session time zone and moved to UTC by that zone's offset
    -- at the time of the change (NOW() - UTC_TIMESTAMP(), one instant, so exact). That needs
    -- no time zone tables and works for SYSTEM, '+02:00' and named zones alike. It is exact
    -- for a column that holds the time of the change (NOW(), DEFAULT/ON UPDATE CURRENT_TIMESTAMP),
    -- also in the hour repeated when clocks go back; a value from the other side of a DST change
    -- is off by the shift. CONVERT_TZ(value, @@session.time_zone, '+00:00') would use the
    -- value's own offset but returns NULL for named zones without the time zone tables, returns
    -- the value unchanged outside the TIMESTAMP range, and must guess in the repeated hour.
    SET v_old_ts = IF(v_ts_column IS NULL, 'UTC_TIMESTAMP(6)',
                      CONCAT('COALESCE(', IF(v_ts_type = 'timestamp',
                                             CONCAT('TIMESTAMP(''1970-01-01'') + INTERVAL ROUND(UNIX_TIMESTAMP(OLD.`', REPLACE(v_ts_column, '`', '``'), '`) * 1000000) MICROSECOND'),
                                             CONCAT('OLD.`', REPLACE(v_ts_column, '`', '``'), '` - INTERVAL TIMESTAMPDIFF(SECOND, UTC_TIMESTAMP(6), NOW(6)) SECOND')),
                             ', UTC_TIMESTAMP(6))'));
    SET v_new_ts = REPLACE(v_old_ts, 'OLD.`', 'NEW.`');

    -- A key whose text may be longer than certyo_queue.record_id holds (768 characters, by an
    -- upper bound: 64 for a key part that is not text): a row whose text is longer is refused
    -- (its insert, update and delete) with an error that says so (cut, under a non-strict sql_mode,
    -- two rows would share one record id; in a strict one the error would not say why).
    IF v_id_length > 768 THEN
        SET v_old_id = CONCAT('certyo_record_id(', v_old_id, ')');
        SET v_new_id = CONCAT('certyo_record_id(', v_new_id, ')');
    END IF;

    SELECT CONCAT_WS('\n',
        'DELIMITER //',
        IF(v_clear IS NULL,
           CONCAT('DROP TRIGGER IF EXISTS ', certyo_trigger_name(p_table, 'bu'), ' //'),
           certyo_trigger_sql(p_table, 'bu', 'BEFORE UPDATE', v_qtable,
               CONCAT('IF NOT (', v_business_same, ') THEN\n    SET ', v_clear, ';\n  END IF;'))),
        certyo_trigger_sql(p_table, 'ai', 'AFTER INSERT', v_qtable,
            certyo_enqueue_sql(v_collection, v_installation, 'insert', v_new_id, v_new_payload, v_new_ts)),
        certyo_trigger_sql(p_table, 'au', 'AFTER UPDATE', v_qtable, CONCAT(
            'IF NOT (', v_business_same, ') THEN\n',
            '    IF NOT (', v_id_same, ') THEN\n',
            '      ', certyo_enqueue_sql(v_collection, v_installation, 'delete', v_old_id, v_old_payload, v_old_ts), '\n',
            '      ', certyo_enqueue_sql(v_collection, v_installation, 'insert', v_new_id, v_new_payload, v_new_ts), '\n',
            '    ELSE\n',
            '      ', certyo_enqueue_sql(v_collection, v_installation, 'update', v_new_id, v_new_payload, v_new_ts), '\n',
            '    END IF;\n',
            '  END IF;')),
        certyo_trigger_sql(p_table, 'ad', 'AFTER DELETE', v_qtable,
            certyo_enqueue_sql(v_collection, v_installation, 'delete', v_old_id, v_old_payload, v_old_ts)),
        'DELIMITER ;') AS ddl;
    DROP TEMPORARY TABLE certyo_columns;
END //

-- The text of a key column `p_ref` in the record id (see certyo_trigger_ddl). The relay
-- computes it again to find the row it marks (write_back.rs, own_record_id: CAST AS CHAR in a
-- session whose time zone is UTC, which for a TIMESTAMP is this): keep the two in step.
DROP FUNCTION IF EXISTS certyo_key_text_sql //
CREATE FUNCTION certyo_key_text_sql(p_type VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin, p_fsp INT,
                                    p_ref TEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin)
    RETURNS TEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin DETERMINISTIC NO SQL
    RETURN IF(p_type = 'timestamp',
              CONCAT('CAST(CAST(TIMESTAMP(''1970-01-01'') + INTERVAL ROUND(UNIX_TIMESTAMP(', p_ref, ') * 1000000) MICROSECOND AS DATETIME(',
                     COALESCE(p_fsp, 0), ')) AS CHAR CHARACTER SET utf8mb4)'),
              CONCAT('CAST(', p_ref, ' AS CHAR CHARACTER SET utf8mb4)')) //

-- A record id, refused when longer than certyo_queue.record_id holds (768 characters).
DROP FUNCTION IF EXISTS certyo_record_id //
CREATE FUNCTION certyo_record_id(p_id LONGTEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin)
    RETURNS VARCHAR(768) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin DETERMINISTIC NO SQL
BEGIN
    IF CHAR_LENGTH(p_id) > 768 THEN
        SIGNAL SQLSTATE '22001' SET MESSAGE_TEXT = 'certyo: the record id (the primary key as text) is longer than 768 characters; refused, lest two rows share one';
    END IF;
    RETURN p_id;
END //

-- The JSON value expression of one column; '@' stands for the column reference.
DROP FUNCTION IF EXISTS certyo_value_sql //
CREATE FUNCTION certyo_value_sql(p_type VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin, p_fsp INT)
    RETURNS TEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin DETERMINISTIC NO SQL
BEGIN
    DECLARE v_format TEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin DEFAULT IF(COALESCE(p_fsp, 0) > 0, '%Y-%m-%dT%H:%i:%s.%f', '%Y-%m-%dT%H:%i:%s');
    RETURN CASE
        WHEN p_type = 'timestamp' THEN CONCAT('DATE_FORMAT(TIMESTAMP(''1970-01-01'') + INTERVAL ROUND(UNIX_TIMESTAMP(@) * 1000000) MICROSECOND, ''', v_format, '''',  ')')
        WHEN p_type = 'datetime' THEN CONCAT('DATE_FORMAT(@, ''', v_format, ''')')
        WHEN p_type = 'date' THEN 'DATE_FORMAT(@, ''%Y-%m-%d'')'
        -- As text, with the column's fractional digits: MySQL's JSON_OBJECT would render a TIME
        -- with six digits, MariaDB's as text; this is the same on both.
        WHEN p_type = 'time' THEN 'CAST(@ AS CHAR)'
        WHEN p_type IN ('binary', 'varbinary', 'tinyblob', 'blob', 'mediumblob', 'longblob', 'bit') THEN 'CONCAT(CHAR(92 USING utf8mb4), ''x'', LOWER(HEX(@)))'
        WHEN p_type = 'json' THEN 'JSON_EXTRACT(@, ''$'')'
        -- Text in utf8mb4_bin, whatever the column's character set and collation: JSON_OBJECT
        -- takes one collation for all its arguments, and the names (the keys) are utf8mb4.
        WHEN p_type IN ('char', 'varchar', 'tinytext', 'text', 'mediumtext', 'longtext', 'enum', 'set')
            THEN 'CONVERT(@ USING utf8mb4) COLLATE utf8mb4_bin'
        ELSE '@'
    END;
END //

-- The expression compared with <=> for the tracking-only filter: bytes for strings.
DROP FUNCTION IF EXISTS certyo_compare_sql //
CREATE FUNCTION certyo_compare_sql(p_type VARCHAR(64) CHARACTER SET utf8mb4 COLLATE utf8mb4_bin, p_ref TEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin)
    RETURNS TEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin DETERMINISTIC NO SQL
BEGIN
    RETURN IF(p_type IN ('char', 'varchar', 'tinytext', 'text', 'mediumtext', 'longtext', 'enum', 'set', 'json'),
              CONCAT('BINARY ', p_ref), p_ref);
END //

DROP FUNCTION IF EXISTS certyo_enqueue_sql //
CREATE FUNCTION certyo_enqueue_sql(
    p_collection TEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin, p_installation TEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin, p_operation TEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin,
    p_record_id LONGTEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin, p_payload LONGTEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin, p_timestamp TEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin)
    RETURNS LONGTEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin DETERMINISTIC NO SQL
BEGIN
    -- queued_at is written, not left to its expression default: with statement-based binary
    -- logging, a statement that evaluates a nondeterministic default is logged as unsafe.
    -- The key needs the queue id, known only after the insert: LAST_INSERT_ID() inside the
    -- trigger is the id of this insert.
    RETURN CONCAT(
        'INSERT INTO certyo_queue (collection, record_id, operation, payload, source_timestamp, queued_at) VALUES (',
        QUOTE(p_collection), ', ', p_record_id, ', ', QUOTE(p_operation), ', ', p_payload, ', ', p_timestamp, ', UTC_TIMESTAMP(6));\n',
        '      UPDATE certyo_queue SET idempotency_key = CONCAT(', QUOTE(CONCAT(p_installation, '-')), ', id) WHERE id = LAST_INSERT_ID();');
END //

DROP FUNCTION IF EXISTS certyo_trigger_name //
CREATE FUNCTION certyo_trigger_name(p_table TEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin, p_suffix TEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin)
    RETURNS TEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin DETERMINISTIC NO SQL
    RETURN CONCAT('`', REPLACE(LEFT(CONCAT('certyo_', p_table), 58), '`', '``'), '_', p_suffix, '`') //

-- p_event: timing and event, e.g. AFTER INSERT.
DROP FUNCTION IF EXISTS certyo_trigger_sql //
CREATE FUNCTION certyo_trigger_sql(
    p_table TEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin, p_suffix TEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin, p_event TEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin,
    p_qtable TEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin, p_body LONGTEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin)
    RETURNS LONGTEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin DETERMINISTIC NO SQL
BEGIN
    DECLARE v_name TEXT CHARACTER SET utf8mb4 COLLATE utf8mb4_bin DEFAULT certyo_trigger_name(p_table, p_suffix);
    RETURN CONCAT(
        'DROP TRIGGER IF EXISTS ', v_name, ' //\n',
        'CREATE TRIGGER ', v_name, ' ', p_event, ' ON ', p_qtable, ' FOR EACH ROW\n',
        'BEGIN\n  ', p_body, '\nEND //');
END //
DELIMITER ;
