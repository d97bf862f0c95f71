//! Client-side budgets: requests per minute and tokens per minute as token buckets that refill
//! continuously (a minute's budget may be spent in a burst, then it refills at budget/60 per
//! second), and a concurrency limit. [`Limiter`] is what the client draws from: [`Local`] keeps
//! the buckets in this process; a limiter shared by replicas (the captioner's, over the bus's
//! key-value store) implements the same trait.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use tokio::time::Instant;

use tokio::sync::Mutex;

/// A token bucket holding at most `per_minute` units.
#[derive(Debug)]
pub struct Bucket {
    per_minute: f64,
    state: Mutex<(f64, Instant)>,
}

impl Bucket {
    pub fn new(per_minute: u32) -> Self {
        let per_minute = f64::from(per_minute.max(1));
        Self {
            per_minute,
            state: Mutex::new((per_minute, Instant::now())),
        }
    }

    fn refill(&self, level: &mut f64, at: &mut Instant, now: Instant) {
        let dt = now.saturating_duration_since(*at).as_secs_f64();
        *level = (*level + dt * self.per_minute / 60.0).min(self.per_minute);
        *at = now;
    }

    /// Waits until `n` units are available and takes them. Asking for more than a minute's
    /// budget waits for a full bucket and then takes it all (so a huge request still proceeds).
    pub async fn take(&self, n: f64) {
        let n = n.min(self.per_minute);
        loop {
            let wait = {
                let mut g = self.state.lock().await;
                let (level, at) = &mut *g;
                self.refill(level, at, Instant::now());
                if *level >= n {
                    *level -= n;
                    return;
                }
                Duration::from_secs_f64((n - *level) * 60.0 / self.per_minute)
            };
            tokio::time::sleep(wait.max(Duration::from_millis(1))).await;
        }
    }

    /// Corrects a reservation once the real cost is known: gives back (or, when negative, takes
    /// more than) `delta` units; the level may go below zero, delaying later requests.
    pub async fn adjust(&self, delta: f64) {
        let mut g = self.state.lock().await;
        let (level, at) = &mut *g;
        self.refill(level, at, Instant::now());
        *level = (*level + delta).min(self.per_minute);
    }
}

/// A boxed future, so limiters can be trait objects.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Rate budgets a client draws from before each request.
pub trait Limiter: Send + Sync {
    /// Waits until one request and `tokens` tokens are available (and, where requests in flight
    /// are limited, a place among them), and takes them. Returns the in-flight lease to give
    /// back with [`Limiter::release`] when the request ends (0: none).
    fn take(&self, tokens: f64) -> BoxFuture<'_, u64>;
    /// Gives back an in-flight lease from [`Limiter::take`].
    fn release(&self, _lease: u64) -> BoxFuture<'_, ()> {
        Box::pin(async {})
    }
    /// Gives back (or, negative, takes more of) `delta` tokens once a request's real cost is known.
    fn adjust_tokens(&self, delta: f64) -> BoxFuture<'_, ()>;
    /// The endpoint asked everyone to wait `wait` (429 with `Retry-After`): no request starts
    /// before then.
    fn pause(&self, wait: Duration) -> BoxFuture<'_, ()>;
}

/// Budgets kept in this process (one worker's).
pub struct Local {
    requests: Option<Bucket>,
    tokens: Option<Bucket>,
    paused_until: Mutex<Option<Instant>>,
}

impl Local {
    /// `0` disables a budget.
    pub fn new(requests_per_minute: u32, tokens_per_minute: u32) -> Self {
        Self {
            requests: (requests_per_minute > 0).then(|| Bucket::new(requests_per_minute)),
            tokens: (tokens_per_minute > 0).then(|| Bucket::new(tokens_per_minute)),
            paused_until: Mutex::new(None),
        }
    }
}

impl Limiter for Local {
    fn take(&self, tokens: f64) -> BoxFuture<'_, u64> {
        Box::pin(async move {
            let until = *self.paused_until.lock().await;
            if let Some(until) = until {
                tokio::time::sleep_until(until).await;
            }
            if let Some(b) = &self.requests {
                b.take(1.0).await;
            }
            if let Some(b) = &self.tokens {
                b.take(tokens).await;
            }
            0
        })
    }

    fn adjust_tokens(&self, delta: f64) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if let Some(b) = &self.tokens {
                b.adjust(delta).await;
            }
        })
    }

    fn pause(&self, wait: Duration) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let until = Instant::now() + wait;
            let mut g = self.paused_until.lock().await;
            *g = Some(g.map_or(until, |u| u.max(until)));
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_bucket_allows_a_burst_then_refills_at_its_rate() {
        let b = Bucket::new(120); // 2 per second
        let t0 = tokio::time::Instant::now();
        for _ in 0..120 {
            b.take(1.0).await;
        }
        assert!(t0.elapsed() < Duration::from_millis(10), "burst waited");
        b.take(4.0).await;
        let waited = t0.elapsed();
        assert!(
            waited >= Duration::from_millis(1900) && waited < Duration::from_millis(2200),
            "{waited:?}"
        );
        // Over-use recorded after the fact delays the next request.
        b.adjust(-10.0).await;
        let t1 = tokio::time::Instant::now();
        b.take(1.0).await;
        assert!(
            t1.elapsed() >= Duration::from_millis(5400),
            "{:?}",
            t1.elapsed()
        );
    }
}
