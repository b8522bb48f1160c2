//! The access-token cache every CRM's token source uses: one token at a time, fetched
//! when there is none or it is due for renewal, shared by all calls of a tenant, and
//! dropped when a call finds it refused (only if it is still the one that call used, so
//! that a token fetched meanwhile by another call survives).
//!
//! How a token is fetched (the CRM's identity provider, its form, its errors) stays with
//! each connector's `auth.rs`; when to fetch one lives here.

use std::future::Future;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Mutex;

use super::http::MAX_CRM_WAIT;
use super::DeliveryError;

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
