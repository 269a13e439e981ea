//! 3D (and per-frame 2D) convolution on channels-last [`Video`]s, for CPU f32.
//!
//! candle has no conv3d. Summing conv2d over the temporal taps is exact but slow, and im2col of a
//! 240x360 frame at 256 channels costs gigabytes. This kernel instead:
//! - works on output **row bands** in parallel (rayon). A band task walks through time and keeps a
//!   ring of `kt` zero-padded input bands (`rows + kh - 1` rows of `W + pads` positions, channels
//!   last), so each input frame band is built once and used by the `kt` output frames that need it;
//! - builds each input band through a fused **input transform** ([`Pre`]: GroupNorm affine,
//!   CogVideoX's spatial norm, SiLU) and an optional **nearest-upsampling index map**
//!   ([`UpMaps`]), so neither the normalised nor the upsampled tensor is ever materialised;
//! - needs **no im2col**: with channels last and the output computed over the padded width, the
//!   `kw` horizontal taps of one `(kt, kh)` tap pair are `kw * Cin` consecutive floats of the band,
//!   so each tap pair is one GEMM `[M, kw*Cin] x [kw*Cin, Cout]` whose left operand is the band
//!   itself read with a row stride of `Cin` (rows overlap). `kt * kh` GEMMs accumulate into a
//!   bias-initialised tile that stays in cache; the garbage columns of the padded width are dropped.
//!
//! Memory stays bounded: per task, `kt` bands plus one output tile (a few MB at real widths).

use super::video::{silu, Video};
use candle_core::Tensor;
use rayon::prelude::*;

/// Rows of a GEMM tile we aim for (M), trading band overhead against working-set size.
const TARGET_M: usize = 2048;

/// Convolution weights repacked for the kernel: `w[((dt*kh + dy)*kw*cin + dx*cin + ci)*cout + co]`,
/// i.e. one `[kw*cin, cout]` matrix per `(dt, dy)` tap pair.
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
        let mut w = vec![0f32; weight.len()];
        for co in 0..cout {
            for ci in 0..cin {
                for dt in 0..kt {
                    for dy in 0..kh {
                        for dx in 0..kw {
                            let src = (((co * cin + ci) * kt + dt) * kh + dy) * kw + dx;
                            let dst = (((dt * kh + dy) * kw + dx) * cin + ci) * cout + co;
                            w[dst] = weight[src];
                        }
                    }
                }
            }
        }
        Self {
            cout,
            cin,
            kt,
            kh,
            kw,
            w,
            bias,
        }
    }

    /// As [`Self::from_torch`] from candle tensors (any dtype/device).
    pub fn from_tensors(weight: &Tensor, bias: &Tensor) -> candle_core::Result<Self> {
        let dims = weight.dims().to_vec();
        let w = to_f32_vec(weight)?;
        Ok(Self::from_torch(&w, &dims, to_f32_vec(bias)?))
    }

    fn tap(&self, dt: usize, dy: usize) -> &[f32] {
        let n = self.kw * self.cin * self.cout;
        &self.w[(dt * self.kh + dy) * n..][..n]
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
    #[inline]
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
struct OutPtr(*mut f32);
// SAFETY: the pointer is only used to write disjoint regions (each band task owns its rows of
// every frame), and the buffer outlives the parallel loop.
#[allow(unsafe_code)]
unsafe impl Send for OutPtr {}
#[allow(unsafe_code)]
unsafe impl Sync for OutPtr {}

impl OutPtr {
    /// (A method, so closures capture the whole `Sync` wrapper, not the raw field.)
    fn get(self) -> *mut f32 {
        self.0
    }
}

/// `dst[m, n] (+)= lhs[m, k] * rhs[k, n]` with row strides `lhs_rs`, `rhs_rs`, `dst_rs`
/// (column strides 1), single-threaded (callers parallelise over tiles).
fn gemm_acc(
    m: usize,
    n: usize,
    k: usize,
    dst: &mut [f32],
    dst_rs: usize,
    lhs: &[f32],
    lhs_rs: usize,
    rhs: &[f32],
    rhs_rs: usize,
) {
    assert!(m > 0 && n > 0 && k > 0);
    assert!(dst.len() >= (m - 1) * dst_rs + n, "gemm: dst too short");
    assert!(lhs.len() >= (m - 1) * lhs_rs + k, "gemm: lhs too short");
    assert!(rhs.len() >= (k - 1) * rhs_rs + n, "gemm: rhs too short");
    // SAFETY: the asserts above bound every element the GEMM reads or writes (row r, column c at
    // r * rs + c) inside the three slices; `dst` is exclusively borrowed and does not alias the
    // shared `lhs` / `rhs`.
    #[allow(unsafe_code)]
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            1,
            dst_rs as isize,
            true,
            lhs.as_ptr(),
            1,
            lhs_rs as isize,
            rhs.as_ptr(),
            1,
            rhs_rs as isize,
            1.0f32,
            1.0f32,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// Convolution of `front ++ src` (along time) with `wt`, stride 1 in time, `g` in space.
/// With `front` = [`Front::None`] and `kt = 1` this is a per-frame Conv2d.
pub fn conv(src: &Source, front: &Front, wt: &ConvWeights, g: Geom) -> Video {
    let (t_in, h, w) = src.dims();
    let (cin, cout, kt, kh, kw, s) = (wt.cin, wt.cout, wt.kt, wt.kh, wt.kw, g.stride);
    assert_eq!(src.x.c, cin, "conv: input channels");
    let nfront = match front {
        Front::None => 0,
        _ => kt - 1,
    };
    if let Front::Cache(c) = front {
        assert_eq!(
            (c.t, c.h, c.w, c.c),
            (nfront, h, w, cin),
            "conv: cache shape"
        );
    }
    let tv = t_in + nfront;
    assert!(tv >= kt, "conv: {tv} frames for a temporal kernel of {kt}");
    let t_out = tv - kt + 1;
    let hp = h + g.pad_top + g.pad_bottom;
    let wp = w + g.pad_left + g.pad_right;
    assert!(hp >= kh && wp >= kw, "conv: input smaller than kernel");
    let h_out = (hp - kh) / s + 1;
    let w_out = (wp - kw) / s + 1;

    let rows = if s == 1 {
        TARGET_M.div_ceil(wp)
    } else {
        TARGET_M.div_ceil(w_out)
    }
    .clamp(1, h_out);
    // Prefer at least two bands per thread when the image is tall enough.
    let want_tasks = 2 * rayon::current_num_threads();
    let rows = rows.min(h_out.div_ceil(want_tasks).max(1));
    let nbands = h_out.div_ceil(rows);

    let mut out = Video::zeros(t_out, h_out, w_out, cout);
    let out_ptr = OutPtr(out.data.as_mut_ptr());
    let out_frame = h_out * w_out * cout;

    (0..nbands).into_par_iter().for_each(|band| {
        let r0 = band * rows;
        let nr_out = rows.min(h_out - r0);
        let nr_in = (nr_out - 1) * s + kh;
        let slot_len = nr_in * wp * cin;
        let mut slots = vec![0f32; kt * slot_len];
        // GEMM rows: stride 1 computes over the padded width (dropping the last kw-1 positions);
        // stride > 1 runs one GEMM per output row.
        let m_tile = if s == 1 {
            (nr_out - 1) * wp + w_out
        } else {
            nr_out * w_out
        };
        let mut tile = vec![0f32; m_tile * cout];
        for v in 0..tv {
            let slot = &mut slots[(v % kt) * slot_len..][..slot_len];
            let frame = virtual_frame(front, nfront, v);
            for ri in 0..nr_in {
                let y = (r0 * s + ri) as isize - g.pad_top as isize;
                if y < 0 || y >= h as isize {
                    continue; // stays zero
                }
                let y = y as usize;
                let dst = &mut slot[(ri * wp + g.pad_left) * cin..][..w * cin];
                match frame {
                    Frame::Cached(f) => dst.copy_from_slice(&f[y * w * cin..(y + 1) * w * cin]),
                    Frame::Source(t) => src.fill_row(t, y, dst),
                }
            }
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
                    let rhs = wt.tap(dt, dy);
                    if s == 1 {
                        let lhs = &band_in[dy * wp * cin..];
                        gemm_acc(m_tile, cout, kw * cin, &mut tile, cout, lhs, cin, rhs, cout);
                    } else {
                        for r in 0..nr_out {
                            let lhs = &band_in[(r * s + dy) * wp * cin..];
                            let dst = &mut tile[r * w_out * cout..][..w_out * cout];
                            gemm_acc(w_out, cout, kw * cin, dst, cout, lhs, s * cin, rhs, cout);
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
                let dst_off = o * out_frame + (r0 + r) * w_out * cout;
                let row = &tile[src_row..src_row + w_out * cout];
                // SAFETY: rows r0..r0+nr_out of frame o belong to this band task only, and
                // dst_off + w_out*cout <= out.data.len().
                #[allow(unsafe_code)]
                unsafe {
                    std::ptr::copy_nonoverlapping(
                        row.as_ptr(),
                        out_ptr.get().add(dst_off),
                        row.len(),
                    );
                }
            }
        }
    });
    out
}

/// 1x1x1 convolution: `x[P, cin] * W + bias`; with `acc`, the result is added to `acc` (same
/// shape as the output) instead of returned in a new buffer.
pub fn pointwise(x: &Video, wt: &ConvWeights, acc: Option<&mut Video>) -> Option<Video> {
    assert_eq!((wt.kt, wt.kh, wt.kw), (1, 1, 1), "pointwise: kernel");
    assert_eq!(x.c, wt.cin, "pointwise: input channels");
    let (cin, cout) = (wt.cin, wt.cout);
    const CHUNK: usize = 1024;
    let run = |dst: &mut [f32], xs: &[f32], add: bool| {
        let m = xs.len() / cin;
        let mut tile = vec![0f32; m * cout];
        for px in tile.chunks_exact_mut(cout) {
            px.copy_from_slice(&wt.bias);
        }
        gemm_acc(m, cout, cin, &mut tile, cout, xs, cin, &wt.w, cout);
        if add {
            dst.iter_mut().zip(&tile).for_each(|(d, t)| *d += t);
        } else {
            dst.copy_from_slice(&tile);
        }
    };
    match acc {
        Some(acc) => {
            assert_eq!(
                (acc.t, acc.h, acc.w, acc.c),
                (x.t, x.h, x.w, cout),
                "pointwise: acc shape"
            );
            acc.data
                .par_chunks_mut(CHUNK * cout)
                .zip(x.data.par_chunks(CHUNK * cin))
                .for_each(|(d, xs)| run(d, xs, true));
            None
        }
        None => {
            let mut out = Video::zeros(x.t, x.h, x.w, cout);
            out.data
                .par_chunks_mut(CHUNK * cout)
                .zip(x.data.par_chunks(CHUNK * cin))
                .for_each(|(d, xs)| run(d, xs, false));
            Some(out)
        }
    }
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
        let got = pointwise(&x, &wt, None).expect("output");
        let want = naive(&x, &wv, dims, &b, Geom::same(0), 0);
        assert!(max_diff(&got.data, &want.data) < 1e-5);
        let mut acc = got.clone();
        pointwise(&x, &wt, Some(&mut acc));
        let twice: Vec<f32> = got.data.iter().map(|v| 2.0 * v).collect();
        assert!(max_diff(&acc.data, &twice) < 1e-5);
    }
}
