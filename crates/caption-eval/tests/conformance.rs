//! The shared pycocoevalcap reference file, replayed in full.

#[test]
fn pycocoevalcap_reference_file_conforms() {
    // The repository's copy of the reference data (scripts/sync-conformance refreshes it).
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/conformance/captions/pycocoevalcap-1.2.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let cases = atelier_caption_eval::conformance::parse(&text).unwrap();
    // METEOR from the reference jar (pycocoevalcap's, installed into .tools/ by scripts/bootstrap).
    let jar = atelier_caption_eval::meteor::find_jar()
        .expect("meteor-1.5.jar not found: run scripts/bootstrap (it installs pycocoevalcap into .tools/) or set ATELIER_METEOR_JAR");
    let mut meteor = atelier_caption_eval::meteor::Meteor::start(&jar).unwrap();
    let report = atelier_caption_eval::conformance::replay_with(&cases, Some(&mut meteor));
    assert!(
        report.failed == 0,
        "{} failed:\n{}",
        report.failed,
        report.failures.join("\n")
    );
    // 1,541 captions tokenized, 7 corpus scores, 7 × 300 per-image scores; nothing skipped.
    assert_eq!(report.skipped, 0);
    assert!(
        report.passed >= 1541 + 7 + 2100,
        "only {} checks ran",
        report.passed
    );
}
