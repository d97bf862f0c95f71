//! Talking to a running gateway: the `--gateway`/`--key` flags and how a job's end is printed.

use atelier_client::Client;
use atelier_contracts::{JobRecord, JobSpec, JobState};

/// Where the gateway is and the key to use, flattened into every remote command.
#[derive(clap::Args, Clone)]
pub struct Remote {
    /// Gateway base URL.
    #[arg(
        long = "gateway",
        env = "ATELIER_GATEWAY",
        default_value = "http://127.0.0.1:7860"
    )]
    pub gateway: String,
    /// API key (from `atelier keygen`), from the environment only: a command line is visible to
    /// every user of the machine (`ps`).
    #[arg(skip = std::env::var("ATELIER_API_KEY").ok().filter(|k| !k.is_empty()))]
    pub key: Option<String>,
    /// A file holding the API key (its first line).
    #[arg(long = "key-file", env = "ATELIER_API_KEY_FILE")]
    pub key_file: Option<std::path::PathBuf>,
    /// Refused: keys on the command line leak through `ps`.
    #[arg(long = "key", hide = true)]
    pub key_in_argv: Option<String>,
    /// The queue of the jobs this command creates: workers take every high job before any
    /// normal one and every normal one before any low one.
    #[arg(
        long = "priority",
        env = "ATELIER_PRIORITY",
        default_value = "normal",
        value_parser = ["high", "normal", "low"]
    )]
    pub priority: String,
}

impl Remote {
    pub fn client(&self) -> anyhow::Result<Client> {
        let priority = atelier_contracts::Priority::parse(&self.priority).unwrap_or_default();
        Ok(Client::new(&self.gateway, self.api_key()?)?.with_priority(priority))
    }

    /// The key from `--key-file` or `ATELIER_API_KEY`.
    fn api_key(&self) -> anyhow::Result<Option<String>> {
        if self.key_in_argv.is_some() {
            anyhow::bail!("--key puts the API key where every user of this machine can read it (ps); set ATELIER_API_KEY or pass --key-file PATH instead");
        }
        match &self.key_file {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|e| {
                    anyhow::anyhow!("reading the API key from {}: {e}", path.display())
                })?;
                let key = text.lines().next().unwrap_or_default().trim().to_string();
                if key.is_empty() {
                    anyhow::bail!("{} holds no API key on its first line", path.display());
                }
                Ok(Some(key))
            }
            None => Ok(self.key.clone()),
        }
    }
}

pub fn print_json<T: serde::Serialize>(v: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Submits a job, follows it, prints its output; fails with the job's error.
pub async fn run_job(remote: &Remote, spec: &JobSpec) -> anyhow::Result<()> {
    let client = remote.client()?;
    let record = client.submit(spec).await?;
    eprintln!("job {} queued", record.id);
    let done = client
        .follow(&record.id.to_string(), |r| {
            if let Some(p) = &r.progress {
                eprintln!(
                    "{:?} {:.0}% {}",
                    r.state,
                    p.fraction * 100.0,
                    p.message.as_deref().unwrap_or("")
                );
            }
        })
        .await?;
    report(&done)
}

/// A finished job's output, or its error as the command's.
pub fn report(done: &JobRecord) -> anyhow::Result<()> {
    match (done.state, &done.output, &done.error) {
        (JobState::Succeeded, Some(out), _) => print_json(out),
        (state, _, Some(e)) => {
            anyhow::bail!("job {} {state:?}: {} ({})", done.id, e.message, e.code)
        }
        (state, _, _) => anyhow::bail!("job {} ended {state:?}", done.id),
    }
}
