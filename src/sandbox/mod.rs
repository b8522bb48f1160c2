//! Sandboxes: local stand-ins for the systems crm-sync talks to, for the demo, the tests,
//! the load tests and users' staging.
//!
//! - [`kafka`]: librdkafka's mock cluster (a real Kafka-protocol broker, in memory).
//! - [`salesforce`], [`zendesk`], [`dynamics`]: HTTP servers implementing the API subset
//!   each connector uses, written from the API documentation (`docs/crm-apis.md`), with
//!   injectable faults. They share no types with the connectors, so a connector cannot
//!   lean on a simulator's internals.
//! - [`common`]: serving, faults and statistics the CRM sandboxes share, and
//!   [`CrmSandbox`], one view of any of them.

pub mod common;
pub mod dynamics;
pub mod kafka;
pub mod salesforce;
pub mod zendesk;

pub use common::CrmSandbox;
