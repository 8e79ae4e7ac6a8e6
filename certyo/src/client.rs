//! HTTP to Certyo, with explicit timeouts, one client per worker or relay source.
//!
//! The calls block their caller, but the requests run on the caller's own thread: `reqwest`'s
//! async client on a current-thread Tokio runtime that the client owns, driven by whichever
//! caller is in `block_on` (Tokio lets several threads block on one such runtime; one drives its
//! I/O for all). `reqwest::blocking` hands every request to a thread of its own and back, two
//! thread switches per request: measured against the emulator on this 2-core machine, 52 to 68
//! µs of client CPU per verification request, against 22 to 24 µs this way. Verification also
//! keeps several requests in flight from one thread (`verify_all`) instead of a thread each.
//! A 429's back-off (the caller's `pause`, which blocks) runs between tries, outside the
//! runtime: the requests another thread has on it go on meanwhile.
//! The runtime starts no thread of its own; a host name is resolved on Tokio's blocking pool,
//! whose threads start from (and inherit the signal mask of) the calling thread.

use super::retry::rate_limit_delay;
use super::{Outcome, Receipt, Record, Verification, VerifyRequest};
use futures_util::stream::{self, StreamExt};
use serde::{Deserialize, Serialize};
use std::sync::Arc;
use std::time::Duration;

#[derive(Clone, PartialEq)]
pub struct ClientConfig {
    pub base_url: String,
    pub api_key: String,
    pub timeout: Duration,
    pub max_rate_limit_retries: u32,
    /// Sent as `User-Agent`, e.g. `certyo_cdc/0.2.0`: which program is calling.
    pub user_agent: String,
}

/// Written by hand so that no `{:?}` ever prints the key.
impl std::fmt::Debug for ClientConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientConfig")
            .field("base_url", &self.base_url)
            .field("api_key", &"[hidden]")
            .field("timeout", &self.timeout)
            .field("max_rate_limit_retries", &self.max_rate_limit_retries)
            .field("user_agent", &self.user_agent)
            .finish()
    }
}

#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    /// Drives `http`'s requests, in the callers' `block_on` (see the module's comment).
    runtime: Arc<Runtime>,
    config: ClientConfig,
}

/// The client's runtime, shut down without waiting when the last clone of the client goes: a
/// host name lookup still running on its blocking pool must not hold up whoever drops it (the
/// worker's main thread, which answers signals).
struct Runtime(Option<tokio::runtime::Runtime>);

impl Runtime {
    fn block_on<F: std::future::Future>(&self, future: F) -> F::Output {
        match &self.0 {
            Some(runtime) => runtime.block_on(future),
            // Taken only in `drop`, when no call can be running.
            None => unreachable!("the client's runtime is gone"),
        }
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}

/// What one HTTP exchange came to, before it is spread over the records it carried.
enum Exchange {
    Ok(serde_json::Value),
    Failed(Outcome),
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct VerifyAnswer {
    #[serde(default)]
    verified: bool,
    #[serde(default)]
    anchored_on_chain: bool,
    #[serde(default)]
    record_hash: Option<String>,
    #[serde(default)]
    polygon_tx_hash: Option<String>,
}

#[derive(Serialize)]
#[serde(rename_all = "camelCase")]
struct Bulk<'a> {
    tenant_id: &'a str,
    records: &'a [Record],
}

impl Client {
    /// Build the client. It starts no thread; its calls block the calling thread, which, inside
    /// Postgres, must be a helper thread with every signal blocked.
    pub fn new(config: ClientConfig) -> Result<Client, String> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| format!("cannot start the HTTP client's runtime: {e}"))?;
        let http = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout.min(Duration::from_secs(10)))
            // The runtime runs only inside calls, so an idle connection's close by the server
            // (a load balancer's idle timeout, often 60 s) is seen only when it is next used:
            // idle connections are not reused after a shorter while.
            .pool_idle_timeout(IDLE_CONNECTIONS_KEPT)
            .user_agent(config.user_agent.clone())
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        Ok(Client {
            http,
            runtime: Arc::new(Runtime(Some(runtime))),
            config,
        })
    }

    pub fn config(&self) -> &ClientConfig {
        &self.config
    }

    /// Send records one request each. `pause` sleeps between 429 retries and returns false when
    /// the caller must stop (shutdown): the remaining records are then transient failures.
    /// Every text of the outcomes has the API key masked (see [`crate::mask_secret`]), as do
    /// those of [`Client::send_bulk`] and [`Client::verify`]: they are stored and logged.
    pub fn send_each(
        &self,
        records: &[Record],
        pause: &mut dyn FnMut(Duration) -> bool,
    ) -> Vec<Outcome> {
        self.masked(self.send_each_unmasked(records, pause))
    }

    fn send_each_unmasked(
        &self,
        records: &[Record],
        pause: &mut dyn FnMut(Duration) -> bool,
    ) -> Vec<Outcome> {
        // One at a time, in order: two changes of a record must arrive in the order they were made.
        let mut outcomes = Vec::with_capacity(records.len());
        for record in records {
            let outcome = match self.post("/api/v1/records", record, pause) {
                Exchange::Ok(body) => match serde_json::from_value::<Receipt>(body) {
                    Ok(receipt) => Outcome::of_receipt(record, receipt),
                    Err(e) => Outcome::Transient(format!("unreadable 202 answer: {e}")),
                },
                Exchange::Failed(outcome) => outcome,
            };
            let unauthorized = matches!(outcome, Outcome::Refused { .. });
            outcomes.push(outcome.clone());
            if unauthorized {
                // No point sending the rest with a key Certyo refuses.
                outcomes.extend(std::iter::repeat_n(outcome, records.len() - outcomes.len()));
                break;
            }
        }
        outcomes
    }

    /// Send up to 1000 records of one tenant in one bulk request, and match the answer to them:
    /// a record the answer does not account for is a transient failure, never assumed delivered.
    pub fn send_bulk(
        &self,
        tenant_id: &str,
        records: &[Record],
        pause: &mut dyn FnMut(Duration) -> bool,
    ) -> Vec<Outcome> {
        let bulk = Bulk { tenant_id, records };
        let outcomes = match self.post("/api/v1/records/bulk", &bulk, pause) {
            Exchange::Failed(outcome) => vec![outcome; records.len()],
            Exchange::Ok(body) => match serde_json::from_value::<Vec<Receipt>>(body) {
                Ok(receipts) => match_receipts(records, receipts),
                Err(e) => {
                    vec![Outcome::Transient(format!("unreadable bulk answer: {e}")); records.len()]
                }
            },
        };
        self.masked(outcomes)
    }

    fn masked(&self, outcomes: Vec<Outcome>) -> Vec<Outcome> {
        outcomes
            .into_iter()
            .map(|outcome| outcome.masked(&self.config.api_key))
            .collect()
    }

    /// Ask whether one accepted version is anchored. A hash Certyo reports differently from
    /// ours is a mismatch whatever else the answer says.
    pub fn verify(
        &self,
        request: &VerifyRequest,
        pause: &mut dyn FnMut(Duration) -> bool,
    ) -> Verification {
        let exchange = self.post("/api/v1/verify/record", request, pause);
        verification(request, exchange).masked(&self.config.api_key)
    }

    /// Verify each request, up to `in_flight` at once from this one thread; the answers in the
    /// requests' order. Requests answered 429 are asked again together, after one back-off for
    /// all of them (`pause`, outside the runtime: other threads' requests go on meanwhile).
    pub fn verify_all(
        &self,
        requests: &[VerifyRequest],
        in_flight: usize,
        pause: &mut dyn FnMut(Duration) -> bool,
    ) -> Vec<Verification> {
        let url = self.url("/api/v1/verify/record");
        let mut answers: Vec<Option<Verification>> = vec![None; requests.len()];
        let mut asking: Vec<usize> = (0..requests.len()).collect();
        let mut retry = 0;
        while !asking.is_empty() {
            let url = &url;
            let attempts: Vec<(usize, Attempt)> = self.runtime.block_on(
                stream::iter(asking)
                    .map(
                        |place| async move { (place, self.post_once(url, &requests[place]).await) },
                    )
                    .buffer_unordered(in_flight.max(1))
                    .collect(),
            );
            let mut limited = Vec::new();
            let mut retry_after = None;
            for (place, attempt) in attempts {
                match attempt {
                    Attempt::Done(exchange) => {
                        answers[place] = Some(verification(&requests[place], exchange))
                    }
                    Attempt::RateLimited(after) => {
                        limited.push(place);
                        retry_after = retry_after.max(after);
                    }
                }
            }
            if !limited.is_empty() {
                if let Some(failure) = self.back_off(retry, retry_after, pause) {
                    for place in limited.drain(..) {
                        answers[place] = Some(Verification::Failed(failure.clone()));
                    }
                }
            }
            retry += 1;
            asking = limited;
        }
        answers
            .into_iter()
            .map(|answer| {
                answer
                    .unwrap_or_else(|| Verification::Failed(Outcome::Transient("no answer".into())))
                    .masked(&self.config.api_key)
            })
            .collect()
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.config.base_url.trim_end_matches('/'))
    }

    /// One request, retried after a 429 as the contract says. Each try runs on the runtime; the
    /// back-off between them (`pause`, which blocks) does not, so that another thread's
    /// requests on the same runtime go on meanwhile.
    fn post(
        &self,
        path: &str,
        body: &impl Serialize,
        pause: &mut dyn FnMut(Duration) -> bool,
    ) -> Exchange {
        let url = self.url(path);
        let mut retry = 0;
        loop {
            match self.runtime.block_on(self.post_once(&url, body)) {
                Attempt::Done(exchange) => return exchange,
                Attempt::RateLimited(retry_after) => {
                    if let Some(failure) = self.back_off(retry, retry_after, pause) {
                        return Exchange::Failed(failure);
                    }
                    retry += 1;
                }
            }
        }
    }

    /// After the `retry`-th 429 (counting from 0): wait as the contract says and return None, or
    /// the failure that ends the request (too many 429s, or `pause` says stop).
    fn back_off(
        &self,
        retry: u32,
        retry_after: Option<Duration>,
        pause: &mut dyn FnMut(Duration) -> bool,
    ) -> Option<Outcome> {
        if retry >= self.config.max_rate_limit_retries {
            return Some(Outcome::Transient(format!(
                "429 Too Many Requests after {retry} retries"
            )));
        }
        if !pause(rate_limit_delay(retry, retry_after)) {
            return Some(Outcome::Transient(
                "stopped while backing off from 429".into(),
            ));
        }
        None
    }

    /// One try of a request.
    async fn post_once(&self, url: &str, body: &impl Serialize) -> Attempt {
        let response = self
            .http
            .post(url)
            .header("X-API-Key", &self.config.api_key)
            .json(body)
            .send()
            .await;
        let response = match response {
            Ok(response) => response,
            Err(e) => return Attempt::Done(Exchange::Failed(Outcome::Transient(describe(&e)))),
        };
        let status = response.status().as_u16();
        if status == 429 {
            let retry_after = response
                .headers()
                .get("Retry-After")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.trim().parse::<u64>().ok())
                .map(Duration::from_secs);
            return Attempt::RateLimited(retry_after);
        }
        let text = response.text().await.unwrap_or_default();
        Attempt::Done(match status {
            200..=299 => match serde_json::from_str(&text) {
                Ok(value) => Exchange::Ok(value),
                Err(e) => Exchange::Failed(Outcome::Transient(format!(
                    "unreadable answer ({status}): {e}"
                ))),
            },
            401 | 403 | 404 | 405 => Exchange::Failed(Outcome::Refused { status, body: text }),
            408 => Exchange::Failed(Outcome::Transient(format!(
                "HTTP 408: {}",
                truncate(&text, 200)
            ))),
            400..=499 => Exchange::Failed(Outcome::Rejected { status, body: text }),
            _ => Exchange::Failed(Outcome::Transient(format!(
                "HTTP {status}: {}",
                truncate(&text, 200)
            ))),
        })
    }
}

/// How long an idle connection is kept for the next request: less than servers and load
/// balancers commonly keep one open (60 s and more).
const IDLE_CONNECTIONS_KEPT: Duration = Duration::from_secs(20);

/// One try of a request: its exchange, or a 429 (with `Retry-After`, if any) to back off from.
enum Attempt {
    Done(Exchange),
    RateLimited(Option<Duration>),
}

/// What a verification answer says of the version asked about.
fn verification(request: &VerifyRequest, exchange: Exchange) -> Verification {
    match exchange {
        Exchange::Failed(outcome) => Verification::Failed(outcome),
        Exchange::Ok(body) => match serde_json::from_value::<VerifyAnswer>(body) {
            Err(e) => Verification::Failed(Outcome::Transient(format!(
                "unreadable verification answer: {e}"
            ))),
            Ok(answer) => match answer.record_hash {
                Some(reported) if reported != request.record_hash => Verification::Mismatch {
                    reported_hash: reported,
                },
                _ if answer.verified && answer.anchored_on_chain => Verification::Anchored {
                    polygon_tx_hash: answer.polygon_tx_hash,
                },
                _ if answer.verified => Verification::NotYet,
                _ => Verification::Unknown,
            },
        },
    }
}

/// Pair receipts with records in request order, checking the record id of each; records left
/// without a receipt are sent again. A whole answer (one receipt per record) is paired by
/// position, so that a receipt naming another record, such as a replay of another change,
/// is seen for what it is; a short answer is paired by record id.
fn match_receipts(records: &[Record], receipts: Vec<Receipt>) -> Vec<Outcome> {
    if receipts.len() == records.len() {
        return records
            .iter()
            .zip(receipts)
            .map(|(record, receipt)| Outcome::of_receipt(record, receipt))
            .collect();
    }
    let mut receipts = receipts.into_iter().peekable();
    records
        .iter()
        .map(|record| match receipts.peek() {
            Some(receipt) if receipt.record_id == record.record_id => {
                Outcome::Accepted(receipts.next().expect("peeked"))
            }
            _ => Outcome::Transient("the bulk answer did not account for this record".into()),
        })
        .collect()
}

fn describe(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        format!("timed out: {e}")
    } else if e.is_connect() {
        format!("cannot connect: {e}")
    } else {
        format!("request failed: {e}")
    }
}

fn truncate(text: &str, max: usize) -> &str {
    match text.char_indices().nth(max) {
        Some((i, _)) => &text[..i],
        None => text,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use certyo_emulator::{Config, Emulator, Fault};
    use serde_json::value::RawValue;

    fn record(id: &str) -> Record {
        Record {
            tenant_id: "acme".into(),
            database: "db".into(),
            collection: "public.products".into(),
            record_id: id.into(),
            record_payload: RawValue::from_string(format!("{{\"id\":{id}}}")).unwrap(),
            operation_type: "insert".into(),
            source_timestamp: "2026-04-14T10:30:00Z".into(),
            idempotency_key: format!("key-{id}"),
        }
    }

    fn setup(timeout_ms: u64) -> (Emulator, Client) {
        let emulator = Emulator::start(Config {
            anchor_delay: Duration::from_secs(60),
            ..Config::default()
        })
        .unwrap();
        let client = Client::new(ClientConfig {
            base_url: emulator.url().into(),
            api_key: "test-key".into(),
            timeout: Duration::from_millis(timeout_ms),
            max_rate_limit_retries: 3,
            user_agent: "certyo-tests".into(),
        })
        .unwrap();
        (emulator, client)
    }

    fn no_wait() -> impl FnMut(Duration) -> bool {
        |_| true
    }

    #[test]
    fn a_replay_of_another_records_change_is_a_conflict_never_a_receipt() {
        let (_emulator, client) = setup(5000);
        let reused = |id: &str| Record {
            idempotency_key: "key-used-twice".into(),
            ..record(id)
        };
        assert!(matches!(
            &client.send_each(&[reused("1")], &mut no_wait())[0],
            Outcome::Accepted(_)
        ));
        let single = client.send_each(&[reused("2")], &mut no_wait());
        assert!(
            matches!(&single[0], Outcome::Conflict { receipt } if receipt.record_id == "1"),
            "{single:?}"
        );
        // In a bulk answer too, where the receipt sits in the slot of record 3.
        let bulk = client.send_bulk(
            "acme",
            &[record("10"), reused("3"), record("11")],
            &mut no_wait(),
        );
        assert!(
            matches!(&bulk[0], Outcome::Accepted(r) if r.record_id == "10"),
            "{bulk:?}"
        );
        assert!(
            matches!(&bulk[1], Outcome::Conflict { receipt } if receipt.record_id == "1"),
            "{bulk:?}"
        );
        assert!(
            matches!(&bulk[2], Outcome::Accepted(r) if r.record_id == "11"),
            "{bulk:?}"
        );
    }

    #[test]
    fn single_records_are_accepted_and_a_resend_is_replayed_not_stored_twice() {
        let (emulator, client) = setup(5000);
        let first = client.send_each(&[record("1")], &mut no_wait());
        let again = client.send_each(&[record("1")], &mut no_wait());
        let (Outcome::Accepted(a), Outcome::Accepted(b)) = (&first[0], &again[0]) else {
            panic!("{first:?} {again:?}")
        };
        assert!(!a.idempotency_replayed && b.idempotency_replayed);
        assert_eq!(a.record_hash, b.record_hash);
        assert_eq!(emulator.stats().accepted, 1);
    }

    #[test]
    fn a_bulk_answer_missing_a_record_leaves_it_for_a_retry() {
        let (emulator, client) = setup(5000);
        emulator.inject(Fault::Partial, 1);
        let outcomes = client.send_bulk(
            "acme",
            &[record("1"), record("2"), record("3")],
            &mut no_wait(),
        );
        assert!(
            matches!(outcomes[0], Outcome::Accepted(_))
                && matches!(outcomes[1], Outcome::Accepted(_))
        );
        assert!(matches!(&outcomes[2], Outcome::Transient(m) if m.contains("did not account")));
        let retried = client.send_bulk("acme", &[record("3")], &mut no_wait());
        assert!(matches!(&retried[0], Outcome::Accepted(r) if r.idempotency_replayed));
    }

    #[test]
    fn verify_all_answers_each_request_in_its_place() {
        let (_emulator, client) = setup(5000);
        let records: Vec<Record> = (1..=20).map(|i| record(&i.to_string())).collect();
        let outcomes = client.send_each(&records, &mut no_wait());
        let mut asked: Vec<VerifyRequest> = outcomes
            .iter()
            .zip(&records)
            .map(|(outcome, r)| match outcome {
                Outcome::Accepted(receipt) => VerifyRequest {
                    tenant_id: "acme".into(),
                    database: "db".into(),
                    collection: "public.products".into(),
                    record_id: r.record_id.clone(),
                    record_hash: receipt.record_hash.clone(),
                },
                other => panic!("not accepted: {other:?}"),
            })
            .collect();
        // Every third asks about a hash Certyo does not hold: a mismatch, in its own place.
        for (i, request) in asked.iter_mut().enumerate() {
            if i % 3 == 0 {
                request.record_hash = format!("sha256:{}", "1".repeat(64));
            }
        }
        for in_flight in [0, 1, 8, 64] {
            let answers = client.verify_all(&asked, in_flight, &mut no_wait());
            assert_eq!(answers.len(), asked.len());
            for (i, answer) in answers.iter().enumerate() {
                match answer {
                    Verification::Mismatch { .. } => assert_eq!(i % 3, 0, "{in_flight}: {i}"),
                    Verification::NotYet => assert_ne!(i % 3, 0, "{in_flight}: {i}"),
                    other => panic!("{in_flight}: {i}: {other:?}"),
                }
            }
        }
    }

    #[test]
    fn one_threads_back_off_holds_up_no_other_threads_requests() {
        // Clones of a client share its runtime: the 429 back-off of one (a blocking pause)
        // runs outside the runtime, so another thread's request, made meanwhile, is answered
        // at once and does not time out behind it.
        let (emulator, client) = setup(1000);
        let accepted = client.send_each(&[record("1")], &mut no_wait());
        let Outcome::Accepted(receipt) = &accepted[0] else {
            panic!("not accepted: {accepted:?}");
        };
        let asked = VerifyRequest {
            tenant_id: "acme".into(),
            database: "db".into(),
            collection: "public.products".into(),
            record_id: "1".into(),
            record_hash: receipt.record_hash.clone(),
        };
        emulator.inject(
            Fault::RateLimit {
                retry_after: Some(6),
            },
            1,
        );
        let (backing_off, told) = std::sync::mpsc::channel();
        let sender = client.clone();
        let backs_off = std::thread::spawn(move || {
            sender.send_each(&[record("2")], &mut |delay| {
                backing_off.send(()).expect("the test waits to hear it");
                std::thread::sleep(delay);
                true
            })
        });
        told.recv_timeout(Duration::from_secs(10))
            .expect("the first thread backs off");
        let started = std::time::Instant::now();
        let answers = client.verify_all(&[asked.clone(), asked], 8, &mut no_wait());
        assert!(
            answers.iter().all(|a| matches!(a, Verification::NotYet)),
            "{answers:?}"
        );
        // Well within the other thread's 6 s back-off, with room for a busy machine.
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        let sent = backs_off.join().expect("the first thread");
        assert!(matches!(sent[0], Outcome::Accepted(_)), "{sent:?}");
    }

    #[test]
    fn rate_limits_are_retried_after_the_backoff_and_then_given_up_as_transient() {
        let (emulator, client) = setup(5000);
        emulator.inject(
            Fault::RateLimit {
                retry_after: Some(3),
            },
            2,
        );
        let mut pauses = Vec::new();
        let outcomes = client.send_each(&[record("1")], &mut |d| {
            pauses.push(d);
            true
        });
        assert!(matches!(outcomes[0], Outcome::Accepted(_)));
        assert_eq!(pauses, vec![Duration::from_secs(3), Duration::from_secs(3)]);
        emulator.inject(Fault::RateLimit { retry_after: None }, 4);
        pauses.clear();
        let outcomes = client.send_each(&[record("2")], &mut |d| {
            pauses.push(d);
            true
        });
        assert!(matches!(&outcomes[0], Outcome::Transient(m) if m.contains("429")));
        assert_eq!(
            pauses,
            vec![
                Duration::from_secs(1),
                Duration::from_secs(2),
                Duration::from_secs(4)
            ]
        );
    }

    #[test]
    fn server_errors_and_timeouts_are_transient() {
        let (emulator, client) = setup(300);
        emulator.inject(Fault::ServerError, 1);
        assert!(
            matches!(&client.send_each(&[record("1")], &mut no_wait())[0], Outcome::Transient(m) if m.contains("500"))
        );
        emulator.inject(Fault::Slow { seconds: 1 }, 1);
        assert!(
            matches!(&client.send_each(&[record("2")], &mut no_wait())[0], Outcome::Transient(m) if m.contains("timed out"))
        );
    }

    fn verify_request(receipt: &Receipt) -> VerifyRequest {
        VerifyRequest {
            tenant_id: "acme".into(),
            database: "db".into(),
            collection: "public.products".into(),
            record_id: receipt.record_id.clone(),
            record_hash: receipt.record_hash.clone(),
        }
    }

    #[test]
    fn verification_waits_for_the_anchor_and_reports_a_mismatch() {
        let emulator = Emulator::start(Config {
            anchor_delay: Duration::from_millis(300),
            ..Config::default()
        })
        .unwrap();
        let client = Client::new(ClientConfig {
            base_url: emulator.url().into(),
            api_key: "test-key".into(),
            timeout: Duration::from_secs(5),
            max_rate_limit_retries: 3,
            user_agent: "certyo-tests".into(),
        })
        .unwrap();
        let Outcome::Accepted(first) = client.send_each(&[record("1")], &mut no_wait()).remove(0)
        else {
            panic!("not accepted")
        };
        let request = verify_request(&first);
        assert_eq!(
            client.verify(&request, &mut no_wait()),
            Verification::NotYet
        );
        std::thread::sleep(Duration::from_millis(400));
        assert!(matches!(
            client.verify(&request, &mut no_wait()),
            Verification::Anchored { polygon_tx_hash: Some(tx) } if tx.starts_with("0x")
        ));
        // A newer version does not make the older one a mismatch.
        let mut newer = record("1");
        newer.idempotency_key = "key-1-v2".into();
        newer.record_payload = RawValue::from_string("{\"id\":1,\"v\":2}".into()).unwrap();
        client.send_each(&[newer], &mut no_wait());
        assert!(matches!(
            client.verify(&request, &mut no_wait()),
            Verification::Anchored { .. }
        ));
        emulator.inject(Fault::Mismatch { record: None }, 1);
        assert!(matches!(
            client.verify(&request, &mut no_wait()),
            Verification::Mismatch { reported_hash } if reported_hash != first.record_hash
        ));
        let unknown = VerifyRequest {
            record_id: "404".into(),
            ..request
        };
        assert_eq!(
            client.verify(&unknown, &mut no_wait()),
            Verification::Unknown
        );
    }

    #[test]
    fn bad_records_are_rejected_and_a_wrong_key_is_unauthorized() {
        let (_emulator, client) = setup(5000);
        let mut bad = record("1");
        bad.tenant_id = String::new();
        bad.record_id = String::new();
        let outcomes = client.send_bulk("", &[bad], &mut no_wait());
        assert!(
            matches!(outcomes[0], Outcome::Rejected { status: 422, .. }),
            "{outcomes:?}"
        );
        let wrong = Client::new(ClientConfig {
            api_key: "wrong".into(),
            ..client.config().clone()
        })
        .unwrap();
        let outcomes = wrong.send_each(&[record("1"), record("2")], &mut no_wait());
        assert!(
            outcomes
                .iter()
                .all(|o| matches!(o, Outcome::Refused { status: 401, .. })),
            "{outcomes:?}"
        );
    }

    #[test]
    fn an_answer_that_echoes_the_api_key_is_kept_without_it() {
        let (emulator, client) = setup(5000);
        for status in [401, 400] {
            for bulk in [false, true] {
                emulator.inject(Fault::EchoKey { status }, 1);
                let records = [record("1"), record("2")];
                let outcomes = if bulk {
                    client.send_bulk("acme", &records, &mut no_wait())
                } else {
                    client.send_each(&records, &mut no_wait())
                };
                let body = match &outcomes[0] {
                    Outcome::Refused { body, .. } | Outcome::Rejected { body, .. } => body,
                    other => panic!("{status}: {other:?}"),
                };
                assert!(body.contains("X-API-Key ********"), "{body}");
                assert!(
                    !format!("{outcomes:?}").contains("test-key"),
                    "{outcomes:?}"
                );
            }
        }
    }
}
