//! Client-side budgets: requests per minute and tokens per minute as token buckets that refill
//! continuously (a minute's budget may be spent in a burst, then it refills at budget/60 per
//! second), and a concurrency limit.

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
