//! Sandboxes: local stand-ins for the systems crm-sync talks to, for the demo, the tests,
//! the load tests and users' staging.
//!
//! - [`kafka`]: librdkafka's mock cluster (a real Kafka-protocol broker, in memory).
//! - [`salesforce`]: an HTTP server implementing the Salesforce REST subset the connector
//!   uses, written from the API documentation, with injectable faults. It shares no types
//!   with the connector, so the connector cannot lean on the simulator's internals.

pub mod kafka;
pub mod salesforce;
