//! Replays AUTOMATIC1111 prompt-parser outputs (the format of
//! `tests/conformance/prompts/a1111-prompt-parser.json`). Weights match to 1e-9; a case whose
//! reference is null (A1111 itself failed on it) only has to parse without a panic.

use serde::Deserialize;

use super::Report;
use crate::prompt;

#[derive(Debug, Deserialize)]
pub struct CaseFile {
    pub cases: Vec<Case>,
}

#[derive(Debug, Deserialize)]
pub struct Case {
    pub prompt: String,
    /// Any integer: A1111's parser computes schedules for zero and negative step counts too.
    pub steps: i64,
    pub attention: Option<Vec<(String, f64)>>,
    pub schedule: Option<Vec<(i64, String)>>,
}

/// Parse a case file; the error names what is wrong.
pub fn parse_file(text: &str) -> Result<CaseFile, String> {
    serde_json::from_str(text).map_err(|e| format!("not an A1111 prompt-parser case file: {e}"))
}

/// Replay every case: one pass or fail for the attention list and one for the schedule.
pub fn replay(file: &CaseFile) -> Report {
    let mut report = Report::default();
    for case in &file.cases {
        let got = std::panic::catch_unwind(|| prompt::parse(&case.prompt, case.steps));
        let Ok(got) = got else {
            report.fail(format!("{:?}: the parser panicked", case.prompt));
            continue;
        };
        match &case.attention {
            None => report.pass(),
            Some(want) => {
                let same = want.len() == got.attention.len()
                    && want
                        .iter()
                        .zip(&got.attention)
                        .all(|((wt, ww), (gt, gw))| wt == gt && (ww - gw).abs() <= 1e-9);
                if same {
                    report.pass()
                } else {
                    report.fail(format!(
                        "{:?} attention: got {:?}, expected {want:?}",
                        case.prompt, got.attention
                    ))
                }
            }
        }
        match &case.schedule {
            None => report.pass(),
            Some(want) => {
                if *want == got.schedule {
                    report.pass()
                } else {
                    report.fail(format!(
                        "{:?} schedule ({} steps): got {:?}, expected {want:?}",
                        case.prompt, case.steps, got.schedule
                    ))
                }
            }
        }
    }
    report
}
