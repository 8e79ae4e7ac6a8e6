//! The worker's settings (GUCs). All reload on SIGHUP except `certyo.database_name` and
//! `certyo.max_databases`, read at server start. Time
//! settings take Postgres units ('200ms', '30s', '24h'); out-of-range values are refused by
//! Postgres with the range in the message.

use crate::capture::options::WriteBack;
use pgrx::guc::{GucContext, GucFlags, GucRegistry, GucSetting};
use std::ffi::CString;
use std::time::Duration;

static BASE_URL: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"https://www.certyos.com"));
static API_KEY: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
static API_KEY_FILE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
static TENANT_ID: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
static DATABASE_NAME: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
static MAX_DATABASES: GucSetting<i32> = GucSetting::<i32>::new(8);
static BATCH_SIZE: GucSetting<i32> = GucSetting::<i32>::new(1000);
static BULK_THRESHOLD: GucSetting<i32> = GucSetting::<i32>::new(10);
static POLL_INTERVAL_MS: GucSetting<i32> = GucSetting::<i32>::new(1000);
static LINGER_MS: GucSetting<i32> = GucSetting::<i32>::new(20);
static REQUEST_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(30_000);
static MAX_RATE_LIMIT_RETRIES: GucSetting<i32> = GucSetting::<i32>::new(3);
static RETENTION_S: GucSetting<i32> = GucSetting::<i32>::new(86_400);
static ENABLED: GucSetting<bool> = GucSetting::<bool>::new(true);
static VERIFY_MIN_AGE_MS: GucSetting<i32> = GucSetting::<i32>::new(120_000);
static VERIFY_INTERVAL_MS: GucSetting<i32> = GucSetting::<i32>::new(120_000);
static MAX_RETRY_INTERVAL_S: GucSetting<i32> = GucSetting::<i32>::new(300);
static ANCHOR_TIMEOUT_S: GucSetting<i32> = GucSetting::<i32>::new(900);
static BACKFILL_CHUNK_SIZE: GucSetting<i32> = GucSetting::<i32>::new(5000);
static USER_CODE_TIMEOUT_MS: GucSetting<i32> = GucSetting::<i32>::new(5000);
static MAX_PAYLOAD_SIZE_KB: GucSetting<i32> = GucSetting::<i32>::new(10 * 1024);
static WRITE_BACK: GucSetting<WriteBackSetting> =
    GucSetting::<WriteBackSetting>::new(WriteBackSetting::Anchored);
static VERIFY: GucSetting<Verify> = GucSetting::<Verify>::new(Verify::Current);

/// `certyo.verify`: which accepted versions the worker asks Certyo about.
#[derive(pgrx::PostgresGucEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum Verify {
    /// Each record's current version, what its row (or its delete) says now: a version a newer
    /// one of the same record replaced before it was verified is `superseded`, never asked about.
    #[name = c"current"]
    Current,
    /// Every version.
    #[name = c"every"]
    Every,
}

/// `certyo.write_back`: the write-back mode of a table that `certyo.track()` tracks without
/// naming one (see [`WriteBack`]).
#[derive(pgrx::PostgresGucEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum WriteBackSetting {
    #[name = c"anchored"]
    Anchored,
    #[name = c"accepted"]
    Accepted,
    #[name = c"none"]
    None,
}

/// Define the settings; called from `_PG_init` in every process that loads the library.
/// `certyo.database_name` can only be defined while the postmaster preloads the library
/// (Postgres refuses server-start settings later); without preloading there is no worker to
/// read it.
pub fn define(preloading: bool) {
    GucRegistry::define_string_guc(
        c"certyo.base_url",
        c"Base URL of the Certyo API.",
        c"Every API path hangs off it.",
        &BASE_URL,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_string_guc(
        c"certyo.api_key",
        c"Certyo API key (X-API-Key), when certyo.api_key_file is not set. Readable by superusers and members of pg_read_all_settings.",
        c"Prefer certyo.api_key_file. This one is hidden from pg_settings and SHOW ALL, and masked in log messages and stored errors.",
        &API_KEY,
        GucContext::Sighup,
        GucFlags::SUPERUSER_ONLY | GucFlags::NO_SHOW_ALL,
    );
    GucRegistry::define_string_guc(
        c"certyo.api_key_file",
        c"File holding the Certyo API key (recommended over certyo.api_key, which it overrides).",
        c"Owned by the server's OS user (or root) and not readable by others, like ssl_key_file; read again on reload.",
        &API_KEY_FILE,
        GucContext::Sighup,
        GucFlags::SUPERUSER_ONLY,
    );
    GucRegistry::define_string_guc(
        c"certyo.tenant_id",
        c"Certyo tenant id sent with every record.",
        c"",
        &TENANT_ID,
        GucContext::Sighup,
        GucFlags::default(),
    );
    if preloading {
        GucRegistry::define_string_guc(
            c"certyo.database_name",
            c"Serve only this database (empty: every database in which certyo_cdc is installed).",
            c"Read at server start. A restriction kept from the time when one worker served one database.",
            &DATABASE_NAME,
            GucContext::Postmaster,
            GucFlags::default(),
        );
        GucRegistry::define_int_guc(
            c"certyo.max_databases",
            c"Most databases served at once, each by a delivery worker of its own.",
            c"Read at server start. Each worker (and the launcher) takes one of max_worker_processes.",
            &MAX_DATABASES,
            1,
            crate::wake::MAX_DATABASES as i32,
            GucContext::Postmaster,
            GucFlags::default(),
        );
    }
    GucRegistry::define_int_guc(
        c"certyo.batch_size",
        c"Most records per bulk request.",
        c"",
        &BATCH_SIZE,
        1,
        1000,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"certyo.bulk_threshold",
        c"More ready records than this are sent in bulk requests; this many or fewer one request each.",
        c"",
        &BULK_THRESHOLD,
        0,
        1000,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"certyo.poll_interval",
        c"Fallback wake-up of the worker; commits that queue changes wake it at once.",
        c"",
        &POLL_INTERVAL_MS,
        10,
        3_600_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"certyo.linger",
        c"Under load, how long changes gather after a pass that took less than a full batch before the next pass (0: no wait).",
        c"The wait ends early once certyo.batch_size changes have committed; commits meanwhile do not wake the worker. Longer: fewer, larger batches and less CPU per change; shorter: lower latency. A change committed while the worker sleeps is sent at once.",
        &LINGER_MS,
        0,
        1000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"certyo.max_retry_interval",
        c"Longest wait between two attempts of a change that fails transiently, and between two probes while Certyo is down.",
        c"The wait starts at about 1 s and doubles with each failure, with jitter, up to this.",
        &MAX_RETRY_INTERVAL_S,
        1,
        86_400,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"certyo.request_timeout",
        c"Timeout of one HTTP request to Certyo.",
        c"",
        &REQUEST_TIMEOUT_MS,
        100,
        600_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"certyo.max_rate_limit_retries",
        c"Retries of one request answered 429 before its records wait for a later pass.",
        c"",
        &MAX_RATE_LIMIT_RETRIES,
        0,
        10,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"certyo.retention",
        c"How long receipts of replaced versions and of deletes are kept once anchored (or superseded, see certyo.verify).",
        c"",
        &RETENTION_S,
        0,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"certyo.verify_min_age",
        c"How long after acceptance a receipt is first verified.",
        c"Certyo anchors 60-90 s after its accumulation flush; asking earlier only costs requests.",
        &VERIFY_MIN_AGE_MS,
        0,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_int_guc(
        c"certyo.verify_interval",
        c"How long the worker waits before verifying a receipt that was not yet anchored again.",
        c"",
        &VERIFY_INTERVAL_MS,
        100,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_enum_guc(
        c"certyo.verify",
        c"Which accepted versions the worker verifies: 'current' (the default), each record's current version, or 'every' version.",
        c"'current': a version replaced by a newer one of the same record before it was verified is marked superseded in its receipt and never asked about (one request per record and verification interval, however often it changes). 'every': one request per version.",
        &VERIFY,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"certyo.anchor_timeout",
        c"A receipt not anchored this long after acceptance is flagged overdue and checked less often.",
        c"Overdue receipts are verified with a doubling interval, at most hourly.",
        &ANCHOR_TIMEOUT_S,
        1,
        i32::MAX,
        GucContext::Sighup,
        GucFlags::UNIT_S,
    );
    GucRegistry::define_int_guc(
        c"certyo.backfill_chunk_size",
        c"Rows a backfill queues per transaction.",
        c"Each chunk locks its rows briefly (FOR SHARE); smaller chunks make writers wait less.",
        &BACKFILL_CHUNK_SIZE,
        1,
        1_000_000,
        GucContext::Sighup,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"certyo.user_code_timeout",
        c"Longest a statement of the delivery worker that runs users' code may take: a write-back (the owner's triggers) or a backfill chunk (its condition, its row locks).",
        c"Past it the statement is canceled: the write-back to that table is retried with back-off, a chunk whose rows stay locked is retried with back-off, a chunk that computes too long fails its backfill. Code that catches the cancellation is ended a second later with the process running it (the slow lane), and a new one takes over. No role's code can hold up the other tables' delivery longer than this.",
        &USER_CODE_TIMEOUT_MS,
        100,
        3_600_000,
        GucContext::Sighup,
        GucFlags::UNIT_MS,
    );
    GucRegistry::define_enum_guc(
        c"certyo.write_back",
        c"When the worker writes back to the rows of a table that certyo.track() tracks without naming write_back: 'anchored' (the default), 'accepted' or 'none'.",
        c"'anchored': hash, status and time in one UPDATE once Certyo confirms the version on chain, NULL until then. 'accepted': the hash and 'pending' at acceptance, the status again once anchored. 'none': no column, the rows are never written to (certyo.record_status() tells each record's state). Tables already tracked keep their mode.",
        &WRITE_BACK,
        GucContext::Userset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"certyo.max_payload_size",
        c"Largest record payload sent to Certyo; a larger change is kept as a dead letter, never sent.",
        c"A change that cannot be sent within certyo.request_timeout would otherwise fail every attempt and, as a probe, hold up every other change of the database.",
        &MAX_PAYLOAD_SIZE_KB,
        1,
        1024 * 1024,
        GucContext::Sighup,
        GucFlags::UNIT_KB,
    );
    GucRegistry::define_bool_guc(
        c"certyo.enabled",
        c"Deliver queued changes (off: capture continues, nothing is sent).",
        c"",
        &ENABLED,
        GucContext::Sighup,
        GucFlags::default(),
    );
}

/// The name of the database a delivery worker serves: Certyo's `database` field. Set once, when
/// the worker has connected.
static SERVED_DATABASE: std::sync::OnceLock<String> = std::sync::OnceLock::new();

pub fn set_served_database(name: String) {
    // Set once per process; a second call (none is made) would keep the first name.
    let _first = SERVED_DATABASE.set(name);
}

/// `certyo.database_name`: the one database to serve, if restricted to one.
pub fn only_database() -> Option<String> {
    Some(text(&DATABASE_NAME)).filter(|name| !name.is_empty())
}

/// `certyo.write_back`: the write-back mode of a table tracked without naming one.
pub fn write_back() -> WriteBack {
    match WRITE_BACK.get() {
        WriteBackSetting::Anchored => WriteBack::Anchored,
        WriteBackSetting::Accepted => WriteBack::Accepted,
        WriteBackSetting::None => WriteBack::None,
    }
}

/// `certyo.user_code_timeout`, read where a statement runs users' code.
pub fn user_code_timeout() -> Duration {
    Duration::from_millis(USER_CODE_TIMEOUT_MS.get().max(100) as u64)
}

/// `certyo.max_databases`.
pub fn max_databases() -> usize {
    MAX_DATABASES.get().max(1) as usize
}

/// The settings as one value, read at the start of each pass.
#[derive(Clone, PartialEq)]
pub struct Settings {
    pub base_url: String,
    pub api_key: String,
    /// Why `certyo.api_key_file` could not be read, if it could not.
    pub api_key_problem: Option<String>,
    pub tenant_id: String,
    pub database_name: String,
    pub batch_size: usize,
    pub bulk_threshold: usize,
    pub poll_interval: Duration,
    /// `certyo.linger`.
    pub linger: Duration,
    pub request_timeout: Duration,
    /// `certyo.max_retry_interval`: the cap of every back-off.
    pub max_retry_interval: Duration,
    pub max_rate_limit_retries: u32,
    pub retention: Duration,
    pub enabled: bool,
    pub verify_min_age: Duration,
    pub verify_interval: Duration,
    pub anchor_timeout: Duration,
    pub verify: Verify,
    pub backfill_chunk_size: usize,
    /// `certyo.max_payload_size`, in bytes.
    pub max_payload_size: usize,
}

fn text(setting: &GucSetting<Option<CString>>) -> String {
    setting
        .get()
        .map(|c| c.to_string_lossy().trim().to_string())
        .unwrap_or_default()
}

/// The value of `certyo.api_key`, for the log hook that keeps it out of the log (handed to
/// `crate::api_key::redact_from_log`).
pub fn api_key_setting() -> Option<String> {
    Some(text(&API_KEY)).filter(|k| !k.is_empty())
}

pub fn current() -> Settings {
    let (api_key, api_key_problem) =
        match crate::api_key::current(&text(&API_KEY_FILE), &text(&API_KEY)) {
            Ok(key) => (key, None),
            Err(problem) => (String::new(), Some(problem)),
        };
    Settings {
        base_url: text(&BASE_URL),
        api_key,
        api_key_problem,
        tenant_id: text(&TENANT_ID),
        database_name: SERVED_DATABASE.get().cloned().unwrap_or_default(),
        batch_size: BATCH_SIZE.get().clamp(1, 1000) as usize,
        bulk_threshold: BULK_THRESHOLD.get().max(0) as usize,
        poll_interval: Duration::from_millis(POLL_INTERVAL_MS.get().max(10) as u64),
        linger: Duration::from_millis(LINGER_MS.get().max(0) as u64),
        request_timeout: Duration::from_millis(REQUEST_TIMEOUT_MS.get().max(100) as u64),
        max_retry_interval: Duration::from_secs(MAX_RETRY_INTERVAL_S.get().max(1) as u64),
        max_rate_limit_retries: MAX_RATE_LIMIT_RETRIES.get().max(0) as u32,
        retention: Duration::from_secs(RETENTION_S.get().max(0) as u64),
        enabled: ENABLED.get(),
        verify_min_age: Duration::from_millis(VERIFY_MIN_AGE_MS.get().max(0) as u64),
        verify_interval: Duration::from_millis(VERIFY_INTERVAL_MS.get().max(100) as u64),
        anchor_timeout: Duration::from_secs(ANCHOR_TIMEOUT_S.get().max(1) as u64),
        verify: VERIFY.get(),
        backfill_chunk_size: BACKFILL_CHUNK_SIZE.get().max(1) as usize,
        max_payload_size: MAX_PAYLOAD_SIZE_KB.get().max(1) as usize * 1024,
    }
}

impl Settings {
    /// Why nothing can be sent, if something is missing.
    pub fn missing(&self) -> Option<String> {
        if let Some(problem) = &self.api_key_problem {
            return Some(format!(
                "not configured: {problem} (fix it, then SELECT pg_reload_conf())"
            ));
        }
        let mut missing = Vec::new();
        if self.api_key.is_empty() {
            missing.push("certyo.api_key_file (or certyo.api_key)");
        }
        if self.tenant_id.is_empty() {
            missing.push("certyo.tenant_id");
        }
        if self.base_url.is_empty() {
            missing.push("certyo.base_url");
        }
        (!missing.is_empty()).then(|| {
            format!(
                "not configured: set {} (ALTER SYSTEM SET ...; SELECT pg_reload_conf())",
                missing.join(" and ")
            )
        })
    }
}
