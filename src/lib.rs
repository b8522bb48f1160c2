//! crm-sync keeps CRM platforms in step with business change events that flow through
//! Apache Kafka, without losing an event, without letting an old version overwrite a new
//! one, and without spending an API call on a change the CRM already has.
//!
//! # Data flow
//!
//! The modules below are listed in the order an event travels through them.
//!
//! - [`consume`]: the Kafka consumer thread (group membership, rebalances, pause/resume,
//!   offset storing and commits) and one supervised [`consume::PartitionActor`] per
//!   assigned partition with its offset watermark ([`consume::offsets`]).
//! - [`event`]: decoding and validating the JSON envelope; a bad message becomes a
//!   [`event::DecodeError`] with a stable code that goes to the dead-letter topic.
//! - [`diff`]: the [`diff::DiffActor`] and its bounded cache of what each CRM last
//!   confirmed, which drops duplicates, unchanged payloads and stale versions.
//! - [`tenant`]: one supervised [`tenant::TenantActor`] per CRM tenant: field mapping,
//!   one write in flight per record, batching, pacing (rate and concurrency limits that
//!   follow the CRM's pressure signals), short retries in memory, parking of long ones.
//! - [`connectors`]: the CRM clients (Salesforce, Zendesk, Dynamics 365) behind one
//!   [`connectors::Connector`] trait, each with its batch call and per-record results,
//!   classifying failures by the CRM's own semantics.
//! - [`retry`]: the backoff policy, the supervised [`retry::RetryQueueActor`] that hands
//!   retryable writes back to their tenant when they are due, and the retry topic's
//!   format and co-partitioning with the input ([`retry::topic`]).
//! - [`dead_letter`]: the dead-letter and failures topics for terminal failures, and the
//!   retry topic where long retries are parked (read back by [`consume`]).
//! - [`trail`]: the status topic (each record's latest status) and the audit topic (one
//!   record per final outcome of every event), written before the outcome is reported.
//! - [`notifier`]: a consumer of the failures topic of its own that tells webhook
//!   endpoints (Standard Webhooks signatures, storms folded into summaries, retries, its
//!   own dead-letter topic); in `crm-sync run`, or alone in `crm-sync notify`.
//!
//! Partitions and tenants talk through the types in [`messages`], which both import, so
//! neither imports the other.
//!
//! Cross-cutting: [`config`] (and [`check`], which finds every problem of a
//! configuration without starting), [`traces`] (spans over OTLP), [`headers`] (Kafka
//! headers as bytes), [`telemetry`]
//! (metrics, health), [`supervise`] (turning panics into supervised restarts),
//! [`offload`] (the I/O runtime that keeps CRM calls and state writes off the actor
//! thread), [`shutdown`], [`pipeline`] (wiring it all into a running service),
//! [`sandbox`] (local stand-ins for Kafka and the CRMs) and [`demo`] (the demo, and the
//! chaos harness in [`demo::chaos`]).

pub mod check;
pub mod config;
pub mod connectors;
pub mod consume;
pub mod dead_letter;
pub mod demo;
pub mod diff;
pub mod event;
pub mod grpc;
pub mod headers;
pub mod messages;
pub mod notifier;
pub mod offload;
pub mod pipeline;
pub mod redrive;
pub mod retry;
pub mod sandbox;
pub mod shutdown;
pub mod supervise;
pub mod telemetry;
pub mod tenant;
pub mod traces;
pub mod trail;
