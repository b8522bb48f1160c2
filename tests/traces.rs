//! Traces over OTLP: `crm-sync run` with `service.otlp_endpoint` sends its spans to an
//! OTLP/HTTP receiver in this test: an intake batch, each CRM call with its HTTP requests
//! inside, each retry, with tenant, CRM, status and attempt as attributes.

mod common;

use std::collections::HashMap;
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use crm_sync::sandbox::salesforce::Faults;
use serde_json::Value;

const BIN: &str = env!("CARGO_BIN_EXE_crm-sync");

/// One span as the receiver got it.
#[derive(Debug, Clone)]
struct Span {
    name: String,
    id: String,
    parent: String,
    attributes: HashMap<String, Value>,
}

/// An OTLP/HTTP receiver (JSON encoding) on a free port, keeping every request body it
/// is sent (decoded by the test, so that a bad body fails the test, not the server).
fn receiver() -> (u16, Arc<Mutex<Vec<axum::body::Bytes>>>) {
    let spans = Arc::new(Mutex::new(Vec::new()));
    let sink = spans.clone();
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
                    let sink = sink.clone();
                    async move {
                        sink.lock().unwrap().push(body);
                        axum::Json(serde_json::json!({}))
                    }
                }),
            );
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap().port()).unwrap();
            axum::serve(listener, app).await.unwrap();
        });
    });
    (rx.recv().unwrap(), spans)
}

/// The spans of an `ExportTraceServiceRequest` in its JSON encoding.
fn spans_of(request: &Value) -> Vec<Span> {
    let mut out = Vec::new();
    for resource in request["resourceSpans"].as_array().into_iter().flatten() {
        assert_eq!(service_name(&resource["resource"]), Some("crm-sync"));
        for scope in resource["scopeSpans"].as_array().into_iter().flatten() {
            for span in scope["spans"].as_array().into_iter().flatten() {
                let attributes = span["attributes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|kv| {
                        let value = kv["value"].as_object().and_then(|v| v.values().next().cloned());
                        (kv["key"].as_str().unwrap().to_string(), value.unwrap_or(Value::Null))
                    })
                    .collect();
                out.push(Span {
                    name: span["name"].as_str().unwrap_or_default().to_string(),
                    id: span["spanId"].as_str().unwrap_or_default().to_string(),
                    parent: span["parentSpanId"].as_str().unwrap_or_default().to_string(),
                    attributes,
                });
            }
        }
    }
    out
}

fn service_name(resource: &Value) -> Option<&str> {
    resource["attributes"]
        .as_array()?
        .iter()
        .find(|kv| kv["key"] == "service.name")?["value"]["stringValue"]
        .as_str()
}

/// An attribute as a number, whichever way the JSON encodes 64-bit integers.
fn number(v: &Value) -> Option<i64> {
    v.as_i64().or_else(|| v.as_str()?.parse().ok())
}

#[test]
fn spans_of_intake_crm_calls_and_retries_reach_the_otlp_endpoint() {
    let env = Env::new(1);
    let (port, bodies) = receiver();
    env.sf.set_faults(Faults {
        lock_error_rate: 0.3,
        seed: 7,
        ..Default::default()
    });
    let events: Vec<_> = (0..20)
        .map(|i| upsert(&format!("e-{i}"), &format!("T-{i}"), 1, "Ada", &format!("Trace{i}")))
        .collect();
    env.produce(&events);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("crm-sync.toml");
    // Enough attempts that no record is dead-lettered by row locks (0.3^20).
    let text = env
        .config_toml()
        .replace(
            "shutdown_deadline_ms = 8000",
            &format!("shutdown_deadline_ms = 8000\notlp_endpoint = \"http://127.0.0.1:{port}\""),
        )
        .replace("max_attempts = 6", "max_attempts = 20");
    std::fs::write(&path, text).unwrap();
    let mut service = Command::new(BIN)
        .args(["run", "--config", path.to_str().unwrap()])
        .env("SF_SECRET", CLIENT_SECRET)
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let delivered = wait_until(Duration::from_secs(60), || {
        (0..20).all(|i| env.contact(&format!("T-{i}")).is_some())
    });
    assert!(Command::new("kill")
        .args(["-TERM", &service.id().to_string()])
        .status()
        .unwrap()
        .success());
    let status = service.wait().unwrap();
    assert!(delivered, "not every event was delivered");
    assert!(status.success(), "{status:?}");
    // The exporter is flushed before the process exits.
    let spans: Vec<Span> = bodies
        .lock()
        .unwrap()
        .iter()
        .flat_map(|body| spans_of(&serde_json::from_slice(body).expect("an OTLP JSON body")))
        .collect();
    let named = |name: &str| spans.iter().filter(|s| s.name == name).cloned().collect::<Vec<_>>();

    let intake = named("intake");
    assert!(!intake.is_empty(), "no intake span among {} spans", spans.len());
    assert!(intake.iter().all(|s| s.attributes["topic"] == env.topic.as_str()));
    let read: i64 = intake.iter().filter_map(|s| number(&s.attributes["messages"])).sum();
    assert!(read >= 20, "intake spans count {read} messages");

    let writes = named("crm.write");
    assert!(!writes.is_empty());
    for w in &writes {
        assert_eq!(w.attributes["tenant"], "acme");
        assert_eq!(w.attributes["crm"], "salesforce");
        assert!(
            ["ok", "partial", "failed"].contains(&w.attributes["status"].as_str().unwrap()),
            "{w:?}"
        );
        assert!(number(&w.attributes["attempt"]).is_some_and(|a| a >= 1), "{w:?}");
    }
    assert!(
        writes.iter().any(|w| number(&w.attributes["attempt"]) > Some(1)),
        "no write was a second attempt"
    );

    let calls = named("crm.http");
    let write_ids: Vec<&str> = writes.iter().map(|w| w.id.as_str()).collect();
    let data_calls: Vec<&Span> = calls
        .iter()
        .filter(|c| write_ids.contains(&c.parent.as_str()))
        .collect();
    assert!(!data_calls.is_empty(), "no crm.http span inside a crm.write");
    assert!(data_calls
        .iter()
        .all(|c| number(&c.attributes["http.status_code"]).is_some_and(|s| (100..600).contains(&s))));

    let retries = named("retry");
    assert!(!retries.is_empty(), "no retry span, with 30% row locks");
    for r in &retries {
        assert_eq!(r.attributes["tenant"], "acme");
        assert!(number(&r.attributes["attempt"]).is_some_and(|a| a >= 1), "{r:?}");
        assert!(!r.attributes["code"].as_str().unwrap_or_default().is_empty(), "{r:?}");
    }
}
