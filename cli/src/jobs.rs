//! `atelier upload | submit | job | cancel`: artifacts and jobs over the HTTP API.

use std::path::PathBuf;

use anyhow::Context as _;
use atelier_contracts::JobSpec;

use crate::remote::{print_json, Remote};

#[derive(clap::Subcommand)]
pub enum JobsCmd {
    /// Upload a file; prints the artifact reference.
    Upload {
        file: PathBuf,
        #[arg(long, default_value = "application/octet-stream")]
        content_type: String,
        #[command(flatten)]
        remote: Remote,
    },
    /// Submit a job from a JSON spec, e.g. '{"kind":"checksum","input":"sha256/ab/ab…"}'.
    Submit {
        spec: String,
        /// Follow the job's events until it ends.
        #[arg(long)]
        follow: bool,
        #[command(flatten)]
        remote: Remote,
    },
    /// Show a job (or follow it until it ends).
    Job {
        id: String,
        #[arg(long)]
        follow: bool,
        #[command(flatten)]
        remote: Remote,
    },
    /// Cancel a job.
    Cancel {
        id: String,
        #[command(flatten)]
        remote: Remote,
    },
}

pub async fn run(cmd: JobsCmd) -> anyhow::Result<()> {
    match cmd {
        JobsCmd::Upload {
            file,
            content_type,
            remote,
        } => {
            let bytes = tokio::fs::read(&file)
                .await
                .with_context(|| format!("reading {}", file.display()))?;
            print_json(&remote.client()?.upload(bytes.into(), &content_type).await?)
        }
        JobsCmd::Submit {
            spec,
            follow,
            remote,
        } => {
            let spec: JobSpec = serde_json::from_str(&spec).with_context(|| {
                format!(
                    "the spec is not a valid job spec; known kinds: {}",
                    JobSpec::KINDS.join(", ")
                )
            })?;
            let record = remote.client()?.submit(&spec).await?;
            if follow {
                show(&remote, &record.id.to_string(), true).await
            } else {
                print_json(&record)
            }
        }
        JobsCmd::Job { id, follow, remote } => show(&remote, &id, follow).await,
        JobsCmd::Cancel { id, remote } => print_json(&remote.client()?.cancel(&id).await?),
    }
}

async fn show(remote: &Remote, id: &str, follow: bool) -> anyhow::Result<()> {
    let client = remote.client()?;
    if follow {
        let done = client
            .follow(id, |r| eprintln!("{}: {:?}", r.id, r.state))
            .await?;
        print_json(&done)
    } else {
        print_json(&client.job(id).await?)
    }
}
