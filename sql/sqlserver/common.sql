-- certyo_cdc companion for SQL Server and Azure SQL: the objects every mode shares. Run it once
-- per database BEFORE trigger_queue.sql, cdc.sql or change_tracking.sql (each of them checks).
-- Running it again is safe: every object is created only if missing, procedures are replaced.
--
--   certyo.Installation   one random id per database, the prefix of the CDC / Change Tracking
--                         idempotency keys (a re-created database never reuses a key).
--   certyo.TrackedTable   the registry: which tables are tracked, in which mode, how their
--                         changes are read and how the hash is written back. certyo-relay reads
--                         it to know what to poll; the TrackTable* procedures fill it.
--   certyo.Progress       CDC / Change Tracking: per table, the LSN or version up to which every
--                         change is delivered or dead (the relay advances it, never past a gap).
--   certyo.Receipt        CDC / Change Tracking: what Certyo accepted, and its verification.
--   certyo.DeadLetter     CDC / Change Tracking: changes Certyo refused for good, for an operator.
--   certyo.Retry          CDC / Change Tracking: changes that failed transiently, their attempts
--                         and when to try again (kept across relay restarts).
--   certyo.WriteBack      writes the hash / anchor status back to a tracked row (all modes).
--   certyo.ResetProgress  re-initialises a table's progress after changes were lost.
-- Syntax-checked with sqlfluff (dialect tsql); no SQL Server runs in this project's CI.

IF SCHEMA_ID(N'certyo') IS NULL EXEC (N'CREATE SCHEMA certyo');
GO

IF OBJECT_ID(N'certyo.Installation', N'U') IS NULL
BEGIN
    CREATE TABLE certyo.Installation (
        OneRow    BIT          NOT NULL CONSTRAINT PK_CertyoInstallation PRIMARY KEY
            CONSTRAINT CK_CertyoInstallation_OneRow CHECK (OneRow = 1),
        Id        CHAR(12)     NOT NULL,
        CreatedAt DATETIME2(7) NOT NULL CONSTRAINT DF_CertyoInstallation_CreatedAt DEFAULT SYSUTCDATETIME()
    );
    INSERT INTO certyo.Installation (OneRow, Id)
    VALUES (1, LOWER(LEFT(REPLACE(CONVERT(CHAR(36), NEWID()), '-', ''), 12)));
END;
GO

IF OBJECT_ID(N'certyo.TrackedTable', N'U') IS NULL
    CREATE TABLE certyo.TrackedTable (
        Collection      NVARCHAR(256) NOT NULL CONSTRAINT PK_CertyoTrackedTable PRIMARY KEY,  -- schema.table
        SchemaName      SYSNAME       NOT NULL,
        TableName       SYSNAME       NOT NULL,
        Mode            NVARCHAR(20)  NOT NULL
            CONSTRAINT CK_CertyoTrackedTable_Mode CHECK (Mode IN (N'queue', N'cdc', N'change_tracking')),
        KeyColumns      INT           NOT NULL,   -- primary key columns: parts of a record id
        CaptureInstance SYSNAME       NULL,       -- CDC only
        ChangesFunction SYSNAME       NULL,       -- CDC / Change Tracking: certyo.<this>(...)
        -- UPDATE of the bookkeeping columns of one row, generated from the catalog (keys from
        -- the JSON array @Keys); run by certyo.WriteBack.
        WriteBackSql    NVARCHAR(MAX) NOT NULL,
        TrackedAt       DATETIME2(7)  NOT NULL CONSTRAINT DF_CertyoTrackedTable_TrackedAt DEFAULT SYSUTCDATETIME()
    );
GO

IF OBJECT_ID(N'certyo.Progress', N'U') IS NULL
    CREATE TABLE certyo.Progress (
        Collection  NVARCHAR(256) NOT NULL CONSTRAINT PK_CertyoProgress PRIMARY KEY,
        -- CDC: every change with __$start_lsn <= LastLsn is delivered or dead. NULL: start at the
        -- oldest change CDC holds for the capture instance.
        LastLsn     BINARY(10)    NULL,
        -- Change Tracking: every change with SYS_CHANGE_VERSION <= LastVersion is delivered or
        -- dead. Set to the current version when the table is tracked.
        LastVersion BIGINT        NULL,
        UpdatedAt   DATETIME2(7)  NOT NULL CONSTRAINT DF_CertyoProgress_UpdatedAt DEFAULT SYSUTCDATETIME(),
        LastError   NVARCHAR(MAX) NULL,   -- the latest transient failure, for an operator
        LastErrorAt DATETIME2(7)  NULL
    );
GO

IF OBJECT_ID(N'certyo.Receipt', N'U') IS NULL
BEGIN
    CREATE TABLE certyo.Receipt (
        Id                 BIGINT IDENTITY (1, 1) NOT NULL CONSTRAINT PK_CertyoReceipt PRIMARY KEY,
        Collection         NVARCHAR(256)  NOT NULL,
        RecordId           NVARCHAR(900)  NOT NULL,
        -- (Collection, RecordId) is too wide for an index key (1,700 bytes): index its hash.
        RecordKey          AS CONVERT(BINARY(32), HASHBYTES('SHA2_256', CONCAT(Collection, NCHAR(0), RecordId))) PERSISTED,
        Operation          NVARCHAR(10)   NOT NULL
            CONSTRAINT CK_CertyoReceipt_Operation CHECK (Operation IN (N'insert', N'update', N'delete', N'upsert')),
        IdempotencyKey     NVARCHAR(1200) NOT NULL,
        IdempotencyKeyHash AS CONVERT(BINARY(32), HASHBYTES('SHA2_256', IdempotencyKey)) PERSISTED,
        SourceVersion      BIGINT         NULL,       -- Change Tracking: the change's version
        SourceLsn          BINARY(10)     NULL,       -- CDC: the change's __$start_lsn
        Payload            NVARCHAR(MAX)  NOT NULL,   -- exactly as sent
        RecordHash         NVARCHAR(128)  NOT NULL,
        Replayed           BIT            NOT NULL,   -- Certyo had seen the key already
        AcceptedAt         DATETIME2(7)   NOT NULL CONSTRAINT DF_CertyoReceipt_AcceptedAt DEFAULT SYSUTCDATETIME(),
        AnchorStatus       NVARCHAR(10)   NOT NULL CONSTRAINT DF_CertyoReceipt_AnchorStatus DEFAULT N'pending'
            CONSTRAINT CK_CertyoReceipt_AnchorStatus CHECK (AnchorStatus IN (N'pending', N'overdue', N'anchored', N'mismatch')),
        NextVerifyAt       DATETIME2(7)   NULL,       -- UTC; NULL once settled
        VerifyAttempts     INT            NOT NULL CONSTRAINT DF_CertyoReceipt_VerifyAttempts DEFAULT 0,
        LastVerifiedAt     DATETIME2(7)   NULL,
        VerifyError        NVARCHAR(MAX)  NULL,
        VerifiedAt         DATETIME2(7)   NULL,       -- when found anchored
        PolygonTxHash      NVARCHAR(130)  NULL,
        ReportedHash       NVARCHAR(128)  NULL        -- mismatch: the hash Certyo holds
    );
    -- A change re-read after a restart is accepted again as a replay: one receipt per key.
    CREATE UNIQUE INDEX UX_CertyoReceipt_Key ON certyo.Receipt (IdempotencyKeyHash);
    CREATE INDEX IX_CertyoReceipt_Due ON certyo.Receipt (NextVerifyAt, Id)
        WHERE AnchorStatus IN (N'pending', N'overdue');
    CREATE INDEX IX_CertyoReceipt_Record ON certyo.Receipt (RecordKey, Id);
    CREATE INDEX IX_CertyoReceipt_Version ON certyo.Receipt (Collection, SourceVersion);
    CREATE INDEX IX_CertyoReceipt_Settled ON certyo.Receipt (AcceptedAt) WHERE AnchorStatus = N'anchored';
END;
GO

IF OBJECT_ID(N'certyo.DeadLetter', N'U') IS NULL
BEGIN
    CREATE TABLE certyo.DeadLetter (
        Id                 BIGINT IDENTITY (1, 1) NOT NULL CONSTRAINT PK_CertyoDeadLetter PRIMARY KEY,
        Collection         NVARCHAR(256)  NOT NULL,
        RecordId           NVARCHAR(900)  NOT NULL,
        Operation          NVARCHAR(10)   NOT NULL
            CONSTRAINT CK_CertyoDeadLetter_Operation CHECK (Operation IN (N'insert', N'update', N'delete', N'upsert')),
        Payload            NVARCHAR(MAX)  NOT NULL,
        SourceTimestamp    NVARCHAR(40)   NOT NULL,   -- as it would have been sent
        IdempotencyKey     NVARCHAR(1200) NOT NULL,
        IdempotencyKeyHash AS CONVERT(BINARY(32), HASHBYTES('SHA2_256', IdempotencyKey)) PERSISTED,
        SourceVersion      BIGINT         NULL,
        SourceLsn          BINARY(10)     NULL,
        Status             SMALLINT       NOT NULL,   -- HTTP status of the refusal; 0: none
        Error              NVARCHAR(MAX)  NOT NULL,   -- Certyo's answer
        At                 DATETIME2(7)   NOT NULL CONSTRAINT DF_CertyoDeadLetter_At DEFAULT SYSUTCDATETIME(),
        ResolvedAt         DATETIME2(7)   NULL        -- set by an operator once handled
    );
    CREATE UNIQUE INDEX UX_CertyoDeadLetter_Key ON certyo.DeadLetter (IdempotencyKeyHash);
    CREATE INDEX IX_CertyoDeadLetter_Version ON certyo.DeadLetter (Collection, SourceVersion);
END;
GO

-- Registers a tracked table: the registry row, its progress row (kept if present), and the
-- write-back statement from the primary key. Called by the TrackTable* procedures.
CREATE OR ALTER PROCEDURE certyo.RegisterTable
    @SchemaName SYSNAME,
    @TableName SYSNAME,
    @Mode NVARCHAR(20),
    @CaptureInstance SYSNAME = NULL,
    @ChangesFunction SYSNAME = NULL
AS
BEGIN
    SET NOCOUNT ON;
    DECLARE @object INT = OBJECT_ID(QUOTENAME(@SchemaName) + N'.' + QUOTENAME(@TableName), N'U');
    DECLARE @collection NVARCHAR(256) = @SchemaName + N'.' + @TableName;
    IF @object IS NULL
        THROW 50100, N'certyo.RegisterTable: no such table; pass the schema and the table name', 1;
    -- Key parts arrive as a JSON array of text (certyo-relay splits the record id); each is
    -- compared with its column, which converts the text to the column's type.
    DECLARE @where NVARCHAR(MAX) = (
        SELECT STRING_AGG(N't.' + QUOTENAME(c.name) + N' = JSON_VALUE(@Keys, N''$['
                          + CONVERT(NVARCHAR(10), ic.key_ordinal - 1) + N']'')', N' AND ')
                   WITHIN GROUP (ORDER BY ic.key_ordinal)
          FROM sys.indexes AS ix
          JOIN sys.index_columns AS ic ON ic.object_id = ix.object_id AND ic.index_id = ix.index_id
          JOIN sys.columns AS c ON c.object_id = ic.object_id AND c.column_id = ic.column_id
         WHERE ix.object_id = @object AND ix.is_primary_key = 1);
    DECLARE @keyColumns INT = (
        SELECT COUNT(*) FROM sys.index_columns AS ic
          JOIN sys.indexes AS ix ON ix.object_id = ic.object_id AND ix.index_id = ic.index_id
         WHERE ix.object_id = @object AND ix.is_primary_key = 1);
    IF @where IS NULL
        THROW 50102, N'certyo.RegisterTable: the table has no primary key; add one (the record id is the primary key)', 1;
    -- Accepted: @RecordHash set, status pending. Verified: @RecordHash NULL, status anchored or
    -- mismatch, only on a row that still holds @OnlyIfHash (a newer change has its own hash).
    DECLARE @writeBack NVARCHAR(MAX) = N'UPDATE t SET CertyoRecordHash = COALESCE(@RecordHash, t.CertyoRecordHash), '
        + N'CertyoAnchorStatus = @AnchorStatus, '
        + N'CertyoVerifiedAt = CASE WHEN @AnchorStatus = N''anchored'' THEN SYSUTCDATETIME() ELSE t.CertyoVerifiedAt END '
        + N'FROM ' + QUOTENAME(@SchemaName) + N'.' + QUOTENAME(@TableName) + N' AS t WHERE ' + @where
        + N' AND (@OnlyIfHash IS NULL OR t.CertyoRecordHash = @OnlyIfHash);';

    MERGE certyo.TrackedTable AS t
    USING (SELECT @collection AS Collection) AS s ON t.Collection = s.Collection
    WHEN MATCHED THEN UPDATE SET
        SchemaName = @SchemaName, TableName = @TableName, Mode = @Mode, KeyColumns = @keyColumns,
        CaptureInstance = @CaptureInstance, ChangesFunction = @ChangesFunction,
        WriteBackSql = @writeBack, TrackedAt = SYSUTCDATETIME()
    WHEN NOT MATCHED THEN
        INSERT (Collection, SchemaName, TableName, Mode, KeyColumns, CaptureInstance, ChangesFunction, WriteBackSql)
        VALUES (@collection, @SchemaName, @TableName, @Mode, @keyColumns, @CaptureInstance, @ChangesFunction, @writeBack);

    IF @Mode <> N'queue' AND NOT EXISTS (SELECT 1 FROM certyo.Progress WHERE Collection = @collection)
        INSERT INTO certyo.Progress (Collection) VALUES (@collection);
END;
GO

-- The write-back of one row, for certyo-relay: a single parameterised entry point for every
-- tracked table (the statement per table comes from the registry, identifiers quoted there).
-- The capture of each mode ignores it: the trigger's filter, CDC's update mask and Change
-- Tracking's column mask all leave out updates of only the bookkeeping columns.
CREATE OR ALTER PROCEDURE certyo.WriteBack
    @Collection NVARCHAR(256),
    @Keys NVARCHAR(MAX),
    @RecordHash NVARCHAR(128),
    @AnchorStatus NVARCHAR(20),
    @OnlyIfHash NVARCHAR(128)
AS
BEGIN
    SET NOCOUNT ON;
    -- Should the write-back ever meet an application's transaction in a deadlock, it is the
    -- victim (and tried again), never the application. Reverts when the procedure returns.
    SET DEADLOCK_PRIORITY LOW;
    DECLARE @sql NVARCHAR(MAX) = (SELECT WriteBackSql FROM certyo.TrackedTable WHERE Collection = @Collection);
    IF @sql IS NULL
        THROW 50101, N'certyo.WriteBack: the table is not in certyo.TrackedTable; track it with certyo.TrackTable, certyo.TrackTableCdc or certyo.TrackTableChangeTracking', 1;
    EXEC sys.sp_executesql @sql,
        N'@Keys NVARCHAR(MAX), @RecordHash NVARCHAR(128), @AnchorStatus NVARCHAR(20), @OnlyIfHash NVARCHAR(128)',
        @Keys = @Keys, @RecordHash = @RecordHash, @AnchorStatus = @AnchorStatus, @OnlyIfHash = @OnlyIfHash;
END;
GO

-- After CDC cleanup or Change Tracking retention removed changes the relay had not delivered
-- (the relay stops with an error saying so): restart the table's progress at the newest
-- LSN / version. The changes in the gap are NOT sent: re-send the rows' current state yourself
-- (for example with an UPDATE that sets a business column to itself, which both CDC and Change
-- Tracking capture as an update of that column).
IF OBJECT_ID(N'certyo.Retry', N'U') IS NULL
BEGIN
    CREATE TABLE certyo.Retry (
        Collection         NVARCHAR(256)  NOT NULL,
        IdempotencyKey     NVARCHAR(1200) NOT NULL,
        IdempotencyKeyHash AS CONVERT(BINARY(32), HASHBYTES('SHA2_256', IdempotencyKey)) PERSISTED,
        Attempts           INT            NOT NULL,
        NextAttemptAt      DATETIME2(7)   NOT NULL,
        LastError          NVARCHAR(MAX)  NULL,
        LastAttemptAt      DATETIME2(7)   NOT NULL CONSTRAINT DF_CertyoRetry_LastAttemptAt DEFAULT SYSUTCDATETIME()
    );
    CREATE UNIQUE INDEX UX_CertyoRetry_Key ON certyo.Retry (IdempotencyKeyHash);
    CREATE INDEX IX_CertyoRetry_Collection ON certyo.Retry (Collection);
END;
GO

CREATE OR ALTER PROCEDURE certyo.ResetProgress
    @SchemaName SYSNAME,
    @TableName SYSNAME
AS
BEGIN
    SET NOCOUNT ON;
    DECLARE @collection NVARCHAR(256) = @SchemaName + N'.' + @TableName;
    DECLARE @mode NVARCHAR(20) = (SELECT Mode FROM certyo.TrackedTable WHERE Collection = @collection);
    IF @mode IS NULL OR @mode = N'queue'
        THROW 50103, N'certyo.ResetProgress: the table is not tracked with CDC or Change Tracking', 1;
    UPDATE certyo.Progress
    SET LastLsn = CASE WHEN @mode = N'cdc' THEN sys.fn_cdc_get_max_lsn() END,
        LastVersion = CASE WHEN @mode = N'change_tracking' THEN CHANGE_TRACKING_CURRENT_VERSION() END,
        UpdatedAt = SYSUTCDATETIME(),
        LastError = N'progress reset by certyo.ResetProgress',
        LastErrorAt = SYSUTCDATETIME()
    WHERE Collection = @collection;
    DELETE FROM certyo.Retry WHERE Collection = @collection;
END;
GO

-- The business columns of a table, for the CDC and Change Tracking generators: all but the
-- bookkeeping columns, @Exclude (comma-separated), rowversion/timestamp (changed by every
-- write, the write-back included) and computed columns (not captured by CDC). Rendered holds
-- the JSON rendering with the placeholder '@.' for the row alias: binary as \x + lowercase
-- hex (as certyo_cdc writes it), datetimeoffset in UTC.
CREATE OR ALTER FUNCTION certyo.BusinessColumns (@object INT, @Exclude NVARCHAR(MAX))
RETURNS TABLE
AS
RETURN
SELECT
    c.column_id AS ColumnId,
    c.name AS ColumnName,
    QUOTENAME(c.name) AS Quoted,
    CASE WHEN t.name IN (N'binary', N'varbinary', N'image')
            THEN N'CASE WHEN @.' + QUOTENAME(c.name) + N' IS NULL THEN NULL ELSE CONCAT(''\x'', LOWER(CONVERT(VARCHAR(MAX), CONVERT(VARBINARY(MAX), @.'
                 + QUOTENAME(c.name) + N'), 2))) END AS ' + QUOTENAME(c.name)
        WHEN t.name = N'datetimeoffset' THEN N'SWITCHOFFSET(@.' + QUOTENAME(c.name) + N', ''+00:00'') AS ' + QUOTENAME(c.name)
        ELSE N'@.' + QUOTENAME(c.name) + N' AS ' + QUOTENAME(c.name) END AS Rendered
FROM sys.columns AS c
INNER JOIN sys.types AS t ON t.user_type_id = c.user_type_id
WHERE c.object_id = @object
    AND c.name NOT IN (N'CertyoRecordHash', N'CertyoAnchorStatus', N'CertyoVerifiedAt')
    AND c.name NOT IN (SELECT LTRIM(RTRIM(value)) FROM STRING_SPLIT(COALESCE(@Exclude, N''), N','))
    AND c.system_type_id <> 189
    AND c.is_computed = 0;
GO

-- The primary key columns in key order, and the record id expression over them (placeholder
-- '@.'): one column's text; several: each escaped (\ -> \\, / -> \/), joined by '/'.
CREATE OR ALTER FUNCTION certyo.KeyColumns (@object INT)
RETURNS TABLE
AS
RETURN
SELECT
    ic.key_ordinal AS KeyOrdinal,
    c.column_id AS ColumnId,
    QUOTENAME(c.name) AS Quoted,
    COUNT(*) OVER () AS KeyCount
FROM sys.indexes AS ix
INNER JOIN sys.index_columns AS ic ON ic.object_id = ix.object_id AND ic.index_id = ix.index_id
INNER JOIN sys.columns AS c ON c.object_id = ic.object_id AND c.column_id = ic.column_id
WHERE ix.object_id = @object AND ix.is_primary_key = 1;
GO

-- The checks every TrackTable* procedure makes first: the table exists and has a primary key.
-- @Caller names the procedure in the messages; the error numbers and why a key is needed are
-- the caller's own. @Object returns the table's object id.
CREATE OR ALTER PROCEDURE certyo.CheckTable
    @Caller NVARCHAR(128),
    @SchemaName SYSNAME,
    @TableName SYSNAME,
    @NoTableError INT,
    @NoKeyError INT,
    @NoKeyReason NVARCHAR(200),
    @Object INT OUTPUT
AS
BEGIN
    SET NOCOUNT ON;
    DECLARE @message NVARCHAR(2048);
    SET @Object = OBJECT_ID(QUOTENAME(@SchemaName) + N'.' + QUOTENAME(@TableName), N'U');
    IF @Object IS NULL
    BEGIN
        SET @message = @Caller + N': no such table; pass the schema and the table name';
        THROW @NoTableError, @message, 1;
    END;
    IF NOT EXISTS (SELECT 1 FROM sys.indexes WHERE object_id = @Object AND is_primary_key = 1)
    BEGIN
        SET @message = @Caller + N': the table has no primary key; add one (' + @NoKeyReason + N')';
        THROW @NoKeyError, @message, 1;
    END;
END;
GO

-- Adds the bookkeeping columns certyo-relay writes back, when missing.
CREATE OR ALTER PROCEDURE certyo.AddBookkeepingColumns
    @SchemaName SYSNAME,
    @TableName SYSNAME
AS
BEGIN
    SET NOCOUNT ON;
    DECLARE @qualified NVARCHAR(300) = QUOTENAME(@SchemaName) + N'.' + QUOTENAME(@TableName);
    IF COL_LENGTH(@qualified, N'CertyoRecordHash') IS NULL
        EXEC (N'ALTER TABLE ' + @qualified + N' ADD CertyoRecordHash NVARCHAR(128) NULL');
    IF COL_LENGTH(@qualified, N'CertyoAnchorStatus') IS NULL
        EXEC (N'ALTER TABLE ' + @qualified + N' ADD CertyoAnchorStatus NVARCHAR(20) NULL DEFAULT N''pending''');
    IF COL_LENGTH(@qualified, N'CertyoVerifiedAt') IS NULL
        EXEC (N'ALTER TABLE ' + @qualified + N' ADD CertyoVerifiedAt DATETIME2(7) NULL');
END;
GO
