//! What `torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed))` draws, bit for
//! bit: libtorch's CPU generator (a 32-bit Mersenne Twister) and the two ways its normal kernel
//! turns its words into Gaussians — element by element through a cached Box–Muller pair in double
//! precision for tensors under 16 elements, and 16 at a time from a block of uniform floats for
//! larger ones (the last, partial block redrawn and recomputed over the final 16 elements).

use half::f16;

use super::cephes;

/// 2π as libtorch's kernel holds it: `2.0f * c10::pi<double>` rounded to float.
const TWO_PI: f32 = (2.0 * std::f64::consts::PI) as f32;

const N: usize = 624;
const M: usize = 397;

/// The Mersenne Twister MT19937 as libtorch seeds it: from the low 32 bits of the seed.
#[derive(Clone)]
struct Mt19937 {
    state: Box<[u32; N]>,
    next: usize,
}

impl Mt19937 {
    fn new(seed: u64) -> Self {
        let mut state = Box::new([0u32; N]);
        state[0] = seed as u32;
        for j in 1..N {
            let prev = state[j - 1];
            state[j] = 1_812_433_253u32
                .wrapping_mul(prev ^ (prev >> 30))
                .wrapping_add(j as u32);
        }
        Self { state, next: N }
    }

    fn twist(&mut self) {
        let mix = |u: u32, v: u32| {
            let y = (u & 0x8000_0000) | (v & 0x7fff_ffff);
            (y >> 1) ^ if v & 1 == 1 { 0x9908_b0df } else { 0 }
        };
        for i in 0..N {
            let (u, v) = (self.state[i], self.state[(i + 1) % N]);
            self.state[i] = self.state[(i + M) % N] ^ mix(u, v);
        }
        self.next = 0;
    }

    fn next_u32(&mut self) -> u32 {
        if self.next == N {
            self.twist();
        }
        let mut y = self.state[self.next];
        self.next += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }
}

/// libtorch's CPU generator: its engine and the normal sample it caches between small draws.
#[derive(Clone)]
pub struct TorchCpuGenerator {
    engine: Mt19937,
    cached_normal: Option<f64>,
}

impl TorchCpuGenerator {
    /// `torch.Generator("cpu").manual_seed(seed)`.
    pub fn new(seed: u64) -> Self {
        Self {
            engine: Mt19937::new(seed),
            cached_normal: None,
        }
    }

    fn random64(&mut self) -> u64 {
        let hi = self.engine.next_u32() as u64;
        let lo = self.engine.next_u32() as u64;
        (hi << 32) | lo
    }

    /// A uniform in [0, 1) with `bits` bits of one 32-bit word (floats: 24, halves: 11).
    fn uniform_word(&mut self, bits: u32) -> f64 {
        let mask = (1u32 << bits) - 1;
        (self.engine.next_u32() & mask) as f64 / (1u64 << bits) as f64
    }

    /// One N(0, 1) sample as the element-wise path draws it (`at::normal_distribution<double>`).
    fn normal_f64(&mut self) -> f64 {
        if let Some(v) = self.cached_normal.take() {
            return v;
        }
        let u1 = (self.random64() & ((1u64 << 53) - 1)) as f64 / (1u64 << 53) as f64;
        let u2 = (self.random64() & ((1u64 << 53) - 1)) as f64 / (1u64 << 53) as f64;
        let r = (-2.0 * (-u2).ln_1p()).sqrt();
        let theta = 2.0 * std::f64::consts::PI * u1;
        // Each sample leaves as `sample * std + mean` (std 1, mean 0), which turns -0 into +0.
        self.cached_normal = Some(r * theta.sin() + 0.0);
        r * theta.cos() + 0.0
    }

    /// `torch.randn(n)` in float32.
    pub fn randn_f32(&mut self, n: usize) -> Vec<f32> {
        if n < 16 {
            return (0..n).map(|_| self.normal_f64() as f32).collect();
        }
        let mut data: Vec<f32> = (0..n).map(|_| self.uniform_word(24) as f32).collect();
        let fill = |block: &mut [f32]| {
            for j in 0..8 {
                let u1 = 1.0 - block[j];
                let u2 = block[j + 8];
                let radius = (-2.0 * cephes::log(u1)).sqrt();
                let (sin, cos) = cephes::sincos(TWO_PI * u2);
                // `fmadd(n, std, mean)` with std 1 and mean 0: exact, but -0 becomes +0.
                block[j] = radius * cos + 0.0;
                block[j + 8] = radius * sin + 0.0;
            }
        };
        self.fill_blocks(&mut data, 24, |v| v as f32, fill);
        data
    }

    /// `torch.randn(n, dtype=torch.float16)`: the same paths over 11-bit uniforms in libtorch's
    /// `Half` arithmetic, where every operation and every math function rounds to half.
    pub fn randn_f16(&mut self, n: usize) -> Vec<f16> {
        let half = |v: f32| f16::from_f32(v).to_f32();
        if n < 16 {
            return (0..n)
                .map(|_| f16::from_f32(self.normal_f64() as f32))
                .collect();
        }
        let mut data: Vec<f16> = (0..n)
            .map(|_| f16::from_f64(self.uniform_word(11)))
            .collect();
        let fill = |block: &mut [f16]| {
            for j in 0..8 {
                let u1 = half(1.0 - block[j].to_f32());
                let u2 = block[j + 8].to_f64();
                let radius = half(half(-2.0 * half(u1.ln())).sqrt());
                let theta = half((2.0 * std::f64::consts::PI * u2) as f32);
                // `* std + mean` with std 1 and mean 0: exact, but a negative zero becomes +0.
                block[j] = f16::from_f32(half(radius * half(theta.cos())) + 0.0);
                block[j + 8] = f16::from_f32(half(radius * half(theta.sin())) + 0.0);
            }
        };
        self.fill_blocks(&mut data, 11, f16::from_f64, fill);
        data
    }

    /// Box–Muller over whole blocks of 16; a partial last block redraws 16 uniforms into the
    /// final 16 elements and recomputes them.
    fn fill_blocks<T>(
        &mut self,
        data: &mut [T],
        bits: u32,
        from: impl Fn(f64) -> T,
        fill: impl Fn(&mut [T]),
    ) {
        let n = data.len();
        for block in data.chunks_exact_mut(16) {
            fill(block);
        }
        if !n.is_multiple_of(16) {
            let tail = &mut data[n - 16..];
            for v in tail.iter_mut() {
                *v = from(self.uniform_word(bits));
            }
            fill(tail);
        }
    }
}
