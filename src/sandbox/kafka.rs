//! A Kafka-protocol broker for the demo and tests: librdkafka's mock cluster.
//!
//! It implements produce, fetch, consumer groups and offset commits, but not the Admin
//! API, so topics are created here through the mock's own call — which is why only
//! sandbox, demo and test code may use this module. Data lives in memory, with about
//! 5 MiB retained per partition.

use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaResult;
use rdkafka::mocking::MockCluster;
use rdkafka::producer::{BaseProducer, DefaultProducerContext, Producer};

pub struct KafkaSandbox {
    /// The client that owns the mock cluster; the cluster lives as long as it does.
    owner: BaseProducer,
}

impl KafkaSandbox {
    /// Starts a mock cluster of `brokers` brokers.
    pub fn start(brokers: u32) -> KafkaResult<Self> {
        let owner: BaseProducer = ClientConfig::new()
            .set("test.mock.num.brokers", brokers.to_string())
            .create()?;
        let sandbox = KafkaSandbox { owner };
        // SAFETY: the pointer comes from a live client that owns a mock cluster (we just
        // asked for one) and stays alive as long as `self.owner`; the call only sets an
        // integer in the mock's configuration.
        unsafe {
            let cluster = rdkafka::bindings::rd_kafka_handle_mock_cluster(sandbox.owner.client().native_ptr());
            if !cluster.is_null() {
                // The mock waits 3 s before a group's first rebalance by default.
                rdkafka::bindings::rd_kafka_mock_group_initial_rebalance_delay_ms(cluster, 0);
            }
        }
        Ok(sandbox)
    }

    fn cluster(&self) -> MockCluster<'_, DefaultProducerContext> {
        self.owner
            .client()
            .mock_cluster()
            .expect("the client was created with test.mock.num.brokers, so it owns a mock cluster")
    }

    pub fn bootstrap_servers(&self) -> String {
        self.cluster().bootstrap_servers()
    }

    pub fn create_topic(&self, topic: &str, partitions: i32) -> KafkaResult<()> {
        self.cluster().create_topic(topic, partitions, 1)
    }

    /// Makes broker `id` tell clients to reach it at `host:port` (its listener stays where
    /// it is): for a proxy in front of it, such as a TLS and SASL listener in tests.
    pub fn advertise(&self, id: i32, host: &str, port: u16) {
        let host = std::ffi::CString::new(host).expect("a host name has no NUL byte");
        // SAFETY: as in `start`: the mock cluster lives as long as `self.owner`; the call
        // copies `host` under the cluster's lock.
        unsafe {
            let cluster = rdkafka::bindings::rd_kafka_handle_mock_cluster(self.owner.client().native_ptr());
            assert!(!cluster.is_null(), "the sandbox's client owns a mock cluster");
            rdkafka::bindings::rd_kafka_mock_broker_set_host_port(cluster, id, host.as_ptr(), i32::from(port));
        }
    }

    /// Makes broker `id` the leader of every partition of `topic` (fault injection: a
    /// topic on a broker of its own can be taken down alone).
    pub fn set_leader(&self, topic: &str, partitions: i32, id: i32) -> KafkaResult<()> {
        for p in 0..partitions {
            self.cluster().partition_leader(topic, p, Some(id))?;
        }
        Ok(())
    }

    /// Makes broker `id` the coordinator of consumer group `group`.
    pub fn set_group_coordinator(&self, group: &str, id: i32) -> KafkaResult<()> {
        self.cluster()
            .coordinator(rdkafka::mocking::MockCoordinator::Group(group.to_string()), id)
    }

    /// Takes broker `id` (1-based) down or brings it back (fault injection).
    pub fn set_broker_up(&self, id: i32, up: bool) -> KafkaResult<()> {
        if up {
            self.cluster().broker_up(id)
        } else {
            self.cluster().broker_down(id)
        }
    }
}

/// Client-side helpers that work against any Kafka-protocol broker (the sandbox or a real
/// cluster): producing a stream, reading a topic back, reading a group's commits.
pub mod tools {
    use std::collections::HashMap;
    use std::time::{Duration, Instant};

    use rdkafka::config::ClientConfig;
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::error::{KafkaError, KafkaResult};
    use rdkafka::message::Message;
    use rdkafka::producer::{FutureProducer, FutureRecord};
    use rdkafka::{Offset, TopicPartitionList};

    /// A message read back from a topic.
    #[derive(Debug, Clone)]
    pub struct ReadMessage {
        pub partition: i32,
        pub offset: i64,
        pub key: Option<Vec<u8>>,
        pub payload: Option<Vec<u8>>,
        /// Header names and values, read lossily as text (the last of a repeated name).
        pub headers: HashMap<String, String>,
        /// The headers as they are, in order.
        pub raw_headers: Vec<crate::headers::RawHeader>,
    }

    impl ReadMessage {
        pub fn header(&self, name: &str) -> Option<&str> {
            self.headers.get(name).map(String::as_str)
        }
    }

    /// Produces `(key, value)` messages in order, waiting for every acknowledgement.
    pub async fn produce(bootstrap: &str, topic: &str, messages: &[(String, Vec<u8>)]) -> KafkaResult<()> {
        let producer: FutureProducer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("linger.ms", "5")
            .set("acks", "all")
            .set("enable.idempotence", "false")
            .set("max.in.flight.requests.per.connection", "1")
            .create()?;
        // Sent in windows: each window in parallel, every message of it acknowledged before
        // the next, so per-key order holds (one in flight per connection).
        for chunk in messages.chunks(5_000) {
            let sends = chunk.iter().map(|(key, value)| {
                producer.send(FutureRecord::to(topic).key(key).payload(value), Duration::from_secs(30))
            });
            for result in futures::future::join_all(sends).await {
                result.map_err(|(e, _)| e)?;
            }
        }
        Ok(())
    }

    /// Offsets committed by `group` on `topic`'s partitions (`None` where none).
    pub fn committed(bootstrap: &str, group: &str, topic: &str, partitions: i32) -> KafkaResult<Vec<Option<i64>>> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", group)
            .set("enable.auto.commit", "false")
            .create()?;
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition(topic, p);
        }
        let committed = consumer.committed_offsets(tpl, Duration::from_secs(10))?;
        Ok((0..partitions)
            .map(|p| match committed.find_partition(topic, p).map(|e| e.offset()) {
                Some(Offset::Offset(o)) => Some(o),
                _ => None,
            })
            .collect())
    }

    /// High watermarks (offset after the last message) of `topic`'s partitions.
    pub fn end_offsets(bootstrap: &str, topic: &str, partitions: i32) -> KafkaResult<Vec<i64>> {
        let consumer: BaseConsumer = ClientConfig::new().set("bootstrap.servers", bootstrap).create()?;
        (0..partitions)
            .map(|p| {
                consumer
                    .fetch_watermarks(topic, p, Duration::from_secs(10))
                    .map(|(_, high)| high)
            })
            .collect()
    }

    /// Reads every message of `topic` from the beginning to the end offsets seen at start.
    pub fn read_all(bootstrap: &str, topic: &str, partitions: i32, timeout: Duration) -> KafkaResult<Vec<ReadMessage>> {
        let ends = end_offsets(bootstrap, topic, partitions)?;
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", "crm-sync-reader")
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .create()?;
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(topic, p, Offset::Beginning)?;
        }
        consumer.assign(&tpl)?;
        let wanted: i64 = ends.iter().sum();
        let mut positions = vec![0i64; partitions as usize];
        let mut out = Vec::new();
        let deadline = Instant::now() + timeout;
        while positions.iter().zip(&ends).any(|(pos, end)| pos < end) {
            if Instant::now() > deadline {
                return Err(KafkaError::MessageConsumption(
                    rdkafka::types::RDKafkaErrorCode::OperationTimedOut,
                ));
            }
            let Some(message) = consumer.poll(Duration::from_millis(200)) else {
                continue;
            };
            let m = message?;
            positions[m.partition() as usize] = m.offset() + 1;
            let raw_headers = crate::headers::read(m.headers());
            out.push(ReadMessage {
                partition: m.partition(),
                offset: m.offset(),
                key: m.key().map(<[u8]>::to_vec),
                payload: m.payload().map(<[u8]>::to_vec),
                headers: raw_headers
                    .iter()
                    .map(|(k, v)| {
                        (
                            String::from_utf8_lossy(k).into_owned(),
                            String::from_utf8_lossy(v.as_deref().unwrap_or_default()).into_owned(),
                        )
                    })
                    .collect(),
                raw_headers,
            });
        }
        debug_assert!(out.len() as i64 <= wanted);
        Ok(out)
    }
}
