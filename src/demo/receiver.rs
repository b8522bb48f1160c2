//! The demo's webhook receiver: what a tenant runs to hear from crm-sync. It checks each
//! request's Standard Webhooks signature (`notifier::signing::verify`, five minutes of
//! tolerance), answers 401 to one that does not verify and 204 to one that does, and
//! prints each verified notification as it arrives.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use serde_json::Value;

use crate::notifier::signing::{verify, SigningKey};

/// What the receiver got.
#[derive(Debug, Default, Clone)]
pub struct Received {
    pub verified: Vec<Value>,
    pub rejected: usize,
}

#[derive(Clone)]
struct Shared {
    key: SigningKey,
    received: Arc<Mutex<Received>>,
    print: bool,
}

/// A running receiver; it stops with the process.
pub struct Receiver {
    pub addr: SocketAddr,
    received: Arc<Mutex<Received>>,
}

impl Receiver {
    /// Starts a receiver that accepts what `secret` (`whsec_…`) signed; `print` prints
    /// each request's outcome.
    pub fn start(secret: &str, print: bool) -> std::io::Result<Receiver> {
        let key =
            SigningKey::parse(secret).map_err(|why| std::io::Error::new(std::io::ErrorKind::InvalidInput, why))?;
        let received = Arc::new(Mutex::new(Received::default()));
        let shared = Shared {
            key,
            received: received.clone(),
            print,
        };
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        std::thread::Builder::new()
            .name("demo-webhook-receiver".into())
            .spawn(move || {
                let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
                    return;
                };
                runtime.block_on(async move {
                    let Ok(listener) = tokio::net::TcpListener::from_std(listener) else {
                        return;
                    };
                    let app = Router::new().route("/hooks/{tenant}", post(receive)).with_state(shared);
                    let _ = axum::serve(listener, app).await;
                });
            })?;
        Ok(Receiver { addr, received })
    }

    /// Notifications verified so far.
    pub fn verified_count(&self) -> usize {
        self.received.lock().map(|r| r.verified.len()).unwrap_or_default()
    }

    pub fn received(&self) -> Received {
        self.received.lock().map(|r| r.clone()).unwrap_or_default()
    }
}

async fn receive(State(shared): State<Shared>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default();
    let now = chrono::Utc::now().timestamp();
    let checked = verify(
        std::slice::from_ref(&shared.key),
        header("webhook-id"),
        header("webhook-timestamp"),
        header("webhook-signature"),
        &body,
        now,
        300,
    );
    let mut received = match shared.received.lock() {
        Ok(r) => r,
        Err(poisoned) => poisoned.into_inner(),
    };
    match (checked, serde_json::from_slice::<Value>(&body)) {
        (Ok(()), Ok(notification)) => {
            if shared.print {
                println!("  webhook ✓ {}", describe(&notification));
            }
            received.verified.push(notification);
            StatusCode::NO_CONTENT
        }
        (Err(why), _) => {
            if shared.print {
                println!("  webhook ✗ rejected: {why}");
            }
            received.rejected += 1;
            StatusCode::UNAUTHORIZED
        }
        (Ok(()), Err(_)) => {
            received.rejected += 1;
            StatusCode::BAD_REQUEST
        }
    }
}

/// One line for a notification.
fn describe(n: &Value) -> String {
    let d = &n["data"];
    let s = |v: &Value| v.as_str().unwrap_or("-").to_string();
    match n["type"].as_str() {
        Some("tenant.state_changed") => format!(
            "{:<8} tenant.state_changed   {} → {} ({})",
            s(&d["tenant"]),
            s(&d["from"]),
            s(&d["to"]),
            s(&d["reason"])
        ),
        Some("record.dead_lettered") => format!(
            "{:<8} record.dead_lettered   {}/{} v{} {}",
            s(&d["tenant"]),
            s(&d["entity"]),
            s(&d["key"]),
            d["version"],
            s(&d["error_code"])
        ),
        Some("records.dead_lettered") => format!(
            "{:<8} records.dead_lettered  {} × {} (summary, {} samples)",
            s(&d["tenant"]),
            d["count"],
            s(&d["error_code"]),
            d["samples"].as_array().map_or(0, Vec::len)
        ),
        Some("tenant.dlq_rate_exceeded") => format!(
            "{:<8} tenant.dlq_rate_exceeded {} in a minute",
            s(&d["tenant"]),
            d["dead_lettered_last_minute"]
        ),
        other => format!("{other:?}"),
    }
}
