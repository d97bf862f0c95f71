//! One rate budget for every captioner replica calling an endpoint: requests per minute and tokens
//! per minute as token buckets kept in the bus's key-value store (`atelier_limits`, one key per
//! endpoint), drawn from by compare-and-set so concurrent replicas never take the same units, and
//! a pause any replica sets when the endpoint answers 429 with `Retry-After`.
//!
//! Every replica must be configured with the same per-minute figures (the bucket refills at the
//! rate of whoever draws). Times are wall-clock milliseconds, so replicas' clocks should agree
//! (NTP) to well under a second.

use std::time::Duration;

use atelier_contracts::dataset::RateBudget;
use atelier_kit::kv::Kv;
use atelier_openai::budget::{BoxFuture, Limiter};
use sha2::{Digest, Sha256};

pub struct SharedBudget {
    kv: Kv<RateBudget>,
    key: String,
    requests_per_minute: f64,
    tokens_per_minute: f64,
    /// Requests in flight across replicas (0: no shared limit).
    max_in_flight: usize,
    /// How long a lease lives if its request never gives it back (its replica died).
    lease_ttl: Duration,
}

/// The longest a replica sleeps before looking at the bucket again.
const MAX_NAP: Duration = Duration::from_secs(2);

impl SharedBudget {
    /// The budget of the endpoint at `base_url` (with this API key: another organisation has
    /// other limits). `0` disables a per-minute figure.
    pub fn new(
        kv: Kv<RateBudget>,
        base_url: &str,
        api_key: Option<&str>,
        requests_per_minute: u32,
        tokens_per_minute: u32,
    ) -> Self {
        let mut h = Sha256::new();
        h.update(base_url.trim_end_matches('/').as_bytes());
        h.update([0]);
        h.update(api_key.unwrap_or_default().as_bytes());
        Self {
            kv,
            key: format!("endpoint.{}", hex::encode(&h.finalize()[..8])),
            requests_per_minute: f64::from(requests_per_minute),
            tokens_per_minute: f64::from(tokens_per_minute),
            max_in_flight: 0,
            lease_ttl: Duration::from_secs(130),
        }
    }

    /// At most `max` requests in flight across the replicas (0: no limit); a lease not given back
    /// lapses after `ttl` (the request timeout and a margin).
    pub fn with_in_flight(mut self, max: u32, ttl: Duration) -> Self {
        self.max_in_flight = max as usize;
        self.lease_ttl = ttl;
        self
    }

    fn now_ms() -> i64 {
        chrono::Utc::now().timestamp_millis()
    }

    /// The bucket refilled to `now`; a missing one starts full.
    fn refilled(&self, b: Option<&RateBudget>, now: i64) -> RateBudget {
        let Some(b) = b else {
            return RateBudget {
                requests: self.requests_per_minute,
                tokens: self.tokens_per_minute,
                at_ms: now,
                paused_until_ms: 0,
                leases: Vec::new(),
            };
        };
        let minutes = (now - b.at_ms).max(0) as f64 / 60_000.0;
        RateBudget {
            requests: (b.requests + minutes * self.requests_per_minute)
                .min(self.requests_per_minute),
            tokens: (b.tokens + minutes * self.tokens_per_minute).min(self.tokens_per_minute),
            at_ms: now.max(b.at_ms),
            paused_until_ms: b.paused_until_ms,
            leases: b
                .leases
                .iter()
                .copied()
                .filter(|(_, exp)| *exp > now)
                .collect(),
        }
    }

    /// One attempt to take a request and `tokens`: the new bucket (taken), or how long to wait.
    fn try_take(
        &self,
        b: Option<&RateBudget>,
        tokens: f64,
        lease: u64,
    ) -> (Option<RateBudget>, Option<Duration>) {
        let now = Self::now_ms();
        let mut next = self.refilled(b, now);
        if self.max_in_flight > 0 && next.leases.len() >= self.max_in_flight {
            // Wait for a request to end (the next look sees it gone).
            return (None, Some(Duration::from_millis(20)));
        }
        if next.paused_until_ms > now {
            let wait = Duration::from_millis((next.paused_until_ms - now) as u64);
            return (None, Some(wait));
        }
        let tokens = tokens.min(self.tokens_per_minute);
        let short = |level: f64, want: f64, per_minute: f64| {
            if per_minute <= 0.0 || level >= want {
                0.0
            } else {
                (want - level) * 60.0 / per_minute
            }
        };
        let wait = short(next.requests, 1.0, self.requests_per_minute).max(short(
            next.tokens,
            tokens,
            self.tokens_per_minute,
        ));
        if wait > 0.0 {
            // A wait too short to represent is still a wait: the units are not there yet.
            let wait = Duration::from_secs_f64(wait).max(Duration::from_millis(1));
            return (None, Some(wait));
        }
        if self.requests_per_minute > 0.0 {
            next.requests -= 1.0;
        }
        if self.tokens_per_minute > 0.0 {
            next.tokens -= tokens;
        }
        if self.max_in_flight > 0 {
            next.leases
                .push((lease, now + self.lease_ttl.as_millis() as i64));
        }
        (Some(next), None)
    }

    async fn modify<T>(
        &self,
        what: &str,
        f: impl FnMut(Option<&RateBudget>) -> (Option<RateBudget>, T),
    ) -> Option<T> {
        match self.kv.modify(&self.key, f).await {
            Ok(t) => Some(t),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "{what} the shared rate budget");
                None
            }
        }
    }
}

impl Limiter for SharedBudget {
    fn take(&self, tokens: f64) -> BoxFuture<'_, u64> {
        Box::pin(async move {
            let unlimited = self.requests_per_minute <= 0.0 && self.tokens_per_minute <= 0.0;
            if unlimited && self.max_in_flight == 0 {
                return 0;
            }
            let lease = if self.max_in_flight > 0 {
                rand::random::<u64>().max(1)
            } else {
                0
            };
            loop {
                let wait = match self
                    .modify("drawing from", |b| self.try_take(b, tokens, lease))
                    .await
                {
                    Some(None) => return lease,
                    Some(Some(wait)) => wait,
                    // The bus is unreachable: wait a little and try again rather than exceed.
                    None => Duration::from_millis(500),
                };
                // Short naps with jitter: other replicas refill and draw meanwhile.
                let jitter = rand::random::<f64>() * 0.2 + 0.9;
                tokio::time::sleep(wait.min(MAX_NAP).mul_f64(jitter)).await;
            }
        })
    }

    fn release(&self, lease: u64) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if lease == 0 {
                return;
            }
            self.modify("giving back a lease to", |b| {
                let mut next = self.refilled(b, Self::now_ms());
                let before = next.leases.len();
                next.leases.retain(|(id, _)| *id != lease);
                let changed = next.leases.len() != before;
                (changed.then_some(next), ())
            })
            .await;
        })
    }

    fn adjust_tokens(&self, delta: f64) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            if self.tokens_per_minute <= 0.0 || delta == 0.0 {
                return;
            }
            self.modify("correcting", |b| {
                let mut next = self.refilled(b, Self::now_ms());
                next.tokens = (next.tokens + delta).min(self.tokens_per_minute);
                (Some(next), ())
            })
            .await;
        })
    }

    fn pause(&self, wait: Duration) -> BoxFuture<'_, ()> {
        Box::pin(async move {
            let until = Self::now_ms() + wait.as_millis() as i64;
            self.modify("pausing", |b| {
                let mut next = self.refilled(b, Self::now_ms());
                if next.paused_until_ms >= until {
                    return (None, ());
                }
                next.paused_until_ms = until;
                (Some(next), ())
            })
            .await;
        })
    }
}
