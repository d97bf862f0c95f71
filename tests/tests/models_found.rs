//! Models are found from configuration and from where atelier is installed, never from the
//! working directory: started in a folder outside the repository, the quality filter still finds
//! the NSFW detector, MiniLM and METEOR that `scripts/bootstrap` installed, and the tests' NATS.

#[test]
fn models_are_found_from_any_working_directory() {
    let elsewhere = tempfile::tempdir().unwrap();
    std::env::set_current_dir(elsewhere.path()).unwrap();
    let qf = atelier_quality_filter::QualityFilter::discover();
    assert!(
        qf.nsfw_model.is_some() && qf.onnxruntime.is_some(),
        "the NSFW detector is off outside the repository"
    );
    assert!(qf.minilm.is_some(), "MiniLM not found");
    assert!(qf.meteor_jar.is_some(), "METEOR not found");
    assert!(atelier_kit::nats_server::find_tool("nats-server", "ATELIER_UNSET_FOR_TEST").is_some());
}
