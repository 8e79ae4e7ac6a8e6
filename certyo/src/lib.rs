//! The Certyo API (`../shared/certyo-api.md`) and the rules of delivering to it, shared by the
//! PostgreSQL extension's worker and `certyo-relay`. It knows nothing of any database: a
//! caller hands it records and gets back, per record, what Certyo said, and asks it when to try
//! again. Unit-tested against the emulator in `pg_test/emulator`.
//!
//! - [`client`]: HTTP, one request per record or bulk, verification.
//! - [`batch`]: the contract's batching rule, the payload cap, and isolating the bad records of
//!   a refused bulk.
//! - [`fate`]: what an answer means for a change (receipt, retry, dead letter) and for a
//!   receipt's verification (settled, or asked again with back-off).
//! - [`outage`]: when Certyo stops answering, one probe at a time on a growing interval.
//! - [`retry`]: back-off for 429 and for transient failures, with jitter.

pub mod batch;
mod client;
pub mod fate;
pub mod outage;
pub mod retry;
mod secret;

pub use client::{Client, ClientConfig};
pub use secret::{mask_secret, mask_secret_in_place, MIN_SECRET_LEN};
use serde::{Deserialize, Serialize};

/// What happened to a record: Certyo's `operationType`. One name in the extension, the relay
/// and the queues (`insert`, `update`, `delete`, `upsert`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operation {
    Insert,
    Update,
    Delete,
    /// A row queued by a backfill: Certyo is told the current state, not how it came about.
    Upsert,
}

impl Operation {
    pub fn as_str(self) -> &'static str {
        match self {
            Operation::Insert => "insert",
            Operation::Update => "update",
            Operation::Delete => "delete",
            Operation::Upsert => "upsert",
        }
    }

    pub fn parse(text: &str) -> Option<Operation> {
        match text {
            "insert" => Some(Operation::Insert),
            "update" => Some(Operation::Update),
            "delete" => Some(Operation::Delete),
            "upsert" => Some(Operation::Upsert),
            _ => None,
        }
    }
}

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
    /// 5xx, 408, timeouts, connection errors, 429 after the retries, or a bulk answer that did
    /// not account for this record: send again later.
    Transient(String),
    /// Other 4xx: this record will never be accepted as it is; keep it for an operator.
    Rejected {
        status: u16,
        body: String,
    },
    /// The configuration is wrong, not the record: 401/403 (the API key) or 404/405 (the base
    /// URL's path). Nothing more should be sent until it is fixed.
    Refused {
        status: u16,
        body: String,
    },
    /// Certyo answered this change as a replay of another record's change: its idempotency
    /// key was used before for something else. Never recorded as this change's receipt (the
    /// hash is another record's); kept for an operator.
    Conflict {
        receipt: Receipt,
    },
}

impl Outcome {
    /// Every free text of the outcome with `secret` masked (see [`mask_secret`]): what Certyo
    /// answered may echo the API key it was sent, in an error body. A receipt's facts (record
    /// id, hash) are never changed: a short key found inside a hash would corrupt the hash
    /// that is written back, verified and audited. A conflict's receipt is kept only as text
    /// (`conflict_message`), masked where it is stored.
    pub fn masked(self, secret: &str) -> Outcome {
        let mask = |text: String| mask_secret(&text, secret);
        match self {
            Outcome::Accepted(receipt) => Outcome::Accepted(receipt),
            Outcome::Transient(text) => Outcome::Transient(mask(text)),
            Outcome::Rejected { status, body } => Outcome::Rejected {
                status,
                body: mask(body),
            },
            Outcome::Refused { status, body } => Outcome::Refused {
                status,
                body: mask(body),
            },
            Outcome::Conflict { receipt } => Outcome::Conflict { receipt },
        }
    }

    /// What Certyo answered for `record`: its receipt, or a conflict or a transient failure
    /// when the answer names another record.
    pub fn of_receipt(record: &Record, receipt: Receipt) -> Outcome {
        if receipt.record_id == record.record_id {
            Outcome::Accepted(receipt)
        } else if receipt.idempotency_replayed {
            Outcome::Conflict { receipt }
        } else {
            Outcome::Transient(format!(
                "Certyo's answer names record {:?}, not this one",
                receipt.record_id
            ))
        }
    }

    /// For a conflict, the text kept with the dead letter.
    pub fn conflict_message(receipt: &Receipt, idempotency_key: &str) -> String {
        format!(
            "certyo_cdc: Certyo answered this change as a replay of record {:?} (recordHash {}): \
             idempotency key {idempotency_key} was used before for another change, so this change \
             was not recorded as delivered",
            receipt.record_id, receipt.record_hash
        )
    }
}

/// The question `/api/v1/verify/record` answers: is this version of the record anchored?
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct VerifyRequest {
    pub tenant_id: String,
    pub database: String,
    pub collection: String,
    pub record_id: String,
    pub record_hash: String,
}

/// What verification found for one receipt.
#[derive(Debug, Clone, PartialEq)]
pub enum Verification {
    /// On chain, with the hash we hold.
    Anchored { polygon_tx_hash: Option<String> },
    /// Known to Certyo, not yet on chain.
    NotYet,
    /// Certyo does not know this version (yet).
    Unknown,
    /// Certyo holds another hash for this record: never papered over.
    Mismatch { reported_hash: String },
    /// The request itself failed, as for ingestion (transient, rejected, unauthorized).
    Failed(Outcome),
}

impl Verification {
    /// Every free text of the answer with `secret` masked, as [`Outcome::masked`]: the
    /// hashes Certyo reports are facts and stay as they are.
    pub fn masked(self, secret: &str) -> Verification {
        match self {
            Verification::Failed(outcome) => Verification::Failed(outcome.masked(secret)),
            other => other,
        }
    }
}

/// SHA-256 of the payload text as sent, in hex: what the receipt keeps and
/// `certyo.audit` compares a row against.
pub fn payload_sha256(payload: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let digest = Sha256::digest(payload);
    let mut hex = String::with_capacity(64);
    for byte in digest {
        hex.push(char::from(DIGITS[usize::from(byte >> 4)]));
        hex.push(char::from(DIGITS[usize::from(byte & 15)]));
    }
    hex
}
