//! Salesforce OAuth 2.0 client-credentials flow.
//!
//! `POST {My Domain}/services/oauth2/token` with a form body; the response has an
//! `access_token` and the `instance_url` to call, and no `expires_in`: Salesforce tokens
//! live as long as the org's session timeout, so a token is cached until a request gets
//! 401 `INVALID_SESSION_ID`, then replaced ([`TokenSource::invalidate`]).

use std::sync::Arc;

use serde::Deserialize;

use super::errors;
use crate::config::Secret;
use crate::connectors::http::Meter;
use crate::connectors::token::TokenCache;
use crate::connectors::DeliveryError;

/// A bearer token and where to use it.
#[derive(Debug)]
pub struct Token {
    pub access_token: Secret,
    pub instance_url: String,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    instance_url: String,
}

pub struct TokenSource {
    http: reqwest::Client,
    token_url: String,
    client_id: Secret,
    client_secret: Secret,
    meter: Meter,
    /// The cached token. An async mutex, so that concurrent requests that find it missing
    /// wait for one fetch instead of each fetching their own.
    current: TokenCache<Token>,
}

impl TokenSource {
    pub fn new(http: reqwest::Client, base_url: &str, client_id: Secret, client_secret: Secret, meter: Meter) -> Self {
        TokenSource {
            http,
            token_url: format!("{}/services/oauth2/token", base_url.trim_end_matches('/')),
            client_id,
            client_secret,
            meter,
            current: TokenCache::default(),
        }
    }

    /// The cached token, or a new one.
    pub async fn get(&self) -> Result<Arc<Token>, DeliveryError> {
        // Salesforce tokens carry no lifetime: kept until a call finds one refused.
        self.current.get(|| async { Ok((self.fetch().await?, None)) }).await
    }

    /// Drops `stale` so that the next [`get`](Self::get) fetches a new token; a token
    /// another request already replaced is left alone.
    pub async fn invalidate(&self, stale: &Arc<Token>) {
        self.current.invalidate(stale).await;
    }

    async fn fetch(&self) -> Result<Token, DeliveryError> {
        self.meter.token_refresh();
        let response = self
            .http
            .post(&self.token_url)
            .form(&[
                ("grant_type", "client_credentials"),
                ("client_id", self.client_id.expose()),
                ("client_secret", self.client_secret.expose()),
            ])
            .send()
            .await
            .map_err(DeliveryError::from_transport)?;
        let status = response.status();
        let body = response.bytes().await.map_err(DeliveryError::from_transport)?;
        if !status.is_success() {
            return Err(
                errors::classify_token_error(status.as_u16(), &body).redact(&[&self.client_id, &self.client_secret])
            );
        }
        let parsed: TokenResponse = serde_json::from_slice(&body)
            .map_err(|e| errors::unexpected(status.as_u16(), format!("token response is not understood: {e}")))?;
        tracing::info!(tenant = %self.meter.tenant, "Fetched a Salesforce access token.");
        Ok(Token {
            access_token: Secret::new(parsed.access_token),
            instance_url: parsed.instance_url.trim_end_matches('/').to_string(),
        })
    }
}
