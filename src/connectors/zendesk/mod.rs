//! Zendesk connector (Support API: users and organizations by `external_id`, tickets
//! with `Idempotency-Key`).
//!
//! - `auth.rs`: API token, OAuth access token, or OAuth client credentials.
//! - `client.rs`: one record's calls, token replay, the rate-limit headers.
//! - `errors.rs`: classification by Zendesk's `error` values.
//! - `batching.rs`: `users/create_or_update_many` jobs, followed to their per-record
//!   results (and past `job_timeout_ms`: a late job holds its records), and what a 403
//!   to a job means.

mod auth;
mod batching;
mod client;
pub mod errors;

use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;

use crate::config::{TenantConfig, ZendeskConfig};
use crate::connectors::holds::Holds;
use crate::connectors::http::{self, Quota, QuotaCell};
use crate::connectors::{
    batch_on_io_runtime, on_io_runtime, CallsDone, Connector, DeliveryError, WriteOk, WriteRequest,
};
use crate::event::Op;

pub use batching::MANY_LIMIT;
pub use client::parse_rate_limit;

/// The Zendesk connector of one tenant.
#[derive(Clone)]
pub struct ZendeskConnector {
    client: Arc<client::ZendeskClient>,
    /// Set once the account refused a bulk call but took a single one (bulk import not
    /// enabled).
    bulk_refused: Arc<AtomicBool>,
}

impl ZendeskConnector {
    /// `holds`: the tenant's held records, where a late job holds its own.
    pub fn new(tenant: &TenantConfig, zd: &ZendeskConfig, holds: Arc<Holds>) -> Result<Self, reqwest::Error> {
        let (http, meter) = http::tenant_client(tenant, "zendesk")?;
        let base_url = zd.base_url.trim_end_matches('/').to_string();
        let auth = auth::Auth::new(http.clone(), &base_url, zd, meter.clone());
        let adopter_holds = holds.clone();
        let connector = ZendeskConnector {
            client: Arc::new(client::ZendeskClient {
                http,
                base_url,
                auth,
                quota: QuotaCell::new(meter.clone()),
                meter,
                job_poll_interval: Duration::from_millis(zd.job_poll_interval_ms),
                job_timeout: Duration::from_millis(zd.job_timeout_ms),
                jobs: batching::Jobs::new(holds),
            }),
            bulk_refused: Arc::new(AtomicBool::new(false)),
        };
        // A late job named by a hold read back from the state topic is followed here.
        let client = Arc::downgrade(&connector.client);
        adopter_holds.set_adopter(Box::new(move |job, records, expires| {
            if let Some(client) = client.upgrade() {
                batching::Jobs::adopt(&client, job, records, expires);
            }
        }));
        Ok(connector)
    }
}

impl Connector for ZendeskConnector {
    fn crm(&self) -> &'static str {
        "zendesk"
    }

    fn write(&self, request: WriteRequest) -> BoxFuture<'static, Result<WriteOk, DeliveryError>> {
        let client = self.client.clone();
        on_io_runtime(async move { client.write(request).await }, Err)
    }

    fn max_batch(&self, op: Op, object: &str) -> usize {
        batching::max_batch(&self.bulk_refused, op, object)
    }

    fn write_batch(
        &self,
        requests: Vec<WriteRequest>,
        calls_done: CallsDone,
    ) -> BoxFuture<'static, Vec<Result<WriteOk, DeliveryError>>> {
        let client = self.client.clone();
        let bulk_refused = self.bulk_refused.clone();
        batch_on_io_runtime(requests.len(), async move {
            batching::write_batch(&client, &bulk_refused, requests, calls_done).await
        })
    }

    fn quota(&self) -> Option<Quota> {
        self.client.quota.latest()
    }
}
