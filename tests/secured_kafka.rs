//! Secured Kafka: the service's librdkafka is built with TLS (vendored OpenSSL), the SASL
//! mechanisms managed Kafkas use (PLAIN, SCRAM-SHA-256/512, OAUTHBEARER) and zstd and lz4
//! compression. No Kafka broker can run here, so the listener is a proxy in front of the
//! mock cluster (`tests/support/kafka_secure_proxy.py`): TLS by Python's ssl module with a
//! certificate from a test CA, SASL answered by the proxy (SCRAM by PyPI's `scramp`), and
//! the broker told to advertise the proxy's address, so that every connection of every
//! client goes through TLS and SASL.

mod common;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use crm_sync::config::Config;
use crm_sync::consume::StopMode;
use crm_sync::pipeline;
use crm_sync::sandbox::CrmSandbox;
use rdkafka::producer::{FutureProducer, FutureRecord, Producer};
use rdkafka::ClientConfig;

const WAIT: Duration = Duration::from_secs(60);
/// How long a refused client is given to get an answer anyway.
const REFUSED: Duration = Duration::from_secs(3);

/// The proxy, and what it has said (one line per connection outcome).
struct Proxy {
    child: Child,
    port: u16,
    said: Arc<Mutex<Vec<String>>>,
}

impl Proxy {
    fn start(upstream: &str, tls: (&str, &str), mechanism: &str, username: &str, password: &str) -> Proxy {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/kafka_secure_proxy.py");
        let mut child = Command::new("python3")
            .arg(script)
            .args(["--upstream", upstream, "--tls-cert", tls.0, "--tls-key", tls.1])
            .args(["--mechanism", mechanism, "--username", username, "--password", password])
            .env("PYTHONPATH", webhooks::python_path())
            .stdout(Stdio::piped())
            .spawn()
            .expect("python3 runs");
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let first = lines.next().expect("the proxy says where it listens").unwrap();
        let port = first
            .strip_prefix("LISTENING ")
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("unexpected first line from the proxy: {first}"));
        let said = Arc::new(Mutex::new(Vec::new()));
        let sink = said.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                sink.lock().unwrap().push(line);
            }
        });
        Proxy { child, port, said }
    }

    fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    fn said(&self, prefix: &str) -> usize {
        self.said
            .lock()
            .unwrap()
            .iter()
            .filter(|l| l.starts_with(prefix))
            .count()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// librdkafka settings of a client of the secured listener.
fn secured(proxy: &Proxy, ca: &str, mechanism: &str, password: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", proxy.addr())
        .set("security.protocol", "SASL_SSL")
        .set("ssl.ca.location", ca)
        .set("sasl.mechanisms", mechanism);
    if mechanism == "OAUTHBEARER" {
        c.set("enable.sasl.oauthbearer.unsecure.jwt", "true")
            .set("sasl.oauthbearer.config", "principal=crm-sync");
    } else {
        c.set("sasl.username", "crm-sync").set("sasl.password", password);
    }
    c
}

/// The number of topics the listener's broker reports, or why there is no answer within
/// `within`.
fn metadata(config: &ClientConfig, within: Duration) -> Result<usize, String> {
    let producer: FutureProducer = config.create().map_err(|e| e.to_string())?;
    producer
        .client()
        .fetch_metadata(None, within)
        .map(|m| m.topics().len())
        .map_err(|e| e.to_string())
}

/// `crm-sync run`'s pipeline on SASL_SSL with SCRAM-SHA-512, its password read from a
/// file (`${file:…}`), fed by a producer that compresses with zstd and lz4: every event is
/// delivered, and the listener saw only authenticated connections.
#[test]
fn the_service_runs_on_tls_and_scram_with_compressed_input() {
    let env = Env::new(2);
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = test_ca(dir.path());
    let password = format!("scram-{}", rand::random::<u64>());
    let proxy = Proxy::start(&env.bootstrap, (&cert, &key), "SCRAM-SHA-512", "crm-sync", &password);
    env.kafka.as_ref().unwrap().advertise(1, "127.0.0.1", proxy.port);

    // Input through the secured listener, half zstd and half lz4.
    let events: Vec<(String, Vec<u8>)> = (0..20)
        .map(|i| upsert(&format!("e-{i}"), &format!("S-{i}"), 1, "Ada", &format!("Secure{i}")))
        .collect();
    for (codec, half) in [("zstd", &events[..10]), ("lz4", &events[10..])] {
        let producer: FutureProducer = secured(&proxy, &ca, "SCRAM-SHA-512", &password)
            .set("compression.type", codec)
            .create()
            .unwrap_or_else(|e| panic!("a {codec} producer on SASL_SSL: {e}"));
        block(async {
            for (k, v) in half {
                producer
                    .send(FutureRecord::to(&env.topic).key(k).payload(v), Duration::from_secs(30))
                    .await
                    .unwrap_or_else(|(e, _)| panic!("produce over SASL_SSL with {codec}: {e}"));
            }
        });
    }

    let password_file = dir.path().join("kafka-password");
    std::fs::write(&password_file, format!("{password}\n")).unwrap();
    let text = env.config_toml().replace(&env.bootstrap, &proxy.addr()).replace(
        "\n[retry]",
        &format!(
            r#"
[kafka.client]
"security.protocol" = "SASL_SSL"
"sasl.mechanisms" = "SCRAM-SHA-512"
"sasl.username" = "crm-sync"
"sasl.password" = "${{file:{}}}"
"ssl.ca.location" = "{ca}"
"compression.type" = "zstd"

[retry]"#,
            password_file.display()
        ),
    );
    let secret = env.sf.secret();
    let config = Config::from_toml_with_env(&text, |v| (v == "SF_SECRET").then(|| secret.clone())).unwrap();
    let producers_authenticated = proxy.said("AUTH OK");
    let service = pipeline::start(config).expect("the service starts on SASL_SSL");
    let delivered = wait_until(WAIT, || (0..20).all(|i| env.contact(&format!("S-{i}")).is_some()));
    service.stop(StopMode::Graceful);
    assert!(delivered, "every event read over SASL_SSL is delivered");
    assert_eq!(env.contact("S-7").unwrap()["LastName"], "Secure7");
    // The service's own clients (consumer, producer, admin) authenticated, beside the
    // test's producers.
    assert!(
        proxy.said("AUTH OK SCRAM-SHA-512 crm-sync") >= producers_authenticated + 2,
        "{:?}",
        proxy.said
    );
    assert_eq!(proxy.said("AUTH FAILED"), 0, "{:?}", proxy.said);
}

/// Each mechanism a managed Kafka offers authenticates over TLS, and a wrong password or
/// a client without TLS is refused (so the listener checks what it is given).
#[test]
fn every_sasl_mechanism_authenticates_over_tls_and_a_wrong_password_is_refused() {
    let env = Env::new(1);
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = test_ca(dir.path());
    for mechanism in ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512", "OAUTHBEARER"] {
        let proxy = Proxy::start(&env.bootstrap, (&cert, &key), mechanism, "crm-sync", "right");
        env.kafka.as_ref().unwrap().advertise(1, "127.0.0.1", proxy.port);
        let topics = metadata(&secured(&proxy, &ca, mechanism, "right"), WAIT);
        assert!(topics.is_ok_and(|n| n >= 1), "{mechanism}: {:?}", proxy.said);
        assert!(
            proxy.said(&format!("AUTH OK {mechanism}")) >= 1,
            "{mechanism}: {:?}",
            proxy.said
        );
        if mechanism != "OAUTHBEARER" {
            let refused = metadata(&secured(&proxy, &ca, mechanism, "wrong"), REFUSED);
            assert!(refused.is_err(), "{mechanism} with a wrong password: {refused:?}");
            assert!(
                wait_until(WAIT, || proxy.said("AUTH FAILED") >= 1),
                "{mechanism}: {:?}",
                proxy.said
            );
        }
        let mut plaintext = secured(&proxy, &ca, mechanism, "right");
        plaintext.set("security.protocol", "SASL_PLAINTEXT");
        assert!(metadata(&plaintext, REFUSED).is_err(), "{mechanism} without TLS");
    }
}

/// The reference configuration (`config/crm-sync.toml`: SASL_SSL, SCRAM-SHA-512, its
/// topics, three tenants, the notifier and gRPC) starts with `crm-sync run` against the
/// secured listener and becomes ready; the brokers' certificates are checked against the
/// bundle `SSL_CERT_FILE` names, as in the container image.
#[test]
fn the_reference_configuration_runs_on_the_secured_listener() {
    let kafka = crm_sync::sandbox::kafka::KafkaSandbox::start(1).unwrap();
    let bootstrap = kafka.bootstrap_servers();
    for (topic, partitions) in [
        ("crm-events", 3),
        ("crm-sync.dlq", 1),
        ("crm-sync.failures", 1),
        ("crm-sync.state", 3),
        ("crm-sync.retry", 3),
        ("crm-sync.status", 1),
        ("crm-sync.audit", 1),
        ("crm-sync.pauses", 1),
        ("crm-sync.notifications.dlq", 1),
    ] {
        kafka.create_topic(topic, partitions).unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = test_ca(dir.path());
    let password = format!("scram-{}", rand::random::<u64>());
    let proxy = Proxy::start(&bootstrap, (&cert, &key), "SCRAM-SHA-512", "crm-sync", &password);
    kafka.advertise(1, "127.0.0.1", proxy.port);

    let reference = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config/crm-sync.toml")).unwrap();
    let text = reference
        .replace("kafka-1.internal:9092,kafka-2.internal:9092", &proxy.addr())
        .replace("http_addr = \"127.0.0.1:9464\"", "http_addr = \"127.0.0.1:0\"")
        .replace("addr = \"0.0.0.0:50051\"", "addr = \"127.0.0.1:0\"");
    assert_ne!(text, reference);
    let path = dir.path().join("crm-sync.toml");
    std::fs::write(&path, text).unwrap();
    let log = dir.path().join("crm-sync.log");
    let mut service = Command::new(env!("CARGO_BIN_EXE_crm-sync"))
        .args(["run", "--config", path.to_str().unwrap()])
        .envs(REFERENCE_SECRETS)
        .envs([
            ("KAFKA_SASL_PASSWORD", password.as_str()),
            ("SSL_CERT_FILE", ca.as_str()),
            ("RUST_LOG", "info"),
        ])
        .env_remove("SSL_CERT_DIR")
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // The HTTP address it chose, from its (JSON) log line "crm-sync running.".
    let http = || {
        std::fs::read_to_string(&log)
            .unwrap_or_default()
            .lines()
            .find_map(|line| {
                let v: serde_json::Value = serde_json::from_str(line).ok()?;
                (v["message"] == "crm-sync running.").then(|| v["http"].as_str().map(str::to_string))?
            })
    };
    assert!(
        wait_until(WAIT, || http().is_some()),
        "did not start:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let ready = format!("http://{}/health/ready", http().unwrap());
    let became_ready = wait_until(WAIT, || http_get(ready.clone()).0 == 200);
    let _ = Command::new("kill").args(["-TERM", &service.id().to_string()]).status();
    let status = service.wait().unwrap();
    assert!(
        became_ready,
        "not ready on the secured listener: {:?}\n{}",
        proxy.said,
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(status.success(), "{status:?}");
    assert!(proxy.said("AUTH OK SCRAM-SHA-512 crm-sync") >= 2, "{:?}", proxy.said);
    assert_eq!(proxy.said("AUTH FAILED"), 0, "{:?}", proxy.said);
}
