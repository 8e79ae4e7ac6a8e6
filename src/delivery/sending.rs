//! The batch on the wire. Its HTTP requests run on a helper thread, so that while Certyo reads
//! one batch the worker records the previous one and takes the next: a pass costs the longer
//! of HTTP and database work, not their sum. The thread is started with every signal blocked
//! and never touches Postgres; it hands its answers back over a channel. Nothing is written
//! for a batch in flight, so a batch abandoned at shutdown is sent again after the restart and
//! answered as a replay.

use super::settings::Settings;
use super::store::Entry;
use crate::certyo::{Client, Outcome, Record};
use pgrx::bgworkers::BackgroundWorker;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct Sending {
    batch: Vec<Entry>,
    answers: mpsc::Receiver<Vec<Outcome>>,
    /// Set when the worker stops waiting: the thread then gives up its 429 back-off.
    stop: Arc<AtomicBool>,
}

impl Sending {
    /// Start sending `batch` by the contract's rule: more than `bulk_threshold` → bulk requests
    /// of at most `batch_size`; otherwise one request per record.
    pub fn start(client: &Client, settings: &Settings, batch: Vec<Entry>) -> Sending {
        let records: Vec<Record> = batch.iter().map(|e| record(settings, e)).collect();
        let bulk = records.len() > settings.bulk_threshold;
        let (chunk, tenant) = (settings.batch_size, settings.tenant_id.clone());
        let (client, stop) = (client.clone(), Arc::new(AtomicBool::new(false)));
        let (tell, answers) = mpsc::channel();
        let flag = stop.clone();
        let work = move || {
            let mut pause = |delay: Duration| pause_unless_stopped(&flag, delay);
            let outcomes: Vec<Outcome> = if bulk {
                records
                    .chunks(chunk)
                    .flat_map(|part| client.send_bulk(&tenant, part, &mut pause))
                    .collect()
            } else {
                client.send_each(&records, &mut pause)
            };
            // A closed channel means the worker stopped waiting; the batch is resent later.
            tell.send(outcomes).is_ok()
        };
        let spawned = with_signals_blocked(|| {
            std::thread::Builder::new()
                .name("certyo_cdc http".into())
                .spawn(work)
        });
        if let Err(e) = spawned {
            pgrx::warning!(
                "certyo_cdc: cannot start the HTTP thread ({e}); the batch waits for the next pass"
            );
        }
        Sending {
            batch,
            answers,
            stop,
        }
    }

    /// The ids in flight: the next take must leave them alone.
    pub fn ids(&self) -> Vec<i64> {
        self.batch.iter().map(|e| e.id).collect()
    }

    /// Wait for the answers. None on SIGTERM: the batch is abandoned, nothing recorded.
    pub fn finish(self) -> Option<(Vec<Entry>, Vec<Outcome>)> {
        loop {
            match self.answers.recv_timeout(Duration::from_millis(5)) {
                Ok(outcomes) => return Some((self.batch, outcomes)),
                Err(RecvTimeoutError::Timeout) if BackgroundWorker::sigterm_received() => {
                    self.stop.store(true, Ordering::Relaxed);
                    return None;
                }
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => {
                    let lost = Outcome::Transient("the HTTP thread ended without an answer".into());
                    let outcomes = vec![lost; self.batch.len()];
                    return Some((self.batch, outcomes));
                }
            }
        }
    }
}

/// The 429 back-off on the helper thread: a plain sleep in short steps, cut short (false) when
/// the worker stops waiting.
fn pause_unless_stopped(stop: &AtomicBool, delay: Duration) -> bool {
    let deadline = Instant::now() + delay;
    while Instant::now() < deadline {
        if stop.load(Ordering::Relaxed) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(50).min(delay));
    }
    !stop.load(Ordering::Relaxed)
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

/// Threads started inside `f` inherit a mask with every signal blocked, so Postgres' signals
/// always reach the worker's main thread.
pub fn with_signals_blocked<T>(f: impl FnOnce() -> T) -> T {
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
