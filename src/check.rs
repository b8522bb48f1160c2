//! `crm-sync check-config`: everything a start would refuse, found without starting, and
//! all of it at once.

use std::path::Path;

use rdkafka::config::ClientConfig;
use rdkafka::consumer::BaseConsumer;
use rdkafka::error::KafkaError;
use rdkafka::producer::BaseProducer;

use crate::config::{self, Config, ConfigError};
use crate::consume;

/// What a check found.
#[derive(Debug, Default)]
pub struct Report {
    /// Problems that would stop a start, each naming its key.
    pub problems: Vec<String>,
    /// What would not stop a start but should be fixed (secrets written in the file).
    pub warnings: Vec<String>,
    /// Tenants and input topics, when the file parsed.
    pub summary: Option<String>,
}

/// Checks the file at `path`: its keys and types, every cross-field rule, the secret
/// references (resolved, unless `no_secrets`: then only their presence and shape), and
/// the librdkafka settings of the service's consumer and producer, by building both
/// clients (which checks every property and that this build supports the security
/// protocol, SASL mechanism and compression named) without waiting for a broker.
pub fn check(path: &Path, no_secrets: bool) -> Report {
    let mut report = Report::default();
    let mut config = match config::read(path).and_then(|text| Config::parse(&text)) {
        Ok(config) => config,
        Err(e) => {
            report.problems.push(e.to_string());
            return report;
        }
    };
    report.warnings = config
        .literal_secrets()
        .into_iter()
        .map(|key| format!("`{key}` is written in the file: reference it as ${{VAR}} or ${{file:/path}}"))
        .collect();
    let mut problems = if no_secrets {
        config.skip_secrets();
        Vec::new()
    } else {
        config.resolve_env(|var| std::env::var(var).ok())
    };
    problems.extend(config.problems());
    problems.extend(kafka_clients(&config));
    report.problems = problems.iter().flat_map(lines).collect();
    report.summary = Some(format!(
        "{} tenant(s), input topics {:?}",
        config.tenants.len(),
        config.kafka.input_topics
    ));
    report
}

/// Builds the consumer and the producer as `run` would, and drops them. Each property is
/// first set on its own, so that every value librdkafka refuses is reported, not only the
/// first; then the clients are built without the refused ones (which finds what this
/// build cannot do: a SASL mechanism without a provider, a codec, an unreadable CA file).
fn kafka_clients(config: &Config) -> Vec<ConfigError> {
    let mut consumer = consume::consumer_config(&config.kafka);
    let mut producer = consume::producer_config(&config.kafka);
    let mut problems: Vec<ConfigError> = Vec::new();
    let settings: Vec<(String, String)> = [consumer.config_map(), producer.config_map()]
        .into_iter()
        .flatten()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    for (key, value) in settings {
        let mut alone = ClientConfig::new();
        alone.set(&key, value);
        if let Err(e) = alone.create_native_config() {
            consumer.remove(&key);
            producer.remove(&key);
            let problem = kafka_problem(&e);
            if !problems.iter().any(|p| p.to_string() == problem.to_string()) {
                problems.push(problem);
            }
        }
    }
    let built = [
        consumer.create::<BaseConsumer>().map(drop),
        producer.create::<BaseProducer>().map(drop),
    ];
    for e in built.into_iter().filter_map(Result::err) {
        let problem = kafka_problem(&e);
        if !problems.iter().any(|p| p.to_string() == problem.to_string()) {
            problems.push(problem);
        }
    }
    problems
}

/// A librdkafka refusal as a problem naming the `kafka.client` key where librdkafka
/// names a property; never with the value of a secret property.
fn kafka_problem(e: &KafkaError) -> ConfigError {
    match e {
        KafkaError::ClientConfig(_, description, key, _) => {
            let reason = if config::sensitive_client_property(key) {
                "librdkafka refuses its value".to_string()
            } else {
                description.clone()
            };
            ConfigError::Invalid {
                key: format!("kafka.client.\"{key}\""),
                reason,
            }
        }
        other => ConfigError::Invalid {
            key: "kafka.client".into(),
            reason: format!("librdkafka cannot build a client: {other}"),
        },
    }
}

/// One line per problem, [`ConfigError::Several`] flattened.
fn lines(e: &ConfigError) -> Vec<String> {
    match e {
        ConfigError::Several(all) => all.iter().flat_map(lines).collect(),
        one => vec![one.to_string()],
    }
}
