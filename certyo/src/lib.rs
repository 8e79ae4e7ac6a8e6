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

/// The columns of a payload (a JSON object, as capture renders it), in its order: each name and
/// its value's JSON text exactly as sent. None when the payload is not a JSON object.
pub fn payload_columns(payload: &str) -> Option<Vec<(String, &str)>> {
    use serde::de::{Deserializer, MapAccess, Visitor};
    struct Columns;
    impl<'de> Visitor<'de> for Columns {
        type Value = Vec<(String, &'de str)>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("a JSON object")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
            let mut columns = Vec::new();
            while let Some((name, value)) =
                map.next_entry::<String, &'de serde_json::value::RawValue>()?
            {
                columns.push((name, value.get()));
            }
            Ok(columns)
        }
    }
    let mut deserializer = serde_json::Deserializer::from_str(payload);
    let columns = deserializer.deserialize_map(Columns).ok()?;
    deserializer.end().ok()?;
    Some(columns)
}

/// Bytes of one column's digest in [`column_sha256`].
pub const COLUMN_DIGEST_LEN: usize = 16;

/// One column's digest: the first 16 bytes of SHA-256 over its name, a zero byte and its
/// value's JSON text. Names and values hold no zero byte (JSON escapes it).
pub fn column_digest(name: &str, value: &str) -> [u8; COLUMN_DIGEST_LEN] {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    hasher.update(name.as_bytes());
    hasher.update([0u8]);
    hasher.update(value.as_bytes());
    let mut digest = [0u8; COLUMN_DIGEST_LEN];
    digest.copy_from_slice(&hasher.finalize()[..COLUMN_DIGEST_LEN]);
    digest
}

/// The digests of a payload's columns, one after the other in payload order: what a receipt
/// keeps (`column_sha256`) so that `certyo.audit` can compare a row column by column with the
/// version captured before a schema change (a column dropped, added or retyped since), where
/// the whole payload's hash no longer can. None when the payload is not a JSON object.
pub fn column_sha256(payload: &str) -> Option<Vec<u8>> {
    let columns = payload_columns(payload)?;
    let mut out = Vec::with_capacity(columns.len() * COLUMN_DIGEST_LEN);
    for (name, value) in columns {
        out.extend_from_slice(&column_digest(&name, value));
    }
    Some(out)
}

/// SHA-256 of the payload text as sent, in hex: what the receipt keeps and
/// `certyo.audit` compares a row against.
pub fn payload_sha256(payload: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    to_hex(&Sha256::digest(payload))
}

/// Bytes in lowercase hex, as PostgreSQL's `encode(..., 'hex')` writes and `decode` reads them.
pub fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut hex = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        hex.push(char::from(DIGITS[usize::from(byte >> 4)]));
        hex.push(char::from(DIGITS[usize::from(byte & 15)]));
    }
    hex
}

#[cfg(test)]
mod column_tests {
    use super::*;

    #[test]
    fn columns_keep_payload_order_names_unescaped_and_values_as_sent() {
        let payload = r#"{"b":1.50,"a\"x":{"k": [1,2]},"c":null,"d":"x\u0000"}"#;
        let columns = payload_columns(payload).expect("an object");
        assert_eq!(
            columns,
            vec![
                ("b".to_string(), "1.50"),
                ("a\"x".to_string(), r#"{"k": [1,2]}"#),
                ("c".to_string(), "null"),
                ("d".to_string(), r#""x\u0000""#),
            ]
        );
        let digests = column_sha256(payload).expect("an object");
        assert_eq!(digests.len(), 4 * COLUMN_DIGEST_LEN);
        assert_eq!(&digests[..COLUMN_DIGEST_LEN], &column_digest("b", "1.50"));
        assert_ne!(column_digest("b", "1.50"), column_digest("b", "1.5"));
        assert_ne!(column_digest("ab", "1"), column_digest("a", "b1"));
    }

    #[test]
    fn a_payload_that_is_not_an_object_has_no_columns() {
        assert_eq!(payload_columns("[1]"), None);
        assert_eq!(payload_columns(r#"{"a":1} x"#), None);
        assert_eq!(column_sha256("nope"), None);
    }
}
