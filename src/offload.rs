//! Work kept off the actor thread: CRM HTTP calls (TLS, serialisation, parsing) and
//! state-topic writes run on one shared multi-threaded I/O runtime, and the actor only
//! awaits their results.
//!
//! All actors share one arbiter thread (their messages to each other cost a queue push,
//! not a thread wake-up), so whatever runs there is paid for by every tenant; measured,
//! the state writes of a batch alone took a quarter of that thread (load-tests/README.md).

use futures::future::BoxFuture;

/// Runs `work` on the I/O runtime and returns a future of its result. `Err` is the
/// reason the task died before finishing (the runtime shutting down). If the runtime
/// could not be started, `work` runs in the caller's task instead.
pub fn spawn<T: Send + 'static>(
    work: impl std::future::Future<Output = T> + Send + 'static,
) -> BoxFuture<'static, Result<T, String>> {
    static IO: std::sync::OnceLock<Option<tokio::runtime::Runtime>> = std::sync::OnceLock::new();
    let runtime = IO.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("crm-sync-io")
            .enable_all()
            .build()
            .map_err(|e| tracing::error!(error = %e, "Could not start the I/O runtime; running on the actor thread."))
            .ok()
    });
    match runtime {
        Some(rt) => {
            let handle = rt.spawn(work);
            Box::pin(async move { handle.await.map_err(|e| e.to_string()) })
        }
        None => Box::pin(async move { Ok(work.await) }),
    }
}
