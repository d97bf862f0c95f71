//! The Hub dataset card: `README.md` whose YAML `configs` name each split's files, so
//! `load_dataset(folder)` (or the folder pushed to the Hub) opens every split, and whose text
//! says where the data came from.

use atelier_contracts::dataset::{DatasetManifest, ExportFormat};

use crate::{Options, Report};

fn pattern(format: ExportFormat, split: &str) -> String {
    match format {
        ExportFormat::Parquet => format!("data/{split}-*.parquet"),
        ExportFormat::Webdataset => format!("{split}/*.tar"),
        ExportFormat::Jsonl => format!("{split}/**"),
        ExportFormat::Llava => format!("{split}-*.json"),
    }
}

fn size_category(rows: usize) -> &'static str {
    match rows {
        0..1_000 => "n<1K",
        1_000..10_000 => "1K<n<10K",
        10_000..100_000 => "10K<n<100K",
        100_000..1_000_000 => "100K<n<1M",
        1_000_000..10_000_000 => "1M<n<10M",
        _ => "10M<n<100M",
    }
}

pub fn render(manifest: &DatasetManifest, opts: &Options, report: &Report) -> String {
    let rows: usize = report.splits.values().sum();
    let mut y = String::from("---\nconfigs:\n- config_name: default\n  data_files:\n");
    for split in report.splits.keys() {
        y += &format!(
            "  - split: {split}\n    path: \"{}\"\n",
            pattern(opts.format, split)
        );
    }
    y += "task_categories:\n- image-to-text\n- text-to-image\n";
    y += &format!("size_categories:\n- {}\n", size_category(rows));
    y += "license: other\n---\n\n";
    y += &format!(
        "# {} (version {})\n\nExported by atelier from version {} of dataset `{}` ({}, created {}), \
         format `{}`, {} rows:\n\n",
        manifest.dataset,
        manifest.version,
        manifest.version,
        manifest.dataset,
        manifest.job,
        manifest.created_at.to_rfc3339(),
        opts.format.name(),
        rows
    );
    for (split, n) in &report.splits {
        y += &format!("- `{split}`: {n}\n");
    }
    y += "\nCaptions come from:\n\n";
    for (id, s) in &manifest.caption_sources {
        y += &format!(
            "- `{id}`: {} model `{}`, prompt \"{}\"\n",
            s.backend, s.model, s.prompt
        );
    }
    y += "\nEach row carries its own `license` and `source`; check them before redistributing. \
          `manifest.json` holds the version's quality policy, split and counts.\n";
    y
}
