//! A version's rows, read one line at a time from its data file.

use std::collections::BTreeMap;
use std::io::BufRead as _;
use std::path::Path;

use anyhow::Context as _;
use atelier_contracts::dataset::{DatasetRow, Decision, Split, Tier};

/// Whether an export keeps `row`: not rejected, in one of `tiers`, captioned.
pub fn kept(row: &DatasetRow, tiers: &[Tier]) -> bool {
    row.decision != Decision::Reject
        && row.tier.is_some_and(|t| tiers.contains(&t))
        && row.caption.is_some()
}

/// The rows of the data file at `path`, in order.
pub fn read(path: &Path) -> anyhow::Result<impl Iterator<Item = anyhow::Result<DatasetRow>>> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let name = path.display().to_string();
    Ok(std::io::BufReader::new(file)
        .lines()
        .enumerate()
        .filter(|(_, l)| l.as_ref().map_or(true, |l| !l.trim().is_empty()))
        .map(move |(i, l)| {
            let l = l.with_context(|| format!("reading {name}"))?;
            serde_json::from_str(&l)
                .with_context(|| format!("{name} line {}: not a dataset row", i + 1))
        }))
}

/// What the kept rows are, counted before anything is written.
#[derive(Debug, Default)]
pub struct Counts {
    pub per_split: BTreeMap<Split, usize>,
    /// Image formats of the kept rows, with how many of each.
    pub formats: BTreeMap<String, usize>,
    /// Rows in the file, kept or not, and those not rejected that have no caption.
    pub total: usize,
    pub uncaptioned: usize,
}

pub fn count(path: &Path, keep: &impl Fn(&DatasetRow) -> bool) -> anyhow::Result<Counts> {
    let mut c = Counts::default();
    for row in read(path)? {
        let row = row?;
        c.total += 1;
        if row.decision != Decision::Reject && row.caption.is_none() {
            c.uncaptioned += 1;
        }
        if keep(&row) {
            *c.per_split
                .entry(row.split.unwrap_or(Split::Train))
                .or_default() += 1;
            *c.formats
                .entry(row.format.clone().unwrap_or_default())
                .or_default() += 1;
        }
    }
    Ok(c)
}
