//! A1111's own parser outputs in tests/conformance/prompts replay exactly.
use std::path::PathBuf;

use atelier_diffusion::conformance::prompts;

fn cases_file() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/conformance/prompts/a1111-prompt-parser.json")
}

#[test]
fn a1111_cases_replay() {
    let file = prompts::parse_file(&std::fs::read_to_string(cases_file()).unwrap()).unwrap();
    let report = prompts::replay(&file);
    assert_eq!(report.failed, 0, "{}", report.failures.join("\n"));
    assert_eq!(report.passed, 2 * file.cases.len());
    assert!(file.cases.len() >= 43);
}

#[test]
fn a1111_edge_cases_replay() {
    // 400 outputs of A1111's own parser on generated prompts (tests/data): step counts of zero
    // and below (schedules whose steps come out zero or negative), whitespace inside the
    // brackets and around the colons, fractions, exponents, escapes, stray brackets.
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/data/a1111-prompt-edges.json");
    let file = prompts::parse_file(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert!(file.cases.iter().any(|c| c.steps < 0));
    let report = prompts::replay(&file);
    assert_eq!(report.failed, 0, "{}", report.failures.join("\n"));
    assert_eq!(report.passed, 2 * file.cases.len());
}

#[test]
fn null_references_only_need_no_panic_and_wrong_ones_fail() {
    let file = prompts::parse_file(
        r#"{"cases": [
            {"prompt": "(a:1.2.3)", "steps": 20, "attention": null, "schedule": null},
            {"prompt": "[a:b:", "steps": 20, "attention": null, "schedule": null},
            {"prompt": "(x)", "steps": 20, "attention": [["x", 1.2]], "schedule": [[20, "(x)"]]}
        ]}"#,
    )
    .unwrap();
    let report = prompts::replay(&file);
    assert_eq!(
        (report.passed, report.failed),
        (5, 1),
        "{:?}",
        report.failures
    );
    assert!(report.failures[0].contains("attention"));
}

#[test]
fn hostile_prompts_never_panic() {
    for p in [
        "\\",
        "((((",
        "]]]]",
        "[[[:",
        "[a|",
        "[a:b:c:d]",
        "(:)",
        "[:1]",
        "[a:b:1e999]",
        "[a:b:-3]",
        "<lora:>",
        "BREAKBREAK",
        "(BREAK:2)",
        "é[ü|ö]",
        "[|]",
        "\\\n",
    ] {
        let _ = atelier_diffusion::prompt::parse(p, 20);
        let _ = atelier_diffusion::prompt::parse(p, 1);
    }
}
