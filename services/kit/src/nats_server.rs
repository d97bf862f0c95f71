//! The official nats-server binary as a child process: `atelier up` runs one when no
//! `ATELIER_NATS_URL` is given, and the tests run one per test.
//!
//! The binary is found at `$ATELIER_NATS_SERVER`, then `.tools/bin/nats-server` (what
//! `scripts/bootstrap` installs) in the current directory or any parent, then on `PATH`.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};

/// Finds an executable named `name`: `$env_var`, `$ATELIER_TOOLS_DIR/bin/<name>`, `.tools/bin/<name>`
/// beside an ancestor of the running binary (target/<profile>/atelier → ../../.tools), `PATH` —
/// never by the working directory.
pub fn find_tool(name: &str, env_var: &str) -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(env_var) {
        return Some(PathBuf::from(p));
    }
    if let Some(dir) = std::env::var_os("ATELIER_TOOLS_DIR") {
        let candidate = PathBuf::from(dir).join("bin").join(name);
        if candidate.is_file() {
            return Some(candidate);
        }
    }
    if let Ok(exe) = std::env::current_exe() {
        for anc in exe.ancestors().skip(1).take(4) {
            let candidate = anc.join(".tools/bin").join(name);
            if candidate.is_file() {
                return Some(candidate);
            }
        }
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join(name))
            .find(|p| p.is_file())
    })
}

/// A free TCP port on 127.0.0.1 (bound and released; good enough for tests and local runs).
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Makes a child die with the thread that spawned it (Linux), so a killed parent leaves no server
/// holding its port.
pub fn die_with_parent(cmd: &mut Command) {
    #[cfg(target_os = "linux")]
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
    }
}

#[derive(Debug, Clone)]
pub struct NatsServerOptions {
    /// JetStream storage directory (kept across restarts: jobs survive).
    pub store_dir: PathBuf,
    /// Port on 127.0.0.1; 0 picks a free one.
    pub port: u16,
    /// Where the server's log goes (appended).
    pub log_file: PathBuf,
    /// Extra config file (`-c`), e.g. infra/nats/nats-server.conf.
    pub config: Option<PathBuf>,
}

/// A running nats-server child. Dropping it kills the server.
pub struct NatsServer {
    child: Option<Child>,
    opts: NatsServerOptions,
    port: u16,
}

impl NatsServer {
    pub fn start(mut opts: NatsServerOptions) -> anyhow::Result<Self> {
        let bin = find_tool("nats-server", "ATELIER_NATS_SERVER").context(
            "nats-server not found: run scripts/bootstrap (installs .tools/bin/nats-server), \
             set ATELIER_NATS_SERVER, or set ATELIER_NATS_URL to use a running server",
        )?;
        if opts.port == 0 {
            opts.port = free_port()?;
        }
        std::fs::create_dir_all(&opts.store_dir)
            .with_context(|| format!("creating {}", opts.store_dir.display()))?;
        if let Some(parent) = opts.log_file.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&opts.log_file)?;
        let mut cmd = Command::new(&bin);
        if let Some(c) = &opts.config {
            cmd.arg("-c").arg(c);
        }
        cmd.args([
            "-js",
            "-a",
            "127.0.0.1",
            "-p",
            &opts.port.to_string(),
            "-sd",
        ])
        .arg(&opts.store_dir)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
        die_with_parent(&mut cmd);
        // Its own process group: Ctrl-C in a terminal (SIGINT to the foreground group) reaches
        // the parent only, which drains its workers against a live server and then stops it.
        {
            use std::os::unix::process::CommandExt;
            cmd.process_group(0);
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let port = opts.port;
        let mut server = Self {
            child: Some(child),
            opts,
            port,
        };
        server.wait_ready(Duration::from_secs(20))?;
        tracing::info!(url = %server.url(), pid = server.pid(), "nats-server started");
        Ok(server)
    }

    fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(child) = self.child.as_mut() {
                if let Some(status) = child.try_wait()? {
                    bail!(
                        "nats-server exited with {status} during start; see {}",
                        self.opts.log_file.display()
                    );
                }
            }
            // Ready means the client port accepts and greets with INFO.
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) {
                use std::io::Read;
                let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
                let mut buf = [0u8; 4];
                if s.read_exact(&mut buf).is_ok() && &buf == b"INFO" {
                    return Ok(());
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "nats-server did not accept connections within {timeout:?}; see {}",
                    self.opts.log_file.display()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// SIGTERM (lame-duck shutdown, JetStream flushed), then SIGKILL after `grace`.
    pub fn stop(&mut self, grace: Duration) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }

    /// SIGKILL: the node is gone at once, as in a crash or power loss.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts the server again on the same port and store directory.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.stop(Duration::from_secs(10));
        let fresh = Self::start(self.opts.clone())?;
        *self = fresh;
        Ok(())
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
