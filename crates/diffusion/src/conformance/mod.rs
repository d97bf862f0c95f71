//! Replays of reference data (`tests/conformance/`): diffusers scheduler traces and
//! AUTOMATIC1111 prompt-parser outputs, diffusers' and transformers' model components.
pub mod components;
pub mod flow;
pub mod models;
pub mod noise;
pub mod pipelines;
pub mod prompts;
pub mod schedulers;
pub mod tokenizer;

/// Passed/failed counts with a line per failure.
#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct Report {
    pub passed: usize,
    pub failed: usize,
    pub failures: Vec<String>,
}

impl Report {
    pub fn pass(&mut self) {
        self.passed += 1;
    }

    pub fn fail(&mut self, what: String) {
        self.failed += 1;
        self.failures.push(what);
    }

    pub fn merge(&mut self, other: Report) {
        self.passed += other.passed;
        self.failed += other.failed;
        self.failures.extend(other.failures);
    }

    /// `N passed, N failed`.
    pub fn summary(&self) -> String {
        format!("{} passed, {} failed", self.passed, self.failed)
    }
}
