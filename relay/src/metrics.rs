//! The relay's Prometheus metrics (`certyo-relay run --metrics-addr HOST:PORT`): one registry
//! (the `prometheus-client` crate) that each source's pump updates, served as OpenMetrics text
//! on `GET /metrics` by a small hyper server on a thread of its own. Every metric carries the
//! source's name (`source`); docs/relay.md lists them all.

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};
use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::source::{Fate, Status};
use certyo::Outcome;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SourceLabel {
    source: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    source: String,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct FateLabels {
    source: String,
    fate: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AnswerLabels {
    source: String,
    answer: &'static str,
    /// The HTTP status, where the answer had one ("" for no answer: a timeout, a dropped
    /// connection, a 5xx or 429 the client gave up on, a bulk answer missing the record).
    status: String,
}

type FloatGauge = Gauge<f64, AtomicU64>;

/// The batch latency histogram's buckets, in seconds: 5 ms to about 41 s.
fn batch_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.005, 2.0, 14)
}

/// Every metric of the relay. Cheap to update; `serving` says whether anyone can read them
/// (the pumps then also refresh the queue's counts, which cost a query).
pub struct Metrics {
    registry: Registry,
    serving: AtomicBool,
    queue: Family<StateLabels, Gauge>,
    records: Family<FateLabels, Counter>,
    answers: Family<AnswerLabels, Counter>,
    anchored: Family<SourceLabel, Counter>,
    batch_seconds: Family<SourceLabel, Histogram>,
    last_batch_seconds: Family<SourceLabel, FloatGauge>,
    last_success: Family<SourceLabel, FloatGauge>,
    outage: Family<SourceLabel, Gauge>,
    lease: Family<SourceLabel, Gauge>,
    source_up: Family<SourceLabel, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let queue = Family::<StateLabels, Gauge>::default();
        registry.register(
            "certyo_relay_queue_changes",
            "Changes in the source's queue (or receipts, CDC/Change Tracking) by state: pending, delivered, anchored, dead, not_written_back; refreshed every 10 s",
            queue.clone(),
        );
        let records = Family::<FateLabels, Counter>::default();
        registry.register(
            "certyo_relay_records",
            "Changes whose answer this relay recorded, by fate: delivered (accepted, or answered as a replay), replayed (of those, the replays), retried, dead",
            records.clone(),
        );
        let answers = Family::<AnswerLabels, Counter>::default();
        registry.register(
            "certyo_relay_answers",
            "Certyo's answer per change sent, by kind (accepted, replayed, conflict, rejected, refused, transient) and HTTP status",
            answers.clone(),
        );
        let anchored = Family::<SourceLabel, Counter>::default();
        registry.register(
            "certyo_relay_anchored",
            "Delivered changes that verification found anchored",
            anchored.clone(),
        );
        let batch_seconds = Family::<SourceLabel, Histogram>::new_with_constructor(|| {
            Histogram::new(batch_buckets()) as Histogram
        });
        registry.register_with_unit(
            "certyo_relay_batch_duration",
            "A batch from taking it to its answers recorded: the queue, Certyo, the recording",
            Unit::Seconds,
            batch_seconds.clone(),
        );
        let last_batch_seconds = Family::<SourceLabel, FloatGauge>::default();
        registry.register_with_unit(
            "certyo_relay_last_batch_duration",
            "How long the last batch took, from taking it to its answers recorded",
            Unit::Seconds,
            last_batch_seconds.clone(),
        );
        let last_success = Family::<SourceLabel, FloatGauge>::default();
        registry.register_with_unit(
            "certyo_relay_last_success_timestamp",
            "When a batch last had a change accepted (Unix time); 0: none since the relay started",
            Unit::Seconds,
            last_success.clone(),
        );
        let outage = Family::<SourceLabel, Gauge>::default();
        registry.register(
            "certyo_relay_outage",
            "1 while Certyo does not answer or refuses the configuration (one probe at a time), else 0",
            outage.clone(),
        );
        let lease = Family::<SourceLabel, Gauge>::default();
        registry.register(
            "certyo_relay_lease_held",
            "1 while this relay holds the source's lease and works it (sources without a lease: always), 0 while it stands by",
            lease.clone(),
        );
        let source_up = Family::<SourceLabel, Gauge>::default();
        registry.register(
            "certyo_relay_source_up",
            "1 when the relay's last round on the source's database succeeded, 0 when it failed",
            source_up.clone(),
        );
        Metrics {
            registry,
            serving: AtomicBool::new(false),
            queue,
            records,
            answers,
            anchored,
            batch_seconds,
            last_batch_seconds,
            last_success,
            outage,
            lease,
            source_up,
        }
    }

    /// A source's metrics exist from its start, at zero.
    pub fn start_source(&self, source: &str) {
        let label = SourceLabel {
            source: source.to_string(),
        };
        self.last_success.get_or_create(&label).set(0.0);
        self.outage.get_or_create(&label).set(0);
        self.source_up.get_or_create(&label).set(1);
        for fate in ["delivered", "replayed", "retried", "dead"] {
            self.records
                .get_or_create(&FateLabels {
                    source: source.to_string(),
                    fate,
                })
                .inc_by(0);
        }
        self.anchored.get_or_create(&label).inc_by(0);
        drop(self.batch_seconds.get_or_create(&label));
    }

    pub fn serving(&self) -> bool {
        self.serving.load(Ordering::Relaxed)
    }

    /// The queue's counts, from the source's `status`.
    pub fn queue(&self, source: &str, status: &Status) {
        for (state, count) in [
            ("pending", status.pending),
            ("delivered", status.delivered),
            ("anchored", status.anchored),
            ("dead", status.dead),
            ("not_written_back", status.not_written_back),
        ] {
            self.queue
                .get_or_create(&StateLabels {
                    source: source.to_string(),
                    state,
                })
                .set(count);
        }
    }

    /// A batch recorded: its fates, the answers, how long it took.
    pub fn batch(&self, source: &str, fates: &[Fate], outcomes: &[Outcome], took: Duration) {
        let fate_labels = |fate| FateLabels {
            source: source.to_string(),
            fate,
        };
        let mut accepted = false;
        for fate in fates {
            match fate {
                Fate::Delivered { replayed, .. } => {
                    accepted = true;
                    self.records.get_or_create(&fate_labels("delivered")).inc();
                    if *replayed {
                        self.records.get_or_create(&fate_labels("replayed")).inc();
                    }
                }
                Fate::Retry { .. } => {
                    self.records.get_or_create(&fate_labels("retried")).inc();
                }
                Fate::Dead { .. } => {
                    self.records.get_or_create(&fate_labels("dead")).inc();
                }
                Fate::Untouched => {}
            }
        }
        for outcome in outcomes {
            let (answer, status) = answer_of(outcome);
            self.answers
                .get_or_create(&AnswerLabels {
                    source: source.to_string(),
                    answer,
                    status,
                })
                .inc();
        }
        let label = SourceLabel {
            source: source.to_string(),
        };
        self.batch_seconds
            .get_or_create(&label)
            .observe(took.as_secs_f64());
        self.last_batch_seconds
            .get_or_create(&label)
            .set(took.as_secs_f64());
        if accepted {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs_f64())
                .unwrap_or_default();
            self.last_success.get_or_create(&label).set(now);
        }
    }

    pub fn anchored(&self, source: &str, count: u64) {
        self.anchored
            .get_or_create(&SourceLabel {
                source: source.to_string(),
            })
            .inc_by(count);
    }

    pub fn outage(&self, source: &str, down: bool) {
        self.set(&self.outage, source, down);
    }

    pub fn lease(&self, source: &str, held: bool) {
        self.set(&self.lease, source, held);
    }

    pub fn source_up(&self, source: &str, up: bool) {
        self.set(&self.source_up, source, up);
    }

    fn set(&self, family: &Family<SourceLabel, Gauge>, source: &str, on: bool) {
        family
            .get_or_create(&SourceLabel {
                source: source.to_string(),
            })
            .set(i64::from(on));
    }

    /// The OpenMetrics text of every metric.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            tracing::error!(error = %e, "the metrics could not be encoded");
        }
        text
    }

    /// Serve `GET /metrics` on `listener` from a thread of its own, for as long as the
    /// process lives.
    pub fn serve(self: &Arc<Self>, listener: std::net::TcpListener) -> std::io::Result<()> {
        listener.set_nonblocking(true)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()?;
        let listener = {
            let _entered = runtime.enter();
            tokio::net::TcpListener::from_std(listener)?
        };
        let metrics = self.clone();
        self.serving.store(true, Ordering::Relaxed);
        std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || runtime.block_on(accept(listener, metrics)))?;
        Ok(())
    }
}

/// What an answer was, for `certyo_relay_answers`: its kind and HTTP status.
fn answer_of(outcome: &Outcome) -> (&'static str, String) {
    match outcome {
        Outcome::Accepted(receipt) if receipt.idempotency_replayed => ("replayed", "202".into()),
        Outcome::Accepted(_) => ("accepted", "202".into()),
        Outcome::Conflict { .. } => ("conflict", "202".into()),
        Outcome::Rejected { status, .. } if *status == certyo::fate::NO_HTTP_STATUS => {
            ("rejected", String::new())
        }
        Outcome::Rejected { status, .. } => ("rejected", status.to_string()),
        Outcome::Refused { status, .. } => ("refused", status.to_string()),
        Outcome::Transient(_) => ("transient", String::new()),
    }
}

async fn accept(listener: tokio::net::TcpListener, metrics: Arc<Metrics>) {
    loop {
        let stream = match listener.accept().await {
            Ok((stream, _)) => stream,
            Err(e) => {
                tracing::warn!(error = %e, "the metrics endpoint cannot accept a connection");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let metrics = metrics.clone();
        tokio::spawn(async move {
            let service =
                hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
                    let metrics = metrics.clone();
                    async move { Ok::<_, Infallible>(answer(&metrics, &request)) }
                });
            // A scraper that closes or breaks its connection ends it; nothing to report.
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

fn answer(metrics: &Metrics, request: &Request<hyper::body::Incoming>) -> Response<Full<Bytes>> {
    let (status, content_type, body) = match (request.method(), request.uri().path()) {
        (&hyper::Method::GET, "/metrics") => (
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.encode(),
        ),
        (_, "/metrics") => (
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain; charset=utf-8",
            "GET /metrics\n".to_string(),
        ),
        _ => (
            StatusCode::NOT_FOUND,
            "text/plain; charset=utf-8",
            "certyo-relay serves /metrics only\n".to_string(),
        ),
    };
    let mut response = Response::new(Full::new(Bytes::from(body)));
    *response.status_mut() = status;
    if let Ok(value) = hyper::header::HeaderValue::from_str(content_type) {
        response
            .headers_mut()
            .insert(hyper::header::CONTENT_TYPE, value);
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_exposed_with_its_source_from_the_start() {
        let metrics = Metrics::new();
        metrics.start_source("shop");
        metrics.lease("shop", true);
        metrics.queue(
            "shop",
            &Status {
                pending: 7,
                ..Status::default()
            },
        );
        let text = metrics.encode();
        for line in [
            "certyo_relay_queue_changes{source=\"shop\",state=\"pending\"} 7",
            "certyo_relay_records_total{source=\"shop\",fate=\"dead\"} 0",
            "certyo_relay_anchored_total{source=\"shop\"} 0",
            "certyo_relay_batch_duration_seconds_count{source=\"shop\"} 0",
            "certyo_relay_last_success_timestamp_seconds{source=\"shop\"} 0.0",
            "certyo_relay_outage{source=\"shop\"} 0",
            "certyo_relay_lease_held{source=\"shop\"} 1",
            "certyo_relay_source_up{source=\"shop\"} 1",
        ] {
            assert!(text.contains(line), "{line} not in:\n{text}");
        }
        assert!(text.ends_with("# EOF\n"));
    }

    #[test]
    fn a_batch_counts_fates_answers_and_its_time() {
        let metrics = Metrics::new();
        let fates = [
            Fate::Retry {
                retry_after: Duration::from_secs(1),
                error: "HTTP 500".into(),
            },
            Fate::Untouched,
        ];
        let outcomes = [
            Outcome::Transient("HTTP 500".into()),
            Outcome::Rejected {
                status: 422,
                body: "no".into(),
            },
        ];
        metrics.batch("shop", &fates, &outcomes, Duration::from_millis(40));
        let text = metrics.encode();
        for line in [
            "certyo_relay_records_total{source=\"shop\",fate=\"retried\"} 1",
            "certyo_relay_answers_total{source=\"shop\",answer=\"transient\",status=\"\"} 1",
            "certyo_relay_answers_total{source=\"shop\",answer=\"rejected\",status=\"422\"} 1",
            "certyo_relay_batch_duration_seconds_count{source=\"shop\"} 1",
            "certyo_relay_last_batch_duration_seconds{source=\"shop\"} 0.04",
        ] {
            assert!(text.contains(line), "{line} not in:\n{text}");
        }
    }
}
