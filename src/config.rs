//! Configuration: the TOML file every instance starts from.
//!
//! The structs below are the reference: every key has a `///` saying what it does, units
//! are in the names, defaults come from named functions, and [`Config::validate`] checks
//! what serde cannot, naming the key that is wrong. Secrets are never written in the file:
//! a value of the form `${VAR}` is read from the environment when the file is loaded, and
//! held as a [`Secret`] that prints as `***`.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Deserializer};

/// A configuration that cannot be used, with the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("invalid config: {0}")]
    Parse(String),
    #[error("invalid config: `{key}`: {reason}")]
    Invalid { key: String, reason: String },
    #[error("invalid config: `{key}` refers to environment variable `{var}`, which is not set")]
    MissingEnv { key: String, var: String },
    #[error("invalid config: `{key}` refers to file `{path}`, which cannot be read: {reason}")]
    SecretFile { key: String, path: String, reason: String },
    /// More than one of the above, in the order found.
    #[error("{} problems:\n{}", .0.len(), .0.iter().map(|e| format!("  {e}")).collect::<Vec<_>>().join("\n"))]
    Several(Vec<ConfigError>),
}

impl ConfigError {
    fn invalid(key: impl Into<String>, reason: impl Into<String>) -> Self {
        ConfigError::Invalid {
            key: key.into(),
            reason: reason.into(),
        }
    }

    /// `Ok` for no problem, the problem itself for one, [`ConfigError::Several`] for more.
    pub fn from_all(mut problems: Vec<ConfigError>) -> Result<(), ConfigError> {
        match problems.len() {
            0 => Ok(()),
            1 => Err(problems.remove(0)),
            _ => Err(ConfigError::Several(problems)),
        }
    }
}

/// The problems a check finds, gathered so that one run reports them all.
#[derive(Default)]
struct Problems(Vec<ConfigError>);

impl Problems {
    fn add(&mut self, key: impl Into<String>, reason: impl Into<String>) {
        self.0.push(ConfigError::invalid(key, reason));
    }
    fn check(&mut self, result: Result<(), ConfigError>) {
        if let Err(e) = result {
            self.0.push(e);
        }
    }
}

/// The whole service configuration.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Process-level settings: HTTP endpoints, shutdown.
    #[serde(default)]
    pub service: ServiceConfig,
    /// The Kafka cluster, topics and consumer-group behaviour.
    pub kafka: KafkaConfig,
    /// Skipping of duplicate, unchanged and stale events.
    #[serde(default)]
    pub diff: DiffConfig,
    /// Backoff of retryable CRM failures.
    #[serde(default)]
    pub retry: RetryConfig,
    /// Tenant health: when a tenant's outage or refused credentials stop its writes, and
    /// how often it is probed.
    #[serde(default)]
    pub breaker: BreakerConfig,
    /// Webhook notifications of the failures topic (see `notifier`).
    #[serde(default)]
    pub notifier: NotifierConfig,
    /// The gRPC interface (see `grpc`); none without this section.
    #[serde(default)]
    pub grpc: Option<GrpcConfig>,
    /// One entry per CRM tenant. Events name their tenant in the `tenant` field.
    pub tenants: Vec<TenantConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// Address of the HTTP server for `/metrics`, `/health/live` and `/health/ready`.
    /// Port 0 picks a free port.
    #[serde(default = "default_http_addr")]
    pub http_addr: String,
    /// How long a graceful shutdown may take to drain in-flight events and commit, before
    /// the process exits anyway.
    #[serde(default = "default_shutdown_deadline_ms")]
    pub shutdown_deadline_ms: u64,
    /// Log format on stdout: `auto` (text on a terminal, JSON lines otherwise), `json`
    /// (one JSON object per line) or `text` (colour only on a terminal).
    #[serde(default)]
    pub log_format: LogFormat,
    /// OTLP/HTTP endpoint traces are sent to (JSON encoding), e.g.
    /// `http://otel-collector:4318`: spans go to `{otlp_endpoint}/v1/traces`. No traces
    /// when left out.
    #[serde(default)]
    pub otlp_endpoint: Option<String>,
    /// Share of traces sent, from 0 to 1 (decided per trace).
    #[serde(default = "default_otlp_sample_ratio")]
    pub otlp_sample_ratio: f64,
}

fn default_otlp_sample_ratio() -> f64 {
    1.0
}

/// How logs are written (`service.log_format`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    #[default]
    Auto,
    Json,
    Text,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig {
            http_addr: default_http_addr(),
            shutdown_deadline_ms: default_shutdown_deadline_ms(),
            log_format: LogFormat::default(),
            otlp_endpoint: None,
            otlp_sample_ratio: default_otlp_sample_ratio(),
        }
    }
}

fn default_http_addr() -> String {
    "127.0.0.1:9464".into()
}
fn default_shutdown_deadline_ms() -> u64 {
    15_000
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KafkaConfig {
    /// Comma-separated `host:port` list of brokers.
    pub bootstrap_servers: String,
    /// Consumer group shared by every instance; scaling out is starting another instance
    /// with the same group id.
    pub group_id: String,
    /// Topics carrying change events.
    pub input_topics: Vec<String>,
    /// Dead-letter topic: original message plus error-context headers.
    pub dlq_topic: String,
    /// Failures topic: one JSON event per terminal failure.
    pub failures_topic: String,
    /// State topic (compacted): each record's last confirmed version and payload hash, so
    /// that a partition's next owner still recognises stale versions and unchanged
    /// payloads. Needs at least as many partitions as the input topic with the most.
    pub state_topic: String,
    /// Retry topic: an event whose retries would hold its partition longer than
    /// `retry.park_after_ms` is parked here (original key, value and headers plus its
    /// retry state) and its input offset released, so that a tenant whose CRM is down
    /// or throttling does not hold up other tenants on the same partitions. It is
    /// co-partitioned with the input (a partition per input partition, checked at
    /// start): the member that owns an input partition reads its retry partition back,
    /// committing under `{group_id}.retry` (see `retry::topic`). Without it, retries
    /// wait in memory and hold their partitions.
    #[serde(default)]
    pub retry_topic: Option<String>,
    /// Status topic (compacted): each record's latest known status, keyed by the JSON
    /// array `[tenant, entity, key]` (see `trail`). Written before an event's offset is
    /// committed. None: no status is written.
    #[serde(default)]
    pub status_topic: Option<String>,
    /// Audit topic: one record per final outcome of every event read, with its source
    /// topic, partition and offset (see `trail`). None (the default): no audit trail,
    /// for volume.
    #[serde(default)]
    pub audit_topic: Option<String>,
    /// Pause topic (compacted): tenants paused by an operator or by their own token (see
    /// `tenant::pauses`), read by every member, so that a pause holds on the whole group
    /// and across restarts. None: a pause holds on the member that took it, until it
    /// restarts.
    #[serde(default)]
    pub pause_topic: Option<String>,
    /// Consumer-group session timeout. A member that misses heartbeats this long is
    /// removed from the group.
    #[serde(default = "default_session_timeout_ms")]
    pub session_timeout_ms: u64,
    /// How often stored offsets are committed.
    #[serde(default = "default_commit_interval_ms")]
    pub commit_interval_ms: u64,
    /// How long a revoked partition may take to finish its in-flight events before its
    /// offsets are committed and it is handed over; the writes still at the CRM are then
    /// awaited. Must be below `session_timeout_ms`; plus the longest write of any tenant
    /// ([`TenantConfig::longest_write`]), below `max.poll.interval.ms`.
    #[serde(default = "default_drain_timeout_ms")]
    pub drain_timeout_ms: u64,
    /// Events of one partition that may be undecided at once, messages on their way to its
    /// actor included; at this number the partition is paused until a quarter of them are
    /// decided. A batch of messages (at most 512) begun while there was room is finished,
    /// so a partition holds at most this plus 512. Memory held by the pipeline follows it:
    /// a 10-minute backlog on 48 partitions of ~220-byte events held 178–193 MiB in all at
    /// 1,000, the diff cache full (load-tests/README.md). It must hold well over what a
    /// tenant has at its CRM at once (`max_concurrency` × `batch_size`, spread over the
    /// partitions), or a slow tenant's calls pause the partitions for the others.
    #[serde(default = "default_max_in_flight_per_partition")]
    pub max_in_flight_per_partition: usize,
    /// Messages larger than this many bytes (key, value and headers together) are
    /// dead-lettered as `too_large`. Together with the room crm-sync's own headers take
    /// ([`HEADER_ROOM_BYTES`]), it must fit the producer's `message.max.bytes`
    /// (`kafka.client`, librdkafka's default 1000000), so that every message read can be
    /// written whole to the retry and dead-letter topics.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: usize,
    /// Create missing input, DLQ and failures topics through the Admin API at start.
    #[serde(default = "default_true")]
    pub create_topics: bool,
    /// Partition count for topics created at start.
    #[serde(default = "default_topic_partitions")]
    pub topic_partitions: i32,
    /// Replication factor for topics created at start.
    #[serde(default = "default_topic_replication")]
    pub topic_replication: i32,
    /// Extra librdkafka properties for every client (security.protocol, sasl.*, ...).
    /// Values may be `${VAR}` references; they are never logged.
    #[serde(default)]
    pub client: BTreeMap<String, Secret>,
}

fn default_session_timeout_ms() -> u64 {
    10_000
}
fn default_commit_interval_ms() -> u64 {
    1_000
}
fn default_drain_timeout_ms() -> u64 {
    5_000
}
fn default_max_in_flight_per_partition() -> usize {
    1_000
}
fn default_max_message_bytes() -> usize {
    983_040
}

/// Bytes reserved on top of `kafka.max_message_bytes` for the headers crm-sync adds to a
/// parked or dead-lettered message (its echoed strings are capped to fit).
pub const HEADER_ROOM_BYTES: usize = 16_384;

/// librdkafka's default `message.max.bytes`.
const LIBRDKAFKA_MESSAGE_MAX_BYTES: usize = 1_000_000;
fn default_true() -> bool {
    true
}
fn default_topic_partitions() -> i32 {
    12
}
fn default_topic_replication() -> i32 {
    3
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiffConfig {
    /// Skip duplicates, unchanged payloads and stale versions. Off only for benchmarks.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Records whose last confirmed state is remembered (at most this many, at least
    /// three quarters of it; 56–75 bytes each). Past this, the least recently used are
    /// forgotten: a forgotten record costs one extra write, and its stale versions are
    /// no longer recognised (see README, "Diff").
    #[serde(default = "default_diff_capacity")]
    pub capacity: usize,
}

impl Default for DiffConfig {
    fn default() -> Self {
        DiffConfig {
            enabled: true,
            capacity: default_diff_capacity(),
        }
    }
}

fn default_diff_capacity() -> usize {
    1_000_000
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    /// Attempts per event, the first included, before it is dead-lettered.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// Delay before the second attempt; doubles with each further attempt (full jitter).
    #[serde(default = "default_base_delay_ms")]
    pub base_delay_ms: u64,
    /// Upper bound of one backoff delay, and the pause after `REQUEST_LIMIT_EXCEEDED`.
    #[serde(default = "default_max_delay_ms")]
    pub max_delay_ms: u64,
    /// Longest time an event may keep being retried, counted from its first failure;
    /// past it the event is dead-lettered. A retry waiting in memory holds its
    /// partition's committed offset, so this also bounds how far commits can fall behind.
    #[serde(default = "default_max_age_ms")]
    pub max_age_ms: u64,
    /// With `kafka.retry_topic`: attempts made in memory before a further retry is
    /// parked on the retry topic.
    #[serde(default = "default_in_memory_attempts")]
    pub in_memory_attempts: u32,
    /// With `kafka.retry_topic`: a retry that must wait at least this long (a long
    /// backoff, a `Retry-After`, a paused tenant) is parked at once.
    #[serde(default = "default_park_after_ms")]
    pub park_after_ms: u64,
}

/// Each tenant's circuit breaker (see `tenant::breaker`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BreakerConfig {
    /// Outage failures in a row (5xx, timeouts, connections), with no call getting
    /// through, that open the breaker. One refusal of the credentials is enough.
    #[serde(default = "default_failure_threshold")]
    pub failure_threshold: u32,
    /// Wait before the first probe of an open breaker; doubles after each failed probe.
    #[serde(default = "default_probe_interval_ms")]
    pub probe_interval_ms: u64,
    /// Longest wait between probes.
    #[serde(default = "default_max_probe_interval_ms")]
    pub max_probe_interval_ms: u64,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        BreakerConfig {
            failure_threshold: default_failure_threshold(),
            probe_interval_ms: default_probe_interval_ms(),
            max_probe_interval_ms: default_max_probe_interval_ms(),
        }
    }
}

fn default_failure_threshold() -> u32 {
    5
}
fn default_probe_interval_ms() -> u64 {
    1_000
}
fn default_max_probe_interval_ms() -> u64 {
    60_000
}

impl Default for RetryConfig {
    fn default() -> Self {
        RetryConfig {
            max_attempts: default_max_attempts(),
            base_delay_ms: default_base_delay_ms(),
            max_delay_ms: default_max_delay_ms(),
            max_age_ms: default_max_age_ms(),
            in_memory_attempts: default_in_memory_attempts(),
            park_after_ms: default_park_after_ms(),
        }
    }
}

fn default_in_memory_attempts() -> u32 {
    2
}
fn default_park_after_ms() -> u64 {
    1_000
}

fn default_max_attempts() -> u32 {
    8
}
fn default_base_delay_ms() -> u64 {
    200
}
fn default_max_delay_ms() -> u64 {
    30_000
}
fn default_max_age_ms() -> u64 {
    300_000
}

/// The failure notifier: reads the failures topic and tells webhook endpoints, signed per
/// Standard Webhooks (see `notifier`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NotifierConfig {
    /// Whether `crm-sync run` runs the notifier beside the pipeline (`crm-sync notify`
    /// runs it alone). It runs only where some endpoint is configured.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Consumer group of the notifiers; `{kafka.group_id}.notifier` when left out.
    #[serde(default)]
    pub group_id: Option<String>,
    /// Where a notification goes when it cannot be delivered (given up, or its endpoint's
    /// queue is full): the body, its webhook-id, the endpoint and the last error.
    #[serde(default = "default_notifier_dlq_topic")]
    pub dlq_topic: String,
    /// Window over which dead-lettered records of one tenant and error code are folded
    /// into one summary.
    #[serde(default = "default_coalesce_window_ms")]
    pub coalesce_window_ms: u64,
    /// Dead-lettered records of one tenant and error code sent one by one in a window
    /// before the rest is summarised.
    #[serde(default = "default_per_record_limit")]
    pub per_record_limit: u32,
    /// Records quoted in a summary.
    #[serde(default = "default_summary_samples")]
    pub summary_samples: usize,
    /// Dead-lettered records of one tenant within a minute that send a
    /// `tenant.dlq_rate_exceeded` notification; 0 for none.
    #[serde(default = "default_dlq_rate_per_minute")]
    pub dlq_rate_per_minute: u32,
    /// Timeout of one delivery attempt.
    #[serde(default = "default_webhook_timeout_ms")]
    pub request_timeout_ms: u64,
    /// Wait before the second attempt; doubles per attempt, with jitter, up to the max.
    #[serde(default = "default_webhook_retry_ms")]
    pub retry_base_delay_ms: u64,
    #[serde(default = "default_webhook_max_retry_ms")]
    pub retry_max_delay_ms: u64,
    /// How long a notification keeps being retried before it goes to `dlq_topic`.
    #[serde(default = "default_webhook_give_up_ms")]
    pub give_up_after_ms: u64,
    /// Notifications waiting for one endpoint; past it the oldest waiting one goes to
    /// `dlq_topic`, so that an endpoint that is down holds a bounded amount of memory.
    #[serde(default = "default_webhook_queue")]
    pub max_queued_per_endpoint: usize,
    /// Endpoints told about every tenant, and about input that names no tenant.
    #[serde(default)]
    pub endpoints: Vec<WebhookConfig>,
}

impl Default for NotifierConfig {
    fn default() -> Self {
        NotifierConfig {
            enabled: true,
            group_id: None,
            dlq_topic: default_notifier_dlq_topic(),
            coalesce_window_ms: default_coalesce_window_ms(),
            per_record_limit: default_per_record_limit(),
            summary_samples: default_summary_samples(),
            dlq_rate_per_minute: default_dlq_rate_per_minute(),
            request_timeout_ms: default_webhook_timeout_ms(),
            retry_base_delay_ms: default_webhook_retry_ms(),
            retry_max_delay_ms: default_webhook_max_retry_ms(),
            give_up_after_ms: default_webhook_give_up_ms(),
            max_queued_per_endpoint: default_webhook_queue(),
            endpoints: Vec::new(),
        }
    }
}

fn default_notifier_dlq_topic() -> String {
    "crm-sync.notifications.dlq".into()
}
fn default_coalesce_window_ms() -> u64 {
    10_000
}
fn default_per_record_limit() -> u32 {
    3
}
fn default_summary_samples() -> usize {
    5
}
fn default_dlq_rate_per_minute() -> u32 {
    100
}
fn default_webhook_timeout_ms() -> u64 {
    10_000
}
fn default_webhook_retry_ms() -> u64 {
    1_000
}
fn default_webhook_max_retry_ms() -> u64 {
    60_000
}
fn default_webhook_give_up_ms() -> u64 {
    3_600_000
}
fn default_webhook_queue() -> usize {
    10_000
}

/// The gRPC interface.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GrpcConfig {
    /// `host:port` to serve gRPC on; port 0 picks a free one.
    pub addr: String,
    /// Bearer token that may act on every tenant; use a `${VAR}` reference.
    #[serde(default)]
    pub admin_token: Option<Secret>,
    /// Bearer token of each tenant, that sees and acts on that tenant only.
    #[serde(default)]
    pub tenant_tokens: BTreeMap<String, Secret>,
    /// Records whose latest status this member keeps from the status topic (the most
    /// recently updated); older ones are answered NOT_FOUND.
    #[serde(default = "default_status_capacity")]
    pub status_capacity: usize,
    /// TLS (rustls): PEM files of the server's certificate chain and private key. Both,
    /// or neither (plaintext).
    #[serde(default)]
    pub tls_cert_path: Option<String>,
    #[serde(default)]
    pub tls_key_path: Option<String>,
}

fn default_status_capacity() -> usize {
    100_000
}

/// A webhook endpoint. Its `Debug` shows the URL's scheme and host only: the rest may
/// carry a token.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// `http://` or `https://` URL the notifications are POSTed to.
    pub url: String,
    /// Standard Webhooks secrets (`whsec_` + base64), by `${VAR}` reference: one, or two
    /// during a rotation (each request is then signed with both).
    pub secrets: Vec<Secret>,
}

impl fmt::Debug for WebhookConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let shown = reqwest::Url::parse(&self.url)
            .map(|u| format!("{}://{}/…", u.scheme(), u.host_str().unwrap_or("?")))
            .unwrap_or_else(|_| "(not a URL)".into());
        f.debug_struct("WebhookConfig")
            .field("url", &shown)
            .field("secrets", &self.secrets)
            .finish()
    }
}

impl NotifierConfig {
    /// Whether any endpoint, of the operators or of a tenant, is configured.
    pub fn has_endpoints(&self, tenants: &[TenantConfig]) -> bool {
        !self.endpoints.is_empty() || tenants.iter().any(|t| !t.webhooks.is_empty())
    }
}

/// Which CRM a tenant lives in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CrmKind {
    Salesforce,
    Zendesk,
    Dynamics,
}

impl CrmKind {
    pub fn as_str(self) -> &'static str {
        match self {
            CrmKind::Salesforce => "salesforce",
            CrmKind::Zendesk => "zendesk",
            CrmKind::Dynamics => "dynamics",
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// Tenant name as it appears in the events' `tenant` field; also a metric label.
    pub name: String,
    /// The CRM this tenant's records go to.
    pub crm: CrmKind,
    /// Ceiling on CRM requests per second for this tenant, for the whole consumer group:
    /// each member paces at its share (the input partitions it holds over all of them).
    #[serde(default = "default_rate_limit_per_sec")]
    pub rate_limit_per_sec: f64,
    /// Ceiling on CRM requests in flight at once for this tenant, for the whole group
    /// (each member's share rounded down, at least 1).
    #[serde(default = "default_max_concurrency")]
    pub max_concurrency: usize,
    /// Timeout of one CRM HTTP request (each attempt separately).
    #[serde(default = "default_request_timeout_ms")]
    pub request_timeout_ms: u64,
    /// How long a call we gave up on (timed out, or answered 504 by a gateway) may still
    /// run at the CRM: until then no other version of its record is written
    /// (`connectors::holds`). Salesforce ends REST calls after 10 minutes; Dataverse and
    /// Zendesk do not document a limit.
    #[serde(default = "default_late_write_window_ms")]
    pub late_write_window_ms: u64,
    /// Most records per CRM write call; capped at what the CRM allows for the operation
    /// (Salesforce: 200 upserts through sObject Collections from API v46, deletes one by
    /// one; Zendesk: 100 user upserts per `users/create_or_update_many` job, organizations,
    /// tickets and deletes one by one; Dynamics 365: 1000 operations per `$batch`).
    /// 1 turns batching off.
    #[serde(default = "default_batch_size")]
    pub batch_size: usize,
    /// How long a batch that is not full may wait for more records before it is sent.
    #[serde(default = "default_batch_linger_ms")]
    pub batch_linger_ms: u64,
    /// Salesforce connection; required when `crm = "salesforce"`.
    pub salesforce: Option<SalesforceConfig>,
    /// Zendesk connection; required when `crm = "zendesk"`.
    pub zendesk: Option<ZendeskConfig>,
    /// Dynamics 365 (Dataverse) connection; required when `crm = "dynamics"`.
    pub dynamics: Option<DynamicsConfig>,
    /// Entity name (the events' `entity` field) to CRM object and field mapping.
    pub entities: BTreeMap<String, EntityConfig>,
    /// Webhook endpoints told about this tenant's failures and changes of health.
    #[serde(default)]
    pub webhooks: Vec<WebhookConfig>,
}

fn default_rate_limit_per_sec() -> f64 {
    100.0
}
fn default_max_concurrency() -> usize {
    8
}
impl TenantConfig {
    /// The longest one write of this tenant can stay at the CRM: a token fetch, the
    /// request, and once more each after a refused token, each bounded by
    /// `request_timeout_ms`; for a Zendesk job, also its polling up to `job_timeout_ms`.
    pub fn longest_write(&self) -> Duration {
        let calls = Duration::from_millis(self.request_timeout_ms.saturating_mul(4));
        let job = self.zendesk.as_ref().map_or(0, |z| z.job_timeout_ms);
        calls.saturating_add(Duration::from_millis(job))
    }
}

/// librdkafka's default `max.poll.interval.ms`: a member that does not poll this long
/// (a revoke that waits longer) leaves the group.
const LIBRDKAFKA_MAX_POLL_INTERVAL_MS: u64 = 300_000;

fn default_request_timeout_ms() -> u64 {
    30_000
}
fn default_late_write_window_ms() -> u64 {
    600_000
}
/// A hold read back after a restart lasts a day at most (`connectors::holds`).
const MAX_LATE_WRITE_WINDOW_MS: u64 = 86_400_000;
fn default_batch_size() -> usize {
    200
}
fn default_batch_linger_ms() -> u64 {
    20
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SalesforceConfig {
    /// The org's My Domain URL, e.g. `https://acme.my.salesforce.com`. The
    /// client-credentials flow only works there, not on login.salesforce.com.
    pub base_url: String,
    /// REST API version without the `v`, e.g. `60.0`.
    #[serde(default = "default_sf_api_version")]
    pub api_version: String,
    /// Connected app consumer key; use a `${VAR}` reference.
    pub client_id: Secret,
    /// Connected app consumer secret; use a `${VAR}` reference.
    pub client_secret: Secret,
}

fn default_sf_api_version() -> String {
    "60.0".into()
}

/// Zendesk Support. Authenticate with an API token (`email` + `api_token`), an OAuth
/// access token (`oauth_access_token`), or OAuth client credentials (`oauth_client_id` +
/// `oauth_client_secret`, for which crm-sync fetches and renews the bearer token).
/// Entities map to `object = "users"`, `"organizations"` or `"tickets"`, matched on
/// `external_id_field = "external_id"`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ZendeskConfig {
    /// The account URL, e.g. `https://acme.zendesk.com`.
    pub base_url: String,
    /// The agent or admin the API token acts as; with `api_token`.
    pub email: Option<String>,
    /// API token (Basic auth as `{email}/token:{api_token}`); use a `${VAR}` reference.
    pub api_token: Option<Secret>,
    /// OAuth access token sent as `Bearer`; use a `${VAR}` reference.
    pub oauth_access_token: Option<Secret>,
    /// OAuth client id for the client-credentials grant; use a `${VAR}` reference.
    pub oauth_client_id: Option<Secret>,
    /// OAuth client secret for the client-credentials grant; use a `${VAR}` reference.
    pub oauth_client_secret: Option<Secret>,
    /// Scopes asked for in the client-credentials grant.
    #[serde(default = "default_zd_scope")]
    pub oauth_scope: String,
    /// How often the tenant's open `create_or_update_many` jobs are polled (one
    /// `job_statuses/show_many` call for all of them).
    #[serde(default = "default_zd_job_poll_interval_ms")]
    pub job_poll_interval_ms: u64,
    /// How long a write waits for its job. A job still unfinished then goes on being
    /// polled and holds its records until it has run (`connectors::holds`); their events
    /// are parked meanwhile.
    #[serde(default = "default_zd_job_timeout_ms")]
    pub job_timeout_ms: u64,
}

fn default_zd_scope() -> String {
    "read write".into()
}
fn default_zd_job_poll_interval_ms() -> u64 {
    500
}
fn default_zd_job_timeout_ms() -> u64 {
    120_000
}

/// Dynamics 365 / Dataverse Web API with Microsoft Entra ID client credentials.
/// Entities map to an entity set (`object = "contacts"`) and the column of an alternate
/// key declared on that table (`external_id_field`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DynamicsConfig {
    /// The environment URL, e.g. `https://acme.crm.dynamics.com`; also the token scope
    /// (`{org_url}/.default`).
    pub org_url: String,
    /// Entra ID authority; tokens come from `{authority_url}/{directory_id}/oauth2/v2.0/token`.
    #[serde(default = "default_entra_authority")]
    pub authority_url: String,
    /// Directory (tenant) id or domain of the app registration.
    pub directory_id: String,
    /// Application (client) id; use a `${VAR}` reference.
    pub client_id: Secret,
    /// Client secret; use a `${VAR}` reference.
    pub client_secret: Secret,
    /// Web API version, e.g. `9.2`.
    #[serde(default = "default_dataverse_api_version")]
    pub api_version: String,
}

fn default_entra_authority() -> String {
    "https://login.microsoftonline.com".into()
}
fn default_dataverse_api_version() -> String {
    "9.2".into()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntityConfig {
    /// CRM object name, e.g. the sObject `Contact`.
    pub object: String,
    /// CRM field holding the event's `key` (an External ID field in Salesforce).
    pub external_id_field: String,
    /// CRM field name to event `data` path (dot-separated for nested objects). A path
    /// absent from an event leaves the CRM field untouched; an explicit `null` clears it.
    pub fields: BTreeMap<String, String>,
}

/// A secret value: resolved at load time from the environment (`${VAR}`) or from a file
/// (`${file:/path}`), printed as `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret {
    value: String,
    /// A reference left unresolved on purpose (`check-config --no-secrets`): its value is
    /// not checked.
    placeholder: bool,
}

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret {
            value: value.into(),
            placeholder: false,
        }
    }
    /// The secret itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.value
    }
    /// Whether the file names a variable or a file rather than holding the value itself.
    fn is_reference(&self) -> bool {
        self.value.starts_with("${") && self.value.ends_with('}')
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d).map(Secret::new)
    }
}

impl Config {
    /// Reads, parses, resolves secret references and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Config::from_toml(&read(path)?)
    }

    /// Parses, resolves secret references and validates config text.
    pub fn from_toml(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml_with_env(text, |var| std::env::var(var).ok())
    }

    /// Like [`from_toml`](Self::from_toml), with `${VAR}` looked up in `env`. Every
    /// problem is reported, not only the first.
    pub fn from_toml_with_env(text: &str, env: impl Fn(&str) -> Option<String>) -> Result<Config, ConfigError> {
        let mut config = Config::parse(text)?;
        let mut problems = config.resolve_env(env);
        problems.extend(config.problems());
        ConfigError::from_all(problems).map(|()| config)
    }

    /// Parses config text: keys and types only, secret references left as written.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse(e.message().to_string() + &location(text, &e)))
    }

    /// Replaces the secret references (`${VAR}`, `${file:/path}`) by their values; one
    /// problem per reference that cannot be resolved.
    pub fn resolve_env(&mut self, env: impl Fn(&str) -> Option<String>) -> Vec<ConfigError> {
        self.secrets_mut()
            .into_iter()
            .filter_map(|(key, value)| resolve_secret(&key, value, &env).err())
            .collect()
    }

    /// Marks every secret reference as a placeholder whose value is not checked, for
    /// `check-config --no-secrets`: the structure is checked without the secrets.
    pub fn skip_secrets(&mut self) {
        for (_, secret) in self.secrets_mut() {
            if secret.is_reference() {
                secret.placeholder = true;
            }
        }
    }

    /// The keys whose secret is written in the file itself rather than referenced (call
    /// before resolving). `kafka.client` counts only its passwords, keys and secrets.
    pub fn literal_secrets(&mut self) -> Vec<String> {
        self.secrets_mut()
            .into_iter()
            .filter(|(key, secret)| {
                let sensitive = match key.strip_prefix("kafka.client.") {
                    Some(name) => sensitive_client_property(name.trim_matches('"')),
                    None => true,
                };
                sensitive && !secret.is_reference() && !secret.value.is_empty()
            })
            .map(|(key, _)| key)
            .collect()
    }

    /// Every secret-bearing value, with its key.
    fn secrets_mut(&mut self) -> Vec<(String, &mut Secret)> {
        let mut all: Vec<(String, &mut Secret)> = Vec::new();
        for (name, value) in self.kafka.client.iter_mut() {
            all.push((format!("kafka.client.\"{name}\""), value));
        }
        if let Some(grpc) = self.grpc.as_mut() {
            if let Some(token) = grpc.admin_token.as_mut() {
                all.push(("grpc.admin_token".into(), token));
            }
            for (tenant, token) in grpc.tenant_tokens.iter_mut() {
                all.push((format!("grpc.tenant_tokens.{tenant}"), token));
            }
        }
        for (j, hook) in self.notifier.endpoints.iter_mut().enumerate() {
            for (n, secret) in hook.secrets.iter_mut().enumerate() {
                all.push((format!("notifier.endpoints[{j}].secrets[{n}]"), secret));
            }
        }
        for (i, tenant) in self.tenants.iter_mut().enumerate() {
            for (j, hook) in tenant.webhooks.iter_mut().enumerate() {
                for (n, secret) in hook.secrets.iter_mut().enumerate() {
                    all.push((format!("tenants[{i}].webhooks[{j}].secrets[{n}]"), secret));
                }
            }
            if let Some(sf) = tenant.salesforce.as_mut() {
                all.push((format!("tenants[{i}].salesforce.client_id"), &mut sf.client_id));
                all.push((format!("tenants[{i}].salesforce.client_secret"), &mut sf.client_secret));
            }
            if let Some(zd) = tenant.zendesk.as_mut() {
                for (field, value) in [
                    ("api_token", &mut zd.api_token),
                    ("oauth_access_token", &mut zd.oauth_access_token),
                    ("oauth_client_id", &mut zd.oauth_client_id),
                    ("oauth_client_secret", &mut zd.oauth_client_secret),
                ] {
                    if let Some(v) = value.as_mut() {
                        all.push((format!("tenants[{i}].zendesk.{field}"), v));
                    }
                }
            }
            if let Some(d) = tenant.dynamics.as_mut() {
                all.push((format!("tenants[{i}].dynamics.client_id"), &mut d.client_id));
                all.push((format!("tenants[{i}].dynamics.client_secret"), &mut d.client_secret));
            }
        }
        all
    }

    /// Cross-field checks; the error names every key at fault.
    pub fn validate(&self) -> Result<(), ConfigError> {
        ConfigError::from_all(self.problems())
    }

    /// Every problem the cross-field checks find, each naming its key.
    pub fn problems(&self) -> Vec<ConfigError> {
        let mut p = Problems::default();
        p.check(check_host_port("service.http_addr", &self.service.http_addr, true));
        if let Some(endpoint) = &self.service.otlp_endpoint {
            match reqwest::Url::parse(endpoint) {
                Ok(url) if !url.username().is_empty() || url.password().is_some() => p.add(
                    "service.otlp_endpoint",
                    "must not carry credentials: the exporter's error messages show the URL",
                ),
                Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => {}
                _ => p.add("service.otlp_endpoint", "must be an http:// or https:// URL"),
            }
        }
        if !(0.0..=1.0).contains(&self.service.otlp_sample_ratio) {
            p.add("service.otlp_sample_ratio", "must be from 0 to 1");
        }
        self.check_kafka(&mut p);
        self.check_retry_and_breaker(&mut p);
        self.check_tenants(&mut p);
        self.check_notifier(&mut p);
        self.check_grpc(&mut p);
        p.0
    }

    fn check_kafka(&self, p: &mut Problems) {
        let k = &self.kafka;
        if k.bootstrap_servers.split(',').all(|s| s.trim().is_empty()) {
            p.add("kafka.bootstrap_servers", "must name at least one broker");
        }
        let servers = k.bootstrap_servers.split(',').filter(|s| !s.trim().is_empty()).count();
        if servers > MAX_BOOTSTRAP_SERVERS {
            p.add(
                "kafka.bootstrap_servers",
                format!(
                    "lists {servers} brokers; at most {MAX_BOOTSTRAP_SERVERS} (a few are enough to find the cluster)"
                ),
            );
        }
        for server in k
            .bootstrap_servers
            .split(',')
            .filter(|s| !s.trim().is_empty())
            .take(MAX_BOOTSTRAP_SERVERS)
        {
            // librdkafka takes `[protocol://]host[:port]`, port 9092 when left out.
            let server = server.trim();
            let address = server.split_once("://").map_or(server, |(_, rest)| rest);
            let has_port = match address.strip_prefix('[') {
                Some(rest) => rest.contains("]:"),
                None => address.contains(':'),
            };
            let with_port = if has_port {
                address.to_string()
            } else {
                format!("{address}:9092")
            };
            p.check(check_host_port("kafka.bootstrap_servers", &with_port, false));
        }
        if k.group_id.trim().is_empty() {
            p.add("kafka.group_id", "must not be empty");
        }
        if k.input_topics.is_empty() || k.input_topics.iter().any(|t| t.trim().is_empty()) {
            p.add("kafka.input_topics", "must list at least one non-empty topic");
        }
        if k.input_topics.iter().any(|t| t.starts_with('^')) {
            // librdkafka would take it as a pattern; crm-sync counts partitions, checks the
            // state and retry topics and co-partitions them by topic name.
            p.add(
                "kafka.input_topics",
                "must name topics: a pattern (^…) is not supported",
            );
        }
        for (key, topic) in [
            ("kafka.dlq_topic", &k.dlq_topic),
            ("kafka.failures_topic", &k.failures_topic),
        ] {
            if topic.trim().is_empty() {
                p.add(key, "must not be empty");
            }
            if k.input_topics.contains(topic) {
                p.add(key, "must not be one of kafka.input_topics");
            }
        }
        if let Some(retry) = &k.retry_topic {
            if retry.trim().is_empty() {
                p.add("kafka.retry_topic", "must not be empty");
            }
            if k.input_topics.contains(retry) || [&k.dlq_topic, &k.failures_topic, &k.state_topic].contains(&retry) {
                p.add(
                    "kafka.retry_topic",
                    "must differ from the input, DLQ, failures and state topics",
                );
            }
        }
        let optional = [
            ("kafka.status_topic", &k.status_topic),
            ("kafka.audit_topic", &k.audit_topic),
            ("kafka.pause_topic", &k.pause_topic),
        ];
        for (i, (key, topic)) in optional.iter().enumerate() {
            let Some(topic) = topic else { continue };
            let others = [&k.dlq_topic, &k.failures_topic, &k.state_topic];
            let earlier = optional[..i].iter().any(|(_, other)| other.as_ref() == Some(topic));
            if topic.trim().is_empty()
                || k.input_topics.contains(topic)
                || others.contains(&topic)
                || k.retry_topic.as_ref() == Some(topic)
                || (earlier && *key == "kafka.pause_topic")
            {
                p.add(
                    *key,
                    "must be a topic of its own, not empty and not another crm-sync topic",
                );
            }
        }
        if k.status_topic.is_some() && k.status_topic == k.audit_topic {
            p.add(
                "kafka.audit_topic",
                "must differ from kafka.status_topic (one is compacted, the other not)",
            );
        }
        if k.state_topic == k.dlq_topic || k.state_topic == k.failures_topic {
            p.add("kafka.state_topic", "must differ from the DLQ and failures topics");
        }
        if k.drain_timeout_ms >= k.session_timeout_ms {
            p.add(
                "kafka.drain_timeout_ms",
                format!("must be below kafka.session_timeout_ms ({})", k.session_timeout_ms),
            );
        }
        // A revoke drains for up to `drain_timeout_ms`, then waits for the writes still at
        // the CRM (see `consume`); all of it must fit before librdkafka gives up on the
        // member.
        let max_poll = match k.client.get("max.poll.interval.ms") {
            None => LIBRDKAFKA_MAX_POLL_INTERVAL_MS,
            Some(v) if v.placeholder => LIBRDKAFKA_MAX_POLL_INTERVAL_MS,
            Some(v) => v.expose().trim().parse().unwrap_or_else(|_| {
                p.add(
                    "kafka.client.\"max.poll.interval.ms\"",
                    "must be a number of milliseconds",
                );
                LIBRDKAFKA_MAX_POLL_INTERVAL_MS
            }),
        };
        if let Some(t) = self.tenants.iter().max_by_key(|t| t.longest_write()) {
            let longest = u64::try_from(t.longest_write().as_millis()).unwrap_or(u64::MAX);
            let revoke = k.drain_timeout_ms.saturating_add(longest);
            if revoke >= max_poll {
                p.add(
                    "kafka.drain_timeout_ms",
                    format!(
                        "plus the longest write of tenant {} ({} ms: 4 × request_timeout_ms, plus zendesk.job_timeout_ms) must be below max.poll.interval.ms ({max_poll}): a revoke waits for both",
                        t.name,
                        t.longest_write().as_millis()
                    ),
                );
            }
        }
        if k.session_timeout_ms < 1_000 {
            p.add("kafka.session_timeout_ms", "must be at least 1000");
        }
        if k.commit_interval_ms == 0 {
            p.add("kafka.commit_interval_ms", "must be positive");
        }
        if k.max_in_flight_per_partition == 0 {
            p.add("kafka.max_in_flight_per_partition", "must be positive");
        }
        if k.max_message_bytes == 0 {
            p.add("kafka.max_message_bytes", "must be positive");
        }
        let producer_max = match k.client.get("message.max.bytes") {
            None => LIBRDKAFKA_MESSAGE_MAX_BYTES,
            Some(v) if v.placeholder => LIBRDKAFKA_MESSAGE_MAX_BYTES,
            Some(v) => v.expose().trim().parse().unwrap_or_else(|_| {
                p.add("kafka.client.\"message.max.bytes\"", "must be a number of bytes");
                LIBRDKAFKA_MESSAGE_MAX_BYTES
            }),
        };
        if k.max_message_bytes.saturating_add(HEADER_ROOM_BYTES) > producer_max {
            p.add(
                "kafka.max_message_bytes",
                format!(
                    "must be at most {} (the producer's message.max.bytes, {producer_max}, less {HEADER_ROOM_BYTES} bytes for crm-sync's headers), or a message read could not be written to the retry or dead-letter topic",
                    producer_max.saturating_sub(HEADER_ROOM_BYTES)
                ),
            );
        }
        if k.topic_partitions < 1 {
            p.add("kafka.topic_partitions", "must be at least 1");
        }
        if k.topic_replication < 1 {
            p.add("kafka.topic_replication", "must be at least 1");
        }
        for (name, value) in &k.client {
            if !value.placeholder {
                p.check(check_client_property(name, value.expose()));
            }
        }
        for reserved in [
            "group.id",
            "bootstrap.servers",
            "enable.auto.offset.store",
            "enable.auto.commit",
        ] {
            if k.client.contains_key(reserved) {
                p.add(
                    format!("kafka.client.\"{reserved}\""),
                    "is set by crm-sync itself and cannot be overridden",
                );
            }
        }
    }

    fn check_retry_and_breaker(&self, p: &mut Problems) {
        if self.diff.capacity == 0 {
            p.add("diff.capacity", "must be positive");
        }
        let r = &self.retry;
        if r.max_attempts == 0 {
            p.add("retry.max_attempts", "must be at least 1");
        }
        if r.base_delay_ms == 0 {
            p.add("retry.base_delay_ms", "must be positive");
        }
        if r.max_delay_ms < r.base_delay_ms {
            p.add("retry.max_delay_ms", "must be at least retry.base_delay_ms");
        }
        if r.park_after_ms == 0 {
            p.add("retry.park_after_ms", "must be positive");
        }
        if r.max_age_ms < r.base_delay_ms {
            p.add("retry.max_age_ms", "must be at least retry.base_delay_ms");
        }
        let b = &self.breaker;
        if b.failure_threshold == 0 {
            p.add("breaker.failure_threshold", "must be at least 1");
        }
        if b.probe_interval_ms == 0 {
            p.add("breaker.probe_interval_ms", "must be positive");
        }
        if b.max_probe_interval_ms < b.probe_interval_ms || b.max_probe_interval_ms > MAX_LATE_WRITE_WINDOW_MS {
            p.add(
                "breaker.max_probe_interval_ms",
                "must be at least breaker.probe_interval_ms and at most a day",
            );
        }
    }

    fn check_tenants(&self, p: &mut Problems) {
        if self.tenants.is_empty() {
            p.add("tenants", "must configure at least one tenant");
        }
        let mut seen = std::collections::BTreeSet::new();
        for (i, t) in self.tenants.iter().enumerate() {
            let key = |field: &str| format!("tenants[{i}].{field}");
            if t.name.trim().is_empty() {
                p.add(key("name"), "must not be empty");
            }
            if !seen.insert(t.name.as_str()) {
                p.add(key("name"), format!("tenant `{}` is configured twice", t.name));
            }
            if !(t.rate_limit_per_sec > 0.0 && t.rate_limit_per_sec.is_finite()) {
                p.add(key("rate_limit_per_sec"), "must be a positive number");
            }
            if t.max_concurrency == 0 {
                p.add(key("max_concurrency"), "must be at least 1");
            }
            if t.batch_size == 0 {
                p.add(key("batch_size"), "must be at least 1");
            }
            if t.late_write_window_ms > MAX_LATE_WRITE_WINDOW_MS {
                p.add(
                    key("late_write_window_ms"),
                    format!("must be at most {MAX_LATE_WRITE_WINDOW_MS} (a day)"),
                );
            }
            if t.request_timeout_ms == 0 {
                p.add(key("request_timeout_ms"), "must be positive");
            }
            let sections = [
                ("salesforce", t.salesforce.is_some()),
                ("zendesk", t.zendesk.is_some()),
                ("dynamics", t.dynamics.is_some()),
            ];
            for (section, present) in sections {
                if present && section != t.crm.as_str() {
                    p.add(
                        key(section),
                        format!(
                            "is only used when crm = \"{section}\" (this tenant has crm = \"{}\")",
                            t.crm.as_str()
                        ),
                    );
                }
            }
            self.check_crm_section(i, t, p);
            if t.entities.is_empty() {
                p.add(key("entities"), "must map at least one entity");
            }
            for (name, e) in &t.entities {
                let ekey = |field: &str| format!("tenants[{i}].entities.{name}.{field}");
                if e.object.trim().is_empty() {
                    p.add(ekey("object"), "must not be empty");
                }
                if e.external_id_field.trim().is_empty() {
                    p.add(ekey("external_id_field"), "must not be empty");
                }
                if e.fields.is_empty() {
                    p.add(ekey("fields"), "must map at least one field");
                }
                for (field, path) in &e.fields {
                    if path.split('.').any(str::is_empty) {
                        p.add(
                            format!("tenants[{i}].entities.{name}.fields.{field}"),
                            format!("`{path}` is not a valid data path"),
                        );
                    }
                    if field == &e.external_id_field {
                        p.add(
                            format!("tenants[{i}].entities.{name}.fields.{field}"),
                            "the external id field is set from the event key and cannot be mapped",
                        );
                    }
                }
            }
        }
    }

    /// The section of the tenant's CRM (`tenants[i].salesforce`, …).
    fn check_crm_section(&self, i: usize, t: &TenantConfig, p: &mut Problems) {
        let key = |field: &str| format!("tenants[{i}].{field}");
        match t.crm {
            CrmKind::Salesforce => {
                let Some(sf) = &t.salesforce else {
                    p.add(key("salesforce"), "is required when crm = \"salesforce\"");
                    return;
                };
                p.check(check_url(&key("salesforce.base_url"), &sf.base_url));
                let host = sf.base_url.split("://").nth(1).unwrap_or_default();
                if host.starts_with("login.salesforce.com") || host.starts_with("test.salesforce.com") {
                    p.add(
                        key("salesforce.base_url"),
                        "the client-credentials flow needs the org's My Domain URL, not login/test.salesforce.com",
                    );
                }
                p.check(check_version(&key("salesforce.api_version"), &sf.api_version, "60.0"));
                p.check(check_secret(&key("salesforce.client_id"), Some(&sf.client_id)));
                p.check(check_secret(&key("salesforce.client_secret"), Some(&sf.client_secret)));
            }
            CrmKind::Zendesk => {
                let Some(zd) = &t.zendesk else {
                    p.add(key("zendesk"), "is required when crm = \"zendesk\"");
                    return;
                };
                p.check(check_url(&key("zendesk.base_url"), &zd.base_url));
                let api_token = zd.email.is_some() || zd.api_token.is_some();
                let bearer = zd.oauth_access_token.is_some();
                let client = zd.oauth_client_id.is_some() || zd.oauth_client_secret.is_some();
                match (api_token, bearer, client) {
                    (true, false, false) => {
                        if zd.email.as_deref().is_none_or(|e| !e.contains('@')) {
                            p.add(key("zendesk.email"), "an email address is required with api_token");
                        }
                        p.check(check_secret(&key("zendesk.api_token"), zd.api_token.as_ref()));
                    }
                    (false, true, false) => p.check(check_secret(
                        &key("zendesk.oauth_access_token"),
                        zd.oauth_access_token.as_ref(),
                    )),
                    (false, false, true) => {
                        p.check(check_secret(
                            &key("zendesk.oauth_client_id"),
                            zd.oauth_client_id.as_ref(),
                        ));
                        p.check(check_secret(
                            &key("zendesk.oauth_client_secret"),
                            zd.oauth_client_secret.as_ref(),
                        ));
                    }
                    _ => {
                        p.add(
                            key("zendesk"),
                            "set exactly one of: email + api_token, oauth_access_token, oauth_client_id + oauth_client_secret",
                        );
                    }
                }
                if zd.job_poll_interval_ms == 0 {
                    p.add(key("zendesk.job_poll_interval_ms"), "must be positive");
                }
                if zd.job_timeout_ms < zd.job_poll_interval_ms {
                    p.add(key("zendesk.job_timeout_ms"), "must be at least job_poll_interval_ms");
                }
                for (name, e) in &t.entities {
                    let ekey = |field: &str| format!("tenants[{i}].entities.{name}.{field}");
                    if !["users", "organizations", "tickets"].contains(&e.object.as_str()) {
                        p.add(
                            ekey("object"),
                            "must be \"users\", \"organizations\" or \"tickets\" for Zendesk",
                        );
                    }
                    if e.external_id_field != "external_id" {
                        p.add(ekey("external_id_field"), "must be \"external_id\" for Zendesk");
                    }
                }
            }
            CrmKind::Dynamics => {
                let Some(d) = &t.dynamics else {
                    p.add(key("dynamics"), "is required when crm = \"dynamics\"");
                    return;
                };
                p.check(check_url(&key("dynamics.org_url"), &d.org_url));
                p.check(check_url(&key("dynamics.authority_url"), &d.authority_url));
                if d.directory_id.trim().is_empty() || d.directory_id.contains('/') {
                    p.add(key("dynamics.directory_id"), "must be a directory id or domain");
                }
                p.check(check_secret(&key("dynamics.client_id"), Some(&d.client_id)));
                p.check(check_secret(&key("dynamics.client_secret"), Some(&d.client_secret)));
                p.check(check_version(&key("dynamics.api_version"), &d.api_version, "9.2"));
            }
        }
    }

    fn check_grpc(&self, p: &mut Problems) {
        let Some(g) = &self.grpc else { return };
        if g.addr.parse::<std::net::SocketAddr>().is_err() {
            p.add("grpc.addr", "must be an IP address and port, e.g. 127.0.0.1:50051");
        }
        if g.admin_token.is_none() && g.tenant_tokens.is_empty() {
            p.add(
                "grpc",
                "set grpc.admin_token or grpc.tenant_tokens: every call is authenticated",
            );
        }
        if let Some(t) = &g.admin_token {
            p.check(check_secret("grpc.admin_token", Some(t)));
        }
        for (tenant, token) in &g.tenant_tokens {
            let key = format!("grpc.tenant_tokens.{tenant}");
            if self.tenant(tenant).is_none() {
                p.add(key.clone(), "names no configured tenant");
            }
            p.check(check_secret(&key, Some(token)));
        }
        let mut tokens: Vec<&str> = g.tenant_tokens.values().map(Secret::expose).collect();
        tokens.extend(g.admin_token.as_ref().map(Secret::expose));
        let count = tokens.len();
        tokens.sort_unstable();
        tokens.dedup();
        if tokens.len() != count {
            p.add("grpc.tenant_tokens", "every token must be different");
        }
        if g.status_capacity == 0 {
            p.add("grpc.status_capacity", "must be greater than 0");
        }
        match (&g.tls_cert_path, &g.tls_key_path) {
            (None, None) => {}
            (Some(cert), Some(key)) => {
                for (k, path) in [("grpc.tls_cert_path", cert), ("grpc.tls_key_path", key)] {
                    if std::fs::metadata(path).is_err() {
                        p.add(k, format!("cannot read {path}"));
                    }
                }
            }
            _ => {
                p.add(
                    "grpc.tls_cert_path",
                    "set both grpc.tls_cert_path and grpc.tls_key_path, or neither",
                );
            }
        }
    }

    fn check_notifier(&self, p: &mut Problems) {
        let n = &self.notifier;
        if n.dlq_topic.trim().is_empty() {
            p.add("notifier.dlq_topic", "must not be empty");
        }
        if n.group_id.as_ref().is_some_and(|g| g.trim().is_empty()) {
            p.add("notifier.group_id", "must not be empty when set");
        }
        for (key, v) in [
            ("notifier.coalesce_window_ms", n.coalesce_window_ms),
            ("notifier.request_timeout_ms", n.request_timeout_ms),
            ("notifier.retry_base_delay_ms", n.retry_base_delay_ms),
            ("notifier.give_up_after_ms", n.give_up_after_ms),
            ("notifier.max_queued_per_endpoint", n.max_queued_per_endpoint as u64),
        ] {
            if v == 0 {
                p.add(key, "must be greater than 0");
            }
        }
        if n.retry_max_delay_ms < n.retry_base_delay_ms {
            p.add(
                "notifier.retry_max_delay_ms",
                "must be at least notifier.retry_base_delay_ms",
            );
        }
        let hooks = n
            .endpoints
            .iter()
            .enumerate()
            .map(|(j, h)| (format!("notifier.endpoints[{j}]"), h));
        let tenant_hooks = self.tenants.iter().enumerate().flat_map(|(i, t)| {
            t.webhooks
                .iter()
                .enumerate()
                .map(move |(j, h)| (format!("tenants[{i}].webhooks[{j}]"), h))
        });
        for (key, hook) in hooks.chain(tenant_hooks) {
            match reqwest::Url::parse(&hook.url) {
                Ok(url) if matches!(url.scheme(), "http" | "https") && url.host().is_some() => {}
                _ => {
                    p.add(format!("{key}.url"), "must be an http:// or https:// URL");
                }
            }
            if hook.secrets.is_empty() || hook.secrets.len() > 2 {
                p.add(
                    format!("{key}.secrets"),
                    "must list one secret, or two during a rotation",
                );
            }
            for (s, secret) in hook.secrets.iter().enumerate() {
                if secret.placeholder {
                    continue;
                }
                if let Err(why) = crate::notifier::signing::SigningKey::parse(secret.expose()) {
                    p.add(format!("{key}.secrets[{s}]"), why);
                }
            }
        }
    }

    pub fn tenant(&self, name: &str) -> Option<&TenantConfig> {
        self.tenants.iter().find(|t| t.name == name)
    }
}

impl KafkaConfig {
    pub fn session_timeout(&self) -> Duration {
        Duration::from_millis(self.session_timeout_ms)
    }
    pub fn drain_timeout(&self) -> Duration {
        Duration::from_millis(self.drain_timeout_ms)
    }
}

fn check_url(key: &str, url: &str) -> Result<(), ConfigError> {
    if url.starts_with("https://") || url.starts_with("http://") {
        Ok(())
    } else {
        Err(ConfigError::invalid(key, "must be an http(s) URL"))
    }
}

/// `host:port`, the host a name or an IP address (IPv6 in brackets); port 0 only where
/// `any_port` (a listener that picks a free one).
fn check_host_port(key: &str, value: &str, any_port: bool) -> Result<(), ConfigError> {
    let fail = |why: &str| Err(ConfigError::invalid(key, format!("`{value}` {why}")));
    let Some((host, port)) = value.rsplit_once(':') else {
        return fail("must be host:port");
    };
    match port.parse::<u16>() {
        Ok(0) if !any_port => return fail("needs a port above 0"),
        Ok(_) => {}
        Err(_) => return fail("must end in a port number (0-65535)"),
    }
    let host_ok = if let Some(v6) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        v6.parse::<std::net::Ipv6Addr>().is_ok()
    } else {
        // Underscores too (container and compose service names), and a root dot.
        let name = host.strip_suffix('.').unwrap_or(host);
        !name.is_empty()
            && name.len() <= 253
            && name.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            })
    };
    if host_ok {
        Ok(())
    } else {
        fail("must name a host (a DNS name or an IP address, IPv6 in brackets)")
    }
}

fn check_version(key: &str, version: &str, example: &str) -> Result<(), ConfigError> {
    let ok = version
        .split_once('.')
        .is_some_and(|(a, b)| a.parse::<u32>().is_ok() && b.parse::<u32>().is_ok());
    if ok {
        Ok(())
    } else {
        Err(ConfigError::invalid(key, format!("must look like `{example}`")))
    }
}

fn check_secret(key: &str, secret: Option<&Secret>) -> Result<(), ConfigError> {
    match secret {
        Some(s) if s.placeholder || !s.expose().is_empty() => Ok(()),
        _ => Err(ConfigError::invalid(key, "must be set and not empty")),
    }
}

/// Reads a config file.
pub fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// Most bytes a secret file may hold: secrets are short, and a path to a device or a huge
/// file must not be read into memory.
const MAX_SECRET_FILE_BYTES: u64 = 64 * 1024;

/// A secret file's text: a regular file (a symlink to one, as Kubernetes mounts them) of
/// at most [`MAX_SECRET_FILE_BYTES`], never a device or a pipe, which could block or never
/// end.
fn read_secret_file(path: &str) -> Result<String, String> {
    use std::io::Read;
    let meta = std::fs::metadata(path).map_err(|e| e.kind().to_string())?;
    if !meta.is_file() {
        return Err("not a regular file".into());
    }
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_SECRET_FILE_BYTES + 1).read_to_end(&mut bytes))
        .map_err(|e| e.kind().to_string())?;
    if bytes.len() as u64 > MAX_SECRET_FILE_BYTES {
        return Err(format!("more than {MAX_SECRET_FILE_BYTES} bytes"));
    }
    String::from_utf8(bytes).map_err(|_| "not UTF-8 text".into())
}

/// Most brokers `kafka.bootstrap_servers` may list: librdkafka starts a thread for each.
const MAX_BOOTSTRAP_SERVERS: usize = 100;

/// Whether a librdkafka property holds a secret (its value is kept out of the file).
pub(crate) fn sensitive_client_property(name: &str) -> bool {
    ["password", "secret", "passphrase", "private.key", "jaas"]
        .iter()
        .any(|s| name.contains(s))
        || matches!(name, "ssl.key.pem" | "sasl.oauthbearer.config")
}

/// Whether librdkafka takes the property's value (each property alone: a refusal names
/// it, and the value of a secret property is never repeated).
fn check_client_property(name: &str, value: &str) -> Result<(), ConfigError> {
    let mut alone = rdkafka::ClientConfig::new();
    alone.set(name, value);
    match alone.create_native_config() {
        Ok(_) => Ok(()),
        Err(rdkafka::error::KafkaError::ClientConfig(_, description, _, _)) if !sensitive_client_property(name) => {
            Err(ConfigError::invalid(format!("kafka.client.\"{name}\""), description))
        }
        Err(_) => Err(ConfigError::invalid(
            format!("kafka.client.\"{name}\""),
            "librdkafka refuses this property or its value",
        )),
    }
}

/// Resolves `${VAR}` from `env` and `${file:/path}` from the file (one trailing newline
/// dropped, as `kubectl create secret --from-file` and editors leave one); any other
/// value is kept as written.
fn resolve_secret(key: &str, value: &mut Secret, env: &impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
    let raw = value.expose();
    let Some(reference) = raw.strip_prefix("${").and_then(|r| r.strip_suffix('}')) else {
        return Ok(());
    };
    let resolved = match reference.strip_prefix("file:") {
        // librdkafka's `*.location` properties take a path, and would show what they were
        // given in their errors: the file's content must not be passed as one.
        Some(_) if key.starts_with("kafka.client.") && key.ends_with(".location\"") => {
            return Err(ConfigError::invalid(
                key,
                "takes the path of a file: write the path itself, not ${file:…}",
            ));
        }
        Some(path) => {
            let text = read_secret_file(path).map_err(|reason| ConfigError::SecretFile {
                key: key.to_string(),
                path: path.to_string(),
                reason,
            })?;
            let text = text.strip_suffix('\n').unwrap_or(&text);
            text.strip_suffix('\r').unwrap_or(text).to_string()
        }
        None => env(reference).ok_or_else(|| ConfigError::MissingEnv {
            key: key.to_string(),
            var: reference.to_string(),
        })?,
    };
    *value = Secret::new(resolved);
    Ok(())
}

fn location(text: &str, e: &toml::de::Error) -> String {
    match e.span() {
        Some(span) => {
            let line = text[..span.start.min(text.len())].lines().count().max(1);
            format!(" (line {line})")
        }
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"
        [kafka]
        bootstrap_servers = "localhost:9092"
        group_id = "g"
        input_topics = ["in"]
        dlq_topic = "dlq"
        failures_topic = "failures"
        state_topic = "state"

        [[tenants]]
        name = "acme"
        crm = "salesforce"
        [tenants.salesforce]
        base_url = "https://acme.my.salesforce.com"
        client_id = "${SF_ID}"
        client_secret = "${SF_SECRET}"
        [tenants.entities.contact]
        object = "Contact"
        external_id_field = "External_Id__c"
        fields = { LastName = "last_name" }
    "#;

    fn parse(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        Config::from_toml_with_env(text, |v| env.iter().find(|(k, _)| *k == v).map(|(_, x)| x.to_string()))
    }

    #[test]
    fn resolves_secrets_from_env_and_hides_them_in_debug() {
        let c = parse(MINIMAL, &[("SF_ID", "id-123"), ("SF_SECRET", "s3cr3t")]).unwrap();
        let sf = c.tenants[0].salesforce.as_ref().unwrap();
        assert_eq!(sf.client_secret.expose(), "s3cr3t");
        let printed = format!("{c:?}");
        assert!(!printed.contains("s3cr3t") && !printed.contains("id-123"), "{printed}");
    }

    #[test]
    fn missing_env_var_names_the_key() {
        let err = parse(MINIMAL, &[("SF_ID", "x")]).unwrap_err().to_string();
        assert!(
            err.contains("tenants[0].salesforce.client_secret") && err.contains("SF_SECRET"),
            "{err}"
        );
    }

    #[test]
    fn every_problem_is_reported_at_once_each_naming_its_key() {
        let text = MINIMAL
            .replace("group_id = \"g\"", "group_id = \"\"")
            .replace(
                "bootstrap_servers = \"localhost:9092\"",
                "bootstrap_servers = \"localhost:notaport\"",
            )
            .replace("client_id = \"${SF_ID}\"", "client_id = \"${NOT_SET}\"")
            .replace("[kafka]", "[service]\nhttp_addr = \"localhost:notaport\"\n[kafka]")
            .replace("https://acme.my.salesforce.com", "acme.my.salesforce.com");
        let err = parse(&text, &[("SF_SECRET", "s")]).unwrap_err().to_string();
        for key in [
            "service.http_addr",
            "kafka.bootstrap_servers",
            "kafka.group_id",
            "tenants[0].salesforce.client_id",
            "tenants[0].salesforce.base_url",
        ] {
            assert!(err.contains(&format!("`{key}`")), "{key} missing from: {err}");
        }
        assert!(err.starts_with("5 problems:"), "{err}");
    }

    #[test]
    fn addresses_are_host_and_port() {
        for (addr, ok) in [
            ("127.0.0.1:9464", true),
            ("0.0.0.0:0", true),
            ("localhost:9464", true),
            ("metrics.internal:80", true),
            ("[::1]:9464", true),
            ("localhost:notaport", false),
            ("localhost:70000", false),
            ("localhost", false),
            (":9464", false),
            ("bad host:9464", false),
            ("kafka_1:9092", true),
            ("broker.example.com.:9092", true),
            ("[::zz]:9464", false),
        ] {
            let text = MINIMAL.replace("[kafka]", &format!("[service]\nhttp_addr = \"{addr}\"\n[kafka]"));
            let result = parse(&text, &[("SF_ID", "i"), ("SF_SECRET", "s")]);
            assert_eq!(result.is_ok(), ok, "{addr}: {:?}", result.err().map(|e| e.to_string()));
        }
        // An OTLP endpoint with credentials in it would show them in the exporter's errors.
        for (endpoint, ok) in [
            ("http://collector:4318", true),
            ("http://user:secret@collector:4318", false),
            ("collector:4318", false),
        ] {
            let text = MINIMAL.replace(
                "[kafka]",
                &format!("[service]\notlp_endpoint = \"{endpoint}\"\n[kafka]"),
            );
            let result = parse(&text, &[("SF_ID", "i"), ("SF_SECRET", "s")]);
            assert_eq!(result.is_ok(), ok, "{endpoint}");
            if let Err(e) = result {
                assert!(!e.to_string().contains("secret@"), "{e}");
            }
        }
        let many = vec!["b:9092"; 101].join(",");
        for (servers, ok) in [
            (many.as_str(), false),
            ("b1:9092,b2:9092", true),
            ("SASL_SSL://b1.example.com:9096", true),
            ("b1", true),
            ("[::1]:9092", true),
            ("b1:0", false),
            ("b1:x", false),
            ("b1:9092,,b2:nope", false),
            (" , ", false),
            ("my_kafka:9092", true),
        ] {
            let text = MINIMAL.replace("localhost:9092", servers);
            let result = parse(&text, &[("SF_ID", "i"), ("SF_SECRET", "s")]);
            assert_eq!(
                result.is_ok(),
                ok,
                "{servers}: {:?}",
                result.err().map(|e| e.to_string())
            );
        }
    }

    #[test]
    fn secrets_come_from_files_with_one_trailing_newline_dropped() {
        let dir = std::env::temp_dir().join(format!("crm-sync-secret-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("client_secret");
        std::fs::write(&file, "from-a-file\n").unwrap();
        let big = dir.join("big");
        std::fs::write(&big, vec![b'x'; 70_000]).unwrap();
        let text = MINIMAL.replace("${SF_SECRET}", &format!("${{file:{}}}", file.display()));
        let c = parse(&text, &[("SF_ID", "i")]).unwrap();
        assert_eq!(
            c.tenants[0].salesforce.as_ref().unwrap().client_secret.expose(),
            "from-a-file"
        );

        // A device is not read (it could block, or never end), nor a file past 64 KiB.
        for (path, why) in [
            ("/dev/zero", "not a regular file"),
            (big.to_str().unwrap(), "more than 65536 bytes"),
        ] {
            let text = MINIMAL.replace("${SF_SECRET}", &format!("${{file:{path}}}"));
            let err = parse(&text, &[("SF_ID", "i")]).unwrap_err().to_string();
            assert!(err.contains(why), "{path}: {err}");
        }
        let missing = MINIMAL.replace("${SF_SECRET}", "${file:/nonexistent/crm-sync/secret}");
        let err = parse(&missing, &[("SF_ID", "i")]).unwrap_err().to_string();
        assert!(
            err.contains("`tenants[0].salesforce.client_secret`") && err.contains("/nonexistent/crm-sync/secret"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn without_secrets_the_structure_is_checked_and_literal_secrets_are_named() {
        let text = MINIMAL
            .replace(
                "[kafka]",
                "[kafka.client]\n\"sasl.password\" = \"hunter2\"\n\"security.protocol\" = \"SASL_SSL\"\n[kafka]",
            )
            .replace("client_id = \"${SF_ID}\"", "client_id = \"literal-id\"");
        let mut c = Config::parse(&text).unwrap();
        assert_eq!(
            c.literal_secrets(),
            ["kafka.client.\"sasl.password\"", "tenants[0].salesforce.client_id"]
        );
        c.skip_secrets();
        assert!(c.problems().is_empty(), "{:?}", c.problems());
        // Without skipping, the unset variable is a problem.
        let mut c = Config::parse(&text).unwrap();
        let unresolved = c.resolve_env(|_| None);
        assert_eq!(unresolved.len(), 1, "{unresolved:?}");
        assert!(unresolved[0].to_string().contains("SF_SECRET"));
        // A structural problem is still found without the secrets.
        let mut broken = Config::parse(&text.replace("group_id = \"g\"", "group_id = \" \"")).unwrap();
        broken.skip_secrets();
        assert_eq!(broken.problems().len(), 1);
    }

    #[test]
    fn a_refused_secret_property_is_named_without_its_value() {
        // A Java client's JAAS line, which librdkafka refuses, carries the password.
        let text = MINIMAL.replace(
            "[kafka]",
            "[kafka.client]\n\"sasl.jaas.config\" = \"${JAAS}\"\n\"ssl.key.location\" = \"${file:/etc/crm-sync/client.key}\"\n[kafka]",
        );
        let jaas =
            "org.apache.kafka.common.security.scram.ScramLoginModule required username='u' password='hunter2-jaas';";
        let err = parse(&text, &[("SF_ID", "i"), ("SF_SECRET", "s"), ("JAAS", jaas)])
            .unwrap_err()
            .to_string();
        assert!(err.contains("`kafka.client.\"sasl.jaas.config\"`"), "{err}");
        assert!(!err.contains("hunter2"), "the secret was repeated: {err}");
        // A path property given a file's content would show the content in librdkafka's errors.
        assert!(
            err.contains("`kafka.client.\"ssl.key.location\"`: takes the path"),
            "{err}"
        );
    }

    #[test]
    fn the_pause_topic_is_a_topic_of_its_own() {
        for other in ["failures", "crm-sync.status"] {
            let text = MINIMAL.replace(
                "failures_topic = \"failures\"",
                &format!(
                    "failures_topic = \"failures\"\nstatus_topic = \"crm-sync.status\"\npause_topic = \"{other}\""
                ),
            );
            let err = parse(&text, &[("SF_ID", "x"), ("SF_SECRET", "y")])
                .unwrap_err()
                .to_string();
            assert!(err.contains("kafka.pause_topic"), "{other}: {err}");
        }
        let text = MINIMAL.replace(
            "failures_topic = \"failures\"",
            "failures_topic = \"failures\"\npause_topic = \"crm-sync.pauses\"",
        );
        let config = parse(&text, &[("SF_ID", "x"), ("SF_SECRET", "y")]).unwrap();
        assert_eq!(config.kafka.pause_topic.as_deref(), Some("crm-sync.pauses"));
    }

    #[test]
    fn drain_timeout_must_be_below_session_timeout() {
        let text = MINIMAL.replace(
            "failures_topic = \"failures\"",
            "failures_topic = \"failures\"\ndrain_timeout_ms = 20000",
        );
        let err = parse(&text, &[("SF_ID", "x"), ("SF_SECRET", "y")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("kafka.drain_timeout_ms"), "{err}");
    }

    #[test]
    fn a_late_write_window_longer_than_a_day_is_refused() {
        let env = [("SF_ID", "x"), ("SF_SECRET", "y")];
        let with = |ms: u64| {
            MINIMAL.replace(
                "crm = \"salesforce\"",
                &format!("crm = \"salesforce\"\nlate_write_window_ms = {ms}"),
            )
        };
        let err = parse(&with(86_400_001), &env).unwrap_err().to_string();
        assert!(err.contains("tenants[0].late_write_window_ms"), "{err}");
        assert!(parse(&with(86_400_000), &env).is_ok());
    }

    #[test]
    fn a_revoke_must_fit_the_drain_and_the_longest_write_before_the_poll_interval() {
        let env = [("SF_ID", "x"), ("SF_SECRET", "y")];
        // 4 × 80 s of request timeout: a write may take 320 s, past librdkafka's 300 s.
        let text = MINIMAL.replace(
            "crm = \"salesforce\"",
            "crm = \"salesforce\"\nrequest_timeout_ms = 80000",
        );
        let err = parse(&text, &env).unwrap_err().to_string();
        assert!(err.contains("kafka.drain_timeout_ms") && err.contains("acme"), "{err}");
        let text = text.replace(
            "state_topic = \"state\"",
            "state_topic = \"state\"\n[kafka.client]\n\"max.poll.interval.ms\" = \"600000\"",
        );
        assert!(parse(&text, &env).is_ok(), "{:?}", parse(&text, &env).err());
    }

    #[test]
    fn max_message_bytes_must_leave_room_in_the_producers_limit() {
        let env = [("SF_ID", "x"), ("SF_SECRET", "y")];
        // librdkafka's default message.max.bytes is 1000000: 1 MiB could never be
        // dead-lettered or parked whole.
        let text = MINIMAL.replace(
            "failures_topic = \"failures\"",
            "failures_topic = \"failures\"\nmax_message_bytes = 1048576",
        );
        let err = parse(&text, &env).unwrap_err().to_string();
        assert!(err.contains("kafka.max_message_bytes"), "{err}");
        // Raising the producer's limit makes room.
        let text = text.replace(
            "state_topic = \"state\"",
            "state_topic = \"state\"\n[kafka.client]\n\"message.max.bytes\" = \"2000000\"",
        );
        assert!(parse(&text, &env).is_ok(), "{:?}", parse(&text, &env).err());
        // The default fits.
        assert!(parse(MINIMAL, &env).is_ok());
    }

    #[test]
    fn webhook_endpoints_are_checked_naming_the_key_and_never_the_secret() {
        let good = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
        let env = [
            ("SF_ID", "x"),
            ("SF_SECRET", "y"),
            ("HOOK", good),
            ("RAW", "plain-secret-value"),
        ];
        let with = |hook: &str| format!("{MINIMAL}\n[[tenants.webhooks]]\n{hook}\n");
        assert!(parse(&with("url = \"https://h.example/x\"\nsecrets = [\"${HOOK}\"]"), &env).is_ok());
        for (hook, key) in [
            (
                "url = \"ftp://h.example\"\nsecrets = [\"${HOOK}\"]",
                "tenants[0].webhooks[0].url",
            ),
            (
                "url = \"not a url\"\nsecrets = [\"${HOOK}\"]",
                "tenants[0].webhooks[0].url",
            ),
            (
                "url = \"https://h.example\"\nsecrets = []",
                "tenants[0].webhooks[0].secrets",
            ),
            (
                "url = \"https://h.example\"\nsecrets = [\"${HOOK}\", \"${HOOK}\", \"${HOOK}\"]",
                "tenants[0].webhooks[0].secrets",
            ),
            (
                "url = \"https://h.example\"\nsecrets = [\"${HOOK}\", \"${RAW}\"]",
                "tenants[0].webhooks[0].secrets[1]",
            ),
            (
                "url = \"https://h.example\"\nsecrets = [\"${UNSET}\"]",
                "tenants[0].webhooks[0].secrets[0]",
            ),
        ] {
            let err = parse(&with(hook), &env).unwrap_err().to_string();
            assert!(err.contains(key), "{hook}: {err}");
            assert!(!err.contains("plain-secret-value") && !err.contains(good), "{err}");
        }
        let ops = format!("{MINIMAL}\n[notifier]\ngive_up_after_ms = 0\n");
        let err = parse(&ops, &env).unwrap_err().to_string();
        assert!(err.contains("notifier.give_up_after_ms"), "{err}");
    }

    #[test]
    fn grpc_settings_are_checked_naming_the_key() {
        let env = [
            ("SF_ID", "x"),
            ("SF_SECRET", "y"),
            ("A", "admin"),
            ("T", "tenant"),
            ("SAME", "admin"),
        ];
        let with = |grpc: &str| format!("{MINIMAL}\n[grpc]\n{grpc}\n");
        assert!(parse(&with("addr = \"127.0.0.1:0\"\nadmin_token = \"${A}\""), &env).is_ok());
        for (grpc, key) in [
            ("addr = \"localhost:notaport\"\nadmin_token = \"${A}\"", "grpc.addr"),
            ("addr = \"127.0.0.1:0\"", "grpc"),
            (
                "addr = \"127.0.0.1:0\"\n[grpc.tenant_tokens]\nglobex = \"${T}\"",
                "grpc.tenant_tokens.globex",
            ),
            (
                "addr = \"127.0.0.1:0\"\nadmin_token = \"${A}\"\n[grpc.tenant_tokens]\nacme = \"${SAME}\"",
                "grpc.tenant_tokens",
            ),
            ("addr = \"127.0.0.1:0\"\nadmin_token = \"${NOPE}\"", "grpc.admin_token"),
            ("addr = \"127.0.0.1:0\"\nadmin_token = \"${A}\"\ntls_cert_path = \"Cargo.toml\"", "grpc.tls_cert_path"),
            (
                "addr = \"127.0.0.1:0\"\nadmin_token = \"${A}\"\ntls_cert_path = \"Cargo.toml\"\ntls_key_path = \"/no/such/key.pem\"",
                "grpc.tls_key_path",
            ),
        ] {
            let err = parse(&with(grpc), &env).unwrap_err().to_string();
            assert!(err.contains(key), "{grpc}: {err}");
            assert!(
                !err.contains("admin") || err.contains("admin_token"),
                "no token in {err}"
            );
        }
    }

    #[test]
    fn unknown_key_is_rejected() {
        let text = MINIMAL.replace("group_id = \"g\"", "group_id = \"g\"\ngroup_idd = \"h\"");
        let err = parse(&text, &[]).unwrap_err().to_string();
        assert!(err.contains("group_idd"), "{err}");
    }

    #[test]
    fn login_host_is_rejected_for_client_credentials() {
        let text = MINIMAL.replace("https://acme.my.salesforce.com", "https://login.salesforce.com");
        let err = parse(&text, &[("SF_ID", "x"), ("SF_SECRET", "y")])
            .unwrap_err()
            .to_string();
        assert!(err.contains("tenants[0].salesforce.base_url"), "{err}");
    }
}

#[cfg(test)]
mod crm_section_tests {
    use super::*;

    fn tenant(crm_section: &str, entity: &str) -> String {
        format!(
            r#"
            [kafka]
            bootstrap_servers = "localhost:9092"
            group_id = "g"
            input_topics = ["in"]
            dlq_topic = "dlq"
            failures_topic = "failures"
            state_topic = "state"

            [[tenants]]
            name = "t"
            {crm_section}
            [tenants.entities.contact]
            {entity}
            fields = {{ name = "last_name" }}
            "#
        )
    }

    fn err(text: &str) -> String {
        Config::from_toml_with_env(text, |v| Some(format!("v-{v}")))
            .unwrap_err()
            .to_string()
    }

    const USERS: &str = "object = \"users\"\nexternal_id_field = \"external_id\"";

    #[test]
    fn zendesk_needs_exactly_one_form_of_credentials() {
        let both = tenant(
            "crm = \"zendesk\"\n[tenants.zendesk]\nbase_url = \"https://a.zendesk.com\"\nemail = \"a@b.c\"\napi_token = \"${T}\"\noauth_access_token = \"${O}\"",
            USERS,
        );
        assert!(
            err(&both).contains("`tenants[0].zendesk`: set exactly one of"),
            "{}",
            err(&both)
        );
        let no_email = tenant(
            "crm = \"zendesk\"\n[tenants.zendesk]\nbase_url = \"https://a.zendesk.com\"\napi_token = \"${T}\"",
            USERS,
        );
        assert!(
            err(&no_email).contains("tenants[0].zendesk.email"),
            "{}",
            err(&no_email)
        );
        let ok = tenant(
            "crm = \"zendesk\"\n[tenants.zendesk]\nbase_url = \"https://a.zendesk.com\"\nemail = \"a@b.c\"\napi_token = \"${T}\"",
            USERS,
        );
        let c = Config::from_toml_with_env(&ok, |v| Some(format!("v-{v}"))).unwrap();
        assert_eq!(
            c.tenants[0]
                .zendesk
                .as_ref()
                .unwrap()
                .api_token
                .as_ref()
                .unwrap()
                .expose(),
            "v-T"
        );
    }

    #[test]
    fn zendesk_objects_and_match_field_are_checked() {
        let text = tenant(
            "crm = \"zendesk\"\n[tenants.zendesk]\nbase_url = \"https://a.zendesk.com\"\noauth_access_token = \"${O}\"",
            "object = \"contacts\"\nexternal_id_field = \"external_id\"",
        );
        assert!(
            err(&text).contains("tenants[0].entities.contact.object"),
            "{}",
            err(&text)
        );
    }

    #[test]
    fn dynamics_section_is_required_and_checked() {
        let missing = tenant("crm = \"dynamics\"", "object = \"contacts\"\nexternal_id_field = \"k\"");
        assert!(err(&missing).contains("`tenants[0].dynamics`"), "{}", err(&missing));
        let bad_url = tenant(
            "crm = \"dynamics\"\n[tenants.dynamics]\norg_url = \"acme.crm.dynamics.com\"\ndirectory_id = \"d\"\nclient_id = \"${I}\"\nclient_secret = \"${S}\"",
            "object = \"contacts\"\nexternal_id_field = \"k\"",
        );
        assert!(
            err(&bad_url).contains("tenants[0].dynamics.org_url"),
            "{}",
            err(&bad_url)
        );
        let other_section = tenant(
            "crm = \"salesforce\"\n[tenants.dynamics]\norg_url = \"https://a.crm.dynamics.com\"\ndirectory_id = \"d\"\nclient_id = \"${I}\"\nclient_secret = \"${S}\"",
            "object = \"Contact\"\nexternal_id_field = \"k\"",
        );
        assert!(
            err(&other_section).contains("`tenants[0].dynamics`: is only used when crm = \"dynamics\""),
            "{}",
            err(&other_section)
        );
    }
}

#[cfg(test)]
mod reference_tests {
    use super::*;

    #[test]
    fn the_commented_reference_config_parses() {
        let text = include_str!("../config/crm-sync.toml");
        let env = |v: &str| match v.ends_with("WEBHOOK_SECRET") {
            true => Some("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".to_string()),
            false => Some(format!("value-of-{v}")),
        };
        let c = Config::from_toml_with_env(text, env).unwrap();
        assert_eq!(c.tenants[0].entities.len(), 2);
        assert_eq!(c.tenants[0].webhooks.len(), 1);
        assert_eq!(c.notifier.endpoints.len(), 1);
        assert_eq!(c.grpc.as_ref().map(|g| g.tenant_tokens.len()), Some(1));
        assert_eq!(c.kafka.client["sasl.password"].expose(), "value-of-KAFKA_SASL_PASSWORD");
    }

    #[test]
    fn the_local_sandbox_config_parses() {
        let c = Config::from_toml_with_env(include_str!("../config/local.toml"), |v| Some(v.to_string())).unwrap();
        assert!(!c.kafka.create_topics);
    }

    #[test]
    fn the_demo_config_parses() {
        let c = Config::from_toml_with_env(include_str!("../config/demo.toml"), |v| match v {
            "DEMO_WEBHOOK_SECRET" => Some("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw".into()),
            _ => Some(v.to_string()),
        })
        .unwrap();
        assert_eq!(c.tenants.len(), 3);
        assert!(c.tenants.iter().all(|t| t.webhooks.len() == 1));
    }
}
