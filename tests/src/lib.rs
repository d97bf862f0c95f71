//! Harness for atelier's end-to-end tests: real nats-server, real SeaweedFS (S3), real service
//! processes, on loopback with free ports and temporary directories.
//!
//! - [`Cluster`]: one nats-server per test (its own JetStream dir) plus a store (a per-test prefix
//!   in the shared SeaweedFS bucket, or a local directory), with helpers to spawn service
//!   processes, run the gateway in-process and read streams.
//! - [`Seaweed`]: `weed mini` with every port chosen free. [`shared_seaweed`] starts one per test
//!   binary (it opens ~13 ports; one per test would be slow and collide).
//!
//! Needs `scripts/bootstrap` (tools in `.tools/bin`) and the service binaries built
//! (`cargo build --workspace --bins`); `scripts/test` does both.

pub mod webdriver;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use atelier_contracts::{JobId, JobRecord, JobState};
use atelier_kit::config::{NatsArgs, ServiceArgs, StoreArgs, TelemetryArgs, WorkerArgs};
use atelier_kit::jobstate::JobStates;
use atelier_kit::nats_server::{die_with_parent, NatsServer, NatsServerOptions};
use atelier_kit::telemetry::Metrics;
use atelier_kit::{Bus, Store};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

pub const S3_ACCESS_KEY: &str = "atelier";
pub const S3_SECRET_KEY: &str = "atelier-test-secret";
pub const S3_BUCKET: &str = "atelier";

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// Copies a folder tree (a test's models directory from the conformance cases' folders).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        match e.path().is_dir() {
            true => copy_dir(&e.path(), &to.join(e.file_name())),
            false => {
                std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
            }
        }
    }
}

/// The repository's copy of the reference data (`tests/conformance/`, refreshed from the
/// team's reference data by `scripts/sync-conformance`).
pub fn conformance_dir() -> PathBuf {
    repo_root().join("tests/conformance")
}

/// A tool from `.tools/bin` (installed by `scripts/bootstrap`).
pub fn tool(name: &str) -> PathBuf {
    let p = repo_root().join(".tools/bin").join(name);
    assert!(
        p.is_file(),
        "{} is missing: run scripts/bootstrap first",
        p.display()
    );
    p
}

/// A workspace binary: in `ATELIER_BIN_DIR` when set (a benchmark built in one profile running
/// binaries of another), else next to this test executable (`target/<profile>/<name>`).
pub fn bin(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("ATELIER_BIN_DIR") {
        let p = PathBuf::from(dir).join(name);
        if p.is_file() {
            return p;
        }
    }
    let exe = std::env::current_exe().expect("current exe");
    for dir in exe.ancestors().skip(1).take(3) {
        let p = dir.join(name);
        if p.is_file() {
            return p;
        }
    }
    panic!("binary {name} not found near {}: run `cargo build --workspace --bins` first (scripts/test does)", exe.display());
}

/// A running `weed mini` with an S3 endpoint.
pub struct Seaweed {
    pub dir: PathBuf,
    pub s3_port: u16,
    ports: Vec<u16>,
    child: Option<Child>,
}

impl Seaweed {
    pub fn start(dir: &Path) -> anyhow::Result<Self> {
        // On a (nearly) full disk weed starts but registers no volume capacity, and every write
        // then fails with "no volume server capacity registered yet": say so at once rather
        // than after a minute of retries per test binary.
        if let Some(free) = free_bytes(dir) {
            if free < MIN_FREE_BYTES {
                bail!(
                    "only {} MiB free under {}: SeaweedFS needs at least {} MiB to take writes; free some space or point TMPDIR at a larger disk",
                    free >> 20,
                    dir.display(),
                    MIN_FREE_BYTES >> 20
                );
            }
        }
        // 13 consecutive-free ports are not needed: each flag gets its own free port.
        // Held open together, so the 13 ports are distinct (one bind-and-release at a time can
        // hand the same port out twice), then released for weed.
        let held: Vec<std::net::TcpListener> = (0..13)
            .map(|_| std::net::TcpListener::bind("127.0.0.1:0"))
            .collect::<Result<_, _>>()?;
        let ports: Vec<u16> = held
            .iter()
            .map(|l| l.local_addr().map(|a| a.port()))
            .collect::<Result<_, _>>()?;
        drop(held);
        let mut s = Self {
            dir: dir.to_path_buf(),
            s3_port: ports[6],
            ports,
            child: None,
        };
        s.spawn()?;
        Ok(s)
    }

    pub fn s3_endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.s3_port)
    }

    fn spawn(&mut self) -> anyhow::Result<()> {
        let data = self.dir.join("data");
        std::fs::create_dir_all(&data)?;
        let config = self.dir.join("s3.json");
        std::fs::write(
            &config,
            serde_json::json!({"identities":[{"name":"atelier","credentials":[{"accessKey":S3_ACCESS_KEY,"secretKey":S3_SECRET_KEY}],"actions":["Admin","Read","Write","List","Tagging"]}]}).to_string(),
        )?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("weed.log"))?;
        let p = &self.ports;
        let mut cmd = Command::new(tool("weed"));
        cmd.arg("mini")
            .arg(format!("-dir={}", data.display()))
            .args([
                "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1",
                "-admin.ui=false",
                "-master.telemetry=false",
            ])
            .arg(format!("-s3.config={}", config.display()))
            .arg(format!("-bucket={S3_BUCKET}"))
            .arg(format!("-master.port={}", p[0]))
            .arg(format!("-master.port.grpc={}", p[1]))
            .arg(format!("-volume.port={}", p[2]))
            .arg(format!("-volume.port.grpc={}", p[3]))
            .arg(format!("-filer.port={}", p[4]))
            .arg(format!("-filer.port.grpc={}", p[5]))
            .arg(format!("-s3.port={}", p[6]))
            .arg(format!("-s3.port.grpc={}", p[7]))
            .arg(format!("-s3.port.iceberg={}", p[8]))
            .arg(format!("-webdav.port={}", p[9]))
            .arg(format!("-admin.port={}", p[10]))
            .arg(format!("-admin.port.grpc={}", p[11]))
            .arg(format!("-s3.port.lance={}", p[12]))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        die_with_parent(&mut cmd);
        self.child = Some(cmd.spawn().context("starting weed mini")?);
        self.wait_ready(Duration::from_secs(60))
    }

    /// Ready means a real PUT and GET through S3 succeed (a TCP check is not enough).
    fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let store = Store::open(&self.store_args("readiness", 2))?;
        let key = atelier_contracts::ArtifactKey::parse("probe/ready").expect("valid key");
        loop {
            if let Some(c) = self.child.as_mut() {
                if let Some(status) = c.try_wait()? {
                    bail!(
                        "weed exited with {status}; see {}",
                        self.dir.join("weed.log").display()
                    );
                }
            }
            let ok = rt.block_on(async {
                tokio::time::timeout(Duration::from_secs(5), async {
                    store
                        .put_at(&key, bytes::Bytes::from_static(b"ok"), "text/plain")
                        .await?;
                    store.get_bytes(&key).await
                })
                .await
            });
            if let Ok(Ok(b)) = ok {
                if &b[..] == b"ok" {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                let log = self.dir.join("weed.log");
                bail!(
                    "SeaweedFS S3 did not accept a PUT within {timeout:?}; {}; weed's own disk report: {}; last lines of {}:\n{}",
                    free_space(&self.dir),
                    disk_report(&log),
                    log.display(),
                    log_tail(&log, 25)
                );
            }
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    /// Store flags for a prefix of the bucket.
    pub fn store_args(&self, prefix: &str, retry_secs: u64) -> StoreArgs {
        StoreArgs {
            store: format!("s3://{S3_BUCKET}/{prefix}"),
            s3_endpoint: Some(self.s3_endpoint()),
            s3_region: "us-east-1".into(),
            s3_access_key_id: Some(S3_ACCESS_KEY.into()),
            s3_secret_access_key: Some(S3_SECRET_KEY.into()),
            store_retry_secs: retry_secs,
        }
    }

    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts again on the same ports and data directory.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.spawn()
    }
}

impl Drop for Seaweed {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The last `n` lines of a log file (for error messages; the file may go with its temp dir).
fn log_tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Below this much free space the tests' SeaweedFS cannot store anything.
const MIN_FREE_BYTES: u64 = 256 << 20;

/// Bytes an unprivileged process may still write on the file system holding `dir`.
fn free_bytes(dir: &Path) -> Option<u64> {
    let path = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).ok()?;
    // SAFETY: statvfs writes into the zeroed struct we own; the path is NUL-terminated.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(path.as_ptr(), &mut st) } != 0 {
        return None;
    }
    Some(st.f_bavail as u64 * st.f_frsize as u64)
}

/// The free space of the file system holding `dir`, for error messages.
fn free_space(dir: &Path) -> String {
    match free_bytes(dir) {
        Some(free) => format!("{} MiB free under {}", free >> 20, dir.display()),
        None => "free space unknown".into(),
    }
}

/// The lines of weed's start-up banner that say how much space and how many volumes it saw.
fn disk_report(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text
        .lines()
        .filter(|l| {
            l.contains("Free Space") || l.contains("Free Volumes") || l.contains("Volume Size")
        })
        .map(str::trim)
        .take(3)
        .collect();
    if lines.is_empty() {
        "none printed".into()
    } else {
        lines.join(", ")
    }
}

/// Removes the data folders of shared SeaweedFS instances whose test process has exited: the
/// static that owns one is never dropped, so each test binary's run would otherwise leave its
/// ~250 MB behind. Folders are named `atelier-weed-<pid>-…`; a live pid's folder is kept.
fn sweep_stale_weed_dirs() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let Some(rest) = name.strip_prefix("atelier-weed-") else {
            continue;
        };
        let pid = rest.split('-').next().and_then(|p| p.parse::<i32>().ok());
        let alive = pid.is_some_and(|pid| {
            // SAFETY: signal 0 only checks that the process exists.
            let exists = unsafe { libc::kill(pid, 0) == 0 };
            exists || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM)
        });
        if !alive {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// One SeaweedFS for the whole test binary, started on a thread that never exits (its children
/// die with the process, not with the test that happened to start it). A start that does not come
/// up is retried twice, on fresh ports and a fresh directory (free ports are picked by binding
/// port 0, so another process can take one before weed binds it).
pub fn shared_seaweed() -> &'static (String, u16) {
    static SHARED: OnceLock<(String, u16)> = OnceLock::new();
    SHARED.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut errors = Vec::new();
            sweep_stale_weed_dirs();
            for _ in 0..3 {
                let dir = tempfile::Builder::new()
                    .prefix(&format!("atelier-weed-{}-", std::process::id()))
                    .tempdir()
                    .expect("tempdir");
                match Seaweed::start(dir.path()) {
                    Ok(w) => {
                        tx.send(Ok((w.s3_endpoint(), w.s3_port))).ok();
                        let _keep = (w, dir);
                        loop {
                            std::thread::park();
                        }
                    }
                    Err(e) => {
                        eprintln!("SeaweedFS did not start (will retry): {e:#}");
                        errors.push(format!("{e:#}"));
                    }
                }
            }
            tx.send(Err(errors.join("\n---\n"))).ok();
        });
        rx.recv()
            .expect("seaweed thread")
            .unwrap_or_else(|e| panic!("starting SeaweedFS: {e}"))
    })
}

/// Store flags for a fresh prefix in the shared SeaweedFS.
pub fn shared_s3_store(retry_secs: u64) -> StoreArgs {
    let (endpoint, _) = shared_seaweed();
    StoreArgs {
        store: format!("s3://{S3_BUCKET}/t-{}", uuid::Uuid::now_v7()),
        s3_endpoint: Some(endpoint.clone()),
        s3_region: "us-east-1".into(),
        s3_access_key_id: Some(S3_ACCESS_KEY.into()),
        s3_secret_access_key: Some(S3_SECRET_KEY.into()),
        store_retry_secs: retry_secs,
    }
}

/// One test's atelier: its own nats-server and store.
pub struct Cluster {
    pub tmp: tempfile::TempDir,
    pub nats: NatsServer,
    /// The other nodes of a three-node NATS cluster ([`Cluster::start_three_node`]).
    pub peers: Vec<NatsServer>,
    /// Every node's client URL, comma-separated (what services are given).
    pub nats_urls: String,
    /// Replicas of streams and buckets.
    pub replicas: usize,
    pub store_args: StoreArgs,
    pub bus: Bus,
    pub store: Store,
    pub states: JobStates,
    workers: Vec<Child>,
    /// The model registry the in-process gateway's A1111 routes see.
    pub models: Option<PathBuf>,
}

impl Cluster {
    pub async fn start(store_args: StoreArgs) -> anyhow::Result<Self> {
        Self::start_with(store_args, None, None).await
    }

    /// With a nats-server config file (e.g. infra/nats/nats-server.conf) and the admin user the
    /// harness connects as.
    pub async fn start_with(
        store_args: StoreArgs,
        nats_config: Option<PathBuf>,
        admin: Option<(&str, &str)>,
    ) -> anyhow::Result<Self> {
        let tmp = tempfile::Builder::new().prefix("atelier-test-").tempdir()?;
        Self::start_in(tmp, store_args, nats_config, admin).await
    }

    async fn start_in(
        tmp: tempfile::TempDir,
        store_args: StoreArgs,
        nats_config: Option<PathBuf>,
        admin: Option<(&str, &str)>,
    ) -> anyhow::Result<Self> {
        let nats = tokio::task::block_in_place(|| {
            NatsServer::start(NatsServerOptions {
                store_dir: tmp.path().join("nats"),
                port: 0,
                log_file: tmp.path().join("nats.log"),
                config: nats_config,
            })
        })?;
        let nats_args = NatsArgs {
            nats_url: Some(nats.url()),
            nats_user: admin.map(|a| a.0.to_owned()),
            nats_password: admin.map(|a| a.1.to_owned()),
            ..Default::default()
        };
        let bus = Bus::connect(&nats_args, "atelier-test").await?;
        bus.ensure_topology().await?;
        Self::assemble(tmp, vec![nats], bus, store_args, 1).await
    }

    /// The harness around running NATS nodes (the first is `nats`) and a connected bus.
    async fn assemble(
        tmp: tempfile::TempDir,
        mut nodes: Vec<NatsServer>,
        bus: Bus,
        store_args: StoreArgs,
        replicas: usize,
    ) -> anyhow::Result<Self> {
        let nats_urls = nodes
            .iter()
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",");
        let store = Store::open(&store_args)?;
        let states = JobStates::new(bus.jobs_kv().await?);
        let nats = nodes.remove(0);
        Ok(Self {
            tmp,
            nats,
            peers: nodes,
            nats_urls,
            replicas,
            store_args,
            bus,
            store,
            states,
            workers: Vec::new(),
            models: None,
        })
    }

    /// With a local-directory store inside the test's temporary folder (removed with it).
    pub async fn local() -> anyhow::Result<Self> {
        let tmp = tempfile::Builder::new().prefix("atelier-test-").tempdir()?;
        let store = StoreArgs {
            store: tmp.path().join("objects").display().to_string(),
            ..Default::default()
        };
        Self::start_in(tmp, store, None, None).await
    }

    /// Three nats-servers in one JetStream cluster (routes on loopback), streams and buckets
    /// replicated on all three: any one node can die without losing a job.
    pub async fn start_three_node(store_args: StoreArgs) -> anyhow::Result<Self> {
        let tmp = tempfile::Builder::new().prefix("atelier-test-").tempdir()?;
        let routes: Vec<u16> = (0..3)
            .map(|_| atelier_kit::nats_server::free_port())
            .collect::<Result<_, _>>()?;
        let route_urls: Vec<String> = routes
            .iter()
            .map(|p| format!("nats://127.0.0.1:{p}"))
            .collect();
        let mut nodes = Vec::new();
        for (i, port) in routes.iter().enumerate() {
            let conf = tmp.path().join(format!("n{i}.conf"));
            std::fs::write(
                &conf,
                format!(
                    "server_name: n{i}\njetstream {{ sync_interval: always }}\n\
                     cluster {{ name: atelier, listen: 127.0.0.1:{port}, routes: [{}] }}\n",
                    route_urls.join(", ")
                ),
            )?;
            let opts = NatsServerOptions {
                store_dir: tmp.path().join(format!("nats{i}")),
                port: 0,
                log_file: tmp.path().join(format!("nats{i}.log")),
                config: Some(conf),
            };
            nodes.push(tokio::task::block_in_place(|| NatsServer::start(opts))?);
        }
        let nats_urls = nodes
            .iter()
            .map(NatsServer::url)
            .collect::<Vec<_>>()
            .join(",");
        let nats_args = NatsArgs {
            nats_url: Some(nats_urls.clone()),
            nats_replicas: 3,
            ..Default::default()
        };
        let bus = Bus::connect(&nats_args, "atelier-test").await?;
        // JetStream answers once the nodes have elected a meta leader.
        let deadline = Instant::now() + Duration::from_secs(60);
        while let Err(e) = bus.ensure_topology().await {
            anyhow::ensure!(Instant::now() < deadline, "cluster not ready: {e:#}");
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        Self::assemble(tmp, nodes, bus, store_args, 3).await
    }

    pub fn nats_args(&self) -> NatsArgs {
        NatsArgs {
            nats_url: Some(self.nats_urls.clone()),
            nats_replicas: self.replicas,
            ..Default::default()
        }
    }

    pub fn service_args(&self, worker: WorkerArgs) -> ServiceArgs {
        ServiceArgs {
            nats: self.nats_args(),
            store: self.store_args.clone(),
            telemetry: TelemetryArgs {
                log_format: Default::default(),
                log: "info".into(),
                health_addr: "127.0.0.1:0".parse().expect("addr"),
            },
            worker,
        }
    }

    /// Starts a service binary (e.g. `atelier-checksum`) as its own process; returns its pid.
    pub fn spawn_service(
        &mut self,
        binary: &str,
        extra_env: &[(&str, String)],
    ) -> anyhow::Result<u32> {
        let log_path = self
            .tmp
            .path()
            .join(format!("{binary}-{}.log", self.workers.len()));
        let log = std::fs::File::create(&log_path)?;
        let s = &self.store_args;
        let mut cmd = Command::new(bin(binary));
        cmd.env("ATELIER_NATS_URL", &self.nats_urls)
            .env("ATELIER_NATS_REPLICAS", self.replicas.to_string())
            .env("ATELIER_STORE", &s.store)
            .env("ATELIER_STORE_RETRY_SECS", s.store_retry_secs.to_string())
            .env("ATELIER_S3_REGION", &s.s3_region)
            .env("ATELIER_HEALTH_ADDR", "127.0.0.1:0")
            .env("ATELIER_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        if let Some(e) = &s.s3_endpoint {
            cmd.env("ATELIER_S3_ENDPOINT", e);
        }
        if let Some(k) = &s.s3_access_key_id {
            cmd.env("AWS_ACCESS_KEY_ID", k);
        }
        if let Some(k) = &s.s3_secret_access_key {
            cmd.env("AWS_SECRET_ACCESS_KEY", k);
        }
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        die_with_parent(&mut cmd);
        let child = cmd.spawn().with_context(|| format!("starting {binary}"))?;
        let pid = child.id();
        self.workers.push(child);
        Ok(pid)
    }

    /// Pids of service processes still running.
    pub fn live_services(&mut self) -> Vec<u32> {
        self.workers
            .retain_mut(|c| matches!(c.try_wait(), Ok(None)));
        self.workers.iter().map(|c| c.id()).collect()
    }

    /// SIGKILL one service process.
    pub fn kill9(&mut self, pid: u32) {
        if let Some(c) = self.workers.iter_mut().find(|c| c.id() == pid) {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Sends `signal` to every service process and waits for them to exit.
    pub fn stop_services(
        &mut self,
        signal: i32,
        timeout: Duration,
    ) -> Vec<std::process::ExitStatus> {
        let mut out = Vec::new();
        for c in &mut self.workers {
            // SAFETY: kill(2) on our own child.
            unsafe {
                libc::kill(c.id() as i32, signal);
            }
        }
        let deadline = Instant::now() + timeout;
        for c in &mut self.workers {
            loop {
                if let Ok(Some(s)) = c.try_wait() {
                    out.push(s);
                    break;
                }
                if Instant::now() > deadline {
                    let _ = c.kill();
                    if let Ok(s) = c.wait() {
                        out.push(s);
                    }
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        self.workers.clear();
        out
    }

    /// Runs the gateway in this process; returns its base URL. `keys` empty means no auth.
    pub async fn gateway(
        &self,
        keys: Vec<String>,
        mut args: atelier_gateway::GatewayArgs,
        shutdown: CancellationToken,
    ) -> anyhow::Result<String> {
        args.addr = "127.0.0.1:0".parse()?;
        args.insecure_no_auth = keys.is_empty();
        args.api_keys = keys;
        let app = atelier_gateway::api::AppState::new(
            self.bus.clone(),
            self.store.clone(),
            Arc::new(Metrics::default()),
            args.limits(),
            shutdown.clone(),
        )
        .await?
        .with_models(self.models.clone());
        let (addr, _task) = atelier_gateway::serve(&args, app, shutdown).await?;
        Ok(format!("http://{addr}"))
    }

    /// Runs the gateway without auth in this process and returns a client for it.
    pub async fn open_gateway(&self, shutdown: &CancellationToken) -> atelier_client::Client {
        let base = self
            .gateway(vec![], Default::default(), shutdown.clone())
            .await
            .expect("gateway starts");
        atelier_client::Client::new(&base, None).expect("client")
    }

    /// Waits until every job is terminal; returns the records.
    pub async fn wait_terminal(
        &self,
        ids: &[JobId],
        timeout: Duration,
    ) -> anyhow::Result<Vec<JobRecord>> {
        let deadline = Instant::now() + timeout;
        loop {
            let mut done = Vec::new();
            let mut pending = 0;
            for id in ids {
                match self.states.get(*id).await {
                    Ok(Some((r, _))) if r.state.is_terminal() => done.push(r),
                    _ => pending += 1,
                }
            }
            if pending == 0 {
                return Ok(done);
            }
            if Instant::now() > deadline {
                let sample: Vec<String> =
                    futures::future::join_all(ids.iter().take(400).map(|id| self.states.get(*id)))
                        .await
                        .into_iter()
                        .filter_map(|r| r.ok().flatten())
                        .filter(|(r, _)| !r.state.is_terminal())
                        .take(5)
                        .map(|(r, _)| {
                            format!(
                                "{} {:?} attempts {} err {:?}",
                                r.id, r.state, r.attempts, r.error
                            )
                        })
                        .collect();
                bail!(
                    "{pending} of {} jobs not finished after {timeout:?}; e.g. {sample:?}",
                    ids.len()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Every message currently in `stream` on `subject` (read with an ephemeral consumer). A read
    /// that fails (a JetStream cluster electing new leaders after a node was killed answers
    /// "timed out" for a while) is started again, for up to 60 s.
    pub async fn read_stream(
        &self,
        stream: &str,
        subject: &str,
    ) -> anyhow::Result<Vec<async_nats::jetstream::Message>> {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match self.read_stream_once(stream, subject).await {
                Ok(m) => return Ok(m),
                Err(e) if Instant::now() < deadline => {
                    eprintln!("reading {stream}: {e:#}; trying again");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn read_stream_once(
        &self,
        stream: &str,
        subject: &str,
    ) -> anyhow::Result<Vec<async_nats::jetstream::Message>> {
        use async_nats::jetstream::consumer::{pull, DeliverPolicy};
        let s = self.bus.js.get_stream(stream).await?;
        let total = s.get_info().await?.state.messages;
        if total == 0 {
            return Ok(Vec::new());
        }
        let consumer = s
            .create_consumer(pull::Config {
                filter_subject: subject.into(),
                deliver_policy: DeliverPolicy::All,
                ack_policy: async_nats::jetstream::consumer::AckPolicy::None,
                inactive_threshold: Duration::from_secs(30),
                ..Default::default()
            })
            .await?;
        let mut out = Vec::new();
        loop {
            let mut batch = consumer
                .fetch()
                .max_messages(1000)
                .expires(Duration::from_millis(500))
                .messages()
                .await?;
            let mut got = 0;
            while let Some(m) = batch.next().await {
                out.push(m.map_err(|e| anyhow::anyhow!("{e}"))?);
                got += 1;
            }
            if got == 0 {
                break;
            }
        }
        Ok(out)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for c in &mut self.workers {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Deterministic bytes.
/// A sample scene: PNG, or JPEG for seeds ≥ 100 (the same scene as `seed - 100`).
pub fn scene_image(seed: u64) -> Vec<u8> {
    if seed >= 100 {
        atelier_ingest::samples::scene_bytes(seed - 100, 128, 96, image::ImageFormat::Jpeg)
    } else {
        atelier_ingest::samples::scene_bytes(seed, 128, 96, image::ImageFormat::Png)
    }
}

/// Stores the images and writes version `version` of `dataset` with `rows` (plus one rejected
/// row), as the quality filter would.
pub async fn write_version(
    c: &Cluster,
    dataset: &str,
    version: u32,
    rows: &[(u64, &str, atelier_contracts::dataset::Tier, &str)],
) -> Vec<atelier_contracts::DatasetRow> {
    write_version_to(&c.bus, &c.store, dataset, version, rows).await
}

/// [`write_version`] into any bus and store (an `atelier up`'s, say).
pub async fn write_version_to(
    bus: &Bus,
    store: &Store,
    dataset: &str,
    version: u32,
    rows: &[(u64, &str, atelier_contracts::dataset::Tier, &str)],
) -> Vec<atelier_contracts::DatasetRow> {
    let mut out = Vec::new();
    for (i, (seed, caption, tier, tag)) in rows
        .iter()
        .chain(&[(
            42,
            "rejected: a refusal",
            atelier_contracts::dataset::Tier::Bronze,
            "junk",
        )])
        .enumerate()
    {
        let bytes = scene_image(*seed);
        let (r, _) = store.put_bytes(bytes.into(), "image/png").await.unwrap();
        let rejected = *seed == 42;
        out.push(atelier_contracts::DatasetRow {
            image_id: r.sha256[..16].to_owned(),
            image_key: r.key.clone(),
            sha256: r.sha256.clone(),
            format: Some(if *seed >= 100 { "jpeg" } else { "png" }.into()),
            width: Some(128 + i as u32),
            height: Some(96),
            caption: Some(caption.to_string()),
            caption_source: None,
            language: Some("eng".into()),
            nsfw: None,
            clip_score: None,
            words: caption.split_whitespace().count() as u32,
            signals: vec![],
            decision: if rejected {
                atelier_contracts::dataset::Decision::Reject
            } else {
                atelier_contracts::dataset::Decision::Accept
            },
            tier: (!rejected).then_some(*tier),
            split: (!rejected).then_some(atelier_contracts::dataset::Split::Train),
            tags: vec![tag.to_string()],
            source: Some(if *seed % 2 == 0 { "web" } else { "upload" }.into()),
            license: None,
            metadata: Default::default(),
            augmentation: None,
            negatives: vec![],
            paraphrases: vec![],
        });
    }
    out.sort_by(|a, b| a.sha256.cmp(&b.sha256));
    let mut data = Vec::new();
    for r in &out {
        serde_json::to_writer(&mut data, r).unwrap();
        data.push(b'\n');
    }
    let (data, _) = store
        .put_bytes(data.into(), "application/x-ndjson")
        .await
        .unwrap();
    let manifest = atelier_contracts::DatasetManifest {
        schema_version: 1,
        dataset: dataset.into(),
        version,
        parent: (version > 1).then_some(version - 1),
        created_at: chrono::Utc::now(),
        job: atelier_contracts::JobId::new(),
        policy: Default::default(),
        split: Default::default(),
        caption_sources: std::collections::BTreeMap::new(),
        counts: atelier_contracts::dataset::VersionCounts::of_rows(&out),
        data,
        note: None,
        curation: None,
        augmentation: None,
    };
    bus.datasets_kv()
        .await
        .unwrap()
        .put(
            format!("{dataset}.{version}"),
            serde_json::to_vec(&manifest).unwrap().into(),
        )
        .await
        .unwrap();
    out
}

/// `atelier up` as a user runs it: the real binary, its own nats-server (on `nats_port`, 0 picks
/// one), the local store under `data_dir`, no auth (loopback), the gateway on `port`, output to
/// `log`. Callers add flags and spawn it.
pub fn atelier_up(data_dir: &Path, port: u16, nats_port: u16, log: &Path) -> Command {
    atelier_up_keyed(data_dir, port, nats_port, log, None)
}

/// [`atelier_up`] with authentication: `key_entry` (`NAME:SHA256:SCOPES`, from
/// `atelier_gateway::auth::generate_key`) as its only API key; `None` runs without auth.
pub fn atelier_up_keyed(
    data_dir: &Path,
    port: u16,
    nats_port: u16,
    log: &Path,
    key_entry: Option<&str>,
) -> Command {
    let log = std::fs::File::create(log).expect("creating the log");
    let mut cmd = Command::new(bin("atelier"));
    cmd.arg("up");
    match key_entry {
        Some(entry) => cmd.env("ATELIER_API_KEYS", entry),
        None => cmd.arg("--insecure-no-auth"),
    };
    cmd.arg("--nats-port")
        .arg(nats_port.to_string())
        .arg("--addr")
        .arg(format!("127.0.0.1:{port}"))
        .arg("--data-dir")
        .arg(data_dir)
        .env("ATELIER_NATS_SERVER", tool("nats-server"))
        .env_remove("ATELIER_NATS_URL")
        .env_remove("ATELIER_STORE")
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log);
    die_with_parent(&mut cmd);
    cmd
}

/// Waits up to a minute for `base`'s `/healthz` to answer 200.
pub async fn wait_healthy(base: &str) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !reqwest::get(format!("{base}/healthz"))
        .await
        .is_ok_and(|r| r.status() == 200)
    {
        assert!(Instant::now() < deadline, "{base} did not become healthy");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Drill counts: `ATELIER_DRILL=full` (`scripts/drill --full`, by hand) runs `full`; otherwise
/// the small count the test suite (and CI) runs.
pub fn drill_count(ci: usize, full: usize) -> usize {
    if std::env::var("ATELIER_DRILL").is_ok_and(|v| v == "full") {
        full
    } else {
        ci
    }
}

pub fn bytes_of(seed: u64, len: usize) -> bytes::Bytes {
    atelier_cli::demo::sample_bytes(seed, len).into()
}

pub fn all_succeeded(records: &[JobRecord]) -> bool {
    records.iter().all(|r| r.state == JobState::Succeeded)
}

/// Loads an export with Hugging Face `datasets` (`tests/python/load_exports.py FORMAT DIR`) and
/// returns what it saw.
pub fn hf_load(format: &str, dir: &std::path::Path) -> serde_json::Value {
    let script = repo_root().join("tests/python/load_exports.py");
    let cache = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(tool("python"))
        .arg(script)
        .arg(format)
        .arg(dir)
        .env("HF_HOME", cache.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "datasets could not load the {format} export: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}
