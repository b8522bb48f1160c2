//! Traces over OTLP, optional (`service.otlp_endpoint`): the `tracing` spans of crm-sync
//! (target `crm_sync`, INFO and above) become OpenTelemetry spans, batched and sent to
//! the endpoint over OTLP/HTTP with JSON encoding from a thread of their own, so that a
//! slow or absent collector costs the pipeline only a bounded queue (spans past it are
//! dropped, never waited for).
//!
//! The spans, each with its attributes:
//! - `intake`: one batch of messages a partition actor reads (`topic`, `partition`,
//!   `messages`, `from_retry`);
//! - `crm.write`: one call of a tenant's batch to its CRM (`tenant`, `crm`, `records`,
//!   `attempt`: the highest attempt of its records, `status`: `ok`, `partial` or
//!   `failed`), and inside it `crm.http`, each HTTP request (`tenant`, `crm`,
//!   `http.status_code`, or `error`);
//! - `retry`: a record's write scheduled again (`tenant`, `crm`, `attempt`, `delay_ms`,
//!   `parked`: to the retry topic or in memory, `code`: the failure's error code).

use std::time::Duration;

use anyhow::Context;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::{Protocol, WithExportConfig};
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};
use opentelemetry_sdk::Resource;
use tracing::Subscriber;
use tracing_subscriber::filter::{FilterExt, LevelFilter, Targets};
use tracing_subscriber::registry::LookupSpan;
use tracing_subscriber::Layer;

use crate::config::ServiceConfig;

/// How long an export may take before it is abandoned (the flush at exit waits for at
/// most 5 s more than the service's own stop).
const EXPORT_TIMEOUT: Duration = Duration::from_secs(3);

/// The span exporter, to flush and stop at exit.
pub struct Traces {
    provider: SdkTracerProvider,
}

impl Traces {
    /// Sends what is batched now, and waits for it.
    pub fn flush(&self) {
        if let Err(e) = self.provider.force_flush() {
            eprintln!("traces: spans could not be sent: {e}");
        }
    }

    /// Sends what is still batched, and stops the exporter's thread.
    pub fn shutdown(self) {
        if let Err(e) = self.provider.shutdown() {
            eprintln!("traces: the last spans could not be sent: {e}");
        }
    }
}

/// The layer that turns crm-sync's spans into OpenTelemetry spans sent to
/// `service.otlp_endpoint`, and the exporter behind it; `None` without an endpoint.
pub fn layer<S>(service: &ServiceConfig) -> anyhow::Result<Option<(impl Layer<S>, Traces)>>
where
    S: Subscriber + for<'span> LookupSpan<'span>,
{
    let Some(endpoint) = &service.otlp_endpoint else {
        return Ok(None);
    };
    let url = format!("{}/v1/traces", endpoint.trim_end_matches('/'));
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(Protocol::HttpJson)
        .with_endpoint(&url)
        .with_timeout(EXPORT_TIMEOUT)
        .build()
        // Not the URL itself: it may carry a collector's credentials.
        .context("the OTLP exporter cannot be built")?;
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_sampler(Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(
            service.otlp_sample_ratio,
        ))))
        .with_resource(
            Resource::builder()
                .with_service_name("crm-sync")
                .with_attribute(opentelemetry::KeyValue::new(
                    "service.version",
                    env!("CARGO_PKG_VERSION"),
                ))
                .build(),
        )
        .build();
    let tracer = provider.tracer("crm-sync");
    // Spans only: the log lines inside them keep to RUST_LOG and stdout, rather than
    // becoming span events at the collector.
    let spans = Targets::new()
        .with_target("crm_sync", LevelFilter::INFO)
        .with_default(LevelFilter::OFF)
        .and(tracing_subscriber::filter::filter_fn(|meta| meta.is_span()));
    let layer = tracing_opentelemetry::layer().with_tracer(tracer).with_filter(spans);
    Ok(Some((layer, Traces { provider })))
}
