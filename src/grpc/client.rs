//! The command line's gRPC client (`crm-sync status`, `watch`, `tenants`): what a support
//! engineer types when a customer asks. The token comes from `CRM_SYNC_TOKEN` (not a flag:
//! flags show in process lists and shell history). An `https://` address speaks TLS,
//! checking the server against the CA certificate (PEM) in the file `CRM_SYNC_CA` names.

use tonic::metadata::MetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;
use tonic::{Request, Status};

use super::pb;
use super::pb::admin_service_client::AdminServiceClient;
use super::pb::ingest_service_client::IngestServiceClient;
use super::pb::status_service_client::StatusServiceClient;
use super::pb::tenant_service_client::TenantServiceClient;

/// Adds the bearer token to every request.
#[derive(Clone)]
pub struct Bearer(MetadataValue<tonic::metadata::Ascii>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut request: Request<()>) -> Result<Request<()>, Status> {
        request.metadata_mut().insert("authorization", self.0.clone());
        Ok(request)
    }
}

pub type Authed = InterceptedService<Channel, Bearer>;

/// Connects to `addr` (`host:port` or a URL) with the token of `CRM_SYNC_TOKEN`.
pub async fn connect(addr: &str) -> anyhow::Result<(StatusServiceClient<Authed>, TenantServiceClient<Authed>)> {
    connect_as(addr, &env_token()?).await
}

/// The admin service at `addr`, with the token of `CRM_SYNC_TOKEN`.
pub async fn admin(addr: &str) -> anyhow::Result<AdminServiceClient<Authed>> {
    let (channel, bearer) = open(addr, &env_token()?).await?;
    Ok(AdminServiceClient::with_interceptor(channel, bearer))
}

/// The ingest service at `addr`, with `token`.
pub async fn ingest_as(addr: &str, token: &str) -> anyhow::Result<IngestServiceClient<Authed>> {
    let (channel, bearer) = open(addr, token).await?;
    Ok(IngestServiceClient::with_interceptor(channel, bearer))
}

fn env_token() -> anyhow::Result<String> {
    std::env::var("CRM_SYNC_TOKEN")
        .map_err(|_| anyhow::anyhow!("set CRM_SYNC_TOKEN to your crm-sync token (an admin or a tenant token)"))
}

/// A channel to `addr` and the interceptor that adds `token`.
async fn open(addr: &str, token: &str) -> anyhow::Result<(Channel, Bearer)> {
    let bearer = Bearer(
        MetadataValue::try_from(format!("Bearer {token}"))
            .map_err(|_| anyhow::anyhow!("CRM_SYNC_TOKEN is not a valid header value"))?,
    );
    // With a CA to check the server against, TLS: a bare host:port is https, and a
    // plaintext address is refused rather than sent the token in clear.
    let ca = std::env::var("CRM_SYNC_CA").ok();
    let url = match (addr.split_once("://"), &ca) {
        (None, None) => format!("http://{addr}"),
        (None, Some(_)) => format!("https://{addr}"),
        (Some((scheme, _)), Some(_)) if !scheme.eq_ignore_ascii_case("https") => {
            anyhow::bail!("CRM_SYNC_CA is set but {addr} is not an https:// address: the token would go in clear")
        }
        _ => addr.to_string(),
    };
    let mut endpoint = Channel::from_shared(url.clone()).map_err(|e| anyhow::anyhow!("--addr {addr:?}: {e}"))?;
    if url.get(..8).is_some_and(|s| s.eq_ignore_ascii_case("https://")) {
        let path = ca.ok_or_else(|| {
            anyhow::anyhow!("{addr} speaks TLS: set CRM_SYNC_CA to the file of its CA certificate (PEM)")
        })?;
        let pem = std::fs::read(&path).map_err(|e| anyhow::anyhow!("CRM_SYNC_CA {path}: {e}"))?;
        let tls = tonic::transport::ClientTlsConfig::new().ca_certificate(tonic::transport::Certificate::from_pem(pem));
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| anyhow::anyhow!("CRM_SYNC_CA {path}: {e}"))?;
    }
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| anyhow::anyhow!("cannot connect to {addr}: {e}"))?;
    Ok((channel, bearer))
}

/// Connects to `addr` with `token`.
pub async fn connect_as(
    addr: &str,
    token: &str,
) -> anyhow::Result<(StatusServiceClient<Authed>, TenantServiceClient<Authed>)> {
    let (channel, bearer) = open(addr, token).await?;
    Ok((
        StatusServiceClient::with_interceptor(channel.clone(), bearer.clone()),
        TenantServiceClient::with_interceptor(channel, bearer),
    ))
}

/// One status as one line for people, with any control character (a CRM's message may
/// carry one) shown escaped, not sent to the terminal.
pub fn describe(s: &pb::RecordStatus) -> String {
    plain(&raw_line(s))
}

fn plain(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() {
                c.escape_default().to_string()
            } else {
                c.to_string()
            }
        })
        .collect()
}

fn raw_line(s: &pb::RecordStatus) -> String {
    let mut line = format!(
        "{}/{}/{}: {} (version {}, event {}, {} attempt(s), at {})",
        s.tenant, s.entity, s.key, s.status, s.version, s.event_id, s.attempts, s.at
    );
    if !s.reason.is_empty() {
        line += &format!(", reason {}", s.reason);
    }
    if !s.error_code.is_empty() {
        line += &format!(", error {}: {}", s.error_code, s.error_message);
    }
    if let Some(src) = &s.source {
        line += &format!(", from {}/{}@{}", src.topic, src.partition, src.offset);
    }
    line
}

/// What a gRPC error means, for the command line.
pub fn explain(e: Status) -> anyhow::Error {
    anyhow::anyhow!("{:?}: {}", e.code(), e.message())
}
