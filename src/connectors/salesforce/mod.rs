//! Salesforce connector (REST API, sObject upsert by external id).
//!
//! - `auth.rs`: OAuth 2.0 client credentials against the org's My Domain, token cache.
//! - `client.rs`: the upsert/delete calls, token replay, limit headers.
//! - `errors.rs`: classification by Salesforce error codes.

mod auth;
mod client;
pub mod errors;

use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;

use crate::config::{SalesforceConfig, TenantConfig};
use crate::connectors::{Connector, DeliveryError, WriteOk, WriteRequest};

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
        crate::connectors::on_io_runtime(async move { client.write(request).await })
    }
}
