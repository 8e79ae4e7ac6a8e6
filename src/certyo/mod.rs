//! The Certyo API client (`../shared/certyo-api.md`). It knows nothing of Postgres: the worker
//! hands it records and gets back, per record, what Certyo said. Unit-tested against the
//! emulator in `pg_test/emulator`.

mod client;
pub mod retry;

pub use client::{Client, ClientConfig};
use serde::{Deserialize, Serialize};

/// One record as Certyo ingests it.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    pub tenant_id: String,
    pub database: String,
    pub collection: String,
    pub record_id: String,
    pub record_payload: Box<serde_json::value::RawValue>,
    pub operation_type: String,
    pub source_timestamp: String,
    pub idempotency_key: String,
}

/// Certyo's answer for one accepted record.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct Receipt {
    pub record_id: String,
    pub record_hash: String,
    #[serde(default)]
    pub accepted_at: Option<String>,
    #[serde(default)]
    pub idempotency_replayed: bool,
}

/// What became of one record sent.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Accepted(Receipt),
    /// 5xx, timeouts, connection errors, 429 after the retries, or a bulk answer that did not
    /// account for this record: send again later.
    Transient(String),
    /// Other 4xx: this record will never be accepted as it is; keep it for an operator.
    Rejected {
        status: u16,
        body: String,
    },
    /// 401/403: the configuration is wrong; nothing more should be sent until it is fixed.
    Unauthorized {
        status: u16,
        body: String,
    },
}
