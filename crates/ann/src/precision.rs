//! How a vector is stored: each component as an IEEE half float (what walks read: half the
//! memory and half the traffic of `f32`) plus one signed byte of what rounding to half lost,
//! in 1/256ths of the half's unit in the last place. Together they keep 18 or more significant
//! bits (a relative error of at most 2^-18 per component, 2^-19 but where rounding to half was
//! a near tie), enough to rank the final candidates as `f32` vectors would, in three bytes a
//! component instead of four.

/// A product against the half floats alone moves by at most 2^-11·Σ|q_i·v_i| ≤ 2^-11 for unit
/// `q` and `v` (2^-25 more per component where they underflow); 1e-4 more covers those and the
/// `f32` accumulation at any practical dimension.
pub(crate) const HALF_ERROR: f32 = 1.0 / 2048.0 + 1e-4;

/// The unit in the last place of half float `h` (bit pattern).
#[inline(always)]
fn ulp(h: u16) -> f32 {
    let exponent = ((h >> 10) & 0x1f).max(1) as i32;
    // 2^(exponent - 15 - 10), built from its f32 bit pattern (exponent bias 127).
    f32::from_bits(((exponent - 25 + 127) as u32) << 23)
}

/// `x` as its half float and the byte of what rounding lost.
#[inline(always)]
pub(crate) fn split(x: f32) -> (u16, i8) {
    let h = half::f16::from_f32(x);
    let lost = x - h.to_f32();
    let code = (lost / ulp(h.to_bits()) * 256.0)
        .round()
        .clamp(-127.0, 127.0);
    (h.to_bits(), code as i8)
}

/// The component [`split`] stored.
#[inline(always)]
pub(crate) fn join(h: u16, code: i8) -> f32 {
    half::f16::from_bits(h).to_f32() + code as f32 * ulp(h) / 256.0
}

/// `q·v` for `v` stored as halves and codes.
pub(crate) fn fine_dot(q: &[f32], halves: &[u16], codes: &[i8]) -> f32 {
    q.iter()
        .zip(halves.iter().zip(codes))
        .map(|(x, (&h, &c))| x * join(h, c))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_keeps_eighteen_bits_and_joins_back_to_the_same_split() {
        let mut x = 1e-9f32;
        while x < 40000.0 {
            for v in [x, -x, x * 1.337, -x * 0.6175] {
                let (h, c) = split(v);
                let back = join(h, c);
                let tol = (v.abs() * 2f32.powi(-18)).max(2f32.powi(-32));
                assert!((back - v).abs() <= tol, "{v}: {back}");
                // The joined value splits again into the same parts (bytes round-trip).
                assert_eq!(split(back), (h, c), "{v}");
            }
            x *= 1.07;
        }
    }
}
