//! Zendesk authentication: the `Authorization` header of every API request.
//!
//! - API token: `Basic base64("{email}/token:{api_token}")`, fixed.
//! - OAuth access token: `Bearer {token}`, fixed.
//! - OAuth client credentials: `POST /oauth/tokens` with a JSON body
//!   (`grant_type=client_credentials`, `client_id`, `client_secret`, `scope`) answers
//!   `{"access_token","token_type":"bearer","scope"}`; the token is cached and fetched
//!   again when a request gets 401 (`invalid_token`), or shortly before an `expires_in`
//!   the answer may carry runs out.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use serde::Deserialize;

use super::errors;
use crate::config::{Secret, ZendeskConfig};
use crate::connectors::http::{self, Meter, MAX_CRM_WAIT};
use crate::connectors::token::TokenCache;
use crate::connectors::DeliveryError;

/// How long before a token's announced expiry a new one is fetched.
const RENEW_BEFORE: Duration = Duration::from_secs(60);

pub enum Auth {
    /// A header value that never changes (API token or a given OAuth token).
    Fixed(Arc<Secret>),
    ClientCredentials(Box<TokenSource>),
}

pub struct TokenSource {
    http: reqwest::Client,
    token_url: String,
    client_id: Secret,
    client_secret: Secret,
    scope: String,
    meter: Meter,
    /// The cached header value and when it should be renewed.
    current: TokenCache<Secret>,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    expires_in: Option<u64>,
}

impl Auth {
    /// `validate()` has checked that exactly one form of credentials is configured.
    pub fn new(http: reqwest::Client, base_url: &str, config: &ZendeskConfig, meter: Meter) -> Auth {
        if let (Some(email), Some(token)) = (&config.email, &config.api_token) {
            let raw = format!("{email}/token:{}", token.expose());
            let encoded = base64::engine::general_purpose::STANDARD.encode(raw);
            return Auth::Fixed(Arc::new(Secret::new(format!("Basic {encoded}"))));
        }
        if let Some(token) = &config.oauth_access_token {
            return Auth::Fixed(Arc::new(Secret::new(format!("Bearer {}", token.expose()))));
        }
        let (Some(client_id), Some(client_secret)) = (&config.oauth_client_id, &config.oauth_client_secret) else {
            unreachable!("validate() requires one form of Zendesk credentials")
        };
        Auth::ClientCredentials(Box::new(TokenSource {
            http,
            token_url: format!("{base_url}/oauth/tokens"),
            client_id: client_id.clone(),
            client_secret: client_secret.clone(),
            scope: config.oauth_scope.clone(),
            meter,
            current: TokenCache::default(),
        }))
    }

    /// The `Authorization` header value to send.
    pub async fn header(&self) -> Result<Arc<Secret>, DeliveryError> {
        match self {
            Auth::Fixed(h) => Ok(h.clone()),
            Auth::ClientCredentials(source) => source.get().await,
        }
    }

    /// Whether a new token might cure a 401.
    pub fn renewable(&self) -> bool {
        matches!(self, Auth::ClientCredentials(_))
    }

    /// Drops `stale` so that the next request fetches a new token.
    pub async fn invalidate(&self, stale: &Arc<Secret>) {
        if let Auth::ClientCredentials(source) = self {
            source.current.invalidate(stale).await;
        }
    }
}

impl TokenSource {
    async fn get(&self) -> Result<Arc<Secret>, DeliveryError> {
        self.current.get(|| self.fetch()).await
    }

    /// A new `Authorization` value, and how long to use it (until refused when Zendesk
    /// gives no `expires_in`).
    async fn fetch(&self) -> Result<(Secret, Option<Duration>), DeliveryError> {
        self.meter.token_refresh();
        let body = serde_json::json!({
            "grant_type": "client_credentials",
            "client_id": self.client_id.expose(),
            "client_secret": self.client_secret.expose(),
            "scope": self.scope,
        });
        let answer = http::fetch(self.http.post(&self.token_url).json(&body)).await?;
        if !answer.status.is_success() {
            return Err(errors::classify_token_error(answer.status.as_u16(), &answer.body)
                .redact(&[&self.client_id, &self.client_secret]));
        }
        let parsed: TokenResponse = serde_json::from_slice(&answer.body)
            .map_err(|e| DeliveryError::unexpected_retryable(format!("Zendesk token response not understood: {e}")))?;
        let lifetime = parsed
            .expires_in
            .map(|s| Duration::from_secs(s).min(MAX_CRM_WAIT).saturating_sub(RENEW_BEFORE));
        tracing::info!(tenant = %self.meter.tenant, "Fetched a Zendesk OAuth access token.");
        Ok((Secret::new(format!("Bearer {}", parsed.access_token)), lifetime))
    }
}
