//! The float32 logarithm, sine and cosine libtorch's CPU normal kernel uses for its vectorised
//! Box–Muller (`avx_mathfun.h`: Cephes polynomials, after Pommier's `sse_mathfun`), written out
//! lane by lane. Each `mul_add` is one multiply-add the compiler fuses in libtorch's build
//! (GCC contracts a product into the one addition or subtraction that uses it); every other
//! operation rounds on its own, as there. Bit-exactness with torch depends on both.

const SQRTHF: f32 = 0.707_106_77;
const LOG_P: [f32; 9] = [
    7.037_683_6E-2,
    -1.151_461_1E-1,
    1.167_699_9E-1,
    -1.242_014_1E-1,
    1.424_932_3E-1,
    -1.666_805_8E-1,
    2.000_071_5E-1,
    -2.499_999_4E-1,
    3.333_333_1E-1,
];
const LOG_Q1: f32 = -2.121_944_4e-4;
const LOG_Q2: f32 = 0.693_359_4;

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
        y = y * x + *p;
    }
    y *= x;
    y = y * z + e * LOG_Q1;
    y = (-z) * 0.5 + y;
    x + y + e * LOG_Q2
}

const FOPI: f32 = 1.273_239_5;
const DP: [f32; 3] = [-0.785_156_25, -2.418_756_5e-4, -3.774_895e-8];
const COS_P: [f32; 3] = [2.443_315_7e-5, -1.388_731_6e-3, 4.166_664_6e-2];
const SIN_P: [f32; 3] = [-1.951_529_6e-4, 8.332_161e-3, -1.666_665_5e-1];

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
        x = y * d + x;
    }
    let z = x * x;
    let mut c = COS_P[0] * z + COS_P[1];
    c = c * z + COS_P[2];
    c *= z;
    c = c * z + -(z * 0.5);
    c += 1.0;
    let mut s = SIN_P[0] * z + SIN_P[1];
    s = s * z + SIN_P[2];
    s *= z;
    s = s * x + x;
    let (sin, cos) = if poly_sin { (s, c) } else { (c, s) };
    (
        f32::from_bits(sin.to_bits() ^ sign_sin),
        f32::from_bits(cos.to_bits() ^ sign_cos),
    )
}
