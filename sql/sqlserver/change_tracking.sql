-- certyo_cdc companion for SQL Server Change Tracking (all editions, Azure SQL), read by
-- certyo-relay in mode "change_tracking".
--
-- Run common.sql first, then this once per database, then track each table:
--   EXEC certyo.TrackTableChangeTracking @SchemaName = N'dbo', @TableName = N'Products';
--   EXEC certyo.TrackTableChangeTracking N'dbo', N'Orders', @Exclude = N'CardNumber', @TimestampColumn = N'ChangedAt';
-- It enables change tracking (with column masks) on the table when not yet, adds the
-- bookkeeping columns, generates certyo.CtChanges_<schema>_<table>(@last_version) from the
-- catalog and registers the table in certyo.TrackedTable, its progress starting at the current
-- version (rows that exist already are not sent: CHANGETABLE holds changes, not rows).
-- Re-run it after ALTER TABLE: the function lists the columns.
--
-- Change tracking records which keys changed, not the old values: a change is read with the
-- row as it is now. A DELETE has no row any more, so its payload is the key columns (as JSON,
-- rendered as the row's would be): Certyo refuses an empty payload, and the keys are what is
-- known. sourceTimestamp is the row's timestamp column (ModifiedDate, ...) when it has one,
-- else the time of the read (change tracking keeps no commit time per change here).
--
-- The relay reads in a snapshot transaction (ALLOW_SNAPSHOT_ISOLATION, below): the current
-- version and the changes are read consistently, so no change committed during a read is
-- skipped. Progress older than CHANGE_TRACKING_MIN_VALID_VERSION stops the relay with an error
-- (changes were lost) instead of silently skipping them: see certyo.ResetProgress.
-- Syntax-checked with sqlfluff (dialect tsql); no SQL Server runs in this project's CI.

-- certyo.CheckTable: the newest of common.sql's objects (a common.sql of an earlier version lacks it).
IF OBJECT_ID(N'certyo.TrackedTable', N'U') IS NULL OR OBJECT_ID(N'certyo.CheckTable', N'P') IS NULL
    THROW 50000, N'certyo: run sql/sqlserver/common.sql first, then this script again', 1;
GO

-- Change tracking on the database, and snapshot isolation for consistent reads. (The first
-- runs as dynamic SQL only because sqlfluff's T-SQL grammar lacks it; run directly it behaves
-- the same.)
IF NOT EXISTS (SELECT 1 FROM sys.change_tracking_databases WHERE database_id = DB_ID())
    EXEC (N'ALTER DATABASE CURRENT SET CHANGE_TRACKING = ON (CHANGE_RETENTION = 2 DAYS, AUTO_CLEANUP = ON)');
GO
ALTER DATABASE CURRENT SET ALLOW_SNAPSHOT_ISOLATION ON;
GO

--   @Exclude:          comma-separated columns never sent
--   @TimestampColumn:  source of sourceTimestamp (NULL: ModifiedDate, UpdatedAt, updated_at or
--                      modified_at if present, else the time of the read)
CREATE OR ALTER PROCEDURE certyo.TrackTableChangeTracking
    @SchemaName SYSNAME,
    @TableName SYSNAME,
    @Exclude NVARCHAR(MAX) = NULL,
    @TimestampColumn SYSNAME = NULL
AS
BEGIN
    SET NOCOUNT ON;
    DECLARE @object INT;
    EXEC certyo.CheckTable @Caller = N'certyo.TrackTableChangeTracking', @SchemaName = @SchemaName, @TableName = @TableName,
        @NoTableError = 50021, @NoKeyError = 50022, @NoKeyReason = N'change tracking and the record id need it',
        @Object = @object OUTPUT;
    DECLARE @qualified NVARCHAR(300) = QUOTENAME(@SchemaName) + N'.' + QUOTENAME(@TableName);
    DECLARE @collection NVARCHAR(256) = @SchemaName + N'.' + @TableName;
    IF @TimestampColumn IS NOT NULL AND COL_LENGTH(@qualified, @TimestampColumn) IS NULL
        THROW 50023, N'certyo.TrackTableChangeTracking: @TimestampColumn is not a column of the table', 1;

    EXEC certyo.AddBookkeepingColumns @SchemaName = @SchemaName, @TableName = @TableName;
    IF NOT EXISTS (SELECT 1 FROM sys.change_tracking_tables WHERE object_id = @object)
    BEGIN
        DECLARE @enable NVARCHAR(MAX) = N'ALTER TABLE ' + @qualified
            + N' ENABLE CHANGE_TRACKING WITH (TRACK_COLUMNS_UPDATED = ON)';
        EXEC sys.sp_executesql @enable;
    END;
    IF NOT EXISTS (SELECT 1 FROM sys.change_tracking_tables WHERE object_id = @object AND is_track_columns_updated_on = 1)
        THROW 50024, N'certyo.TrackTableChangeTracking: change tracking is on without TRACK_COLUMNS_UPDATED; disable it on the table and run this again', 1;

    DECLARE @columns TABLE (ColumnId INT PRIMARY KEY, Rendered NVARCHAR(800));
    INSERT INTO @columns (ColumnId, Rendered)
    SELECT ColumnId, Rendered FROM certyo.BusinessColumns(@object, @Exclude);
    IF NOT EXISTS (SELECT 1 FROM @columns)
        THROW 50025, N'certyo.TrackTableChangeTracking: the table has no business columns left to send', 1;
    -- The key columns' renderings, for the payload of a delete.
    DECLARE @keyRendered NVARCHAR(MAX) = (
        SELECT STRING_AGG(REPLACE(b.Rendered, N'@.', N'ct.'), N', ') WITHIN GROUP (ORDER BY k.KeyOrdinal)
          FROM certyo.KeyColumns(@object) AS k
          JOIN certyo.BusinessColumns(@object, NULL) AS b ON b.ColumnId = k.ColumnId);

    DECLARE @payload NVARCHAR(MAX) = N'(SELECT ' + (SELECT STRING_AGG(REPLACE(Rendered, N'@.', N'p.'), N', ') WITHIN GROUP (ORDER BY ColumnId) FROM @columns)
        + N' FOR JSON PATH, WITHOUT_ARRAY_WRAPPER, INCLUDE_NULL_VALUES)';
    DECLARE @keyPayload NVARCHAR(MAX) = N'(SELECT ' + @keyRendered + N' FOR JSON PATH, WITHOUT_ARRAY_WRAPPER, INCLUDE_NULL_VALUES)';
    DECLARE @masked NVARCHAR(MAX) = (SELECT STRING_AGG(N'CHANGE_TRACKING_IS_COLUMN_IN_MASK(' + CONVERT(NVARCHAR(10), ColumnId)
                                                       + N', ct.SYS_CHANGE_COLUMNS) = 1', N' OR ') FROM @columns);
    DECLARE @recordId NVARCHAR(MAX) = CASE WHEN (SELECT COUNT(*) FROM certyo.KeyColumns(@object)) = 1
        THEN (SELECT N'CONVERT(NVARCHAR(900), ct.' + Quoted + N')' FROM certyo.KeyColumns(@object))
        ELSE N'CONCAT_WS(N''/'', ' + (SELECT STRING_AGG(N'REPLACE(REPLACE(CONVERT(NVARCHAR(900), ct.' + Quoted + N'), N''\'', N''\\''), N''/'', N''\/'')', N', ')
                                      WITHIN GROUP (ORDER BY KeyOrdinal) FROM certyo.KeyColumns(@object)) + N')' END;
    DECLARE @join NVARCHAR(MAX) = (SELECT STRING_AGG(N'p.' + Quoted + N' = ct.' + Quoted, N' AND ') FROM certyo.KeyColumns(@object));
    DECLARE @firstKey NVARCHAR(300) = (SELECT Quoted FROM certyo.KeyColumns(@object) WHERE KeyOrdinal = 1);
    DECLARE @timestamp SYSNAME = COALESCE(@TimestampColumn,
        (SELECT TOP (1) c.name FROM sys.columns AS c JOIN sys.types AS t ON t.user_type_id = c.user_type_id
          WHERE c.object_id = @object AND t.name IN (N'datetime', N'datetime2', N'datetimeoffset', N'smalldatetime')
            AND c.name IN (N'ModifiedDate', N'UpdatedAt', N'updated_at', N'modified_at')
          ORDER BY CASE c.name WHEN N'ModifiedDate' THEN 1 WHEN N'UpdatedAt' THEN 2 ELSE 3 END));
    DECLARE @sourceTimestamp NVARCHAR(MAX) = CASE WHEN @timestamp IS NULL THEN N'SYSUTCDATETIME()'
        ELSE N'COALESCE(CONVERT(DATETIME2(7), p.' + QUOTENAME(@timestamp) + N'), SYSUTCDATETIME())' END;

    -- A row gone (deleted, or deleted again after its insert) is a delete with the keys as
    -- payload. Updates touching only bookkeeping or excluded columns are dropped by the mask
    -- (SYS_CHANGE_COLUMNS is NULL only for inserts, deletes and updates of every column).
    DECLARE @function SYSNAME = LEFT(N'CtChanges_' + @SchemaName + N'_' + @TableName, 128);
    DECLARE @body NVARCHAR(MAX) = N'CREATE OR ALTER FUNCTION certyo.' + QUOTENAME(@function) + N' (@last_version BIGINT)
RETURNS TABLE
AS
RETURN
SELECT ct.SYS_CHANGE_VERSION AS ChangeVersion,
       CASE WHEN p.' + @firstKey + N' IS NULL THEN N''delete'' WHEN ct.SYS_CHANGE_OPERATION = N''I'' THEN N''insert'' ELSE N''update'' END AS Operation,
       ' + @recordId + N' AS RecordId,
       CASE WHEN p.' + @firstKey + N' IS NULL THEN ' + @keyPayload + N' ELSE ' + @payload + N' END AS Payload,
       CONVERT(VARCHAR(27), CONVERT(DATETIME2(6), ' + @sourceTimestamp + N'), 121) AS SourceTimestamp
  FROM CHANGETABLE(CHANGES ' + @qualified + N', @last_version) AS ct
  LEFT JOIN ' + @qualified + N' AS p ON ' + @join + N'
 WHERE ct.SYS_CHANGE_OPERATION IN (N''I'', N''D'')
    OR ct.SYS_CHANGE_COLUMNS IS NULL
    OR ' + @masked + N';';
    EXEC sys.sp_executesql @body;
    EXEC certyo.RegisterTable @SchemaName = @SchemaName, @TableName = @TableName, @Mode = N'change_tracking',
        @ChangesFunction = @function;
    -- Start at the current version when the table is new to certyo (kept when re-tracked).
    UPDATE certyo.Progress SET LastVersion = CHANGE_TRACKING_CURRENT_VERSION(), UpdatedAt = SYSUTCDATETIME()
    WHERE Collection = @collection AND LastVersion IS NULL;
END;
GO

-- The changes of one tracked table after @LastVersion, oldest version first: the first @Limit
-- and every other change of the last version read (WITH TIES), so that a version is never
-- split between two reads. The relay calls it inside its snapshot transaction.
CREATE OR ALTER PROCEDURE certyo.ReadCtChanges
    @Collection NVARCHAR(256),
    @LastVersion BIGINT,
    @Limit INT
AS
BEGIN
    SET NOCOUNT ON;
    DECLARE @function SYSNAME = (SELECT ChangesFunction FROM certyo.TrackedTable
                                  WHERE Collection = @Collection AND Mode = N'change_tracking');
    IF @function IS NULL
        THROW 50026, N'certyo.ReadCtChanges: the table is not tracked with change tracking; run certyo.TrackTableChangeTracking', 1;
    DECLARE @sql NVARCHAR(MAX) = N'SELECT TOP (@limit) WITH TIES ChangeVersion, Operation, RecordId, Payload, SourceTimestamp FROM certyo.'
        + QUOTENAME(@function) + N'(@last) ORDER BY ChangeVersion;';
    EXEC sys.sp_executesql @sql, N'@last BIGINT, @limit INT', @last = @LastVersion, @limit = @Limit;
END;
GO

CREATE OR ALTER PROCEDURE certyo.UntrackTableChangeTracking
    @SchemaName SYSNAME,
    @TableName SYSNAME,
    @DisableChangeTracking BIT = 0
AS
BEGIN
    SET NOCOUNT ON;
    DECLARE @collection NVARCHAR(256) = @SchemaName + N'.' + @TableName;
    DECLARE @function SYSNAME = (SELECT ChangesFunction FROM certyo.TrackedTable
                                  WHERE Collection = @collection AND Mode = N'change_tracking');
    IF @function IS NULL
        RETURN;
    DECLARE @ddl NVARCHAR(MAX) = N'DROP FUNCTION IF EXISTS certyo.' + QUOTENAME(@function);
    EXEC sys.sp_executesql @ddl;
    DELETE FROM certyo.TrackedTable WHERE Collection = @collection;
    DELETE FROM certyo.Progress WHERE Collection = @collection;
    IF @DisableChangeTracking = 1
    BEGIN
        SET @ddl = N'ALTER TABLE ' + QUOTENAME(@SchemaName) + N'.' + QUOTENAME(@TableName) + N' DISABLE CHANGE_TRACKING';
        EXEC sys.sp_executesql @ddl;
    END;
END;
GO
