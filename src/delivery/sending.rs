//! HTTP off the worker's main thread. A batch's requests run on a helper thread, so that while
//! Certyo reads one batch the worker records the previous one and takes the next: a pass costs
//! the longer of HTTP and database work, not their sum. Verification requests run the same way,
//! so they never hold up delivery. Helper threads are started with every signal blocked and
//! never touch Postgres; they hand their answers back over a channel. Nothing is written for
//! work in flight, so work abandoned at shutdown is redone after the restart (a resent batch is
//! answered as a replay).

use super::entry::Entry;
use crate::settings::Settings;
use certyo::{Client, Outcome, Record};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Work on a helper thread, started with every signal blocked, that never touches Postgres
/// and hands its result back over a channel. Dropping it tells the thread to give up its
/// back-off sleeps.
pub struct OffThread<T> {
    answers: mpsc::Receiver<T>,
    stop: Arc<AtomicBool>,
    /// Set by the thread once its result is sent.
    finished: Arc<AtomicBool>,
}

impl<T: Send + 'static> OffThread<T> {
    /// `work` gets a pause function for 429 back-off: it sleeps, and returns false (stop) when
    /// the worker no longer waits.
    pub fn start(
        name: &str,
        work: impl FnOnce(&mut dyn FnMut(Duration) -> bool) -> T + Send + 'static,
    ) -> OffThread<T> {
        let stop = Arc::new(AtomicBool::new(false));
        let finished = Arc::new(AtomicBool::new(false));
        let (tell, answers) = mpsc::channel();
        let flag = stop.clone();
        let done = finished.clone();
        let body = move || {
            let result = work(&mut |delay| pause_unless_stopped(&flag, delay));
            // A closed channel means the worker stopped waiting; the work is redone later.
            let told = tell.send(result).is_ok();
            done.store(true, Ordering::Release);
            announce_finished();
            told
        };
        let spawned =
            with_signals_blocked(|| std::thread::Builder::new().name(name.into()).spawn(body));
        if let Err(e) = spawned {
            pgrx::warning!("certyo_cdc: cannot start the {name} thread ({e}); its work is redone at the next pass");
        }
        OffThread {
            answers,
            stop,
            finished,
        }
    }

    /// Whether the thread has finished (its result, if any, is waiting to be taken).
    pub fn is_finished(&self) -> bool {
        self.finished.load(Ordering::Acquire)
    }

    /// The result if the thread is done: `Some(None)` when it ended without one.
    pub fn try_take(&self) -> Option<Option<T>> {
        match self.answers.try_recv() {
            Ok(result) => Some(Some(result)),
            Err(mpsc::TryRecvError::Empty) => None,
            Err(mpsc::TryRecvError::Disconnected) => Some(None),
        }
    }

    /// Wait for the result: `Some(None)` when the thread ended without one, None on SIGTERM.
    pub fn wait(&self) -> Option<Option<T>> {
        loop {
            match self.answers.recv_timeout(Duration::from_millis(5)) {
                Ok(result) => return Some(Some(result)),
                Err(RecvTimeoutError::Disconnected) => return Some(None),
                Err(RecvTimeoutError::Timeout) if super::stopping() => return None,
                Err(RecvTimeoutError::Timeout) => continue,
            }
        }
    }
}

impl<T> Drop for OffThread<T> {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// A batch being sent.
pub struct Sending {
    batch: Vec<Entry>,
    /// The configuration the batch went out with: a refusal answers that one.
    pub config: certyo::ClientConfig,
    /// Each outcome with the id of the entry it answers.
    work: OffThread<Vec<(i64, Outcome)>>,
}

impl Sending {
    /// Whether the answers are there (taken by [`Sending::finish`] without waiting).
    pub fn answered(&self) -> bool {
        self.work.is_finished()
    }

    /// Start sending `batch` by the contract's rule: more than `bulk_threshold` → bulk requests
    /// of at most `batch_size`; otherwise one request per record.
    /// An entry whose payload does not parse is answered at once as rejected (a dead letter
    /// with the reason), never sent.
    pub fn start(client: &Client, settings: &Settings, mut batch: Vec<Entry>) -> Sending {
        let mut unsendable = Vec::new();
        let (mut ids, mut records) = (Vec::new(), Vec::new());
        for entry in &mut batch {
            match record(settings, entry) {
                Ok(record) => {
                    ids.push(entry.id);
                    records.push(record);
                }
                Err(reason) => unsendable.push((entry.id, reason)),
            }
        }
        let config = client.config().clone();
        let shape = certyo::batch::Shape {
            batch_size: settings.batch_size,
            bulk_threshold: settings.bulk_threshold,
        };
        let (tenant, client) = (settings.tenant_id.clone(), client.clone());
        let work = OffThread::start("certyo_cdc send", move |pause| {
            let outcomes = certyo::batch::send(&client, &tenant, &records, shape, pause);
            // The client answers each record of a request in order, one outcome per record.
            let mut answered: Vec<(i64, Outcome)> = ids.into_iter().zip(outcomes).collect();
            answered.extend(unsendable);
            answered
        });
        Sending {
            batch,
            config,
            work,
        }
    }

    /// The ids in flight: the next take must leave them alone.
    pub fn ids(&self) -> Vec<i64> {
        self.batch.iter().map(|e| e.id).collect()
    }

    /// Wait for the answers. None on SIGTERM: the batch is abandoned, nothing recorded.
    /// An entry without an answer (the thread failed, or the answer fell short) is a
    /// transient failure, retried.
    pub fn finish(self) -> Option<(Vec<Entry>, Vec<Outcome>)> {
        let answered = self.work.wait()?.unwrap_or_default();
        let mut answered: std::collections::HashMap<i64, Outcome> = answered.into_iter().collect();
        let lost = Outcome::Transient("the HTTP thread ended without an answer".into());
        let outcomes = self
            .batch
            .iter()
            .map(|e| answered.remove(&e.id).unwrap_or_else(|| lost.clone()))
            .collect();
        Some((self.batch, outcomes))
    }
}

/// The eventfd helper threads write to when they finish, watched by the worker's latch wait.
static FINISHED: AtomicI32 = AtomicI32::new(-1);

/// The eventfd, opened on first use (by the main thread); -1 if it cannot be opened, and then
/// the worker finds finished work at its next pass instead.
pub fn finished_fd() -> i32 {
    let fd = FINISHED.load(Ordering::Acquire);
    if fd >= 0 {
        return fd;
    }
    // SAFETY: eventfd has no preconditions; the descriptor lives as long as the process.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    FINISHED.store(fd.max(-1), Ordering::Release);
    fd
}

/// From a helper thread: wake the worker. Only a write(2) to the eventfd, no Postgres.
fn announce_finished() {
    let fd = FINISHED.load(Ordering::Acquire);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to an eventfd; a full counter (EAGAIN) is
        // fine, the worker is awake already.
        let _written = unsafe { libc::write(fd, (&one as *const u64).cast(), 8) };
    }
}

/// After a wake: reset the eventfd's counter.
pub fn drain_finished() {
    let fd = FINISHED.load(Ordering::Acquire);
    if fd >= 0 {
        let mut count: u64 = 0;
        // SAFETY: reads 8 bytes into a live u64 from a non-blocking eventfd; EAGAIN (nothing
        // to read) is the usual answer and needs nothing.
        let _read = unsafe { libc::read(fd, (&mut count as *mut u64).cast(), 8) };
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

/// The Certyo record of an entry, which takes its payload (the batch keeps only its hash); Err
/// (the reason) when the payload is larger than `certyo.max_payload_size` or not JSON.
fn record(settings: &Settings, entry: &mut Entry) -> Result<Record, Outcome> {
    if let Some(refused) = certyo::batch::oversized(
        entry.payload_size,
        settings.max_payload_size,
        || {
            format!(
                "certyo_cdc: the payload of {} bytes is larger than certyo.max_payload_size ({} kB); it was not sent. Raise the setting and call certyo.retry() to send it",
                entry.payload_size,
                settings.max_payload_size / 1024
            )
        },
    ) {
        return Err(refused);
    }
    entry.payload_sha256 = certyo::payload_sha256(entry.payload.as_bytes());
    entry.column_sha256 = certyo::column_sha256(&entry.payload)
        .map(|digests| certyo::to_hex(&digests))
        .unwrap_or_default();
    let text = std::mem::take(&mut entry.payload);
    let payload =
        serde_json::value::RawValue::from_string(text).map_err(|e| Outcome::Rejected {
            status: certyo::fate::NO_HTTP_STATUS,
            body: format!(
                "certyo_cdc: the queued payload is not valid JSON ({e}); it was not sent"
            ),
        })?;
    Ok(Record {
        tenant_id: settings.tenant_id.clone(),
        database: settings.database_name.clone(),
        collection: entry.collection.clone(),
        record_id: entry.record_id.clone(),
        record_payload: payload,
        operation_type: entry.operation.as_str().to_string(),
        source_timestamp: entry.source_timestamp.clone(),
        idempotency_key: entry.idempotency_key.clone(),
    })
}

/// Threads started inside `f` inherit a mask with every signal blocked, so Postgres' signals
/// always reach the worker's main thread.
pub fn with_signals_blocked<T>(f: impl FnOnce() -> T) -> T {
    // SAFETY: sigset_t is plain data that sigfillset initializes; pthread_sigmask changes only
    // the calling thread's mask, and it is restored below. It fails only for an invalid `how`,
    // which these constants are not; if it ever did, the mask is unchanged and `f` runs anyway,
    // so it is logged rather than ignored.
    unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut previous: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        let blocked = libc::pthread_sigmask(libc::SIG_BLOCK, &all, &mut previous);
        if blocked != 0 {
            pgrx::warning!(
                "certyo_cdc: could not block signals for an HTTP thread (error {blocked})"
            );
        }
        let result = f();
        if blocked == 0 {
            libc::pthread_sigmask(libc::SIG_SETMASK, &previous, std::ptr::null_mut());
        }
        result
    }
}
