//! The float32 logarithm, sine and cosine libtorch's CPU normal kernel uses for its vectorised
//! Box–Muller (`avx_mathfun.h`: Cephes polynomials, after Pommier's `sse_mathfun`), written out
//! lane by lane. Each `mul_add` is one multiply-add the compiler fuses in libtorch's build
//! (GCC contracts a product into the one addition or subtraction that uses it); every other
//! operation rounds on its own, as there. Bit-exactness with torch depends on both.

#![allow(clippy::excessive_precision, clippy::approx_constant)]

// The constants as libtorch writes them: double literals narrowed to float.
const SQRTHF: f32 = 0.707106781186547524_f64 as f32;
const LOG_P: [f32; 9] = [
    7.0376836292E-2_f64 as f32,
    -1.1514610310E-1_f64 as f32,
    1.1676998740E-1_f64 as f32,
    -1.2420140846E-1_f64 as f32,
    1.4249322787E-1_f64 as f32,
    -1.6668057665E-1_f64 as f32,
    2.0000714765E-1_f64 as f32,
    -2.4999993993E-1_f64 as f32,
    3.3333331174E-1_f64 as f32,
];
const LOG_Q1: f32 = -2.12194440e-4_f64 as f32;
const LOG_Q2: f32 = 0.693359375;

/// `log256_ps` for one positive lane.
pub fn log(v: f32) -> f32 {
    let v = v.max(f32::from_bits(0x0080_0000));
    let bits = v.to_bits();
    let mut e = ((bits >> 23) as i32 - 0x7f) as f32 + 1.0;
    let mut x = f32::from_bits((bits & !0x7f80_0000) | 0.5f32.to_bits());
    let below = x < SQRTHF;
    let tmp = if below { x } else { 0.0 };
    x -= 1.0;
    if below {
        e -= 1.0;
    }
    x += tmp;
    let z = x * x;
    let mut y = LOG_P[0];
    for p in &LOG_P[1..] {
        y = y.mul_add(x, *p);
    }
    y *= x;
    y = y.mul_add(z, e * LOG_Q1);
    y = (-z).mul_add(0.5, y);
    e.mul_add(LOG_Q2, x + y)
}

const FOPI: f32 = 1.27323954473516_f64 as f32;
const DP: [f32; 3] = [
    -0.78515625,
    -2.4187564849853515625e-4_f64 as f32,
    -3.77489497744594108e-8_f64 as f32,
];
const COS_P: [f32; 3] = [
    2.443315711809948E-005_f64 as f32,
    -1.388731625493765E-003_f64 as f32,
    4.166664568298827E-002_f64 as f32,
];
const SIN_P: [f32; 3] = [
    -1.9515295891E-4_f64 as f32,
    8.3321608736E-3_f64 as f32,
    -1.6666654611E-1_f64 as f32,
];

/// `sincos256_ps` for one lane: (sine, cosine).
pub fn sincos(v: f32) -> (f32, f32) {
    let sign_in = v.to_bits() & 0x8000_0000;
    let mut x = v.abs();
    let j = (((x * FOPI) as i32).wrapping_add(1)) & !1;
    let y = j as f32;
    let sign_sin = sign_in ^ (((j & 4) as u32) << 29);
    let sign_cos = ((!(j.wrapping_sub(2)) & 4) as u32) << 29;
    let poly_sin = j & 2 == 0;
    for d in DP {
        x = y.mul_add(d, x);
    }
    let z = x * x;
    let mut c = COS_P[0].mul_add(z, COS_P[1]);
    c = c.mul_add(z, COS_P[2]);
    c *= z;
    c = c.mul_add(z, -(z * 0.5));
    c += 1.0;
    let mut s = SIN_P[0].mul_add(z, SIN_P[1]);
    s = s.mul_add(z, SIN_P[2]);
    s *= z;
    s = s.mul_add(x, x);
    let (sin, cos) = if poly_sin { (s, c) } else { (c, s) };
    (
        f32::from_bits(sin.to_bits() ^ sign_sin),
        f32::from_bits(cos.to_bits() ^ sign_cos),
    )
}
