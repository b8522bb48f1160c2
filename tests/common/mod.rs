//! Shared test environment: a mock Kafka cluster and a Salesforce sandbox on ephemeral
//! ports, random topic and group names, and waits with deadlines.

#![allow(dead_code)] // each test binary uses its own subset of these helpers

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use crm_sync::config::Config;
use crm_sync::demo::workload::{envelope, kafka_key, RecordId};
use crm_sync::sandbox::kafka::tools::{self, ReadMessage};
use crm_sync::sandbox::kafka::KafkaSandbox;
use crm_sync::sandbox::salesforce::{SalesforceSandbox, SandboxOrg};
use crm_sync::sandbox::CrmSandbox;
use serde_json::{json, Map, Value};

pub mod webhooks;

pub const CLIENT_ID: &str = "test-client";
pub const CLIENT_SECRET: &str = "test-secret-do-not-log";

pub fn unique(prefix: &str) -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "{prefix}-{}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        rand::random::<u32>()
    )
}

pub struct Env {
    /// The in-process broker; `None` when the broker runs in another process.
    pub kafka: Option<KafkaSandbox>,
    pub bootstrap: String,
    pub topic: String,
    pub dlq: String,
    pub failures: String,
    pub state: String,
    /// A retry topic, created with the others; configs use it only when a test sets
    /// `kafka.retry_topic`.
    pub retry: String,
    pub group: String,
    pub partitions: i32,
    pub sf: SalesforceSandbox,
}

impl Env {
    pub fn new(partitions: i32) -> Env {
        let kafka = KafkaSandbox::start(1).expect("mock cluster");
        let bootstrap = kafka.bootstrap_servers();
        Env::with_broker(kafka, bootstrap, partitions)
    }

    pub fn with_broker(kafka: KafkaSandbox, bootstrap: String, partitions: i32) -> Env {
        let (topic, dlq, failures, state) = (unique("events"), unique("dlq"), unique("failures"), unique("state"));
        kafka.create_topic(&topic, partitions).unwrap();
        kafka.create_topic(&dlq, 1).unwrap();
        kafka.create_topic(&failures, 1).unwrap();
        kafka.create_topic(&state, partitions).unwrap();
        let env = Env::external(Some(kafka), bootstrap, [topic, dlq, failures, state], partitions);
        env.kafka
            .as_ref()
            .expect("in-process broker")
            .create_topic(&env.retry, partitions)
            .unwrap();
        env
    }

    /// An environment on a broker whose topics (input, DLQ, failures, state) exist
    /// already; the DLQ and failures topics with one partition.
    pub fn external(kafka: Option<KafkaSandbox>, bootstrap: String, topics: [String; 4], partitions: i32) -> Env {
        let [topic, dlq, failures, state] = topics;
        let sf = SalesforceSandbox::start("127.0.0.1:0", SandboxOrg::standard(CLIENT_ID, CLIENT_SECRET)).unwrap();
        Env {
            kafka,
            bootstrap,
            topic,
            dlq,
            failures,
            state,
            retry: unique("retry"),
            group: unique("group"),
            partitions,
            sf,
        }
    }

    /// Config text for this environment; the secret comes from `SF_SECRET`.
    pub fn config_toml(&self) -> String {
        self.config_toml_for(&self.sf, "SF_SECRET")
    }

    /// Config text for this environment with tenant `acme` on `crm`, whose secret comes
    /// from `secret_var`.
    pub fn config_toml_for(&self, crm: &dyn CrmSandbox, secret_var: &str) -> String {
        format!(
            r#"
[service]
http_addr = "127.0.0.1:0"
shutdown_deadline_ms = 8000

[kafka]
bootstrap_servers = "{bootstrap}"
group_id = "{group}"
input_topics = ["{topic}"]
dlq_topic = "{dlq}"
failures_topic = "{failures}"
state_topic = "{state}"
session_timeout_ms = 3000
commit_interval_ms = 200
drain_timeout_ms = 2000
max_in_flight_per_partition = 500
create_topics = false

[retry]
max_attempts = 6
base_delay_ms = 20
max_delay_ms = 200
max_age_ms = 20000

[[tenants]]
name = "acme"
rate_limit_per_sec = 5000
max_concurrency = 8
request_timeout_ms = 5000
{tenant}"#,
            bootstrap = self.bootstrap,
            group = self.group,
            topic = self.topic,
            dlq = self.dlq,
            failures = self.failures,
            state = self.state,
            tenant = crm.tenant_toml(secret_var),
        )
    }

    pub fn config(&self) -> Config {
        self.config_for(&self.sf)
    }

    /// The config with tenant `acme` on `crm`.
    pub fn config_for(&self, crm: &dyn CrmSandbox) -> Config {
        let secret = crm.secret();
        Config::from_toml_with_env(&self.config_toml_for(crm, "CRM_SECRET"), |v| {
            (v == "CRM_SECRET").then(|| secret.clone())
        })
        .expect("test config is valid")
    }

    /// Writes messages to the failures topic, as the service would.
    pub fn produce_failures(&self, messages: &[(String, Vec<u8>)]) {
        block(tools::produce(&self.bootstrap, &self.failures, messages)).expect("produce");
    }

    pub fn produce(&self, messages: &[(String, Vec<u8>)]) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(tools::produce(&self.bootstrap, &self.topic, messages))
            .expect("produce");
    }

    /// Produces `(key, value)` messages to one partition of the input topic, in order.
    pub fn produce_to(&self, partition: i32, messages: &[(String, Vec<u8>)]) {
        use rdkafka::producer::{FutureProducer, FutureRecord};
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let producer: FutureProducer = rdkafka::ClientConfig::new()
            .set("bootstrap.servers", &self.bootstrap)
            .create()
            .unwrap();
        rt.block_on(async {
            for (key, value) in messages {
                let record = FutureRecord::to(&self.topic)
                    .partition(partition)
                    .key(key)
                    .payload(value);
                producer.send(record, Duration::from_secs(30)).await.unwrap();
            }
        });
    }

    /// Whether the group has committed every message of the input topic.
    pub fn all_committed(&self) -> bool {
        let ends = tools::end_offsets(&self.bootstrap, &self.topic, self.partitions).unwrap();
        let committed =
            tools::committed(&self.bootstrap, &self.group, &self.topic, self.partitions).unwrap_or_default();
        committed.len() == ends.len()
            && committed
                .iter()
                .zip(&ends)
                .all(|(c, e)| *e == 0 || c.is_some_and(|c| c >= *e))
    }

    /// Whether the retry reader has committed every message of the retry topic. Read
    /// after the input topic's: a parked event's copy exists before its input offset is
    /// committed.
    pub fn retry_drained(&self) -> bool {
        let group = crm_sync::consume::retry_group_id(&self.group);
        let committed = tools::committed(&self.bootstrap, &group, &self.retry, self.partitions).unwrap_or_default();
        let ends = tools::end_offsets(&self.bootstrap, &self.retry, self.partitions).unwrap();
        committed.len() == ends.len()
            && committed
                .iter()
                .zip(&ends)
                .all(|(c, e)| *e == 0 || c.is_some_and(|c| c >= *e))
    }

    /// Waits until every event is done: the input topic committed, then the retry topic.
    pub fn wait_drained(&self, within: Duration) -> bool {
        wait_until(within, || self.all_committed() && self.retry_drained())
    }

    /// Waits until the group has committed every message of the input topic.
    pub fn wait_all_committed(&self, within: Duration) -> bool {
        wait_until(within, || self.all_committed())
    }

    /// Slows every CRM call down, so that a stream takes long enough to stop mid-way.
    pub fn slow_crm(&self, latency_ms: u64) {
        self.sf.set_faults(crm_sync::sandbox::salesforce::Faults {
            latency_ms,
            ..Default::default()
        });
    }

    pub fn read_dlq(&self) -> Vec<ReadMessage> {
        tools::read_all(&self.bootstrap, &self.dlq, 1, Duration::from_secs(20)).unwrap()
    }

    pub fn read_failures(&self) -> Vec<ReadMessage> {
        tools::read_all(&self.bootstrap, &self.failures, 1, Duration::from_secs(20)).unwrap()
    }

    pub fn contact(&self, key: &str) -> Option<Map<String, Value>> {
        self.sf.find("Contact", "External_Id__c", key).map(|r| r.fields)
    }

    pub fn sandboxes(&self) -> HashMap<String, &dyn CrmSandbox> {
        [("acme".to_string(), &self.sf as &dyn CrmSandbox)].into()
    }
}

/// GET a URL; status and body.
pub fn http_get(url: String) -> (u16, String) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let r = reqwest::get(url).await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    })
}

/// The service's `/metrics` exposition.
pub fn scrape(addr: std::net::SocketAddr) -> String {
    http_get(format!("http://{addr}/metrics")).1
}

/// Polls `condition` every 20 ms until it holds or `within` passes.
/// Runs a future to its end on a runtime of its own (for calls the tests make directly).
pub fn block<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

pub fn wait_until(within: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20)); // polling cadence; the deadline bounds the wait
    }
}

pub fn contact_data(first: &str, last: Option<&str>) -> Map<String, Value> {
    let mut m = Map::new();
    m.insert("first_name".into(), json!(first));
    if let Some(l) = last {
        m.insert("last_name".into(), json!(l));
    }
    m.insert("email".into(), json!(format!("{}@example.com", first.to_lowercase())));
    m
}

/// One contact event for tenant acme.
pub fn contact_event(
    event_id: &str,
    key: &str,
    op: &str,
    version: u64,
    data: Option<&Map<String, Value>>,
) -> (String, Vec<u8>) {
    let id: RecordId = ("acme".into(), "contact".into(), key.into());
    (
        kafka_key(&id.0, &id.1, &id.2),
        envelope(event_id, &id, op, version, data),
    )
}

pub fn upsert(event_id: &str, key: &str, version: u64, first: &str, last: &str) -> (String, Vec<u8>) {
    contact_event(event_id, key, "upsert", version, Some(&contact_data(first, Some(last))))
}

/// A test CA, and a server certificate for localhost and 127.0.0.1 it signed, made with
/// the openssl command line in `dir`: the paths of the CA's certificate, the server's
/// certificate and the server's key, all PEM.
pub fn test_ca(dir: &std::path::Path) -> (String, String, String) {
    let path = |name: &str| dir.join(name).display().to_string();
    let (ca, cert, key) = (path("ca.pem"), path("cert.pem"), path("key.pem"));
    std::fs::write(
        path("ext.cnf"),
        "subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n",
    )
    .unwrap();
    for args in [
        vec![
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=test-ca",
            "-keyout",
            &path("ca.key"),
            "-out",
            &ca,
        ],
        vec![
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-keyout",
            &key,
            "-out",
            &path("leaf.csr"),
        ],
        vec![
            "x509",
            "-req",
            "-in",
            &path("leaf.csr"),
            "-CA",
            &ca,
            "-CAkey",
            &path("ca.key"),
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            &path("ext.cnf"),
            "-out",
            &cert,
        ],
    ] {
        let made = std::process::Command::new("openssl")
            .args(&args)
            .output()
            .expect("openssl runs");
        assert!(made.status.success(), "{}", String::from_utf8_lossy(&made.stderr));
    }
    (ca, cert, key)
}

/// Stand-in values for the secrets `config/crm-sync.toml` references, but the Kafka
/// password (`KAFKA_SASL_PASSWORD`), which each test gives as it needs.
pub const REFERENCE_SECRETS: [(&str, &str); 9] = [
    ("ACME_SF_CLIENT_ID", "id"),
    ("ACME_SF_CLIENT_SECRET", "secret"),
    ("GLOBEX_ZD_API_TOKEN", "token"),
    ("INITECH_D365_CLIENT_ID", "id"),
    ("INITECH_D365_CLIENT_SECRET", "secret"),
    ("OPS_WEBHOOK_SECRET", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
    ("ACME_WEBHOOK_SECRET", "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"),
    ("CRM_SYNC_ADMIN_TOKEN", "admin"),
    ("ACME_GRPC_TOKEN", "acme"),
];
