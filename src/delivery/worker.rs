//! The delivery worker's main loop. One worker serves `certyo.database_name`. Each pass: take
//! a batch (one short transaction), send it (no transaction open), record the results and write
//! the hashes back (short transactions). It sleeps on its latch: a commit that queued changes
//! sets it, `certyo.poll_interval` is the fallback, and SIGTERM or postmaster death ends it.

use super::settings::{self, Settings};
use super::store::{self, Entry, Tally};
use crate::certyo::retry::next_attempt_delay;
use crate::certyo::{Client, ClientConfig, Outcome, Record};
use pgrx::bgworkers::{BackgroundWorker, SignalWakeFlags};
use pgrx::pg_sys;
use pgrx::pg_sys::panic::CaughtError;
use pgrx::PgTryBuilder;
use std::time::{Duration, Instant};

/// Entry point, named in the worker's registration.
#[pgrx::pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn certyo_delivery_main(_arg: pg_sys::Datum) {
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP | SignalWakeFlags::SIGTERM);
    let database = settings::current().database_name;
    BackgroundWorker::connect_worker_to_spi(Some(&database), None);
    crate::wake::set_worker(Some(unsafe { (*pg_sys::MyProc).pgprocno }));
    Worker::default().run();
    crate::wake::set_worker(None);
}

#[derive(Default)]
struct Worker {
    client: Option<Client>,
    /// Set by a 401/403 and cleared by a configuration reload: nothing is sent meanwhile.
    unauthorized: Option<String>,
    last_state: Option<(String, String)>,
}

enum Next {
    /// More may be ready: run another pass at once.
    Now,
    Wait(Duration),
}

impl Worker {
    fn run(mut self) {
        loop {
            if BackgroundWorker::sighup_received() {
                unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
                self.unauthorized = None;
            }
            let next = match self.guarded_pass() {
                Ok(next) => next,
                Err(e) => {
                    pgrx::warning!("certyo_cdc: delivery pass failed, retrying: {e}");
                    Next::Wait(settings::current().poll_interval)
                }
            };
            let keep_going = match next {
                Next::Now => !BackgroundWorker::sigterm_received(),
                Next::Wait(wait) => BackgroundWorker::wait_latch(Some(wait)),
            };
            if !keep_going {
                break;
            }
        }
    }

    /// One pass, with any Postgres error (a table dropped meanwhile, `DROP EXTENSION` between
    /// two statements, a lock timeout) caught: its transaction is aborted and the worker goes
    /// on, instead of exiting and being restarted. Nothing is lost: what was not recorded is
    /// sent again and answered as a replay.
    fn guarded_pass(&mut self) -> Result<Next, String> {
        let this = std::panic::AssertUnwindSafe(&mut *self);
        PgTryBuilder::new(move || {
            let this = this;
            this.0.pass().map_err(|e| e.to_string())
        })
        .catch_others(|caught| {
            unsafe { pg_sys::AbortCurrentTransaction() };
            Err(match &caught {
                CaughtError::PostgresError(report) | CaughtError::ErrorReport(report) => {
                    report.message().to_string()
                }
                CaughtError::RustPanic { ereport, .. } => ereport.message().to_string(),
            })
        })
        .execute()
    }

    fn pass(&mut self) -> Result<Next, pgrx::spi::Error> {
        let settings = settings::current();
        if !store::extension_installed()? {
            return Ok(Next::Wait(
                settings.poll_interval.max(Duration::from_secs(5)),
            ));
        }
        if !settings.enabled {
            self.announce(
                "paused",
                "certyo.enabled is off: changes are captured but not sent",
                None,
                Tally::default(),
            )?;
            return Ok(Next::Wait(settings.poll_interval));
        }
        if let Some(missing) = settings.missing() {
            self.announce("not configured", &missing, None, Tally::default())?;
            return Ok(Next::Wait(settings.poll_interval));
        }
        if let Some(refusal) = self.unauthorized.clone() {
            let detail = format!("Certyo refused the API key ({refusal}): nothing is sent until certyo.api_key is fixed and reloaded");
            self.announce("unauthorized", &detail, None, Tally::default())?;
            return Ok(Next::Wait(settings.poll_interval));
        }
        let batch = store::take_batch(settings.batch_size)?;
        if batch.is_empty() {
            store::expire(settings.retention)?;
            self.announce("idle", "waiting for changes", None, Tally::default())?;
            let due = store::next_due()?.unwrap_or(settings.poll_interval);
            return Ok(Next::Wait(due.min(settings.poll_interval)));
        }
        let client = self.client(&settings)?;
        let outcomes = send(client, &settings, &batch);
        if let Some(Outcome::Unauthorized { status, body }) = outcomes
            .iter()
            .find(|o| matches!(o, Outcome::Unauthorized { .. }))
        {
            let refusal = format!(
                "HTTP {status}: {}",
                body.chars().take(200).collect::<String>()
            );
            pgrx::warning!("certyo_cdc: Certyo refused the API key ({refusal}); delivery stops until certyo.api_key is fixed and reloaded");
            self.unauthorized = Some(refusal);
        }
        let error = outcomes.iter().find_map(|o| match o {
            Outcome::Transient(e) => Some(e.clone()),
            Outcome::Rejected { status, body } => Some(format!("HTTP {status}: {body}")),
            _ => None,
        });
        let results: Vec<(Entry, Outcome)> = batch.into_iter().zip(outcomes).collect();
        let tally = store::record(&results, &|_| next_attempt_delay(1, jitter()))?;
        let detail = format!(
            "delivered {} of {} in the last pass",
            tally.accepted, tally.sent
        );
        self.announce("delivering", &detail, error.as_deref(), tally)?;
        Ok(if tally.accepted > 0 {
            Next::Now
        } else {
            Next::Wait(settings.poll_interval)
        })
    }

    /// The HTTP client, built on first use and again when its settings change.
    fn client(&mut self, settings: &Settings) -> Result<&Client, pgrx::spi::Error> {
        let wanted = ClientConfig {
            base_url: settings.base_url.clone(),
            api_key: settings.api_key.clone(),
            timeout: settings.request_timeout,
            max_rate_limit_retries: settings.max_rate_limit_retries,
        };
        if self.client.as_ref().map(Client::config) != Some(&wanted) {
            match with_signals_blocked(|| Client::new(wanted)) {
                Ok(client) => self.client = Some(client),
                Err(e) => pgrx::warning!("certyo_cdc: {e}"),
            }
        }
        self.client.as_ref().ok_or(pgrx::spi::Error::NoTupleTable)
    }

    /// Publish the state when it changes, or when there are results to count.
    fn announce(
        &mut self,
        state: &str,
        detail: &str,
        error: Option<&str>,
        tally: Tally,
    ) -> Result<(), pgrx::spi::Error> {
        let key = (state.to_string(), detail.to_string());
        if self.last_state.as_ref() == Some(&key) && tally.sent == 0 && error.is_none() {
            return Ok(());
        }
        if self.last_state.as_ref().map(|s| &s.0) != Some(&key.0)
            && state != "delivering"
            && state != "idle"
        {
            pgrx::log!("certyo_cdc: delivery {state}: {detail}");
        }
        self.last_state = Some(key);
        store::set_state(state, detail, error, tally)
    }
}

/// Send a batch by the contract's rule: more than `bulk_threshold` → bulk requests of at most
/// `batch_size`; otherwise one request per record.
fn send(client: &Client, settings: &Settings, batch: &[Entry]) -> Vec<Outcome> {
    let records: Vec<Record> = batch.iter().map(|e| record(settings, e)).collect();
    let mut pause = |delay: Duration| sleep(delay);
    if records.len() > settings.bulk_threshold {
        records
            .chunks(settings.batch_size)
            .flat_map(|chunk| client.send_bulk(&settings.tenant_id, chunk, &mut pause))
            .collect()
    } else {
        client.send_each(&records, &mut pause)
    }
}

fn record(settings: &Settings, entry: &Entry) -> Record {
    let payload =
        serde_json::value::RawValue::from_string(entry.payload.clone()).unwrap_or_else(|_| {
            serde_json::value::RawValue::from_string("{}".into()).unwrap_or_default()
        });
    Record {
        tenant_id: settings.tenant_id.clone(),
        database: settings.database_name.clone(),
        collection: entry.collection.clone(),
        record_id: entry.record_id.clone(),
        record_payload: payload,
        operation_type: entry.operation.clone(),
        source_timestamp: entry.source_timestamp.clone(),
        idempotency_key: entry.idempotency_key.clone(),
    }
}

/// Sleep on the latch for `delay` (commits may set it meanwhile); false on SIGTERM.
fn sleep(delay: Duration) -> bool {
    let deadline = Instant::now() + delay;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return true;
        }
        if !BackgroundWorker::wait_latch(Some(left)) {
            return false;
        }
    }
}

/// Threads started inside `f` (the HTTP client's) inherit a mask with every signal blocked, so
/// Postgres' signals always reach the worker's main thread.
fn with_signals_blocked<T>(f: impl FnOnce() -> T) -> T {
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut previous: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut previous);
        let result = f();
        libc::pthread_sigmask(libc::SIG_SETMASK, &previous, std::ptr::null_mut());
        result
    }
}

/// In [0, 1): enough randomness to spread retries, from the clock.
fn jitter() -> f64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    f64::from(nanos % 1000) / 1000.0
}
