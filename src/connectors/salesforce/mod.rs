//! Salesforce connector (REST API, sObject upsert by external id).
//!
//! - `auth.rs`: OAuth 2.0 client credentials against the org's My Domain, token cache.
//! - `client.rs`: upsert/delete of one record, token replay, the limit header.
//! - `errors.rs`: classification by Salesforce error codes.
//! - `batching.rs`: sObject Collections upserts with per-record results.

mod auth;
mod batching;
mod client;
pub mod errors;

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;

use crate::config::{SalesforceConfig, TenantConfig};
use crate::connectors::http::{self, Quota, QuotaCell};
use crate::connectors::{
    batch_on_io_runtime, on_io_runtime, CallsDone, Connector, DeliveryError, WriteOk, WriteRequest,
};
use crate::event::Op;

pub use batching::COLLECTION_LIMIT;
pub use client::parse_api_usage;

/// The Salesforce connector of one tenant.
#[derive(Clone)]
pub struct SalesforceConnector {
    client: Arc<client::SalesforceClient>,
}

impl SalesforceConnector {
    /// `limit_pause` is how long the tenant waits after the org's API limit is reached.
    pub fn new(tenant: &TenantConfig, sf: &SalesforceConfig, limit_pause: Duration) -> Result<Self, reqwest::Error> {
        let (http, meter) = http::tenant_client(tenant, "salesforce")?;
        let auth = auth::TokenSource::new(
            http.clone(),
            &sf.base_url,
            sf.client_id.clone(),
            sf.client_secret.clone(),
            meter.clone(),
        );
        Ok(SalesforceConnector {
            client: Arc::new(client::SalesforceClient {
                http,
                api_version: sf.api_version.clone(),
                auth,
                quota: QuotaCell::new(meter.clone()),
                meter,
                limit_pause,
            }),
        })
    }
}

impl Connector for SalesforceConnector {
    fn crm(&self) -> &'static str {
        "salesforce"
    }

    fn write(&self, request: WriteRequest) -> BoxFuture<'static, Result<WriteOk, DeliveryError>> {
        let client = self.client.clone();
        on_io_runtime(async move { batching::write_one(&client, request).await }, Err)
    }

    fn max_batch(&self, op: Op, _object: &str) -> usize {
        batching::max_batch(&self.client, op)
    }

    fn write_batch(
        &self,
        requests: Vec<WriteRequest>,
        calls_done: CallsDone,
    ) -> BoxFuture<'static, Vec<Result<WriteOk, DeliveryError>>> {
        let client = self.client.clone();
        batch_on_io_runtime(requests.len(), async move {
            // Every result is known when the calls are answered.
            let _calls_done = calls_done;
            batching::write_batch(&client, requests).await
        })
    }

    fn quota(&self) -> Option<Quota> {
        self.client.quota.latest()
    }
}
