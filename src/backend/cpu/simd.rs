//! Slice kernels for the transcendental-heavy elementwise work (softmax's `exp`, SiLU, exact
//! GELU), with an AVX2+FMA path picked at run time and a portable scalar path.
//!
//! Why hand-vectorised: a UNet step evaluates ~10^9 exponentials in attention softmax and
//! ~3·10^8 erf in GEGLU; the libm calls do not vectorise, and the compiler's own
//! vectorisation of the scalar versions depends on the build profile and target flags. Both
//! paths evaluate the same formulas, so they agree to a few ulp (FMA contraction differs).
//!
//! Formulas:
//! - `exp`: `x = n·ln2 + r`, `|r| ≤ ln2/2` (ln2 split in two for an exact `n·ln2`), degree-6
//!   polynomial for `e^r` (Cephes `expf` coefficients), `2^n` built in the exponent bits;
//!   ≤ 2 ulp on `[-87.3, 88]`, inputs clamped to that range, NaN propagates.
//! - `erfc`: the Chebyshev-fitted `t·exp(−z² + P(t))`, `t = 1/(1 + z/2)` (Numerical Recipes'
//!   `erfcc`), fractional error < 1.2e-7 for all `z ≥ 0`. Exact GELU then is
//!   `x/2 · (1 + erf(x/√2))` with `1 + erf(z) = erfc(−z)`, so the left tail keeps full
//!   relative precision instead of cancelling.

const LOG2E: f32 = std::f32::consts::LOG2_E;
/// Adding 1.5·2^23 rounds to the nearest integer and leaves it in the low mantissa bits.
const ROUND: f32 = 12_582_912.0;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;
const EXP_MIN: f32 = -87.3;
const EXP_MAX: f32 = 88.0;
// Published coefficients, kept digit for digit so they can be checked against the source.
#[allow(clippy::excessive_precision)]
const EXP_P: [f32; 6] =
    [1.987_569_1e-4, 1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 5.000_000_1e-1];
/// `P(t)` of `erfc`, highest degree first; the constant term is −1.26551223.
#[allow(clippy::excessive_precision)]
const ERFC_P: [f32; 10] = [
    0.170_872_77,
    -0.822_152_23,
    1.488_515_9,
    -1.135_203_98,
    0.278_868_07,
    -0.186_288_06,
    0.096_784_18,
    0.374_091_96,
    1.000_023_7,
    -1.265_512_2,
];

/// `e^x` (see module docs).
#[inline(always)]
pub fn exp(x: f32) -> f32 {
    let x = x.clamp(EXP_MIN, EXP_MAX);
    let t = x * LOG2E + ROUND;
    let n = t - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = EXP_P[0];
    for c in &EXP_P[1..] {
        p = p * r + c;
    }
    let er = p * (r * r) + r + 1.0;
    let n_int = t.to_bits() as i32 - ROUND.to_bits() as i32;
    er * f32::from_bits(((n_int + 127) << 23) as u32)
}

/// `erfc(z)` for `z ≥ 0` (see module docs).
#[inline(always)]
fn erfc_nonneg(z: f32) -> f32 {
    let t = 1.0 / (1.0 + 0.5 * z);
    let mut p = ERFC_P[0];
    for c in &ERFC_P[1..] {
        p = p * t + c;
    }
    t * exp(p - z * z)
}

/// `x / (1 + e^-x)`.
#[inline(always)]
pub fn silu(x: f32) -> f32 {
    x / (1.0 + exp(-x))
}

/// Exact GELU, `x/2 · (1 + erf(x/√2))`.
#[inline(always)]
pub fn gelu(x: f32) -> f32 {
    let z = x * std::f32::consts::FRAC_1_SQRT_2;
    let e = erfc_nonneg(z.abs());
    let one_plus_erf = if z < 0.0 { e } else { 2.0 - e };
    0.5 * x * one_plus_erf
}

fn have_avx2() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        std::is_x86_feature_detected!("avx2") && std::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// In-place softmax of one row; a row of only `-inf` (fully masked) becomes zeros.
pub fn softmax_row(row: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if have_avx2() {
        // SAFETY: the CPU supports AVX2 and FMA (checked above).
        unsafe { avx2::softmax_row(row) };
        return;
    }
    let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    if max == f32::NEG_INFINITY {
        row.fill(0.0);
        return;
    }
    let mut sum = 0.0f32;
    for v in row.iter_mut() {
        *v = exp(*v - max);
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in row.iter_mut() {
        *v *= inv;
    }
}

/// `out[i] = silu(a·x[i] + b)` (with `a = 1, b = 0`: plain SiLU).
pub fn affine_silu(x: &[f32], a: f32, b: f32, out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if have_avx2() {
        // SAFETY: the CPU supports AVX2 and FMA (checked above).
        unsafe { avx2::affine_silu(x, a, b, out) };
        return;
    }
    for (y, &v) in out.iter_mut().zip(x) {
        *y = silu(v * a + b);
    }
}

/// `out[i] = h[i] · gelu(g[i])`, or `gelu(g[i])` without `h`.
pub fn gated_gelu(h: Option<&[f32]>, g: &[f32], out: &mut [f32]) {
    #[cfg(target_arch = "x86_64")]
    if have_avx2() {
        // SAFETY: the CPU supports AVX2 and FMA (checked above).
        unsafe { avx2::gated_gelu(h, g, out) };
        return;
    }
    match h {
        Some(h) => {
            for ((y, &hv), &gv) in out.iter_mut().zip(h).zip(g) {
                *y = hv * gelu(gv);
            }
        }
        None => {
            for (y, &gv) in out.iter_mut().zip(g) {
                *y = gelu(gv);
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use super::*;
    use std::arch::x86_64::*;

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn exp8(x: __m256) -> __m256 {
        // max/min with the constant first keep a NaN input NaN.
        let x = _mm256_min_ps(_mm256_set1_ps(EXP_MAX), _mm256_max_ps(_mm256_set1_ps(EXP_MIN), x));
        let t = _mm256_fmadd_ps(x, _mm256_set1_ps(LOG2E), _mm256_set1_ps(ROUND));
        let n = _mm256_sub_ps(t, _mm256_set1_ps(ROUND));
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_HI), x);
        let r = _mm256_fnmadd_ps(n, _mm256_set1_ps(LN2_LO), r);
        // Horner steps written out: at low optimisation levels a loop over the coefficient
        // array is not unrolled and costs loads and branches per lane group.
        let c = |i: usize| _mm256_set1_ps(EXP_P[i]);
        let p = _mm256_fmadd_ps(c(0), r, c(1));
        let p = _mm256_fmadd_ps(p, r, c(2));
        let p = _mm256_fmadd_ps(p, r, c(3));
        let p = _mm256_fmadd_ps(p, r, c(4));
        let p = _mm256_fmadd_ps(p, r, c(5));
        let er = _mm256_add_ps(_mm256_fmadd_ps(p, _mm256_mul_ps(r, r), r), _mm256_set1_ps(1.0));
        let n_int = _mm256_sub_epi32(_mm256_castps_si256(t), _mm256_set1_epi32(ROUND.to_bits() as i32));
        let pow2n = _mm256_slli_epi32::<23>(_mm256_add_epi32(n_int, _mm256_set1_epi32(127)));
        _mm256_mul_ps(er, _mm256_castsi256_ps(pow2n))
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn gelu8(x: __m256) -> __m256 {
        let z = _mm256_mul_ps(x, _mm256_set1_ps(std::f32::consts::FRAC_1_SQRT_2));
        let az = _mm256_andnot_ps(_mm256_set1_ps(-0.0), z);
        let t =
            _mm256_div_ps(_mm256_set1_ps(1.0), _mm256_fmadd_ps(az, _mm256_set1_ps(0.5), _mm256_set1_ps(1.0)));
        let c = |i: usize| _mm256_set1_ps(ERFC_P[i]);
        let p = _mm256_fmadd_ps(c(0), t, c(1));
        let p = _mm256_fmadd_ps(p, t, c(2));
        let p = _mm256_fmadd_ps(p, t, c(3));
        let p = _mm256_fmadd_ps(p, t, c(4));
        let p = _mm256_fmadd_ps(p, t, c(5));
        let p = _mm256_fmadd_ps(p, t, c(6));
        let p = _mm256_fmadd_ps(p, t, c(7));
        let p = _mm256_fmadd_ps(p, t, c(8));
        let p = _mm256_fmadd_ps(p, t, c(9));
        let e = _mm256_mul_ps(t, exp8(_mm256_fnmadd_ps(az, az, p)));
        let negative = _mm256_cmp_ps::<_CMP_LT_OQ>(z, _mm256_setzero_ps());
        let one_plus_erf = _mm256_blendv_ps(_mm256_sub_ps(_mm256_set1_ps(2.0), e), e, negative);
        _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5), x), one_plus_erf)
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn silu8(x: __m256) -> __m256 {
        let e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), x));
        _mm256_div_ps(x, _mm256_add_ps(_mm256_set1_ps(1.0), e))
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn softmax_row(row: &mut [f32]) {
        let n8 = row.len() / 8 * 8;
        let p = row.as_mut_ptr();
        let mut vmax = _mm256_set1_ps(f32::NEG_INFINITY);
        for i in (0..n8).step_by(8) {
            // SAFETY: i + 8 ≤ n8 ≤ row.len(). (NaN scores are dropped here but still
            // propagate through exp and the sum below.)
            vmax = _mm256_max_ps(vmax, unsafe { _mm256_loadu_ps(p.add(i)) });
        }
        let mut lanes = [0.0f32; 8];
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), vmax) };
        let max = lanes.iter().chain(&row[n8..]).copied().fold(f32::NEG_INFINITY, f32::max);
        if max == f32::NEG_INFINITY {
            row.fill(0.0);
            return;
        }
        let vmax = _mm256_set1_ps(max);
        let mut vsum = _mm256_setzero_ps();
        for i in (0..n8).step_by(8) {
            // SAFETY: i + 8 ≤ n8 ≤ row.len().
            let e = exp8(_mm256_sub_ps(unsafe { _mm256_loadu_ps(p.add(i)) }, vmax));
            unsafe { _mm256_storeu_ps(p.add(i), e) };
            vsum = _mm256_add_ps(vsum, e);
        }
        unsafe { _mm256_storeu_ps(lanes.as_mut_ptr(), vsum) };
        let mut sum: f32 = lanes.iter().sum();
        for v in &mut row[n8..] {
            *v = exp(*v - max);
            sum += *v;
        }
        let inv = 1.0 / sum;
        let vinv = _mm256_set1_ps(inv);
        for i in (0..n8).step_by(8) {
            // SAFETY: as above.
            unsafe { _mm256_storeu_ps(p.add(i), _mm256_mul_ps(_mm256_loadu_ps(p.add(i)), vinv)) };
        }
        for v in &mut row[n8..] {
            *v *= inv;
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn affine_silu(x: &[f32], a: f32, b: f32, out: &mut [f32]) {
        let n = x.len().min(out.len());
        let n8 = n / 8 * 8;
        let (va, vb) = (_mm256_set1_ps(a), _mm256_set1_ps(b));
        for i in (0..n8).step_by(8) {
            // SAFETY: i + 8 ≤ n8 ≤ both lengths.
            unsafe {
                let v = _mm256_fmadd_ps(_mm256_loadu_ps(x.as_ptr().add(i)), va, vb);
                _mm256_storeu_ps(out.as_mut_ptr().add(i), silu8(v));
            }
        }
        for i in n8..n {
            out[i] = silu(x[i] * a + b);
        }
    }

    #[target_feature(enable = "avx2,fma")]
    pub(super) unsafe fn gated_gelu(h: Option<&[f32]>, g: &[f32], out: &mut [f32]) {
        let n = g.len().min(out.len()).min(h.map_or(usize::MAX, |h| h.len()));
        let n8 = n / 8 * 8;
        match h {
            Some(h) => {
                for i in (0..n8).step_by(8) {
                    // SAFETY: i + 8 ≤ n8 ≤ every length.
                    unsafe {
                        let y = gelu8(_mm256_loadu_ps(g.as_ptr().add(i)));
                        _mm256_storeu_ps(
                            out.as_mut_ptr().add(i),
                            _mm256_mul_ps(y, _mm256_loadu_ps(h.as_ptr().add(i))),
                        );
                    }
                }
            }
            None => {
                for i in (0..n8).step_by(8) {
                    // SAFETY: i + 8 ≤ n8 ≤ every length.
                    unsafe {
                        _mm256_storeu_ps(out.as_mut_ptr().add(i), gelu8(_mm256_loadu_ps(g.as_ptr().add(i))))
                    };
                }
            }
        }
        for i in n8..n {
            out[i] = h.map_or(1.0, |h| h[i]) * gelu(g[i]);
        }
    }
}
