//! The float32 logarithm and sine NumPy computes on x86-64 with AVX2+FMA or AVX-512
//! (`simd_log_FLOAT`: a rational minimax approximation of log(1+x) on the normalised mantissa;
//! `simd_sincos_f32`: Cody–Waite reduction by π/2 and minimax polynomials), lane by lane with
//! the same fused multiply-adds. A1111's "NV" source runs its Box–Muller through these.

#![allow(clippy::excessive_precision, clippy::approx_constant)]

// NumPy's constants are float literals (one rounding from the decimal), written as such here.
const LOG_P: [f32; 6] = [
    0.000000000000000000000e+00,
    9.999999999999998702752e-01,
    2.112677543073053063722e+00,
    1.480000633576506585156e+00,
    3.808837741388407920751e-01,
    2.589979117907922693523e-02,
];
const LOG_Q: [f32; 6] = [
    1.000000000000000000000e+00,
    2.612677543073109236779e+00,
    2.453006071784736363091e+00,
    9.864942958519418960339e-01,
    1.546476374983906719538e-01,
    5.875095403124574342950e-03,
];
const SQRT1_2: f32 = 0.707106781186547524400844362104849039;
const LOGE2: f32 = 0.693147180559945309417232121458176568;

/// `simd_log_FLOAT` for one lane with a positive, normal `v`.
pub fn log(v: f32) -> f32 {
    let bits = v.to_bits();
    let mut exponent = ((bits >> 23) as i32 - 126) as f32;
    let mut x = f32::from_bits((bits & 0x007f_ffff) | (126 << 23));
    if x <= SQRT1_2 {
        x += x;
        exponent -= 1.0;
    }
    x -= 1.0;
    let horner = |c: &[f32; 6]| c[..5].iter().rev().fold(c[5], |acc, k| acc.mul_add(x, *k));
    let poly = horner(&LOG_P) / horner(&LOG_Q);
    exponent.mul_add(LOGE2, poly)
}

// `0x1.45f306p-1` and the Cody–Waite parts of -π/2 (`-0x1.921fb0p+0`, `-0x1.5110b4p-22`,
// `-0x1.846988p-48`), and the polynomials' coefficients, by their bits.
const TWO_OVER_PI: u32 = 0x3f22_f983;
const PIO2: [u32; 3] = [0xbfc9_0fd8, 0xb4a8_885a, 0xa7c2_34c4];
const RINT_MAGIC: f32 = 12_582_912.0; // 0x1.8p+23
const COS_C: [u32; 5] = [
    0x37cc_730b,
    0xbab6_036e,
    0x3d2a_aa9e,
    0xbf00_0000,
    0x3f80_0000,
];
const SIN_C: [u32; 4] = [0x363e_9dde, 0xb950_35dd, 0x3c08_88cd, 0xbe2a_aaab];

/// `simd_sincos_f32`'s sine for one lane with |v| ≤ 117435.992 (NumPy calls libm beyond).
pub fn sin(v: f32) -> f32 {
    let f = f32::from_bits;
    let quadrant = (v * f(TWO_OVER_PI) + RINT_MAGIC) - RINT_MAGIC;
    let mut r = v;
    for c in PIO2 {
        r = quadrant.mul_add(f(c), r);
    }
    let r2 = r * r;
    let cos = COS_C[1..]
        .iter()
        .fold(f(COS_C[0]), |acc, c| acc.mul_add(r2, f(*c)));
    let mut s = SIN_C[1..]
        .iter()
        .fold(f(SIN_C[0]), |acc, c| acc.mul_add(r2, f(*c)));
    s = s.mul_add(r2, 0.0);
    s = s.mul_add(r, r);
    let q = quadrant as i32;
    let value = if q & 1 == 0 { s } else { cos };
    if q & 2 == 2 {
        0.0 - value
    } else {
        value
    }
}
