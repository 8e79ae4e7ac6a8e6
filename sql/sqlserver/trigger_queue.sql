-- certyo_cdc companion for SQL Server and Azure SQL (tiers without CDC): trigger + queue.
-- The same capture design as the PostgreSQL extension: an AFTER INSERT, UPDATE, DELETE trigger
-- queues each changed row as JSON in the writer's transaction, skipping rows whose business
-- columns did not change (so the write-back of CertyoRecordHash never re-queues a row).
--
-- Run common.sql first, then this once per database, then track each table:
--   EXEC certyo.TrackTable @SchemaName = N'dbo', @TableName = N'Products';
--   EXEC certyo.TrackTable N'dbo', N'Orders', @Exclude = N'CardNumber', @TimestampColumn = N'ChangedAt';
--
-- A queue row maps to a Certyo record as certyo.queue does in PostgreSQL: Collection →
-- collection, RecordId → recordId, Operation → operationType, Payload → recordPayload,
-- SourceTimestamp → sourceTimestamp (UTC), IdempotencyKey → idempotencyKey.
-- certyo-relay (mode "queue") delivers the queue: it keeps each row's delivery state in the
-- columns added below (Status, Attempts, NextAttemptAt, ...), writes the hash back through
-- certyo.WriteBack (common.sql) and verifies the anchoring.
-- Syntax-checked with sqlfluff (dialect tsql); no SQL Server runs in this project's CI.

-- certyo.CheckTable: the newest of common.sql's objects (a common.sql of an earlier version lacks it).
IF OBJECT_ID(N'certyo.TrackedTable', N'U') IS NULL OR OBJECT_ID(N'certyo.CheckTable', N'P') IS NULL
    THROW 50000, N'certyo: run sql/sqlserver/common.sql first, then this script again', 1;
GO

IF OBJECT_ID(N'certyo.Queue', N'U') IS NULL
BEGIN
    CREATE TABLE certyo.Queue (
        Id              BIGINT IDENTITY (1, 1) NOT NULL CONSTRAINT PK_CertyoQueue PRIMARY KEY,
        Collection      NVARCHAR(256)  NOT NULL,            -- schema.table
        RecordId        NVARCHAR(900)  NOT NULL,            -- primary key as text (composite: a/b)
        Operation       NVARCHAR(10)   NOT NULL
            CONSTRAINT CK_CertyoQueue_Operation CHECK (Operation IN (N'insert', N'update', N'delete', N'upsert')),
        Payload         NVARCHAR(MAX)  NOT NULL
            CONSTRAINT CK_CertyoQueue_Payload CHECK (ISJSON(Payload) = 1),  -- business columns only
        SourceTimestamp DATETIME2(7)   NOT NULL,            -- UTC
        Installation    CHAR(12)       NOT NULL,            -- default set below, once
        -- {installation}-{queue id}: unique per change, the same on every redelivery.
        IdempotencyKey  AS CONCAT(Installation, '-', Id) PERSISTED,
        QueuedAt        DATETIME2(7)   NOT NULL CONSTRAINT DF_CertyoQueue_QueuedAt DEFAULT SYSUTCDATETIME(),
        RecordHash      NVARCHAR(128)  NULL,                -- receipt, set by the reader
        DeliveredAt     DATETIME2(7)   NULL                 -- receipt, set by the reader
    );
    -- The delivery-state columns and the indexes follow below, for new and existing queues alike.
    -- A random installation id, fixed for this queue: a re-created queue whose ids restart at
    -- 1 never reuses a key Certyo has seen.
    DECLARE @installation CHAR(12) = LOWER(LEFT(REPLACE(CONVERT(CHAR(36), NEWID()), '-', ''), 12));
    DECLARE @ddl NVARCHAR(MAX) = N'ALTER TABLE certyo.Queue ADD CONSTRAINT DF_CertyoQueue_Installation DEFAULT ('''
        + @installation + N''') FOR Installation;';
    EXEC sys.sp_executesql @ddl;
END;
GO

-- Delivery state, written by certyo-relay; added here when missing so that re-running this
-- script upgrades a queue created by an earlier version (its rows stay).
IF COL_LENGTH(N'certyo.Queue', N'Status') IS NULL
    ALTER TABLE certyo.Queue ADD Status NVARCHAR(10) NOT NULL
        CONSTRAINT DF_CertyoQueue_Status DEFAULT N'pending'
        CONSTRAINT CK_CertyoQueue_Status CHECK (Status IN (N'pending', N'delivered', N'dead'));
IF COL_LENGTH(N'certyo.Queue', N'Attempts') IS NULL      -- deliveries tried: the back-off grows with it
    ALTER TABLE certyo.Queue ADD Attempts INT NOT NULL CONSTRAINT DF_CertyoQueue_Attempts DEFAULT 0;
IF COL_LENGTH(N'certyo.Queue', N'NextAttemptAt') IS NULL -- UTC; NULL: due now
    ALTER TABLE certyo.Queue ADD NextAttemptAt DATETIME2(7) NULL;
IF COL_LENGTH(N'certyo.Queue', N'LastAttemptAt') IS NULL
    ALTER TABLE certyo.Queue ADD LastAttemptAt DATETIME2(7) NULL;
IF COL_LENGTH(N'certyo.Queue', N'LastStatus') IS NULL    -- HTTP status of the last answer; 0: none
    ALTER TABLE certyo.Queue ADD LastStatus SMALLINT NULL;
IF COL_LENGTH(N'certyo.Queue', N'LastError') IS NULL     -- the last failure, for an operator
    ALTER TABLE certyo.Queue ADD LastError NVARCHAR(MAX) NULL;
IF COL_LENGTH(N'certyo.Queue', N'RecordHash') IS NULL
    ALTER TABLE certyo.Queue ADD RecordHash NVARCHAR(128) NULL;
IF COL_LENGTH(N'certyo.Queue', N'DeliveredAt') IS NULL
    ALTER TABLE certyo.Queue ADD DeliveredAt DATETIME2(7) NULL;
IF COL_LENGTH(N'certyo.Queue', N'Replayed') IS NULL      -- Certyo had seen the key already
    ALTER TABLE certyo.Queue ADD Replayed BIT NULL;
IF COL_LENGTH(N'certyo.Queue', N'AnchorStatus') IS NULL  -- NULL until delivered
    ALTER TABLE certyo.Queue ADD AnchorStatus NVARCHAR(10) NULL
        CONSTRAINT CK_CertyoQueue_AnchorStatus CHECK (AnchorStatus IN (N'pending', N'overdue', N'anchored', N'mismatch'));
IF COL_LENGTH(N'certyo.Queue', N'NextVerifyAt') IS NULL  -- UTC; NULL once settled
    ALTER TABLE certyo.Queue ADD NextVerifyAt DATETIME2(7) NULL;
IF COL_LENGTH(N'certyo.Queue', N'VerifyAttempts') IS NULL
    ALTER TABLE certyo.Queue ADD VerifyAttempts INT NOT NULL CONSTRAINT DF_CertyoQueue_VerifyAttempts DEFAULT 0;
IF COL_LENGTH(N'certyo.Queue', N'VerifyError') IS NULL
    ALTER TABLE certyo.Queue ADD VerifyError NVARCHAR(MAX) NULL;
IF COL_LENGTH(N'certyo.Queue', N'VerifiedAt') IS NULL
    ALTER TABLE certyo.Queue ADD VerifiedAt DATETIME2(7) NULL;
IF COL_LENGTH(N'certyo.Queue', N'PolygonTxHash') IS NULL
    ALTER TABLE certyo.Queue ADD PolygonTxHash NVARCHAR(130) NULL;
IF COL_LENGTH(N'certyo.Queue', N'ReportedHash') IS NULL  -- mismatch: the hash Certyo holds
    ALTER TABLE certyo.Queue ADD ReportedHash NVARCHAR(128) NULL;
-- (Collection, RecordId) is too wide for an index key (1,700 bytes): per-record lookups use
-- its hash.
IF COL_LENGTH(N'certyo.Queue', N'RecordKey') IS NULL
    ALTER TABLE certyo.Queue ADD RecordKey AS
        CONVERT(BINARY(32), HASHBYTES('SHA2_256', CONCAT(Collection, NCHAR(0), RecordId))) PERSISTED;
GO

-- Rows an earlier version marked delivered (DeliveredAt only) are delivered, to be verified.
UPDATE certyo.Queue
SET Status = N'delivered', AnchorStatus = N'pending', NextVerifyAt = SYSUTCDATETIME()
WHERE DeliveredAt IS NOT NULL AND Status = N'pending';
DROP INDEX IF EXISTS IX_CertyoQueue_Pending ON certyo.Queue;
-- take: the pending rows in order.
IF NOT EXISTS (SELECT 1 FROM sys.indexes WHERE object_id = OBJECT_ID(N'certyo.Queue') AND name = N'IX_CertyoQueue_Take')
    CREATE INDEX IX_CertyoQueue_Take ON certyo.Queue (Status, Id) INCLUDE (NextAttemptAt, RecordKey);
-- per-record order: is there an earlier pending change of this record?
IF NOT EXISTS (SELECT 1 FROM sys.indexes WHERE object_id = OBJECT_ID(N'certyo.Queue') AND name = N'IX_CertyoQueue_Record')
    CREATE INDEX IX_CertyoQueue_Record ON certyo.Queue (RecordKey, Id) INCLUDE (Status);
-- verification: the delivered rows due, by schedule.
IF NOT EXISTS (SELECT 1 FROM sys.indexes WHERE object_id = OBJECT_ID(N'certyo.Queue') AND name = N'IX_CertyoQueue_Verify')
    CREATE INDEX IX_CertyoQueue_Verify ON certyo.Queue (NextVerifyAt, Id)
        WHERE Status = N'delivered' AND AnchorStatus IN (N'pending', N'overdue');
-- clean-up: settled rows by age.
IF NOT EXISTS (SELECT 1 FROM sys.indexes WHERE object_id = OBJECT_ID(N'certyo.Queue') AND name = N'IX_CertyoQueue_Settled')
    CREATE INDEX IX_CertyoQueue_Settled ON certyo.Queue (DeliveredAt) WHERE AnchorStatus = N'anchored';
GO

-- Delivered rows whose anchoring is verified are kept @RetentionHours for operators (dead
-- letters and mismatches stay until an operator removes them). certyo-relay does the same
-- itself; run this from SQL Agent (or Azure Elastic Jobs) only when no relay runs.
CREATE OR ALTER PROCEDURE certyo.CleanupQueue
    @RetentionHours INT = 24
AS
BEGIN
    SET NOCOUNT ON;
    DELETE TOP (10000) FROM certyo.Queue
    WHERE Status = N'delivered' AND AnchorStatus = N'anchored'
        AND DeliveredAt < DATEADD(HOUR, -@RetentionHours, SYSUTCDATETIME());
END;
GO

-- Adds the bookkeeping columns to a table, (re)creates its capture trigger from the catalog and
-- registers the table in certyo.TrackedTable. Business columns: all but the Certyo columns,
-- @Exclude, rowversion/timestamp columns (every write, the write-back included, changes a
-- rowversion: counting it would re-queue each row after its write-back, forever) and computed
-- columns (derived from the others; not comparable in every case).
--   @Exclude:          comma-separated columns never sent
--   @TimestampColumn:  source of sourceTimestamp (NULL: ModifiedDate, UpdatedAt, updated_at or
--                      modified_at if present, else the time of the change)
CREATE OR ALTER PROCEDURE certyo.TrackTable
    @SchemaName SYSNAME,
    @TableName SYSNAME,
    @Exclude NVARCHAR(MAX) = NULL,
    @TimestampColumn SYSNAME = NULL
AS
BEGIN
    SET NOCOUNT ON;
    DECLARE @object INT;
    EXEC certyo.CheckTable @Caller = N'certyo.TrackTable', @SchemaName = @SchemaName, @TableName = @TableName,
        @NoTableError = 50001, @NoKeyError = 50002, @NoKeyReason = N'the record id is the primary key',
        @Object = @object OUTPUT;
    DECLARE @qualified NVARCHAR(300) = QUOTENAME(@SchemaName) + N'.' + QUOTENAME(@TableName);
    DECLARE @collection NVARCHAR(300) = @SchemaName + N'.' + @TableName;

    EXEC certyo.AddBookkeepingColumns @SchemaName = @SchemaName, @TableName = @TableName;

    -- The business columns and how each is compared and rendered. Strings compare by code
    -- point (a binary collation), so a change of case is a change under any collation.
    DECLARE @columns TABLE (
        ColumnId INT PRIMARY KEY, Quoted NVARCHAR(300), Compared NVARCHAR(400), Rendered NVARCHAR(600));
    INSERT INTO @columns (ColumnId, Quoted, Compared, Rendered)
    SELECT c.column_id,
           QUOTENAME(c.name),
           CASE WHEN t.name IN (N'char', N'varchar', N'nchar', N'nvarchar') THEN N'@.' + QUOTENAME(c.name) + N' COLLATE Latin1_General_BIN2'
                WHEN t.name IN (N'text', N'ntext', N'xml') THEN N'CONVERT(NVARCHAR(MAX), @.' + QUOTENAME(c.name) + N') COLLATE Latin1_General_BIN2'
                WHEN t.name = N'image' THEN N'CONVERT(VARBINARY(MAX), @.' + QUOTENAME(c.name) + N')'
                ELSE N'@.' + QUOTENAME(c.name) END,
           -- FOR JSON writes binary as base64; certyo_cdc writes \x + lowercase hex.
           CASE WHEN t.name IN (N'binary', N'varbinary', N'image')
                    THEN N'CASE WHEN @.' + QUOTENAME(c.name) + N' IS NULL THEN NULL ELSE CONCAT(''\x'', LOWER(CONVERT(VARCHAR(MAX), CONVERT(VARBINARY(MAX), @.'
                         + QUOTENAME(c.name) + N'), 2))) END AS ' + QUOTENAME(c.name)
                WHEN t.name = N'datetimeoffset' THEN N'SWITCHOFFSET(@.' + QUOTENAME(c.name) + N', ''+00:00'') AS ' + QUOTENAME(c.name)
                ELSE N'@.' + QUOTENAME(c.name) + N' AS ' + QUOTENAME(c.name) END
      FROM sys.columns AS c
      JOIN sys.types AS t ON t.user_type_id = c.user_type_id
     WHERE c.object_id = @object
       AND c.name NOT IN (N'CertyoRecordHash', N'CertyoAnchorStatus', N'CertyoVerifiedAt')
       AND c.name NOT IN (SELECT LTRIM(RTRIM(value)) FROM STRING_SPLIT(COALESCE(@Exclude, N''), N','))
       AND c.system_type_id <> 189      -- rowversion / timestamp
       AND c.is_computed = 0;
    IF NOT EXISTS (SELECT 1 FROM @columns)
        THROW 50004, N'certyo.TrackTable: the table has no business columns left to send', 1;

    DECLARE @payload NVARCHAR(MAX) = N'(SELECT ' + (SELECT STRING_AGG(Rendered, N', ') WITHIN GROUP (ORDER BY ColumnId) FROM @columns)
        + N' FOR JSON PATH, WITHOUT_ARRAY_WRAPPER, INCLUDE_NULL_VALUES)';
    DECLARE @changed NVARCHAR(MAX) = N'EXISTS (SELECT ' + (SELECT STRING_AGG(REPLACE(Compared, N'@.', N'i.'), N', ') WITHIN GROUP (ORDER BY ColumnId) FROM @columns)
        + N' EXCEPT SELECT ' + (SELECT STRING_AGG(REPLACE(Compared, N'@.', N'd.'), N', ') WITHIN GROUP (ORDER BY ColumnId) FROM @columns) + N')';

    -- Record id: one key column's text; several: each escaped (\ → \\, / → \/), joined by '/'.
    DECLARE @keys TABLE (KeyOrdinal INT PRIMARY KEY, Quoted NVARCHAR(300));
    INSERT INTO @keys (KeyOrdinal, Quoted)
    SELECT ic.key_ordinal, QUOTENAME(c.name)
      FROM sys.indexes AS ix
      JOIN sys.index_columns AS ic ON ic.object_id = ix.object_id AND ic.index_id = ix.index_id
      JOIN sys.columns AS c ON c.object_id = ic.object_id AND c.column_id = ic.column_id
     WHERE ix.object_id = @object AND ix.is_primary_key = 1;
    DECLARE @recordId NVARCHAR(MAX) = CASE WHEN (SELECT COUNT(*) FROM @keys) = 1
        THEN (SELECT N'CONVERT(NVARCHAR(900), @.' + Quoted + N')' FROM @keys)
        ELSE N'CONCAT_WS(N''/'', ' + (SELECT STRING_AGG(N'REPLACE(REPLACE(CONVERT(NVARCHAR(900), @.' + Quoted + N'), N''\'', N''\\''), N''/'', N''\/'')', N', ')
                                      WITHIN GROUP (ORDER BY KeyOrdinal) FROM @keys) + N')' END;
    DECLARE @join NVARCHAR(MAX) = (SELECT STRING_AGG(N'd.' + Quoted + N' = i.' + Quoted, N' AND ') FROM @keys);
    DECLARE @firstKey NVARCHAR(300) = (SELECT Quoted FROM @keys WHERE KeyOrdinal = 1);

    DECLARE @timestamp SYSNAME = COALESCE(@TimestampColumn,
        (SELECT TOP (1) c.name FROM sys.columns AS c JOIN sys.types AS t ON t.user_type_id = c.user_type_id
          WHERE c.object_id = @object AND t.name IN (N'datetime', N'datetime2', N'datetimeoffset', N'smalldatetime')
            AND c.name IN (N'ModifiedDate', N'UpdatedAt', N'updated_at', N'modified_at')
          ORDER BY CASE c.name WHEN N'ModifiedDate' THEN 1 WHEN N'UpdatedAt' THEN 2 ELSE 3 END));
    IF @TimestampColumn IS NOT NULL AND COL_LENGTH(@qualified, @TimestampColumn) IS NULL
        THROW 50003, N'certyo.TrackTable: @TimestampColumn is not a column of the table', 1;
    DECLARE @sourceTimestamp NVARCHAR(MAX) = CASE WHEN @timestamp IS NULL THEN N'SYSUTCDATETIME()'
        ELSE N'COALESCE(CONVERT(DATETIME2(7), @.' + QUOTENAME(@timestamp) + N'), SYSUTCDATETIME())' END;

    DECLARE @trigger NVARCHAR(300) = QUOTENAME(@SchemaName) + N'.' + QUOTENAME(LEFT(N'CertyoCapture_' + @TableName, 128));
    DECLARE @queueInsert NVARCHAR(200) = N'INSERT INTO certyo.Queue (Collection, RecordId, Operation, Payload, SourceTimestamp)';
    DECLARE @body NVARCHAR(MAX) = N'CREATE OR ALTER TRIGGER ' + @trigger + N' ON ' + @qualified + N'
AFTER INSERT, UPDATE, DELETE AS
BEGIN
    SET NOCOUNT ON;
    -- Old images first: deletes, and the old id of a row whose key changed.
    ' + @queueInsert + N'
    SELECT N' + QUOTENAME(@collection, '''') + N', ' + REPLACE(@recordId, N'@.', N'd.') + N', N''delete'', '
        + REPLACE(@payload, N'@.', N'd.') + N', ' + REPLACE(@sourceTimestamp, N'@.', N'd.') + N'
      FROM deleted AS d LEFT JOIN inserted AS i ON ' + @join + N'
     WHERE i.' + @firstKey + N' IS NULL;
    -- New images: inserts, new ids, and updates whose business columns changed.
    ' + @queueInsert + N'
    SELECT N' + QUOTENAME(@collection, '''') + N', ' + REPLACE(@recordId, N'@.', N'i.') + N', '
        + N'CASE WHEN d.' + @firstKey + N' IS NULL THEN N''insert'' ELSE N''update'' END, '
        + REPLACE(@payload, N'@.', N'i.') + N', ' + REPLACE(@sourceTimestamp, N'@.', N'i.') + N'
      FROM inserted AS i LEFT JOIN deleted AS d ON ' + @join + N'
     WHERE d.' + @firstKey + N' IS NULL OR ' + @changed + N';
END;';
    EXEC sys.sp_executesql @body;
    EXEC certyo.RegisterTable @SchemaName = @SchemaName, @TableName = @TableName, @Mode = N'queue';
END;
GO

CREATE OR ALTER PROCEDURE certyo.UntrackTable
    @SchemaName SYSNAME,
    @TableName SYSNAME
AS
BEGIN
    SET NOCOUNT ON;
    DECLARE @ddl NVARCHAR(MAX) = N'DROP TRIGGER IF EXISTS ' + QUOTENAME(@SchemaName) + N'.'
        + QUOTENAME(LEFT(N'CertyoCapture_' + @TableName, 128));
    EXEC sys.sp_executesql @ddl;
    DELETE FROM certyo.TrackedTable WHERE Collection = @SchemaName + N'.' + @TableName AND Mode = N'queue';
END;
GO
