//! A local Certyo API (`../shared/certyo-api.md`) for certyo_cdc's tests, demo and benchmark.
//!
//! It honours the contract: the `X-API-Key` check, single and bulk ingest (1..=1000 records,
//! one result per record in request order), idempotency replay, `recordHash = "sha256:" +
//! hex(sha256(canonical JSON))`, anchoring after a configurable delay, verification and the GET
//! query. Faults are injected on demand, for the next N ingest requests: 429 with or without
//! `Retry-After`, 500, a response slower than the client's timeout, a dropped connection, a
//! bulk response missing its last entry. It counts what it saw, so tests can assert "every change
//! exactly once".
//!
//! Control plane (no API key): `POST /_emulator/faults {"fault": "429", "times": 3,
//! "retryAfter": 1}` (faults: `429`, `500`, `outage` with `"seconds"` (every ingest request answered 503 for
//! that long), `slow` with `"seconds"`, `drop` (no answer at all), `partial`,
//! `reject` (422), `echo-key` with `"status"` (that status, 400 by default, with a body quoting
//! the `X-API-Key` the request carried, as a careless API might), `mismatch` (the next verification answers report another hash; with
//! `"collection"` and `"recordId"`, every answer about that record)), `GET /_emulator/stats`, `GET /_emulator/records`, `POST /_emulator/reset`.
//!
//! This file is the contract: a request in, a `Reply` out. `http` puts it on the wire.

mod http;

use hyper::Method;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub struct Config {
    /// `host:port`; port 0 picks a free one.
    pub bind: String,
    pub api_key: String,
    /// How long after acceptance a record counts as anchored on chain.
    pub anchor_delay: Duration,
    /// Threads serving connections (at least one).
    pub threads: usize,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            bind: "127.0.0.1:0".into(),
            api_key: "test-key".into(),
            anchor_delay: Duration::from_secs(2),
            threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fault {
    RateLimit {
        retry_after: Option<u64>,
    },
    ServerError,
    Slow {
        seconds: u64,
    },
    Drop,
    /// A bulk response that leaves out its last record (which is stored nonetheless).
    Partial,
    /// Verification reports a different hash than the one accepted: the next `times` answers,
    /// or, with a record named, every answer about that record (a tampered record stays
    /// tampered, and an answer lost on its way back does not use the fault up).
    Mismatch {
        record: Option<(String, String)>,
    },
    /// 422 for the whole request: the records become dead letters.
    Reject,
    /// This status for the whole request, with a body that quotes the API key it carried.
    EchoKey {
        status: u16,
    },
    /// 503 to every ingest request for `seconds` (the service is down).
    Outage {
        seconds: u64,
    },
    /// One 503 answer of an outage.
    Unavailable,
}

/// One accepted record, as Certyo holds it.
#[derive(Debug, Clone)]
pub struct Accepted {
    pub record: Value,
    pub record_hash: String,
    pub accepted_at: SystemTime,
    accepted: Instant,
    /// Which ingest request brought it (1 for the first): tests see from it whether a client
    /// waited for a record's answer before sending its next change.
    pub request: u64,
}

#[derive(Debug, Default, Clone)]
pub struct Stats {
    pub requests: u64,
    pub ingest_requests: u64,
    pub bulk_requests: u64,
    pub accepted: u64,
    pub replayed: u64,
    pub rejected: u64,
    pub unauthorized: u64,
    pub faults_served: u64,
    pub verify_requests: u64,
    /// Bytes of the largest ingest request body received.
    pub largest_request: u64,
}

#[derive(Default)]
struct State {
    /// Keyed by (tenantId, idempotencyKey); records without a key get a fresh entry each time.
    by_key: HashMap<(String, String), usize>,
    accepted: Vec<Accepted>,
    /// Versions of each record, oldest first, by a hash of (tenantId, database, collection,
    /// recordId): verification looks one up without scanning everything accepted.
    by_record: HashMap<u64, Vec<usize>>,
    faults: VecDeque<Fault>,
    /// `outage`: every ingest request is answered 503 until then.
    outage_until: Option<Instant>,
    mismatches: u32,
    /// (collection, recordId) of records whose every verification reports another hash.
    mismatched_records: std::collections::HashSet<(String, String)>,
    stats: Stats,
}

impl State {
    fn queue_fault(&mut self, fault: Fault, times: u32) {
        if let Fault::Mismatch { record } = fault {
            // Verification answers, not ingest.
            match record {
                Some(record) => {
                    self.mismatched_records.insert(record);
                }
                None => self.mismatches += times,
            }
        } else {
            self.faults
                .extend(std::iter::repeat_n(fault, times as usize));
        }
    }
}

pub struct Emulator {
    url: String,
    state: Arc<Mutex<State>>,
    server: http::Server,
}

impl Emulator {
    pub fn start(config: Config) -> std::io::Result<Emulator> {
        let state = Arc::new(Mutex::new(State::default()));
        let contract = Arc::new(Contract {
            state: state.clone(),
            api_key: config.api_key,
            anchor_delay: config.anchor_delay,
        });
        let host = config
            .bind
            .rsplit_once(':')
            .map(|(h, _)| h.to_string())
            .unwrap_or_else(|| "127.0.0.1".into());
        let server = http::Server::start(&config.bind, config.threads, contract)?;
        Ok(Emulator {
            url: format!("http://{host}:{}", server.port()),
            state,
            server,
        })
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// Serve `fault` for the next `times` ingest requests (after any already queued).
    pub fn inject(&self, fault: Fault, times: u32) {
        lock(&self.state).queue_fault(fault, times);
    }

    pub fn stats(&self) -> Stats {
        lock(&self.state).stats.clone()
    }

    /// Every accepted record, in acceptance order.
    pub fn accepted(&self) -> Vec<Accepted> {
        lock(&self.state).accepted.clone()
    }

    /// Serve until the process ends (the binary's main loop).
    pub fn wait(self) {
        self.server.wait()
    }
}

/// What a request comes to: what `http` needs to answer it.
pub(crate) struct Contract {
    state: Arc<Mutex<State>>,
    api_key: String,
    anchor_delay: Duration,
}

/// One request as the contract reads it.
pub(crate) struct Incoming<'a> {
    pub method: &'a Method,
    pub path: &'a str,
    pub query: &'a str,
    pub api_key: Option<&'a str>,
    pub body: &'a str,
}

/// The answer to a request.
pub(crate) enum Reply {
    Answer {
        status: u16,
        body: Value,
        retry_after: Option<u64>,
        /// `slow`: answered only after this long.
        delay: Option<Duration>,
    },
    /// `drop`: never answered; the client gives up at its timeout.
    Never,
}

impl Reply {
    fn json(status: u16, body: Value) -> Reply {
        Reply::Answer {
            status,
            body,
            retry_after: None,
            delay: None,
        }
    }
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl Contract {
    pub(crate) fn handle(&self, request: &Incoming) -> Reply {
        let state = &*self.state;
        lock(state).stats.requests += 1;
        let (method, path, body) = (request.method, request.path, request.body);
        if let Some(control) = path.strip_prefix("/_emulator/") {
            let (status, reply) = control_plane(method, control, body, state);
            return Reply::json(status, reply);
        }
        if request.api_key != Some(self.api_key.as_str()) {
            lock(state).stats.unauthorized += 1;
            return Reply::json(401, json!({"error": "missing or wrong X-API-Key"}));
        }
        match (method, path) {
            (&Method::POST, "/api/v1/records") => ingest(body, false, request.api_key, state),
            (&Method::POST, "/api/v1/records/bulk") => ingest(body, true, request.api_key, state),
            (&Method::POST, "/api/v1/verify/record") => {
                let (status, reply) = verify(body, state, self.anchor_delay);
                Reply::json(status, reply)
            }
            (&Method::GET, "/api/v1/records") => {
                Reply::json(200, query_records(request.query, state))
            }
            _ => Reply::json(404, json!({"error": format!("no route {method} {path}")})),
        }
    }
}

fn ingest(body: &str, bulk: bool, api_key: Option<&str>, state: &Mutex<State>) -> Reply {
    let (fault, number) = {
        let mut state = lock(state);
        state.stats.ingest_requests += 1;
        state.stats.largest_request = state.stats.largest_request.max(body.len() as u64);
        let number = state.stats.ingest_requests;
        if bulk {
            state.stats.bulk_requests += 1;
        }
        let down = state
            .outage_until
            .is_some_and(|until| Instant::now() < until);
        let fault = if down {
            Some(Fault::Unavailable)
        } else {
            state.faults.pop_front()
        };
        if fault.is_some() {
            state.stats.faults_served += 1;
        }
        (fault, number)
    };
    match fault {
        Some(Fault::RateLimit { retry_after }) => {
            return Reply::Answer {
                status: 429,
                body: json!({"error": "too many requests"}),
                retry_after,
                delay: None,
            }
        }
        Some(Fault::ServerError) => return Reply::json(500, json!({"error": "injected failure"})),
        Some(Fault::Unavailable) => return Reply::json(503, json!({"error": "injected outage"})),
        Some(Fault::Reject) => {
            lock(state).stats.rejected += 1;
            return Reply::json(422, json!({"error": "injected rejection"}));
        }
        Some(Fault::EchoKey { status }) => {
            let key = api_key.unwrap_or_default();
            return Reply::json(
                status,
                json!({"error": format!("request refused for X-API-Key {key}")}),
            );
        }
        // No answer at all: the request is neither processed nor answered, and the client
        // gives up at its timeout.
        Some(Fault::Drop) => return Reply::Never,
        _ => {}
    }
    // The parsed body is taken apart, not copied: the records are stored as they came.
    let parsed: Result<Value, _> = serde_json::from_str(body);
    let (records, tenant) = match (parsed, bulk) {
        (Ok(mut v), true) => {
            let tenant = v.get("tenantId").cloned();
            match v.get_mut("records").map(Value::take) {
                Some(Value::Array(records)) => (Some(records), tenant),
                _ => (None, tenant),
            }
        }
        (Ok(v), false) => {
            let tenant = v.get("tenantId").cloned();
            (Some(vec![v]), tenant)
        }
        (Err(_), _) => (None, None),
    };
    let Some(records) = records else {
        lock(state).stats.rejected += 1;
        return Reply::json(
            400,
            json!({"error": "body is not a record (or {tenantId, records})"}),
        );
    };
    if bulk && (records.is_empty() || records.len() > 1000) {
        lock(state).stats.rejected += 1;
        let status = if records.is_empty() { 400 } else { 413 };
        return Reply::json(status, json!({"error": "bulk takes 1 to 1000 records"}));
    }
    let mut results = Vec::with_capacity(records.len());
    for mut record in records {
        if let (Some(tenant), Some(object)) = (&tenant, record.as_object_mut()) {
            object.entry("tenantId").or_insert_with(|| tenant.clone());
        }
        match accept(record, number, state) {
            Ok(result) => results.push(result),
            Err(message) => {
                lock(state).stats.rejected += 1;
                return Reply::json(422, json!({"error": message}));
            }
        }
    }
    if bulk && fault == Some(Fault::Partial) {
        results.pop();
    }
    let body = if bulk {
        Value::Array(results)
    } else {
        results.swap_remove(0)
    };
    Reply::Answer {
        status: 202,
        body,
        retry_after: None,
        delay: match fault {
            Some(Fault::Slow { seconds }) => Some(Duration::from_secs(seconds)),
            _ => None,
        },
    }
}

const REQUIRED: [&str; 5] = [
    "tenantId",
    "database",
    "collection",
    "recordId",
    "recordPayload",
];

fn accept(record: Value, request: u64, state: &Mutex<State>) -> Result<Value, String> {
    for field in REQUIRED {
        if record
            .get(field)
            .is_none_or(|v| v.is_null() || v.as_str() == Some(""))
        {
            return Err(format!("{field} is required"));
        }
    }
    let tenant = record["tenantId"].as_str().unwrap_or_default().to_string();
    let key = record
        .get("idempotencyKey")
        .and_then(Value::as_str)
        .map(str::to_string);
    let mut state = lock(state);
    if let Some(index) = key
        .as_ref()
        .and_then(|k| state.by_key.get(&(tenant.clone(), k.clone())))
        .copied()
    {
        state.stats.replayed += 1;
        return Ok(receipt(&state.accepted[index], true));
    }
    let accepted = Accepted {
        record_hash: record_hash(&record),
        record,
        accepted_at: SystemTime::now(),
        accepted: Instant::now(),
        request,
    };
    let result = receipt(&accepted, false);
    let identity = record_identity(&accepted.record);
    state.accepted.push(accepted);
    let index = state.accepted.len() - 1;
    state.by_record.entry(identity).or_default().push(index);
    if let Some(key) = key {
        state.by_key.insert((tenant, key), index);
    }
    state.stats.accepted += 1;
    Ok(result)
}

const IDENTITY: [&str; 4] = ["tenantId", "database", "collection", "recordId"];

/// A hash of what names one record: (tenantId, database, collection, recordId).
fn record_identity(record: &Value) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for field in IDENTITY {
        record.get(field).map(Value::to_string).hash(&mut hasher);
    }
    hasher.finish()
}

fn same_record(a: &Value, b: &Value) -> bool {
    IDENTITY.iter().all(|f| a.get(f) == b.get(f))
}

/// `"sha256:" + hex(sha256(canonical JSON))` of what identifies the record's content: tenant,
/// database, collection, record id and payload, with object keys sorted.
pub fn record_hash(record: &Value) -> String {
    // Borrowed, not cloned: a sorted map of references serializes to the same canonical bytes
    // (serde_json's own maps are sorted by key too).
    let identity: std::collections::BTreeMap<&str, &Value> =
        REQUIRED.iter().map(|f| (*f, &record[*f])).collect();
    let canonical = serde_json::to_vec(&identity).unwrap_or_default();
    let digest = Sha256::digest(&canonical);
    let mut hash = String::with_capacity(7 + 2 * digest.len());
    hash.push_str("sha256:");
    for byte in digest {
        hash.push(char::from(HEX[usize::from(byte >> 4)]));
        hash.push(char::from(HEX[usize::from(byte & 0xf)]));
    }
    hash
}

const HEX: &[u8; 16] = b"0123456789abcdef";

fn receipt(accepted: &Accepted, replayed: bool) -> Value {
    json!({
        "recordId": accepted.record["recordId"],
        "recordHash": accepted.record_hash,
        "tenantId": accepted.record["tenantId"],
        "acceptedAt": iso8601(accepted.accepted_at),
        "idempotencyReplayed": replayed,
    })
}

fn verify(body: &str, state: &Mutex<State>, anchor_delay: Duration) -> (u16, Value) {
    let Ok(request) = serde_json::from_str::<Value>(body) else {
        return (400, json!({"error": "body is not JSON"}));
    };
    let mut state = lock(state);
    state.stats.verify_requests += 1;
    // The version asked about (by its hash); failing that, the newest version of the record,
    // whose different hash then tells the client that Certyo holds something else.
    let versions: Vec<&Accepted> = state
        .by_record
        .get(&record_identity(&request))
        .map(|indexes| {
            indexes
                .iter()
                .rev()
                .map(|&i| &state.accepted[i])
                .filter(|a| same_record(&a.record, &request))
                .collect()
        })
        .unwrap_or_default();
    let asked = request.get("recordHash").and_then(Value::as_str);
    let found = versions
        .iter()
        .find(|a| Some(a.record_hash.as_str()) == asked)
        .or(versions.first())
        .map(|a| (*a).clone());
    let Some(found) = found else {
        return (
            200,
            json!({"verified": false, "anchoredOnChain": false, "anchorStatus": "unknown"}),
        );
    };
    let anchored = found.accepted.elapsed() >= anchor_delay;
    let mut hash = found.record_hash.clone();
    let named = (
        text_field(&request, "collection"),
        text_field(&request, "recordId"),
    );
    if state.mismatched_records.contains(&named) {
        hash = format!("sha256:{}", "0".repeat(64));
    } else if state.mismatches > 0 {
        state.mismatches -= 1;
        hash = format!("sha256:{}", "0".repeat(64));
    }
    (
        200,
        json!({
            "verified": true,
            "anchoredOnChain": anchored,
            "recordHash": hash,
            "polygonTxHash": if anchored { Value::String(format!("0x{}", &found.record_hash[7..])) } else { Value::Null },
            "anchorStatus": if anchored { "anchored" } else { "pending" },
        }),
    )
}

fn query_records(query: &str, state: &Mutex<State>) -> Value {
    let filters: Vec<(String, String)> = query
        .split('&')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.to_string(), percent_decode(v)))
        .collect();
    let state = lock(state);
    let records: Vec<Value> = state
        .accepted
        .iter()
        .filter(|a| filters.iter().all(|(k, v)| a.record.get(k).and_then(Value::as_str) == Some(v.as_str())))
        .map(|a| json!({"record": a.record, "recordHash": a.record_hash, "acceptedAt": iso8601(a.accepted_at)}))
        .collect();
    json!({"records": records})
}

fn control_plane(method: &Method, path: &str, body: &str, state: &Mutex<State>) -> (u16, Value) {
    match (method, path) {
        (&Method::GET, "stats") => {
            let s = lock(state).stats.clone();
            (
                200,
                json!({
                    "requests": s.requests, "ingestRequests": s.ingest_requests, "bulkRequests": s.bulk_requests,
                    "accepted": s.accepted, "replayed": s.replayed, "rejected": s.rejected,
                    "unauthorized": s.unauthorized, "faultsServed": s.faults_served, "verifyRequests": s.verify_requests,
                    "largestRequest": s.largest_request,
                }),
            )
        }
        (&Method::GET, "records") => {
            let state = lock(state);
            let records: Vec<Value> = state
                .accepted
                .iter()
                .map(|a| json!({"record": a.record, "recordHash": a.record_hash, "acceptedAt": iso8601(a.accepted_at), "request": a.request}))
                .collect();
            (200, Value::Array(records))
        }
        (&Method::POST, "reset") => {
            *lock(state) = State::default();
            (200, json!({"reset": true}))
        }
        (&Method::POST, "faults") => match parse_fault(body) {
            Ok((Fault::Outage { seconds }, _)) => {
                lock(state).outage_until = Some(Instant::now() + Duration::from_secs(seconds));
                (200, json!({"outage": seconds}))
            }
            Ok((fault, times)) => {
                lock(state).queue_fault(fault, times);
                (200, json!({"queued": times}))
            }
            Err(message) => (400, json!({"error": message})),
        },
        _ => (404, json!({"error": "unknown control path"})),
    }
}

fn parse_fault(body: &str) -> Result<(Fault, u32), String> {
    let v: Value = serde_json::from_str(body).map_err(|e| e.to_string())?;
    let times = v.get("times").and_then(Value::as_u64).unwrap_or(1) as u32;
    let fault = match v.get("fault").and_then(Value::as_str) {
        Some("429") => Fault::RateLimit {
            retry_after: v.get("retryAfter").and_then(Value::as_u64),
        },
        Some("500") => Fault::ServerError,
        Some("slow") => Fault::Slow {
            seconds: v.get("seconds").and_then(Value::as_u64).unwrap_or(5),
        },
        Some("drop") => Fault::Drop,
        Some("outage") => Fault::Outage {
            seconds: v.get("seconds").and_then(Value::as_u64).unwrap_or(10),
        },
        Some("partial") => Fault::Partial,
        Some("mismatch") => Fault::Mismatch {
            record: match (v.get("collection"), v.get("recordId")) {
                (None, None) => None,
                (Some(Value::String(c)), Some(Value::String(r))) => Some((c.clone(), r.clone())),
                _ => return Err("a mismatch names a record with both \"collection\" and \"recordId\" (strings), or neither".into()),
            },
        },
        Some("reject") => Fault::Reject,
        Some("echo-key") => Fault::EchoKey {
            status: match v.get("status").map(Value::as_u64) {
                None => 400,
                Some(Some(status @ 400..=499)) => status as u16,
                Some(_) => return Err("an echo-key fault's \"status\" is a 4xx status".into()),
            },
        },
        other => {
            return Err(format!(
                "unknown fault {other:?}; use 429, 500, outage, slow, drop, partial, reject, echo-key or mismatch"
            ))
        }
    };
    Ok((fault, times))
}

fn text_field(value: &Value, field: &str) -> String {
    value
        .get(field)
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'%' if i + 2 < bytes.len() => {
                match u8::from_str_radix(
                    std::str::from_utf8(&bytes[i + 1..i + 3]).unwrap_or("zz"),
                    16,
                ) {
                    Ok(b) => {
                        out.push(b);
                        i += 3;
                        continue;
                    }
                    Err(_) => out.push(b'%'),
                }
            }
            b'+' => out.push(b' '),
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// RFC 3339 UTC with milliseconds, without a date library.
fn iso8601(time: SystemTime) -> String {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let (secs, millis) = (since.as_secs() as i64, since.subsec_millis());
    let days = secs.div_euclid(86_400);
    let rem = secs.rem_euclid(86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{millis:03}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_canonical_whatever_the_key_order() {
        let a = json!({"tenantId": "t", "database": "d", "collection": "c", "recordId": "1",
                       "recordPayload": {"b": 1, "a": 2}, "idempotencyKey": "k"});
        let b = json!({"recordPayload": {"a": 2, "b": 1}, "recordId": "1", "collection": "c",
                       "database": "d", "tenantId": "t"});
        assert_eq!(record_hash(&a), record_hash(&b));
        assert!(record_hash(&a).starts_with("sha256:") && record_hash(&a).len() == 71);
    }

    #[test]
    fn hash_is_sha256_of_the_sorted_compact_json_of_the_identity_and_payload() {
        // sha256 of {"collection":"c","database":"d","recordId":"1","recordPayload":{"a":2,"b":1},"tenantId":"t"}
        let record = json!({"tenantId": "t", "database": "d", "collection": "c", "recordId": "1",
                            "recordPayload": {"b": 1, "a": 2}, "idempotencyKey": "k", "operationType": "insert"});
        assert_eq!(
            record_hash(&record),
            "sha256:c7f71936d768460d829386a9ae43918c89e2a2d499465e00874d798c46adbf94"
        );
    }

    #[test]
    fn iso8601_formats_utc() {
        assert_eq!(
            iso8601(UNIX_EPOCH + Duration::from_millis(1_776_162_600_250)),
            "2026-04-14T10:30:00.250Z"
        );
    }

    #[test]
    fn faults_parse_and_unknown_faults_are_refused() {
        assert_eq!(
            parse_fault(r#"{"fault":"429","retryAfter":2,"times":3}"#),
            Ok((
                Fault::RateLimit {
                    retry_after: Some(2)
                },
                3
            ))
        );
        assert!(parse_fault(r#"{"fault":"teapot"}"#).is_err());
    }
}
