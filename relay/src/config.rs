//! The relay's configuration file (TOML): the Certyo settings, with the same names and
//! defaults as the extension's `certyo.*` settings, and one `[[source]]` per database.
//!
//! ```toml
//! [certyo]
//! base_url = "https://www.certyos.com"
//! api_key_file = "/etc/certyo/api_key"   # or api_key = "...", or CERTYO_API_KEY in the environment
//! tenant_id = "acme"
//!
//! [[source]]
//! name = "shop"
//! url = "mysql://relay:secret@127.0.0.1:3306/shop"
//! ```

pub use crate::source::sqlserver::Mode;
use serde::Deserialize;
use std::path::Path;
use std::time::Duration;

/// The environment variable that holds the API key (it wins over the file's `api_key`).
pub const API_KEY_VARIABLE: &str = "CERTYO_API_KEY";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    certyo: CertyoFile,
    #[serde(rename = "source", default)]
    sources: Vec<SourceFile>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CertyoFile {
    #[serde(default = "default_base_url")]
    base_url: String,
    api_key: Option<String>,
    api_key_file: Option<String>,
    tenant_id: Option<String>,
    #[serde(default = "default_batch_size")]
    batch_size: usize,
    #[serde(default = "default_bulk_threshold")]
    bulk_threshold: usize,
    #[serde(default = "default_poll_interval")]
    poll_interval: String,
    #[serde(default = "default_request_timeout")]
    request_timeout: String,
    #[serde(default = "default_max_rate_limit_retries")]
    max_rate_limit_retries: u32,
    #[serde(default = "default_max_retry_interval")]
    max_retry_interval: String,
    #[serde(default = "default_retention")]
    retention: String,
    #[serde(default = "default_verify")]
    verify_min_age: String,
    #[serde(default = "default_verify")]
    verify_interval: String,
    #[serde(default = "default_anchor_timeout")]
    anchor_timeout: String,
    #[serde(default = "default_write_back_lock_wait")]
    write_back_lock_wait: String,
    #[serde(default = "default_max_payload_size")]
    max_payload_size: usize,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SourceFile {
    name: String,
    url: String,
    /// `queue` (default), `cdc` or `change_tracking` (SQL Server only).
    #[serde(default = "default_mode")]
    mode: String,
    /// Certyo's `database` field; default: the URL's database.
    database: Option<String>,
}

fn default_base_url() -> String {
    "https://www.certyos.com".into()
}
fn default_batch_size() -> usize {
    1000
}
fn default_bulk_threshold() -> usize {
    10
}
fn default_poll_interval() -> String {
    "1s".into()
}
fn default_request_timeout() -> String {
    "30s".into()
}
fn default_max_rate_limit_retries() -> u32 {
    3
}
fn default_max_retry_interval() -> String {
    "5min".into()
}
fn default_retention() -> String {
    "24h".into()
}
fn default_verify() -> String {
    "120s".into()
}
fn default_anchor_timeout() -> String {
    "15min".into()
}
fn default_write_back_lock_wait() -> String {
    "1s".into()
}
/// kB, as the extension's `certyo.max_payload_size`.
fn default_max_payload_size() -> usize {
    certyo::batch::DEFAULT_MAX_PAYLOAD_SIZE / 1024
}
fn default_mode() -> String {
    "queue".into()
}

/// The Certyo settings, checked.
#[derive(Clone, PartialEq)]
pub struct Certyo {
    pub base_url: String,
    pub api_key: String,
    pub tenant_id: String,
    pub batch_size: usize,
    pub bulk_threshold: usize,
    pub poll_interval: Duration,
    pub request_timeout: Duration,
    pub max_rate_limit_retries: u32,
    pub max_retry_interval: Duration,
    pub retention: Duration,
    pub verify_min_age: Duration,
    pub verify_interval: Duration,
    pub anchor_timeout: Duration,
    /// How long a write-back to a source row waits for a lock another transaction holds
    /// (MySQL/MariaDB: the write-back session's `innodb_lock_wait_timeout` and
    /// `lock_wait_timeout`, whole seconds, at least 1). Rows already locked are skipped
    /// without waiting; what is not written back is tried again with back-off.
    pub write_back_lock_wait: Duration,
    /// Bytes of payload a batch carries at most; a larger payload is a dead letter, never sent
    /// (the file gives it in kB, as the extension's `certyo.max_payload_size`).
    pub max_payload_size: usize,
}

/// Never prints the key.
impl std::fmt::Debug for Certyo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Certyo")
            .field("base_url", &self.base_url)
            .field("api_key", &"[hidden]")
            .field("tenant_id", &self.tenant_id)
            .field("batch_size", &self.batch_size)
            .field("bulk_threshold", &self.bulk_threshold)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    MySql,
    SqlServer,
}

#[derive(Clone, PartialEq)]
pub struct Source {
    pub name: String,
    pub url: String,
    pub kind: Kind,
    pub mode: Mode,
    pub database: Option<String>,
}

/// The URL carries a password: never printed.
impl std::fmt::Debug for Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Source")
            .field("name", &self.name)
            .field("kind", &self.kind)
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub certyo: Certyo,
    pub sources: Vec<Source>,
}

/// Read and check the configuration file; `api_key_from_env` is `CERTYO_API_KEY`'s value.
/// Every problem is named with the setting and what to write instead.
pub fn load(path: &Path, api_key_from_env: Option<String>) -> Result<Config, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read the configuration file {}: {e}", path.display()))?;
    parse(&text, api_key_from_env).map_err(|e| format!("{}: {e}", path.display()))
}

pub fn parse(text: &str, api_key_from_env: Option<String>) -> Result<Config, String> {
    let file: File = toml::from_str(text).map_err(|e| e.to_string())?;
    let c = file.certyo;
    let api_key = match (
        api_key_from_env.filter(|k| !k.is_empty()),
        &c.api_key_file,
        c.api_key,
    ) {
        (Some(key), _, _) => key,
        (None, Some(file), _) => std::fs::read_to_string(file)
            .map_err(|e| format!("certyo.api_key_file: cannot read {file}: {e}"))?
            .trim()
            .to_string(),
        (None, None, Some(key)) => key,
        (None, None, None) => String::new(),
    };
    if api_key.is_empty() {
        return Err(format!(
            "no API key: set {API_KEY_VARIABLE} in the environment, or certyo.api_key_file (a file readable only by the relay's user)"
        ));
    }
    let tenant_id = c.tenant_id.filter(|t| !t.is_empty()).ok_or(
        "certyo.tenant_id is missing: every record needs Certyo's tenantId (tenant_id = \"acme\")",
    )?;
    if !(1..=1000).contains(&c.batch_size) {
        return Err(format!(
            "certyo.batch_size = {} is out of range: Certyo takes 1 to 1000 records per bulk request",
            c.batch_size
        ));
    }
    if !c.base_url.starts_with("http://") && !c.base_url.starts_with("https://") {
        return Err(format!(
            "certyo.base_url = {:?} is not an http(s) URL",
            c.base_url
        ));
    }
    let certyo = Certyo {
        base_url: c.base_url.trim_end_matches('/').to_string(),
        api_key,
        tenant_id,
        batch_size: c.batch_size,
        bulk_threshold: c.bulk_threshold,
        poll_interval: duration("poll_interval", &c.poll_interval)?,
        request_timeout: duration("request_timeout", &c.request_timeout)?,
        max_rate_limit_retries: c.max_rate_limit_retries,
        max_retry_interval: duration("max_retry_interval", &c.max_retry_interval)?,
        retention: duration("retention", &c.retention)?,
        verify_min_age: duration("verify_min_age", &c.verify_min_age)?,
        verify_interval: duration("verify_interval", &c.verify_interval)?,
        anchor_timeout: duration("anchor_timeout", &c.anchor_timeout)?,
        write_back_lock_wait: duration("write_back_lock_wait", &c.write_back_lock_wait)?,
        max_payload_size: c.max_payload_size.clamp(1, 1024 * 1024) * 1024,
    };
    if file.sources.is_empty() {
        return Err("no [[source]]: add one per database to deliver (name, url)".into());
    }
    let mut sources = Vec::new();
    for s in file.sources {
        let kind = if s.url.starts_with("mysql://") || s.url.starts_with("mariadb://") {
            Kind::MySql
        } else if s.url.starts_with("sqlserver://") {
            Kind::SqlServer
        } else {
            return Err(format!(
                "source {:?}: url must start with mysql:// or sqlserver://",
                s.name
            ));
        };
        let mode = Mode::parse(&s.mode).ok_or_else(|| {
            format!(
                "source {:?}: mode = {:?}; write queue, cdc or change_tracking",
                s.name, s.mode
            )
        })?;
        if kind == Kind::MySql && mode != Mode::Queue {
            return Err(format!(
                "source {:?}: MySQL/MariaDB sources have only mode = \"queue\" (sql/mysql/certyo_queue.sql)",
                s.name
            ));
        }
        if sources.iter().any(|o: &Source| o.name == s.name) {
            return Err(format!(
                "two sources are named {:?}; names must be unique",
                s.name
            ));
        }
        sources.push(Source {
            name: s.name,
            // The mysql crate knows only mysql://.
            url: s.url.replacen("mariadb://", "mysql://", 1),
            kind,
            mode,
            database: s.database,
        });
    }
    Ok(Config { certyo, sources })
}

/// `500ms`, `30s`, `5min`, `24h`, `1d`, as PostgreSQL writes durations (a bare number is
/// seconds).
pub fn duration(setting: &str, text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let problem = || {
        format!("certyo.{setting} = {text:?} is not a duration; write e.g. \"500ms\", \"30s\", \"5min\", \"24h\"")
    };
    let n: u64 = number.parse().map_err(|_| problem())?;
    let d = match unit.trim() {
        "ms" => Duration::from_millis(n),
        "" | "s" => Duration::from_secs(n),
        "min" => Duration::from_secs(n * 60),
        "h" => Duration::from_secs(n * 3600),
        "d" => Duration::from_secs(n * 86_400),
        _ => return Err(problem()),
    };
    Ok(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [certyo]
        tenant_id = "acme"
        [[source]]
        name = "shop"
        url = "mysql://relay:secret@127.0.0.1/shop"
    "#;

    #[test]
    fn defaults_are_the_extensions() {
        let config = parse(MINIMAL, Some("key".into())).unwrap();
        let c = &config.certyo;
        assert_eq!(c.base_url, "https://www.certyos.com");
        assert_eq!((c.batch_size, c.bulk_threshold), (1000, 10));
        assert_eq!(c.poll_interval, Duration::from_secs(1));
        assert_eq!(c.max_retry_interval, Duration::from_secs(300));
        assert_eq!(c.retention, Duration::from_secs(86_400));
        assert_eq!(c.anchor_timeout, Duration::from_secs(900));
        assert_eq!(c.write_back_lock_wait, Duration::from_secs(1));
        assert_eq!(config.sources[0].mode, Mode::Queue);
    }

    #[test]
    fn the_key_and_the_password_are_never_printed() {
        let config = parse(MINIMAL, Some("very-secret-key".into())).unwrap();
        let printed = format!("{config:?}");
        assert!(!printed.contains("very-secret-key"), "{printed}");
        assert!(!printed.contains("secret@"), "{printed}");
    }

    #[test]
    fn bad_settings_are_named_with_what_to_write() {
        let no_key = parse(MINIMAL, None).unwrap_err();
        assert!(no_key.contains("CERTYO_API_KEY"), "{no_key}");
        let bad = MINIMAL.replace(
            "tenant_id = \"acme\"",
            "tenant_id = \"acme\"\npoll_interval = \"soon\"",
        );
        let e = parse(&bad, Some("k".into())).unwrap_err();
        assert!(
            e.contains("certyo.poll_interval") && e.contains("500ms"),
            "{e}"
        );
        let bad = MINIMAL.replace("mysql://", "postgres://");
        assert!(parse(&bad, Some("k".into()))
            .unwrap_err()
            .contains("mysql:// or sqlserver://"));
        let bad = MINIMAL.replace("tenant_id", "tenant");
        assert!(parse(&bad, Some("k".into()))
            .unwrap_err()
            .contains("unknown field"));
        let bad = format!("{MINIMAL}\nmode = \"cdc\"");
        assert!(parse(&bad, Some("k".into()))
            .unwrap_err()
            .contains("only mode = \"queue\""));
    }

    #[test]
    fn durations_read_as_postgres_writes_them() {
        assert_eq!(duration("x", "500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(duration("x", "30"), Ok(Duration::from_secs(30)));
        assert_eq!(duration("x", "5min"), Ok(Duration::from_secs(300)));
        assert_eq!(duration("x", "24h"), Ok(Duration::from_secs(86_400)));
        assert!(duration("x", "5 years").is_err());
    }
}
