//! Salesforce connector (REST API, sObject upsert by external id).
//!
//! - `auth.rs`: OAuth 2.0 client credentials against the org's My Domain, token cache.
//! - `client.rs`: the upsert/delete calls (single records, and sObject Collections for
//!   batches of upserts), token replay, limit headers.
//! - `errors.rs`: classification by Salesforce error codes.

mod auth;
mod client;
pub mod errors;

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;

use crate::config::{SalesforceConfig, TenantConfig};
use crate::connectors::{on_io_runtime, Connector, DeliveryError, WriteOk, WriteRequest};
use crate::event::Op;

pub use client::parse_api_usage;

/// The Salesforce connector of one tenant.
#[derive(Clone)]
pub struct SalesforceConnector {
    client: Arc<client::SalesforceClient>,
}

impl SalesforceConnector {
    /// `limit_pause` is how long the tenant waits after the org's API limit is reached.
    pub fn new(tenant: &TenantConfig, sf: &SalesforceConfig, limit_pause: Duration) -> Result<Self, reqwest::Error> {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_millis(tenant.request_timeout_ms))
            .pool_max_idle_per_host(tenant.max_concurrency)
            .build()?;
        let name: Arc<str> = tenant.name.as_str().into();
        let auth = auth::TokenSource::new(
            http.clone(),
            &sf.base_url,
            sf.client_id.clone(),
            sf.client_secret.clone(),
            name.clone(),
        );
        Ok(SalesforceConnector {
            client: Arc::new(client::SalesforceClient {
                http,
                api_version: sf.api_version.clone(),
                auth,
                tenant: name,
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
        on_io_runtime(async move { client.write(request).await }, Err)
    }

    /// Upserts go through sObject Collections (API v46 and later), up to 200 a call;
    /// deletes by external id have no collection form.
    fn max_batch(&self, op: Op) -> usize {
        match op {
            Op::Upsert if self.client.supports_collections() => client::COLLECTION_LIMIT,
            _ => 1,
        }
    }

    fn write_batch(&self, requests: Vec<WriteRequest>) -> BoxFuture<'static, Vec<Result<WriteOk, DeliveryError>>> {
        let client = self.client.clone();
        let n = requests.len();
        on_io_runtime(
            async move {
                if requests.len() == 1 || !client.supports_collections() || requests.iter().any(|r| r.op != Op::Upsert)
                {
                    let mut out = Vec::with_capacity(requests.len());
                    for r in requests {
                        out.push(client.write(r).await);
                    }
                    return out;
                }
                let mut out = Vec::with_capacity(requests.len());
                let mut rest = requests;
                while !rest.is_empty() {
                    let chunk: Vec<WriteRequest> = rest.drain(..rest.len().min(client::COLLECTION_LIMIT)).collect();
                    out.extend(client.upsert_collection(chunk).await);
                }
                out
            },
            move |lost| vec![Err(lost); n],
        )
    }
}
