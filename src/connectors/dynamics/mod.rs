//! Dynamics 365 connector (Dataverse Web API: upsert by alternate key, `$batch`).
//!
//! - `auth.rs`: Microsoft Entra ID client credentials, renewed before they expire.
//! - `client.rs`: PATCH/DELETE of one record by alternate key, token replay, the
//!   rate-limit headers.
//! - `errors.rs`: classification by Dataverse's hex error codes.
//! - `batching.rs`: `$batch` with continue-on-error and per-part results.

mod auth;
mod batching;
mod client;
pub mod errors;

use std::sync::Arc;

use futures::future::BoxFuture;

use crate::config::{DynamicsConfig, TenantConfig};
use crate::connectors::http::{self, Quota, QuotaCell};
use crate::connectors::{
    batch_on_io_runtime, on_io_runtime, CallsDone, Connector, DeliveryError, WriteOk, WriteRequest,
};
use crate::event::Op;

pub use batching::{boundary_of, decode, BATCH_LIMIT};

/// The Dynamics 365 connector of one tenant.
#[derive(Clone)]
pub struct DynamicsConnector {
    client: Arc<client::DynamicsClient>,
}

impl DynamicsConnector {
    pub fn new(tenant: &TenantConfig, d: &DynamicsConfig) -> Result<Self, reqwest::Error> {
        let (http, meter) = http::tenant_client(tenant, "dynamics")?;
        let org_url = d.org_url.trim_end_matches('/');
        Ok(DynamicsConnector {
            client: Arc::new(client::DynamicsClient {
                auth: auth::TokenSource::new(http.clone(), d, org_url, meter.clone()),
                http,
                api_url: format!("{org_url}/api/data/v{}", d.api_version),
                quota: QuotaCell::new(meter.clone()),
                meter,
            }),
        })
    }
}

impl Connector for DynamicsConnector {
    fn crm(&self) -> &'static str {
        "dynamics"
    }

    fn write(&self, request: WriteRequest) -> BoxFuture<'static, Result<WriteOk, DeliveryError>> {
        let client = self.client.clone();
        on_io_runtime(async move { client.write(request).await }, Err)
    }

    fn max_batch(&self, _op: Op, _object: &str) -> usize {
        BATCH_LIMIT
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
