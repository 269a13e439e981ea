//! CPU float32 kernels behind the inference fast paths: direct access to a tensor's f32 data,
//! a vectorisable `exp`, row reductions, GELU (tanh form) and the matrix product (the `gemm`
//! crate candle itself uses).
//!
//! The element-wise loops are written so that LLVM vectorises them (fixed-width lane arrays,
//! selects instead of branches, no libm calls); on x86-64 they are compiled a second time with
//! AVX-512 or AVX2 (+ FMA) enabled and chosen at run time, since the default target is SSE2.
//!
//! These kernels do not record gradients. Training will need the differentiable candle forms
//! (matmul + `ops::softmax` + matmul, `layer_norm_slow`, ...), see each caller's fallback path.
#![allow(unsafe_code)]

use candle_core::{CpuStorage, DType, Layout, Result, Storage, StorageRef, Tensor};

/// True when `t` can use the f32 CPU kernels.
pub fn is_cpu_f32(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32
}

/// The f32 data of a contiguous CPU tensor, borrowed (the storage stays read-locked while alive).
pub struct F32View<'a> {
    guard: StorageRef<'a>,
    start: usize,
    end: usize,
}

impl<'a> F32View<'a> {
    /// Borrows the data of `t`, which must be a contiguous f32 CPU tensor.
    pub fn new(t: &'a Tensor) -> Result<Self> {
        let (guard, layout): (StorageRef<'a>, &Layout) = t.storage_and_layout();
        if !matches!(&*guard, Storage::Cpu(CpuStorage::F32(_))) {
            candle_core::bail!(
                "f32 CPU kernel called on a {:?} tensor on {:?}",
                t.dtype(),
                t.device().location()
            )
        }
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!(
                "f32 CPU kernel called on a non-contiguous tensor of shape {:?}",
                t.dims()
            )
        };
        Ok(Self { guard, start, end })
    }

    pub fn slice(&self) -> &[f32] {
        match &*self.guard {
            Storage::Cpu(CpuStorage::F32(v)) => &v[self.start..self.end],
            // `new` only builds views over f32 CPU storage.
            _ => &[],
        }
    }
}

/// A raw pointer that may be shared between rayon tasks writing to disjoint regions.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub *mut f32);
// SAFETY: only used to hand disjoint output regions to parallel tasks; see each use.
unsafe impl Send for SendPtr {}
// SAFETY: as above.
unsafe impl Sync for SendPtr {}

/// A zeroed f32 buffer for a kernel's output. (Backing fresh buffers with transparent huge
/// pages was tried: page zeroing, not faulting, dominates, so it gained nothing.)
pub(crate) fn zeroed(n: usize) -> Vec<f32> {
    vec![0f32; n]
}

/// Number of worker threads for the parallel kernels.
pub(crate) fn num_threads() -> usize {
    rayon::current_num_threads().max(1)
}

/// `dst[m×n] = lhs[m×k] · rhs[k×n]` (or `dst += ...` with `accumulate`), f32, arbitrary strides
/// given as (row stride, column stride) in elements. `threads > 1` lets gemm split the work.
///
/// # Safety
/// Every index `i*rs + j*cs` reached for the given sizes must lie inside the allocation behind
/// each pointer, and `dst` must not overlap `lhs` or `rhs` nor be written by anyone else meanwhile.
pub(crate) unsafe fn sgemm(
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_strides: (isize, isize),
    accumulate: bool,
    lhs: *const f32,
    lhs_strides: (isize, isize),
    rhs: *const f32,
    rhs_strides: (isize, isize),
    threads: usize,
) {
    let par = if threads > 1 {
        gemm::Parallelism::Rayon(threads)
    } else {
        gemm::Parallelism::None
    };
    // SAFETY: forwarded from the caller's contract. gemm computes
    // dst = alpha·dst + beta·lhs·rhs, reading dst only when `read_dst` is set.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst,
            dst_strides.1,
            dst_strides.0,
            accumulate,
            lhs,
            lhs_strides.1,
            lhs_strides.0,
            rhs,
            rhs_strides.1,
            rhs_strides.0,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        )
    }
}

// ------------------------------------------------------------------------------------ exp

const LANES: usize = 16;
const EXP_HI: f32 = 88.0;
const EXP_LO: f32 = -87.0;
const LOG2E: f32 = std::f32::consts::LOG2_E;
/// 1.5·2^23: adding it rounds a float of magnitude < 2^22 to an integer held in the mantissa.
const ROUND_MAGIC: f32 = 12_582_912.0;
const LN2_HI: f32 = 0.693_359_4;
const LN2_LO: f32 = -2.121_944_4e-4;

/// `exp(x)` in f32, branch-free so that loops over it vectorise (Cephes' polynomial on
/// `x - n·ln2`, then the exponent set directly). Relative error about 2 ulp; inputs are
/// clamped to [-87, 88], so very negative inputs give ~1e-38 rather than 0.
#[inline(always)]
pub fn exp_f32(x: f32) -> f32 {
    exp_f32_impl::<false>(x)
}

/// `a·b + c`, fused when `FMA` (only instantiate with `FMA = true` inside code compiled with
/// the `fma` target feature, else it becomes a slow libm call).
#[inline(always)]
fn madd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA {
        a.mul_add(b, c)
    } else {
        a * b + c
    }
}

#[inline(always)]
fn exp_f32_impl<const FMA: bool>(x: f32) -> f32 {
    let x = if x > EXP_HI { EXP_HI } else { x };
    let x = if x < EXP_LO { EXP_LO } else { x };
    let t = madd::<FMA>(x, LOG2E, ROUND_MAGIC);
    let n = t - ROUND_MAGIC;
    let r = madd::<FMA>(n, -LN2_LO, madd::<FMA>(n, -LN2_HI, x));
    let mut p = 1.987_569_1e-4_f32;
    p = madd::<FMA>(p, r, 1.398_199_9e-3);
    p = madd::<FMA>(p, r, 8.333_452e-3);
    p = madd::<FMA>(p, r, 4.166_579_6e-2);
    p = madd::<FMA>(p, r, 1.666_666_5e-1);
    p = madd::<FMA>(p, r, 0.5);
    let e = madd::<FMA>(p * r, r, r) + 1.0;
    let ni = (t.to_bits() as i32).wrapping_sub(ROUND_MAGIC.to_bits() as i32);
    let scale = f32::from_bits(((ni + 127) << 23) as u32);
    e * scale
}

/// Calls `$generic::<true>` compiled for AVX-512 or AVX2 (+FMA) when the CPU has them, else
/// `$generic::<false>` for the base target.
macro_rules! simd_dispatch {
    ($generic:ident, ($($arg:ident : $ty:ty),*) $(-> $ret:ty)?) => {{
        #[cfg(target_arch = "x86_64")]
        {
            #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma")]
            unsafe fn avx512($($arg: $ty),*) $(-> $ret)? {
                $generic::<true>($($arg),*)
            }
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2($($arg: $ty),*) $(-> $ret)? {
                $generic::<true>($($arg),*)
            }
            if std::arch::is_x86_feature_detected!("avx512f")
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512dq")
                && std::arch::is_x86_feature_detected!("avx512vl")
            {
                // SAFETY: the CPU supports these features (checked just above; AVX-512 implies
                // AVX2 and FMA).
                return unsafe { avx512($($arg),*) };
            }
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                // SAFETY: the CPU supports AVX2 and FMA (checked just above).
                return unsafe { avx2($($arg),*) };
            }
        }
        $generic::<false>($($arg),*)
    }};
}

// ------------------------------------------------------------------------------- reductions

#[inline(always)]
fn row_max(xs: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
        }
    }
    let mut m = f32::NEG_INFINITY;
    for &v in acc.iter().chain(chunks.remainder()) {
        m = if v > m { v } else { m };
    }
    m
}

#[inline(always)]
fn row_sum(xs: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            acc[i] += c[i];
        }
    }
    acc.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
}

/// Σ (x - mean)² with lane accumulators.
#[inline(always)]
fn row_sq_dev(xs: &[f32], mean: f32) -> f32 {
    let mut acc = [0f32; LANES];
    let mut chunks = xs.chunks_exact(LANES);
    for c in &mut chunks {
        for i in 0..LANES {
            let d = c[i] - mean;
            acc[i] += d * d;
        }
    }
    let mut s: f32 = acc.iter().sum();
    for &v in chunks.remainder() {
        s += (v - mean) * (v - mean);
    }
    s
}

// ---------------------------------------------------------------------------------- softmax

/// In place over `rows` rows of `cols` scores: `x ← exp(scale·(x − max_row))`; returns nothing
/// but writes each row's sum into `sums` (normalisation is left to the caller, who can apply it
/// to the much smaller attention output).
#[inline(always)]
fn softmax_unnormalised_generic<const FMA: bool>(
    x: &mut [f32],
    cols: usize,
    scale: f32,
    sums: &mut [f32],
) {
    for (row, sum) in x.chunks_exact_mut(cols).zip(sums.iter_mut()) {
        let shift = -row_max(row) * scale;
        let mut acc = [0f32; LANES];
        let mut chunks = row.chunks_exact_mut(LANES);
        for c in &mut chunks {
            for i in 0..LANES {
                let e = exp_f32_impl::<FMA>(madd::<FMA>(c[i], scale, shift));
                c[i] = e;
                acc[i] += e;
            }
        }
        let mut s: f32 = acc.iter().sum();
        for v in chunks.into_remainder() {
            let e = exp_f32_impl::<FMA>(madd::<FMA>(*v, scale, shift));
            *v = e;
            s += e;
        }
        *sum = s;
    }
}

/// `x ← exp(scale·x − scale·max_row)` per row of `cols`; row sums into `sums` (see
/// [`softmax_unnormalised_generic`]).
pub fn softmax_unnormalised(x: &mut [f32], cols: usize, scale: f32, sums: &mut [f32]) {
    simd_dispatch!(softmax_unnormalised_generic, (x: &mut [f32], cols: usize, scale: f32, sums: &mut [f32]))
}

// -------------------------------------------------------------------------------------- GELU

/// GELU, tanh form: `0.5·x·(1 + tanh(√(2/π)(x + 0.044715x³)))`, computed as the equal
/// `x / (1 + exp(-2u))`.
#[inline(always)]
fn gelu_tanh_generic<const FMA: bool>(x: &mut [f32]) {
    const C: f32 = 0.797_884_6; // √(2/π)
    #[inline(always)]
    fn g<const FMA: bool>(v: f32) -> f32 {
        let u = C * madd::<FMA>(0.044_715 * v * v, v, v);
        v / (1.0 + exp_f32_impl::<FMA>(-2.0 * u))
    }
    let mut chunks = x.chunks_exact_mut(LANES);
    for c in &mut chunks {
        for v in c.iter_mut() {
            *v = g::<FMA>(*v);
        }
    }
    for v in chunks.into_remainder() {
        *v = g::<FMA>(*v);
    }
}

/// In-place GELU (tanh approximation), single-threaded over `x`.
pub fn gelu_tanh(x: &mut [f32]) {
    simd_dispatch!(gelu_tanh_generic, (x: &mut [f32]))
}

// --------------------------------------------------------------------------------- LayerNorm

/// Per-row affine modulation applied after the norm: `y·(1 + scale) + shift`.
#[derive(Clone, Copy)]
pub struct Modulate<'a> {
    /// `1 + scale`, length `d`.
    pub one_plus_scale: &'a [f32],
    pub shift: &'a [f32],
}

/// LayerNorm of each `d`-row of `x` into `out`: `(x − μ)/√(σ² + eps)·w + b`, then the optional
/// modulation.
#[inline(always)]
fn layer_norm_rows_generic<const FMA: bool>(
    x: &[f32],
    out: &mut [f32],
    d: usize,
    eps: f32,
    w: Option<&[f32]>,
    b: Option<&[f32]>,
    m: Option<Modulate<'_>>,
) {
    for (xr, yr) in x.chunks_exact(d).zip(out.chunks_exact_mut(d)) {
        let mean = row_sum(xr) / d as f32;
        let var = row_sq_dev(xr, mean) / d as f32;
        let rstd = 1.0 / (var + eps).sqrt();
        for (y, &v) in yr.iter_mut().zip(xr) {
            *y = (v - mean) * rstd;
        }
        if let Some(w) = w {
            for (y, &w) in yr.iter_mut().zip(w) {
                *y *= w;
            }
        }
        if let Some(b) = b {
            for (y, &b) in yr.iter_mut().zip(b) {
                *y += b;
            }
        }
        if let Some(m) = m {
            for ((y, &s), &t) in yr.iter_mut().zip(m.one_plus_scale).zip(m.shift) {
                *y = madd::<FMA>(*y, s, t);
            }
        }
    }
}

/// See [`layer_norm_rows_generic`].
pub fn layer_norm_rows(
    x: &[f32],
    out: &mut [f32],
    d: usize,
    eps: f32,
    w: Option<&[f32]>,
    b: Option<&[f32]>,
    m: Option<Modulate<'_>>,
) {
    simd_dispatch!(
        layer_norm_rows_generic,
        (x: &[f32], out: &mut [f32], d: usize, eps: f32, w: Option<&[f32]>, b: Option<&[f32]>, m: Option<Modulate<'_>>)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exp_matches_std_to_a_few_ulp() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let got = exp_f32(x) as f64;
            let want = (x as f64).exp();
            worst = worst.max(((got - want) / want).abs());
            x += 0.0137;
        }
        assert!(worst < 4e-7, "relative error {worst:e}");
        assert_eq!(exp_f32(0.0), 1.0);
        assert!(exp_f32(-1e30) < 1e-37);
    }

    #[test]
    fn softmax_rows_match_a_plain_softmax() {
        let cols = 37;
        let x: Vec<f32> = (0..3 * cols)
            .map(|i| ((i * 7919) % 101) as f32 * 0.37 - 15.0)
            .collect();
        let mut y = x.clone();
        let mut sums = [0f32; 3];
        softmax_unnormalised(&mut y, cols, 0.5, &mut sums);
        for r in 0..3 {
            let row = &x[r * cols..(r + 1) * cols];
            let m = row.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let e: Vec<f64> = row.iter().map(|&v| ((v as f64 - m) * 0.5).exp()).collect();
            let s: f64 = e.iter().sum();
            for c in 0..cols {
                let got = (y[r * cols + c] / sums[r]) as f64;
                assert!(
                    (got - e[c] / s).abs() < 1e-6,
                    "row {r} col {c}: {got} vs {}",
                    e[c] / s
                );
            }
        }
    }

    #[test]
    fn gelu_matches_the_tanh_formula() {
        let x: Vec<f32> = (0..1000).map(|i| (i as f32 - 500.0) * 0.023).collect();
        let mut y = x.clone();
        gelu_tanh(&mut y);
        for (&v, &g) in x.iter().zip(&y) {
            let v = v as f64;
            let want = 0.5
                * v
                * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (v + 0.044715 * v * v * v)).tanh());
            assert!(
                (g as f64 - want).abs() < 2e-6 * (1.0 + want.abs()),
                "{v}: {g} vs {want}"
            );
        }
    }

    #[test]
    fn layer_norm_rows_match_the_definition() {
        let d = 19;
        let x: Vec<f32> = (0..2 * d)
            .map(|i| ((i * 31) % 17) as f32 * 0.5 - 3.0)
            .collect();
        let w: Vec<f32> = (0..d).map(|i| 1.0 + i as f32 * 0.01).collect();
        let b: Vec<f32> = (0..d).map(|i| i as f32 * -0.02).collect();
        let s: Vec<f32> = (0..d).map(|i| 1.0 + i as f32 * 0.03).collect();
        let t: Vec<f32> = (0..d).map(|i| 0.1 - i as f32 * 0.01).collect();
        let mut y = vec![0f32; 2 * d];
        let m = Modulate {
            one_plus_scale: &s,
            shift: &t,
        };
        layer_norm_rows(&x, &mut y, d, 1e-5, Some(&w), Some(&b), Some(m));
        for r in 0..2 {
            let row: Vec<f64> = x[r * d..(r + 1) * d].iter().map(|&v| v as f64).collect();
            let mean = row.iter().sum::<f64>() / d as f64;
            let var = row.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / d as f64;
            for c in 0..d {
                let n = (row[c] - mean) / (var + 1e-5).sqrt();
                let want = (n * w[c] as f64 + b[c] as f64) * s[c] as f64 + t[c] as f64;
                assert!((y[r * d + c] as f64 - want).abs() < 1e-5, "{r},{c}");
            }
        }
    }
}
