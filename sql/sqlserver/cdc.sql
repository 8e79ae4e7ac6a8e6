-- certyo_cdc companion for SQL Server with Change Data Capture (Standard/Enterprise, Azure SQL
-- Managed Instance, Azure SQL S3 and up). Written for the example table dbo.Products
-- (ProductId, Sku, Name, Category, Price, BatchNumber, ModifiedDate): for another table,
-- replace the capture instance name dbo_Products and the column lists marked "business columns".
--
-- The reader reads certyo.ProductsChanges(@from, @to): one row per changed record, already
-- filtered, mapped and keyed, with the same fields as certyo.queue in PostgreSQL. It does not
-- need to filter in code as the seed design does.
--
-- Why 'all with mask' and not 'all with merge': with 'all with merge', __$operation is only 1
-- (delete) or 5 (insert or update) and __$update_mask is always NULL, so neither can an insert
-- be told from an update nor a tracking-only update be recognized. (The seed design combines
-- 'all with merge' with WHERE __$operation IN (2, 4, 1), which drops every insert and update.)
-- 'all with mask' returns 2 (insert), 4 (update, with the mask of the columns it changed) and
-- 1 (delete), still one net row per record.
-- Syntax-checked with sqlfluff (dialect tsql); no SQL Server runs in this project's CI.

-- 1. Enable CDC on the database and the table (net changes need the primary key).
EXEC sys.sp_cdc_enable_db;
GO
EXEC sys.sp_cdc_enable_table
    @source_schema = N'dbo',
    @source_name = N'Products',
    @role_name = NULL,
    @supports_net_changes = 1;
GO

-- 2. Bookkeeping columns, written back by the reader after Certyo accepts a record.
ALTER TABLE dbo.Products ADD
    CertyoRecordHash NVARCHAR(128) NULL,
    CertyoAnchorStatus NVARCHAR(20) NULL CONSTRAINT DF_Products_CertyoAnchorStatus DEFAULT N'pending',
    CertyoVerifiedAt DATETIME2(7) NULL;
GO

-- 3. Where the reader has got to, per capture instance. It advances only after Certyo accepted
-- everything up to LastLsn, so a crash re-reads (and Certyo answers idempotencyReplayed).
IF SCHEMA_ID(N'certyo') IS NULL EXEC (N'CREATE SCHEMA certyo');
GO
CREATE TABLE certyo.CdcTracker (
    CaptureInstance SYSNAME NOT NULL CONSTRAINT PK_CertyoCdcTracker PRIMARY KEY,
    LastLsn BINARY(10) NULL,                    -- NULL: start from the oldest change CDC holds
    LastReadAt DATETIME2(7) NULL,
    RecordsDelivered BIGINT NOT NULL CONSTRAINT DF_CertyoCdcTracker_Delivered DEFAULT 0
);
INSERT INTO certyo.CdcTracker (CaptureInstance) VALUES (N'dbo_Products');
GO

-- 4. The changes between two LSNs, as Certyo records. Tracking-only updates (only Certyo*
-- columns in the update mask) are dropped here.
CREATE OR ALTER FUNCTION certyo.ProductsChanges (@from_lsn BINARY(10), @to_lsn BINARY(10))
RETURNS TABLE
AS
RETURN
SELECT
    N'dbo.Products' AS Collection,
    CONVERT(NVARCHAR(900), c.ProductId) AS RecordId,
    CASE c.__$operation WHEN 1 THEN N'delete' WHEN 2 THEN N'insert' ELSE N'update' END AS Operation,
    (
        SELECT                                               -- business columns
            c.ProductId AS ProductId,
            c.Sku AS Sku,
            c.Name AS Name,
            c.Category AS Category,
            c.Price AS Price,
            c.BatchNumber AS BatchNumber,
            c.ModifiedDate AS ModifiedDate
        FOR JSON PATH, WITHOUT_ARRAY_WRAPPER, INCLUDE_NULL_VALUES
    ) AS Payload,
    COALESCE(CONVERT(DATETIME2(7), c.ModifiedDate), sys.fn_cdc_map_lsn_to_time(c.__$start_lsn)) AS SourceTimestamp,
    -- {id}-{start_lsn hex}: unique per change, the same every time this range is read again.
    CONCAT(CONVERT(NVARCHAR(900), c.ProductId), N'-', CONVERT(NVARCHAR(20), c.__$start_lsn, 2)) AS IdempotencyKey,
    c.__$start_lsn AS StartLsn
FROM cdc.fn_cdc_get_net_changes_dbo_Products(@from_lsn, @to_lsn, N'all with mask') AS c
CROSS JOIN (
    SELECT                                                   -- business columns except the key
        sys.fn_cdc_get_column_ordinal(N'dbo_Products', N'Sku') AS Sku,
        sys.fn_cdc_get_column_ordinal(N'dbo_Products', N'Name') AS Name,
        sys.fn_cdc_get_column_ordinal(N'dbo_Products', N'Category') AS Category,
        sys.fn_cdc_get_column_ordinal(N'dbo_Products', N'Price') AS Price,
        sys.fn_cdc_get_column_ordinal(N'dbo_Products', N'BatchNumber') AS BatchNumber,
        sys.fn_cdc_get_column_ordinal(N'dbo_Products', N'ModifiedDate') AS ModifiedDate
) AS o
WHERE c.__$operation IN (1, 2)
    OR (
        c.__$operation = 4
        AND (
            sys.fn_cdc_is_bit_set(o.Sku, c.__$update_mask) = 1
            OR sys.fn_cdc_is_bit_set(o.Name, c.__$update_mask) = 1
            OR sys.fn_cdc_is_bit_set(o.Category, c.__$update_mask) = 1
            OR sys.fn_cdc_is_bit_set(o.Price, c.__$update_mask) = 1
            OR sys.fn_cdc_is_bit_set(o.BatchNumber, c.__$update_mask) = 1
            OR sys.fn_cdc_is_bit_set(o.ModifiedDate, c.__$update_mask) = 1
        )
    );
GO

-- 5. One read: the range after LastLsn up to the newest LSN, never below what CDC still holds
-- (if the tracker fell behind CDC's retention, changes were lost: say so instead of skipping).
CREATE OR ALTER PROCEDURE certyo.ReadProductsChanges
    @to_lsn BINARY(10) OUTPUT
AS
BEGIN
    SET NOCOUNT ON;
    DECLARE @min_lsn BINARY(10) = sys.fn_cdc_get_min_lsn(N'dbo_Products');
    DECLARE @last_lsn BINARY(10) = (SELECT LastLsn FROM certyo.CdcTracker WHERE CaptureInstance = N'dbo_Products');
    DECLARE @from_lsn BINARY(10) = CASE WHEN @last_lsn IS NULL THEN @min_lsn ELSE sys.fn_cdc_increment_lsn(@last_lsn) END;
    IF @last_lsn IS NOT NULL AND @from_lsn < @min_lsn
        THROW 50010, N'certyo: CDC cleanup removed changes the reader has not delivered; backfill dbo.Products', 1;
    SET @to_lsn = sys.fn_cdc_get_max_lsn();
    IF @to_lsn IS NULL OR @from_lsn > @to_lsn
        RETURN;
    SELECT Collection, RecordId, Operation, Payload, SourceTimestamp, IdempotencyKey, StartLsn
    FROM certyo.ProductsChanges(@from_lsn, @to_lsn)
    ORDER BY StartLsn;
END;
GO

-- 6. After Certyo accepted every record of a read: advance the tracker.
CREATE OR ALTER PROCEDURE certyo.AdvanceProductsTracker
    @to_lsn BINARY(10),
    @delivered INT
AS
BEGIN
    SET NOCOUNT ON;
    UPDATE certyo.CdcTracker
    SET LastLsn = @to_lsn, LastReadAt = SYSUTCDATETIME(), RecordsDelivered = RecordsDelivered + @delivered
    WHERE CaptureInstance = N'dbo_Products';
END;
GO
