//! Every diffusers trace in tests/conformance/schedulers replays to 1e-4.
use std::path::PathBuf;

fn traces_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/conformance/schedulers")
}

#[test]
fn diffusers_traces_replay() {
    let dir = traces_dir();
    let report = atelier_diffusion::conformance::schedulers::replay_dir(&dir).expect("trace dir");
    for f in &report.failures {
        eprintln!("FAIL {f}");
    }
    eprintln!("{}", report.summary());
    assert_eq!(report.failed, 0, "{}", report.failures.join("\n"));
    assert!(report.passed >= 63, "only {} traces", report.passed);
}

#[test]
fn a_perturbed_trace_fails_where_it_diverges() {
    use atelier_diffusion::conformance::schedulers::{replay, TraceFile};
    let text = std::fs::read_to_string(traces_dir().join("diffusers-0.42.1.json")).unwrap();
    let file: TraceFile = serde_json::from_str(&text).unwrap();
    let mut euler = file
        .traces
        .iter()
        .position(|t| t.scheduler == "euler" && t.strength.is_none())
        .map(|i| file.traces[i].clone())
        .unwrap();
    euler.trace[5].x[3] *= 1.01;
    let err = replay(&euler).unwrap_err();
    assert!(err.contains("step 5"), "{err}");

    // A stochastic sampler given other noise diverges at the first step that draws it.
    let mut ancestral = file
        .traces
        .iter()
        .find(|t| t.scheduler == "euler_a")
        .unwrap()
        .clone();
    ancestral.trace[2].noise[0].reverse();
    let err = replay(&ancestral).unwrap_err();
    assert!(err.contains("step 2"), "{err}");
}
