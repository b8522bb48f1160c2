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
    let (refused, unchecked) = kafka_clients(&config, no_secrets);
    problems.extend(refused);
    report.warnings.extend(unchecked.into_iter().map(|key| {
        format!("`kafka.client.\"{key}\"` was not checked with its real value (a secret, or a file of the deployment)")
    }));
    report.problems = problems.iter().flat_map(lines).collect();
    report.summary = Some(format!(
        "{} tenant(s), input topics {:?}",
        config.tenants.len(),
        config.kafka.input_topics
    ));
    report
}

/// Builds the consumer and the producer as `run` would, and drops them, which finds what
/// this build cannot do (a SASL mechanism without a provider, a codec) and files that
/// cannot be read. Left out of the clients: what [`Config::problems`] already refused,
/// and, without the secrets, the references and the files of the deployment (`*.location`,
/// `*.pem`), which are named in the second list.
fn kafka_clients(config: &Config, no_secrets: bool) -> (Vec<ConfigError>, Vec<String>) {
    let mut consumer = consume::consumer_config(&config.kafka);
    let mut producer = consume::producer_config(&config.kafka);
    let mut unchecked = Vec::new();
    // Keys from `config_map`, values from `get`: the map hides the sensitive ones' values.
    let settings: Vec<(String, String)> = [&consumer, &producer]
        .into_iter()
        .flat_map(|c| {
            c.config_map()
                .into_keys()
                .filter_map(|k| c.get(k).map(|v| (k.to_string(), v.to_string())))
                .collect::<Vec<_>>()
        })
        .collect();
    for (key, value) in settings {
        let reference = value.starts_with("${") && value.ends_with('}');
        let deployment_file = no_secrets && value != "probe" && (key.ends_with(".location") || key.ends_with(".pem"));
        if reference || deployment_file {
            unchecked.push(key.clone());
        }
        // A reference left unresolved stands in as a string, where a string will do.
        let value = if reference { "unchecked".to_string() } else { value };
        let mut alone = ClientConfig::new();
        alone.set(&key, &value);
        if deployment_file || alone.create_native_config().is_err() {
            consumer.remove(&key);
            producer.remove(&key);
        } else if reference {
            for c in [&mut consumer, &mut producer] {
                if c.get(&key).is_some() {
                    c.set(&key, &value);
                }
            }
        }
    }
    unchecked.sort();
    unchecked.dedup();
    let mut problems: Vec<ConfigError> = Vec::new();
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
    (problems, unchecked)
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
