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
    /// API key (from `atelier keygen`).
    #[arg(long = "key", env = "ATELIER_API_KEY", hide_env_values = true)]
    pub key: Option<String>,
}

impl Remote {
    pub fn client(&self) -> anyhow::Result<Client> {
        Client::new(&self.gateway, self.key.clone())
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
