//! The gRPC interface (`proto/crmsync/v1/crmsync.proto`), on `grpc.addr`: what support
//! engineers and other services ask crm-sync.
//!
//! - `StatusService`: a record's latest status and a stream of outcomes, from the status
//!   topic as this member reads it ([`view`]): every member reads the whole topic, so any
//!   member answers for any record and a watch carries what the whole group does.
//! - `TenantService`: the tenants this member serves, with their health, pace and the
//!   outcomes of their events here (`tenant::board`).
//! - `grpc.health.v1` and server reflection (`grpc.reflection.v1`).
//!
//! Every call is authenticated ([`auth`]): a tenant's token sees that tenant only
//! (another tenant's name is PERMISSION_DENIED), the admin token sees all.
//!
//! The server runs on its own thread and runtime, so that no call can slow the pipeline.

// tonic's `Status` is the error of every gRPC handler and interceptor, large as it is.
#![allow(clippy::result_large_err)]

pub mod auth;
pub mod client;
mod services;
pub mod view;

use std::net::SocketAddr;
use std::sync::Arc;

use crate::config::Config;
use crate::tenant::board::Board;
use crate::tenant::pauses::Pauses;

/// The generated messages, services and clients (generated code: not linted).
#[allow(clippy::all)]
pub mod pb {
    tonic::include_proto!("crmsync.v1");

    /// The encoded descriptors of `proto/`, for server reflection.
    pub const DESCRIPTOR: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/crmsync_descriptor.bin"));
}

/// How long calls in progress may take to finish once the server is asked to stop.
const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// A running gRPC server.
pub struct GrpcHandle {
    addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl GrpcHandle {
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops serving: open streams end, and the status view stops reading.
    pub fn stop(self) {
        let _ = self
            .stop_in_background()
            .join_within(STOP_GRACE + std::time::Duration::from_secs(3));
    }

    /// Asks the server to stop; [`Stopping::join_within`] waits for it.
    pub fn stop_in_background(mut self) -> Stopping {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        Stopping(self.thread.take())
    }
}

/// A server asked to stop.
pub struct Stopping(Option<std::thread::JoinHandle<()>>);

impl Stopping {
    /// Waits up to `deadline` for the server's thread; whether it ended.
    pub fn join_within(mut self, deadline: std::time::Duration) -> bool {
        let Some(thread) = self.0.take() else { return true };
        let until = std::time::Instant::now() + deadline;
        while !thread.is_finished() {
            if std::time::Instant::now() >= until {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(20)); // polling cadence; the deadline bounds the wait
        }
        thread.join().is_ok()
    }
}

/// Starts the server when `[grpc]` is configured.
pub fn start(config: &Config, board: Board, pauses: Pauses) -> anyhow::Result<Option<GrpcHandle>> {
    let Some(grpc) = config.grpc.clone() else {
        return Ok(None);
    };
    let listener = std::net::TcpListener::bind(&grpc.addr)
        .map_err(|e| anyhow::anyhow!("cannot listen on grpc.addr {}: {e}", grpc.addr))?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    let (shutdown_tx, shutdown_rx) = tokio::sync::oneshot::channel::<()>();
    let config = Arc::new(config.clone());
    let (started_tx, started_rx) = std::sync::mpsc::channel::<anyhow::Result<()>>();
    let thread = std::thread::Builder::new()
        .name("crm-sync-grpc".into())
        .spawn(move || {
            let runtime = match tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
            {
                Ok(r) => r,
                Err(e) => {
                    let _ = started_tx.send(Err(e.into()));
                    return;
                }
            };
            runtime.block_on(async move {
                let listener = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        let _ = started_tx.send(Err(e.into()));
                        return;
                    }
                };
                let view = view::StatusView::start(&config, grpc.status_capacity);
                let router = match services::router(&config, view.clone(), board, pauses) {
                    Ok(r) => r,
                    Err(e) => {
                        let _ = started_tx.send(Err(e));
                        return;
                    }
                };
                let _ = started_tx.send(Ok(()));
                let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
                // On stop: calls in progress get a moment to finish; open watch streams,
                // which never do, are cut after it.
                let stopping = Arc::new(tokio::sync::Notify::new());
                let signal = stopping.clone();
                let serve = router.serve_with_incoming_shutdown(incoming, async move {
                    let _ = shutdown_rx.await;
                    signal.notify_one();
                });
                let cut = async {
                    stopping.notified().await;
                    tokio::time::sleep(STOP_GRACE).await;
                };
                tokio::select! {
                    served = serve => {
                        if let Err(e) = served {
                            tracing::error!(error = %e, "The gRPC server stopped.");
                        }
                    }
                    () = cut => {}
                }
                view.stop();
            });
            // A status read still blocked on the broker is not waited for long.
            runtime.shutdown_timeout(std::time::Duration::from_secs(1));
        })?;
    started_rx
        .recv()
        .map_err(|_| anyhow::anyhow!("the gRPC thread ended before it started"))??;
    tracing::info!(grpc = %addr, "gRPC serving.");
    Ok(Some(GrpcHandle {
        addr,
        shutdown: Some(shutdown_tx),
        thread: Some(thread),
    }))
}
