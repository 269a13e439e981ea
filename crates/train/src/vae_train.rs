//! A differentiable `AutoencoderKLCogVideoX` for training (CogVideoX's 3D causal VAE).
//!
//! Paper: Yang et al., "CogVideoX" (arXiv:2408.06072), section 2.1. Reference: diffusers 0.42.1
//! `models/autoencoders/autoencoder_kl_cogvideox.py`; numerically the same function as the
//! inference model [`vdit_models::autoencoders::cogvideox_vae`] (tested to 1e-4), with the same
//! var names (diffusers' keys: `encoder.down_blocks.0.resnets.0.norm1.weight`, ...).
//!
//! Shapes: video `[B, 3, F, H, W]` in [-1, 1] -> posterior mean and log-variance
//! `[B, latent, (F-1)/t + 1, H/s, W/s]` (t = `temporal_compression_ratio`, s = 2^(levels-1))
//! -> decoded video `[B, 3, F, H, W]`, unclamped.
//!
//! diffusers' frame batching is part of the function, so it is reproduced exactly: encode runs
//! 8 frames per call (the first call 8 + F mod 8), decode 2 latent frames per call (the first
//! 2 + F mod 2), GroupNorm statistics are per call, the temporal down/upsampling rules (odd
//! frame counts keep frame 0 alone) apply per call, and SpatialNorm3D resizes each call's
//! latents to that call's features. A causal conv over a call with the previous call's conv
//! cache is the causal conv over the whole clip, so each activation is kept as one tensor over
//! the whole clip plus the frame count of each call ([`Act`]); convolutions run on the whole
//! clip, norms and resampling per call.
//!
//! Every op has a backward pass: norms and activations are composed from candle ops
//! ([`crate::diffops`]); the 3-D and per-frame 2-D convolutions are [`Conv3dOp`], an im2col +
//! GEMM kernel with causal (replicate-first) time padding built in and a hand-written backward
//! (checked against finite differences in the tests).

use candle_core::{
    CpuStorage, CustomOp3, DType, Device, Layout, Result, Shape, Storage, Tensor, WithDType,
};
use candle_nn::VarBuilder;
use rayon::prelude::*;
use vdit_models::autoencoders::cogvideox_vae::{frame_batches, AutoencoderKLCogVideoXConfig};
use vdit_models::autoencoders::video::nearest_map;

/// Video frames per encoder call (diffusers' `num_sample_frames_batch_size`).
pub const SAMPLE_FRAMES_PER_CALL: usize = 8;
/// Latent frames per decoder call (diffusers' `num_latent_frames_batch_size`).
pub const LATENT_FRAMES_PER_CALL: usize = 2;

// ------------------------------------------------------------------------------ convolution op

/// 3-D convolution `x` `[B, C, T, H, W]` * `w` `[O, C, kt, kh, kw]` + `b` `[O]` ->
/// `[B, O, T', H', W']`, CPU, f32 or f64.
///
/// Time: with `causal`, frame 0 is replicated `kt - 1` times in front (CogVideoX's
/// `pad_mode="first"`; T' = T), else no time padding (T' = T - kt + 1). Space: zero padding
/// `pad` = (top, bottom, left, right), stride `stride` in H and W.
///
/// Forward: per sample and group of output frames, im2col into `[C·kt·kh·kw, frames·H'·W']`
/// (rows in the weight's order, so the weight is the `[O, K]` matrix as stored) and one GEMM.
/// Backward: the same columns are rebuilt; dW = G·colᵀ, dcol = Wᵀ·G scattered back (col2im),
/// db = ΣG. Memory beyond the tensors: one column block (a few tens of MB at most).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Conv3dOp {
    pub causal: bool,
    pub stride: usize,
    /// Zero padding (top, bottom, left, right).
    pub pad: [usize; 4],
    /// Nearest upsampling fused into the input read: the conv sees the virtual input
    /// `x[:, :, t[i], h[j], w[k]]` of size (len t, len h, len w), never materialised.
    pub up: Option<std::sync::Arc<UpMaps>>,
}

/// Index maps of a nearest upsampling (one source index per output frame / row / column).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpMaps {
    pub t: Vec<usize>,
    pub h: Vec<usize>,
    pub w: Vec<usize>,
}

/// Elements of one column block (K x frames·H'·W') the op aims for (tiny in tests, so that
/// clips are split into several blocks).
const COL_BLOCK: usize = if cfg!(test) { 1 << 10 } else { 1 << 20 };

#[derive(Debug, Clone, Copy)]
struct Geo {
    b: usize,
    c: usize,
    h: usize,
    w: usize,
    o: usize,
    kt: usize,
    kh: usize,
    kw: usize,
    to: usize,
    ho: usize,
    wo: usize,
    s: usize,
    pt: usize,
    pl: usize,
    causal: bool,
    /// the real input's frames, rows, columns (t, h, w are the virtual, upsampled ones)
    rt: usize,
    rh: usize,
    rw: usize,
}

impl Geo {
    fn new(op: &Conv3dOp, x: &[usize], w: &[usize]) -> Result<Self> {
        let (&[b, c, rt, rh, rw], &[o, cw, kt, kh, kw]) = (x, w) else {
            candle_core::bail!("conv3d: expected x [B, C, T, H, W] and w [O, C, kt, kh, kw], found {x:?} and {w:?}");
        };
        let (t, h, wd) = match &op.up {
            None => (rt, rh, rw),
            Some(m) => {
                let inside = |v: &[usize], n: usize| v.iter().all(|&i| i < n);
                if !(inside(&m.t, rt) && inside(&m.h, rh) && inside(&m.w, rw)) {
                    candle_core::bail!("conv3d: upsampling maps exceed the input {x:?}");
                }
                (m.t.len(), m.h.len(), m.w.len())
            }
        };
        if c != cw {
            candle_core::bail!("conv3d: input has {c} channels, weight {w:?} expects {cw}");
        }
        let [pt, pb, pl, pr] = op.pad;
        let s = op.stride;
        if s == 0 || kt == 0 || kh == 0 || kw == 0 {
            candle_core::bail!("conv3d: zero stride or kernel size ({s}, {w:?})");
        }
        let to = if op.causal {
            t
        } else if t >= kt {
            t - kt + 1
        } else {
            candle_core::bail!("conv3d: {t} frames for a {kt}-tap kernel without padding")
        };
        if h + pt + pb < kh || wd + pl + pr < kw {
            candle_core::bail!(
                "conv3d: {h}x{wd} input (padded {:?}) is smaller than the {kh}x{kw} kernel",
                op.pad
            );
        }
        let ho = (h + pt + pb - kh) / s + 1;
        let wo = (wd + pl + pr - kw) / s + 1;
        Ok(Self {
            b,
            c,
            h,
            w: wd,
            o,
            kt,
            kh,
            kw,
            to,
            ho,
            wo,
            s,
            pt,
            pl,
            causal: op.causal,
            rt,
            rh,
            rw,
        })
    }

    /// Elements of one sample of the real input.
    fn xlen(&self) -> usize {
        self.c * self.rt * self.rh * self.rw
    }

    /// Columns of the stored weight `[O, C·kt·kh·kw]`.
    fn k_full(&self) -> usize {
        self.c * self.kt * self.kh * self.kw
    }

    /// Input frame (virtual, before the upsampling map) read by output frame `t` at tap `dt`.
    fn in_frame(&self, t: usize, dt: usize) -> usize {
        if self.causal {
            (t + dt).saturating_sub(self.kt - 1)
        } else {
            t + dt
        }
    }

    /// `(lo, hi)`: the output columns `ox` whose input column `ox·s + dx − pl` is inside.
    fn valid_x(&self, dx: usize) -> (usize, usize) {
        // ox·s + dx >= pl  and  ox·s + dx < w + pl
        let lo = (self.pl.saturating_sub(dx)).div_ceil(self.s).min(self.wo);
        let hi = if self.w + self.pl > dx {
            (self.w + self.pl - dx).div_ceil(self.s).min(self.wo)
        } else {
            0
        };
        (lo, hi.max(lo))
    }

    /// The output frames in GEMM blocks. Temporal taps of one output frame that read the same
    /// real input frame (the replicated first frame of a causal conv, or frames repeated by a
    /// temporal upsampling map) are merged: the conv reads that frame once with the sum of
    /// those taps' weights. A 1-frame image through a causal 3x3x3 conv is then a 3x3 conv,
    /// a third of the work. Frames with the same merge pattern share a block.
    fn blocks(&self, up: Option<&UpMaps>) -> Vec<TapBlock> {
        let mut by_pattern: Vec<(Vec<Vec<usize>>, Vec<(usize, Vec<usize>)>)> = Vec::new();
        for t in 0..self.to {
            let real: Vec<usize> = (0..self.kt)
                .map(|dt| {
                    let v = self.in_frame(t, dt);
                    up.map_or(v, |m| m.t[v])
                })
                .collect();
            // groups of taps reading one frame, in order of first appearance
            let mut groups: Vec<Vec<usize>> = Vec::new();
            let mut frames: Vec<usize> = Vec::new();
            for (dt, &f) in real.iter().enumerate() {
                match frames.iter().position(|&g| g == f) {
                    Some(j) => groups[j].push(dt),
                    None => {
                        frames.push(f);
                        groups.push(vec![dt]);
                    }
                }
            }
            match by_pattern.iter_mut().find(|(p, _)| *p == groups) {
                Some((_, v)) => v.push((t, frames)),
                None => by_pattern.push((groups, vec![(t, frames)])),
            }
        }
        let mut out = Vec::new();
        for (groups, frames) in by_pattern {
            let k = self.c * groups.len() * self.kh * self.kw;
            let per = (COL_BLOCK / (k * self.ho * self.wo).max(1)).max(1);
            for chunk in frames.chunks(per) {
                out.push(TapBlock {
                    groups: groups.clone(),
                    out_frames: chunk.iter().map(|(t, _)| *t).collect(),
                    in_frames: chunk.iter().map(|(_, f)| f.clone()).collect(),
                });
            }
        }
        out
    }
}

/// Output frames computed by one GEMM, with their merged temporal taps.
#[derive(Debug, Clone)]
struct TapBlock {
    /// Effective tap j = the sum of the weight's taps `groups[j]`.
    groups: Vec<Vec<usize>>,
    /// Output frames of the block, in column order.
    out_frames: Vec<usize>,
    /// Real input frame read by effective tap j of each output frame.
    in_frames: Vec<Vec<usize>>,
}

impl TapBlock {
    fn taps(&self) -> usize {
        self.groups.len()
    }

    fn merged(&self) -> bool {
        self.groups.iter().any(|g| g.len() > 1)
    }

    /// The merged weight `[O, C·u·kh·kw]` from `w` `[O, C·kt·kh·kw]` (None if nothing merges).
    fn weight<T: WithDType>(&self, w: &[T], g: &Geo) -> Option<Vec<T>> {
        if !self.merged() {
            return None;
        }
        let (u, hw) = (self.taps(), g.kh * g.kw);
        let mut out = vec![T::from_f64(0.0); g.o * g.c * u * hw];
        for o in 0..g.o {
            for c in 0..g.c {
                for (j, taps) in self.groups.iter().enumerate() {
                    let dst = &mut out[((o * g.c + c) * u + j) * hw..][..hw];
                    for &dt in taps {
                        let src = &w[((o * g.c + c) * g.kt + dt) * hw..][..hw];
                        for (d, &s) in dst.iter_mut().zip(src) {
                            *d += s;
                        }
                    }
                }
            }
        }
        Some(out)
    }

    /// Adds the merged weight's gradient `dwt` `[C·u·kh·kw, O]` to every tap it stands for in
    /// `dw` `[O, C·kt·kh·kw]`.
    fn add_weight_grad<T: WithDType>(&self, dwt: &[T], g: &Geo, dw: &mut [T]) {
        let (u, hw) = (self.taps(), g.kh * g.kw);
        for c in 0..g.c {
            for (j, taps) in self.groups.iter().enumerate() {
                for p in 0..hw {
                    let row = &dwt[(((c * u + j) * hw) + p) * g.o..][..g.o];
                    for &dt in taps {
                        let col = (c * g.kt + dt) * hw + p;
                        for (o, &v) in row.iter().enumerate() {
                            dw[o * g.k_full() + col] += v;
                        }
                    }
                }
            }
        }
    }
}

/// Fills `col` `[C·u·kh·kw, nt·H'·W']` with the taps of the block's output frames of one
/// sample `x` `[C, T, H, W]` (rows and columns read through the upsampling maps `up`).
fn im2col<T: WithDType>(x: &[T], g: &Geo, up: Option<&UpMaps>, blk: &TapBlock, col: &mut [T]) {
    let (h, ho, wo, s) = (g.h, g.ho, g.wo, g.s);
    let howo = ho * wo;
    let nt = blk.out_frames.len();
    let u = blk.taps();
    let zero = T::from_f64(0.0);
    col.par_chunks_mut(nt * howo)
        .enumerate()
        .for_each(|(k, row)| {
            let dx = k % g.kw;
            let dy = (k / g.kw) % g.kh;
            let j = (k / (g.kw * g.kh)) % u;
            let c = k / (g.kw * g.kh * u);
            let (lo, hi) = g.valid_x(dx);
            for (gi, frames) in blk.in_frames.iter().enumerate() {
                let tin = frames[j];
                let plane = &x[(c * g.rt + tin) * g.rh * g.rw..][..g.rh * g.rw];
                let out = &mut row[gi * howo..][..howo];
                for oy in 0..ho {
                    let orow = &mut out[oy * wo..][..wo];
                    let iy = (oy * s + dy) as isize - g.pt as isize;
                    if iy < 0 || iy >= h as isize {
                        orow.fill(zero);
                        continue;
                    }
                    let iy = up.map_or(iy as usize, |m| m.h[iy as usize]);
                    let irow = &plane[iy * g.rw..][..g.rw];
                    orow[..lo].fill(zero);
                    orow[hi..].fill(zero);
                    match up {
                        Some(m) => {
                            for (ox, o) in orow.iter_mut().enumerate().take(hi).skip(lo) {
                                *o = irow[m.w[ox * s + dx - g.pl]];
                            }
                        }
                        None if s == 1 => {
                            let a = lo + dx - g.pl;
                            orow[lo..hi].copy_from_slice(&irow[a..a + hi - lo]);
                        }
                        None => {
                            for (ox, o) in orow.iter_mut().enumerate().take(hi).skip(lo) {
                                *o = irow[ox * s + dx - g.pl];
                            }
                        }
                    }
                }
            }
        });
}

/// Adds the column gradients `dcol` `[C·u·kh·kw, nt·H'·W']` of the block's output frames into
/// the input gradient `dx` `[C, T, H, W]` of one sample (the adjoint of [`im2col`]).
fn col2im<T: WithDType>(dcol: &[T], g: &Geo, up: Option<&UpMaps>, blk: &TapBlock, dx: &mut [T]) {
    let (h, ho, wo, s) = (g.h, g.ho, g.wo, g.s);
    let howo = ho * wo;
    let n = blk.out_frames.len() * howo;
    let taps = blk.taps() * g.kh * g.kw;
    dx.par_chunks_mut(g.rt * g.rh * g.rw)
        .enumerate()
        .for_each(|(c, dxc)| {
            for tap in 0..taps {
                let dxx = tap % g.kw;
                let dy = (tap / g.kw) % g.kh;
                let j = tap / (g.kw * g.kh);
                let (lo, hi) = g.valid_x(dxx);
                let row = &dcol[(c * taps + tap) * n..][..n];
                for (gi, frames) in blk.in_frames.iter().enumerate() {
                    let tin = frames[j];
                    let plane = &mut dxc[tin * g.rh * g.rw..][..g.rh * g.rw];
                    let src = &row[gi * howo..][..howo];
                    for oy in 0..ho {
                        let iy = (oy * s + dy) as isize - g.pt as isize;
                        if iy < 0 || iy >= h as isize {
                            continue;
                        }
                        let iy = up.map_or(iy as usize, |m| m.h[iy as usize]);
                        let irow = &mut plane[iy * g.rw..][..g.rw];
                        let srow = &src[oy * wo..][..wo];
                        match up {
                            Some(m) => {
                                for (ox, &v) in srow.iter().enumerate().take(hi).skip(lo) {
                                    irow[m.w[ox * s + dxx - g.pl]] += v;
                                }
                            }
                            None if s == 1 => {
                                let a = lo + dxx - g.pl;
                                for (d, &v) in irow[a..a + hi - lo].iter_mut().zip(&srow[lo..hi]) {
                                    *d += v;
                                }
                            }
                            None => {
                                for (ox, &v) in srow.iter().enumerate().take(hi).skip(lo) {
                                    irow[ox * s + dxx - g.pl] += v;
                                }
                            }
                        }
                    }
                }
            }
        });
}

/// Runs `f` on the contiguous CPU data of `t`.
fn with_data<T: WithDType, R>(t: &Tensor, f: impl FnOnce(&[T]) -> Result<R>) -> Result<R> {
    let t = t.contiguous()?;
    let (s, l) = t.storage_and_layout();
    let Storage::Cpu(cs) = &*s else {
        candle_core::bail!("vdit-conv3d: CPU tensors only");
    };
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("vdit-conv3d: non-contiguous tensor");
    };
    f(&cs.as_slice::<T>()?[a..b])
}

fn slice_of<'a, T: WithDType>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [T]> {
    let Some((a, b)) = l.contiguous_offsets() else {
        candle_core::bail!("vdit-conv3d: non-contiguous input");
    };
    Ok(&s.as_slice::<T>()?[a..b])
}

/// `Wᵀ` `[K, O]` of a block: the stored weight, or the block's merged taps.
fn block_weight_t<T: WithDType>(w: &[T], g: &Geo, blk: &TapBlock) -> Result<Tensor> {
    let k = g.c * blk.taps() * g.kh * g.kw;
    match blk.weight(w, g) {
        Some(m) => Tensor::from_vec(m, (g.o, k), &Device::Cpu)?.t(),
        None => Tensor::from_slice(w, (g.o, k), &Device::Cpu)?.t(),
    }
}

impl Conv3dOp {
    fn fwd<T: WithDType>(&self, x: &[T], w: &[T], b: &[T], g: &Geo) -> Result<Vec<T>> {
        let (howo, o) = (g.ho * g.wo, g.o);
        let mut out = vec![T::from_f64(0.0); g.b * o * g.to * howo];
        let blocks = g.blocks(self.up.as_deref());
        let weights = blocks
            .iter()
            .map(|blk| block_weight_t(w, g, blk))
            .collect::<Result<Vec<_>>>()?;
        for n in 0..g.b {
            let xs = &x[n * g.xlen()..][..g.xlen()];
            let ys = &mut out[n * o * g.to * howo..][..o * g.to * howo];
            for (blk, wt) in blocks.iter().zip(&weights) {
                let k = wt.dim(0)?;
                let nb = blk.out_frames.len() * howo;
                let mut col = vec![T::from_f64(0.0); k * nb];
                im2col(xs, g, self.up.as_deref(), blk, &mut col);
                let colm = Tensor::from_vec(col, (k, nb), &Device::Cpu)?;
                // colᵀ·Wᵀ: the pixels are the GEMM's long M side.
                let y = colm.t()?.matmul(wt)?; // [nb, O]
                with_data::<T, _>(&y, |yv| {
                    ys.par_chunks_mut(g.to * howo)
                        .zip(b.par_iter())
                        .enumerate()
                        .for_each(|(oc, (dst, &bias))| {
                            for (gi, &t) in blk.out_frames.iter().enumerate() {
                                let dst = &mut dst[t * howo..(t + 1) * howo];
                                for (j, d) in dst.iter_mut().enumerate() {
                                    *d = yv[(gi * howo + j) * o + oc] + bias;
                                }
                            }
                        });
                    Ok(())
                })?;
            }
        }
        Ok(out)
    }

    /// (dx, dw, db) for output gradient `gr`.
    #[allow(clippy::type_complexity)]
    fn bwd_impl<T: WithDType>(
        &self,
        x: &[T],
        w: &[T],
        gr: &[T],
        grad: &Tensor,
        g: &Geo,
        need_dx: bool,
    ) -> Result<(Option<Vec<T>>, Vec<T>, Vec<T>)> {
        let howo = g.ho * g.wo;
        let zero = T::from_f64(0.0);
        let mut dx = if need_dx {
            Some(vec![zero; g.b * g.xlen()])
        } else {
            None
        };
        let mut dw = vec![zero; g.o * g.k_full()];
        let mut db = vec![zero; g.o];
        let blocks = g.blocks(self.up.as_deref());
        let weights = blocks
            .iter()
            .map(|blk| block_weight_t(w, g, blk))
            .collect::<Result<Vec<_>>>()?;
        for n in 0..g.b {
            let xs = &x[n * g.xlen()..][..g.xlen()];
            let gs = &gr[n * g.o * g.to * howo..][..g.o * g.to * howo];
            for (o, row) in gs.chunks(g.to * howo).enumerate() {
                let mut acc = zero;
                for &v in row {
                    acc += v;
                }
                db[o] += acc;
            }
            let gn = grad.get(n)?; // [O, T'·H'·W']
            for (blk, wt) in blocks.iter().zip(&weights) {
                let k = wt.dim(0)?;
                let nb = blk.out_frames.len() * howo;
                // G block [O, nt·H'·W']: the block's frames, in column order
                let first = blk.out_frames[0];
                let consecutive = blk
                    .out_frames
                    .iter()
                    .enumerate()
                    .all(|(i, &t)| t == first + i);
                let gm = if consecutive {
                    gn.narrow(1, first * howo, nb)?
                } else {
                    let parts = blk
                        .out_frames
                        .iter()
                        .map(|&t| gn.narrow(1, t * howo, howo))
                        .collect::<Result<Vec<_>>>()?;
                    Tensor::cat(&parts, 1)?
                };
                let mut col = vec![zero; k * nb];
                im2col(xs, g, self.up.as_deref(), blk, &mut col);
                let colm = Tensor::from_vec(col, (k, nb), &Device::Cpu)?;
                let dwb = colm.matmul(&gm.t()?)?; // dWᵀ [K, O]
                drop(colm);
                with_data::<T, _>(&dwb, |v| {
                    if blk.merged() {
                        blk.add_weight_grad(v, g, &mut dw);
                    } else {
                        // [K, O] -> add transposed into [O, K]
                        for (kk, row) in v.chunks(g.o).enumerate() {
                            for (o, &val) in row.iter().enumerate() {
                                dw[o * k + kk] += val;
                            }
                        }
                    }
                    Ok(())
                })?;
                if let Some(dx) = dx.as_mut() {
                    let dcol = wt.matmul(&gm)?; // [K, nt·H'·W']
                    let dxs = &mut dx[n * g.xlen()..][..g.xlen()];
                    with_data::<T, _>(&dcol, |dc| {
                        col2im(dc, g, self.up.as_deref(), blk, dxs);
                        Ok(())
                    })?;
                }
            }
        }
        Ok((dx, dw, db))
    }
}

impl CustomOp3 for Conv3dOp {
    fn name(&self) -> &'static str {
        "vdit-conv3d"
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
        let g = Geo::new(self, l1.dims(), l2.dims())?;
        if l3.dims() != [g.o] {
            candle_core::bail!("conv3d: bias {:?}, expected [{}]", l3.dims(), g.o);
        }
        let shape = Shape::from((g.b, g.o, g.to, g.ho, g.wo));
        let storage = match (s1, s2, s3) {
            (CpuStorage::F32(_), CpuStorage::F32(_), CpuStorage::F32(_)) => CpuStorage::F32(
                self.fwd::<f32>(slice_of(s1, l1)?, slice_of(s2, l2)?, slice_of(s3, l3)?, &g)?,
            ),
            (CpuStorage::F64(_), CpuStorage::F64(_), CpuStorage::F64(_)) => CpuStorage::F64(
                self.fwd::<f64>(slice_of(s1, l1)?, slice_of(s2, l2)?, slice_of(s3, l3)?, &g)?,
            ),
            _ => candle_core::bail!("vdit-conv3d: x, w and b must all be f32 or all f64"),
        };
        Ok((storage, shape))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = Geo::new(self, x.dims(), w.dims())?;
        let need_dx = x.track_op();
        let x = x.contiguous()?;
        let (w, grad) = (w.contiguous()?, grad.contiguous()?);
        let grad3 = grad.reshape((g.b, g.o, g.to * g.ho * g.wo))?; // [B, O, T'·H'·W']
        macro_rules! run {
            ($t:ty) => {{
                let (dx, dw, db) = with_data::<$t, _>(&x, |xv| {
                    with_data::<$t, _>(&w, |wv| {
                        with_data::<$t, _>(&grad, |gv| {
                            self.bwd_impl::<$t>(xv, wv, gv, &grad3, &g, need_dx)
                        })
                    })
                })?;
                let dev = &Device::Cpu;
                (
                    dx.map(|v| Tensor::from_vec(v, x.shape(), dev))
                        .transpose()?,
                    Tensor::from_vec(dw, w.shape(), dev)?,
                    Tensor::from_vec(db, b.shape(), dev)?,
                )
            }};
        }
        let (dx, dw, db) = match x.dtype() {
            DType::F32 => run!(f32),
            DType::F64 => run!(f64),
            d => candle_core::bail!("vdit-conv3d: unsupported dtype {d:?}"),
        };
        Ok((dx, Some(dw), Some(db)))
    }
}

/// [`Conv3dOp`] on tensors (a weight of rank 4 is a per-frame Conv2d: kt = 1).
pub fn conv3d(x: &Tensor, w: &Tensor, b: &Tensor, op: Conv3dOp) -> Result<Tensor> {
    let w = if w.rank() == 4 {
        w.unsqueeze(2)?
    } else {
        w.clone()
    };
    x.contiguous()?
        .apply_op3(&w.contiguous()?, &b.contiguous()?, op)
}

// ------------------------------------------------------------------------------ group norm op

/// Element types the fused kernels run on: f32 (fast vectorisable `exp`) and f64 (gradchecks).
trait Float: WithDType {
    fn exp_(self) -> Self;
}

impl Float for f32 {
    #[inline(always)]
    fn exp_(self) -> Self {
        vdit_models::autoencoders::video::exp_f32(self)
    }
}

impl Float for f64 {
    #[inline(always)]
    fn exp_(self) -> Self {
        self.exp()
    }
}

/// `nn.GroupNorm` (affine) of `x` `[B, C, T, ...]` followed by an optional SiLU, with
/// statistics per group of channels *and per call* (`calls`: frame counts summing to T), as
/// diffusers' frame batching computes them. CPU, f32/f64; inputs `(x, gamma [C], beta [C])`.
///
/// Forward: per (sample, call, group) the mean and variance (f64 sums, biased variance), then
/// `y = x·a + b` with `a = rstd·gamma`, `b = beta − a·mean` (PyTorch's folding), then SiLU.
/// Backward (x̂ = (x − mean)·rstd, g = dL/d(pre-SiLU output)): dbeta = Σg, dgamma = Σg·x̂,
/// dx = rstd·(g·gamma − mean(g·gamma) − x̂·mean(g·gamma·x̂)), means over the group and call.
#[derive(Debug, Clone, PartialEq)]
pub struct GroupNormOp {
    pub groups: usize,
    pub eps: f64,
    pub calls: Vec<usize>,
    pub silu: bool,
}

impl GroupNormOp {
    /// Checks shapes; returns (B, C, T, S) with S the product of the dims after T.
    fn dims(
        &self,
        x: &[usize],
        gamma: &[usize],
        beta: &[usize],
    ) -> Result<(usize, usize, usize, usize)> {
        if x.len() < 3 {
            candle_core::bail!("group_norm: input {x:?} is not [B, C, T, ...]");
        }
        let (b, c, t) = (x[0], x[1], x[2]);
        let s: usize = x[3..].iter().product();
        if self.groups == 0 || c % self.groups != 0 {
            candle_core::bail!("group_norm: {c} channels in {} groups", self.groups);
        }
        if gamma != [c] || beta != [c] {
            candle_core::bail!("group_norm: gamma {gamma:?} / beta {beta:?} for {c} channels");
        }
        if self.calls.iter().sum::<usize>() != t || self.calls.contains(&0) {
            candle_core::bail!("group_norm: calls {:?} do not split {t} frames", self.calls);
        }
        Ok((b, c, t, s))
    }

    /// (mean, rstd) per (sample, call, group), index `(n * calls + k) * groups + g`.
    fn stats<T: Float>(&self, x: &[T], c: usize, t: usize, s: usize) -> Vec<(f64, f64)> {
        let nk = self.calls.len();
        // per row (sample, channel): (sum, sum of squares) of each call's frames
        let sums: Vec<(f64, f64)> = x
            .par_chunks(t * s)
            .flat_map_iter(|row| {
                let mut out = Vec::with_capacity(nk);
                let mut f0 = 0;
                for &l in &self.calls {
                    let (mut a, mut q) = (0f64, 0f64);
                    for &v in &row[f0 * s..(f0 + l) * s] {
                        let v = v.to_f64();
                        a += v;
                        q += v * v;
                    }
                    out.push((a, q));
                    f0 += l;
                }
                out
            })
            .collect();
        let cg = c / self.groups;
        let rows = sums.len() / nk;
        let mut stats = vec![(0f64, 0f64); rows / c * nk * self.groups];
        for r in 0..rows {
            let (n, ch) = (r / c, r % c);
            for k in 0..nk {
                let e = &mut stats[(n * nk + k) * self.groups + ch / cg];
                e.0 += sums[r * nk + k].0;
                e.1 += sums[r * nk + k].1;
            }
        }
        for n in 0..rows / c {
            for (k, &l) in self.calls.iter().enumerate() {
                let m = (cg * l * s) as f64;
                for g in 0..self.groups {
                    let e = &mut stats[(n * nk + k) * self.groups + g];
                    let mean = e.0 / m;
                    let var = (e.1 / m - mean * mean).max(0.0);
                    *e = (mean, 1.0 / (var + self.eps).sqrt());
                }
            }
        }
        stats
    }

    fn fwd<T: Float>(
        &self,
        x: &[T],
        gamma: &[T],
        beta: &[T],
        c: usize,
        t: usize,
        s: usize,
    ) -> Vec<T> {
        let stats = self.stats(x, c, t, s);
        let (nk, cg) = (self.calls.len(), c / self.groups);
        let mut y = vec![T::from_f64(0.0); x.len()];
        let one = T::from_f64(1.0);
        y.par_chunks_mut(t * s)
            .zip(x.par_chunks(t * s))
            .enumerate()
            .for_each(|(r, (yr, xr))| {
                let (n, ch) = (r / c, r % c);
                let mut f0 = 0;
                for (k, &l) in self.calls.iter().enumerate() {
                    let (mean, rstd) = stats[(n * nk + k) * self.groups + ch / cg];
                    let a = T::from_f64(rstd) * gamma[ch];
                    let b = beta[ch] - a * T::from_f64(mean);
                    let seg = f0 * s..(f0 + l) * s;
                    for (o, &v) in yr[seg.clone()].iter_mut().zip(&xr[seg]) {
                        let u = v * a + b;
                        *o = if self.silu {
                            u / (one + (T::from_f64(0.0) - u).exp_())
                        } else {
                            u
                        };
                    }
                    f0 += l;
                }
            });
        y
    }

    #[allow(clippy::type_complexity)]
    fn bwd_impl<T: Float>(
        &self,
        x: &[T],
        gamma: &[T],
        beta: &[T],
        dy: &[T],
        c: usize,
        t: usize,
        s: usize,
    ) -> (Vec<T>, Vec<T>, Vec<T>) {
        let stats = self.stats(x, c, t, s);
        let (nk, cg, groups) = (self.calls.len(), c / self.groups, self.groups);
        let zero = T::from_f64(0.0);
        let one = T::from_f64(1.0);
        // Pass 1: g = dL/d(pre-SiLU) into dx; per (row, call) Σg and Σg·x̂.
        let mut dx = vec![zero; x.len()];
        let sums: Vec<(f64, f64)> = dx
            .par_chunks_mut(t * s)
            .zip(x.par_chunks(t * s).zip(dy.par_chunks(t * s)))
            .enumerate()
            .flat_map_iter(|(r, (gr, (xr, dyr)))| {
                let (n, ch) = (r / c, r % c);
                let mut out = Vec::with_capacity(nk);
                let mut f0 = 0;
                for (k, &l) in self.calls.iter().enumerate() {
                    let (mean, rstd) = stats[(n * nk + k) * groups + ch / cg];
                    let (mean, rstd) = (T::from_f64(mean), T::from_f64(rstd));
                    let a = rstd * gamma[ch];
                    let b = beta[ch] - a * mean;
                    let (mut sg, mut sgx) = (0f64, 0f64);
                    let seg = f0 * s..(f0 + l) * s;
                    for ((g, &v), &d) in gr[seg.clone()]
                        .iter_mut()
                        .zip(&xr[seg.clone()])
                        .zip(&dyr[seg])
                    {
                        let gv = if self.silu {
                            let u = v * a + b;
                            let sig = one / (one + (zero - u).exp_());
                            d * sig * (one + u * (one - sig))
                        } else {
                            d
                        };
                        *g = gv;
                        sg += gv.to_f64();
                        sgx += (gv * (v - mean) * rstd).to_f64();
                    }
                    out.push((sg, sgx));
                    f0 += l;
                }
                out
            })
            .collect();
        let rows = sums.len() / nk;
        let mut dgamma = vec![0f64; c];
        let mut dbeta = vec![0f64; c];
        // per (sample, call, group): mean(g·gamma), mean(g·gamma·x̂)
        let mut gm = vec![(0f64, 0f64); rows / c * nk * groups];
        for r in 0..rows {
            let (n, ch) = (r / c, r % c);
            let gmc = gamma[ch].to_f64();
            for k in 0..nk {
                let (sg, sgx) = sums[r * nk + k];
                dbeta[ch] += sg;
                dgamma[ch] += sgx;
                let e = &mut gm[(n * nk + k) * groups + ch / cg];
                e.0 += sg * gmc;
                e.1 += sgx * gmc;
            }
        }
        for n in 0..rows / c {
            for (k, &l) in self.calls.iter().enumerate() {
                let m = (cg * l * s) as f64;
                for g in 0..groups {
                    let e = &mut gm[(n * nk + k) * groups + g];
                    *e = (e.0 / m, e.1 / m);
                }
            }
        }
        // Pass 2: dx = rstd·(g·gamma − A − x̂·B).
        dx.par_chunks_mut(t * s)
            .zip(x.par_chunks(t * s))
            .enumerate()
            .for_each(|(r, (gr, xr))| {
                let (n, ch) = (r / c, r % c);
                let mut f0 = 0;
                for (k, &l) in self.calls.iter().enumerate() {
                    let i = (n * nk + k) * groups + ch / cg;
                    let (mean, rstd) = stats[i];
                    let (am, bm) = gm[i];
                    let (mean, rstd) = (T::from_f64(mean), T::from_f64(rstd));
                    let (am, bm) = (T::from_f64(am), T::from_f64(bm));
                    let gc = gamma[ch];
                    let seg = f0 * s..(f0 + l) * s;
                    for (g, &v) in gr[seg.clone()].iter_mut().zip(&xr[seg]) {
                        let xh = (v - mean) * rstd;
                        *g = rstd * (*g * gc - am - xh * bm);
                    }
                    f0 += l;
                }
            });
        let cast = |v: Vec<f64>| v.into_iter().map(T::from_f64).collect();
        (dx, cast(dgamma), cast(dbeta))
    }
}

impl CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        "vdit-group-norm"
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
        let (_, c, t, s) = self.dims(l1.dims(), l2.dims(), l3.dims())?;
        let storage = match (s1, s2, s3) {
            (CpuStorage::F32(_), CpuStorage::F32(_), CpuStorage::F32(_)) => {
                CpuStorage::F32(self.fwd::<f32>(
                    slice_of(s1, l1)?,
                    slice_of(s2, l2)?,
                    slice_of(s3, l3)?,
                    c,
                    t,
                    s,
                ))
            }
            (CpuStorage::F64(_), CpuStorage::F64(_), CpuStorage::F64(_)) => {
                CpuStorage::F64(self.fwd::<f64>(
                    slice_of(s1, l1)?,
                    slice_of(s2, l2)?,
                    slice_of(s3, l3)?,
                    c,
                    t,
                    s,
                ))
            }
            _ => {
                candle_core::bail!("vdit-group-norm: x, gamma and beta must all be f32 or all f64")
            }
        };
        Ok((storage, l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (_, c, t, s) = self.dims(x.dims(), gamma.dims(), beta.dims())?;
        let grad = grad.contiguous()?;
        macro_rules! run {
            ($t:ty) => {{
                let (dx, dg, db) = with_data::<$t, _>(x, |xv| {
                    with_data::<$t, _>(gamma, |gv| {
                        with_data::<$t, _>(beta, |bv| {
                            with_data::<$t, _>(&grad, |dv| {
                                Ok(self.bwd_impl::<$t>(xv, gv, bv, dv, c, t, s))
                            })
                        })
                    })
                })?;
                let dev = &Device::Cpu;
                (
                    Tensor::from_vec(dx, x.shape(), dev)?,
                    Tensor::from_vec(dg, c, dev)?,
                    Tensor::from_vec(db, c, dev)?,
                )
            }};
        }
        let (dx, dg, db) = match x.dtype() {
            DType::F32 => run!(f32),
            DType::F64 => run!(f64),
            d => candle_core::bail!("vdit-group-norm: unsupported dtype {d:?}"),
        };
        Ok((Some(dx), Some(dg), Some(db)))
    }
}

/// [`GroupNormOp`] on tensors.
pub fn group_norm_calls(
    x: &Tensor,
    gamma: &Tensor,
    beta: &Tensor,
    op: GroupNormOp,
) -> Result<Tensor> {
    x.contiguous()?
        .apply_op3(&gamma.contiguous()?, &beta.contiguous()?, op)
}

// ------------------------------------------------------------------------------ spatial norm op

/// `CogVideoXSpatialNorm3D` followed by SiLU, fused: `silu(GroupNorm(f)·Y[map] + B[map])` with
/// GroupNorm statistics per call (see [`GroupNormOp`]) and `Y`, `B` the latent-resolution
/// outputs of `conv_y` / `conv_b`, read through the nearest-resize index maps `tmap`, `hmap`,
/// `wmap` (one source index per frame / row / column of `f`). Inputs: `f` `[B, C, T, H, W]`,
/// `gb` `[2C]` (gamma then beta), `yb` `[B, 2C, Tz, hz, wz]` (Y then B). CPU, f32/f64.
#[derive(Debug, Clone, PartialEq)]
pub struct SpatialNormOp {
    pub norm: GroupNormOp,
    pub tmap: Vec<usize>,
    pub hmap: Vec<usize>,
    pub wmap: Vec<usize>,
}

/// Shapes of one [`SpatialNormOp`] call.
#[derive(Debug, Clone, Copy)]
struct SnDims {
    b: usize,
    c: usize,
    t: usize,
    h: usize,
    w: usize,
    /// latent frame, row, column counts
    tz: usize,
    hz: usize,
    wz: usize,
}

impl SpatialNormOp {
    fn dims(&self, f: &[usize], gb: &[usize], yb: &[usize]) -> Result<SnDims> {
        let (&[b, c, t, h, w], &[b2, c2, tz, hz, wz]) = (f, yb) else {
            candle_core::bail!("spatial_norm: f {f:?} and yb {yb:?} must be 5-D");
        };
        if b2 != b || c2 != 2 * c || gb != [2 * c] {
            candle_core::bail!("spatial_norm: f {f:?}, gb {gb:?}, yb {yb:?} do not match");
        }
        if self.tmap.len() != t || self.hmap.len() != h || self.wmap.len() != w {
            candle_core::bail!("spatial_norm: index maps do not match f {f:?}");
        }
        let inside = |m: &[usize], n: usize| m.iter().all(|&i| i < n);
        if !(inside(&self.tmap, tz) && inside(&self.hmap, hz) && inside(&self.wmap, wz)) {
            candle_core::bail!("spatial_norm: index maps exceed yb {yb:?}");
        }
        self.norm.dims(&[b, c, t, h, w], &[c], &[c])?;
        Ok(SnDims {
            b,
            c,
            t,
            h,
            w,
            tz,
            hz,
            wz,
        })
    }

    fn fwd<T: Float>(&self, x: &[T], gb: &[T], yb: &[T], d: &SnDims) -> Vec<T> {
        let (c, t, s) = (d.c, d.t, d.h * d.w);
        let z = d.tz * d.hz * d.wz;
        let stats = self.norm.stats(x, c, t, s);
        let (nk, groups) = (self.norm.calls.len(), self.norm.groups);
        let cg = c / groups;
        let (zero, one) = (T::from_f64(0.0), T::from_f64(1.0));
        let mut y = vec![zero; x.len()];
        y.par_chunks_mut(t * s)
            .zip(x.par_chunks(t * s))
            .enumerate()
            .for_each(|(r, (yr, xr))| {
                let (n, ch) = (r / c, r % c);
                let ym = &yb[(n * 2 * c + ch) * z..][..z];
                let bm = &yb[(n * 2 * c + c + ch) * z..][..z];
                let mut f0 = 0;
                for (k, &l) in self.norm.calls.iter().enumerate() {
                    let (mean, rstd) = stats[(n * nk + k) * groups + ch / cg];
                    let a = T::from_f64(rstd) * gb[ch];
                    let b = gb[c + ch] - a * T::from_f64(mean);
                    for fr in f0..f0 + l {
                        for iy in 0..d.h {
                            let zo = (self.tmap[fr] * d.hz + self.hmap[iy]) * d.wz;
                            let (yrow, brow) = (&ym[zo..zo + d.wz], &bm[zo..zo + d.wz]);
                            let o = (fr * d.h + iy) * d.w;
                            for ix in 0..d.w {
                                let m = self.wmap[ix];
                                let u = (xr[o + ix] * a + b) * yrow[m] + brow[m];
                                yr[o + ix] = if self.norm.silu {
                                    u / (one + (zero - u).exp_())
                                } else {
                                    u
                                };
                            }
                        }
                    }
                    f0 += l;
                }
            });
        y
    }

    /// (df, dgb, dyb).
    fn bwd_impl<T: Float>(
        &self,
        x: &[T],
        gb: &[T],
        yb: &[T],
        dy: &[T],
        d: &SnDims,
    ) -> (Vec<T>, Vec<T>, Vec<T>) {
        let (c, t, s) = (d.c, d.t, d.h * d.w);
        let z = d.tz * d.hz * d.wz;
        let stats = self.norm.stats(x, c, t, s);
        let (nk, groups) = (self.norm.calls.len(), self.norm.groups);
        let cg = c / groups;
        let (zero, one) = (T::from_f64(0.0), T::from_f64(1.0));
        let rows = d.b * c;
        // Pass 1: h = dL/d(normed f) into dx; dY, dB per row; per (row, call) Σh, Σh·x̂.
        let mut dx = vec![zero; x.len()];
        let mut dym = vec![zero; rows * z];
        let mut dbm = vec![zero; rows * z];
        let sums: Vec<(f64, f64)> = dx
            .par_chunks_mut(t * s)
            .zip(dym.par_chunks_mut(z).zip(dbm.par_chunks_mut(z)))
            .zip(x.par_chunks(t * s).zip(dy.par_chunks(t * s)))
            .enumerate()
            .flat_map_iter(|(r, ((hr, (dyr_m, dbr_m)), (xr, dyr)))| {
                let (n, ch) = (r / c, r % c);
                let ym = &yb[(n * 2 * c + ch) * z..][..z];
                let bm = &yb[(n * 2 * c + c + ch) * z..][..z];
                let mut out = Vec::with_capacity(nk);
                let mut f0 = 0;
                for (k, &l) in self.norm.calls.iter().enumerate() {
                    let (mean, rstd) = stats[(n * nk + k) * groups + ch / cg];
                    let (mean, rstd) = (T::from_f64(mean), T::from_f64(rstd));
                    let a = rstd * gb[ch];
                    let b = gb[c + ch] - a * mean;
                    let (mut sh, mut shx) = (0f64, 0f64);
                    for fr in f0..f0 + l {
                        for iy in 0..d.h {
                            let zo = (self.tmap[fr] * d.hz + self.hmap[iy]) * d.wz;
                            let o = (fr * d.h + iy) * d.w;
                            for ix in 0..d.w {
                                let m = zo + self.wmap[ix];
                                let v = xr[o + ix];
                                let nv = v * a + b;
                                let u = nv * ym[m] + bm[m];
                                let g = if self.norm.silu {
                                    let sig = one / (one + (zero - u).exp_());
                                    dyr[o + ix] * sig * (one + u * (one - sig))
                                } else {
                                    dyr[o + ix]
                                };
                                dyr_m[m] += g * nv;
                                dbr_m[m] += g;
                                let h = g * ym[m];
                                hr[o + ix] = h;
                                sh += h.to_f64();
                                shx += (h * (v - mean) * rstd).to_f64();
                            }
                        }
                    }
                    out.push((sh, shx));
                    f0 += l;
                }
                out
            })
            .collect();
        let mut dgamma = vec![0f64; c];
        let mut dbeta = vec![0f64; c];
        let mut gm = vec![(0f64, 0f64); d.b * nk * groups];
        for r in 0..rows {
            let (n, ch) = (r / c, r % c);
            let gmc = gb[ch].to_f64();
            for k in 0..nk {
                let (sh, shx) = sums[r * nk + k];
                dbeta[ch] += sh;
                dgamma[ch] += shx;
                let e = &mut gm[(n * nk + k) * groups + ch / cg];
                e.0 += sh * gmc;
                e.1 += shx * gmc;
            }
        }
        for n in 0..d.b {
            for (k, &l) in self.norm.calls.iter().enumerate() {
                let m = (cg * l * s) as f64;
                for g in 0..groups {
                    let e = &mut gm[(n * nk + k) * groups + g];
                    *e = (e.0 / m, e.1 / m);
                }
            }
        }
        // Pass 2: dx = rstd·(h·gamma − A − x̂·B).
        dx.par_chunks_mut(t * s)
            .zip(x.par_chunks(t * s))
            .enumerate()
            .for_each(|(r, (hr, xr))| {
                let (n, ch) = (r / c, r % c);
                let mut f0 = 0;
                for (k, &l) in self.norm.calls.iter().enumerate() {
                    let i = (n * nk + k) * groups + ch / cg;
                    let (mean, rstd) = stats[i];
                    let (am, bm) = gm[i];
                    let (mean, rstd) = (T::from_f64(mean), T::from_f64(rstd));
                    let (am, bm) = (T::from_f64(am), T::from_f64(bm));
                    let gc = gb[ch];
                    let seg = f0 * s..(f0 + l) * s;
                    for (h, &v) in hr[seg.clone()].iter_mut().zip(&xr[seg]) {
                        let xh = (v - mean) * rstd;
                        *h = rstd * (*h * gc - am - xh * bm);
                    }
                    f0 += l;
                }
            });
        // [B, 2C, Tz, hz, wz]: per sample, dY rows then dB rows
        let mut dyb = Vec::with_capacity(2 * rows * z);
        for n in 0..d.b {
            dyb.extend_from_slice(&dym[n * c * z..(n + 1) * c * z]);
            dyb.extend_from_slice(&dbm[n * c * z..(n + 1) * c * z]);
        }
        let dgb = dgamma.into_iter().chain(dbeta).map(T::from_f64).collect();
        (dx, dgb, dyb)
    }
}

impl CustomOp3 for SpatialNormOp {
    fn name(&self) -> &'static str {
        "vdit-spatial-norm"
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
        let d = self.dims(l1.dims(), l2.dims(), l3.dims())?;
        let storage = match (s1, s2, s3) {
            (CpuStorage::F32(_), CpuStorage::F32(_), CpuStorage::F32(_)) => CpuStorage::F32(
                self.fwd::<f32>(slice_of(s1, l1)?, slice_of(s2, l2)?, slice_of(s3, l3)?, &d),
            ),
            (CpuStorage::F64(_), CpuStorage::F64(_), CpuStorage::F64(_)) => CpuStorage::F64(
                self.fwd::<f64>(slice_of(s1, l1)?, slice_of(s2, l2)?, slice_of(s3, l3)?, &d),
            ),
            _ => candle_core::bail!("vdit-spatial-norm: inputs must all be f32 or all f64"),
        };
        Ok((storage, l1.shape().clone()))
    }

    fn bwd(
        &self,
        f: &Tensor,
        gb: &Tensor,
        yb: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = self.dims(f.dims(), gb.dims(), yb.dims())?;
        let grad = grad.contiguous()?;
        macro_rules! run {
            ($t:ty) => {{
                let (df, dgb, dyb) = with_data::<$t, _>(f, |xv| {
                    with_data::<$t, _>(gb, |gv| {
                        with_data::<$t, _>(yb, |yv| {
                            with_data::<$t, _>(&grad, |dv| {
                                Ok(self.bwd_impl::<$t>(xv, gv, yv, dv, &d))
                            })
                        })
                    })
                })?;
                let dev = &Device::Cpu;
                (
                    Tensor::from_vec(df, f.shape(), dev)?,
                    Tensor::from_vec(dgb, gb.shape(), dev)?,
                    Tensor::from_vec(dyb, yb.shape(), dev)?,
                )
            }};
        }
        let (df, dgb, dyb) = match f.dtype() {
            DType::F32 => run!(f32),
            DType::F64 => run!(f64),
            dt => candle_core::bail!("vdit-spatial-norm: unsupported dtype {dt:?}"),
        };
        Ok((Some(df), Some(dgb), Some(dyb)))
    }
}

/// [`SpatialNormOp`] on tensors.
pub fn spatial_norm(f: &Tensor, gb: &Tensor, yb: &Tensor, op: SpatialNormOp) -> Result<Tensor> {
    f.contiguous()?
        .apply_op3(&gb.contiguous()?, &yb.contiguous()?, op)
}

// ------------------------------------------------------------------------------ activations

/// An activation over the whole clip, `[B, C, T, H, W]`, with the frame count of each of
/// diffusers' calls (they sum to T).
#[derive(Debug, Clone)]
pub struct Act {
    pub x: Tensor,
    pub calls: Vec<usize>,
}

/// Frame counts of diffusers' calls over `n` frames at `per_call` frames per call.
pub fn call_lengths(n: usize, per_call: usize) -> Vec<usize> {
    frame_batches(n, per_call)
        .into_iter()
        .map(|r| r.len())
        .collect()
}

/// `x.index_select(idx, dim)` unless `idx` is the identity.
fn select(x: &Tensor, idx: &[usize], dim: usize) -> Result<Tensor> {
    if idx.len() == x.dim(dim)? && idx.iter().enumerate().all(|(i, &j)| i == j) {
        return Ok(x.clone());
    }
    let ids: Vec<u32> = idx.iter().map(|&i| i as u32).collect();
    x.index_select(&Tensor::new(ids, x.device())?, dim)
}

// ------------------------------------------------------------------------------ layers

const CAUSAL_3X3X3: Conv3dOp = Conv3dOp {
    causal: true,
    stride: 1,
    pad: [1, 1, 1, 1],
    up: None,
};

/// A convolution's weight and bias, as stored (`[O, C, k...]`, `[O]`).
struct Conv {
    w: Tensor,
    b: Tensor,
}

impl Conv {
    fn new(vb: VarBuilder, cin: usize, cout: usize, k: &[usize]) -> Result<Self> {
        let mut dims = vec![cout, cin];
        dims.extend_from_slice(k);
        Ok(Self {
            w: vb.get(dims, "weight")?,
            b: vb.get(cout, "bias")?,
        })
    }

    /// `CogVideoXCausalConv3d` (3x3x3, `pad_mode="first"`): frame 0 replicated twice in front.
    fn causal(&self, x: &Tensor) -> Result<Tensor> {
        conv3d(x, &self.w, &self.b, CAUSAL_3X3X3)
    }

    /// A 1x1x1 conv `[B, C, T, H, W]` -> `[B, O, T, H, W]` as one matmul per sample.
    fn pointwise(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, t, h, w) = x.dims5()?;
        let o = self.w.dim(0)?;
        let wm = self.w.reshape((o, c))?; // [O, C, 1, 1, 1] -> [O, C]
        let xm = x.reshape((b, c, t * h * w))?; // [B, C, T*H*W]
        wm.broadcast_matmul(&xm)? // [B, O, T*H*W]
            .broadcast_add(&self.b.reshape((1, o, 1))?)?
            .reshape((b, o, t, h, w))
    }
}

/// `nn.GroupNorm`, with statistics per call.
struct GroupNorm {
    w: Tensor,
    b: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    fn new(vb: VarBuilder, c: usize, groups: usize, eps: f64) -> Result<Self> {
        Ok(Self {
            w: vb.get(c, "weight")?,
            b: vb.get(c, "bias")?,
            groups,
            eps,
        })
    }

    /// The norm of `a` (statistics per call), followed by SiLU when `silu`.
    fn forward(&self, a: &Act, silu: bool) -> Result<Tensor> {
        let op = GroupNormOp {
            groups: self.groups,
            eps: self.eps,
            calls: a.calls.clone(),
            silu,
        };
        group_norm_calls(&a.x, &self.w, &self.b, op)
    }
}

/// `CogVideoXSpatialNorm3D`: `GroupNorm(f) * conv_y(zq) + conv_b(zq)`, zq being each call's
/// latents nearest-resized to that call's features (frame 0 alone when the call has an odd
/// frame count > 1). The 1x1x1 convs commute with the resize, so they run on the latents.
struct SpatialNorm3D {
    norm: GroupNorm,
    conv_y: Conv,
    conv_b: Conv,
}

impl SpatialNorm3D {
    fn new(vb: VarBuilder, f_channels: usize, zq_channels: usize, groups: usize) -> Result<Self> {
        let k = [1, 1, 1];
        Ok(Self {
            norm: GroupNorm::new(vb.pp("norm_layer"), f_channels, groups, 1e-6)?,
            conv_y: Conv::new(vb.pp("conv_y").pp("conv"), zq_channels, f_channels, &k)?,
            conv_b: Conv::new(vb.pp("conv_b").pp("conv"), zq_channels, f_channels, &k)?,
        })
    }

    /// `silu(spatial_norm(f, zq))`, fused ([`SpatialNormOp`]).
    fn forward_silu(&self, f: &Act, zq: &Act) -> Result<Tensor> {
        let (_, _, _, h, w) = f.x.dims5()?;
        let (_, _, _, hz, wz) = zq.x.dims5()?;
        // conv_y and conv_b as one 1x1x1 conv: [2C, Cz, 1, 1, 1]
        let both = Conv {
            w: Tensor::cat(&[&self.conv_y.w, &self.conv_b.w], 0)?,
            b: Tensor::cat(&[&self.conv_y.b, &self.conv_b.b], 0)?,
        };
        let yb = both.pointwise(&zq.x)?; // [B, 2C, Tz, hz, wz]
        let gb = Tensor::cat(&[&self.norm.w, &self.norm.b], 0)?; // [2C]
        let op = SpatialNormOp {
            norm: GroupNormOp {
                groups: self.norm.groups,
                eps: self.norm.eps,
                calls: f.calls.clone(),
                silu: true,
            },
            tmap: zq_time_map(&zq.calls, &f.calls),
            hmap: nearest_map(hz, h),
            wmap: nearest_map(wz, w),
        };
        spatial_norm(&f.x, &gb, &yb, op)
    }
}

/// For every frame of the features (calls `f_calls`), the latent frame SpatialNorm3D reads
/// (latent calls `z_calls`).
fn zq_time_map(z_calls: &[usize], f_calls: &[usize]) -> Vec<usize> {
    let mut out = Vec::new();
    let mut zs = 0;
    for (&lz, &lf) in z_calls.iter().zip(f_calls) {
        if lf > 1 && lf % 2 == 1 {
            let rest = lz.saturating_sub(1).max(1);
            out.push(zs);
            out.extend(
                nearest_map(rest, lf - 1)
                    .into_iter()
                    .map(|i| zs + (1 + i).min(lz - 1)),
            );
        } else {
            out.extend(nearest_map(lz, lf).into_iter().map(|i| zs + i));
        }
        zs += lz;
    }
    out
}

enum Norm {
    Group(GroupNorm),
    Spatial(SpatialNorm3D),
}

impl Norm {
    fn new(
        vb: VarBuilder,
        c: usize,
        groups: usize,
        eps: f64,
        spatial_dim: Option<usize>,
    ) -> Result<Self> {
        Ok(match spatial_dim {
            None => Norm::Group(GroupNorm::new(vb, c, groups, eps)?),
            Some(zc) => Norm::Spatial(SpatialNorm3D::new(vb, c, zc, groups)?),
        })
    }

    /// `silu(norm(f))`.
    fn forward_silu(&self, f: &Act, zq: Option<&Act>) -> Result<Tensor> {
        match (self, zq) {
            (Norm::Group(g), _) => g.forward(f, true),
            (Norm::Spatial(s), Some(zq)) => s.forward_silu(f, zq),
            (Norm::Spatial(_), None) => candle_core::bail!("a spatial norm needs the latents"),
        }
    }
}

/// `CogVideoXResnetBlock3D`: `conv2(silu(norm2(conv1(silu(norm1(x)))))) + shortcut(x)`.
struct ResnetBlock3D {
    norm1: Norm,
    conv1: Conv,
    norm2: Norm,
    conv2: Conv,
    shortcut: Option<Conv>,
}

impl ResnetBlock3D {
    fn new(
        vb: VarBuilder,
        cin: usize,
        cout: usize,
        groups: usize,
        eps: f64,
        spatial_dim: Option<usize>,
    ) -> Result<Self> {
        let k3 = [3, 3, 3];
        Ok(Self {
            norm1: Norm::new(vb.pp("norm1"), cin, groups, eps, spatial_dim)?,
            conv1: Conv::new(vb.pp("conv1").pp("conv"), cin, cout, &k3)?,
            norm2: Norm::new(vb.pp("norm2"), cout, groups, eps, spatial_dim)?,
            conv2: Conv::new(vb.pp("conv2").pp("conv"), cout, cout, &k3)?,
            shortcut: if cin != cout {
                Some(Conv::new(vb.pp("conv_shortcut"), cin, cout, &[1, 1, 1])?)
            } else {
                None
            },
        })
    }

    fn forward(&self, a: &Act, zq: Option<&Act>) -> Result<Act> {
        let h = self.conv1.causal(&self.norm1.forward_silu(a, zq)?)?; // [B, Cout, T, H, W]
        let h = Act {
            x: h,
            calls: a.calls.clone(),
        };
        let h = self.conv2.causal(&self.norm2.forward_silu(&h, zq)?)?;
        let skip = match &self.shortcut {
            Some(s) => s.pointwise(&a.x)?,
            None => a.x.clone(),
        };
        Ok(Act {
            x: (h + skip)?,
            calls: a.calls.clone(),
        })
    }
}

/// `CogVideoXDownsample3D`: per call, optional temporal average pooling by 2 (frame 0 kept
/// alone when the call's frame count is odd), then zero-pad right/bottom by one and a 3x3
/// stride-2 Conv2d per frame.
struct Downsample {
    conv: Conv,
    compress_time: bool,
}

impl Downsample {
    fn forward(&self, a: &Act) -> Result<Act> {
        let (x, calls) = if self.compress_time {
            let (mut ia, mut ib) = (Vec::new(), Vec::new());
            let mut s = 0;
            for &l in &a.calls {
                let first = l % 2; // odd: frame 0 alone, averaged with itself
                if first == 1 {
                    ia.push(s);
                    ib.push(s);
                }
                for j in 0..(l - first) / 2 {
                    ia.push(s + first + 2 * j);
                    ib.push(s + first + 2 * j + 1);
                }
                s += l;
            }
            let x = ((select(&a.x, &ia, 2)? + select(&a.x, &ib, 2)?)? * 0.5)?;
            (x, pooled_calls(&a.calls))
        } else {
            (a.x.clone(), a.calls.clone())
        };
        let op = Conv3dOp {
            causal: false,
            stride: 2,
            pad: [0, 1, 0, 1],
            up: None,
        };
        Ok(Act {
            x: conv3d(&x, &self.conv.w, &self.conv.b, op)?,
            calls,
        })
    }
}

/// `CogVideoXUpsample3D`: per call, nearest x2 in time when compressing time (frame 0 not
/// repeated when the call's frame count is odd, nothing for one frame), nearest x2 in H and W,
/// then a 3x3 Conv2d per frame.
struct Upsample {
    conv: Conv,
    compress_time: bool,
}

impl Upsample {
    fn forward(&self, a: &Act) -> Result<Act> {
        let (_, _, t, h, w) = a.x.dims5()?;
        let (tmap, calls) = if self.compress_time {
            let mut idx = Vec::new();
            let mut s = 0;
            for &l in &a.calls {
                if l == 1 {
                    idx.push(s);
                } else if l % 2 == 1 {
                    idx.push(s);
                    idx.extend((0..2 * (l - 1)).map(|j| s + 1 + j / 2));
                } else {
                    idx.extend((0..2 * l).map(|j| s + j / 2));
                }
                s += l;
            }
            (idx, upsampled_calls(&a.calls))
        } else {
            ((0..t).collect(), a.calls.clone())
        };
        // the nearest x2 upsampling is read by the conv through index maps
        let up = UpMaps {
            t: tmap,
            h: (0..2 * h).map(|i| i / 2).collect(),
            w: (0..2 * w).map(|i| i / 2).collect(),
        };
        let op = Conv3dOp {
            causal: false,
            stride: 1,
            pad: [1, 1, 1, 1],
            up: Some(std::sync::Arc::new(up)),
        };
        Ok(Act {
            x: conv3d(&a.x, &self.conv.w, &self.conv.b, op)?,
            calls,
        })
    }
}

/// `CogVideoXEncoder3D`.
struct Encoder {
    conv_in: Conv,
    down: Vec<(Vec<ResnetBlock3D>, Option<Downsample>)>,
    mid: Vec<ResnetBlock3D>,
    norm_out: GroupNorm,
    conv_out: Conv,
}

impl Encoder {
    fn new(cfg: &AutoencoderKLCogVideoXConfig, vb: VarBuilder) -> Result<Self> {
        let ch = &cfg.block_out_channels;
        let (g, eps) = (cfg.norm_num_groups, cfg.norm_eps);
        let k3 = [3, 3, 3];
        let conv_in = Conv::new(vb.pp("conv_in").pp("conv"), cfg.in_channels, ch[0], &k3)?;
        let level = cfg.temporal_compress_level();
        let mut down = Vec::with_capacity(ch.len());
        let mut cin = ch[0];
        for (i, &cout) in ch.iter().enumerate() {
            let vbb = vb.pp("down_blocks").pp(i);
            let resnets = (0..cfg.layers_per_block)
                .map(|l| {
                    let rin = if l == 0 { cin } else { cout };
                    ResnetBlock3D::new(vbb.pp("resnets").pp(l), rin, cout, g, eps, None)
                })
                .collect::<Result<Vec<_>>>()?;
            let ds = if i + 1 < ch.len() {
                Some(Downsample {
                    conv: Conv::new(vbb.pp("downsamplers").pp(0).pp("conv"), cout, cout, &[3, 3])?,
                    compress_time: i < level,
                })
            } else {
                None
            };
            down.push((resnets, ds));
            cin = cout;
        }
        let c = *ch.last().expect("validated non-empty");
        let mid = (0..2)
            .map(|l| ResnetBlock3D::new(vb.pp("mid_block").pp("resnets").pp(l), c, c, g, eps, None))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            conv_in,
            down,
            mid,
            norm_out: GroupNorm::new(vb.pp("norm_out"), c, g, 1e-6)?,
            conv_out: Conv::new(
                vb.pp("conv_out").pp("conv"),
                c,
                2 * cfg.latent_channels,
                &k3,
            )?,
        })
    }

    /// `[B, 3, F, H, W]` -> `[B, 2 * latent, F', h, w]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let calls = call_lengths(x.dim(2)?, SAMPLE_FRAMES_PER_CALL);
        let mut a = Act {
            x: self.conv_in.causal(x)?,
            calls,
        };
        for (resnets, ds) in &self.down {
            for r in resnets {
                a = r.forward(&a, None)?;
            }
            if let Some(d) = ds {
                a = d.forward(&a)?;
            }
        }
        for r in &self.mid {
            a = r.forward(&a, None)?;
        }
        let h = self.norm_out.forward(&a, true)?;
        self.conv_out.causal(&h)
    }
}

/// `CogVideoXDecoder3D`.
struct Decoder {
    conv_in: Conv,
    mid: Vec<ResnetBlock3D>,
    up: Vec<(Vec<ResnetBlock3D>, Option<Upsample>)>,
    norm_out: SpatialNorm3D,
    conv_out: Conv,
}

impl Decoder {
    fn new(cfg: &AutoencoderKLCogVideoXConfig, vb: VarBuilder) -> Result<Self> {
        let rev: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let (g, zc) = (cfg.norm_num_groups, cfg.latent_channels);
        let k3 = [3, 3, 3];
        let conv_in = Conv::new(vb.pp("conv_in").pp("conv"), zc, rev[0], &k3)?;
        let mid = (0..2)
            .map(|l| {
                let vbr = vb.pp("mid_block").pp("resnets").pp(l);
                ResnetBlock3D::new(vbr, rev[0], rev[0], g, 1e-6, Some(zc))
            })
            .collect::<Result<Vec<_>>>()?;
        let level = cfg.temporal_compress_level();
        let mut up = Vec::with_capacity(rev.len());
        let mut cin = rev[0];
        for (i, &cout) in rev.iter().enumerate() {
            let vbb = vb.pp("up_blocks").pp(i);
            let resnets = (0..cfg.layers_per_block + 1)
                .map(|l| {
                    let rin = if l == 0 { cin } else { cout };
                    ResnetBlock3D::new(vbb.pp("resnets").pp(l), rin, cout, g, 1e-6, Some(zc))
                })
                .collect::<Result<Vec<_>>>()?;
            let us = if i + 1 < rev.len() {
                Some(Upsample {
                    conv: Conv::new(vbb.pp("upsamplers").pp(0).pp("conv"), cout, cout, &[3, 3])?,
                    compress_time: i < level,
                })
            } else {
                None
            };
            up.push((resnets, us));
            cin = cout;
        }
        let c = *rev.last().expect("validated non-empty");
        Ok(Self {
            conv_in,
            mid,
            up,
            norm_out: SpatialNorm3D::new(vb.pp("norm_out"), c, zc, g)?,
            conv_out: Conv::new(vb.pp("conv_out").pp("conv"), c, cfg.out_channels, &k3)?,
        })
    }

    /// `[B, latent, F', h, w]` -> `[B, out, F, H, W]`.
    fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let zq = Act {
            x: z.clone(),
            calls: call_lengths(z.dim(2)?, LATENT_FRAMES_PER_CALL),
        };
        let mut a = Act {
            x: self.conv_in.causal(z)?,
            calls: zq.calls.clone(),
        };
        for r in &self.mid {
            a = r.forward(&a, Some(&zq))?;
        }
        for (resnets, us) in &self.up {
            for r in resnets {
                a = r.forward(&a, Some(&zq))?;
            }
            if let Some(u) = us {
                a = u.forward(&a)?;
            }
        }
        let h = self.norm_out.forward_silu(&a, &zq)?;
        self.conv_out.causal(&h)
    }
}

/// Frame counts per call after one temporal downsampling (frame 0 alone in odd calls).
fn pooled_calls(calls: &[usize]) -> Vec<usize> {
    calls.iter().map(|&l| l % 2 + (l - l % 2) / 2).collect()
}

/// Frame counts per call after one temporal upsampling.
fn upsampled_calls(calls: &[usize]) -> Vec<usize> {
    calls
        .iter()
        .map(|&l| if l == 1 { 1 } else { 2 * l - l % 2 })
        .collect()
}

/// Time-compressing down/upsamplers of `cfg`: `min(log2(ratio), levels - 1)`.
fn time_levels(cfg: &AutoencoderKLCogVideoXConfig) -> usize {
    cfg.temporal_compress_level()
        .min(cfg.block_out_channels.len().saturating_sub(1))
}

/// Latent frames `encode` makes of `f` video frames (diffusers' calls and pooling rules).
pub fn latent_frames(cfg: &AutoencoderKLCogVideoXConfig, f: usize) -> usize {
    let mut calls = call_lengths(f, SAMPLE_FRAMES_PER_CALL);
    for _ in 0..time_levels(cfg) {
        calls = pooled_calls(&calls);
    }
    calls.iter().sum()
}

/// Video frames `decode` makes of `fl` latent frames.
pub fn decoded_frames(cfg: &AutoencoderKLCogVideoXConfig, fl: usize) -> usize {
    let mut calls = call_lengths(fl, LATENT_FRAMES_PER_CALL);
    for _ in 0..time_levels(cfg) {
        calls = upsampled_calls(&calls);
    }
    calls.iter().sum()
}

// ------------------------------------------------------------------------------ model

/// The trainable `AutoencoderKLCogVideoX` (encoder and decoder; no quant convs, as CogVideoX).
pub struct TrainVae {
    cfg: AutoencoderKLCogVideoXConfig,
    encoder: Encoder,
    decoder: Decoder,
}

impl TrainVae {
    /// Builds the model from `vb` with diffusers' keys (`encoder.`, `decoder.`); the config is
    /// validated as the inference model does.
    pub fn new(cfg: &AutoencoderKLCogVideoXConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate(std::path::Path::new("<AutoencoderKLCogVideoXConfig>"))
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        Ok(Self {
            cfg: cfg.clone(),
            encoder: Encoder::new(cfg, vb.pp("encoder"))?,
            decoder: Decoder::new(cfg, vb.pp("decoder"))?,
        })
    }

    pub fn config(&self) -> &AutoencoderKLCogVideoXConfig {
        &self.cfg
    }

    /// `x` `[B, 3, F, H, W]` in [-1, 1] -> (mean, logvar), each `[B, latent, F', h, w]`, logvar
    /// clamped to [-30, 20] as diffusers' posterior does.
    pub fn encode(&self, x: &Tensor) -> Result<(Tensor, Tensor)> {
        let (_, c, f, h, w) = x.dims5()?;
        if c != self.cfg.in_channels || f == 0 || h < 2 || w < 2 {
            candle_core::bail!(
                "encode: expected [B, {}, F, H, W] with F >= 1 and H, W >= 2, found {:?}",
                self.cfg.in_channels,
                x.dims()
            );
        }
        let enc = self.encoder.forward(x)?; // [B, 2 * latent, F', h, w]
        let lc = self.cfg.latent_channels;
        let mean = enc.narrow(1, 0, lc)?;
        let logvar = enc.narrow(1, lc, lc)?.clamp(-30f32, 20f32)?;
        Ok((mean, logvar))
    }

    /// `z` `[B, latent, F', h, w]` (unscaled) -> pixels `[B, 3, F, H, W]`, unclamped.
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let (_, c, _, _, _) = z.dims5()?;
        if c != self.cfg.latent_channels {
            candle_core::bail!(
                "decode: expected {} latent channels, found shape {:?}",
                self.cfg.latent_channels,
                z.dims()
            );
        }
        self.decoder.forward(z)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diffops::upsample_nearest2d;
    use crate::gradcheck::check_grad;
    use crate::init::SeededVarMap;
    use std::collections::HashMap;
    use vdit_models::autoencoders::cogvideox_vae::AutoencoderKLCogVideoX;

    fn rnd(shape: &[usize], seed: u64) -> Tensor {
        let mut rng = crate::data::step_rng(seed, "vae-test", 0);
        crate::objective::randn(shape, &mut rng, &Device::Cpu).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
        vdit_core::testing::max_abs_diff(a, b).unwrap()
    }

    /// The op against diffops' conv3d (a sum of candle conv2d) with the padding written out.
    fn reference(x: &Tensor, w: &Tensor, b: &Tensor, op: Conv3dOp) -> Tensor {
        let kt = w.dim(2).unwrap();
        let x = if op.causal && kt > 1 {
            let first = x.narrow(2, 0, 1).unwrap();
            let mut parts = vec![first; kt - 1];
            parts.push(x.clone());
            Tensor::cat(&parts, 2).unwrap()
        } else {
            x.clone()
        };
        let [pt, pb, pl, pr] = op.pad;
        let x = x
            .pad_with_zeros(3, pt, pb)
            .unwrap()
            .pad_with_zeros(4, pl, pr)
            .unwrap();
        crate::diffops::conv3d(&x, w, Some(b), 1, 0, op.stride, 0).unwrap()
    }

    #[test]
    fn conv_op_matches_reference_and_gradients() {
        let cases = [
            (CAUSAL_3X3X3, [2, 3, 5, 6, 5], [4, 3, 3, 3, 3]),
            (CAUSAL_3X3X3, [1, 2, 1, 4, 4], [3, 2, 3, 3, 3]),
            (
                Conv3dOp {
                    causal: false,
                    stride: 2,
                    pad: [0, 1, 0, 1],
                    up: None,
                },
                [2, 3, 3, 7, 6],
                [2, 3, 1, 3, 3],
            ),
            (
                Conv3dOp {
                    causal: false,
                    stride: 1,
                    pad: [1, 1, 1, 1],
                    up: None,
                },
                [1, 2, 2, 4, 6],
                [3, 2, 1, 3, 3],
            ),
        ];
        for (i, (op, xs, ws)) in cases.into_iter().enumerate() {
            let x = rnd(&xs, 10 + i as u64).to_dtype(DType::F64).unwrap();
            let w = rnd(&ws, 20 + i as u64).to_dtype(DType::F64).unwrap();
            let b = rnd(&ws[..1], 30 + i as u64).to_dtype(DType::F64).unwrap();
            let got = conv3d(&x, &w, &b, op.clone()).unwrap();
            let want = reference(&x, &w, &b, op.clone());
            assert_eq!(got.dims(), want.dims(), "case {i}");
            let d = max_diff(&got, &want);
            assert!(d < 1e-12, "case {i}: forward differs by {d}");
            // f32 gives the same numbers to rounding
            let got32 = conv3d(
                &x.to_dtype(DType::F32).unwrap(),
                &w.to_dtype(DType::F32).unwrap(),
                &b.to_dtype(DType::F32).unwrap(),
                op.clone(),
            )
            .unwrap();
            assert!(max_diff(&got32, &want) < 1e-5, "case {i}: f32");
            let r = check_grad(
                |v| conv3d(&v[0], &v[1], &v[2], op.clone()),
                &[x, w, b],
                1e-5,
                1e-6,
            )
            .unwrap_or_else(|e| panic!("case {i}: {e}"));
            eprintln!(
                "conv case {i}: {} elements, max |autograd - fd| {:.2e}",
                r.checked, r.max_abs_err
            );
            assert!(r.max_abs_grad > 1e-3);
        }
        // Upsampling fused through index maps = conv of the materialised upsampled input.
        let x = rnd(&[2, 3, 3, 3, 4], 80).to_dtype(DType::F64).unwrap();
        let w = rnd(&[2, 3, 1, 3, 3], 81).to_dtype(DType::F64).unwrap();
        let b = rnd(&[2], 82).to_dtype(DType::F64).unwrap();
        let tmap = vec![0, 1, 1, 2, 2];
        let op = Conv3dOp {
            causal: false,
            stride: 1,
            pad: [1, 1, 1, 1],
            up: Some(std::sync::Arc::new(UpMaps {
                t: tmap.clone(),
                h: (0..6).map(|i| i / 2).collect(),
                w: (0..8).map(|i| i / 2).collect(),
            })),
        };
        let plain = Conv3dOp {
            up: None,
            ..op.clone()
        };
        let xu = upsample_nearest2d(&select(&x, &tmap, 2).unwrap(), 2, 2).unwrap();
        let d = max_diff(
            &conv3d(&x, &w, &b, op.clone()).unwrap(),
            &reference(&xu, &w, &b, plain),
        );
        assert!(d < 1e-12, "upsampled: {d}");
        let r = check_grad(
            |v| conv3d(&v[0], &v[1], &v[2], op.clone()),
            &[x, w, b],
            1e-5,
            1e-6,
        )
        .unwrap();
        eprintln!(
            "conv with upsampling maps: max |autograd - fd| {:.2e}",
            r.max_abs_err
        );
        // A causal 3-tap conv over a time-upsampled input: taps reading one repeated frame
        // merge (alternating patterns), and the first frames merge through the padding.
        let x = rnd(&[1, 2, 3, 3, 3], 83).to_dtype(DType::F64).unwrap();
        let w = rnd(&[2, 2, 3, 3, 3], 84).to_dtype(DType::F64).unwrap();
        let b = rnd(&[2], 85).to_dtype(DType::F64).unwrap();
        let op = Conv3dOp {
            causal: true,
            stride: 1,
            pad: [1, 1, 1, 1],
            up: Some(std::sync::Arc::new(UpMaps {
                t: tmap.clone(),
                h: (0..3).collect(),
                w: (0..3).collect(),
            })),
        };
        let plain = Conv3dOp {
            up: None,
            ..op.clone()
        };
        let xu = select(&x, &tmap, 2).unwrap();
        let d = max_diff(
            &conv3d(&x, &w, &b, op.clone()).unwrap(),
            &reference(&xu, &w, &b, plain),
        );
        assert!(d < 1e-12, "merged taps: {d}");
        let r = check_grad(
            |v| conv3d(&v[0], &v[1], &v[2], op.clone()),
            &[x, w, b],
            1e-5,
            1e-6,
        )
        .unwrap();
        eprintln!(
            "conv with merged taps: max |autograd - fd| {:.2e}",
            r.max_abs_err
        );
    }

    #[test]
    fn group_norm_op_matches_composite_and_gradients() {
        let x = rnd(&[2, 4, 5, 3, 2], 60)
            .to_dtype(DType::F64)
            .unwrap()
            .affine(2.0, 0.5)
            .unwrap();
        let gamma = rnd(&[4], 61)
            .to_dtype(DType::F64)
            .unwrap()
            .affine(0.3, 1.0)
            .unwrap();
        let beta = rnd(&[4], 62).to_dtype(DType::F64).unwrap();
        for (calls, silu) in [(vec![5], false), (vec![3, 2], true), (vec![1, 4], true)] {
            let op = GroupNormOp {
                groups: 2,
                eps: 1e-6,
                calls: calls.clone(),
                silu,
            };
            let got = group_norm_calls(&x, &gamma, &beta, op.clone()).unwrap();
            // composite: diffops' group_norm on each call's frames
            let mut parts = Vec::new();
            let mut f0 = 0;
            for &l in &calls {
                let xs = x.narrow(2, f0, l).unwrap();
                let y =
                    crate::diffops::group_norm(&xs, 2, Some(&gamma), Some(&beta), 1e-6).unwrap();
                parts.push(if silu { y.silu().unwrap() } else { y });
                f0 += l;
            }
            let want = Tensor::cat(&parts, 2).unwrap();
            let d = max_diff(&got, &want);
            assert!(d < 1e-12, "{calls:?} {silu}: {d}");
            let r = check_grad(
                |v| group_norm_calls(&v[0], &v[1], &v[2], op.clone()),
                &[x.clone(), gamma.clone(), beta.clone()],
                1e-5,
                1e-6,
            )
            .unwrap_or_else(|e| panic!("{calls:?} {silu}: {e}"));
            eprintln!(
                "group norm {calls:?} silu {silu}: max |autograd - fd| {:.2e}",
                r.max_abs_err
            );
        }
    }

    /// Nearest resize of dims 3 and 4 (H, W) to `(h, w)`, as `F.interpolate(mode="nearest")`.
    fn resize_hw(x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
        let (_, _, _, xh, xw) = x.dims5()?;
        if h.is_multiple_of(xh) && w.is_multiple_of(xw) {
            if h == xh && w == xw {
                return Ok(x.clone());
            }
            // integer factors: floor(i / k), a broadcast
            return upsample_nearest2d(x, h / xh, w / xw);
        }
        select(&select(x, &nearest_map(xh, h), 3)?, &nearest_map(xw, w), 4)
    }

    #[test]
    fn spatial_norm_op_matches_composite_and_gradients() {
        let dev = Device::Cpu;
        let f = rnd(&[2, 4, 5, 4, 6], 70).to_dtype(DType::F64).unwrap();
        let gb = rnd(&[8], 71)
            .to_dtype(DType::F64)
            .unwrap()
            .affine(0.3, 0.5)
            .unwrap();
        let yb = rnd(&[2, 8, 3, 2, 3], 72).to_dtype(DType::F64).unwrap();
        let (zc, fc) = (vec![3], vec![5]);
        let op = SpatialNormOp {
            norm: GroupNormOp {
                groups: 2,
                eps: 1e-6,
                calls: fc.clone(),
                silu: true,
            },
            tmap: zq_time_map(&zc, &fc),
            hmap: nearest_map(2, 4),
            wmap: nearest_map(3, 6),
        };
        assert_eq!(op.tmap, [0, 1, 1, 2, 2]);
        let got = spatial_norm(&f, &gb, &yb, op.clone()).unwrap();
        let gn = GroupNormOp {
            groups: 2,
            eps: 1e-6,
            calls: fc.clone(),
            silu: false,
        };
        let n = group_norm_calls(
            &f,
            &gb.narrow(0, 0, 4).unwrap(),
            &gb.narrow(0, 4, 4).unwrap(),
            gn,
        )
        .unwrap();
        let rs = |v: Tensor| {
            resize_hw(
                &select(&v.contiguous().unwrap(), &op.tmap, 2).unwrap(),
                4,
                6,
            )
            .unwrap()
        };
        let y = rs(yb.narrow(1, 0, 4).unwrap());
        let b = rs(yb.narrow(1, 4, 4).unwrap());
        let want = n.mul(&y).unwrap().add(&b).unwrap().silu().unwrap();
        let d = max_diff(&got, &want);
        assert!(d < 1e-12, "{d}");
        let r = check_grad(
            |v| spatial_norm(&v[0], &v[1], &v[2], op.clone()),
            &[f, gb, yb],
            1e-5,
            1e-6,
        )
        .unwrap();
        eprintln!("spatial norm: max |autograd - fd| {:.2e}", r.max_abs_err);
        let _ = dev;
    }

    pub(crate) fn tiny_config() -> AutoencoderKLCogVideoXConfig {
        AutoencoderKLCogVideoXConfig {
            block_out_channels: vec![8, 16, 16],
            down_block_types: vec!["CogVideoXDownBlock3D".into(); 3],
            up_block_types: vec!["CogVideoXUpBlock3D".into(); 3],
            latent_channels: 4,
            layers_per_block: 1,
            norm_num_groups: 4,
            sample_height: 64,
            sample_width: 64,
            ..Default::default()
        }
    }

    /// A seeded model whose every var is perturbed away from its initial value (norm scales
    /// around 1, biases random), so the parity check exercises every parameter.
    pub(crate) fn random_model(
        cfg: &AutoencoderKLCogVideoXConfig,
        seed: u64,
    ) -> (TrainVae, HashMap<String, Tensor>) {
        let vars = SeededVarMap::new(seed);
        let model = TrainVae::new(cfg, vars.var_builder(DType::F32, &Device::Cpu)).unwrap();
        let mut map = HashMap::new();
        for (i, (name, v)) in vars.vars().into_iter().enumerate() {
            let noise = rnd(v.dims(), 1000 + i as u64);
            let t = if v.rank() == 1 {
                (v.as_tensor() + (noise * 0.2).unwrap()).unwrap()
            } else {
                v.as_tensor().copy().unwrap()
            }
            .detach();
            v.set(&t).unwrap();
            map.insert(name, t);
        }
        (model, map)
    }

    /// The whole model's gradient against a central difference along a random direction of
    /// every parameter (f64): dL/dε of L(θ + ε·d) at 0 must equal Σ ∇L·d.
    #[test]
    fn whole_model_gradient_matches_finite_differences() {
        let cfg = tiny_config();
        let vars = SeededVarMap::new(5);
        let model = TrainVae::new(&cfg, vars.var_builder(DType::F64, &Device::Cpu)).unwrap();
        let all = vars.vars();
        for (i, (_, v)) in all.iter().enumerate() {
            if v.rank() == 1 {
                let noise = rnd(v.dims(), 300 + i as u64).to_dtype(DType::F64).unwrap();
                v.set(&(v.as_tensor() + (noise * 0.2).unwrap()).unwrap().detach())
                    .unwrap();
            }
        }
        for (f, seed) in [(9, 90u64), (17, 91)] {
            let x = rnd(&[1, 3, f, 16, 16], seed)
                .to_dtype(DType::F64)
                .unwrap()
                .tanh()
                .unwrap();
            let z0 = rnd(&[1, 4, (f - 1) / 4 + 1, 4, 4], seed + 10)
                .to_dtype(DType::F64)
                .unwrap();
            let r = rnd(&[1, 3, f, 16, 16], seed + 20)
                .to_dtype(DType::F64)
                .unwrap();
            let loss = || -> Tensor {
                let (mean, logvar) = model.encode(&x).unwrap();
                let z = (mean + (logvar * 0.5).unwrap().exp().unwrap().mul(&z0).unwrap()).unwrap();
                model
                    .decode(&z)
                    .unwrap()
                    .mul(&r)
                    .unwrap()
                    .sum_all()
                    .unwrap()
            };
            let grads = loss().backward().unwrap();
            let dirs: Vec<Tensor> = all
                .iter()
                .enumerate()
                .map(|(i, (_, v))| rnd(v.dims(), 500 + i as u64).to_dtype(DType::F64).unwrap())
                .collect();
            let mut analytic = 0f64;
            for ((_, v), d) in all.iter().zip(&dirs) {
                let g = grads.get(v.as_tensor()).expect("every var gets a gradient");
                analytic += g
                    .mul(d)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f64>()
                    .unwrap();
            }
            let base: Vec<Tensor> = all
                .iter()
                .map(|(_, v)| v.as_tensor().copy().unwrap())
                .collect();
            let at = |e: f64| -> f64 {
                for (((_, v), d), b) in all.iter().zip(&dirs).zip(&base) {
                    v.set(&(b + (d * e).unwrap()).unwrap()).unwrap();
                }
                loss().to_scalar::<f64>().unwrap()
            };
            // central differences at 2ε and ε, Richardson-extrapolated (the ε² terms cancel:
            // exp(logvar / 2) makes the loss strongly curved along random directions)
            let eps = 2e-6;
            let n1 = (at(2.0 * eps) - at(-2.0 * eps)) / (4.0 * eps);
            let n2 = (at(eps) - at(-eps)) / (2.0 * eps);
            let numeric = (4.0 * n2 - n1) / 3.0;
            at(0.0);
            let rel = (analytic - numeric).abs() / numeric.abs().max(1e-12);
            eprintln!("{f} frames: directional derivative {analytic:.9e} vs {numeric:.9e} (rel {rel:.1e})");
            assert!(rel < 1e-6, "{f} frames: {analytic} vs {numeric}");
        }
    }

    #[test]
    fn matches_the_inference_model() {
        let cfg = tiny_config();
        let (model, map) = random_model(&cfg, 3);
        let dev = Device::Cpu;
        let vb = VarBuilder::from_tensors(map, DType::F32, &dev);
        let mut inf = AutoencoderKLCogVideoX::new(cfg.clone(), vb).unwrap();
        inf.set_tiling(false);
        for (i, (f, h, w)) in [(1, 16, 24), (9, 16, 16), (17, 24, 16)]
            .into_iter()
            .enumerate()
        {
            let x = rnd(&[2, 3, f, h, w], 40 + i as u64).tanh().unwrap();
            let (mean, logvar) = model.encode(&x).unwrap();
            let post = inf.encode_plain(&x).unwrap();
            let dm = max_diff(&mean, &post.mean);
            let dl = max_diff(&logvar, &post.logvar);
            let fl = (f - 1) / 4 + 1;
            assert_eq!(mean.dims(), &[2, 4, fl, h / 4, w / 4]);
            let z = rnd(mean.dims(), 50 + i as u64);
            let dec = model.decode(&z).unwrap();
            let want = inf.decode_plain(&z).unwrap();
            assert_eq!(dec.dims(), &[2, 3, f, h, w]);
            assert_eq!(latent_frames(&cfg, f), fl);
            assert_eq!(decoded_frames(&cfg, fl), f);
            let dd = max_diff(&dec, &want);
            eprintln!("{f} frames: mean {dm:.2e}, logvar {dl:.2e}, decode {dd:.2e}");
            assert!(
                dm < 1e-4 && dl < 1e-4 && dd < 1e-4,
                "{f} frames: {dm} {dl} {dd}"
            );
        }
    }
}

/// Component timings (`cargo test --release -p vdit-train bench_vae_parts -- --ignored
/// --nocapture`).
#[cfg(test)]
mod bench {
    use super::*;
    use candle_core::Var;
    use std::time::Instant;

    fn time<R>(what: &str, reps: usize, mut f: impl FnMut() -> R) -> f64 {
        let mut best = f64::INFINITY;
        for _ in 0..reps {
            let t0 = Instant::now();
            let r = f();
            best = best.min(t0.elapsed().as_secs_f64());
            drop(r);
        }
        eprintln!("{what}: {:.1} ms", best * 1e3);
        best
    }

    #[test]
    #[ignore]
    fn bench_vae_parts() {
        let dev = Device::Cpu;
        for (b, c, o, t) in [
            (8, 32, 32, 1),
            (1, 32, 32, 17),
            (1, 64, 32, 17),
            (1, 64, 64, 9),
        ] {
            let (h, w) = if t == 9 { (32, 32) } else { (64, 64) };
            let x =
                Var::from_tensor(&Tensor::randn(0f32, 1., (b, c, t, h, w), &dev).unwrap()).unwrap();
            let wv = Var::from_tensor(
                &(Tensor::randn(0f32, 1., (o, c, 3, 3, 3), &dev).unwrap() * 0.05).unwrap(),
            )
            .unwrap();
            let bv = Var::from_tensor(&Tensor::zeros(o, DType::F32, &dev).unwrap()).unwrap();
            let flops = 2.0 * (b * o * t * h * w * c * 27) as f64;
            eprintln!(
                "-- x [{b}, {c}, {t}, {h}, {w}] -> {o} ch ({:.2} GFLOP fwd)",
                flops * 1e-9
            );
            let f = time("conv fwd", 3, || {
                conv3d(x.as_tensor(), wv.as_tensor(), bv.as_tensor(), CAUSAL_3X3X3).unwrap()
            });
            eprintln!("   {:.1} GFLOP/s", flops / f * 1e-9);
            let fb = time("conv fwd+bwd", 3, || {
                conv3d(x.as_tensor(), wv.as_tensor(), bv.as_tensor(), CAUSAL_3X3X3)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap()
            });
            eprintln!("   {:.1} GFLOP/s", 3.0 * flops / fb * 1e-9);
            let gw = Var::from_tensor(&Tensor::ones(c, DType::F32, &dev).unwrap()).unwrap();
            let gb = Var::from_tensor(&Tensor::zeros(c, DType::F32, &dev).unwrap()).unwrap();
            let gn = GroupNormOp {
                groups: 8,
                eps: 1e-6,
                calls: vec![t],
                silu: true,
            };
            time("group_norm+silu fwd", 3, || {
                group_norm_calls(x.as_tensor(), gw.as_tensor(), gb.as_tensor(), gn.clone()).unwrap()
            });
            time("group_norm+silu fwd+bwd", 3, || {
                group_norm_calls(x.as_tensor(), gw.as_tensor(), gb.as_tensor(), gn.clone())
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap()
            });
        }
    }
}
