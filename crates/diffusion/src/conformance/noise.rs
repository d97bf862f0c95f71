//! Replays `tests/conformance/noise/noise.json`: what seeds draw from torch's CPU generator and
//! from A1111's "NV" source, draw after draw on one generator. One [`super::models::Line`]-like
//! line per draw with its largest difference; conformance is bit-exact (difference 0).

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use serde::Deserialize;

use crate::noise::{Generator, RandnSource};

#[derive(Debug, Deserialize)]
struct File {
    tensors: String,
    torch_cpu: Source,
    a1111_nv: Source,
}

#[derive(Debug, Deserialize)]
struct Source {
    cases: Vec<Case>,
}

#[derive(Debug, Deserialize)]
struct Case {
    seed: u64,
    draws: Vec<Draw>,
}

#[derive(Debug, Deserialize)]
struct Draw {
    shape: Vec<usize>,
    dtype: String,
    tensor: String,
}

/// One draw's comparison.
#[derive(Debug, Clone)]
pub struct NoiseLine {
    pub source: &'static str,
    pub seed: u64,
    pub draw: usize,
    pub shape: Vec<usize>,
    pub dtype: String,
    /// Elements that differ from the reference, and the largest difference.
    pub mismatched: usize,
    pub max_diff: f64,
    pub error: Option<String>,
}

impl NoiseLine {
    pub fn passed(&self) -> bool {
        self.error.is_none() && self.mismatched == 0
    }
}

impl std::fmt::Display for NoiseLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let status = if self.passed() { "ok  " } else { "FAIL" };
        write!(
            f,
            "{status} {} seed {} draw {} {:?} {}",
            self.source, self.seed, self.draw, self.shape, self.dtype
        )?;
        match &self.error {
            Some(e) => write!(f, " — {e}"),
            None => write!(
                f,
                ": {} of {} elements differ, max |diff| {:.3e}",
                self.mismatched,
                self.shape.iter().product::<usize>(),
                self.max_diff
            ),
        }
    }
}

/// Every draw of both sources in `file` (noise.json; its tensors file beside it).
pub fn replay_file(file: &Path) -> Result<Vec<NoiseLine>, String> {
    let text = std::fs::read_to_string(file).map_err(|e| format!("{}: {e}", file.display()))?;
    let spec: File = serde_json::from_str(&text).map_err(|e| format!("{}: {e}", file.display()))?;
    let tensors_path = file.parent().unwrap_or(Path::new(".")).join(&spec.tensors);
    let tensors = candle_core::safetensors::load(&tensors_path, &Device::Cpu)
        .map_err(|e| format!("{}: {e}", tensors_path.display()))?;
    let mut lines = Vec::new();
    for (name, source, cases) in [
        ("torch_cpu", RandnSource::TorchCpu, &spec.torch_cpu.cases),
        ("a1111_nv", RandnSource::Nv, &spec.a1111_nv.cases),
    ] {
        for case in cases {
            lines.extend(replay_case(name, source, case, &tensors));
        }
    }
    Ok(lines)
}

fn replay_case(
    name: &'static str,
    source: RandnSource,
    case: &Case,
    tensors: &HashMap<String, Tensor>,
) -> Vec<NoiseLine> {
    let mut generator = Generator::new(source, case.seed);
    let mut lines = Vec::new();
    for (i, d) in case.draws.iter().enumerate() {
        let mut line = NoiseLine {
            source: name,
            seed: case.seed,
            draw: i,
            shape: d.shape.clone(),
            dtype: d.dtype.clone(),
            mismatched: 0,
            max_diff: 0.0,
            error: None,
        };
        let n = d.shape.iter().product::<usize>();
        let got = match d.dtype.as_str() {
            "float32" => Ok(generator.randn_f32(n)),
            "float16" => generator.randn_f16(n),
            other => Err(format!("unknown dtype {other}")),
        };
        let want = tensors
            .get(&d.tensor)
            .ok_or_else(|| format!("tensors file has no {}", d.tensor))
            .and_then(|t| {
                t.flatten_all()
                    .and_then(|t| t.to_vec1::<f32>())
                    .map_err(|e| e.to_string())
            });
        match (got, want) {
            (Ok(g), Ok(w)) if g.len() == w.len() => {
                for (a, b) in g.iter().zip(&w) {
                    if a.to_bits() != b.to_bits() {
                        line.mismatched += 1;
                        line.max_diff = line.max_diff.max(f64::from((a - b).abs()));
                    }
                }
            }
            (Ok(g), Ok(w)) => {
                line.error = Some(format!("{} values, reference {}", g.len(), w.len()))
            }
            (Err(e), _) | (_, Err(e)) => line.error = Some(e),
        }
        lines.push(line);
    }
    lines
}
