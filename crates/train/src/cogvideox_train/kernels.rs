//! Fused CPU ops with hand-written backward passes, for the CogVideoX training forward.
//!
//! Written from candle ops, one CogVideoX block is some fifty graph nodes over `[B, S, D]`
//! tensors (norm statistics, modulation per span, concatenations, softmax, GELU), each a
//! single-threaded pass, and candle's backward adds two more passes per node (every gradient
//! is accumulated as `zeros_like` + `add`). Measured at the default model's size, that made the
//! backward pass 5x the forward. Here:
//!
//! - [`BlockOp`]: one whole `CogVideoXBlock` as a single graph node. Its forward runs the
//!   matmuls through candle (gemm) and everything between them as the parallel slice kernels
//!   below, keeping the activations the backward needs; its backward is written out (matmul
//!   gradients, then each kernel's backward) and returns the gradients of the block input, of
//!   the adaLN modulation and of the block's parameters (one flat vector, see
//!   [`BlockDims::layout`]).
//! - Single-kernel ops, used for the final norms and to test each kernel's backward on its own
//!   against finite differences: [`AdaNorm`] (LayerNorm + an affine pair per (sample, span),
//!   CogVideoX's adaLN: `norm(x)·w·(1 + scale) + b·(1 + scale) + shift` = `x̂·W + B`),
//!   [`GatedResidual`] (`x + gate·y`), [`BiasGelu`] (`gelu_tanh(y + bias)`), [`HeadNormRope`]
//!   (per-head q/k LayerNorm + RoPE on the video rows) and [`Attention`] (softmax(q·kᵀ/√dh)·v).
//!
//! Attention: forward by the inference kernel ([`vdit_models::layers::attention::sdpa`]);
//! backward recomputes the probabilities one sample at a time (memory `H·S²` per sample).
//!
//! Layouts: rows `[B, S, n]` (row `(b, s)`; text rows `s < split` first); per-(sample, span)
//! parameters `[Bp, G, n]` with `Bp` 1 (shared) or B and `G` 1 (one span) or 2 (text, video);
//! the fused projection `qkv [B, S, 3D]` holds q, k, v thirds, heads contiguous in each.
//! Every kernel runs in f32 (training) and f64 (gradient checks), on contiguous CPU tensors.

use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Device, IndexOp, InplaceOp1, Layout,
    Result, Shape, Storage, StorageRef, Tensor, WithDType,
};
use rayon::prelude::*;
use std::ops::Range;
use std::sync::{Arc, Mutex};
use vdit_models::layers::cpu as fast;

/// Rows per parallel task.
const ROWS: usize = 16;

/// The float types the kernels run in: f32 for training, f64 for gradient checks.
pub trait Real: WithDType {
    fn sqrt_(self) -> Self;
    fn exp_(self) -> Self;
    /// `gelu_tanh(u)` and its derivative.
    fn gelu_and_grad(self) -> (Self, Self);
    /// `x ← gelu_tanh(x)`.
    fn gelu_inplace(x: &mut [Self]);
    /// Softmax of `scale·row` for each row of `cols` values, in place.
    fn softmax_rows(x: &mut [Self], cols: usize, scale: f64);
}

fn softmax_rows_generic<T: Real>(x: &mut [T], cols: usize, scale: f64) {
    let scale = T::from_f64(scale);
    for row in x.chunks_exact_mut(cols) {
        let mut m = row[0];
        for &v in row.iter() {
            if v > m {
                m = v;
            }
        }
        let mut sum = zero::<T>();
        for v in row.iter_mut() {
            *v = ((*v - m) * scale).exp_();
            sum += *v;
        }
        let inv = T::from_f64(1.0) / sum;
        for v in row.iter_mut() {
            *v *= inv;
        }
    }
}

const GELU_C: f64 = 0.797_884_560_802_865_4; // √(2/π)
const GELU_A: f64 = 0.044_715;

impl Real for f32 {
    #[inline(always)]
    fn sqrt_(self) -> Self {
        self.sqrt()
    }
    #[inline(always)]
    fn exp_(self) -> Self {
        fast::exp_f32(self)
    }
    #[inline(always)]
    fn gelu_and_grad(self) -> (Self, Self) {
        // 0.5·(1 + tanh(a)) = σ(2a): g = u·σ, g' = σ + u·σ(1 − σ)·2a'
        let (c, a) = (GELU_C as f32, GELU_A as f32);
        let u = self;
        let inner = c * (u + a * u * u * u);
        let sig = 1.0 / (1.0 + fast::exp_f32(-2.0 * inner));
        let da = c * (1.0 + 3.0 * a * u * u);
        (u * sig, sig + u * sig * (1.0 - sig) * 2.0 * da)
    }
    fn gelu_inplace(x: &mut [Self]) {
        fast::gelu_tanh(x)
    }
    fn softmax_rows(x: &mut [Self], cols: usize, scale: f64) {
        // the inference kernel (vectorised exp), then the normalisation
        let mut sums = vec![0f32; x.len() / cols.max(1)];
        fast::softmax_unnormalised(x, cols, scale as f32, &mut sums);
        for (row, s) in x.chunks_exact_mut(cols).zip(sums) {
            let inv = 1.0 / s;
            for v in row {
                *v *= inv;
            }
        }
    }
}

impl Real for f64 {
    #[inline(always)]
    fn sqrt_(self) -> Self {
        self.sqrt()
    }
    #[inline(always)]
    fn exp_(self) -> Self {
        self.exp()
    }
    #[inline(always)]
    fn gelu_and_grad(self) -> (Self, Self) {
        let u = self;
        let inner = GELU_C * (u + GELU_A * u * u * u);
        let sig = 1.0 / (1.0 + (-2.0 * inner).exp());
        let da = GELU_C * (1.0 + 3.0 * GELU_A * u * u);
        (u * sig, sig + u * sig * (1.0 - sig) * 2.0 * da)
    }
    fn gelu_inplace(x: &mut [Self]) {
        for v in x {
            *v = v.gelu_and_grad().0;
        }
    }
    fn softmax_rows(x: &mut [Self], cols: usize, scale: f64) {
        softmax_rows_generic(x, cols, scale)
    }
}

#[inline(always)]
fn zero<T: Real>() -> T {
    T::from_f64(0.0)
}

fn zeros<T: Real>(n: usize) -> Vec<T> {
    vec![zero::<T>(); n]
}

fn add_into<T: Real>(mut a: Vec<T>, b: Vec<T>) -> Vec<T> {
    for (x, y) in a.iter_mut().zip(b) {
        *x += y;
    }
    a
}

// ------------------------------------------------------------------------ data access

/// The data of a contiguous CPU storage.
fn slice<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [T]> {
    let v = T::cpu_storage_as_slice(s)?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&v[a..b]),
        None => candle_core::bail!("{what}: the input must be contiguous"),
    }
}

/// Borrowed data of a contiguous tensor.
struct View<'a> {
    guard: StorageRef<'a>,
    start: usize,
    end: usize,
}

impl<'a> View<'a> {
    fn new(t: &'a Tensor) -> Result<Self> {
        let (guard, layout) = t.storage_and_layout();
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("fused op: a non-contiguous tensor of shape {:?}", t.dims())
        };
        Ok(Self { guard, start, end })
    }

    fn get<T: WithDType>(&self) -> Result<&[T]> {
        match &*self.guard {
            Storage::Cpu(c) => Ok(&T::cpu_storage_as_slice(c)?[self.start..self.end]),
            _ => candle_core::bail!("fused op: only CPU tensors are supported"),
        }
    }
}

fn cpu_tensor<T: WithDType>(v: Vec<T>, shape: &[usize]) -> Result<Tensor> {
    Tensor::from_vec(v, shape, &Device::Cpu)
}

fn float_dtype(dt: DType, name: &str) -> Result<()> {
    match dt {
        DType::F32 | DType::F64 => Ok(()),
        other => candle_core::bail!("{name}: only f32 and f64 are supported, found {other:?}"),
    }
}

/// Runs `$f::<f32>` or `$f::<f64>` by the dtype of a storage.
macro_rules! by_dtype {
    ($s:expr, $name:expr, $f:ident ($($arg:expr),*)) => {
        match $s {
            CpuStorage::F32(_) => $f::<f32>($($arg),*),
            CpuStorage::F64(_) => $f::<f64>($($arg),*),
            _ => candle_core::bail!("{}: only f32 and f64 are supported", $name),
        }
    };
}

// ----------------------------------------------------------------------- slice kernels

/// Where the parameters of a row of `[B, S, n]` live in a `[Bp, G, n]` tensor.
#[derive(Clone, Copy, Debug)]
struct Groups {
    s: usize,
    n: usize,
    shared: bool,
    two: bool,
    split: usize,
}

impl Groups {
    fn new(x: &[usize], p: &[usize], split: usize, what: &str) -> Result<Self> {
        let (&[b, s, n], &[bp, g, pn]) = (x, p) else {
            candle_core::bail!(
                "{what}: expected x [B, S, n] and parameters [Bp, G, n], found {x:?} and {p:?}"
            )
        };
        if pn != n || !(bp == 1 || bp == b) || !(g == 1 || g == 2) {
            candle_core::bail!(
                "{what}: parameters {p:?} do not fit x {x:?} (expected [1 or {b}, 1 or 2, {n}])"
            )
        }
        Ok(Self {
            s,
            n,
            shared: bp == 1,
            two: g == 2,
            split,
        })
    }

    /// Per-sample parameters for both spans (`[B, 2, n]`).
    fn per_sample_spans(s: usize, n: usize, split: usize) -> Self {
        Self {
            s,
            n,
            shared: false,
            two: true,
            split,
        }
    }

    #[inline(always)]
    fn offset(&self, row: usize) -> usize {
        let (bi, si) = (row / self.s, row % self.s);
        let pb = if self.shared { 0 } else { bi };
        let g = usize::from(self.two && si >= self.split);
        (pb * (1 + usize::from(self.two)) + g) * self.n
    }
}

/// Mean and 1/√(var + eps) of a row.
#[inline(always)]
fn row_stats<T: Real>(x: &[T], eps: T) -> (T, T) {
    let n = T::from_f64(x.len() as f64);
    let mut s = zero::<T>();
    for &v in x {
        s += v;
    }
    let mean = s / n;
    let mut q = zero::<T>();
    for &v in x {
        let d = v - mean;
        q += d * d;
    }
    (mean, T::from_f64(1.0) / (q / n + eps).sqrt_())
}

/// LayerNorm backward of one row: given `x` and the gradient `gy` at `y = x̂·w + b`,
/// accumulates `dw += gy·x̂`, `db += gy` and writes `dx` (plus `add` when given).
#[inline(always)]
fn ln_row_bwd<T: Real>(
    x: &[T],
    gy: &[T],
    w: &[T],
    eps: T,
    dx: &mut [T],
    add: Option<&[T]>,
    dw: &mut [T],
    db: &mut [T],
) {
    let (mean, rstd) = row_stats(x, eps);
    let n = T::from_f64(x.len() as f64);
    let (mut m1, mut m2) = (zero::<T>(), zero::<T>());
    for ((((&xv, &g), &wv), dwv), dbv) in x
        .iter()
        .zip(gy)
        .zip(w)
        .zip(dw.iter_mut())
        .zip(db.iter_mut())
    {
        let xh = (xv - mean) * rstd;
        *dwv += g * xh;
        *dbv += g;
        let gw = g * wv;
        m1 += gw;
        m2 += gw * xh;
    }
    let (m1, m2) = (m1 / n, m2 / n);
    for (((d, &xv), &g), &wv) in dx.iter_mut().zip(x).zip(gy).zip(w) {
        let xh = (xv - mean) * rstd;
        *d = rstd * (g * wv - m1 - xh * m2);
    }
    if let Some(a) = add {
        for (d, &av) in dx.iter_mut().zip(a) {
            *d += av;
        }
    }
}

/// `y = x̂·w[p(r)] + b[p(r)]` per row.
fn ln_fwd<T: Real>(x: &[T], w: &[T], b: &[T], g: Groups, eps: f64) -> Vec<T> {
    let n = g.n;
    let eps = T::from_f64(eps);
    let mut out = zeros::<T>(x.len());
    out.par_chunks_mut(ROWS * n).enumerate().for_each(|(t, o)| {
        for (i, yr) in o.chunks_exact_mut(n).enumerate() {
            let r = t * ROWS + i;
            let xr = &x[r * n..(r + 1) * n];
            let (mean, rstd) = row_stats(xr, eps);
            let p = g.offset(r);
            let (wr, br) = (&w[p..p + n], &b[p..p + n]);
            for j in 0..n {
                yr[j] = (xr[j] - mean) * rstd * wr[j] + br[j];
            }
        }
    });
    out
}

/// Backward of [`ln_fwd`]: `(dx (+ add), dw, db)`.
fn ln_bwd<T: Real>(
    x: &[T],
    w: &[T],
    gy: &[T],
    g: Groups,
    eps: f64,
    add: Option<&[T]>,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let n = g.n;
    let np = w.len();
    let eps = T::from_f64(eps);
    let mut dx = zeros::<T>(x.len());
    let (dw, db) = dx
        .par_chunks_mut(ROWS * n)
        .enumerate()
        .fold(
            || (zeros::<T>(np), zeros::<T>(np)),
            |(mut dw, mut db), (t, dxc)| {
                for (i, dxr) in dxc.chunks_exact_mut(n).enumerate() {
                    let r = t * ROWS + i;
                    let p = g.offset(r);
                    let rows = r * n..(r + 1) * n;
                    ln_row_bwd(
                        &x[rows.clone()],
                        &gy[rows.clone()],
                        &w[p..p + n],
                        eps,
                        dxr,
                        add.map(|a| &a[rows.clone()]),
                        &mut dw[p..p + n],
                        &mut db[p..p + n],
                    );
                }
                (dw, db)
            },
        )
        .reduce(
            || (zeros::<T>(np), zeros::<T>(np)),
            |a, b| (add_into(a.0, b.0), add_into(a.1, b.1)),
        );
    (dx, dw, db)
}

/// `out = x + gate[p(r)]·(y + bias)` per row.
fn gres_fwd<T: Real>(x: &[T], y: &[T], bias: Option<&[T]>, gate: &[T], g: Groups) -> Vec<T> {
    let n = g.n;
    let mut out = zeros::<T>(x.len());
    out.par_chunks_mut(ROWS * n).enumerate().for_each(|(t, o)| {
        for (i, orow) in o.chunks_exact_mut(n).enumerate() {
            let r = t * ROWS + i;
            let p = g.offset(r);
            let (xr, yr, gr) = (
                &x[r * n..(r + 1) * n],
                &y[r * n..(r + 1) * n],
                &gate[p..p + n],
            );
            match bias {
                Some(b) => {
                    for j in 0..n {
                        orow[j] = xr[j] + gr[j] * (yr[j] + b[j]);
                    }
                }
                None => {
                    for j in 0..n {
                        orow[j] = xr[j] + gr[j] * yr[j];
                    }
                }
            }
        }
    });
    out
}

/// Backward of [`gres_fwd`] (the `x` gradient is `go` itself): `(dy, dgate, dbias = Σ dy)`.
fn gres_bwd<T: Real>(
    y: &[T],
    bias: Option<&[T]>,
    gate: &[T],
    go: &[T],
    g: Groups,
) -> (Vec<T>, Vec<T>, Vec<T>) {
    let n = g.n;
    let np = gate.len();
    let mut dy = zeros::<T>(y.len());
    let (dgate, dbias) = dy
        .par_chunks_mut(ROWS * n)
        .enumerate()
        .fold(
            || (zeros::<T>(np), zeros::<T>(n)),
            |(mut dg, mut db), (t, dyc)| {
                for (i, dyr) in dyc.chunks_exact_mut(n).enumerate() {
                    let r = t * ROWS + i;
                    let p = g.offset(r);
                    let (yr, gor) = (&y[r * n..(r + 1) * n], &go[r * n..(r + 1) * n]);
                    let (gr, dgr) = (&gate[p..p + n], &mut dg[p..p + n]);
                    let it = dyr
                        .iter_mut()
                        .zip(yr)
                        .zip(gor)
                        .zip(gr)
                        .zip(dgr.iter_mut())
                        .zip(db.iter_mut());
                    match bias {
                        None => {
                            for (((((d, &yv), &g), &gt), dgv), dbv) in it {
                                let v = g * gt;
                                *d = v;
                                *dbv += v;
                                *dgv += g * yv;
                            }
                        }
                        Some(b) => {
                            for ((((((d, &yv), &g), &gt), dgv), dbv), &bv) in it.zip(b) {
                                let v = g * gt;
                                *d = v;
                                *dbv += v;
                                *dgv += g * (yv + bv);
                            }
                        }
                    }
                }
                (dg, db)
            },
        )
        .reduce(
            || (zeros::<T>(np), zeros::<T>(n)),
            |a, b| (add_into(a.0, b.0), add_into(a.1, b.1)),
        );
    (dy, dgate, dbias)
}

/// `gelu_tanh(u + b)` over rows of `b.len()`.
fn gelu_fwd<T: Real>(u: &[T], b: &[T]) -> Vec<T> {
    let n = b.len();
    let mut out = zeros::<T>(u.len());
    out.par_chunks_mut(ROWS * n)
        .zip(u.par_chunks(ROWS * n))
        .for_each(|(o, uc)| {
            for (orow, ur) in o.chunks_exact_mut(n).zip(uc.chunks_exact(n)) {
                for ((o, &u), &b) in orow.iter_mut().zip(ur).zip(b) {
                    *o = u + b;
                }
            }
            T::gelu_inplace(o);
        });
    out
}

/// Backward of [`gelu_fwd`]: `(du, db = Σ du)`.
fn gelu_bwd<T: Real>(u: &[T], b: &[T], go: &[T]) -> (Vec<T>, Vec<T>) {
    let n = b.len();
    let mut du = zeros::<T>(u.len());
    let db = du
        .par_chunks_mut(ROWS * n)
        .zip(u.par_chunks(ROWS * n).zip(go.par_chunks(ROWS * n)))
        .fold(
            || zeros::<T>(n),
            |mut db, (duc, (uc, gc))| {
                for ((dur, ur), gr) in duc
                    .chunks_exact_mut(n)
                    .zip(uc.chunks_exact(n))
                    .zip(gc.chunks_exact(n))
                {
                    for ((((d, &u), &g), &b), acc) in
                        dur.iter_mut().zip(ur).zip(gr).zip(b).zip(db.iter_mut())
                    {
                        let v = g * (u + b).gelu_and_grad().1;
                        *d = v;
                        *acc += v;
                    }
                }
                db
            },
        )
        .reduce(|| zeros::<T>(n), add_into);
    (du, db)
}

/// RoPE tables `(cos, sin)`, each `[rows, head_dim]` row-major, for the video rows.
#[derive(Debug, Clone)]
pub struct RopeTables {
    pub cos: Vec<f32>,
    pub sin: Vec<f32>,
    pub rows: usize,
}

/// Sizes of the per-head q/k norm with RoPE.
#[derive(Debug, Clone)]
pub struct HeadNormRope {
    pub heads: usize,
    pub head_dim: usize,
    pub text_len: usize,
    pub eps: f64,
    pub rope: Option<Arc<RopeTables>>,
}

impl HeadNormRope {
    fn check(&self, x: &[usize], p: &[usize]) -> Result<(usize, usize)> {
        let (h, dh) = (self.heads, self.head_dim);
        let &[b, s, d3] = x else {
            candle_core::bail!("HeadNormRope: expected qkv [B, S, 3D], found {x:?}")
        };
        if d3 != 3 * h * dh || p != [4, dh] {
            candle_core::bail!(
                "HeadNormRope: qkv {x:?} / parameters {p:?} do not fit {h} heads of {dh}"
            )
        }
        if let Some(r) = &self.rope {
            if s < self.text_len
                || r.rows != s - self.text_len
                || r.cos.len() != r.rows * dh
                || r.sin.len() != r.rows * dh
            {
                candle_core::bail!(
                    "HeadNormRope: rotary tables of {} rows for {} video rows (S {s}, text {})",
                    r.rows,
                    s.saturating_sub(self.text_len),
                    self.text_len
                )
            }
        }
        Ok((b, s))
    }

    /// The table row of sequence position `si`, if it is rotated.
    #[inline(always)]
    fn rope_row(&self, si: usize) -> Option<(&[f32], &[f32])> {
        let r = self.rope.as_ref()?;
        if si < self.text_len {
            return None;
        }
        let i = (si - self.text_len) * self.head_dim;
        Some((&r.cos[i..i + self.head_dim], &r.sin[i..i + self.head_dim]))
    }

    /// `x + bias` (when given) → q, k normed and rotated; v copied. `p [4, dh]`:
    /// q weight, q bias, k weight, k bias.
    fn fwd<T: Real>(&self, x: &[T], bias: Option<&[T]>, p: &[T], s: usize) -> Vec<T> {
        let dh = self.head_dim;
        let d = self.heads * dh;
        let eps = T::from_f64(self.eps);
        let mut out = zeros::<T>(x.len());
        out.par_chunks_mut(3 * d).enumerate().for_each_init(
            || zeros::<T>(dh),
            |tmp, (r, o)| {
                let xr = &x[r * 3 * d..(r + 1) * 3 * d];
                match bias {
                    Some(b) => {
                        for j in 0..3 * d {
                            o[j] = xr[j] + b[j];
                        }
                    }
                    None => o.copy_from_slice(xr),
                }
                let rope = self.rope_row(r % s);
                for part in 0..2 {
                    let (w, b) = (
                        &p[2 * part * dh..(2 * part + 1) * dh],
                        &p[(2 * part + 1) * dh..(2 * part + 2) * dh],
                    );
                    for h in 0..self.heads {
                        let o0 = part * d + h * dh;
                        let oh = &mut o[o0..o0 + dh];
                        let xin = &mut tmp[..];
                        xin.copy_from_slice(oh);
                        let (mean, rstd) = row_stats(xin, eps);
                        for j in 0..dh {
                            oh[j] = (xin[j] - mean) * rstd * w[j] + b[j];
                        }
                        if let Some((c, sn)) = rope {
                            for j in (0..dh).step_by(2) {
                                let (a0, a1) = (oh[j], oh[j + 1]);
                                oh[j] =
                                    a0 * T::from_f64(c[j] as f64) - a1 * T::from_f64(sn[j] as f64);
                                oh[j + 1] = a1 * T::from_f64(c[j + 1] as f64)
                                    + a0 * T::from_f64(sn[j + 1] as f64);
                            }
                        }
                    }
                }
            },
        );
        out
    }

    /// Backward of [`Self::fwd`]: `(dx, dp [4·dh], dbias = Σ dx [3D])`.
    fn bwd<T: Real>(
        &self,
        x: &[T],
        bias: Option<&[T]>,
        p: &[T],
        go: &[T],
        s: usize,
    ) -> (Vec<T>, Vec<T>, Vec<T>) {
        let dh = self.head_dim;
        let d = self.heads * dh;
        let eps = T::from_f64(self.eps);
        let mut dx = zeros::<T>(x.len());
        let (dp, db) = dx
            .par_chunks_mut(3 * d)
            .enumerate()
            .fold(
                || (zeros::<T>(4 * dh), zeros::<T>(3 * d), zeros::<T>(2 * dh)),
                |(mut dp, mut db, mut scratch), (r, dxr)| {
                    let (xr, gr) = (
                        &x[r * 3 * d..(r + 1) * 3 * d],
                        &go[r * 3 * d..(r + 1) * 3 * d],
                    );
                    let rope = self.rope_row(r % s);
                    let (gpre, xin) = scratch.split_at_mut(dh);
                    for part in 0..2 {
                        let w = &p[2 * part * dh..(2 * part + 1) * dh];
                        for h in 0..self.heads {
                            let o0 = part * d + h * dh;
                            let g = &gr[o0..o0 + dh];
                            // the gradient before the rotation: Rᵀ·g
                            match rope {
                                Some((c, sn)) => {
                                    for j in (0..dh).step_by(2) {
                                        let (g0, g1) = (g[j], g[j + 1]);
                                        gpre[j] = g0 * T::from_f64(c[j] as f64)
                                            + g1 * T::from_f64(sn[j + 1] as f64);
                                        gpre[j + 1] = g1 * T::from_f64(c[j + 1] as f64)
                                            - g0 * T::from_f64(sn[j] as f64);
                                    }
                                }
                                None => gpre.copy_from_slice(g),
                            }
                            match bias {
                                Some(b) => {
                                    for j in 0..dh {
                                        xin[j] = xr[o0 + j] + b[o0 + j];
                                    }
                                }
                                None => xin.copy_from_slice(&xr[o0..o0 + dh]),
                            }
                            let (dw, dbn) = dp[2 * part * dh..(2 * part + 2) * dh].split_at_mut(dh);
                            ln_row_bwd(xin, gpre, w, eps, &mut dxr[o0..o0 + dh], None, dw, dbn);
                        }
                    }
                    dxr[2 * d..].copy_from_slice(&gr[2 * d..]);
                    for j in 0..3 * d {
                        db[j] += dxr[j];
                    }
                    (dp, db, scratch)
                },
            )
            .map(|(dp, db, _)| (dp, db))
            .reduce(
                || (zeros::<T>(4 * dh), zeros::<T>(3 * d)),
                |a, b| (add_into(a.0, b.0), add_into(a.1, b.1)),
            );
        (dx, dp, db)
    }
}

/// Row softmax of `scale·x`, in place.
struct SoftmaxRows {
    scale: f64,
}

impl SoftmaxRows {
    fn run<T: Real>(&self, x: &mut [T], cols: usize) {
        x.par_chunks_mut(ROWS * cols)
            .for_each(|c| T::softmax_rows(c, cols, self.scale));
    }
}

impl InplaceOp1 for SoftmaxRows {
    fn name(&self) -> &'static str {
        "vdit-softmax-rows"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> Result<()> {
        let cols = *l.dims().last().unwrap_or(&1);
        let Some((a, b)) = l.contiguous_offsets() else {
            candle_core::bail!("softmax: the input must be contiguous")
        };
        match s {
            CpuStorage::F32(v) => self.run(&mut v[a..b], cols),
            CpuStorage::F64(v) => self.run(&mut v[a..b], cols),
            _ => candle_core::bail!("softmax: only f32 and f64 are supported"),
        }
        Ok(())
    }
}

/// `dS = P ⊙ (dP − δ)·scale` with `δ` per row (dP the first input, P the second).
struct SoftmaxBwd {
    delta: Vec<f64>,
    scale: f64,
}

impl SoftmaxBwd {
    fn run<T: Real>(&self, dp: &[T], p: &[T], cols: usize) -> Vec<T> {
        let scale = T::from_f64(self.scale);
        let mut out = zeros::<T>(dp.len());
        out.par_chunks_mut(ROWS * cols)
            .enumerate()
            .for_each(|(t, o)| {
                for (i, orow) in o.chunks_exact_mut(cols).enumerate() {
                    let r = t * ROWS + i;
                    let delta = T::from_f64(self.delta[r]);
                    let (dpr, pr) = (&dp[r * cols..(r + 1) * cols], &p[r * cols..(r + 1) * cols]);
                    for ((o, &dv), &pv) in orow.iter_mut().zip(dpr).zip(pr) {
                        *o = pv * (dv - delta) * scale;
                    }
                }
            });
        out
    }
}

impl CustomOp2 for SoftmaxBwd {
    fn name(&self) -> &'static str {
        "vdit-softmax-bwd"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let cols = *l1.dims().last().unwrap_or(&1);
        if l1.dims() != l2.dims() || l1.shape().elem_count() != self.delta.len() * cols {
            candle_core::bail!("softmax backward: shapes {:?} {:?}", l1.dims(), l2.dims())
        }
        let n = "softmax backward";
        let out = match s1 {
            CpuStorage::F32(_) => f32::to_cpu_storage_owned(self.run::<f32>(
                slice(s1, l1, n)?,
                slice(s2, l2, n)?,
                cols,
            )),
            CpuStorage::F64(_) => f64::to_cpu_storage_owned(self.run::<f64>(
                slice(s1, l1, n)?,
                slice(s2, l2, n)?,
                cols,
            )),
            _ => candle_core::bail!("{n}: only f32 and f64 are supported"),
        };
        Ok((out, l1.shape().clone()))
    }
}

/// `1/√dh`, rounded to f32 as the inference model computes it.
fn attn_scale(head_dim: usize) -> f64 {
    (1.0 / (head_dim as f32).sqrt()) as f64
}

/// Attention forward: `qkv [B, S, 3D]` → `[B, S, D]` (the inference kernel in f32).
fn attn_fwd(qkv: &Tensor, heads: usize, head_dim: usize) -> Result<Tensor> {
    let d = heads * head_dim;
    let part = |i: usize| qkv.narrow(2, i * d, d);
    vdit_models::layers::attention::sdpa(
        &part(0)?,
        &part(1)?,
        &part(2)?,
        heads,
        attn_scale(head_dim) as f32,
    )
}

/// Attention backward: the gradient `[B, S, 3D]` of `qkv` from the output `o` and its
/// gradient `go` (`[B, S, D]` each), one sample at a time.
fn attn_bwd<T: Real>(
    qkv: &Tensor,
    o: &Tensor,
    go: &Tensor,
    heads: usize,
    head_dim: usize,
) -> Result<Tensor> {
    let (b, s, d3) = qkv.dims3()?;
    let (h, dh) = (heads, head_dim);
    let d = d3 / 3;
    let scale = attn_scale(dh);
    let (qkv, o, go) = (
        qkv.detach().contiguous()?,
        o.detach().contiguous()?,
        go.detach().contiguous()?,
    );
    let mut out = Vec::with_capacity(b);
    for bi in 0..b {
        // [S, 3D] -> [S, 3, H, dh]; each third as [H, S, dh] (strided views, no copies)
        let x = qkv.i(bi)?.reshape((s, 3, h, dh))?;
        let third = |i: usize| -> Result<Tensor> { x.i((.., i))?.transpose(0, 1) };
        let (q, k, v) = (third(0)?, third(1)?, third(2)?);
        let g = go.i(bi)?.reshape((s, h, dh))?.transpose(0, 1)?; // [H, S, dh]
        let p = q.matmul(&k.t()?)?; // [H, S, S] scores
        p.inplace_op1(&SoftmaxRows { scale })?; // probabilities
        let dv = p.t()?.matmul(&g)?; // [H, S, dh]
        let dp = g.matmul(&v.t()?)?; // [H, S, S]
                                     // δ = rowsum(dO ⊙ O) per (head, query)
        let delta = {
            let (gi, oi) = (go.i(bi)?, o.i(bi)?);
            let (gv, ov) = (View::new(&gi)?, View::new(&oi)?);
            let (gs, os) = (gv.get::<T>()?, ov.get::<T>()?);
            let mut delta = vec![0f64; h * s];
            for si in 0..s {
                for hh in 0..h {
                    let a = si * d + hh * dh;
                    let mut acc = zero::<T>();
                    for j in 0..dh {
                        acc += gs[a + j] * os[a + j];
                    }
                    delta[hh * s + si] = acc.to_f64();
                }
            }
            delta
        };
        let ds = dp.apply_op2_no_bwd(&p, &SoftmaxBwd { delta, scale })?; // [H, S, S]
        drop((p, dp));
        let dq = ds.matmul(&k)?; // [H, S, dh]
        let dk = ds.t()?.matmul(&q)?; // [H, S, dh]
                                      // [3, H, S, dh] -> [S, 3, H, dh] -> [S, 3D]
        let dx = Tensor::stack(&[dq, dk, dv], 0)?
            .permute((2, 0, 1, 3))?
            .contiguous()?
            .reshape((s, 3 * d))?;
        out.push(dx);
    }
    Tensor::stack(&out, 0) // [B, S, 3D]
}

// ---------------------------------------------------------------------------- BlockOp

/// The sizes of a `CogVideoXBlock`.
#[derive(Debug, Clone)]
pub struct BlockDims {
    pub heads: usize,
    pub head_dim: usize,
    /// Text rows at the start of the sequence.
    pub text_len: usize,
    /// LayerNorm eps of norm1 / norm2 (the q/k norms use 1e-6).
    pub eps: f64,
    /// norm1 / norm2 have elementwise weight and bias.
    pub affine: bool,
    /// to_q / to_k / to_v have biases.
    pub qkv_bias: bool,
}

/// Ranges of each parameter in the flat parameter vector of [`BlockOp`].
#[derive(Debug, Clone)]
pub struct BlockLayout {
    pub wqkv: Range<usize>,
    pub bqkv: Option<Range<usize>>,
    pub norm_qk: Range<usize>,
    pub wout: Range<usize>,
    pub bout: Range<usize>,
    pub wff1: Range<usize>,
    pub bff1: Range<usize>,
    pub wff2: Range<usize>,
    pub bff2: Range<usize>,
    pub norm1: Option<(Range<usize>, Range<usize>)>,
    pub norm2: Option<(Range<usize>, Range<usize>)>,
    pub total: usize,
}

impl BlockDims {
    pub fn dim(&self) -> usize {
        self.heads * self.head_dim
    }

    /// The flat parameter vector, in this order (weights row-major as in the checkpoint):
    /// `to_q.weight, to_k.weight, to_v.weight [3D, D]`, (`to_q.bias, to_k.bias, to_v.bias`),
    /// `norm_q.weight, norm_q.bias, norm_k.weight, norm_k.bias [4, dh]`,
    /// `to_out.0.weight [D, D], to_out.0.bias`, `ff.net.0.proj.weight [4D, D]`, its bias,
    /// `ff.net.2.weight [D, 4D]`, its bias, (`norm1.norm.weight, .bias, norm2.norm.weight, .bias`).
    pub fn layout(&self) -> BlockLayout {
        let d = self.dim();
        let mut at = 0;
        let mut take = |n: usize| {
            let r = at..at + n;
            at += n;
            r
        };
        let wqkv = take(3 * d * d);
        let bqkv = self.qkv_bias.then(|| take(3 * d));
        let norm_qk = take(4 * self.head_dim);
        let wout = take(d * d);
        let bout = take(d);
        let wff1 = take(4 * d * d);
        let bff1 = take(4 * d);
        let wff2 = take(4 * d * d);
        let bff2 = take(d);
        let norm1 = self.affine.then(|| (take(d), take(d)));
        let norm2 = self.affine.then(|| (take(d), take(d)));
        BlockLayout {
            wqkv,
            bqkv,
            norm_qk,
            wout,
            bout,
            wff1,
            bff1,
            wff2,
            bff2,
            norm1,
            norm2,
            total: at,
        }
    }
}

/// What the forward keeps for the backward (tensors in the op's dtype).
struct Saved {
    wqkv: Tensor,
    wout: Tensor,
    wff1: Tensor,
    wff2: Tensor,
    /// `[B, 2, D]` each: adaLN weight, bias and gate of both spans, for norm1 and norm2.
    mods: [Tensor; 6],
    h1: Tensor,
    qkv_mm: Tensor,
    qkvn: Tensor,
    o: Tensor,
    a_mm: Tensor,
    x1: Tensor,
    h2: Tensor,
    u: Tensor,
    f: Tensor,
    y_mm: Tensor,
}

/// One `CogVideoXBlock` as a single op (see the module docs): inputs `x [B, S, D]`, the adaLN
/// modulation `mods [B, 12D]` (norm1.linear's then norm2.linear's output, each
/// `[shift, scale, gate, enc_shift, enc_scale, enc_gate]`), and the parameters `[P]`
/// ([`BlockDims::layout`]); output `[B, S, D]`.
pub struct BlockOp {
    pub dims: BlockDims,
    pub rope: Option<Arc<RopeTables>>,
    saved: Mutex<Option<Saved>>,
}

/// `(W, B, G)`, each `[B, 2, D]` (text, video): the adaLN of one `CogVideoXLayerNormZero`
/// folded with its norm's affine pair, from `m = mods[:, base..base + 6D]`.
fn zero_mods<T: Real>(
    mods: &[T],
    base: usize,
    norm: Option<(&[T], &[T])>,
    b: usize,
    d: usize,
) -> [Vec<T>; 3] {
    let one = T::from_f64(1.0);
    let (mut w, mut bb, mut g) = (
        zeros::<T>(b * 2 * d),
        zeros::<T>(b * 2 * d),
        zeros::<T>(b * 2 * d),
    );
    for bi in 0..b {
        let m = &mods[bi * 12 * d + base..bi * 12 * d + base + 6 * d];
        // (shift, scale, gate) chunks of the text span (3, 4, 5) and the video span (0, 1, 2)
        for (span, (sh, sc, gt)) in [(0, (3, 4, 5)), (1, (0, 1, 2))] {
            let o = (bi * 2 + span) * d;
            for j in 0..d {
                let s1 = one + m[sc * d + j];
                let (nw, nb) = match norm {
                    Some((nw, nb)) => (nw[j], nb[j]),
                    None => (one, zero::<T>()),
                };
                w[o + j] = nw * s1;
                bb[o + j] = nb * s1 + m[sh * d + j];
                g[o + j] = m[gt * d + j];
            }
        }
    }
    [w, bb, g]
}

/// Backward of [`zero_mods`]: writes the modulation gradient into `dmods[:, base..base + 6D]`
/// and returns the norm's `(dw, db)` (zeros without affine).
fn zero_mods_bwd<T: Real>(
    mods: &[T],
    base: usize,
    norm: Option<(&[T], &[T])>,
    grads: [&[T]; 3],
    dmods: &mut [T],
    b: usize,
    d: usize,
) -> (Vec<T>, Vec<T>) {
    let one = T::from_f64(1.0);
    let [dw, dbb, dg] = grads;
    let (mut dnw, mut dnb) = (zeros::<T>(d), zeros::<T>(d));
    for bi in 0..b {
        let m = &mods[bi * 12 * d + base..bi * 12 * d + base + 6 * d];
        let dm = &mut dmods[bi * 12 * d + base..bi * 12 * d + base + 6 * d];
        for (span, (sh, sc, gt)) in [(0, (3, 4, 5)), (1, (0, 1, 2))] {
            let o = (bi * 2 + span) * d;
            for j in 0..d {
                let s1 = one + m[sc * d + j];
                let (nw, nb) = match norm {
                    Some((nw, nb)) => (nw[j], nb[j]),
                    None => (one, zero::<T>()),
                };
                dm[sc * d + j] = dw[o + j] * nw + dbb[o + j] * nb;
                dm[sh * d + j] = dbb[o + j];
                dm[gt * d + j] = dg[o + j];
                dnw[j] += dw[o + j] * s1;
                dnb[j] += dbb[o + j] * s1;
            }
        }
    }
    (dnw, dnb)
}

impl BlockOp {
    pub fn new(dims: BlockDims, rope: Option<Arc<RopeTables>>) -> Self {
        Self {
            dims,
            rope,
            saved: Mutex::new(None),
        }
    }

    fn head_norm(&self) -> HeadNormRope {
        HeadNormRope {
            heads: self.dims.heads,
            head_dim: self.dims.head_dim,
            text_len: self.dims.text_len,
            eps: 1e-6,
            rope: self.rope.clone(),
        }
    }

    fn check(&self, x: &[usize], m: &[usize], p: &[usize]) -> Result<(usize, usize)> {
        let d = self.dims.dim();
        let total = self.dims.layout().total;
        match (x, m, p) {
            (&[b, s, xd], &[mb, md], &[pn]) if xd == d && mb == b && md == 12 * d && pn == total => {
                if s < self.dims.text_len {
                    candle_core::bail!("CogVideoX block: {s} rows, fewer than the {} text rows", self.dims.text_len)
                }
                Ok((b, s))
            }
            _ => candle_core::bail!(
                "CogVideoX block: x {x:?}, mods {m:?}, params {p:?}; expected [B, S, {d}], [B, {}], [{total}]",
                12 * d
            ),
        }
    }

    fn fwd<T: Real>(&self, xs: &[T], ms: &[T], ps: &[T], b: usize, s: usize) -> Result<Vec<T>> {
        let dims = &self.dims;
        let (d, eps) = (dims.dim(), dims.eps);
        let lay = dims.layout();
        let rows = b * s;
        let w = |r: &Range<usize>, shape: (usize, usize)| {
            Tensor::from_slice(&ps[r.clone()], shape, &Device::Cpu)
        };
        let (wqkv, wout, wff1, wff2) = (
            w(&lay.wqkv, (3 * d, d))?,
            w(&lay.wout, (d, d))?,
            w(&lay.wff1, (4 * d, d))?,
            w(&lay.wff2, (d, 4 * d))?,
        );
        let norm = |n: &Option<(Range<usize>, Range<usize>)>| {
            n.as_ref().map(|(a, b)| (&ps[a.clone()], &ps[b.clone()]))
        };
        let [w1, b1, g1] = zero_mods(ms, 0, norm(&lay.norm1), b, d);
        let [w2, b2, g2] = zero_mods(ms, 6 * d, norm(&lay.norm2), b, d);
        let groups = Groups::per_sample_spans(s, d, dims.text_len);
        // attention half
        let h1 = cpu_tensor(ln_fwd(xs, &w1, &b1, groups, eps), &[rows, d])?;
        let qkv_mm = h1.matmul(&wqkv.t()?)?; // [B·S, 3D]
        let qkvn = {
            let v = View::new(&qkv_mm)?;
            let bias = lay.bqkv.as_ref().map(|r| &ps[r.clone()]);
            let out = self
                .head_norm()
                .fwd(v.get::<T>()?, bias, &ps[lay.norm_qk.clone()], s);
            cpu_tensor(out, &[b, s, 3 * d])?
        };
        let o = attn_fwd(&qkvn, dims.heads, dims.head_dim)?; // [B, S, D]
        let a_mm = o.reshape((rows, d))?.matmul(&wout.t()?)?; // [B·S, D]
        let x1 = {
            let v = View::new(&a_mm)?;
            let out = gres_fwd(xs, v.get::<T>()?, Some(&ps[lay.bout.clone()]), &g1, groups);
            cpu_tensor(out, &[rows, d])?
        };
        // feed-forward half
        let h2 = {
            let v = View::new(&x1)?;
            cpu_tensor(ln_fwd(v.get::<T>()?, &w2, &b2, groups, eps), &[rows, d])?
        };
        let u = h2.matmul(&wff1.t()?)?; // [B·S, 4D]
        let f = {
            let v = View::new(&u)?;
            cpu_tensor(
                gelu_fwd(v.get::<T>()?, &ps[lay.bff1.clone()]),
                &[rows, 4 * d],
            )?
        };
        let y_mm = f.matmul(&wff2.t()?)?; // [B·S, D]
        let out = {
            let (xv, yv) = (View::new(&x1)?, View::new(&y_mm)?);
            gres_fwd(
                xv.get::<T>()?,
                yv.get::<T>()?,
                Some(&ps[lay.bff2.clone()]),
                &g2,
                groups,
            )
        };
        let t = |v: Vec<T>| cpu_tensor(v, &[b, 2, d]);
        let saved = Saved {
            wqkv,
            wout,
            wff1,
            wff2,
            mods: [t(w1)?, t(b1)?, t(g1)?, t(w2)?, t(b2)?, t(g2)?],
            h1,
            qkv_mm,
            qkvn,
            o,
            a_mm,
            x1,
            h2,
            u,
            f,
            y_mm,
        };
        *self.saved.lock().unwrap_or_else(|e| e.into_inner()) = Some(saved);
        Ok(out)
    }

    fn bwd_t<T: Real>(
        &self,
        x: &Tensor,
        mods: &Tensor,
        params: &Tensor,
        gout: &Tensor,
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let (b, s) = self.check(x.dims(), mods.dims(), params.dims())?;
        let guard = self.saved.lock().unwrap_or_else(|e| e.into_inner());
        let Some(sv) = guard.as_ref() else {
            candle_core::bail!("CogVideoX block: backward without a forward")
        };
        let dims = &self.dims;
        let (d, eps) = (dims.dim(), dims.eps);
        let lay = dims.layout();
        let rows = b * s;
        let groups = Groups::per_sample_spans(s, d, dims.text_len);
        let (x, mods, params) = (
            x.detach().contiguous()?,
            mods.detach().contiguous()?,
            params.detach().contiguous()?,
        );
        let gout = gout.detach().contiguous()?;
        let (xv, mv, pv, gv) = (
            View::new(&x)?,
            View::new(&mods)?,
            View::new(&params)?,
            View::new(&gout)?,
        );
        let (xs, ms, ps, gs) = (
            xv.get::<T>()?,
            mv.get::<T>()?,
            pv.get::<T>()?,
            gv.get::<T>()?,
        );
        let mut dparams = zeros::<T>(lay.total);
        let put = |dp: &mut Vec<T>, r: &Range<usize>, v: &[T]| dp[r.clone()].copy_from_slice(v);
        let mviews = sv.mods.iter().map(View::new).collect::<Result<Vec<_>>>()?;
        let mslices = mviews
            .iter()
            .map(|v| v.get::<T>())
            .collect::<Result<Vec<_>>>()?;
        let [w1, _b1, g1, w2, _b2, g2] = [
            mslices[0], mslices[1], mslices[2], mslices[3], mslices[4], mslices[5],
        ];
        let flat = |t: &Tensor| -> Result<Vec<T>> { t.flatten_all()?.to_vec1::<T>() };

        // out = x1 + g2·(y_mm + bff2)
        let (gy, dg2, dbff2) = {
            let yv = View::new(&sv.y_mm)?;
            gres_bwd(yv.get::<T>()?, Some(&ps[lay.bff2.clone()]), g2, gs, groups)
        };
        put(&mut dparams, &lay.bff2, &dbff2);
        let gy = cpu_tensor(gy, &[rows, d])?;
        put(&mut dparams, &lay.wff2, &flat(&gy.t()?.matmul(&sv.f)?)?); // [D, 4D]
        let gf = gy.matmul(&sv.wff2)?; // [B·S, 4D]
        drop(gy);
        // f = gelu(u + bff1)
        let (gu, dbff1) = {
            let (uv, gfv) = (View::new(&sv.u)?, View::new(&gf)?);
            gelu_bwd(uv.get::<T>()?, &ps[lay.bff1.clone()], gfv.get::<T>()?)
        };
        drop(gf);
        put(&mut dparams, &lay.bff1, &dbff1);
        let gu = cpu_tensor(gu, &[rows, 4 * d])?;
        put(&mut dparams, &lay.wff1, &flat(&gu.t()?.matmul(&sv.h2)?)?); // [4D, D]
        let gh2 = gu.matmul(&sv.wff1)?; // [B·S, D]
        drop(gu);
        // h2 = norm2(x1), plus the residual path
        let (gx1, dw2, db2) = {
            let (x1v, gh2v) = (View::new(&sv.x1)?, View::new(&gh2)?);
            ln_bwd(x1v.get::<T>()?, w2, gh2v.get::<T>()?, groups, eps, Some(gs))
        };
        drop(gh2);
        // x1 = x + g1·(a_mm + bout)
        let (ga, dg1, dbout) = {
            let av = View::new(&sv.a_mm)?;
            gres_bwd(
                av.get::<T>()?,
                Some(&ps[lay.bout.clone()]),
                g1,
                &gx1,
                groups,
            )
        };
        put(&mut dparams, &lay.bout, &dbout);
        let ga = cpu_tensor(ga, &[rows, d])?;
        let o2 = sv.o.reshape((rows, d))?;
        put(&mut dparams, &lay.wout, &flat(&ga.t()?.matmul(&o2)?)?); // [D, D]
        let go = ga.matmul(&sv.wout)?.reshape((b, s, d))?;
        drop(ga);
        let gqkvn = attn_bwd::<T>(&sv.qkvn, &sv.o, &go, dims.heads, dims.head_dim)?;
        drop(go);
        let (gqkv, dnorm, dbqkv) = {
            let (qv, gq) = (View::new(&sv.qkv_mm)?, View::new(&gqkvn)?);
            let bias = lay.bqkv.as_ref().map(|r| &ps[r.clone()]);
            self.head_norm().bwd(
                qv.get::<T>()?,
                bias,
                &ps[lay.norm_qk.clone()],
                gq.get::<T>()?,
                s,
            )
        };
        drop(gqkvn);
        put(&mut dparams, &lay.norm_qk, &dnorm);
        if let Some(r) = &lay.bqkv {
            put(&mut dparams, r, &dbqkv);
        }
        let gqkv = cpu_tensor(gqkv, &[rows, 3 * d])?;
        put(&mut dparams, &lay.wqkv, &flat(&gqkv.t()?.matmul(&sv.h1)?)?); // [3D, D]
        let gh1 = gqkv.matmul(&sv.wqkv)?; // [B·S, D]
        drop(gqkv);
        let (gx, dw1, db1) = {
            let gh1v = View::new(&gh1)?;
            ln_bwd(xs, w1, gh1v.get::<T>()?, groups, eps, Some(&gx1))
        };
        // the modulation and the norms' affine pairs
        let norm = |n: &Option<(Range<usize>, Range<usize>)>| {
            n.as_ref().map(|(a, b)| (&ps[a.clone()], &ps[b.clone()]))
        };
        let mut dmods = zeros::<T>(b * 12 * d);
        let (dn1w, dn1b) = zero_mods_bwd(
            ms,
            0,
            norm(&lay.norm1),
            [&dw1, &db1, &dg1],
            &mut dmods,
            b,
            d,
        );
        let (dn2w, dn2b) = zero_mods_bwd(
            ms,
            6 * d,
            norm(&lay.norm2),
            [&dw2, &db2, &dg2],
            &mut dmods,
            b,
            d,
        );
        if let (Some((a, bb)), Some((c, e))) = (&lay.norm1, &lay.norm2) {
            put(&mut dparams, a, &dn1w);
            put(&mut dparams, bb, &dn1b);
            put(&mut dparams, c, &dn2w);
            put(&mut dparams, e, &dn2b);
        }
        Ok((
            cpu_tensor(gx, &[b, s, d])?,
            cpu_tensor(dmods, &[b, 12 * d])?,
            cpu_tensor(dparams, &[lay.total])?,
        ))
    }
}

impl CustomOp3 for BlockOp {
    fn name(&self) -> &'static str {
        "vdit-cogvideox-block"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, s) = self.check(l1.dims(), l2.dims(), l3.dims())?;
        let n = self.name();
        fn run<T: Real>(
            op: &BlockOp,
            s1: &CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
            s3: &CpuStorage,
            l3: &Layout,
            b: usize,
            s: usize,
        ) -> Result<CpuStorage> {
            let n = "CogVideoX block";
            let out = op.fwd::<T>(
                slice(s1, l1, n)?,
                slice(s2, l2, n)?,
                slice(s3, l3, n)?,
                b,
                s,
            )?;
            Ok(T::to_cpu_storage_owned(out))
        }
        let out = by_dtype!(s1, n, run(self, s1, l1, s2, l2, s3, l3, b, s))?;
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        mods: &Tensor,
        params: &Tensor,
        _res: &Tensor,
        gout: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        float_dtype(x.dtype(), self.name())?;
        let (gx, gm, gp) = match x.dtype() {
            DType::F32 => self.bwd_t::<f32>(x, mods, params, gout)?,
            _ => self.bwd_t::<f64>(x, mods, params, gout)?,
        };
        Ok((Some(gx), Some(gm), Some(gp)))
    }
}

/// One block: `x [B, S, D]`, `mods [B, 12D]`, flat `params [P]` → `[B, S, D]`.
pub fn block(
    x: &Tensor,
    mods: &Tensor,
    params: &Tensor,
    dims: BlockDims,
    rope: Option<Arc<RopeTables>>,
) -> Result<Tensor> {
    x.contiguous()?.apply_op3(
        &mods.contiguous()?,
        &params.contiguous()?,
        BlockOp::new(dims, rope),
    )
}

// ------------------------------------------------------------------ single-kernel ops

/// `y = x̂·w[p(r)] + b[p(r)]` per row `r` of `x [B, S, n]`, with `w`, `b` `[Bp, G, n]`.
#[derive(Debug, Clone, Copy)]
pub struct AdaNorm {
    pub split: usize,
    pub eps: f64,
}

impl CustomOp3 for AdaNorm {
    fn name(&self) -> &'static str {
        "vdit-ada-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = Groups::new(l1.dims(), l2.dims(), self.split, "AdaNorm")?;
        if l2.dims() != l3.dims() {
            candle_core::bail!(
                "AdaNorm: weight {:?} and bias {:?} differ",
                l2.dims(),
                l3.dims()
            )
        }
        fn run<T: Real>(
            op: &AdaNorm,
            s1: &CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
            s3: &CpuStorage,
            l3: &Layout,
            g: Groups,
        ) -> Result<CpuStorage> {
            let n = "AdaNorm";
            let (x, w, b) = (slice(s1, l1, n)?, slice(s2, l2, n)?, slice(s3, l3, n)?);
            Ok(T::to_cpu_storage_owned(ln_fwd::<T>(x, w, b, g, op.eps)))
        }
        let out = by_dtype!(s1, self.name(), run(self, s1, l1, s2, l2, s3, l3, g))?;
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        gy: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        float_dtype(x.dtype(), self.name())?;
        fn run<T: Real>(
            op: &AdaNorm,
            x: &Tensor,
            w: &Tensor,
            gy: &Tensor,
        ) -> Result<(Tensor, Tensor, Tensor)> {
            let g = Groups::new(x.dims(), w.dims(), op.split, "AdaNorm")?;
            let (x, w, gy) = (x.contiguous()?, w.contiguous()?, gy.contiguous()?);
            let (xv, wv, gv) = (View::new(&x)?, View::new(&w)?, View::new(&gy)?);
            let (dx, dw, db) = ln_bwd(
                xv.get::<T>()?,
                wv.get::<T>()?,
                gv.get::<T>()?,
                g,
                op.eps,
                None,
            );
            Ok((
                cpu_tensor(dx, x.dims())?,
                cpu_tensor(dw, w.dims())?,
                cpu_tensor(db, w.dims())?,
            ))
        }
        let (dx, dw, db) = match x.dtype() {
            DType::F32 => run::<f32>(self, x, w, gy)?,
            _ => run::<f64>(self, x, w, gy)?,
        };
        Ok((Some(dx), Some(dw), Some(db)))
    }
}

/// `out = x + gate[p(r)]·y` for `x, y [B, S, n]` and `gate [Bp, G, n]`.
#[derive(Debug, Clone, Copy)]
pub struct GatedResidual {
    pub split: usize,
}

impl CustomOp3 for GatedResidual {
    fn name(&self) -> &'static str {
        "vdit-gated-residual"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = Groups::new(l1.dims(), l3.dims(), self.split, "GatedResidual")?;
        if l1.dims() != l2.dims() {
            candle_core::bail!(
                "GatedResidual: x {:?} and y {:?} differ",
                l1.dims(),
                l2.dims()
            )
        }
        fn run<T: Real>(
            s1: &CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
            s3: &CpuStorage,
            l3: &Layout,
            g: Groups,
        ) -> Result<CpuStorage> {
            let n = "GatedResidual";
            let (x, y, gate) = (slice(s1, l1, n)?, slice(s2, l2, n)?, slice(s3, l3, n)?);
            Ok(T::to_cpu_storage_owned(gres_fwd::<T>(x, y, None, gate, g)))
        }
        let out = by_dtype!(s1, self.name(), run(s1, l1, s2, l2, s3, l3, g))?;
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        _x: &Tensor,
        y: &Tensor,
        gate: &Tensor,
        _res: &Tensor,
        go: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        float_dtype(y.dtype(), self.name())?;
        fn run<T: Real>(
            op: &GatedResidual,
            y: &Tensor,
            gate: &Tensor,
            go: &Tensor,
        ) -> Result<(Tensor, Tensor)> {
            let g = Groups::new(y.dims(), gate.dims(), op.split, "GatedResidual")?;
            let (y, gate, go) = (y.contiguous()?, gate.contiguous()?, go.contiguous()?);
            let (yv, gtv, gov) = (View::new(&y)?, View::new(&gate)?, View::new(&go)?);
            let (dy, dg, _) = gres_bwd(yv.get::<T>()?, None, gtv.get::<T>()?, gov.get::<T>()?, g);
            Ok((cpu_tensor(dy, y.dims())?, cpu_tensor(dg, gate.dims())?))
        }
        let (dy, dg) = match y.dtype() {
            DType::F32 => run::<f32>(self, y, gate, go)?,
            _ => run::<f64>(self, y, gate, go)?,
        };
        Ok((Some(go.clone()), Some(dy), Some(dg)))
    }
}

/// `gelu_tanh(y + bias)` for `y [..., n]` and `bias [n]`.
#[derive(Debug, Clone, Copy)]
pub struct BiasGelu;

impl CustomOp2 for BiasGelu {
    fn name(&self) -> &'static str {
        "vdit-bias-gelu"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let n = *l1.dims().last().unwrap_or(&0);
        if l2.dims() != [n] || n == 0 {
            candle_core::bail!(
                "BiasGelu: bias {:?} does not fit y {:?}",
                l2.dims(),
                l1.dims()
            )
        }
        fn run<T: Real>(
            s1: &CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
        ) -> Result<CpuStorage> {
            let (u, b) = (slice(s1, l1, "BiasGelu")?, slice(s2, l2, "BiasGelu")?);
            Ok(T::to_cpu_storage_owned(gelu_fwd::<T>(u, b)))
        }
        let out = by_dtype!(s1, self.name(), run(s1, l1, s2, l2))?;
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        y: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        go: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        float_dtype(y.dtype(), self.name())?;
        fn run<T: Real>(y: &Tensor, b: &Tensor, go: &Tensor) -> Result<(Tensor, Tensor)> {
            let (y, b, go) = (y.contiguous()?, b.contiguous()?, go.contiguous()?);
            let (yv, bv, gov) = (View::new(&y)?, View::new(&b)?, View::new(&go)?);
            let (du, db) = gelu_bwd(yv.get::<T>()?, bv.get::<T>()?, gov.get::<T>()?);
            Ok((cpu_tensor(du, y.dims())?, cpu_tensor(db, b.dims())?))
        }
        let (dy, db) = match y.dtype() {
            DType::F32 => run::<f32>(y, b, go)?,
            _ => run::<f64>(y, b, go)?,
        };
        Ok((Some(dy), Some(db)))
    }
}

impl CustomOp2 for HeadNormRope {
    fn name(&self) -> &'static str {
        "vdit-head-norm-rope"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, s) = self.check(l1.dims(), l2.dims())?;
        fn run<T: Real>(
            op: &HeadNormRope,
            s1: &CpuStorage,
            l1: &Layout,
            s2: &CpuStorage,
            l2: &Layout,
            s: usize,
        ) -> Result<CpuStorage> {
            let n = "HeadNormRope";
            let (x, p) = (slice(s1, l1, n)?, slice(s2, l2, n)?);
            Ok(T::to_cpu_storage_owned(op.fwd::<T>(x, None, p, s)))
        }
        let out = by_dtype!(s1, self.name(), run(self, s1, l1, s2, l2, s))?;
        Ok((out, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        p: &Tensor,
        _res: &Tensor,
        go: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        float_dtype(x.dtype(), self.name())?;
        fn run<T: Real>(
            op: &HeadNormRope,
            x: &Tensor,
            p: &Tensor,
            go: &Tensor,
        ) -> Result<(Tensor, Tensor)> {
            let (_, s) = op.check(x.dims(), p.dims())?;
            let (x, p, go) = (x.contiguous()?, p.contiguous()?, go.contiguous()?);
            let (xv, pv, gov) = (View::new(&x)?, View::new(&p)?, View::new(&go)?);
            let (dx, dp, _) = op.bwd(xv.get::<T>()?, None, pv.get::<T>()?, gov.get::<T>()?, s);
            Ok((cpu_tensor(dx, x.dims())?, cpu_tensor(dp, p.dims())?))
        }
        let (dx, dp) = match x.dtype() {
            DType::F32 => run::<f32>(self, x, p, go)?,
            _ => run::<f64>(self, x, p, go)?,
        };
        Ok((Some(dx), Some(dp)))
    }
}

/// `softmax(q·kᵀ/√dh)·v` per head for `qkv [B, S, 3D]` → `[B, S, D]`.
#[derive(Debug, Clone, Copy)]
pub struct Attention {
    pub heads: usize,
    pub head_dim: usize,
}

impl Attention {
    fn dims(&self, x: &[usize]) -> Result<(usize, usize, usize)> {
        match *x {
            [b, s, d3] if d3 == 3 * self.heads * self.head_dim && s > 0 => {
                Ok((b, s, self.heads * self.head_dim))
            }
            _ => candle_core::bail!(
                "Attention: expected qkv [B, S, {}], found {x:?}",
                3 * self.heads * self.head_dim
            ),
        }
    }
}

impl CustomOp1 for Attention {
    fn name(&self) -> &'static str {
        "vdit-attention"
    }

    fn cpu_fwd(&self, s1: &CpuStorage, l1: &Layout) -> Result<(CpuStorage, Shape)> {
        let (b, s, d) = self.dims(l1.dims())?;
        fn run<T: Real>(op: &Attention, s1: &CpuStorage, l1: &Layout) -> Result<CpuStorage> {
            let qkv =
                Tensor::from_slice(slice::<T>(s1, l1, "Attention")?, l1.dims(), &Device::Cpu)?;
            let o = attn_fwd(&qkv, op.heads, op.head_dim)?;
            Ok(T::to_cpu_storage_owned(o.flatten_all()?.to_vec1::<T>()?))
        }
        let out = by_dtype!(s1, self.name(), run(self, s1, l1))?;
        Ok((out, Shape::from((b, s, d))))
    }

    fn bwd(&self, qkv: &Tensor, res: &Tensor, go: &Tensor) -> Result<Option<Tensor>> {
        float_dtype(qkv.dtype(), self.name())?;
        let dx = match qkv.dtype() {
            DType::F32 => attn_bwd::<f32>(qkv, res, go, self.heads, self.head_dim)?,
            _ => attn_bwd::<f64>(qkv, res, go, self.heads, self.head_dim)?,
        };
        Ok(Some(dx))
    }
}

/// [`AdaNorm`] on `x [B, S, n]`.
pub fn ada_norm(x: &Tensor, w: &Tensor, b: &Tensor, split: usize, eps: f64) -> Result<Tensor> {
    x.contiguous()?
        .apply_op3(&w.contiguous()?, &b.contiguous()?, AdaNorm { split, eps })
}

/// [`GatedResidual`]: `x + gate·y`.
pub fn gated_residual(x: &Tensor, y: &Tensor, gate: &Tensor, split: usize) -> Result<Tensor> {
    x.contiguous()?.apply_op3(
        &y.contiguous()?,
        &gate.contiguous()?,
        GatedResidual { split },
    )
}

/// [`BiasGelu`]: `gelu_tanh(y + bias)`.
pub fn bias_gelu(y: &Tensor, bias: &Tensor) -> Result<Tensor> {
    y.contiguous()?.apply_op2(&bias.contiguous()?, BiasGelu)
}

/// [`HeadNormRope`] on `qkv [B, S, 3D]` with parameters `[4, dh]`.
pub fn head_norm_rope(qkv: &Tensor, params: &Tensor, op: HeadNormRope) -> Result<Tensor> {
    qkv.contiguous()?.apply_op2(&params.contiguous()?, op)
}

/// [`Attention`] on `qkv [B, S, 3D]` → `[B, S, D]`.
pub fn attention(qkv: &Tensor, heads: usize, head_dim: usize) -> Result<Tensor> {
    qkv.contiguous()?.apply_op1(Attention { heads, head_dim })
}
