//! The process-wide decode-memory budget, counted in MiB.

use std::sync::{Arc, OnceLock};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::{DecodeError, Header};

/// Default budget when `ATELIER_DECODE_BUDGET_MIB` is unset.
pub const DEFAULT_BUDGET_MIB: u32 = 1024;

/// MiB of decoded pixels this process may hold at once.
#[derive(Debug, Clone)]
pub struct Budget {
    sem: Arc<Semaphore>,
    mib: u32,
}

/// A share of a [`Budget`], given back when dropped.
#[derive(Debug)]
pub struct Held {
    _permit: OwnedSemaphorePermit,
    pub mib: u32,
}

impl Budget {
    pub fn new(mib: u32) -> Self {
        let mib = mib.max(1);
        Self {
            sem: Arc::new(Semaphore::new(mib as usize)),
            mib,
        }
    }

    /// The process's budget: `ATELIER_DECODE_BUDGET_MIB`, else 1024 MiB.
    pub fn global() -> &'static Budget {
        static GLOBAL: OnceLock<Budget> = OnceLock::new();
        GLOBAL.get_or_init(|| {
            let mib = std::env::var("ATELIER_DECODE_BUDGET_MIB")
                .ok()
                .and_then(|v| v.trim().parse::<u32>().ok())
                .unwrap_or(DEFAULT_BUDGET_MIB);
            tracing::debug!(mib, "decode budget");
            Budget::new(mib)
        })
    }

    pub fn total_mib(&self) -> u32 {
        self.mib
    }

    /// MiB not held right now.
    pub fn available_mib(&self) -> u32 {
        self.sem.available_permits() as u32
    }

    /// Waits until the decode of `h` fits, then holds its cost. Refuses at once an image that
    /// could never fit.
    pub async fn hold(&self, h: &Header, encoded: usize) -> Result<Held, DecodeError> {
        let need = h.decode_cost(encoded).div_ceil(1 << 20).max(1);
        if need > u64::from(self.mib) {
            return Err(DecodeError::OverBudget {
                width: h.width,
                height: h.height,
                need_mib: need,
                budget_mib: u64::from(self.mib),
            });
        }
        let mib = need as u32;
        let permit = self
            .sem
            .clone()
            .acquire_many_owned(mib)
            .await
            .map_err(|_| DecodeError::Corrupt("decode budget closed".into()))?;
        Ok(Held {
            _permit: permit,
            mib,
        })
    }
}
