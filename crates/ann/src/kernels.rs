//! The inner product, the one kernel a graph walk spends its time in.
//!
//! Distances are `1 - a·b` over unit vectors. The AVX2+FMA variant is chosen at run time
//! ([`Kernel::detect`]) so one binary runs on every x86-64; the walk itself is compiled once per
//! kernel (see `graph.rs`), so the dot product inlines into it.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Kernel {
    Portable,
    #[cfg(target_arch = "x86_64")]
    Avx2,
}

impl Kernel {
    pub(crate) fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2")
            && std::arch::is_x86_feature_detected!("fma")
            && std::arch::is_x86_feature_detected!("f16c")
        {
            return Kernel::Avx2;
        }
        Kernel::Portable
    }
}

/// `q·v` for half-float `v` (bit patterns), widened in software.
#[inline(always)]
pub(crate) fn dot_f16_portable(q: &[f32], v: &[u16]) -> f32 {
    let mut acc = [0f32; 8];
    let (cq, cv) = (q.chunks_exact(8), v.chunks_exact(8));
    let tail: f32 = cq
        .remainder()
        .iter()
        .zip(cv.remainder())
        .map(|(x, &h)| x * half::f16::from_bits(h).to_f32())
        .sum();
    for (x, h) in cq.zip(cv) {
        for i in 0..8 {
            acc[i] += x[i] * half::f16::from_bits(h[i]).to_f32();
        }
    }
    acc.iter().sum::<f32>() + tail
}

/// `q·v` for an `f32` query and a vector stored as IEEE half floats (bit patterns), widened
/// with F16C and accumulated in `f32`.
///
/// # Safety
/// The CPU must have AVX2, FMA and F16C; `q` and `v` must have the same length.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot_f16_avx2(q: &[f32], v: &[u16]) -> f32 {
    dot4_f16_avx2(q, [v, v, v, v], 1)[0]
}

/// `q·v[j]` for `j < count` (at most 4) in one pass over `q`; vectors as in [`dot_f16_avx2`].
///
/// # Safety
/// As [`dot_f16_avx2`], for every vector.
#[cfg(target_arch = "x86_64")]
#[inline]
#[target_feature(enable = "avx2,fma,f16c")]
pub(crate) unsafe fn dot4_f16_avx2(q: &[f32], v: [&[u16]; 4], count: usize) -> [f32; 4] {
    use std::arch::x86_64::*;
    let count = count.min(4);
    let n = v[..count].iter().fold(q.len(), |n, x| n.min(x.len()));
    let pq = q.as_ptr();
    let p = [v[0].as_ptr(), v[1].as_ptr(), v[2].as_ptr(), v[3].as_ptr()];
    let mut a = [_mm256_setzero_ps(); 4];
    let mut b = [_mm256_setzero_ps(); 4];
    let mut i = 0;
    let load = |ptr: *const u16| _mm256_cvtph_ps(_mm_loadu_si128(ptr.cast::<__m128i>()));
    while i + 16 <= n {
        let x = _mm256_loadu_ps(pq.add(i));
        let y = _mm256_loadu_ps(pq.add(i + 8));
        for j in 0..count {
            a[j] = _mm256_fmadd_ps(x, load(p[j].add(i)), a[j]);
            b[j] = _mm256_fmadd_ps(y, load(p[j].add(i + 8)), b[j]);
        }
        i += 16;
    }
    while i + 8 <= n {
        let x = _mm256_loadu_ps(pq.add(i));
        for j in 0..count {
            a[j] = _mm256_fmadd_ps(x, load(p[j].add(i)), a[j]);
        }
        i += 8;
    }
    let mut out = [0f32; 4];
    for j in 0..count {
        let s = _mm256_add_ps(a[j], b[j]);
        let q4 = _mm_add_ps(_mm256_extractf128_ps(s, 1), _mm256_castps256_ps128(s));
        let q4 = _mm_add_ps(q4, _mm_movehl_ps(q4, q4));
        let q4 = _mm_add_ss(q4, _mm_shuffle_ps(q4, q4, 1));
        out[j] = _mm_cvtss_f32(q4);
        for t in i..n {
            out[j] += *pq.add(t) * half::f16::from_bits(*p[j].add(t)).to_f32();
        }
    }
    out
}

/// Asks the cache for the first `lines` 64-byte lines at `p` (a hint; never faults).
#[inline(always)]
pub(crate) fn prefetch(p: *const f32, lines: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        for l in 0..lines {
            // SAFETY: prefetching is a hint and does not fault, whatever the address.
            unsafe { _mm_prefetch(p.cast::<i8>().wrapping_add(l * 64), _MM_HINT_T0) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (p, lines);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernels_agree_on_every_length() {
        for n in [0usize, 1, 7, 8, 15, 31, 32, 33, 100, 384, 512, 515] {
            let a: Vec<f32> = (0..n).map(|i| ((i * 37 % 11) as f32 - 5.0) / 7.0).collect();
            let b: Vec<f32> = (0..n).map(|i| ((i * 13 % 17) as f32 - 8.0) / 9.0).collect();
            let c: Vec<f32> = b.iter().map(|x| -x * 0.5).collect();
            let naive: f32 = a.iter().zip(&b).map(|(x, y)| x * y).sum();
            let h = |v: &[f32]| -> Vec<u16> {
                v.iter()
                    .map(|x| half::f16::from_f32(*x).to_bits())
                    .collect()
            };
            let (bh, ch) = (h(&b), h(&c));
            // Half floats keep 11 significant bits: a relative error of 2^-11 per term.
            let tol = 1e-3 * (1.0 + a.iter().map(|x| x.abs()).sum::<f32>());
            let portable = dot_f16_portable(&a, &bh);
            assert!(
                (portable - naive).abs() < tol,
                "n={n}: {portable} vs {naive}"
            );
            #[cfg(target_arch = "x86_64")]
            if Kernel::detect() == Kernel::Avx2 {
                // SAFETY: detect() saw AVX2, FMA and F16C.
                let one = unsafe { dot_f16_avx2(&a, &bh) };
                assert!((one - portable).abs() < 1e-4, "n={n}: {one} vs {portable}");
                let three = unsafe { dot4_f16_avx2(&a, [&bh, &ch, &bh, &[]], 3) };
                for (got, want) in three.iter().zip([naive, -naive * 0.5, naive, 0.0]) {
                    assert!((got - want).abs() < tol, "n={n}: {got} vs {want}");
                }
            }
        }
    }
}
