//! The machine's GPUs and their memory, as the NVIDIA driver's `nvidia-smi` reports them, for the
//! worker reports (A1111's `memory` route reads them). Asked at most every 30 s; a machine without
//! the tool (or without GPUs) is asked once and reports none from then on.

use std::process::Stdio;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use atelier_contracts::GpuMemory;

const FRESH_FOR: Duration = Duration::from_secs(30);
const QUERY: &str = "--query-gpu=index,uuid,name,memory.total,memory.used,memory.free";

pub struct Gpus {
    command: std::path::PathBuf,
    state: Mutex<State>,
}

impl Default for Gpus {
    fn default() -> Self {
        Self::with_command("nvidia-smi")
    }
}

#[derive(Default)]
struct State {
    last: Option<(Instant, Vec<GpuMemory>)>,
    absent: bool,
}

impl Gpus {
    /// Asking `command` (an `nvidia-smi`) instead of the one on `PATH`.
    pub fn with_command(command: impl Into<std::path::PathBuf>) -> Self {
        Self {
            command: command.into(),
            state: Mutex::default(),
        }
    }

    /// The GPUs now (or as of the last 30 s).
    pub async fn read(&self) -> Vec<GpuMemory> {
        {
            let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
            if s.absent {
                return Vec::new();
            }
            if let Some((at, gpus)) = &s.last {
                if at.elapsed() < FRESH_FOR {
                    return gpus.clone();
                }
            }
        }
        let answer = tokio::time::timeout(
            Duration::from_secs(5),
            tokio::process::Command::new(&self.command)
                .args([QUERY, "--format=csv,noheader,nounits"])
                .stdin(Stdio::null())
                .stderr(Stdio::null())
                .kill_on_drop(true)
                .output(),
        )
        .await;
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match answer {
            Ok(Ok(out)) if out.status.success() => {
                let gpus = parse(&String::from_utf8_lossy(&out.stdout));
                s.last = Some((Instant::now(), gpus.clone()));
                gpus
            }
            // No tool, or a driver that answers with an error: no GPUs here.
            Ok(_) => {
                s.absent = true;
                Vec::new()
            }
            // Slow this time; try again next time.
            Err(_) => s.last.as_ref().map(|l| l.1.clone()).unwrap_or_default(),
        }
    }
}

/// `nvidia-smi`'s CSV (`index, uuid, name, total MiB, used MiB, free MiB` per line); lines that do
/// not parse are left out.
pub fn parse(csv: &str) -> Vec<GpuMemory> {
    csv.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split(',').map(str::trim).collect();
            let [index, uuid, name, total, used, free] = f.as_slice() else {
                return None;
            };
            let mib = |v: &str| v.parse::<u64>().ok().map(|m| m << 20);
            Some(GpuMemory {
                index: index.parse().ok()?,
                uuid: uuid.to_string(),
                name: name.to_string(),
                total: mib(total)?,
                used: mib(used)?,
                free: mib(free)?,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nvidia_smi_csv_reads_in_bytes() {
        let out = "0, GPU-5f1c, NVIDIA H100 80GB HBM3, 81559, 1024, 80535\n\
                   1, GPU-77aa, NVIDIA H100 80GB HBM3, 81559, [N/A], 80535\n\
                   garbage\n";
        let g = parse(out);
        assert_eq!(g.len(), 1);
        assert_eq!(g[0].index, 0);
        assert_eq!(g[0].uuid, "GPU-5f1c");
        assert_eq!(g[0].name, "NVIDIA H100 80GB HBM3");
        assert_eq!(
            (g[0].total, g[0].used, g[0].free),
            (81559 << 20, 1024 << 20, 80535 << 20)
        );
    }

    #[tokio::test]
    async fn the_tool_is_asked_and_its_absence_remembered() {
        let dir = tempfile::tempdir().unwrap();
        let tool = dir.path().join("nvidia-smi");
        std::fs::write(
            &tool,
            "#!/bin/sh\necho \"$@\" > \"$0.args\"\necho '0, GPU-1, Tiny GPU, 100, 40, 60'\n",
        )
        .unwrap();
        let mut perms = std::fs::metadata(&tool).unwrap().permissions();
        std::os::unix::fs::PermissionsExt::set_mode(&mut perms, 0o755);
        std::fs::set_permissions(&tool, perms).unwrap();
        let g = Gpus::with_command(&tool);
        let gpus = g.read().await;
        assert_eq!(gpus.len(), 1);
        assert_eq!((gpus[0].used, gpus[0].free), (40 << 20, 60 << 20));
        let args = std::fs::read_to_string(dir.path().join("nvidia-smi.args")).unwrap();
        assert!(
            args.contains("memory.used") && args.contains("noheader,nounits"),
            "{args}"
        );
        // Absent: asked once, then no more.
        let none = Gpus::with_command(dir.path().join("missing"));
        assert!(none.read().await.is_empty());
        assert!(none.state.lock().unwrap().absent);
    }
}
