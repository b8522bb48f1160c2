//! Connectors: the CRM clients, behind one [`Connector`] trait the tenant drives.
//!
//! A connector turns a [`WriteRequest`] into the CRM's own API calls and answers with a
//! [`WriteOk`] or a [`DeliveryError`] classified by the CRM's semantics — not by HTTP
//! status alone — as retryable or permanent, with the CRM's `Retry-After` when it gave
//! one. Every write is idempotent: upserts and deletes are keyed by an external id (or
//! an alternate key), and creates that have no natural key carry an idempotency key.
//!
//! Each CRM is a folder with the same files: `auth.rs` (credentials to a token or header),
//! `client.rs` (one record's calls), `errors.rs` (classification by the CRM's own error
//! codes) and `batching.rs` (the CRM's batch call and its per-record results). [`build`]
//! is the one place that picks a connector for a tenant; the pipeline only sees the
//! trait. `http.rs` holds what every client shares: request metrics, `Retry-After`, and
//! the remaining quota the CRM reports. `holds.rs` wraps every connector: no write of a
//! record starts while an older write of it may still land.

pub mod dynamics;
pub mod holds;
pub mod http;
pub mod salesforce;
pub mod token;
pub mod zendesk;

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use serde_json::{Map, Value};

use crate::config::{Config, CrmKind, TenantConfig};
use crate::event::Op;
pub use http::Quota;

/// One record write, already mapped to CRM field names.
#[derive(Debug, Clone, PartialEq)]
pub struct WriteRequest {
    pub op: Op,
    /// CRM object, e.g. the sObject `Contact`.
    pub object: String,
    /// Field the record is matched on, e.g. `External_Id__c`.
    pub external_id_field: String,
    /// The event key.
    pub external_id: String,
    /// Fields to set; empty for deletes.
    pub fields: Map<String, Value>,
    /// The event's id and version: its identity, from which [`idempotency_key`] derives.
    ///
    /// [`idempotency_key`]: WriteRequest::idempotency_key
    pub event_id: String,
    pub version: u64,
    /// The state topic partition of the record (its input partition), where a hold on
    /// it is recorded ([`holds`]).
    pub state_partition: i32,
}

impl WriteRequest {
    /// A key that is the same for every attempt at this event and differs between events
    /// and records, for CRM calls that have no natural key (a Zendesk ticket create).
    /// 41 characters; the event id itself is not sent.
    pub fn idempotency_key(&self) -> String {
        use sha2::{Digest, Sha256};
        let mut h = Sha256::new();
        for part in [
            self.object.as_bytes(),
            self.external_id.as_bytes(),
            self.event_id.as_bytes(),
        ] {
            h.update((part.len() as u64).to_le_bytes());
            h.update(part);
        }
        h.update(self.version.to_le_bytes());
        let digest = h.finalize();
        let hex: String = digest[..16].iter().map(|b| format!("{b:02x}")).collect();
        format!("crm-sync-{hex}")
    }
}

/// A write the CRM accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteOk {
    Created,
    Updated,
    Deleted,
    /// A delete of a record the CRM does not have: already done.
    AlreadyAbsent,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Worth trying again later: throttling, outages, timeouts, row locks.
    Retryable,
    /// Trying again will fail the same way: validation errors, bad mapping, no access.
    Permanent,
}

impl ErrorClass {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorClass::Retryable => "retryable",
            ErrorClass::Permanent => "permanent",
        }
    }
}

/// Stable, bounded error codes for DLQ headers and metric labels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    CrmValidation,
    CrmNotFound,
    CrmMultipleMatches,
    CrmAuth,
    CrmRateLimited,
    CrmRowLock,
    CrmServerError,
    CrmTimeout,
    /// No connection could be made: the request never reached the CRM.
    CrmConnection,
    /// The connection broke after the request was sent: it may have reached the CRM.
    CrmConnectionLost,
    CrmUnexpected,
    /// The CRM's API cannot address this record's key (Salesforce: `.` or `..` in a URL
    /// path).
    CrmUnaddressableKey,
    /// Not tried: an earlier write of the record may still be running at the CRM and
    /// land later (a Zendesk job past `job_timeout_ms`, a call that timed out or got a
    /// 504; see `holds`). Not the record's failure: it counts no attempt and no age.
    CrmWritePending,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::CrmValidation => "crm_validation",
            ErrorCode::CrmNotFound => "crm_not_found",
            ErrorCode::CrmMultipleMatches => "crm_multiple_matches",
            ErrorCode::CrmAuth => "crm_auth",
            ErrorCode::CrmRateLimited => "crm_rate_limited",
            ErrorCode::CrmRowLock => "crm_row_lock",
            ErrorCode::CrmServerError => "crm_server_error",
            ErrorCode::CrmTimeout => "crm_timeout",
            ErrorCode::CrmConnection => "crm_connection",
            ErrorCode::CrmConnectionLost => "crm_connection_lost",
            ErrorCode::CrmUnexpected => "crm_unexpected",
            ErrorCode::CrmUnaddressableKey => "crm_unaddressable_key",
            ErrorCode::CrmWritePending => "crm_write_pending",
        }
    }
}

/// A failed write, classified.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub struct DeliveryError {
    pub class: ErrorClass,
    pub code: ErrorCode,
    /// HTTP status, when the CRM answered.
    pub http_status: Option<u16>,
    /// The CRM's own error code, e.g. `REQUIRED_FIELD_MISSING` (DLQ headers only).
    pub crm_code: Option<String>,
    /// The CRM's message, or what went wrong on the way (never contains credentials).
    pub message: String,
    /// How long the CRM asked us to wait (`Retry-After`), or a connector's own pause for
    /// a throttle signal that carries none.
    pub retry_after: Option<Duration>,
}

impl fmt::Display for DeliveryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.class.as_str(), self.code.as_str())?;
        if let Some(s) = self.http_status {
            write!(f, " (HTTP {s}")?;
            if let Some(c) = &self.crm_code {
                write!(f, " {c}")?;
            }
            write!(f, ")")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl DeliveryError {
    /// An error the CRM answered with.
    pub fn crm(class: ErrorClass, code: ErrorCode, status: u16, crm_code: Option<String>, message: String) -> Self {
        DeliveryError {
            class,
            code,
            http_status: Some(status),
            crm_code,
            message,
            retry_after: None,
        }
    }

    /// A passing, unexplained fault (an answer we could not read): worth another try.
    pub fn unexpected_retryable(message: String) -> Self {
        DeliveryError {
            class: ErrorClass::Retryable,
            code: ErrorCode::CrmUnexpected,
            http_status: None,
            crm_code: None,
            message,
            retry_after: None,
        }
    }

    /// The record's write was not tried because an earlier write of it may still land;
    /// to be tried again after `wait`.
    pub fn write_pending(message: String, wait: Duration) -> Self {
        DeliveryError {
            class: ErrorClass::Retryable,
            code: ErrorCode::CrmWritePending,
            http_status: None,
            crm_code: None,
            message,
            retry_after: Some(wait),
        }
    }

    /// Whether the write waits on an earlier one instead of having failed: no attempt or
    /// age is counted against the record.
    pub fn is_wait(&self) -> bool {
        self.code == ErrorCode::CrmWritePending
    }

    /// Keeps the CRM's `Retry-After` on an error worth retrying.
    pub fn with_retry_after(mut self, retry_after: Option<Duration>) -> Self {
        if retry_after.is_some() && self.is_retryable() {
            self.retry_after = retry_after;
        }
        self
    }

    /// Blanks any of `secrets` the CRM echoed back in its message (an identity provider
    /// naming the client id it refused, say), so that none reaches a DLQ header, a failure
    /// event or a log line.
    pub fn redact(mut self, secrets: &[&crate::config::Secret]) -> Self {
        for secret in secrets.iter().map(|s| s.expose()).filter(|s| !s.is_empty()) {
            self.message = self.message.replace(secret, "***");
        }
        self
    }

    pub fn is_retryable(&self) -> bool {
        self.class == ErrorClass::Retryable
    }

    /// Classifies a transport failure (no HTTP answer). Always retryable.
    pub fn from_transport(e: reqwest::Error) -> Self {
        let code = if e.is_timeout() {
            ErrorCode::CrmTimeout
        } else if e.is_connect() {
            ErrorCode::CrmConnection
        } else {
            ErrorCode::CrmConnectionLost
        };
        DeliveryError {
            class: ErrorClass::Retryable,
            code,
            http_status: None,
            crm_code: None,
            // The URL is left out: it carries record keys, which are noise in a DLQ header.
            message: e.without_url().to_string(),
            retry_after: None,
        }
    }
}

/// Runs a CRM call on the shared I/O runtime ([`crate::offload`]), in the span current
/// when it is made (its `crm.write`); the returned future only waits for the result.
/// `lost` turns a task that died (it cannot panic, but the runtime may be shutting down)
/// into the call's result.
pub fn on_io_runtime<T: Send + 'static>(
    call: impl std::future::Future<Output = T> + Send + 'static,
    lost: impl FnOnce(DeliveryError) -> T + Send + 'static,
) -> BoxFuture<'static, T> {
    let task = crate::offload::spawn(tracing::Instrument::in_current_span(call));
    Box::pin(async move {
        task.await.unwrap_or_else(|e| {
            lost(DeliveryError {
                class: ErrorClass::Retryable,
                code: ErrorCode::CrmUnexpected,
                http_status: None,
                crm_code: None,
                message: format!("CRM call task failed: {e}"),
                retry_after: None,
            })
        })
    })
}

/// Runs a batch on the I/O runtime ([`on_io_runtime`]): one result per record, each the
/// task's failure if the task died.
pub fn batch_on_io_runtime(
    records: usize,
    call: impl std::future::Future<Output = Vec<Result<WriteOk, DeliveryError>>> + Send + 'static,
) -> BoxFuture<'static, Vec<Result<WriteOk, DeliveryError>>> {
    on_io_runtime(call, move |lost| vec![Err(lost); records])
}

/// Dropped by a connector once a batch's own calls have been answered; the tenant's
/// concurrency permit for the batch goes back then. For most CRMs that is when every
/// record's result is known. A Zendesk job goes on running on Zendesk's side after its
/// call returned; its results are polled for without holding a permit.
pub struct CallsDone {
    /// Never sent on: dropping it is the signal.
    _signal: futures::channel::oneshot::Sender<()>,
}

impl CallsDone {
    /// A token, and a future that resolves once the token is dropped.
    pub fn pair() -> (Self, impl std::future::Future<Output = ()>) {
        let (tx, rx) = futures::channel::oneshot::channel();
        (CallsDone { _signal: tx }, async move {
            // Dropping the sender is the signal: an error is the expected answer.
            let _ = rx.await;
        })
    }
}

/// A CRM client for one tenant.
pub trait Connector: Send + Sync + 'static {
    /// Short CRM name for labels: `salesforce`.
    fn crm(&self) -> &'static str;

    /// Performs one idempotent write.
    fn write(&self, request: WriteRequest) -> BoxFuture<'static, Result<WriteOk, DeliveryError>>;

    /// Most records one call may carry for `op` on `object` (1: the CRM has no batch call
    /// for it).
    fn max_batch(&self, _op: Op, _object: &str) -> usize {
        1
    }

    /// Writes records that share their op, object and external id field, in as few calls
    /// as the CRM's batch limit allows, with one result per request, in order: a record's
    /// failure is its own, not its batch-mates'. `calls_done` is dropped once the
    /// batch's calls are answered.
    fn write_batch(
        &self,
        requests: Vec<WriteRequest>,
        calls_done: CallsDone,
    ) -> BoxFuture<'static, Vec<Result<WriteOk, DeliveryError>>> {
        let writes: Vec<_> = requests.into_iter().map(|r| self.write(r)).collect();
        Box::pin(async move {
            let results = futures::future::join_all(writes).await;
            drop(calls_done);
            results
        })
    }

    /// The API quota the CRM last reported for this tenant, if it reports one.
    fn quota(&self) -> Option<Quota> {
        None
    }
}

/// The connector of one tenant, for its configured CRM. `validate()` has checked that the
/// CRM's section is present.
/// `holds`: where the connector holds records whose older write may still land.
pub fn build(
    config: &Config,
    tenant: &TenantConfig,
    holds: Arc<holds::Holds>,
) -> Result<Arc<dyn Connector>, reqwest::Error> {
    let limit_pause = Duration::from_millis(config.retry.max_delay_ms);
    let missing = "validate() requires the CRM's section for the tenant's crm";
    let connector: Arc<dyn Connector> = match tenant.crm {
        CrmKind::Salesforce => Arc::new(salesforce::SalesforceConnector::new(
            tenant,
            tenant.salesforce.as_ref().expect(missing),
            limit_pause,
        )?),
        CrmKind::Zendesk => Arc::new(zendesk::ZendeskConnector::new(
            tenant,
            tenant.zendesk.as_ref().expect(missing),
            holds.clone(),
        )?),
        CrmKind::Dynamics => Arc::new(dynamics::DynamicsConnector::new(
            tenant,
            tenant.dynamics.as_ref().expect(missing),
        )?),
    };
    // Every CRM's calls can outlive our wait for them ([`holds`]).
    let window = Duration::from_millis(tenant.late_write_window_ms);
    Ok(Arc::new(holds::Held::new(connector, holds, window)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    #[test]
    fn redact_blanks_echoed_credentials() {
        let e = DeliveryError::crm(
            ErrorClass::Permanent,
            ErrorCode::CrmAuth,
            400,
            Some("unauthorized_client".into()),
            "token request refused: AADSTS700016: Application with identifier 'app-123' was not found".into(),
        )
        .redact(&[&Secret::new("app-123"), &Secret::new("")]);
        assert_eq!(
            e.message,
            "token request refused: AADSTS700016: Application with identifier '***' was not found"
        );
    }
}
