//! The quality-filter service: turns a dataset's image records and captions into an immutable
//! dataset version.
//!
//! Consumes `filter` jobs on `atelier.v1.quality-filter.request`; reads `atelier_images` and
//! `atelier_captions`; writes the version's JSONL data file and manifest to the store
//! (content-addressed) and the manifest under `<dataset>.<version>` in `atelier_datasets`.
//! [`assess`] is the pure part: per record, the checks that failed ([`Signal`]s, each with a
//! reason and the policy's severity), a decision, a tier and a split.

mod config;
pub mod dups;
mod eval;
mod export;
mod filter;
mod models;
pub mod nsfw;
mod policy;
pub mod text;
pub mod verdicts;

use atelier_contracts::{JobOutput, JobSpec, Service};
use atelier_kit::{Handler, JobCtx, JobError};

pub use config::{serve, Config};
pub use models::{Loaded, QualityFilter};
pub use policy::{assess, split_of, Input, NsfwScore};

impl Handler for QualityFilter {
    fn service(&self) -> Service {
        Service::QualityFilter
    }

    async fn handle(&self, ctx: &JobCtx, spec: JobSpec) -> Result<JobOutput, JobError> {
        match spec {
            JobSpec::Filter(spec) => self.filter(ctx, spec).await,
            JobSpec::EvalCaptions(spec) => self.eval_captions(ctx, spec).await,
            JobSpec::Export(spec) => self.export(ctx, spec).await,
            other => Err(JobError::permanent(
                "wrong_service",
                format!("the quality filter does not run {} jobs", other.kind()),
            )),
        }
    }
}
