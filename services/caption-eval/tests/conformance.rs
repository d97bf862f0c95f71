//! The shared pycocoevalcap reference file, replayed in full.

#[test]
fn pycocoevalcap_reference_file_conforms() {
    // shared/ sits beside the checkout (or ATELIER_SHARED_DIR says where).
    let shared = std::env::var_os("ATELIER_SHARED_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| {
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared")
        });
    let path = shared.join("conformance/captions/pycocoevalcap-1.2.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| {
        panic!(
            "{}: {e} (put shared/ beside the checkout or set ATELIER_SHARED_DIR)",
            path.display()
        )
    });
    let cases = atelier_caption_eval::conformance::parse(&text).unwrap();
    let report = atelier_caption_eval::conformance::replay(&cases);
    assert!(
        report.failed == 0,
        "{} failed:\n{}",
        report.failed,
        report.failures.join("\n")
    );
    // 1,541 captions tokenized, 6 corpus scores, 6 × 300 per-image scores; METEOR skipped.
    assert!(
        report.passed >= 1541 + 6 + 1800,
        "only {} checks ran",
        report.passed
    );
}
