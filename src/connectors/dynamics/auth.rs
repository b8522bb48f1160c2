//! Microsoft Entra ID client credentials for the Dataverse Web API.
//!
//! `POST {authority}/{directory}/oauth2/v2.0/token` with a form body (`client_id`,
//! `client_secret`, `scope={org URL}/.default`, `grant_type=client_credentials`) answers
//! `{"token_type":"Bearer","expires_in":3599,"access_token"}`. There is no refresh token:
//! a new token is fetched once nine tenths of `expires_in` have passed, and when a
//! request gets 401.

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use super::errors;
use crate::config::{DynamicsConfig, Secret};
use crate::connectors::http::{self, Meter, MAX_CRM_WAIT};
use crate::connectors::token::TokenCache;
use crate::connectors::DeliveryError;

pub struct TokenSource {
    http: reqwest::Client,
    token_url: String,
    scope: String,
    client_id: Secret,
    client_secret: Secret,
    meter: Meter,
    /// The cached token, renewed at nine tenths of its lifetime.
    current: TokenCache<Secret>,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    expires_in: u64,
}

impl TokenSource {
    pub fn new(http: reqwest::Client, config: &DynamicsConfig, org_url: &str, meter: Meter) -> Self {
        TokenSource {
            http,
            token_url: format!(
                "{}/{}/oauth2/v2.0/token",
                config.authority_url.trim_end_matches('/'),
                config.directory_id
            ),
            scope: format!("{org_url}/.default"),
            client_id: config.client_id.clone(),
            client_secret: config.client_secret.clone(),
            meter,
            current: TokenCache::default(),
        }
    }

    /// The cached access token, or a new one when it is due for renewal.
    pub async fn get(&self) -> Result<Arc<Secret>, DeliveryError> {
        self.current.get(|| self.fetch()).await
    }

    /// A new token, and how long to use it: nine tenths of its `expires_in`.
    async fn fetch(&self) -> Result<(Secret, Option<Duration>), DeliveryError> {
        self.meter.token_refresh();
        let request = self.http.post(&self.token_url).form(&[
            ("client_id", self.client_id.expose()),
            ("client_secret", self.client_secret.expose()),
            ("scope", self.scope.as_str()),
            ("grant_type", "client_credentials"),
        ]);
        let answer = http::fetch(request).await?;
        if !answer.status.is_success() {
            return Err(errors::classify_token_error(answer.status.as_u16(), &answer.body)
                .redact(&[&self.client_id, &self.client_secret]));
        }
        let parsed: TokenResponse = serde_json::from_slice(&answer.body)
            .map_err(|e| DeliveryError::unexpected_retryable(format!("Entra ID token response not understood: {e}")))?;
        let lifetime = Duration::from_secs(parsed.expires_in).min(MAX_CRM_WAIT).mul_f64(0.9);
        tracing::info!(tenant = %self.meter.tenant, "Fetched a Dataverse access token.");
        Ok((Secret::new(parsed.access_token), Some(lifetime)))
    }

    /// Drops `stale` so that the next request fetches a new token.
    pub async fn invalidate(&self, stale: &Arc<Secret>) {
        self.current.invalidate(stale).await;
    }
}
