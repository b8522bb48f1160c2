//! `traces`: the pipeline with OTLP traces off and on, in one run. The spans go to an
//! OTLP/HTTP receiver in this process that reads each request and answers 200 (it does
//! not decode them: its CPU counts in the pipeline's, so it does as little as a
//! collector's network stack would here). Traces are switched on and off between runs by
//! a filter in front of the layer `crm-sync run` installs (`crm_sync::traces`).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use crm_sync::config::ServiceConfig;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::Layer;

/// Whether spans go to the exporter now.
pub static ON: AtomicBool = AtomicBool::new(false);

/// What the receiver got.
#[derive(Default)]
pub struct Received {
    pub requests: AtomicU64,
    pub bytes: AtomicU64,
}

/// Installs the logging of the load test and, behind [`ON`], the OTLP layer of
/// `crm-sync run` sending to a receiver started here; the exporter, to flush at the end.
pub fn install(logs: tracing_subscriber::EnvFilter) -> (crm_sync::traces::Traces, Arc<Received>) {
    let received = Arc::new(Received::default());
    let counts = received.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let app = axum::Router::new().route(
                "/v1/traces",
                axum::routing::post(move |body: axum::body::Bytes| {
                    counts.requests.fetch_add(1, Ordering::Relaxed);
                    counts.bytes.fetch_add(body.len() as u64, Ordering::Relaxed);
                    async { "{}" }
                }),
            );
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap().port()).unwrap();
            axum::serve(listener, app).await.unwrap();
        });
    });
    let port = rx.recv().expect("the receiver starts");
    let service = ServiceConfig {
        otlp_endpoint: Some(format!("http://127.0.0.1:{port}")),
        ..ServiceConfig::default()
    };
    let (spans, exporter) = crm_sync::traces::layer(&service)
        .expect("the OTLP exporter")
        .expect("an endpoint is set");
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .with_filter(logs);
    // Asked at every span (a plain filter_fn's answer is cached per call site at its
    // first use, in the warm-up run, with traces off).
    let gate = tracing_subscriber::filter::dynamic_filter_fn(|_, _| ON.load(Ordering::Relaxed));
    tracing_subscriber::registry()
        .with(fmt)
        .with(spans.with_filter(gate))
        .init();
    (exporter, received)
}
