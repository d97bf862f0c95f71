//! The checksum service: digests stored artifacts.
//!
//! Consumes `atelier.v1.checksum.request` (job kind `checksum`), produces `atelier.v1.checksum.done`
//! with a [`ChecksumOutput`]: the input's real SHA-256 and size (streamed from the store, never
//! trusted from metadata) and a JSON report stored content-addressed. With `expected_sha256` it
//! verifies an artifact (a mismatch fails the job without retry). It is the spine's own job kind:
//! small, real, and exercising every part of the runtime (store reads and writes, progress,
//! retries on an unreachable store, idempotent results).

use atelier_contracts::{ArtifactKey, ChecksumOutput, JobOutput, JobSpec, Service};
use atelier_kit::{Handler, JobCtx, JobError};

#[derive(Debug, Clone, Default)]
pub struct Checksum;

impl Handler for Checksum {
    fn service(&self) -> Service {
        Service::Checksum
    }

    async fn handle(&self, ctx: &JobCtx, spec: JobSpec) -> Result<JobOutput, JobError> {
        let JobSpec::Checksum(spec) = spec else {
            return Err(JobError::permanent(
                "wrong_service",
                format!("the checksum service does not run {} jobs", spec.kind()),
            ));
        };
        let key = ArtifactKey::parse(&spec.input).map_err(|e| {
            JobError::permanent("bad_artifact_key", format!("input {:?}: {e}", spec.input))
        })?;
        let input = ctx.store().digest(&key).await?;
        if let Some(expected) = &spec.expected_sha256 {
            if !expected.eq_ignore_ascii_case(&input.sha256) {
                return Err(JobError::permanent(
                    "checksum_mismatch",
                    format!(
                        "{} has sha256 {}, expected {expected}",
                        input.key, input.sha256
                    ),
                ));
            }
        }
        ctx.progress(0.5, Some(format!("digested {} bytes", input.size)))
            .await;
        // Deterministic (no timestamps): a rerun writes the same bytes, hence the same key.
        let report = serde_json::json!({
            "algorithm": "sha256",
            "key": input.key,
            "sha256": input.sha256,
            "size": input.size,
            "verified": spec.expected_sha256.is_some(),
        });
        let (report, _) = ctx.store().put_json(&report).await?;
        Ok(JobOutput::Checksum(ChecksumOutput { input, report }))
    }
}

/// Runs the checksum service (it has no settings of its own): the `atelier-checksum` binary and
/// `atelier up` both call this.
pub async fn serve(launch: atelier_kit::service::Launch) -> anyhow::Result<()> {
    launch.run(Checksum).await
}
