//! What a caption run has spent, shared by its shards on every replica (`atelier_spend`, keyed by
//! the run's id), and its cap. Each caption adds its tokens (and their price) under
//! compare-and-set; before each request a shard looks at the total, and once the cap is reached
//! it sends no more: requests already in flight finish and their captions are kept, so a run ends
//! at most those requests over its cap.

use atelier_contracts::dataset::{RunSpend, SpendCap, TokenUsage};
use atelier_contracts::JobId;
use atelier_kit::kv::Kv;
use atelier_kit::JobError;
use atelier_openai::Price;

#[derive(Clone)]
pub struct Spend {
    kv: Kv<RunSpend>,
    run: JobId,
    cap: Option<SpendCap>,
    price: Option<Price>,
}

fn unavailable(e: anyhow::Error) -> JobError {
    JobError::retryable("kv_unavailable", format!("{e:#}"))
}

impl Spend {
    pub fn new(kv: Kv<RunSpend>, run: JobId, cap: Option<SpendCap>, price: Option<Price>) -> Self {
        Self {
            kv,
            run,
            cap,
            price,
        }
    }

    /// The run's spend so far.
    pub async fn read(&self) -> Result<RunSpend, JobError> {
        Ok(self
            .kv
            .get(&self.run.to_string())
            .await
            .map_err(unavailable)?
            .unwrap_or_default())
    }

    /// Why no more requests may be sent, once the cap is reached.
    pub async fn exhausted(&self) -> Result<Option<String>, JobError> {
        if self.cap.is_none() {
            return Ok(None);
        }
        Ok(over_cap(self.cap.as_ref(), &self.read().await?))
    }

    /// Adds one caption's cost.
    pub async fn add(&self, usage: TokenUsage) -> Result<(), JobError> {
        let usd = self.price.map_or(0.0, |p| p.cost(usage));
        self.kv
            .modify(&self.run.to_string(), |s| {
                let mut next = s.copied().unwrap_or_default();
                next.usage.add(usage);
                next.usd += usd;
                next.captioned += 1;
                (Some(next), ())
            })
            .await
            .map_err(unavailable)
    }
}

/// The reason `spent` is at or over `cap`, if it is.
pub fn over_cap(cap: Option<&SpendCap>, spent: &RunSpend) -> Option<String> {
    let cap = cap?;
    let tokens = spent.usage.prompt_tokens + spent.usage.completion_tokens;
    if let Some(max) = cap.tokens.filter(|max| tokens >= *max) {
        return Some(format!(
            "the run's spend cap of {max} tokens is reached ({tokens} tokens spent, {} images captioned and kept); raise spend_cap and run it again to caption the rest",
            spent.captioned
        ));
    }
    if let Some(max) = cap.usd.filter(|max| spent.usd >= *max) {
        return Some(format!(
            "the run's spend cap of ${max:.2} is reached (${:.4} spent, {} images captioned and kept); raise spend_cap and run it again to caption the rest",
            spent.usd, spent.captioned
        ));
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cap_is_reached_by_tokens_or_dollars() {
        let spent = RunSpend {
            usage: TokenUsage {
                prompt_tokens: 900,
                completion_tokens: 100,
            },
            usd: 0.5,
            captioned: 4,
        };
        let cap = |tokens, usd| SpendCap { tokens, usd };
        assert_eq!(over_cap(None, &spent), None);
        assert_eq!(over_cap(Some(&cap(Some(1001), None)), &spent), None);
        let why = over_cap(Some(&cap(Some(1000), None)), &spent).unwrap();
        assert!(
            why.contains("1000 tokens") && why.contains("4 images"),
            "{why}"
        );
        assert_eq!(over_cap(Some(&cap(None, Some(0.51))), &spent), None);
        assert!(over_cap(Some(&cap(None, Some(0.5))), &spent)
            .unwrap()
            .contains("$0.50"));
    }
}
