//! `atelier gateway | check-store | dead-letters | keygen`: running and operating a cluster.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use atelier_kit::config::{NatsArgs, StoreArgs};

#[derive(clap::Subcommand)]
pub enum OpsCmd {
    /// Run only the HTTP gateway (cluster mode; the same as the `atelier-gateway` binary).
    Gateway(Box<atelier_gateway::Gateway>),
    /// Write and read back an object in the configured store (a real PUT), waiting up to
    /// --wait-secs for it to come up.
    CheckStore {
        #[arg(long, default_value_t = 0)]
        wait_secs: u64,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// Print dead letters (requests that could not be processed) as JSON lines.
    DeadLetters {
        /// Only this service's (e.g. checksum).
        #[arg(long)]
        service: Option<String>,
        #[command(flatten)]
        nats: NatsArgs,
    },
    /// Print a new API key and the NAME:SHA256:SCOPES entry to configure the gateway with.
    Keygen {
        #[arg(long, default_value = "default")]
        name: String,
        /// `*` or scopes joined with `+`: jobs:read, jobs:write, artifacts:read, artifacts:write.
        #[arg(long, default_value = "*")]
        scopes: String,
    },
}

pub async fn run(cmd: OpsCmd) -> anyhow::Result<()> {
    match cmd {
        OpsCmd::Gateway(gateway) => gateway.run().await,
        OpsCmd::CheckStore { wait_secs, store } => check_store(store, wait_secs).await,
        OpsCmd::DeadLetters { service, nats } => dead_letters(service, &nats).await,
        OpsCmd::Keygen { name, scopes } => {
            let (key, entry) =
                atelier_gateway::auth::generate_key(&name, &scopes).map_err(anyhow::Error::msg)?;
            println!("key:   {key}");
            println!("entry: {entry}");
            eprintln!("Give the key to the client (ATELIER_API_KEY / Authorization: Bearer); configure the gateway with the entry (--api-key or ATELIER_API_KEYS). The key is not stored anywhere.");
            Ok(())
        }
    }
}

async fn check_store(mut store: StoreArgs, wait_secs: u64) -> anyhow::Result<()> {
    store.store_retry_secs = 0;
    let s = atelier_kit::Store::open(&store)?;
    let key = atelier_contracts::ArtifactKey::parse("healthz/check").map_err(anyhow::Error::msg)?;
    let deadline = Instant::now() + Duration::from_secs(wait_secs);
    loop {
        let attempt = async {
            s.put_at(&key, bytes::Bytes::from_static(b"ok"), "text/plain")
                .await?;
            s.get_bytes(&key).await
        };
        match tokio::time::timeout(Duration::from_secs(5), attempt).await {
            Ok(Ok(b)) if &b[..] == b"ok" => {
                println!("store ok: {}", s.describe());
                return Ok(());
            }
            other if Instant::now() >= deadline => {
                anyhow::bail!(
                    "store {} did not accept a PUT: {:?}",
                    s.describe(),
                    other.map(|r| r.map(|_| ()))
                )
            }
            _ => tokio::time::sleep(Duration::from_millis(500)).await,
        }
    }
}

async fn dead_letters(service: Option<String>, nats: &NatsArgs) -> anyhow::Result<()> {
    use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy};
    use futures::StreamExt;
    let subject = match &service {
        Some(name) => atelier_contracts::Service::parse(name)
            .with_context(|| format!("unknown service {name:?}"))?
            .dead_letter_subject(),
        None => String::new(),
    };
    let bus = atelier_kit::Bus::connect(nats, "atelier-cli").await?;
    let stream = bus
        .js
        .get_stream(atelier_contracts::subjects::DLQ_STREAM)
        .await?;
    let consumer = stream
        .create_consumer(pull::Config {
            filter_subject: subject,
            deliver_policy: DeliverPolicy::All,
            ack_policy: AckPolicy::None,
            ..Default::default()
        })
        .await?;
    loop {
        let mut batch = consumer.fetch().max_messages(500).messages().await?;
        let mut got = 0;
        while let Some(m) = batch.next().await {
            let m = m.map_err(|e| anyhow::anyhow!("{e}"))?;
            println!("{}", String::from_utf8_lossy(&m.payload));
            got += 1;
        }
        if got == 0 {
            return Ok(());
        }
    }
}
