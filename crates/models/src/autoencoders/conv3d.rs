//! 3D (and per-frame 2D) convolution on channels-last [`Video`]s, for CPU f32.
//!
//! candle has no conv3d. Summing conv2d over the temporal taps is exact but slow, and im2col of a
//! 240x360 frame at 256 channels costs gigabytes. This module instead works on output **row
//! bands** in parallel (rayon). A band task walks through time and keeps a ring of `kt` input
//! bands, so each input frame band is prepared once and used by the `kt` output frames that need
//! it. The input bands are built through a fused **input transform** ([`Pre`]: GroupNorm affine,
//! CogVideoX's spatial norm, SiLU) and an optional **nearest-upsampling index map** ([`UpMaps`]),
//! so neither the normalised nor the upsampled tensor is ever materialised. Two kernels:
//!
//! - **Winograd F(2x2, 3x3)** for every 3x3 stride-1 convolution with padding 1 (all of the
//!   VAE's 3x3x3 causal convs and its upsampling convs): each band is cut into 2x2 output tiles;
//!   the 4x4 input tiles are transformed (`B^T d B`, additions only), then for each of the 16
//!   transform positions and each temporal tap one GEMM `[tiles, Cin] x [Cin, Cout]` accumulates,
//!   and the output transform (`A^T m A`) gives the 2x2 outputs: 16 * 3 multiply-adds per 2x2
//!   outputs and input channel instead of 27 * 4, i.e. 2.25x fewer FLOPs. The transform constants
//!   are 0, +-1 and +-1/2, so the result stays within a few ulp of a direct convolution.
//! - **Direct** for the rest (the encoder's stride-2 downsampling): no im2col; with channels last
//!   the `kw` horizontal taps of one `(kt, kh)` pair are `kw * Cin` consecutive floats of the
//!   padded band, so each tap pair is one GEMM whose left operand is the band itself read with a
//!   row stride of `s * Cin` (rows overlap).
//!
//! Memory stays bounded: per task, `kt` input bands plus one accumulator tile (a few MB at real
//! widths), and the output.

use super::video::{has_avx2, silu, Video};
use candle_core::Tensor;
use rayon::prelude::*;

/// GEMM rows (M) a band aims for.
const TARGET_M: usize = 256;

/// Convolution weights in PyTorch's layout `[Cout, Cin, kt, kh, kw]` (row-major) and bias.
#[derive(Clone, Debug)]
pub struct ConvWeights {
    pub cout: usize,
    pub cin: usize,
    pub kt: usize,
    pub kh: usize,
    pub kw: usize,
    pub w: Vec<f32>,
    pub bias: Vec<f32>,
}

impl ConvWeights {
    /// From PyTorch layouts: `weight` `[Cout, Cin, kt, kh, kw]` (or `[Cout, Cin, kh, kw]` for a
    /// Conv2d, taken as kt = 1) in row-major order, and `bias` `[Cout]`.
    pub fn from_torch(weight: &[f32], dims: &[usize], bias: Vec<f32>) -> Self {
        let (cout, cin, kt, kh, kw) = match *dims {
            [o, i, t, h, w] => (o, i, t, h, w),
            [o, i, h, w] => (o, i, 1, h, w),
            _ => panic!("ConvWeights::from_torch: dims {dims:?}"),
        };
        assert_eq!(weight.len(), cout * cin * kt * kh * kw);
        assert_eq!(bias.len(), cout);
        Self {
            cout,
            cin,
            kt,
            kh,
            kw,
            w: weight.to_vec(),
            bias,
        }
    }

    /// As [`Self::from_torch`] from candle tensors (any dtype/device).
    pub fn from_tensors(weight: &Tensor, bias: &Tensor) -> candle_core::Result<Self> {
        let dims = weight.dims().to_vec();
        let w = to_f32_vec(weight)?;
        Ok(Self::from_torch(&w, &dims, to_f32_vec(bias)?))
    }

    /// The direct kernel's layout: one `[kw*cin, cout]` matrix per `(dt, dy)` tap pair,
    /// `p[((dt*kh + dy)*kw*cin + dx*cin + ci)*cout + co]`.
    fn packed_direct(&self) -> Vec<f32> {
        let (cout, cin, kt, kh, kw) = (self.cout, self.cin, self.kt, self.kh, self.kw);
        let mut p = vec![0f32; self.w.len()];
        let taps = kt * kh * kw;
        p.par_chunks_mut(cin * cout)
            .enumerate()
            .for_each(|(tap, blk)| {
                for ci in 0..cin {
                    for co in 0..cout {
                        blk[ci * cout + co] = self.w[(co * cin + ci) * taps + tap];
                    }
                }
            });
        p
    }

    /// The Winograd F(2x2, 3x3) kernel transform `U = G g G^T` of every 3x3 slice, with
    /// `G = [[1,0,0],[.5,.5,.5],[.5,-.5,.5],[0,0,1]]`, laid out as `u[((dt*cin + ci)*16 + xi)*cout + co]`
    /// (so the `[cin, cout]` matrix of `(dt, xi)` has row stride `16 * cout`). Computed in f64,
    /// rounded once.
    fn winograd_u(&self) -> Vec<f32> {
        let (cout, cin, kt) = (self.cout, self.cin, self.kt);
        assert_eq!((self.kh, self.kw), (3, 3), "winograd: 3x3 kernels only");
        let mut u = vec![0f32; kt * cin * 16 * cout];
        // Tasks over (dt, block of CB input channels): per output channel the task reads one
        // contiguous run of the torch layout, and writes its 16*CB rows column by column.
        let cb = if cin % 16 == 0 { 16 } else { 1 };
        u.par_chunks_mut(cb * 16 * cout)
            .enumerate()
            .for_each(|(blk, chunk)| {
                let (dt, ci0) = (blk / (cin / cb), (blk % (cin / cb)) * cb);
                for co in 0..cout {
                    for dc in 0..cb {
                        let base = ((co * cin + ci0 + dc) * kt + dt) * 9;
                        let g: [f64; 9] = std::array::from_fn(|k| self.w[base + k] as f64);
                        // G g: rows [g0, (g0+g1+g2)/2, (g0-g1+g2)/2, g2] of 3 columns each
                        let mut gg = [[0f64; 3]; 4];
                        for j in 0..3 {
                            let (a, b, c) = (g[j], g[3 + j], g[6 + j]);
                            gg[0][j] = a;
                            gg[1][j] = 0.5 * (a + b + c);
                            gg[2][j] = 0.5 * (a - b + c);
                            gg[3][j] = c;
                        }
                        // (G g) G^T: each row [a, (a+b+c)/2, (a-b+c)/2, c]
                        let m = &mut chunk[dc * 16 * cout..][..16 * cout];
                        for (r, row) in gg.iter().enumerate() {
                            let (a, b, c) = (row[0], row[1], row[2]);
                            let vals = [a, 0.5 * (a + b + c), 0.5 * (a - b + c), c];
                            for (k, v) in vals.iter().enumerate() {
                                m[(r * 4 + k) * cout + co] = *v as f32;
                            }
                        }
                    }
                }
            });
        u
    }
}

pub(crate) fn to_f32_vec(t: &Tensor) -> candle_core::Result<Vec<f32>> {
    t.to_device(&candle_core::Device::Cpu)?
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()
}

/// The transform applied to the source values as the convolution reads them.
#[derive(Debug)]
pub enum Pre<'a> {
    /// Plain values.
    Identity,
    /// `act(x * scale[c] + shift[c])` (GroupNorm folded into an affine).
    Affine {
        scale: &'a [f32],
        shift: &'a [f32],
        silu: bool,
    },
    /// CogVideoX's SpatialNorm3D: `act((x * scale[c] + shift[c]) * y[c] + b[c])`, where `y` and
    /// `b` are the 1x1x1 convolutions of the latent at latent resolution, looked up at the
    /// nearest-resized position given by `tmap`, `hmap`, `wmap` (indexed by source coordinates).
    Spatial {
        scale: &'a [f32],
        shift: &'a [f32],
        y: &'a Video,
        b: &'a Video,
        tmap: &'a [usize],
        hmap: &'a [usize],
        wmap: &'a [usize],
        silu: bool,
    },
}

/// Nearest-neighbour upsampling of the source seen by the convolution: conv-input frame `t`,
/// row `y`, column `x` read source frame `tmap[t]`, row `hmap[y]`, column `wmap[x]`.
#[derive(Clone, Debug)]
pub struct UpMaps {
    pub tmap: Vec<usize>,
    pub hmap: Vec<usize>,
    pub wmap: Vec<usize>,
}

/// What the convolution reads: a source clip, optionally nearest-upsampled, through a transform.
pub struct Source<'a> {
    pub x: &'a Video,
    pub up: Option<&'a UpMaps>,
    pub pre: &'a Pre<'a>,
}

impl Source<'_> {
    /// Conv-input dims `(t, h, w)` (after the upsampling map).
    pub fn dims(&self) -> (usize, usize, usize) {
        match self.up {
            Some(u) => (u.tmap.len(), u.hmap.len(), u.wmap.len()),
            None => (self.x.t, self.x.h, self.x.w),
        }
    }

    /// Writes the transformed row `y` of conv-input frame `t` (`w * c` values) into `dst`.
    #[inline(always)]
    pub fn fill_row(&self, t: usize, y: usize, dst: &mut [f32]) {
        let x = self.x;
        let c = x.c;
        let (ts, ys) = match self.up {
            Some(u) => (u.tmap[t], u.hmap[y]),
            None => (t, y),
        };
        let row = &x.data[((ts * x.h + ys) * x.w) * c..((ts * x.h + ys + 1) * x.w) * c];
        match self.up {
            None => self.apply(ts, ys, 0, row, dst),
            Some(u) => {
                for (xo, d) in dst.chunks_exact_mut(c).enumerate() {
                    let xs = u.wmap[xo];
                    self.apply(ts, ys, xs, &row[xs * c..(xs + 1) * c], d);
                }
            }
        }
    }

    /// Applies the transform to `src` (whole pixels starting at source column `x0`) into `dst`.
    #[inline(always)]
    fn apply(&self, ts: usize, ys: usize, x0: usize, src: &[f32], dst: &mut [f32]) {
        let c = self.x.c;
        match self.pre {
            Pre::Identity => dst.copy_from_slice(src),
            Pre::Affine {
                scale,
                shift,
                silu: act,
            } => {
                for (d, s) in dst.chunks_exact_mut(c).zip(src.chunks_exact(c)) {
                    affine_px(d, s, scale, shift, *act);
                }
            }
            Pre::Spatial {
                scale,
                shift,
                y,
                b,
                tmap,
                hmap,
                wmap,
                silu: act,
            } => {
                let (zt, zy) = (tmap[ts], hmap[ys]);
                let zrow = (zt * y.h + zy) * y.w;
                for (i, (d, s)) in dst.chunks_exact_mut(c).zip(src.chunks_exact(c)).enumerate() {
                    let zi = (zrow + wmap[x0 + i]) * c;
                    spatial_px(
                        d,
                        s,
                        scale,
                        shift,
                        &y.data[zi..zi + c],
                        &b.data[zi..zi + c],
                        *act,
                    );
                }
            }
        }
    }
}

#[inline(always)]
fn affine_px(d: &mut [f32], s: &[f32], scale: &[f32], shift: &[f32], act: bool) {
    if act {
        for (((d, &s), &a), &b) in d.iter_mut().zip(s).zip(scale).zip(shift) {
            *d = silu(s * a + b);
        }
    } else {
        for (((d, &s), &a), &b) in d.iter_mut().zip(s).zip(scale).zip(shift) {
            *d = s * a + b;
        }
    }
}

#[inline(always)]
fn spatial_px(
    d: &mut [f32],
    s: &[f32],
    scale: &[f32],
    shift: &[f32],
    zy: &[f32],
    zb: &[f32],
    act: bool,
) {
    let it = d.iter_mut().zip(s).zip(scale).zip(shift).zip(zy).zip(zb);
    if act {
        for (((((d, &s), &a), &b), &y), &z) in it {
            *d = silu((s * a + b) * y + z);
        }
    } else {
        for (((((d, &s), &a), &b), &y), &z) in it {
            *d = (s * a + b) * y + z;
        }
    }
}

/// Frames in front of the source along time (causal padding).
pub enum Front<'a> {
    /// No temporal padding (kt = 1 convolutions, or a plain valid conv3d).
    None,
    /// `kt - 1` copies of the first transformed frame (CogVideoX's first call).
    ReplicateFirst,
    /// The `kt - 1` cached transformed frames of the previous call.
    Cache(&'a Video),
}

/// Spatial geometry of a convolution: stride (both axes) and zero padding per side.
#[derive(Clone, Copy, Debug)]
pub struct Geom {
    pub stride: usize,
    pub pad_top: usize,
    pub pad_bottom: usize,
    pub pad_left: usize,
    pub pad_right: usize,
}

impl Geom {
    /// Stride 1, `p` zeros on every side.
    pub fn same(p: usize) -> Self {
        Self {
            stride: 1,
            pad_top: p,
            pad_bottom: p,
            pad_left: p,
            pad_right: p,
        }
    }
}

/// Where virtual (front-padded) frame `v` comes from.
#[derive(Clone, Copy)]
enum Frame<'a> {
    Cached(&'a [f32]),
    Source(usize),
}

fn virtual_frame<'a>(front: &'a Front<'a>, nfront: usize, v: usize) -> Frame<'a> {
    if v >= nfront {
        return Frame::Source(v - nfront);
    }
    match front {
        Front::Cache(c) => Frame::Cached(c.frame(v)),
        _ => Frame::Source(0),
    }
}

/// The transformed virtual frames `range` of `(front ++ source)` at conv-input resolution,
/// channels last: what CogVideoX keeps as `conv_cache` (the last `kt - 1` padded input frames).
pub fn virtual_frames(
    src: &Source,
    front: &Front,
    nfront: usize,
    range: std::ops::Range<usize>,
) -> Video {
    let (_, h, w) = src.dims();
    let c = src.x.c;
    let mut out = Video::zeros(range.len(), h, w, c);
    let fl = out.frame_len();
    out.data.par_chunks_mut(fl).zip(range).for_each(|(dst, v)| {
        match virtual_frame(front, nfront, v) {
            Frame::Cached(f) => dst.copy_from_slice(f),
            Frame::Source(t) => {
                for (y, row) in dst.chunks_exact_mut(w * c).enumerate() {
                    src.fill_row(t, y, row);
                }
            }
        }
    });
    out
}

/// A raw output pointer shared by band tasks that write disjoint rows.
#[derive(Clone, Copy)]
struct OutPtr {
    ptr: *mut f32,
    /// Add into the existing values instead of overwriting them.
    add: bool,
}
// SAFETY: the pointer is only used to write disjoint regions (each band task owns its rows of
// every frame), and the buffer outlives the parallel loop.
#[allow(unsafe_code)]
unsafe impl Send for OutPtr {}
#[allow(unsafe_code)]
unsafe impl Sync for OutPtr {}

impl OutPtr {
    fn new(out: &mut Video, add: bool) -> Self {
        Self {
            ptr: out.data.as_mut_ptr(),
            add,
        }
    }

    /// Copies (or adds) `src` to element offset `off`. Callers guarantee that
    /// `off..off + src.len()` is in bounds and touched by no other task.
    fn write(self, off: usize, src: &[f32]) {
        // SAFETY: see above; `src` is a separate allocation of the calling task, so the two
        // ranges do not overlap.
        #[allow(unsafe_code)]
        unsafe {
            if self.add {
                let dst = std::slice::from_raw_parts_mut(self.ptr.add(off), src.len());
                dst.iter_mut().zip(src).for_each(|(d, s)| *d += s);
            } else {
                std::ptr::copy_nonoverlapping(src.as_ptr(), self.ptr.add(off), src.len());
            }
        }
    }
}

/// Per-thread scratch memory reused by band tasks, so that the tens of MB each task needs are
/// not freshly mapped (and page-faulted) for every band of every convolution. Contents are
/// arbitrary on `take`; it goes back to the thread on drop.
struct Scratch {
    buf: Vec<f32>,
}

thread_local! {
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Scratch {
    fn take(n: usize) -> Self {
        let mut buf = SCRATCH.with(|s| std::mem::take(&mut *s.borrow_mut()));
        if buf.len() < n {
            buf.resize(n, 0.0);
        }
        Self { buf }
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let buf = std::mem::take(&mut self.buf);
        SCRATCH.with(|s| {
            let mut cur = s.borrow_mut();
            if cur.len() < buf.len() {
                *cur = buf;
            }
        });
    }
}

/// A GEMM operand: a slice and its (row, column) strides in elements.
struct Mat<'a> {
    data: &'a [f32],
    rs: usize,
    cs: usize,
}

/// `dst[m, n] = (read_dst ? dst : 0) + lhs[m, k] * rhs[k, n]`; `dst` has row stride `dst_rs`
/// and column stride 1. Single-threaded (callers parallelise over bands).
fn gemm(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    read_dst: bool,
    lhs: Mat,
    rhs: Mat,
) {
    assert!(m > 0 && n > 0 && k > 0);
    assert!(
        dst.len() > (m - 1) * dst_rs + (n - 1),
        "gemm: dst too short"
    );
    assert!(
        lhs.data.len() > (m - 1) * lhs.rs + (k - 1) * lhs.cs,
        "gemm: lhs too short"
    );
    assert!(
        rhs.data.len() > (k - 1) * rhs.rs + (n - 1) * rhs.cs,
        "gemm: rhs too short"
    );
    // SAFETY: the asserts above bound every element the GEMM reads or writes (row r, column c at
    // r * rs + c * cs) inside the three slices; `dst` is exclusively borrowed and so does not
    // alias the shared `lhs` / `rhs`.
    #[allow(unsafe_code)]
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            read_dst,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// Splits `rows` output rows (or tile rows) into bands of about `target` rows, with the band
/// count a multiple of the thread count so that the tasks balance.
fn plan_bands(rows: usize, target: usize) -> (usize, usize) {
    let threads = rayon::current_num_threads().max(1);
    let nb = rows.div_ceil(target.max(1)).max(1);
    let nb = nb.div_ceil(threads) * threads;
    let per = rows.div_ceil(nb).max(1);
    (per, rows.div_ceil(per))
}

/// Sizes shared by both kernels.
struct Plan {
    t_out: usize,
    tv: usize,
    nfront: usize,
    h: usize,
    w: usize,
    h_out: usize,
    w_out: usize,
}

fn plan(src: &Source, front: &Front, wt: &ConvWeights, g: Geom) -> Plan {
    let (t_in, h, w) = src.dims();
    assert_eq!(src.x.c, wt.cin, "conv: input channels");
    let nfront = match front {
        Front::None => 0,
        _ => wt.kt - 1,
    };
    if let Front::Cache(c) = front {
        assert_eq!(
            (c.t, c.h, c.w, c.c),
            (nfront, h, w, wt.cin),
            "conv: cache shape"
        );
    }
    let tv = t_in + nfront;
    assert!(
        tv >= wt.kt,
        "conv: {tv} frames for a temporal kernel of {}",
        wt.kt
    );
    let hp = h + g.pad_top + g.pad_bottom;
    let wp = w + g.pad_left + g.pad_right;
    assert!(
        hp >= wt.kh && wp >= wt.kw,
        "conv: input smaller than kernel"
    );
    Plan {
        t_out: tv - wt.kt + 1,
        tv,
        nfront,
        h,
        w,
        h_out: (hp - wt.kh) / g.stride + 1,
        w_out: (wp - wt.kw) / g.stride + 1,
    }
}

/// Fills padded band rows `y0 .. y0 + nrows` (input coordinates, may be out of range: those stay
/// zero) of virtual frame `frame` into `slot` (`nrows` rows of `wp` positions, data starting at
/// column `left`).
#[inline(always)]
fn fill_band(
    src: &Source,
    frame: Frame,
    p: &Plan,
    y0: isize,
    nrows: usize,
    wp: usize,
    left: usize,
    slot: &mut [f32],
) {
    let cin = src.x.c;
    let w = p.w;
    for ri in 0..nrows {
        let y = y0 + ri as isize;
        if y < 0 || y >= p.h as isize {
            continue; // zero padding rows stay zero
        }
        let y = y as usize;
        let dst = &mut slot[(ri * wp + left) * cin..][..w * cin];
        match frame {
            Frame::Cached(f) => dst.copy_from_slice(&f[y * w * cin..(y + 1) * w * cin]),
            Frame::Source(t) => src.fill_row(t, y, dst),
        }
    }
}

/// Convolution of `front ++ src` (along time) with `wt`, stride 1 in time, `g` in space.
/// With `front` = [`Front::None`] and `kt = 1` this is a per-frame Conv2d. 3x3 stride-1 convs
/// with padding 1 use the Winograd kernel, others the direct one.
pub fn conv(src: &Source, front: &Front, wt: &ConvWeights, g: Geom) -> Video {
    conv_impl(src, front, wt, g, None)
}

/// `acc + conv(...)` computed into `acc`'s buffer (a resnet's residual add, without allocating
/// the convolution's output). `acc` must have the output's shape and must not be `src.x`.
pub fn conv_add(src: &Source, front: &Front, wt: &ConvWeights, g: Geom, acc: Video) -> Video {
    conv_impl(src, front, wt, g, Some(acc))
}

fn conv_impl(src: &Source, front: &Front, wt: &ConvWeights, g: Geom, acc: Option<Video>) -> Video {
    let pads = (g.pad_top, g.pad_bottom, g.pad_left, g.pad_right);
    if (wt.kh, wt.kw, g.stride, pads) == (3, 3, 1, (1, 1, 1, 1)) {
        winograd_impl(src, front, wt, acc)
    } else {
        direct_impl(src, front, wt, g, acc)
    }
}

/// The output buffer: `acc` (checked, added into) or a new zeroed one.
fn output(acc: Option<Video>, t: usize, h: usize, w: usize, c: usize) -> (Video, bool) {
    match acc {
        Some(a) => {
            assert_eq!(
                (a.t, a.h, a.w, a.c),
                (t, h, w, c),
                "conv: accumulator shape"
            );
            (a, true)
        }
        None => (Video::zeros(t, h, w, c), false),
    }
}

/// The direct kernel (any kernel size, stride and padding).
pub fn conv_direct(src: &Source, front: &Front, wt: &ConvWeights, g: Geom) -> Video {
    direct_impl(src, front, wt, g, None)
}

fn direct_impl(
    src: &Source,
    front: &Front,
    wt: &ConvWeights,
    g: Geom,
    acc: Option<Video>,
) -> Video {
    let p = plan(src, front, wt, g);
    let (cout, s) = (wt.cout, g.stride);
    let (h_out, w_out) = (p.h_out, p.w_out);
    let wp = p.w + g.pad_left + g.pad_right;
    let packed = wt.packed_direct();
    let target = if s == 1 {
        TARGET_M.div_ceil(wp)
    } else {
        TARGET_M.div_ceil(w_out)
    };
    let (rows, nbands) = plan_bands(h_out, target);

    let (mut out, add) = output(acc, p.t_out, h_out, w_out, cout);
    let out_ptr = OutPtr::new(&mut out, add);

    let job = DirectJob {
        src,
        front,
        wt,
        g,
        p: &p,
        packed: &packed,
        rows,
        wp,
        out_ptr,
    };
    (0..nbands).into_par_iter().for_each(|band| {
        if has_avx2() {
            // SAFETY: the CPU supports AVX2 and FMA (checked at run time).
            #[allow(unsafe_code)]
            unsafe {
                job.band_avx2(band)
            }
        } else {
            job.band(band)
        }
    });
    out
}

struct DirectJob<'a> {
    src: &'a Source<'a>,
    front: &'a Front<'a>,
    wt: &'a ConvWeights,
    g: Geom,
    p: &'a Plan,
    packed: &'a [f32],
    rows: usize,
    wp: usize,
    out_ptr: OutPtr,
}

impl DirectJob<'_> {
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn band_avx2(&self, band: usize) {
        self.band(band)
    }

    #[cfg(not(target_arch = "x86_64"))]
    fn band_avx2(&self, band: usize) {
        self.band(band)
    }

    #[inline(always)]
    fn band(&self, band: usize) {
        let (src, front, wt, g, p, packed, rows, wp, out_ptr) = (
            self.src,
            self.front,
            self.wt,
            self.g,
            self.p,
            self.packed,
            self.rows,
            self.wp,
            self.out_ptr,
        );
        let (cin, cout, kt, kh, kw, s) = (wt.cin, wt.cout, wt.kt, wt.kh, wt.kw, g.stride);
        let (h_out, w_out) = (p.h_out, p.w_out);
        let out_frame = h_out * w_out * cout;
        let r0 = band * rows;
        let nr_out = rows.min(h_out - r0);
        let nr_in = (nr_out - 1) * s + kh;
        let slot_len = nr_in * wp * cin;
        // GEMM rows: stride 1 computes over the padded width (dropping the last kw-1 positions);
        // stride > 1 runs one GEMM per output row.
        let m_tile = if s == 1 {
            (nr_out - 1) * wp + w_out
        } else {
            nr_out * w_out
        };
        let mut scratch = Scratch::take(kt * slot_len + m_tile * cout);
        let (slots, tile) = scratch.buf.split_at_mut(kt * slot_len);
        slots.fill(0.0); // the zero padding
        let tile = &mut tile[..m_tile * cout];
        for v in 0..p.tv {
            let slot = &mut slots[(v % kt) * slot_len..][..slot_len];
            let frame = virtual_frame(front, p.nfront, v);
            let y0 = (r0 * s) as isize - g.pad_top as isize;
            fill_band(src, frame, p, y0, nr_in, wp, g.pad_left, slot);
            if v + 1 < kt {
                continue;
            }
            let o = v + 1 - kt;
            for px in tile.chunks_exact_mut(cout) {
                px.copy_from_slice(&wt.bias);
            }
            for dt in 0..kt {
                let band_in = &slots[((o + dt) % kt) * slot_len..][..slot_len];
                for dy in 0..kh {
                    let rhs = Mat {
                        data: &packed[(dt * kh + dy) * kw * cin * cout..][..kw * cin * cout],
                        rs: cout,
                        cs: 1,
                    };
                    if s == 1 {
                        let lhs = Mat {
                            data: &band_in[dy * wp * cin..],
                            rs: cin,
                            cs: 1,
                        };
                        gemm(m_tile, cout, kw * cin, tile, cout, true, lhs, rhs);
                    } else {
                        for r in 0..nr_out {
                            let lhs = Mat {
                                data: &band_in[(r * s + dy) * wp * cin..],
                                rs: s * cin,
                                cs: 1,
                            };
                            let rhs = Mat {
                                data: rhs.data,
                                rs: cout,
                                cs: 1,
                            };
                            let dst = &mut tile[r * w_out * cout..][..w_out * cout];
                            gemm(w_out, cout, kw * cin, dst, cout, true, lhs, rhs);
                        }
                    }
                }
            }
            for r in 0..nr_out {
                let src_row = if s == 1 {
                    r * wp * cout
                } else {
                    r * w_out * cout
                };
                // rows r0..r0+nr_out of frame o belong to this band task only
                out_ptr.write(
                    o * out_frame + (r0 + r) * w_out * cout,
                    &tile[src_row..src_row + w_out * cout],
                );
            }
        }
    }
}

/// `B^T` of F(2x2, 3x3) (`[[1,0,-1,0],[0,1,1,0],[0,-1,1,0],[0,1,0,-1]]`) applied across four
/// channel vectors: `y = [x0 - x2, x1 + x2, x2 - x1, x1 - x3]`.
#[inline(always)]
fn bt4(x: [&[f32]; 4], y: [&mut [f32]; 4]) {
    let [y0, y1, y2, y3] = y;
    let n = y0.len();
    let (x0, x1, x2, x3) = (&x[0][..n], &x[1][..n], &x[2][..n], &x[3][..n]);
    let (y1, y2, y3) = (&mut y1[..n], &mut y2[..n], &mut y3[..n]);
    for c in 0..n {
        let (a, b, d, e) = (x0[c], x1[c], x2[c], x3[c]);
        y0[c] = a - d;
        y1[c] = b + d;
        y2[c] = d - b;
        y3[c] = b - e;
    }
}

/// `A^T` of F(2x2, 3x3) (`[[1,1,1,0],[0,1,-1,-1]]`) across four channel vectors, plus `bias`
/// when given: `y = [x0 + x1 + x2, x1 - x2 - x3]`.
#[inline(always)]
fn at4(x: [&[f32]; 4], y0: &mut [f32], y1: &mut [f32], bias: Option<&[f32]>) {
    let n = y0.len();
    let (x0, x1, x2, x3) = (&x[0][..n], &x[1][..n], &x[2][..n], &x[3][..n]);
    let y1 = &mut y1[..n];
    match bias {
        Some(b) => {
            let b = &b[..n];
            for c in 0..n {
                y0[c] = x0[c] + x1[c] + x2[c] + b[c];
                y1[c] = x1[c] - x2[c] - x3[c] + b[c];
            }
        }
        None => {
            for c in 0..n {
                y0[c] = x0[c] + x1[c] + x2[c];
                y1[c] = x1[c] - x2[c] - x3[c];
            }
        }
    }
}

/// Four consecutive `n`-long chunks of `s` as separate mutable slices.
#[inline(always)]
fn split4(s: &mut [f32], n: usize) -> [&mut [f32]; 4] {
    let (a, r) = s.split_at_mut(n);
    let (b, r) = r.split_at_mut(n);
    let (c, d) = r.split_at_mut(n);
    [a, b, c, &mut d[..n]]
}

/// The Winograd F(2x2, 3x3) kernel (3x3 spatial taps, stride 1, zero padding 1, any `kt`).
pub fn conv_winograd(src: &Source, front: &Front, wt: &ConvWeights) -> Video {
    winograd_impl(src, front, wt, None)
}

fn winograd_impl(src: &Source, front: &Front, wt: &ConvWeights, acc: Option<Video>) -> Video {
    let p = plan(src, front, wt, Geom::same(1));
    let (h, w) = (p.h, p.w);
    let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
    let u = wt.winograd_u();
    let (trows, nbands) = plan_bands(th, TARGET_M.div_ceil(tw));

    let (mut out, add) = output(acc, p.t_out, h, w, wt.cout);
    let out_ptr = OutPtr::new(&mut out, add);

    let job = WinoJob {
        src,
        front,
        wt,
        p: &p,
        u: &u,
        trows,
        out_ptr,
    };
    (0..nbands).into_par_iter().for_each(|band| {
        if has_avx2() {
            // SAFETY: the CPU supports AVX2 and FMA (checked at run time).
            #[allow(unsafe_code)]
            unsafe {
                job.band_avx2(band)
            }
        } else {
            job.band(band)
        }
    });
    out
}

struct WinoJob<'a> {
    src: &'a Source<'a>,
    front: &'a Front<'a>,
    wt: &'a ConvWeights,
    p: &'a Plan,
    u: &'a [f32],
    trows: usize,
    out_ptr: OutPtr,
}

impl WinoJob<'_> {
    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2,fma")]
    fn band_avx2(&self, band: usize) {
        self.band(band)
    }

    #[cfg(not(target_arch = "x86_64"))]
    fn band_avx2(&self, band: usize) {
        self.band(band)
    }

    #[inline(always)]
    fn band(&self, band: usize) {
        let (src, front, wt, p, u, trows, out_ptr) = (
            self.src,
            self.front,
            self.wt,
            self.p,
            self.u,
            self.trows,
            self.out_ptr,
        );
        let (cin, cout, kt) = (wt.cin, wt.cout, wt.kt);
        let (h, w) = (p.h, p.w);
        let (th, tw) = (h.div_ceil(2), w.div_ceil(2));
        // padded band width: one zero column left, tiles cover 2*tw columns, plus the right halo
        let wp = 2 * tw + 2;
        let out_frame = h * w * cout;
        let tr0 = band * trows;
        let nt_rows = trows.min(th - tr0);
        let m = nt_rows * tw; // tiles in this band = GEMM rows
        let nr_in = 2 * nt_rows + 2;
        let vlen = m * 16 * cin;
        let sizes = [
            nr_in * wp * cin,     // zero-padded input band
            nr_in * tw * 4 * cin, // d B of every row: [row][tile column][b][cin]
            kt * vlen, // transformed input, one ring slot per temporal tap: [tile][xi][cin]
            m * 16 * cout, // GEMM results [tile][xi][cout]
            8 * cout,  // A^T m of one tile: [a'][b][cout]
            2 * 2 * tw * cout, // two output rows
        ];
        let mut scratch = Scratch::take(sizes.iter().sum());
        let (padded, rest) = scratch.buf.split_at_mut(sizes[0]);
        let (hrow, rest) = rest.split_at_mut(sizes[1]);
        let (vslots, rest) = rest.split_at_mut(sizes[2]);
        let (acc, rest) = rest.split_at_mut(sizes[3]);
        let (sbuf, rest) = rest.split_at_mut(sizes[4]);
        let orow = &mut rest[..sizes[5]];
        padded.fill(0.0); // the zero padding
        for v in 0..p.tv {
            let frame = virtual_frame(front, p.nfront, v);
            fill_band(src, frame, p, 2 * tr0 as isize - 1, nr_in, wp, 1, padded);
            // horizontal pass: hrow[r][j][b] = sum_l d[r][2j + l] B[l][b]
            for (r, hr) in hrow.chunks_exact_mut(tw * 4 * cin).enumerate() {
                let prow = &padded[r * wp * cin..][..wp * cin];
                for (j, hj) in hr.chunks_exact_mut(4 * cin).enumerate() {
                    let x: [&[f32]; 4] = std::array::from_fn(|l| &prow[(2 * j + l) * cin..][..cin]);
                    bt4(x, split4(hj, cin));
                }
            }
            // vertical pass: V[tile][a*4 + b] = sum_k B^T[a][k] hrow[2i + k][j][b]
            let vs = &mut vslots[(v % kt) * vlen..][..vlen];
            for (tile, vt) in vs.chunks_exact_mut(16 * cin).enumerate() {
                let (i, j) = (tile / tw, tile % tw);
                let [g0, g1, g2, g3] = split4(vt, 4 * cin);
                for b in 0..4 {
                    let x: [&[f32]; 4] = std::array::from_fn(|k| {
                        &hrow[(((2 * i + k) * tw + j) * 4 + b) * cin..][..cin]
                    });
                    let y = [
                        &mut g0[b * cin..(b + 1) * cin],
                        &mut g1[b * cin..(b + 1) * cin],
                        &mut g2[b * cin..(b + 1) * cin],
                        &mut g3[b * cin..(b + 1) * cin],
                    ];
                    bt4(x, y);
                }
            }
            if v + 1 < kt {
                continue;
            }
            let o = v + 1 - kt;
            // 16 GEMMs (one per transform position), each accumulating the kt temporal taps
            for xi in 0..16 {
                let dst = &mut acc[xi * cout..];
                for dt in 0..kt {
                    let vin = &vslots[((o + dt) % kt) * vlen + xi * cin..];
                    let lhs = Mat {
                        data: vin,
                        rs: 16 * cin,
                        cs: 1,
                    };
                    let rhs = Mat {
                        data: &u[(dt * cin * 16 + xi) * cout..],
                        rs: 16 * cout,
                        cs: 1,
                    };
                    gemm(m, cout, cin, dst, 16 * cout, dt > 0, lhs, rhs);
                }
            }
            // output transform + bias, one tile row (two output rows) at a time
            for i in 0..nt_rows {
                let y0 = 2 * (tr0 + i);
                let (row0, row1) = orow.split_at_mut(2 * tw * cout);
                let pairs = row0
                    .chunks_exact_mut(2 * cout)
                    .zip(row1.chunks_exact_mut(2 * cout));
                for (j, (o0, o1)) in pairs.enumerate() {
                    let mt = &acc[(i * tw + j) * 16 * cout..][..16 * cout];
                    // S[a'][b] = sum_a A^T[a'][a] m[a][b]
                    for b in 0..4 {
                        let x: [&[f32]; 4] =
                            std::array::from_fn(|a| &mt[(a * 4 + b) * cout..][..cout]);
                        let (s0, s1) = sbuf.split_at_mut(4 * cout);
                        at4(
                            x,
                            &mut s0[b * cout..(b + 1) * cout],
                            &mut s1[b * cout..(b + 1) * cout],
                            None,
                        );
                    }
                    // Y[a'][b'] = sum_b S[a'][b] A^T[b'][b] + bias
                    for (a, orow_a) in [o0, o1].into_iter().enumerate() {
                        let x: [&[f32]; 4] =
                            std::array::from_fn(|b| &sbuf[(a * 4 + b) * cout..][..cout]);
                        let (y0v, y1v) = orow_a.split_at_mut(cout);
                        at4(x, y0v, y1v, Some(&wt.bias));
                    }
                }
                for a in 0..2 {
                    if y0 + a < h {
                        // rows of this band belong to this task only
                        let r = &orow[a * 2 * tw * cout..][..w * cout];
                        out_ptr.write(o * out_frame + (y0 + a) * w * cout, r);
                    }
                }
            }
        }
    }
}

/// 1x1x1 convolution `x[P, cin] * W + bias` of the pixels of one chunk into `dst` (`add`: into
/// `dst += ...`, the bias-initialised product first, as PyTorch adds a conv output to a tensor).
fn pointwise_chunk(wt: &ConvWeights, xs: &[f32], dst: &mut [f32], add: bool) {
    let (cin, cout) = (wt.cin, wt.cout);
    let m = xs.len() / cin;
    let mut tile = vec![0f32; m * cout];
    for px in tile.chunks_exact_mut(cout) {
        px.copy_from_slice(&wt.bias);
    }
    let lhs = Mat {
        data: xs,
        rs: cin,
        cs: 1,
    };
    // W^T as the right operand: (ci, co) of the torch weight [cout, cin] is at co * cin + ci
    let rhs = Mat {
        data: &wt.w,
        rs: 1,
        cs: cin,
    };
    gemm(m, cout, cin, &mut tile, cout, true, lhs, rhs);
    if add {
        dst.iter_mut().zip(&tile).for_each(|(d, t)| *d += t);
    } else {
        dst.copy_from_slice(&tile);
    }
}

/// Pixels per pointwise task.
const POINTWISE_CHUNK: usize = 1024;

/// 1x1x1 convolution: `[T, H, W, cin]` -> `[T, H, W, cout]`.
pub fn pointwise(x: &Video, wt: &ConvWeights) -> Video {
    assert_eq!((wt.kt, wt.kh, wt.kw), (1, 1, 1), "pointwise: kernel");
    assert_eq!(x.c, wt.cin, "pointwise: input channels");
    let mut out = Video::zeros(x.t, x.h, x.w, wt.cout);
    out.data
        .par_chunks_mut(POINTWISE_CHUNK * wt.cout)
        .zip(x.data.par_chunks(POINTWISE_CHUNK * wt.cin))
        .for_each(|(d, xs)| pointwise_chunk(wt, xs, d, false));
    out
}

/// `acc += pointwise(x, wt)` without allocating the product (a resnet's 1x1x1 shortcut).
pub fn pointwise_add(x: &Video, wt: &ConvWeights, acc: &mut Video) {
    assert_eq!((wt.kt, wt.kh, wt.kw), (1, 1, 1), "pointwise: kernel");
    assert_eq!(x.c, wt.cin, "pointwise: input channels");
    assert_eq!(
        (acc.t, acc.h, acc.w, acc.c),
        (x.t, x.h, x.w, wt.cout),
        "pointwise: acc shape"
    );
    acc.data
        .par_chunks_mut(POINTWISE_CHUNK * wt.cout)
        .zip(x.data.par_chunks(POINTWISE_CHUNK * wt.cin))
        .for_each(|(d, xs)| pointwise_chunk(wt, xs, d, true));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lcg(seed: &mut u64) -> f32 {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }

    fn rand_vec(n: usize, seed: &mut u64) -> Vec<f32> {
        (0..n).map(|_| lcg(seed)).collect()
    }

    /// Direct (naive) convolution of an explicitly padded input, in f64.
    fn naive(x: &Video, w: &[f32], dims: [usize; 5], bias: &[f32], g: Geom, front: usize) -> Video {
        let [cout, cin, kt, kh, kw] = dims;
        // time padding: replicate frame 0 `front` times
        let tv = x.t + front;
        let at = |t: usize, y: isize, xx: isize, ci: usize| -> f64 {
            if y < 0 || xx < 0 || y >= x.h as isize || xx >= x.w as isize {
                return 0.0;
            }
            let ts = t.saturating_sub(front);
            x.data[((ts * x.h + y as usize) * x.w + xx as usize) * x.c + ci] as f64
        };
        let h_out = (x.h + g.pad_top + g.pad_bottom - kh) / g.stride + 1;
        let w_out = (x.w + g.pad_left + g.pad_right - kw) / g.stride + 1;
        let t_out = tv - kt + 1;
        let mut out = Video::zeros(t_out, h_out, w_out, cout);
        for o in 0..t_out {
            for yo in 0..h_out {
                for xo in 0..w_out {
                    for co in 0..cout {
                        let mut acc = bias[co] as f64;
                        for ci in 0..cin {
                            for dt in 0..kt {
                                for dy in 0..kh {
                                    for dx in 0..kw {
                                        let wv = w
                                            [(((co * cin + ci) * kt + dt) * kh + dy) * kw + dx]
                                            as f64;
                                        let y = (yo * g.stride + dy) as isize - g.pad_top as isize;
                                        let xx =
                                            (xo * g.stride + dx) as isize - g.pad_left as isize;
                                        acc += wv * at(o + dt, y, xx, ci);
                                    }
                                }
                            }
                        }
                        out.data[((o * h_out + yo) * w_out + xo) * cout + co] = acc as f32;
                    }
                }
            }
        }
        out
    }

    fn max_diff(a: &[f32], b: &[f32]) -> f32 {
        assert_eq!(a.len(), b.len());
        a.iter()
            .zip(b)
            .map(|(x, y)| (x - y).abs())
            .fold(0.0, f32::max)
    }

    #[test]
    fn causal_conv3d_matches_naive() {
        let mut seed = 7;
        for &(t, h, w, cin, cout) in &[
            (3usize, 5usize, 7usize, 4usize, 6usize),
            (2, 9, 4, 3, 5),
            (1, 3, 3, 2, 2),
        ] {
            let x = Video::new(t, h, w, cin, rand_vec(t * h * w * cin, &mut seed));
            let dims = [cout, cin, 3, 3, 3];
            let wv = rand_vec(dims.iter().product(), &mut seed);
            let b = rand_vec(cout, &mut seed);
            let wt = ConvWeights::from_torch(&wv, &dims, b.clone());
            let src = Source {
                x: &x,
                up: None,
                pre: &Pre::Identity,
            };
            let got = conv(&src, &Front::ReplicateFirst, &wt, Geom::same(1));
            let want = naive(&x, &wv, dims, &b, Geom::same(1), 2);
            assert_eq!(
                (got.t, got.h, got.w, got.c),
                (want.t, want.h, want.w, want.c)
            );
            assert!(max_diff(&got.data, &want.data) < 1e-5);
        }
    }

    #[test]
    fn winograd_equals_direct_and_naive() {
        let mut seed = 21;
        // odd sizes (partial tiles), channel counts off the 8-lane width, kt 3 and 1
        for &(t, h, w, cin, cout, kt) in &[
            (3usize, 7usize, 9usize, 13usize, 11usize, 3usize),
            (2, 1, 1, 8, 16, 3),
            (2, 6, 5, 17, 9, 1),
        ] {
            let x = Video::new(t, h, w, cin, rand_vec(t * h * w * cin, &mut seed));
            let dims = [cout, cin, kt, 3, 3];
            let wv = rand_vec(dims.iter().product(), &mut seed);
            let b = rand_vec(cout, &mut seed);
            let wt = ConvWeights::from_torch(&wv, &dims, b.clone());
            let src = Source {
                x: &x,
                up: None,
                pre: &Pre::Identity,
            };
            let front = if kt == 3 {
                Front::ReplicateFirst
            } else {
                Front::None
            };
            let wino = conv_winograd(&src, &front, &wt);
            let direct = conv_direct(&src, &front, &wt, Geom::same(1));
            let want = naive(&x, &wv, dims, &b, Geom::same(1), kt - 1);
            assert_eq!(
                (wino.t, wino.h, wino.w, wino.c),
                (want.t, want.h, want.w, want.c)
            );
            assert!(
                max_diff(&wino.data, &want.data) < 2e-5,
                "winograd vs naive {}",
                max_diff(&wino.data, &want.data)
            );
            assert!(max_diff(&direct.data, &want.data) < 2e-5, "direct vs naive");
        }
    }

    #[test]
    fn conv_add_equals_conv_plus_acc() {
        let mut seed = 31;
        let (h, w, c) = (5, 6, 9);
        let x = Video::new(2, h, w, c, rand_vec(2 * h * w * c, &mut seed));
        let acc = Video::new(2, h, w, c, rand_vec(2 * h * w * c, &mut seed));
        let dims = [c, c, 3, 3, 3];
        let wt = ConvWeights::from_torch(
            &rand_vec(dims.iter().product(), &mut seed),
            &dims,
            vec![0.1; c],
        );
        let src = Source {
            x: &x,
            up: None,
            pre: &Pre::Identity,
        };
        let plain = conv(&src, &Front::ReplicateFirst, &wt, Geom::same(1));
        let want: Vec<f32> = plain
            .data
            .iter()
            .zip(&acc.data)
            .map(|(a, b)| a + b)
            .collect();
        let got = conv_add(
            &src,
            &Front::ReplicateFirst,
            &wt,
            Geom::same(1),
            acc.clone(),
        );
        assert_eq!(got.data, want);
        // the direct kernel too (stride 2)
        let g = Geom {
            stride: 2,
            pad_top: 0,
            pad_left: 0,
            pad_bottom: 1,
            pad_right: 1,
        };
        let dims = [c, c, 1, 3, 3];
        let wt = ConvWeights::from_torch(
            &rand_vec(dims.iter().product(), &mut seed),
            &dims,
            vec![0.1; c],
        );
        let plain = conv(&src, &Front::None, &wt, g);
        let acc2 = Video::new(
            plain.t,
            plain.h,
            plain.w,
            c,
            rand_vec(plain.data.len(), &mut seed),
        );
        let want: Vec<f32> = plain
            .data
            .iter()
            .zip(&acc2.data)
            .map(|(a, b)| a + b)
            .collect();
        assert_eq!(conv_add(&src, &Front::None, &wt, g, acc2).data, want);
    }

    #[test]
    fn strided_conv2d_matches_naive() {
        let mut seed = 11;
        let (t, h, w, cin, cout) = (2, 9, 8, 3, 4);
        let x = Video::new(t, h, w, cin, rand_vec(t * h * w * cin, &mut seed));
        let dims = [cout, cin, 1, 3, 3];
        let wv = rand_vec(dims.iter().product(), &mut seed);
        let b = rand_vec(cout, &mut seed);
        let wt = ConvWeights::from_torch(&wv, &dims, b.clone());
        let g = Geom {
            stride: 2,
            pad_top: 0,
            pad_left: 0,
            pad_bottom: 1,
            pad_right: 1,
        };
        let got = conv(
            &Source {
                x: &x,
                up: None,
                pre: &Pre::Identity,
            },
            &Front::None,
            &wt,
            g,
        );
        let want = naive(&x, &wv, dims, &b, g, 0);
        assert_eq!((got.t, got.h, got.w), (2, 4, 4));
        assert!(max_diff(&got.data, &want.data) < 1e-5);
    }

    #[test]
    fn cache_and_transform_equal_explicit_tensors() {
        // conv(front=cache, pre=affine+silu) equals conv over the explicitly transformed frames.
        let mut seed = 3;
        let (h, w, c) = (4, 5, 3);
        let x = Video::new(3, h, w, c, rand_vec(3 * h * w * c, &mut seed));
        let scale = rand_vec(c, &mut seed);
        let shift = rand_vec(c, &mut seed);
        let pre = Pre::Affine {
            scale: &scale,
            shift: &shift,
            silu: true,
        };
        let src = Source {
            x: &x,
            up: None,
            pre: &pre,
        };
        let cache = Video::new(2, h, w, c, rand_vec(2 * h * w * c, &mut seed));
        let dims = [2, c, 3, 3, 3];
        let wt = ConvWeights::from_torch(
            &rand_vec(dims.iter().product(), &mut seed),
            &dims,
            vec![0.5, -0.5],
        );
        let got = conv(&src, &Front::Cache(&cache), &wt, Geom::same(1));
        let mut explicit = cache.data.clone();
        for (i, v) in x.data.iter().enumerate() {
            explicit.push(silu(v * scale[i % c] + shift[i % c]));
        }
        let full = Video::new(5, h, w, c, explicit);
        let want = conv(
            &Source {
                x: &full,
                up: None,
                pre: &Pre::Identity,
            },
            &Front::None,
            &wt,
            Geom::same(1),
        );
        assert_eq!(got, want);
        let last = virtual_frames(&src, &Front::Cache(&cache), 2, 3..5);
        assert_eq!(last, full.frames(3, 5));
    }

    #[test]
    fn upsample_map_equals_materialised_upsample() {
        let mut seed = 5;
        let (h, w, c) = (3, 4, 2);
        let x = Video::new(2, h, w, c, rand_vec(2 * h * w * c, &mut seed));
        let up = UpMaps {
            tmap: vec![0, 0, 1, 1],
            hmap: (0..2 * h).map(|i| i / 2).collect(),
            wmap: (0..2 * w).map(|i| i / 2).collect(),
        };
        let src = Source {
            x: &x,
            up: Some(&up),
            pre: &Pre::Identity,
        };
        let mut big = Video::zeros(4, 2 * h, 2 * w, c);
        for t in 0..4 {
            for y in 0..2 * h {
                let off = ((t * 2 * h + y) * 2 * w) * c;
                src.fill_row(t, y, &mut big.data[off..off + 2 * w * c]);
            }
        }
        assert_eq!(
            big.data[((3 * 2 * h + 5) * 2 * w + 7) * c + 1],
            x.data[((h + 2) * w + 3) * c + 1]
        );
        let dims = [3, c, 1, 3, 3];
        let wt = ConvWeights::from_torch(
            &rand_vec(dims.iter().product(), &mut seed),
            &dims,
            vec![0.0; 3],
        );
        let got = conv(&src, &Front::None, &wt, Geom::same(1));
        let want = conv(
            &Source {
                x: &big,
                up: None,
                pre: &Pre::Identity,
            },
            &Front::None,
            &wt,
            Geom::same(1),
        );
        assert_eq!(got, want);
    }

    #[test]
    fn pointwise_matches_naive_and_accumulates() {
        let mut seed = 9;
        let x = Video::new(2, 3, 5, 4, rand_vec(2 * 3 * 5 * 4, &mut seed));
        let dims = [3, 4, 1, 1, 1];
        let wv = rand_vec(12, &mut seed);
        let b = rand_vec(3, &mut seed);
        let wt = ConvWeights::from_torch(&wv, &dims, b.clone());
        let got = pointwise(&x, &wt);
        let want = naive(&x, &wv, dims, &b, Geom::same(0), 0);
        assert!(max_diff(&got.data, &want.data) < 1e-5);
        let mut acc = got.clone();
        pointwise_add(&x, &wt, &mut acc);
        let twice: Vec<f32> = got.data.iter().map(|v| 2.0 * v).collect();
        assert!(max_diff(&acc.data, &twice) < 1e-5);
    }
}
