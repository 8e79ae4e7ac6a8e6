//! Every statement certyo-relay sends to SQL Server, as constants: `pg_test/sqlserver.sh`
//! extracts each and parses it with sqlfluff (dialect tsql), as it does the companion scripts.
//! Values are always parameters (`@P1`, `@P2`, ... in binding order), never spliced in; table
//! names come from the registry `certyo.TrackedTable` through the companion's procedures
//! (`certyo.WriteBack`, `certyo.ReadCdcChanges`, `certyo.ReadCtChanges`), which quote them.
//! Times are UTC (`SYSUTCDATETIME()`); durations are milliseconds as INT (DATEADD takes INT).

// ---- transactions (sent as plain batches: sp_executesql would refuse an open transaction) ----

pub const BEGIN: &str = "BEGIN TRANSACTION;";
pub const COMMIT: &str = "COMMIT TRANSACTION;";
/// Also ends a failed snapshot read: the isolation level is the session's, so it is reset.
pub const ROLLBACK: &str = "IF @@TRANCOUNT > 0 ROLLBACK TRANSACTION;
SET TRANSACTION ISOLATION LEVEL READ COMMITTED;";
/// Change Tracking reads: the current version and the changes from one snapshot.
pub const BEGIN_SNAPSHOT: &str = "SET TRANSACTION ISOLATION LEVEL SNAPSHOT;
BEGIN TRANSACTION;";
pub const END_SNAPSHOT: &str = "COMMIT TRANSACTION;
SET TRANSACTION ISOLATION LEVEL READ COMMITTED;";

// ---- all modes ----

pub const CHECK_OBJECTS: &str = "SELECT
    CASE WHEN OBJECT_ID(N'certyo.TrackedTable', N'U') IS NULL THEN 0 ELSE 1 END AS HasRegistry,
    CASE WHEN OBJECT_ID(N'certyo.WriteBack', N'P') IS NULL THEN 0 ELSE 1 END AS HasWriteBack,
    CASE WHEN COL_LENGTH(N'certyo.Queue', N'NextVerifyAt') IS NULL THEN 0 ELSE 1 END AS HasQueue,
    CASE WHEN OBJECT_ID(N'certyo.ReadCdcChanges', N'P') IS NULL THEN 0 ELSE 1 END AS HasCdc,
    CASE WHEN OBJECT_ID(N'certyo.ReadCtChanges', N'P') IS NULL THEN 0 ELSE 1 END AS HasChangeTracking,
    CASE WHEN OBJECT_ID(N'certyo.Receipt', N'U') IS NULL THEN 0 ELSE 1 END AS HasReceipt;";

pub const INSTALLATION: &str = "SELECT Id FROM certyo.Installation WHERE OneRow = 1;";

/// @P1 mode.
pub const TRACKED_TABLES: &str = "SELECT Collection, KeyColumns, CaptureInstance
FROM certyo.TrackedTable
WHERE Mode = @P1
ORDER BY Collection;";

/// @P1 collection, @P2 key parts (JSON array of text), @P3 hash (NULL: keep), @P4 anchor
/// status, @P5 only if the row holds this hash (NULL: any).
pub const WRITE_BACK: &str =
    "EXEC certyo.WriteBack @Collection = @P1, @Keys = @P2, @RecordHash = @P3,
    @AnchorStatus = @P4, @OnlyIfHash = @P5;";

// ---- queue mode (trigger_queue.sql) ----

/// @P1 limit, @P2 probing (1: ignore retry times), @P3 ids in flight (JSON array).
/// A record's change waits while an earlier change of it is pending (per-record order).
pub const QUEUE_TAKE: &str = "SELECT TOP (@P1)
    q.Id, q.Collection, q.RecordId, q.Operation, q.Payload,
    CONVERT(VARCHAR(27), CONVERT(DATETIME2(6), q.SourceTimestamp), 121) AS SourceTimestamp,
    q.IdempotencyKey, q.Attempts
FROM certyo.Queue AS q
WHERE q.Status = N'pending'
    AND (@P2 = 1 OR q.NextAttemptAt IS NULL OR q.NextAttemptAt <= SYSUTCDATETIME())
    AND q.Id NOT IN (SELECT CONVERT(BIGINT, j.value) FROM OPENJSON(@P3) AS j)
    AND NOT EXISTS (
        SELECT 1 FROM certyo.Queue AS e
        WHERE e.RecordKey = q.RecordKey AND e.Id < q.Id AND e.Status = N'pending'
    )
ORDER BY q.Id;";

/// @P1 id, @P2 hash, @P3 replayed, @P4 verify after (ms). Returns whether a newer change of
/// the record is queued (then the row holds newer content: no write-back).
pub const QUEUE_DELIVERED: &str = "UPDATE certyo.Queue
SET Status = N'delivered', RecordHash = @P2, Replayed = @P3, DeliveredAt = SYSUTCDATETIME(),
    Attempts = Attempts + 1, LastAttemptAt = SYSUTCDATETIME(), LastStatus = 202, LastError = NULL,
    NextAttemptAt = NULL, AnchorStatus = N'pending', VerifyAttempts = 0,
    NextVerifyAt = DATEADD(MILLISECOND, CONVERT(INT, @P4), SYSUTCDATETIME())
WHERE Id = @P1 AND Status = N'pending';
SELECT CASE WHEN EXISTS (
    SELECT 1 FROM certyo.Queue AS later
    INNER JOIN certyo.Queue AS this ON this.RecordKey = later.RecordKey
    WHERE this.Id = @P1 AND later.Id > this.Id AND later.Status <> N'dead'
) THEN 1 ELSE 0 END AS NewerChange;";

/// @P1 id, @P2 retry after (ms), @P3 error.
pub const QUEUE_RETRY: &str = "UPDATE certyo.Queue
SET Attempts = Attempts + 1, LastAttemptAt = SYSUTCDATETIME(), LastStatus = NULL, LastError = @P3,
    NextAttemptAt = DATEADD(MILLISECOND, CONVERT(INT, @P2), SYSUTCDATETIME())
WHERE Id = @P1 AND Status = N'pending';";

/// @P1 id, @P2 HTTP status (0: none), @P3 error.
pub const QUEUE_DEAD: &str = "UPDATE certyo.Queue
SET Status = N'dead', Attempts = Attempts + 1, LastAttemptAt = SYSUTCDATETIME(), LastStatus = @P2,
    LastError = @P3, NextAttemptAt = NULL
WHERE Id = @P1 AND Status = N'pending';";

/// @P1 limit. The last column: seconds since Certyo accepted it.
pub const QUEUE_DUE: &str = "SELECT TOP (@P1)
    q.Id, q.Collection, q.RecordId, q.Operation, q.RecordHash, q.VerifyAttempts,
    DATEDIFF_BIG(SECOND, q.DeliveredAt, SYSUTCDATETIME()) AS AcceptedAgeSeconds
FROM certyo.Queue AS q
WHERE q.Status = N'delivered'
    AND q.AnchorStatus IN (N'pending', N'overdue')
    AND q.NextVerifyAt <= SYSUTCDATETIME()
ORDER BY q.NextVerifyAt, q.Id;";

/// @P1 id, @P2 Polygon transaction hash.
pub const QUEUE_ANCHORED: &str = "UPDATE certyo.Queue
SET AnchorStatus = N'anchored', VerifiedAt = SYSUTCDATETIME(), PolygonTxHash = @P2, NextVerifyAt = NULL,
    VerifyAttempts = VerifyAttempts + 1, VerifyError = NULL
WHERE Id = @P1;";

/// @P1 id, @P2 the hash Certyo reports.
pub const QUEUE_MISMATCH: &str = "UPDATE certyo.Queue
SET AnchorStatus = N'mismatch', ReportedHash = @P2, NextVerifyAt = NULL,
    VerifyAttempts = VerifyAttempts + 1, VerifyError = NULL
WHERE Id = @P1;";

/// @P1 id, @P2 ask again after (ms), @P3 overdue, @P4 error.
pub const QUEUE_LATER: &str = "UPDATE certyo.Queue
SET AnchorStatus = CASE WHEN @P3 = 1 THEN N'overdue' ELSE AnchorStatus END,
    NextVerifyAt = DATEADD(MILLISECOND, CONVERT(INT, @P2), SYSUTCDATETIME()),
    VerifyAttempts = VerifyAttempts + 1, VerifyError = @P4
WHERE Id = @P1;";

/// @P1 retention (s). Dead letters and mismatches stay.
pub const QUEUE_CLEAN: &str = "DELETE TOP (10000) FROM certyo.Queue
WHERE Status = N'delivered' AND AnchorStatus = N'anchored'
    AND DeliveredAt < DATEADD(SECOND, -CONVERT(INT, @P1), SYSUTCDATETIME());
SELECT @@ROWCOUNT AS Removed;";

pub const QUEUE_STATUS: &str = "SELECT
    (SELECT COUNT_BIG(*) FROM certyo.Queue WHERE Status = N'pending') AS Pending,
    (SELECT COUNT_BIG(*) FROM certyo.Queue WHERE Status = N'delivered' AND AnchorStatus <> N'anchored') AS Delivered,
    (SELECT COUNT_BIG(*) FROM certyo.Queue WHERE Status = N'delivered' AND AnchorStatus = N'anchored') AS Anchored,
    (SELECT COUNT_BIG(*) FROM certyo.Queue WHERE Status = N'dead') AS Dead,
    (SELECT TOP (1) LastError FROM certyo.Queue WHERE LastError IS NOT NULL ORDER BY LastAttemptAt DESC) AS LastError;";

// ---- CDC and Change Tracking (common.sql, cdc.sql, change_tracking.sql) ----

/// @P1 collection.
pub const PROGRESS_GET: &str =
    "SELECT LastLsn, LastVersion FROM certyo.Progress WHERE Collection = @P1;";

/// @P1 collection, @P2 LSN.
pub const PROGRESS_SAVE_LSN: &str = "UPDATE certyo.Progress
SET LastLsn = @P2, UpdatedAt = SYSUTCDATETIME()
WHERE Collection = @P1;
SELECT @@ROWCOUNT AS Saved;";

/// @P1 collection, @P2 version.
pub const PROGRESS_SAVE_VERSION: &str = "UPDATE certyo.Progress
SET LastVersion = @P2, UpdatedAt = SYSUTCDATETIME()
WHERE Collection = @P1;
SELECT @@ROWCOUNT AS Saved;";

/// @P1 collection, @P2 error.
pub const PROGRESS_ERROR: &str = "UPDATE certyo.Progress
SET LastError = @P2, LastErrorAt = SYSUTCDATETIME()
WHERE Collection = @P1;";

/// @P1 collection, @P2 idempotency key, @P3 attempts, @P4 try again after (ms), @P5 error.
/// A change that failed transiently: its attempts and back-off, kept across restarts.
pub const RETRY_SAVE: &str = "MERGE certyo.Retry WITH (HOLDLOCK) AS r
USING (SELECT CONVERT(BINARY(32), HASHBYTES('SHA2_256', CONVERT(NVARCHAR(1200), @P2))) AS KeyHash) AS k
ON r.IdempotencyKeyHash = k.KeyHash
WHEN MATCHED THEN UPDATE SET Attempts = @P3,
    NextAttemptAt = DATEADD(MILLISECOND, CONVERT(INT, @P4), SYSUTCDATETIME()),
    LastError = @P5, LastAttemptAt = SYSUTCDATETIME()
WHEN NOT MATCHED THEN INSERT (Collection, IdempotencyKey, Attempts, NextAttemptAt, LastError)
    VALUES (@P1, @P2, @P3, DATEADD(MILLISECOND, CONVERT(INT, @P4), SYSUTCDATETIME()), @P5);";

/// @P1 idempotency key: the change is delivered or dead.
pub const RETRY_CLEAR: &str = "DELETE FROM certyo.Retry
WHERE IdempotencyKeyHash = CONVERT(BINARY(32), HASHBYTES('SHA2_256', CONVERT(NVARCHAR(1200), @P1)));";

/// @P1 collection. The retry state of its changes: key, attempts, milliseconds until the next
/// attempt (0 or less: due).
pub const RETRY_LOAD: &str = "SELECT IdempotencyKey, Attempts,
    DATEDIFF_BIG(MILLISECOND, SYSUTCDATETIME(), NextAttemptAt) AS DueInMs
FROM certyo.Retry
WHERE Collection = @P1;";

/// The relays' lease on this database: an application lock owned by the session, taken without
/// waiting (or found held by this session). 1: this session holds it.
pub const LEASE_TAKE: &str = "DECLARE @Result INT = 0;
IF APPLOCK_MODE(N'public', N'certyo-relay', N'Session') = N'Exclusive'
    SET @Result = 1;
ELSE
BEGIN
    EXEC @Result = sp_getapplock @Resource = N'certyo-relay', @LockMode = N'Exclusive',
        @LockOwner = N'Session', @LockTimeout = 0;
    SET @Result = CASE WHEN @Result >= 0 THEN 1 ELSE 0 END;
END;
SELECT @Result AS Held;";

/// Whether any session holds the lease: 1 when it is free (it could be granted now).
pub const LEASE_FREE: &str =
    "SELECT APPLOCK_TEST(N'public', N'certyo-relay', N'Exclusive', N'Session') AS Free;";

/// @P1 mode.
pub const PROGRESS_ALL: &str = "SELECT p.Collection, p.LastLsn, p.LastVersion
FROM certyo.Progress AS p
INNER JOIN certyo.TrackedTable AS t ON t.Collection = p.Collection
WHERE t.Mode = @P1
ORDER BY p.Collection;";

/// @P1 capture instance. fn_cdc_get_min_lsn is 0x00... for an unknown capture instance;
/// fn_cdc_get_max_lsn is NULL before the capture job harvested anything.
pub const CDC_BOUNDS: &str =
    "SELECT sys.fn_cdc_get_min_lsn(@P1) AS MinLsn, sys.fn_cdc_get_max_lsn() AS MaxLsn;";

/// @P1 collection, @P2 from LSN, @P3 to LSN (both inclusive), @P4 limit. Rows: StartLsn,
/// Seqval, Operation, RecordId, Payload, SourceTimestamp.
pub const CDC_READ: &str =
    "EXEC certyo.ReadCdcChanges @Collection = @P1, @FromLsn = @P2, @ToLsn = @P3, @Limit = @P4;";

/// @P1 collection. The minimum valid version is NULL when change tracking is off for it.
pub const CT_BOUNDS: &str = "SELECT
    CHANGE_TRACKING_CURRENT_VERSION() AS CurrentVersion,
    CHANGE_TRACKING_MIN_VALID_VERSION(OBJECT_ID(QUOTENAME(t.SchemaName) + N'.' + QUOTENAME(t.TableName))) AS MinValidVersion
FROM certyo.TrackedTable AS t
WHERE t.Collection = @P1;";

/// @P1 collection, @P2 last version, @P3 limit (more when the last version has more changes).
/// Rows: ChangeVersion, Operation, RecordId, Payload, SourceTimestamp.
pub const CT_READ: &str =
    "EXEC certyo.ReadCtChanges @Collection = @P1, @LastVersion = @P2, @Limit = @P3;";

/// @P1 collection, @P2 version: the changes after the progress that were already delivered or
/// dead (after a restart: re-read changes are recognised, see `log.rs`).
pub const CT_SETTLED_SINCE: &str = "SELECT r.SourceVersion, r.RecordId, r.Operation, r.Payload
FROM certyo.Receipt AS r
WHERE r.Collection = @P1 AND r.SourceVersion > @P2
UNION ALL
SELECT d.SourceVersion, d.RecordId, d.Operation, d.Payload
FROM certyo.DeadLetter AS d
WHERE d.Collection = @P1 AND d.SourceVersion > @P2
ORDER BY SourceVersion;";

/// @P1 collection, @P2 record id, @P3 operation, @P4 idempotency key, @P5 version (CT),
/// @P6 LSN (CDC), @P7 payload, @P8 hash, @P9 replayed, @P10 verify after (ms). One receipt
/// per key: a change re-read after a restart is answered as a replay and not kept twice.
pub const RECEIPT_INSERT: &str = "IF NOT EXISTS (
    SELECT 1 FROM certyo.Receipt
    WHERE IdempotencyKeyHash = CONVERT(BINARY(32), HASHBYTES('SHA2_256', CONVERT(NVARCHAR(1200), @P4)))
)
    INSERT INTO certyo.Receipt (
        Collection, RecordId, Operation, IdempotencyKey, SourceVersion, SourceLsn, Payload,
        RecordHash, Replayed, NextVerifyAt
    )
    VALUES (
        @P1, @P2, @P3, @P4, @P5, @P6, @P7, @P8, @P9,
        DATEADD(MILLISECOND, CONVERT(INT, @P10), SYSUTCDATETIME())
    );";

/// @P1 collection, @P2 record id, @P3 operation, @P4 payload, @P5 source timestamp,
/// @P6 idempotency key, @P7 version, @P8 LSN, @P9 HTTP status, @P10 error.
pub const DEAD_INSERT: &str = "IF NOT EXISTS (
    SELECT 1 FROM certyo.DeadLetter
    WHERE IdempotencyKeyHash = CONVERT(BINARY(32), HASHBYTES('SHA2_256', CONVERT(NVARCHAR(1200), @P6)))
)
    INSERT INTO certyo.DeadLetter (
        Collection, RecordId, Operation, Payload, SourceTimestamp, IdempotencyKey, SourceVersion,
        SourceLsn, Status, Error
    )
    VALUES (@P1, @P2, @P3, @P4, @P5, @P6, @P7, @P8, @P9, @P10);";

/// @P1 limit. The last column: seconds since Certyo accepted it.
pub const RECEIPT_DUE: &str = "SELECT TOP (@P1)
    r.Id, r.Collection, r.RecordId, r.Operation, r.RecordHash, r.VerifyAttempts,
    DATEDIFF_BIG(SECOND, r.AcceptedAt, SYSUTCDATETIME()) AS AcceptedAgeSeconds
FROM certyo.Receipt AS r
WHERE r.AnchorStatus IN (N'pending', N'overdue') AND r.NextVerifyAt <= SYSUTCDATETIME()
ORDER BY r.NextVerifyAt, r.Id;";

/// @P1 id, @P2 Polygon transaction hash.
pub const RECEIPT_ANCHORED: &str = "UPDATE certyo.Receipt
SET AnchorStatus = N'anchored', VerifiedAt = SYSUTCDATETIME(), LastVerifiedAt = SYSUTCDATETIME(),
    PolygonTxHash = @P2, NextVerifyAt = NULL, VerifyAttempts = VerifyAttempts + 1, VerifyError = NULL
WHERE Id = @P1;";

/// @P1 id, @P2 the hash Certyo reports.
pub const RECEIPT_MISMATCH: &str = "UPDATE certyo.Receipt
SET AnchorStatus = N'mismatch', ReportedHash = @P2, LastVerifiedAt = SYSUTCDATETIME(), NextVerifyAt = NULL,
    VerifyAttempts = VerifyAttempts + 1, VerifyError = NULL
WHERE Id = @P1;";

/// @P1 id, @P2 ask again after (ms), @P3 overdue, @P4 error.
pub const RECEIPT_LATER: &str = "UPDATE certyo.Receipt
SET AnchorStatus = CASE WHEN @P3 = 1 THEN N'overdue' ELSE AnchorStatus END,
    NextVerifyAt = DATEADD(MILLISECOND, CONVERT(INT, @P2), SYSUTCDATETIME()),
    LastVerifiedAt = SYSUTCDATETIME(), VerifyAttempts = VerifyAttempts + 1, VerifyError = @P4
WHERE Id = @P1;";

/// @P1 retention (s). Mismatches and dead letters stay for an operator.
pub const RECEIPT_CLEAN: &str = "DELETE TOP (10000) FROM certyo.Receipt
WHERE AnchorStatus = N'anchored' AND AcceptedAt < DATEADD(SECOND, -CONVERT(INT, @P1), SYSUTCDATETIME());
SELECT @@ROWCOUNT AS Removed;";

pub const LOG_STATUS: &str = "SELECT
    (SELECT COUNT_BIG(*) FROM certyo.Receipt WHERE AnchorStatus <> N'anchored') AS Delivered,
    (SELECT COUNT_BIG(*) FROM certyo.Receipt WHERE AnchorStatus = N'anchored') AS Anchored,
    (SELECT COUNT_BIG(*) FROM certyo.DeadLetter WHERE ResolvedAt IS NULL) AS Dead,
    (
        SELECT TOP (1) e.Error FROM (
            SELECT d.Error, d.At FROM certyo.DeadLetter AS d
            UNION ALL
            SELECT p.LastError, p.LastErrorAt FROM certyo.Progress AS p WHERE p.LastError IS NOT NULL
        ) AS e
        ORDER BY e.At DESC
    ) AS LastError;";

/// Every statement, for the tests that check they are parameterised.
#[cfg(test)]
pub const ALL: &[&str] = &[
    BEGIN,
    COMMIT,
    ROLLBACK,
    BEGIN_SNAPSHOT,
    END_SNAPSHOT,
    CHECK_OBJECTS,
    INSTALLATION,
    TRACKED_TABLES,
    WRITE_BACK,
    QUEUE_TAKE,
    QUEUE_DELIVERED,
    QUEUE_RETRY,
    QUEUE_DEAD,
    QUEUE_DUE,
    QUEUE_ANCHORED,
    QUEUE_MISMATCH,
    QUEUE_LATER,
    QUEUE_CLEAN,
    QUEUE_STATUS,
    PROGRESS_GET,
    PROGRESS_SAVE_LSN,
    PROGRESS_SAVE_VERSION,
    PROGRESS_ERROR,
    PROGRESS_ALL,
    RETRY_SAVE,
    RETRY_CLEAR,
    RETRY_LOAD,
    LEASE_TAKE,
    LEASE_FREE,
    CDC_BOUNDS,
    CDC_READ,
    CT_BOUNDS,
    CT_READ,
    CT_SETTLED_SINCE,
    RECEIPT_INSERT,
    DEAD_INSERT,
    RECEIPT_DUE,
    RECEIPT_ANCHORED,
    RECEIPT_MISMATCH,
    RECEIPT_LATER,
    RECEIPT_CLEAN,
    LOG_STATUS,
];
