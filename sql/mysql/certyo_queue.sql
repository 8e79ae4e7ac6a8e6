-- certyo_cdc companion for MySQL 8 / MariaDB 10.5+: the same capture design as the
-- PostgreSQL extension. Run once per database:
--   mysql shop < sql/mysql/certyo_queue.sql
-- then generate and install the triggers of each table to track (see certyo_trigger_ddl below):
--   mysql -N -r -e "CALL certyo_trigger_ddl('shop', 'products', NULL, NULL)" shop | mysql shop
--
-- A queue row maps to a Certyo record exactly as certyo.queue does in PostgreSQL:
--   collection → collection, record_id → recordId, operation → operationType,
--   payload → recordPayload, source_timestamp → sourceTimestamp (UTC),
--   idempotency_key → idempotencyKey.

-- The transactional outbox: written by the triggers in the writer's transaction (InnoDB), so
-- a rolled-back write leaves nothing. A reader delivers rows in id order and records the
-- receipt (record_hash, delivered_at); the cleanup event removes delivered rows after 24 h.
CREATE TABLE IF NOT EXISTS certyo_queue (
    id               BIGINT UNSIGNED NOT NULL AUTO_INCREMENT PRIMARY KEY,
    collection       VARCHAR(192)  NOT NULL,            -- schema.table
    record_id        VARCHAR(768)  NOT NULL,            -- primary key as text (composite: a/b)
    operation        ENUM('insert', 'update', 'delete', 'upsert') NOT NULL,
    payload          JSON          NOT NULL,            -- business columns only
    source_timestamp DATETIME(6)   NOT NULL,            -- UTC
    idempotency_key  VARCHAR(80)   NULL,                -- {installation}-{id}, set by the trigger
    queued_at        DATETIME(6)   NOT NULL DEFAULT CURRENT_TIMESTAMP(6),
    record_hash      VARCHAR(100)  NULL,                -- receipt: Certyo's recordHash
    delivered_at     DATETIME(6)   NULL,                -- receipt: when Certyo accepted it
    KEY certyo_queue_pending (delivered_at, id)
) ENGINE = InnoDB DEFAULT CHARSET = utf8mb4 COLLATE = utf8mb4_bin;

-- One row: the installation id that prefixes idempotency keys, so a re-created queue whose ids
-- restart at 1 never reuses a key Certyo has seen. The generator bakes it into the triggers.
CREATE TABLE IF NOT EXISTS certyo_installation (
    singleton       TINYINT     NOT NULL PRIMARY KEY DEFAULT 1,
    installation_id VARCHAR(36) NOT NULL,
    CONSTRAINT certyo_installation_single CHECK (singleton = 1)
) ENGINE = InnoDB DEFAULT CHARSET = ascii;
INSERT IGNORE INTO certyo_installation (singleton, installation_id) VALUES (1, LEFT(REPLACE(UUID(), '-', ''), 12));

-- Delivered rows are kept 24 hours for operators, then removed in small batches.
-- Needs the event scheduler: SET GLOBAL event_scheduler = ON (or event_scheduler=ON in my.cnf).
CREATE EVENT IF NOT EXISTS certyo_queue_cleanup
    ON SCHEDULE EVERY 10 MINUTE
    DO DELETE FROM certyo_queue
        WHERE delivered_at IS NOT NULL AND delivered_at < UTC_TIMESTAMP(6) - INTERVAL 24 HOUR
        LIMIT 10000;

DROP PROCEDURE IF EXISTS certyo_trigger_ddl;
DELIMITER //
-- Prints the complete DDL of the three capture triggers of one table, from information_schema:
-- every business column (all but certyo_* and p_exclude), identifiers quoted. MySQL cannot run
-- CREATE TRIGGER from dynamic SQL, so the output is piped back into the mysql client.
--   p_exclude:           comma-separated columns never sent (NULL: none)
--   p_timestamp_column:  source of sourceTimestamp (NULL: updated_at or modified_at if present,
--                        else the time of the change)
CREATE PROCEDURE certyo_trigger_ddl(
    IN p_schema VARCHAR(64), IN p_table VARCHAR(64), IN p_exclude TEXT, IN p_timestamp_column VARCHAR(64))
    READS SQL DATA
BEGIN
    DECLARE v_pk_count INT;
    DECLARE v_qtable TEXT DEFAULT CONCAT('`', REPLACE(p_schema, '`', '``'), '`.`', REPLACE(p_table, '`', '``'), '`');
    DECLARE v_collection TEXT DEFAULT CONCAT(p_schema, '.', p_table);
    DECLARE v_installation VARCHAR(36);
    DECLARE v_ts_column VARCHAR(64);
    DECLARE v_ts_type VARCHAR(64);
    DECLARE v_old_payload, v_new_payload, v_old_id, v_new_id, v_business_same, v_id_same, v_old_ts, v_new_ts TEXT;

    SELECT installation_id INTO v_installation FROM certyo_installation WHERE singleton = 1;

    SELECT COUNT(*) INTO v_pk_count FROM information_schema.KEY_COLUMN_USAGE
     WHERE TABLE_SCHEMA = p_schema AND TABLE_NAME = p_table AND CONSTRAINT_NAME = 'PRIMARY';
    IF v_pk_count = 0 THEN
        SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'certyo_trigger_ddl: the table does not exist or has no primary key; add one (the record id is the primary key)';
    END IF;

    -- The columns that make the payload, with how each renders as JSON. Strings compare as
    -- bytes (BINARY) so that a change of case or trailing spaces is a change, whatever the collation.
    DROP TEMPORARY TABLE IF EXISTS certyo_columns;
    CREATE TEMPORARY TABLE certyo_columns AS
    SELECT c.ORDINAL_POSITION AS pos,
           c.COLUMN_NAME AS name,
           CONCAT('`', REPLACE(c.COLUMN_NAME, '`', '``'), '`') AS quoted,
           -- MariaDB's JSON is LONGTEXT with a json_valid() check: treat it as json.
           IF(c.DATA_TYPE = 'json' OR EXISTS (
                  SELECT 1 FROM information_schema.CHECK_CONSTRAINTS k
                   WHERE k.CONSTRAINT_SCHEMA = c.TABLE_SCHEMA AND k.TABLE_NAME = c.TABLE_NAME
                     AND k.CHECK_CLAUSE LIKE CONCAT('%json_valid(`', c.COLUMN_NAME, '`)%')),
              'json', c.DATA_TYPE) AS data_type,
           c.COLUMN_TYPE AS column_type,
           c.DATETIME_PRECISION AS fsp
      FROM information_schema.COLUMNS c
     WHERE c.TABLE_SCHEMA = p_schema AND c.TABLE_NAME = p_table
       AND c.COLUMN_NAME NOT IN ('certyo_record_hash', 'certyo_anchor_status', 'certyo_verified_at')
       AND (p_exclude IS NULL OR FIND_IN_SET(c.COLUMN_NAME, p_exclude) = 0);

    -- JSON_OBJECT('name', <value>, ...) for OLD and NEW; the value expression per type:
    --   datetime/timestamp → ISO 8601 'YYYY-MM-DDTHH:MM:SS[.ffffff]', timestamp read in UTC;
    --   date → 'YYYY-MM-DD'; binary types → '\x' + lowercase hex; json → nested JSON;
    --   numbers, strings, enums, NULL → as JSON_OBJECT renders them.
    SELECT GROUP_CONCAT(CONCAT(QUOTE(name), ', ', REPLACE(certyo_value_sql(data_type, fsp), '@', CONCAT('OLD.', quoted))) ORDER BY pos SEPARATOR ', ')
      INTO v_old_payload FROM certyo_columns;
    SET v_old_payload = CONCAT('JSON_OBJECT(', v_old_payload, ')');
    SET v_new_payload = REPLACE(v_old_payload, 'OLD.`', 'NEW.`');

    SELECT GROUP_CONCAT(CONCAT(certyo_compare_sql(data_type, CONCAT('OLD.', quoted)), ' <=> ',
                               certyo_compare_sql(data_type, CONCAT('NEW.', quoted))) ORDER BY pos SEPARATOR ' AND ')
      INTO v_business_same FROM certyo_columns;

    -- Record id: one key column's text; several: each escaped (\ → \\, / → \/), joined by '/'.
    SELECT IF(COUNT(*) = 1,
              CONCAT('CAST(OLD.', MAX(CONCAT('`', REPLACE(COLUMN_NAME, '`', '``'), '`')), ' AS CHAR)'),
              CONCAT('CONCAT_WS(''/'', ', GROUP_CONCAT(CONCAT(
                  'REPLACE(REPLACE(CAST(OLD.`', REPLACE(COLUMN_NAME, '`', '``'), '` AS CHAR), ''\\\\'', ''\\\\\\\\''), ''/'', ''\\\\/'')')
                  ORDER BY ORDINAL_POSITION SEPARATOR ', '), ')')),
           GROUP_CONCAT(CONCAT('OLD.`', REPLACE(COLUMN_NAME, '`', '``'), '` <=> NEW.`', REPLACE(COLUMN_NAME, '`', '``'), '`')
                        ORDER BY ORDINAL_POSITION SEPARATOR ' AND ')
      INTO v_old_id, v_id_same
      FROM information_schema.KEY_COLUMN_USAGE
     WHERE TABLE_SCHEMA = p_schema AND TABLE_NAME = p_table AND CONSTRAINT_NAME = 'PRIMARY';
    SET v_new_id = REPLACE(v_old_id, 'OLD.`', 'NEW.`');

    -- Source timestamp: the timestamp column (in UTC), else the time of the change.
    SELECT COLUMN_NAME, DATA_TYPE INTO v_ts_column, v_ts_type FROM information_schema.COLUMNS
     WHERE TABLE_SCHEMA = p_schema AND TABLE_NAME = p_table AND DATA_TYPE IN ('datetime', 'timestamp')
       AND COLUMN_NAME = COALESCE(p_timestamp_column, IF(COLUMN_NAME IN ('updated_at', 'modified_at'), COLUMN_NAME, NULL))
     ORDER BY FIELD(COLUMN_NAME, 'updated_at', 'modified_at') LIMIT 1;
    IF p_timestamp_column IS NOT NULL AND v_ts_column IS NULL THEN
        SIGNAL SQLSTATE '45000' SET MESSAGE_TEXT = 'certyo_trigger_ddl: p_timestamp_column is not a datetime or timestamp column of the table';
    END IF;
    SET v_old_ts = IF(v_ts_column IS NULL, 'UTC_TIMESTAMP(6)',
                      CONCAT('COALESCE(', IF(v_ts_type = 'timestamp',
                                             CONCAT('TIMESTAMP(''1970-01-01'') + INTERVAL ROUND(UNIX_TIMESTAMP(OLD.`', REPLACE(v_ts_column, '`', '``'), '`) * 1000000) MICROSECOND'),
                                             CONCAT('OLD.`', REPLACE(v_ts_column, '`', '``'), '`')),
                             ', UTC_TIMESTAMP(6))'));
    SET v_new_ts = REPLACE(v_old_ts, 'OLD.`', 'NEW.`');

    SELECT CONCAT_WS('\n',
        'DELIMITER //',
        certyo_trigger_sql(p_table, 'ai', 'INSERT', v_qtable,
            certyo_enqueue_sql(v_collection, v_installation, 'insert', v_new_id, v_new_payload, v_new_ts)),
        certyo_trigger_sql(p_table, 'au', 'UPDATE', v_qtable, CONCAT(
            'IF NOT (', v_business_same, ') THEN\n',
            '    IF NOT (', v_id_same, ') THEN\n',
            '      ', certyo_enqueue_sql(v_collection, v_installation, 'delete', v_old_id, v_old_payload, v_old_ts), '\n',
            '      ', certyo_enqueue_sql(v_collection, v_installation, 'insert', v_new_id, v_new_payload, v_new_ts), '\n',
            '    ELSE\n',
            '      ', certyo_enqueue_sql(v_collection, v_installation, 'update', v_new_id, v_new_payload, v_new_ts), '\n',
            '    END IF;\n',
            '  END IF;')),
        certyo_trigger_sql(p_table, 'ad', 'DELETE', v_qtable,
            certyo_enqueue_sql(v_collection, v_installation, 'delete', v_old_id, v_old_payload, v_old_ts)),
        'DELIMITER ;') AS ddl;
    DROP TEMPORARY TABLE certyo_columns;
END //

-- The JSON value expression of one column; '@' stands for the column reference.
DROP FUNCTION IF EXISTS certyo_value_sql //
CREATE FUNCTION certyo_value_sql(p_type VARCHAR(64), p_fsp INT) RETURNS TEXT DETERMINISTIC NO SQL
BEGIN
    DECLARE v_format TEXT DEFAULT IF(COALESCE(p_fsp, 0) > 0, '%Y-%m-%dT%H:%i:%s.%f', '%Y-%m-%dT%H:%i:%s');
    RETURN CASE
        WHEN p_type = 'timestamp' THEN CONCAT('DATE_FORMAT(TIMESTAMP(''1970-01-01'') + INTERVAL ROUND(UNIX_TIMESTAMP(@) * 1000000) MICROSECOND, ''', v_format, '''',  ')')
        WHEN p_type = 'datetime' THEN CONCAT('DATE_FORMAT(@, ''', v_format, ''')')
        WHEN p_type = 'date' THEN 'DATE_FORMAT(@, ''%Y-%m-%d'')'
        WHEN p_type IN ('binary', 'varbinary', 'tinyblob', 'blob', 'mediumblob', 'longblob', 'bit') THEN 'CONCAT(''\\\\x'', LOWER(HEX(@)))'
        WHEN p_type = 'json' THEN 'JSON_EXTRACT(@, ''$'')'
        ELSE '@'
    END;
END //

-- The expression compared with <=> for the tracking-only filter: bytes for strings.
DROP FUNCTION IF EXISTS certyo_compare_sql //
CREATE FUNCTION certyo_compare_sql(p_type VARCHAR(64), p_ref TEXT) RETURNS TEXT DETERMINISTIC NO SQL
BEGIN
    RETURN IF(p_type IN ('char', 'varchar', 'tinytext', 'text', 'mediumtext', 'longtext', 'enum', 'set', 'json'),
              CONCAT('BINARY ', p_ref), p_ref);
END //

DROP FUNCTION IF EXISTS certyo_enqueue_sql //
CREATE FUNCTION certyo_enqueue_sql(p_collection TEXT, p_installation TEXT, p_operation TEXT, p_record_id TEXT, p_payload TEXT, p_timestamp TEXT)
    RETURNS TEXT DETERMINISTIC NO SQL
BEGIN
    -- The key needs the queue id, known only after the insert: LAST_INSERT_ID() inside the
    -- trigger is the id of this insert.
    RETURN CONCAT(
        'INSERT INTO certyo_queue (collection, record_id, operation, payload, source_timestamp) VALUES (',
        QUOTE(p_collection), ', ', p_record_id, ', ', QUOTE(p_operation), ', ', p_payload, ', ', p_timestamp, ');\n',
        '      UPDATE certyo_queue SET idempotency_key = CONCAT(', QUOTE(CONCAT(p_installation, '-')), ', id) WHERE id = LAST_INSERT_ID();');
END //

DROP FUNCTION IF EXISTS certyo_trigger_sql //
CREATE FUNCTION certyo_trigger_sql(p_table TEXT, p_suffix TEXT, p_event TEXT, p_qtable TEXT, p_body TEXT)
    RETURNS TEXT DETERMINISTIC NO SQL
BEGIN
    DECLARE v_name TEXT DEFAULT CONCAT('`', REPLACE(LEFT(CONCAT('certyo_', p_table), 58), '`', '``'), '_', p_suffix, '`');
    RETURN CONCAT(
        'DROP TRIGGER IF EXISTS ', v_name, ' //\n',
        'CREATE TRIGGER ', v_name, ' AFTER ', p_event, ' ON ', p_qtable, ' FOR EACH ROW\n',
        'BEGIN\n  ', p_body, '\nEND //');
END //
DELIMITER ;
