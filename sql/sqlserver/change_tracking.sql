-- certyo_cdc companion for SQL Server Change Tracking (all editions, Azure SQL): for readers
-- that need only which keys changed, and fetch the current rows themselves. Written for the
-- example table dbo.Products (ProductId, Sku, Name, Category, Price, BatchNumber,
-- ModifiedDate): for another table, replace the names marked "business columns".
--
-- Improves on the change-tracking seed: versions are read in a snapshot so no change committed
-- during a read is skipped; a tracker behind CHANGE_TRACKING_MIN_VALID_VERSION raises instead
-- of silently missing changes; tracking-only updates are dropped with the column mask.
-- Syntax-checked with sqlfluff (dialect tsql); no SQL Server runs in this project's CI.

-- 1. Change tracking with column masks, and snapshot isolation for consistent reads.
-- (Two statements run as dynamic SQL only because sqlfluff's T-SQL grammar lacks them; run
-- directly they behave the same.)
EXEC (N'ALTER DATABASE CURRENT SET CHANGE_TRACKING = ON (CHANGE_RETENTION = 2 DAYS, AUTO_CLEANUP = ON)');
GO
ALTER DATABASE CURRENT SET ALLOW_SNAPSHOT_ISOLATION ON;
GO
EXEC (N'ALTER TABLE dbo.Products ENABLE CHANGE_TRACKING WITH (TRACK_COLUMNS_UPDATED = ON)');
GO

-- 2. Bookkeeping columns, written back by the reader.
ALTER TABLE dbo.Products ADD
    CertyoRecordHash NVARCHAR(128) NULL,
    CertyoAnchorStatus NVARCHAR(20) NULL CONSTRAINT DF_Products_CertyoAnchorStatusCt DEFAULT N'pending',
    CertyoVerifiedAt DATETIME2(7) NULL;
GO

-- 3. The persisted version: advanced only after Certyo accepted everything up to it.
IF SCHEMA_ID(N'certyo') IS NULL EXEC (N'CREATE SCHEMA certyo');
GO
CREATE TABLE certyo.ChangeTrackingVersion (
    TableName SYSNAME NOT NULL CONSTRAINT PK_CertyoChangeTrackingVersion PRIMARY KEY,
    LastVersion BIGINT NULL,                     -- NULL: nothing read yet (backfill first)
    LastReadAt DATETIME2(7) NULL
);
INSERT INTO certyo.ChangeTrackingVersion (TableName) VALUES (N'dbo.Products');
GO

-- 4. One read: the keys changed since LastVersion with the current row (NULL for deletes),
-- mapped to the Certyo fields. @to_version is what to store once everything is accepted.
CREATE OR ALTER PROCEDURE certyo.ReadProductsTrackedChanges
    @to_version BIGINT OUTPUT
AS
BEGIN
    SET NOCOUNT ON;
    SET TRANSACTION ISOLATION LEVEL SNAPSHOT;
    BEGIN TRANSACTION;
    DECLARE @last BIGINT = (SELECT LastVersion FROM certyo.ChangeTrackingVersion WHERE TableName = N'dbo.Products');
    IF @last IS NULL OR @last < CHANGE_TRACKING_MIN_VALID_VERSION(OBJECT_ID(N'dbo.Products'))
    BEGIN
        ROLLBACK TRANSACTION;
        THROW 50020, N'certyo: change tracking no longer holds the changes after LastVersion; backfill dbo.Products, then set LastVersion', 1;
    END;
    SET @to_version = CHANGE_TRACKING_CURRENT_VERSION();
    DECLARE @sku INT = COLUMNPROPERTY(OBJECT_ID(N'dbo.Products'), N'Sku', 'ColumnId');            -- business columns
    DECLARE @name INT = COLUMNPROPERTY(OBJECT_ID(N'dbo.Products'), N'Name', 'ColumnId');
    DECLARE @category INT = COLUMNPROPERTY(OBJECT_ID(N'dbo.Products'), N'Category', 'ColumnId');
    DECLARE @price INT = COLUMNPROPERTY(OBJECT_ID(N'dbo.Products'), N'Price', 'ColumnId');
    DECLARE @batch INT = COLUMNPROPERTY(OBJECT_ID(N'dbo.Products'), N'BatchNumber', 'ColumnId');
    DECLARE @modified INT = COLUMNPROPERTY(OBJECT_ID(N'dbo.Products'), N'ModifiedDate', 'ColumnId');
    SELECT
        N'dbo.Products' AS Collection,
        CONVERT(NVARCHAR(900), ct.ProductId) AS RecordId,
        CASE ct.SYS_CHANGE_OPERATION WHEN 'I' THEN N'insert' WHEN 'U' THEN N'update' ELSE N'delete' END AS Operation,
        (
            SELECT p.ProductId AS ProductId, p.Sku AS Sku, p.Name AS Name, p.Category AS Category,
                   p.Price AS Price, p.BatchNumber AS BatchNumber, p.ModifiedDate AS ModifiedDate
            FOR JSON PATH, WITHOUT_ARRAY_WRAPPER, INCLUDE_NULL_VALUES
        ) AS Payload,                                -- NULL for deletes: the row is gone
        COALESCE(CONVERT(DATETIME2(7), p.ModifiedDate), SYSUTCDATETIME()) AS SourceTimestamp,
        CONCAT(CONVERT(NVARCHAR(900), ct.ProductId), N'-ct', ct.SYS_CHANGE_VERSION) AS IdempotencyKey,
        ct.SYS_CHANGE_VERSION AS ChangeVersion
    FROM CHANGETABLE(CHANGES dbo.Products, @last) AS ct
    LEFT JOIN dbo.Products AS p ON p.ProductId = ct.ProductId
    WHERE ct.SYS_CHANGE_OPERATION IN ('I', 'D')
        OR ct.SYS_CHANGE_COLUMNS IS NULL
        OR CHANGE_TRACKING_IS_COLUMN_IN_MASK(@sku, ct.SYS_CHANGE_COLUMNS) = 1
        OR CHANGE_TRACKING_IS_COLUMN_IN_MASK(@name, ct.SYS_CHANGE_COLUMNS) = 1
        OR CHANGE_TRACKING_IS_COLUMN_IN_MASK(@category, ct.SYS_CHANGE_COLUMNS) = 1
        OR CHANGE_TRACKING_IS_COLUMN_IN_MASK(@price, ct.SYS_CHANGE_COLUMNS) = 1
        OR CHANGE_TRACKING_IS_COLUMN_IN_MASK(@batch, ct.SYS_CHANGE_COLUMNS) = 1
        OR CHANGE_TRACKING_IS_COLUMN_IN_MASK(@modified, ct.SYS_CHANGE_COLUMNS) = 1
    ORDER BY ct.SYS_CHANGE_VERSION;
    COMMIT TRANSACTION;
END;
GO

CREATE OR ALTER PROCEDURE certyo.AdvanceProductsTrackedVersion
    @to_version BIGINT
AS
BEGIN
    SET NOCOUNT ON;
    UPDATE certyo.ChangeTrackingVersion
    SET LastVersion = @to_version, LastReadAt = SYSUTCDATETIME()
    WHERE TableName = N'dbo.Products';
END;
GO
