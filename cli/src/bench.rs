//! `atelier bench models`: the model families side by side at their native geometry (random
//! weights), one table — step time, time per image, peak memory, parameters — headed by the
//! command, the date and the machine. Each family runs in its own child process
//! (`atelier bench model --family NAME`), so each peak memory is its own.

use std::process::Command;

use atelier_diffusion::bench::{self, Family, Options, Row, FAMILIES};
use clap::{Args, Subcommand};

#[derive(Subcommand)]
pub enum BenchCmd {
    /// Every family (SD 1.5, SDXL, SD 3.5 Medium, FLUX.1-dev) at its native geometry, one table.
    Models(ModelsArgs),
    /// One family, as a JSON line (what `bench models` runs in a child process).
    #[command(hide = true)]
    Model {
        #[arg(long)]
        family: String,
        #[command(flatten)]
        run: RunArgs,
    },
}

#[derive(Args, Clone)]
pub struct RunArgs {
    /// cpu, cuda or cuda:N.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    /// The denoiser's and text encoders' dtype: f32, f16 or bf16 (default f32 on the CPU, bf16
    /// on a GPU); the VAE runs in f32.
    #[arg(long)]
    pub dtype: Option<String>,
    /// Steps in the time per image.
    #[arg(long, default_value_t = 4)]
    pub steps: usize,
    /// Timed runs of each component (the median is reported).
    #[arg(long, default_value_t = 2)]
    pub runs: usize,
}

#[derive(Args)]
pub struct ModelsArgs {
    /// Families to run, comma-separated: sd15, sdxl, sd35, flux.
    #[arg(long, default_value = "sd15,sdxl,sd35,flux")]
    pub families: String,
    #[command(flatten)]
    pub run: RunArgs,
}

fn options(run: &RunArgs) -> anyhow::Result<Options> {
    let device = atelier_diffusion::torch::device_named(&run.device)
        .map_err(|e| anyhow::anyhow!("--device: {e}"))?;
    let kind = match (run.dtype.as_deref(), device) {
        (None, atelier_diffusion::torch::Device::Cpu) | (Some("f32"), _) => {
            atelier_diffusion::torch::Kind::Float
        }
        (None, _) | (Some("bf16"), _) => atelier_diffusion::torch::Kind::BFloat16,
        (Some("f16"), _) => atelier_diffusion::torch::Kind::Half,
        (Some(other), _) => anyhow::bail!("--dtype: f32, f16 or bf16 (got {other})"),
    };
    Ok(Options {
        device,
        kind,
        runs: run.runs.max(1),
        steps: run.steps.max(1),
        seed: 7,
    })
}

pub fn run(cmd: BenchCmd) -> anyhow::Result<()> {
    match cmd {
        BenchCmd::Model { family, run } => {
            let fam = Family::parse(&family).ok_or_else(|| {
                anyhow::anyhow!("--family: one of sd15, sdxl, sd35, flux (got {family})")
            })?;
            let row = bench::run(fam, &options(&run)?)
                .map_err(|e| anyhow::anyhow!("{}: {e}", fam.label()))?;
            println!("{}", serde_json::to_string(&row)?);
            Ok(())
        }
        BenchCmd::Models(args) => models(args),
    }
}

fn models(args: ModelsArgs) -> anyhow::Result<()> {
    let families: Vec<&str> = args
        .families
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .collect();
    for f in &families {
        if Family::parse(f).is_none() {
            let known: Vec<&str> = FAMILIES.iter().map(|(n, _)| *n).collect();
            anyhow::bail!("--families: unknown {f:?} (known: {})", known.join(", "));
        }
    }
    options(&args.run)?;
    let exe = std::env::current_exe()?;
    let mut rows = Vec::new();
    for f in &families {
        eprintln!("bench: {f} …");
        let r = &args.run;
        let mut cmd = Command::new(&exe);
        cmd.args([
            "bench",
            "model",
            "--family",
            f,
            "--device",
            &r.device,
            "--steps",
            &r.steps.to_string(),
            "--runs",
            &r.runs.to_string(),
        ]);
        if let Some(d) = &r.dtype {
            cmd.args(["--dtype", d]);
        }
        let out = cmd.output()?;
        let line = String::from_utf8_lossy(&out.stdout);
        match serde_json::from_str::<Row>(line.trim()) {
            Ok(row) => rows.push(Ok(row)),
            Err(_) => rows.push(Err(format!(
                "{f}: the run failed ({}): {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .last()
                    .unwrap_or_default()
            ))),
        }
    }
    print!("{}", table(&args, &rows));
    Ok(())
}

fn machine(device: &str) -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| std::env::consts::ARCH.into());
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
        })
        .map_or(String::new(), |kb| {
            format!(", {:.0} GiB", kb as f64 / 1048576.0)
        });
    let mut m = format!("{cpu}, {cores} threads{mem}");
    if device.starts_with("cuda") {
        if let Ok(o) = Command::new("nvidia-smi")
            .args(["--query-gpu=name,memory.total", "--format=csv,noheader"])
            .output()
        {
            m.push_str(&format!(
                "; GPU {}",
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .unwrap_or("?")
                    .trim()
            ));
        }
    }
    m
}

fn billions(n: u64) -> String {
    format!("{:.2} B", n as f64 / 1e9)
}

fn table(args: &ModelsArgs, rows: &[Result<Row, String>]) -> String {
    let r = &args.run;
    let mut s = format!(
        "atelier bench models --families {} --device {} --steps {} --runs {}{}\n{}\n{}\n\n",
        args.families,
        r.device,
        r.steps,
        r.runs,
        r.dtype
            .as_ref()
            .map(|d| format!(" --dtype {d}"))
            .unwrap_or_default(),
        chrono::Utc::now().format("%Y-%m-%d %H:%M UTC"),
        machine(&r.device),
    );
    s.push_str(&format!(
        "| family | geometry | dtype | step (median) | text encoders | VAE decode | time per image, {} steps | peak memory | denoiser params | all params |\n|---|---|---|---|---|---|---|---|---|---|\n",
        r.steps
    ));
    let mut notes = Vec::new();
    for row in rows {
        match row {
            Ok(x) => {
                s.push_str(&format!(
                    "| {} | {} | {} | {:.0} ms | {:.0} ms | {:.0} ms | {:.1} s | {} | {} | {} |\n",
                    x.family,
                    x.geometry,
                    x.dtype,
                    x.step_ms,
                    x.text_ms,
                    x.vae_ms,
                    x.image_s,
                    match x.peak_mib {
                        0 => "—".to_string(),
                        m => format!("{:.1} GiB RSS", m as f64 / 1024.0),
                    },
                    billions(x.denoiser_params),
                    billions(x.total_params)
                ));
                if !x.note.is_empty() {
                    notes.push(format!("{}: {}", x.family, x.note));
                }
            }
            Err(e) => notes.push(e.clone()),
        }
    }
    for n in notes {
        s.push_str(&format!("\n- {n}"));
    }
    s.push('\n');
    s
}
