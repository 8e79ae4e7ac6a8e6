-- certyo_cdc companion for SQL Server with Change Data Capture (Standard/Enterprise, Azure SQL
-- Managed Instance, Azure SQL S3 and up), read by certyo-relay in mode "cdc".
--
-- Run common.sql first, then this once per database, then track each table:
--   EXEC certyo.TrackTableCdc @SchemaName = N'dbo', @TableName = N'Products';
--   EXEC certyo.TrackTableCdc N'dbo', N'Orders', @Exclude = N'CardNumber', @TimestampColumn = N'ChangedAt';
-- TrackTableCdc enables CDC on the database and the table (when not yet), adds the bookkeeping
-- columns, generates certyo.CdcChanges_<schema>_<table>(@from_lsn, @to_lsn) from the catalog
-- and registers the table in certyo.TrackedTable (with its progress in certyo.Progress).
-- Re-run it after ALTER TABLE: the function lists the columns. (CDC itself captures a new
-- column only in a new capture instance: pass @CaptureInstance to use one you created.)
--
-- Why fn_cdc_get_all_changes and not the net changes: a net change's __$start_lsn is that of
-- the record's latest change in the range read, so reading the same range again after a later
-- change (the relay's own write-back included) gives a different LSN, hence a different
-- idempotency key, and Certyo would store the same change twice. Every row of the change
-- table is immutable: re-reading a range gives the same rows, so the key
-- {installation}-{schema.table}-{start_lsn}-{seqval}-{operation} is the same on every read.
-- Why 'all' (update mask per change) and not 'all with merge' (mask always NULL, operation only
-- 1 or 5): the mask is what tells a tracking-only update (the write-back) from a real one.
-- Syntax-checked with sqlfluff (dialect tsql); no SQL Server runs in this project's CI.

-- certyo.CheckTable: the newest of common.sql's objects (a common.sql of an earlier version lacks it).
IF OBJECT_ID(N'certyo.TrackedTable', N'U') IS NULL OR OBJECT_ID(N'certyo.CheckTable', N'P') IS NULL
    THROW 50000, N'certyo: run sql/sqlserver/common.sql first, then this script again', 1;
GO

IF NOT EXISTS (SELECT 1 FROM sys.databases WHERE database_id = DB_ID() AND is_cdc_enabled = 1)
    EXEC sys.sp_cdc_enable_db;
GO

--   @Exclude:          comma-separated columns never sent
--   @TimestampColumn:  source of sourceTimestamp (NULL: ModifiedDate, UpdatedAt, updated_at or
--                      modified_at if present, else the commit time of the change)
--   @CaptureInstance:  an existing capture instance of the table (NULL: the newest one, or a
--                      new one named schema_table)
CREATE OR ALTER PROCEDURE certyo.TrackTableCdc
    @SchemaName SYSNAME,
    @TableName SYSNAME,
    @Exclude NVARCHAR(MAX) = NULL,
    @TimestampColumn SYSNAME = NULL,
    @CaptureInstance SYSNAME = NULL
AS
BEGIN
    SET NOCOUNT ON;
    DECLARE @object INT;
    EXEC certyo.CheckTable @Caller = N'certyo.TrackTableCdc', @SchemaName = @SchemaName, @TableName = @TableName,
        @NoTableError = 50001, @NoKeyError = 50002, @NoKeyReason = N'the record id is the primary key',
        @Object = @object OUTPUT;
    DECLARE @qualified NVARCHAR(300) = QUOTENAME(@SchemaName) + N'.' + QUOTENAME(@TableName);
    DECLARE @collection NVARCHAR(256) = @SchemaName + N'.' + @TableName;
    IF @TimestampColumn IS NOT NULL AND COL_LENGTH(@qualified, @TimestampColumn) IS NULL
        THROW 50003, N'certyo.TrackTableCdc: @TimestampColumn is not a column of the table', 1;

    -- Before enabling CDC, so that a new capture instance includes them (their updates are
    -- then recognised by the mask and dropped).
    EXEC certyo.AddBookkeepingColumns @SchemaName = @SchemaName, @TableName = @TableName;

    IF @CaptureInstance IS NULL
        SET @CaptureInstance = (SELECT TOP (1) capture_instance FROM cdc.change_tables
                                 WHERE source_object_id = @object ORDER BY create_date DESC);
    IF @CaptureInstance IS NULL
    BEGIN
        SET @CaptureInstance = LEFT(@SchemaName + N'_' + @TableName, 100);
        EXEC sys.sp_cdc_enable_table
            @source_schema = @SchemaName,
            @source_name = @TableName,
            @role_name = NULL,
            @capture_instance = @CaptureInstance,
            @supports_net_changes = 0;
    END;
    DECLARE @changeTable INT = (SELECT object_id FROM cdc.change_tables
                                 WHERE capture_instance = @CaptureInstance AND source_object_id = @object);
    IF @changeTable IS NULL
        THROW 50004, N'certyo.TrackTableCdc: @CaptureInstance is not a capture instance of this table', 1;

    -- Business columns that the capture instance holds, with their CDC ordinal for the mask.
    DECLARE @columns TABLE (ColumnId INT PRIMARY KEY, Rendered NVARCHAR(800), Ordinal INT);
    INSERT INTO @columns (ColumnId, Rendered, Ordinal)
    SELECT b.ColumnId, b.Rendered, cc.column_ordinal
      FROM certyo.BusinessColumns(@object, @Exclude) AS b
      JOIN cdc.captured_columns AS cc ON cc.object_id = @changeTable AND cc.column_name = b.ColumnName;
    IF NOT EXISTS (SELECT 1 FROM @columns)
        THROW 50005, N'certyo.TrackTableCdc: the capture instance holds no business column of the table', 1;
    IF EXISTS (SELECT 1 FROM certyo.KeyColumns(@object) AS k
                WHERE NOT EXISTS (SELECT 1 FROM cdc.captured_columns AS cc
                                   WHERE cc.object_id = @changeTable AND QUOTENAME(cc.column_name) = k.Quoted))
        THROW 50006, N'certyo.TrackTableCdc: the capture instance does not hold every primary key column', 1;

    DECLARE @payload NVARCHAR(MAX) = N'(SELECT ' + (SELECT STRING_AGG(REPLACE(Rendered, N'@.', N'c.'), N', ') WITHIN GROUP (ORDER BY ColumnId) FROM @columns)
        + N' FOR JSON PATH, WITHOUT_ARRAY_WRAPPER, INCLUDE_NULL_VALUES)';
    DECLARE @masked NVARCHAR(MAX) = (SELECT STRING_AGG(N'sys.fn_cdc_is_bit_set(' + CONVERT(NVARCHAR(10), Ordinal)
                                                       + N', c.__$update_mask) = 1', N' OR ') FROM @columns);
    DECLARE @recordId NVARCHAR(MAX) = CASE WHEN (SELECT COUNT(*) FROM certyo.KeyColumns(@object)) = 1
        THEN (SELECT N'CONVERT(NVARCHAR(900), c.' + Quoted + N')' FROM certyo.KeyColumns(@object))
        ELSE N'CONCAT_WS(N''/'', ' + (SELECT STRING_AGG(N'REPLACE(REPLACE(CONVERT(NVARCHAR(900), c.' + Quoted + N'), N''\'', N''\\''), N''/'', N''\/'')', N', ')
                                      WITHIN GROUP (ORDER BY KeyOrdinal) FROM certyo.KeyColumns(@object)) + N')' END;
    DECLARE @timestamp SYSNAME = COALESCE(@TimestampColumn,
        (SELECT TOP (1) c.name FROM sys.columns AS c JOIN sys.types AS t ON t.user_type_id = c.user_type_id
          WHERE c.object_id = @object AND t.name IN (N'datetime', N'datetime2', N'datetimeoffset', N'smalldatetime')
            AND c.name IN (N'ModifiedDate', N'UpdatedAt', N'updated_at', N'modified_at')
          ORDER BY CASE c.name WHEN N'ModifiedDate' THEN 1 WHEN N'UpdatedAt' THEN 2 ELSE 3 END));
    -- The commit time CDC maps the LSN to is the server's local time: shifted to UTC by the
    -- server's current offset (off by the DST shift for changes made before a DST change).
    DECLARE @commitTime NVARCHAR(MAX) = N'DATEADD(MINUTE, -DATEPART(TZOFFSET, SYSDATETIMEOFFSET()), '
        + N'CONVERT(DATETIME2(7), sys.fn_cdc_map_lsn_to_time(c.__$start_lsn)))';
    DECLARE @sourceTimestamp NVARCHAR(MAX) = CASE WHEN @timestamp IS NULL THEN @commitTime
        ELSE N'COALESCE(CONVERT(DATETIME2(7), c.' + QUOTENAME(@timestamp) + N'), ' + @commitTime + N')' END;

    DECLARE @function SYSNAME = LEFT(N'CdcChanges_' + @SchemaName + N'_' + @TableName, 128);
    DECLARE @body NVARCHAR(MAX) = N'CREATE OR ALTER FUNCTION certyo.' + QUOTENAME(@function)
        + N' (@from_lsn BINARY(10), @to_lsn BINARY(10))
RETURNS TABLE
AS
RETURN
SELECT c.__$start_lsn AS StartLsn, c.__$seqval AS Seqval,
       CASE c.__$operation WHEN 1 THEN N''delete'' WHEN 2 THEN N''insert'' ELSE N''update'' END AS Operation,
       ' + @recordId + N' AS RecordId,
       ' + @payload + N' AS Payload,
       CONVERT(VARCHAR(27), CONVERT(DATETIME2(6), ' + @sourceTimestamp + N'), 121) AS SourceTimestamp
  FROM cdc.' + QUOTENAME(N'fn_cdc_get_all_changes_' + @CaptureInstance) + N'(@from_lsn, @to_lsn, N''all'') AS c
 WHERE c.__$operation IN (1, 2)
    OR (c.__$operation = 4 AND (' + @masked + N'));';
    EXEC sys.sp_executesql @body;
    EXEC certyo.RegisterTable @SchemaName = @SchemaName, @TableName = @TableName, @Mode = N'cdc',
        @CaptureInstance = @CaptureInstance, @ChangesFunction = @function;
END;
GO

-- The changes of one tracked table between two LSNs (both inclusive), oldest first, at most
-- @Limit: what certyo-relay sends. It refuses a range CDC has already cleaned up (the relay
-- checks before, this repeats it for any other caller).
CREATE OR ALTER PROCEDURE certyo.ReadCdcChanges
    @Collection NVARCHAR(256),
    @FromLsn BINARY(10),
    @ToLsn BINARY(10),
    @Limit INT
AS
BEGIN
    SET NOCOUNT ON;
    DECLARE @function SYSNAME, @captureInstance SYSNAME;
    SELECT @function = ChangesFunction, @captureInstance = CaptureInstance
      FROM certyo.TrackedTable WHERE Collection = @Collection AND Mode = N'cdc';
    IF @function IS NULL
        THROW 50010, N'certyo.ReadCdcChanges: the table is not tracked with CDC; run certyo.TrackTableCdc', 1;
    IF @FromLsn < sys.fn_cdc_get_min_lsn(@captureInstance)
        THROW 50011, N'certyo.ReadCdcChanges: CDC cleanup removed changes after the saved progress; see certyo.ResetProgress', 1;
    DECLARE @sql NVARCHAR(MAX) = N'SELECT TOP (@limit) StartLsn, Seqval, Operation, RecordId, Payload, SourceTimestamp FROM certyo.'
        + QUOTENAME(@function) + N'(@from, @to) ORDER BY StartLsn, Seqval, Operation;';
    EXEC sys.sp_executesql @sql, N'@from BINARY(10), @to BINARY(10), @limit INT',
        @from = @FromLsn, @to = @ToLsn, @limit = @Limit;
END;
GO

CREATE OR ALTER PROCEDURE certyo.UntrackTableCdc
    @SchemaName SYSNAME,
    @TableName SYSNAME,
    @DisableCdc BIT = 0
AS
BEGIN
    SET NOCOUNT ON;
    DECLARE @collection NVARCHAR(256) = @SchemaName + N'.' + @TableName;
    DECLARE @function SYSNAME, @captureInstance SYSNAME;
    SELECT @function = ChangesFunction, @captureInstance = CaptureInstance
      FROM certyo.TrackedTable WHERE Collection = @collection AND Mode = N'cdc';
    IF @function IS NULL
        RETURN;
    DECLARE @ddl NVARCHAR(MAX) = N'DROP FUNCTION IF EXISTS certyo.' + QUOTENAME(@function);
    EXEC sys.sp_executesql @ddl;
    DELETE FROM certyo.TrackedTable WHERE Collection = @collection;
    DELETE FROM certyo.Progress WHERE Collection = @collection;
    IF @DisableCdc = 1
        EXEC sys.sp_cdc_disable_table @source_schema = @SchemaName, @source_name = @TableName,
            @capture_instance = @captureInstance;
END;
GO
