//! A1111's "NV" random source: the numbers `torch.randn` draws on a CUDA device, computed the same
//! way on any device. Philox 4×32-10 keyed by the 64-bit seed (low word, high word); element `i` of
//! the `c`-th draw of a generator uses the counter (c, 0, i, 0); the first two output words go
//! through Box–Muller.

use super::numpy_f32;

const M0: u64 = 0xD251_1F53;
const M1: u64 = 0xCD9E_8D57;
const W0: u32 = 0x9E37_79B9;
const W1: u32 = 0xBB67_AE85;

fn philox4x32_10(mut c: [u32; 4], mut k: [u32; 2]) -> [u32; 4] {
    for round in 0..10 {
        if round > 0 {
            k = [k[0].wrapping_add(W0), k[1].wrapping_add(W1)];
        }
        let p0 = c[0] as u64 * M0;
        let p1 = c[2] as u64 * M1;
        c = [
            (p1 >> 32) as u32 ^ c[1] ^ k[0],
            p1 as u32,
            (p0 >> 32) as u32 ^ c[3] ^ k[1],
            p0 as u32,
        ];
    }
    c
}

/// A generator of the NV source: its seed and how many draws it has made.
#[derive(Clone)]
pub struct PhiloxGenerator {
    seed: u64,
    calls: u32,
}

impl PhiloxGenerator {
    pub fn new(seed: u64) -> Self {
        Self { seed, calls: 0 }
    }

    /// `n` standard-normal draws, the generator's next call.
    pub fn randn_f32(&mut self, n: usize) -> Vec<f32> {
        let key = [self.seed as u32, (self.seed >> 32) as u32];
        let call = self.calls;
        self.calls = self.calls.wrapping_add(1);
        // Box–Muller in float32 with NumPy's logarithm and sine, as A1111 computes it, with its
        // float32 constants 2^-32 and 2π·2^-32.
        let scale = 2.328_306_4e-10_f32;
        let scale_2pi = (2.328_306_4e-10_f64 * 6.283_185_5_f64) as f32;
        (0..n)
            .map(|i| {
                let w = philox4x32_10([call, 0, i as u32, 0], key);
                let u = w[0] as f32 * scale + scale / 2.0;
                let v = w[1] as f32 * scale_2pi + scale_2pi / 2.0;
                (-2.0 * numpy_f32::log(u)).sqrt() * numpy_f32::sin(v)
            })
            .collect()
    }
}
