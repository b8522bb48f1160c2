//! The access-token cache every CRM's token source uses: one token at a time, fetched
//! when there is none or it is due for renewal, shared by all calls of a tenant, and
//! dropped when a call finds it refused (only if it is still the one that call used, so
//! that a token fetched meanwhile by another call survives).
//!
//! How a token is fetched (the CRM's identity provider, its form, its errors) stays with
//! each connector's `auth.rs`; when to fetch one lives here, and so does the one replay
//! of a request whose token the CRM refused ([`send_with_token`]).

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Mutex;

use super::http::{Answer, MAX_CRM_WAIT};
use super::DeliveryError;

/// Sends a request made with the current token (`get`); when `refused` says the answer
/// refused that token, drops it (`invalidate`) and sends once more with a new one. The
/// second answer is the answer, refused or not: the caller classifies it. Every
/// connector's 401 handling goes through here; what counts as a refused token is each
/// CRM's (an expired Salesforce session, a Zendesk token that can be renewed, any
/// Dataverse 401).
///
/// The closures take the token by value (an `Arc`), so that the futures they make borrow
/// nothing of this function's and stay `Send` for the I/O runtime.
pub async fn send_with_token<T, Get, GetF, Drop, DropF, Send, SendF>(
    get: Get,
    invalidate: Drop,
    send: Send,
    refused: impl Fn(&Answer) -> bool,
) -> Result<Answer, DeliveryError>
where
    Get: Fn() -> GetF,
    GetF: Future<Output = Result<Arc<T>, DeliveryError>>,
    Drop: Fn(Arc<T>) -> DropF,
    DropF: Future<Output = ()>,
    Send: Fn(Arc<T>) -> SendF,
    SendF: Future<Output = Result<Answer, DeliveryError>>,
{
    let token = get().await?;
    let answer = send(token.clone()).await?;
    if !refused(&answer) {
        return Ok(answer);
    }
    invalidate(token).await;
    send(get().await?).await
}

/// A cached token of type `T`.
pub struct TokenCache<T> {
    /// The token and when to renew it (`None`: only when refused). The lock is held
    /// across a fetch, so that calls waiting for a token share one fetch.
    current: Mutex<Option<(Arc<T>, Option<Instant>)>>,
}

impl<T> Default for TokenCache<T> {
    fn default() -> Self {
        TokenCache {
            current: Mutex::new(None),
        }
    }
}

impl<T> TokenCache<T> {
    /// The cached token, or a new one from `fetch`, which returns it with how long it
    /// may be used (`None`: until refused; at most [`MAX_CRM_WAIT`]).
    pub async fn get<F, Fut>(&self, fetch: F) -> Result<Arc<T>, DeliveryError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<(T, Option<Duration>), DeliveryError>>,
    {
        let mut current = self.current.lock().await;
        if let Some((token, renew_at)) = current.as_ref() {
            if renew_at.is_none_or(|at| Instant::now() < at) {
                return Ok(token.clone());
            }
        }
        let (token, lifetime) = fetch().await?;
        let token = Arc::new(token);
        let renew_at = lifetime.map(|l| Instant::now() + l.min(MAX_CRM_WAIT));
        *current = Some((token.clone(), renew_at));
        Ok(token)
    }

    /// Drops `stale` if it is still the cached token.
    pub async fn invalidate(&self, stale: &Arc<T>) {
        let mut current = self.current.lock().await;
        if current.as_ref().is_some_and(|(t, _)| Arc::ptr_eq(t, stale)) {
            *current = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_refused_token_is_dropped_and_the_request_sent_once_more() {
        use std::sync::atomic::{AtomicU32, Ordering};
        let answer = |status: u16| Answer {
            status: reqwest::StatusCode::from_u16(status).unwrap(),
            headers: Default::default(),
            retry_after: None,
            body: Vec::new(),
        };
        // Each fetch gives a new token; the CRM refuses the first `refusals` requests.
        let run = |refusals: u32| async move {
            let cache: TokenCache<u32> = TokenCache::default();
            let (fetched, sent, invalidated) = (AtomicU32::new(0), AtomicU32::new(0), AtomicU32::new(0));
            let got = send_with_token(
                || cache.get(|| async { Ok((fetched.fetch_add(1, Ordering::SeqCst), None)) }),
                |stale| {
                    invalidated.fetch_add(1, Ordering::SeqCst);
                    let cache = &cache;
                    async move { cache.invalidate(&stale).await }
                },
                |token| {
                    let n = sent.fetch_add(1, Ordering::SeqCst);
                    async move {
                        let _ = token;
                        Ok(answer(if n < refusals { 401 } else { 200 }))
                    }
                },
                |a| a.status == reqwest::StatusCode::UNAUTHORIZED,
            )
            .await
            .unwrap();
            let counts = |a: &AtomicU32| a.load(Ordering::SeqCst);
            (
                got.status.as_u16(),
                counts(&fetched),
                counts(&sent),
                counts(&invalidated),
            )
        };
        assert_eq!(run(0).await, (200, 1, 1, 0), "accepted: one send");
        assert_eq!(run(1).await, (200, 2, 2, 1), "refused once: a new token and one replay");
        assert_eq!(
            run(5).await,
            (401, 2, 2, 1),
            "refused again: that is the answer, no loop"
        );
    }

    #[tokio::test]
    async fn shares_a_token_renews_when_due_and_drops_only_the_refused_one() {
        let cache: TokenCache<u32> = TokenCache::default();
        let first = cache.get(|| async { Ok((1, None)) }).await.unwrap();
        let again = cache.get(|| async { Ok((2, None)) }).await.unwrap();
        assert_eq!((*first, *again), (1, 1), "cached until refused");
        cache.invalidate(&first).await;
        let second = cache.get(|| async { Ok((2, Some(Duration::ZERO))) }).await.unwrap();
        assert_eq!(*second, 2);
        // Due at once: the next call fetches again; a stale invalidation changes nothing.
        let third = cache
            .get(|| async { Ok((3, Some(Duration::from_secs(60)))) })
            .await
            .unwrap();
        assert_eq!(*third, 3);
        cache.invalidate(&second).await;
        assert_eq!(*cache.get(|| async { Ok((4, None)) }).await.unwrap(), 3);
        // A lifetime no clock can hold is capped instead of overflowing.
        cache.invalidate(&third).await;
        let long = cache.get(|| async { Ok((5, Some(Duration::MAX))) }).await.unwrap();
        assert_eq!(*long, 5);
    }
}
