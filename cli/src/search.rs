//! `atelier search` and `atelier curate`: the retrieval routes from the command line.

use std::path::PathBuf;

use anyhow::{bail, Context as _};
use atelier_contracts::retrieval::{Dedup, SemanticQuery};
use atelier_contracts::{CurateOutput, CurateSpec, Space};

use atelier_client::Client;

#[derive(clap::Args, Debug, Clone)]
pub struct SearchArgs {
    #[arg(long)]
    pub dataset: String,
    /// Text query (text→image by default; with --space caption, caption→caption).
    #[arg(long, conflicts_with_all = ["image_id", "image"])]
    pub text: Option<String>,
    /// A record of the dataset (16-hex id or sha256): its nearest neighbours.
    #[arg(long, conflicts_with = "image")]
    pub image_id: Option<String>,
    /// An image file to search with.
    #[arg(long)]
    pub image: Option<PathBuf>,
    /// clip_image (default), clip_text or caption.
    #[arg(long)]
    pub space: Option<String>,
    #[arg(long, default_value_t = 10)]
    pub k: u32,
    /// Comma-separated tags every result carries.
    #[arg(long)]
    pub tags: Option<String>,
    /// Comma-separated tiers (gold, silver, bronze).
    #[arg(long)]
    pub tier: Option<String>,
    /// Comma-separated sources.
    #[arg(long)]
    pub source: Option<String>,
    #[arg(long)]
    pub min_width: Option<u32>,
    #[arg(long)]
    pub max_width: Option<u32>,
    #[arg(long)]
    pub min_height: Option<u32>,
    #[arg(long)]
    pub max_height: Option<u32>,
}

pub async fn search(
    client: &Client,
    a: &SearchArgs,
) -> anyhow::Result<atelier_contracts::SearchResponse> {
    let mut p: Vec<(String, String)> = vec![
        ("dataset".into(), a.dataset.clone()),
        ("k".into(), a.k.to_string()),
    ];
    let mut opt = |name: &str, v: Option<String>| {
        if let Some(v) = v {
            p.push((name.to_owned(), v));
        }
    };
    opt("text", a.text.clone());
    opt("image_id", a.image_id.clone());
    opt("space", a.space.clone());
    opt("tags", a.tags.clone());
    opt("tier", a.tier.clone());
    opt("source", a.source.clone());
    opt("min_width", a.min_width.map(|v| v.to_string()));
    opt("max_width", a.max_width.map(|v| v.to_string()));
    opt("min_height", a.min_height.map(|v| v.to_string()));
    opt("max_height", a.max_height.map(|v| v.to_string()));
    let image = match &a.image {
        Some(path) => Some((
            bytes::Bytes::from(
                std::fs::read(path).with_context(|| format!("reading {}", path.display()))?,
            ),
            crate::ingest::content_type(path),
        )),
        None => None,
    };
    if a.text.is_none() && a.image_id.is_none() && image.is_none() {
        bail!("give a query: --text, --image-id or --image");
    }
    client.search(&p, image).await
}

#[derive(clap::Args, Debug, Clone)]
pub struct CurateArgs {
    #[arg(long)]
    pub dataset: String,
    /// A curation spec (JSON or TOML: queries, combine, keywords, filter, include_flagged,
    /// dedup, limit, seed, note); the flags below override it.
    #[arg(long)]
    pub spec: Option<PathBuf>,
    /// The version to curate from (default: the latest).
    #[arg(long)]
    pub version: Option<u32>,
    /// A semantic query `TEXT@MIN_SCORE` (space clip_image; prefix `caption:` or `clip_text:`
    /// for another space), repeatable.
    #[arg(long = "query")]
    pub queries: Vec<String>,
    /// Caption keywords that must all appear (repeatable).
    #[arg(long = "all")]
    pub all: Vec<String>,
    /// Caption keywords of which one must appear (repeatable).
    #[arg(long = "any")]
    pub any: Vec<String>,
    /// Caption keywords that must not appear (repeatable).
    #[arg(long = "none")]
    pub none: Vec<String>,
    /// Drop near-duplicates at this cosine (in the caption space with --dedup-space caption).
    #[arg(long)]
    pub dedup: Option<f32>,
    #[arg(long, default_value = "clip_image")]
    pub dedup_space: String,
    #[arg(long)]
    pub limit: Option<u32>,
    #[arg(long)]
    pub seed: Option<String>,
    #[arg(long)]
    pub note: Option<String>,
}

fn parse_space(s: &str) -> anyhow::Result<Space> {
    Space::parse(s)
        .with_context(|| format!("space {s:?}: expected clip_image, clip_text or caption"))
}

/// `TEXT@SCORE`, optionally `SPACE:TEXT@SCORE`.
pub fn parse_query(q: &str) -> anyhow::Result<SemanticQuery> {
    let (text, score) = q.rsplit_once('@').with_context(|| {
        format!("query {q:?}: write it as TEXT@MIN_SCORE, e.g. \"a red car@0.25\"")
    })?;
    let min_score: f32 = score
        .trim()
        .parse()
        .with_context(|| format!("query {q:?}: {score:?} is not a number"))?;
    let (space, text) = match text.split_once(':') {
        Some((s, t)) if Space::parse(s.trim()).is_some() => (parse_space(s.trim())?, t),
        _ => (Space::ClipImage, text),
    };
    Ok(SemanticQuery {
        text: text.trim().to_owned(),
        space,
        min_score,
    })
}

/// A spec file (JSON, or TOML by its extension), or an empty object without one.
pub fn read_spec(path: Option<&std::path::Path>) -> anyhow::Result<serde_json::Value> {
    let Some(p) = path else {
        return Ok(serde_json::json!({}));
    };
    let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
    if p.extension().is_some_and(|e| e == "toml") {
        let t: toml::Value =
            toml::from_str(&text).with_context(|| format!("{} is not TOML", p.display()))?;
        Ok(serde_json::to_value(t)?)
    } else {
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", p.display()))
    }
}

pub fn spec(a: &CurateArgs) -> anyhow::Result<CurateSpec> {
    let mut v = read_spec(a.spec.as_deref())?;
    let obj = v
        .as_object_mut()
        .context("the spec must be a table / object")?;
    obj.insert("dataset".into(), a.dataset.clone().into());
    let mut spec: CurateSpec = serde_json::from_value(v).context("invalid curation spec")?;
    if a.version.is_some() {
        spec.version = a.version;
    }
    for q in &a.queries {
        spec.queries.push(parse_query(q)?);
    }
    spec.keywords.all.extend(a.all.iter().cloned());
    spec.keywords.any.extend(a.any.iter().cloned());
    spec.keywords.none.extend(a.none.iter().cloned());
    if let Some(t) = a.dedup {
        spec.dedup = Some(Dedup {
            space: parse_space(&a.dedup_space)?,
            threshold: t,
        });
    }
    if a.limit.is_some() {
        spec.limit = a.limit;
    }
    if let Some(s) = &a.seed {
        spec.seed = s.clone();
    }
    if a.note.is_some() {
        spec.note = a.note.clone();
    }
    spec.check().map_err(anyhow::Error::msg)?;
    Ok(spec)
}

/// Curates and waits for the new version (following the job when the route stops waiting).
pub async fn curate(client: &Client, spec: &CurateSpec) -> anyhow::Result<CurateOutput> {
    match client.curate(spec).await? {
        Ok(out) => Ok(out),
        Err(record) => {
            let done = client.follow(&record.id.to_string(), |_| {}).await?;
            match (done.output, done.error) {
                (Some(atelier_contracts::JobOutput::Curated(out)), _) => Ok(out),
                (_, Some(e)) => bail!("curation failed: {} ({})", e.message, e.code),
                _ => bail!("the curate job ended {:?}", done.state),
            }
        }
    }
}

#[derive(clap::Subcommand)]
pub enum SearchCmd {
    /// Embed a dataset version into its search index (retrieval-indexer; incremental).
    Index {
        #[arg(long)]
        dataset: String,
        /// Default: the latest version.
        #[arg(long)]
        version: Option<u32>,
        /// clip_image, clip_text, caption (repeatable; default: every space the indexer has a
        /// model for).
        #[arg(long = "space")]
        spaces: Vec<String>,
        #[command(flatten)]
        remote: crate::remote::Remote,
    },
    /// Search a dataset's index by text, by one of its records, or by an image file.
    Search {
        #[command(flatten)]
        search: SearchArgs,
        #[command(flatten)]
        remote: crate::remote::Remote,
    },
    /// Curate a new dataset version (semantic queries, keywords, metadata, dedup, limit).
    Curate {
        #[command(flatten)]
        curate: CurateArgs,
        #[command(flatten)]
        remote: crate::remote::Remote,
    },
}

/// `atelier index | search | curate`.
pub async fn run(cmd: SearchCmd) -> anyhow::Result<()> {
    match cmd {
        SearchCmd::Index {
            dataset,
            version,
            spaces,
            remote,
        } => {
            let spaces = spaces
                .iter()
                .map(|s| {
                    atelier_contracts::Space::parse(s).with_context(|| {
                        format!("--space {s:?}: expected clip_image, clip_text or caption")
                    })
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let spec = atelier_contracts::JobSpec::Index(atelier_contracts::IndexSpec {
                dataset,
                version,
                spaces,
            });
            crate::remote::run_job(&remote, &spec).await
        }
        SearchCmd::Search {
            search: args,
            remote,
        } => {
            let client = remote.client()?;
            crate::remote::print_json(&search(&client, &args).await?)
        }
        SearchCmd::Curate {
            curate: args,
            remote,
        } => {
            let client = remote.client()?;
            let spec = spec(&args)?;
            let out = curate(&client, &spec).await?;
            crate::remote::print_json(&out)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_parse() {
        let q = parse_query("a red car@0.25").unwrap();
        assert_eq!(
            (q.text.as_str(), q.space, q.min_score),
            ("a red car", Space::ClipImage, 0.25)
        );
        let q = parse_query("caption: two cats, one dog@0.5").unwrap();
        assert_eq!(
            (q.text.as_str(), q.space),
            ("two cats, one dog", Space::Caption)
        );
        let q = parse_query("note: this@0.1").unwrap();
        assert_eq!(q.text, "note: this");
        assert!(parse_query("no score").is_err());
        assert!(parse_query("x@high").is_err());
    }
}
