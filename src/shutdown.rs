//! Shutdown: waiting for SIGTERM or SIGINT.
//!
//! What a graceful stop does (stop fetching, drain within the deadline, commit, leave the
//! group) lives in [`crate::consume`]; bounding the whole of it, including a librdkafka
//! close that hangs, lives in [`crate::pipeline::ServiceHandle::stop`].

/// Resolves when the process receives SIGTERM or SIGINT.
pub async fn signal() -> std::io::Result<&'static str> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}
