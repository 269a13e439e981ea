//! Multi-head attention kernels on token-major tensors `[B, S, H·dh]` (the layout a `Linear`
//! produces; no head transposes are ever materialised).
//!
//! - [`sdpa`]: `softmax(q·kᵀ·scale)·v` per head, no mask (torch's `scaled_dot_product_attention`).
//! - [`head_norm_rope`]: per-head LayerNorm of q or k (weights `[dh]` shared by the heads) and
//!   RoPE on the rows from `rope_offset` on (CogVideoX's video tokens).
//!
//! f32 CPU path of [`sdpa`]: work is split into tasks of one (batch, head, block of up to 256
//! query rows); each task computes its `rows × Sk` score block with gemm straight from the
//! strided q/k data, exponentiates it in place (row max subtracted, vectorised exp), multiplies
//! by v with gemm straight into the output rows, then divides those `dh`-wide rows by the sums.
//! Memory: one score block per thread (at most 4 M floats; 4.6 MB at Sk = 4516), never the
//! `H × S × S` matrix. Elsewhere (CUDA, f16/bf16) the candle form runs, chunked over heads.
//! (A key-blocked, online-softmax variant keeping the score tile in L2 measured no faster here.)
//!
//! Neither fast path records gradients; training needs the candle forms (`sdpa_candle`,
//! `head_norm_rope_candle`), which are matmul + `ops::softmax` + matmul and plain ops.
#![allow(unsafe_code)]

use super::cpu::{self, F32View, SendPtr};
use super::norm::LayerNorm;
use super::rope::apply_rope_candle;
use candle_core::{Result, Tensor, D};
use rayon::prelude::*;

/// Query rows per task: up to 256 (measured best at Sk = 4516 among 32..512), fewer for very
/// long sequences so that a score block stays within 4 M floats (16 MB) per thread.
fn q_block(sk: usize) -> usize {
    ((1usize << 22) / sk.max(1) / 16 * 16).clamp(16, 256)
}

/// Scaled dot-product attention: `q [B, Sq, H·dh]`, `k, v [B, Sk, H·dh]` → `[B, Sq, H·dh]`.
pub fn sdpa(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f32) -> Result<Tensor> {
    let (b, sq, d) = q.dims3()?;
    let (bk, sk, dk) = k.dims3()?;
    if heads == 0 || !d.is_multiple_of(heads) || k.dims() != v.dims() || bk != b || dk != d {
        candle_core::bail!(
            "attention: q {:?}, k {:?}, v {:?} do not fit {heads} heads",
            q.dims(),
            k.dims(),
            v.dims()
        )
    }
    if ![q, k, v].iter().all(|t| cpu::is_cpu_f32(t)) || sk == 0 {
        return sdpa_candle(q, k, v, heads, scale);
    }
    let dh = d / heads;
    let (q, k, v) = (q.contiguous()?, k.contiguous()?, v.contiguous()?);
    let mut out = cpu::zeroed(b * sq * d);
    {
        let (qv, kv, vv) = (F32View::new(&q)?, F32View::new(&k)?, F32View::new(&v)?);
        let (qs, ks, vs) = (qv.slice(), kv.slice(), vv.slice());
        let qblk = q_block(sk);
        let blocks = sq.div_ceil(qblk);
        let tasks = b * heads * blocks;
        let optr = SendPtr(out.as_mut_ptr());
        let ds = d as isize;
        (0..tasks).into_par_iter().for_each_init(
            || (cpu::zeroed(qblk * sk), vec![0f32; qblk]),
            |(scores, sums), task| {
                let bi = task / (heads * blocks);
                let h = (task / blocks) % heads;
                let i0 = (task % blocks) * qblk;
                let rows = qblk.min(sq - i0);
                let q0 = (bi * sq + i0) * d + h * dh;
                let kv0 = bi * sk * d + h * dh;
                let o = optr;
                // SAFETY: scores is rows×sk (row stride sk). q: rows×dh at q0 with row stride d,
                // inside qs (row bi·sq+i0+rows−1 < b·sq). kᵀ: dh×sk, element (c, j) at
                // kv0 + j·d + c < b·sk·d. v: sk×dh at kv0, row stride d. The output block
                // (rows i0.., columns h·dh..h·dh+dh of batch bi) belongs to this task alone, so
                // the writes through the shared pointer never overlap another task's.
                unsafe {
                    cpu::sgemm(
                        rows,
                        sk,
                        dh,
                        scores.as_mut_ptr(),
                        (sk as isize, 1),
                        false,
                        qs.as_ptr().add(q0),
                        (ds, 1),
                        ks.as_ptr().add(kv0),
                        (1, ds),
                        1,
                    );
                }
                cpu::softmax_unnormalised(&mut scores[..rows * sk], sk, scale, &mut sums[..rows]);
                // SAFETY: as above; the destination block starts at q0 in `out`, which has the
                // same layout as q.
                unsafe {
                    let dst = o.0.add(q0);
                    cpu::sgemm(
                        rows,
                        dh,
                        sk,
                        dst,
                        (ds, 1),
                        false,
                        scores.as_ptr(),
                        (sk as isize, 1),
                        vs.as_ptr().add(kv0),
                        (ds, 1),
                        1,
                    );
                    for (r, &s) in sums[..rows].iter().enumerate() {
                        let inv = 1.0 / s;
                        let row = std::slice::from_raw_parts_mut(dst.add(r * d), dh);
                        for x in row {
                            *x *= inv;
                        }
                    }
                }
            },
        );
    }
    Tensor::from_vec(out, (b, sq, d), q.device())
}

/// Candle form of [`sdpa`] (any device and dtype; differentiable), chunked over heads so that
/// at most ~64 M scores exist at once.
pub fn sdpa_candle(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, scale: f32) -> Result<Tensor> {
    let (b, sq, d) = q.dims3()?;
    let sk = k.dim(1)?;
    let dh = d / heads;
    let split = |t: &Tensor, s: usize| -> Result<Tensor> {
        t.reshape((b, s, heads, dh))?.transpose(1, 2) // [B, H, S, dh]
    };
    let (qh, kh, vh) = (split(q, sq)?, split(k, sk)?, split(v, sk)?);
    let per_head = (b * sq * sk).max(1);
    let chunk = ((1usize << 26) / per_head).clamp(1, heads);
    let mut outs = Vec::new();
    let mut h0 = 0;
    while h0 < heads {
        let n = chunk.min(heads - h0);
        let qc = qh.narrow(1, h0, n)?.contiguous()?;
        let kc = kh.narrow(1, h0, n)?.contiguous()?;
        let vc = vh.narrow(1, h0, n)?.contiguous()?;
        let s = (qc.matmul(&kc.t()?)? * scale as f64)?; // [B, n, Sq, Sk]
        let p = candle_nn::ops::softmax(&s, D::Minus1)?;
        outs.push(p.matmul(&vc)?); // [B, n, Sq, dh]
        h0 += n;
    }
    Tensor::cat(&outs, 1)?.transpose(1, 2)?.reshape((b, sq, d)) // [B, Sq, H·dh]
}

/// Per-head LayerNorm of `x [B, S, H·dh]` with `norm` over `dh`, then, when `rope = (cos, sin)`
/// (`[N, dh]` each), RoPE on rows `rope_offset .. rope_offset + N` (row `rope_offset + i` uses
/// table row `i`). Returns a new `[B, S, H·dh]` tensor.
pub fn head_norm_rope(
    x: &Tensor,
    norm: &LayerNorm,
    heads: usize,
    rope: Option<(&Tensor, &Tensor)>,
    rope_offset: usize,
) -> Result<Tensor> {
    let (b, s, d) = x.dims3()?;
    let dh = norm.dim();
    if heads * dh != d {
        candle_core::bail!(
            "head norm over {dh} features with {heads} heads got input {:?}",
            x.dims()
        )
    }
    if let Some((c, sn)) = rope {
        let n = s.saturating_sub(rope_offset);
        if c.dims() != [n, dh] || sn.dims() != [n, dh] {
            candle_core::bail!(
                "rotary embedding: cos {:?} / sin {:?}, expected [{n}, {dh}] ({n} video tokens, head_dim {dh})",
                c.dims(),
                sn.dims()
            )
        }
    }
    let rope_fast = rope.is_none_or(|(c, s)| cpu::is_cpu_f32(c) && cpu::is_cpu_f32(s));
    if !(cpu::is_cpu_f32(x) && rope_fast) {
        return head_norm_rope_candle(x, norm, heads, rope, rope_offset);
    }
    let params_fast = norm
        .weight()
        .iter()
        .chain(&norm.bias())
        .all(|t| cpu::is_cpu_f32(t));
    if !params_fast {
        return head_norm_rope_candle(x, norm, heads, rope, rope_offset);
    }
    let x = x.contiguous()?;
    let w = norm.weight().map(|t| t.contiguous()).transpose()?;
    let bias = norm.bias().map(|t| t.contiguous()).transpose()?;
    let rope = rope
        .map(|(c, s)| -> Result<_> { Ok((c.contiguous()?, s.contiguous()?)) })
        .transpose()?;
    let mut out = cpu::zeroed(b * s * d);
    {
        let xv = F32View::new(&x)?;
        let (wv, bv) = (
            w.as_ref().map(F32View::new).transpose()?,
            bias.as_ref().map(F32View::new).transpose()?,
        );
        let rv = rope
            .as_ref()
            .map(|(c, s)| -> Result<_> { Ok((F32View::new(c)?, F32View::new(s)?)) })
            .transpose()?;
        let (xs, ws, bs) = (
            xv.slice(),
            wv.as_ref().map(|v| v.slice()),
            bv.as_ref().map(|v| v.slice()),
        );
        let tables = rv.as_ref().map(|(c, s)| (c.slice(), s.slice()));
        let eps = norm.eps() as f32;
        out.par_chunks_mut(d).enumerate().for_each(|(g, row)| {
            // the H heads of one token: H rows of dh
            cpu::layer_norm_rows(&xs[g * d..(g + 1) * d], row, dh, eps, ws, bs, None);
            let si = g % s;
            let Some((cs, ss)) = tables else { return };
            if si < rope_offset {
                return;
            }
            let t = si - rope_offset;
            let (c, sn) = (&cs[t * dh..(t + 1) * dh], &ss[t * dh..(t + 1) * dh]);
            for head in row.chunks_exact_mut(dh) {
                for i in (0..dh).step_by(2) {
                    let (x0, x1) = (head[i], head[i + 1]);
                    head[i] = x0 * c[i] - x1 * sn[i];
                    head[i + 1] = x1 * c[i + 1] + x0 * sn[i + 1];
                }
            }
        });
    }
    Tensor::from_vec(out, (b, s, d), x.device())
}

/// Candle form of [`head_norm_rope`].
pub fn head_norm_rope_candle(
    x: &Tensor,
    norm: &LayerNorm,
    heads: usize,
    rope: Option<(&Tensor, &Tensor)>,
    rope_offset: usize,
) -> Result<Tensor> {
    let (b, s, d) = x.dims3()?;
    let dh = d / heads;
    let y = norm.forward_candle(&x.reshape((b, s, heads, dh))?)?; // [B, S, H, dh]
    let y = match rope {
        None => y,
        Some((cos, sin)) => {
            let n = s - rope_offset;
            let rotated = apply_rope_candle(&y.narrow(1, rope_offset, n)?, cos, sin)?;
            if rope_offset == 0 {
                rotated
            } else {
                Tensor::cat(&[y.narrow(1, 0, rope_offset)?, rotated], 1)?
            }
        }
    };
    y.reshape((b, s, d))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};
    use candle_nn::{VarBuilder, VarMap};

    fn maxdiff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn sdpa_matches_the_candle_form() -> Result<()> {
        let dev = Device::Cpu;
        // Sq = 600 spans three query blocks (256, 256, 88); Sk is not always a multiple of 16.
        for (b, sq, sk, heads, dh) in [
            (2, 150, 150, 3, 16),
            (1, 600, 150, 2, 16),
            (1, 70, 37, 2, 8),
            (1, 1, 5, 1, 4),
        ] {
            let q = Tensor::randn(0f32, 1.0, (b, sq, heads * dh), &dev)?;
            let k = Tensor::randn(0f32, 1.0, (b, sk, heads * dh), &dev)?;
            let v = Tensor::randn(0f32, 1.0, (b, sk, heads * dh), &dev)?;
            let scale = 1.0 / (dh as f32).sqrt();
            let fast = sdpa(&q, &k, &v, heads, scale)?;
            let slow = sdpa_candle(&q, &k, &v, heads, scale)?;
            assert_eq!(fast.dims(), &[b, sq, heads * dh]);
            let dmax = maxdiff(&fast, &slow);
            assert!(dmax < 2e-6, "{b} {sq} {sk} {heads} {dh}: {dmax}");
        }
        Ok(())
    }

    #[test]
    fn head_norm_rope_matches_the_candle_form() -> Result<()> {
        let dev = Device::Cpu;
        let (b, s, heads, dh, off) = (2, 11, 3, 8, 4);
        let vm = VarMap::new();
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &dev);
        let _ = vb.get_with_hints(
            dh,
            "n.weight",
            candle_nn::Init::Randn {
                mean: 1.0,
                stdev: 0.2,
            },
        )?;
        let _ = vb.get_with_hints(
            dh,
            "n.bias",
            candle_nn::Init::Randn {
                mean: 0.0,
                stdev: 0.2,
            },
        )?;
        let norm = LayerNorm::new(dh, 1e-6, true, vb.pp("n"))?;
        let x = Tensor::randn(0f32, 1.0, (b, s, heads * dh), &dev)?;
        let cos = Tensor::randn(0f32, 1.0, (s - off, dh), &dev)?;
        let sin = Tensor::randn(0f32, 1.0, (s - off, dh), &dev)?;
        for rope in [None, Some((&cos, &sin))] {
            let fast = head_norm_rope(&x, &norm, heads, rope, off)?;
            let slow = head_norm_rope_candle(&x, &norm, heads, rope, off)?;
            assert!(maxdiff(&fast, &slow) < 1e-5);
        }
        assert!(head_norm_rope(&x, &norm, heads, Some((&cos, &cos)), off + 1).is_err());
        Ok(())
    }
}
