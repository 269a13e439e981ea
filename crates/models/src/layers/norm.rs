//! LayerNorm (torch's `nn.LayerNorm` over the last dimension), with the adaptive modulation and
//! gated residual of adaLN-style blocks fused in, for one sequence whose rows fall in two spans
//! (CogVideoX's joint `[text; video]` sequence, each span with its own shift/scale/gate).
//!
//! f32 CPU tensors use one pass per row (statistics, affine, modulation) spread over threads;
//! elsewhere the candle form (f32 statistics, differentiable) runs.

use super::cpu::{self, F32View, Modulate};
use candle_core::{DType, Result, Tensor, D};
use candle_nn::VarBuilder;
use rayon::prelude::*;

/// Rows per parallel task.
const ROW_BLOCK: usize = 32;

#[derive(Debug, Clone)]
pub struct LayerNorm {
    /// `[d]` when elementwise-affine.
    weight: Option<Tensor>,
    bias: Option<Tensor>,
    dim: usize,
    eps: f64,
}

/// `y·(1 + scale) + shift` with `shift`, `scale` of shape `[B, d]`.
#[derive(Debug, Clone, Copy)]
pub struct Modulation<'a> {
    pub shift: &'a Tensor,
    pub scale: &'a Tensor,
}

impl LayerNorm {
    /// torch's `nn.LayerNorm(dim, eps, elementwise_affine=affine)`: `weight`, `bias` of `[dim]`.
    pub fn new(dim: usize, eps: f64, affine: bool, vb: VarBuilder) -> Result<Self> {
        let (weight, bias) = if affine {
            (Some(vb.get(dim, "weight")?), Some(vb.get(dim, "bias")?))
        } else {
            (None, None)
        };
        Ok(Self {
            weight,
            bias,
            dim,
            eps,
        })
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    pub fn weight(&self) -> Option<&Tensor> {
        self.weight.as_ref()
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    pub fn eps(&self) -> f64 {
        self.eps
    }

    /// Plain LayerNorm over the last dimension.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let n = x.dims().len();
        if n < 2 {
            return self.forward_candle(x);
        }
        let rows = x.dims()[n - 2];
        let x3 = x.reshape(((), rows, self.dim))?; // [B', S, d]
        self.forward_joint(&x3, 0, None, None)?.reshape(x.dims())
    }

    /// `x [B, S, d]`: rows `< split` are modulated by `first`, the others by `rest` (each
    /// `None` for no modulation).
    pub fn forward_joint(
        &self,
        x: &Tensor,
        split: usize,
        first: Option<Modulation<'_>>,
        rest: Option<Modulation<'_>>,
    ) -> Result<Tensor> {
        let (b, s, d) = x.dims3()?;
        if d != self.dim {
            candle_core::bail!(
                "layer norm over {} features got input of shape {:?}",
                self.dim,
                x.dims()
            )
        }
        let split = split.min(s);
        for m in [first, rest].into_iter().flatten() {
            for t in [m.shift, m.scale] {
                if t.dims() != [b, d] {
                    candle_core::bail!("modulation of shape {:?}, expected [{b}, {d}]", t.dims())
                }
            }
        }
        let fast = cpu::is_cpu_f32(x)
            && self.weight.iter().chain(&self.bias).all(cpu::is_cpu_f32)
            && [first, rest]
                .iter()
                .flatten()
                .all(|m| cpu::is_cpu_f32(m.shift) && cpu::is_cpu_f32(m.scale));
        if !fast {
            return self.forward_joint_candle(x, split, first, rest);
        }
        let x = x.contiguous()?;
        let mut out = cpu::zeroed(b * s * d);
        {
            let xv = F32View::new(&x)?;
            let w = self.weight.as_ref().map(|t| t.contiguous()).transpose()?;
            let bias = self.bias.as_ref().map(|t| t.contiguous()).transpose()?;
            let wv = w.as_ref().map(F32View::new).transpose()?;
            let bv = bias.as_ref().map(F32View::new).transpose()?;
            // [B, d] each: 1 + scale and shift, per span
            let prep = |m: Option<Modulation<'_>>| -> Result<Option<(Vec<f32>, Vec<f32>)>> {
                m.map(|m| -> Result<_> {
                    let sc = (m.scale.contiguous()? + 1.0)?
                        .flatten_all()?
                        .to_vec1::<f32>()?;
                    let sh = m.shift.contiguous()?.flatten_all()?.to_vec1::<f32>()?;
                    Ok((sc, sh))
                })
                .transpose()
            };
            let (mf, mr) = (prep(first)?, prep(rest)?);
            let xs = xv.slice();
            let eps = self.eps as f32;
            let (ws, bs) = (
                wv.as_ref().map(|v| v.slice()),
                bv.as_ref().map(|v| v.slice()),
            );
            out.par_chunks_mut(ROW_BLOCK * d)
                .enumerate()
                .for_each(|(blk, o)| {
                    let r0 = blk * ROW_BLOCK; // global row over B·S
                    let nrows = o.len() / d;
                    let mut r = 0;
                    while r < nrows {
                        let g = r0 + r;
                        let (bi, si) = (g / s, g % s);
                        // run of rows in one batch item and one span
                        let span_end = if si < split { split } else { s };
                        let run = (span_end - si).min(nrows - r);
                        let m = if si < split { &mf } else { &mr };
                        let m = m.as_ref().map(|(sc, sh)| Modulate {
                            one_plus_scale: &sc[bi * d..(bi + 1) * d],
                            shift: &sh[bi * d..(bi + 1) * d],
                        });
                        cpu::layer_norm_rows(
                            &xs[g * d..(g + run) * d],
                            &mut o[r * d..(r + run) * d],
                            d,
                            eps,
                            ws,
                            bs,
                            m,
                        );
                        r += run;
                    }
                });
        }
        Tensor::from_vec(out, (b, s, d), x.device())
    }

    /// Candle form of [`Self::forward`] (statistics in f32; differentiable).
    pub fn forward_candle(&self, x: &Tensor) -> Result<Tensor> {
        let dt = x.dtype();
        let xf = x.to_dtype(DType::F32)?;
        let mean = xf.mean_keepdim(D::Minus1)?;
        let xc = xf.broadcast_sub(&mean)?;
        let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
        let mut y = xc.broadcast_div(&(var + self.eps)?.sqrt()?)?;
        if let Some(w) = &self.weight {
            y = y.broadcast_mul(&w.to_dtype(DType::F32)?)?;
        }
        if let Some(b) = &self.bias {
            y = y.broadcast_add(&b.to_dtype(DType::F32)?)?;
        }
        y.to_dtype(dt)
    }

    /// Candle form of [`Self::forward_joint`].
    pub fn forward_joint_candle(
        &self,
        x: &Tensor,
        split: usize,
        first: Option<Modulation<'_>>,
        rest: Option<Modulation<'_>>,
    ) -> Result<Tensor> {
        let s = x.dim(1)?;
        let y = self.forward_candle(x)?;
        let modulate = |y: Tensor, m: Option<Modulation<'_>>| -> Result<Tensor> {
            match m {
                None => Ok(y),
                Some(m) => y
                    .broadcast_mul(&(m.scale.unsqueeze(1)? + 1.0)?)?
                    .broadcast_add(&m.shift.unsqueeze(1)?),
            }
        };
        if split == 0 {
            return modulate(y, rest);
        }
        if split >= s {
            return modulate(y, first);
        }
        let a = modulate(y.narrow(1, 0, split)?, first)?;
        let b = modulate(y.narrow(1, split, s - split)?, rest)?;
        Tensor::cat(&[a, b], 1)
    }
}

/// `x + gate·y` for `x, y [B, S, d]`, with `gate_first [B, d]` on rows `< split` and
/// `gate_rest [B, d]` on the others.
pub fn gated_residual(
    x: &Tensor,
    y: &Tensor,
    split: usize,
    gate_first: &Tensor,
    gate_rest: &Tensor,
) -> Result<Tensor> {
    let (b, s, d) = x.dims3()?;
    if y.dims() != x.dims() || gate_first.dims() != [b, d] || gate_rest.dims() != [b, d] {
        candle_core::bail!(
            "gated residual: x {:?}, y {:?}, gates {:?} {:?}",
            x.dims(),
            y.dims(),
            gate_first.dims(),
            gate_rest.dims()
        )
    }
    let split = split.min(s);
    if ![x, y, gate_first, gate_rest]
        .iter()
        .all(|t| cpu::is_cpu_f32(t))
    {
        let part = |start: usize, len: usize, g: &Tensor| -> Result<Tensor> {
            x.narrow(1, start, len)?
                .add(&y.narrow(1, start, len)?.broadcast_mul(&g.unsqueeze(1)?)?)
        };
        return match split {
            0 => part(0, s, gate_rest),
            sp if sp == s => part(0, s, gate_first),
            sp => Tensor::cat(&[part(0, sp, gate_first)?, part(sp, s - sp, gate_rest)?], 1),
        };
    }
    let (x, y) = (x.contiguous()?, y.contiguous()?);
    let (gf, gr) = (gate_first.contiguous()?, gate_rest.contiguous()?);
    let mut out = cpu::zeroed(b * s * d);
    {
        let (xv, yv, gfv, grv) = (
            F32View::new(&x)?,
            F32View::new(&y)?,
            F32View::new(&gf)?,
            F32View::new(&gr)?,
        );
        let (xs, ys, gfs, grs) = (xv.slice(), yv.slice(), gfv.slice(), grv.slice());
        out.par_chunks_mut(ROW_BLOCK * d)
            .enumerate()
            .for_each(|(blk, o)| {
                for (r, orow) in o.chunks_exact_mut(d).enumerate() {
                    let g = blk * ROW_BLOCK + r;
                    let (bi, si) = (g / s, g % s);
                    let gate = if si < split {
                        &gfs[bi * d..(bi + 1) * d]
                    } else {
                        &grs[bi * d..(bi + 1) * d]
                    };
                    let (xr, yr) = (&xs[g * d..(g + 1) * d], &ys[g * d..(g + 1) * d]);
                    for (((o, &xv), &yv), &gv) in orow.iter_mut().zip(xr).zip(yr).zip(gate) {
                        *o = xv + gv * yv;
                    }
                }
            });
    }
    Tensor::from_vec(out, (b, s, d), x.device())
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

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
    fn fused_paths_match_candle_forms() -> Result<()> {
        let dev = Device::Cpu;
        let (b, s, d) = (2, 45, 40);
        let x = (Tensor::randn(0f32, 2.0, (b, s, d), &dev)? + 0.5)?;
        let ln = LayerNorm {
            weight: Some(Tensor::randn(1f32, 0.1, d, &dev)?),
            bias: Some(Tensor::randn(0f32, 0.1, d, &dev)?),
            dim: d,
            eps: 1e-5,
        };
        let m = |seed: f32| -> Result<(Tensor, Tensor)> {
            Ok((
                Tensor::randn(seed, 0.3, (b, d), &dev)?,
                Tensor::randn(-seed, 0.3, (b, d), &dev)?,
            ))
        };
        let (s1, c1) = m(0.1)?;
        let (s2, c2) = m(0.2)?;
        for split in [0, 7, 33, 45] {
            let f = Some(Modulation {
                shift: &s1,
                scale: &c1,
            });
            let r = Some(Modulation {
                shift: &s2,
                scale: &c2,
            });
            let fast = ln.forward_joint(&x, split, f, r)?;
            let slow = ln.forward_joint_candle(&x, split, f, r)?;
            assert!(maxdiff(&fast, &slow) < 1e-5, "split {split}");
            let fast = gated_residual(&x, &fast, split, &s1, &c2)?;
            let slow = gated_residual(
                &x.to_dtype(DType::F64)?,
                &slow.to_dtype(DType::F64)?,
                split,
                &s1.to_dtype(DType::F64)?,
                &c2.to_dtype(DType::F64)?,
            )?;
            assert!(
                maxdiff(&fast, &slow.to_dtype(DType::F32)?) < 1e-5,
                "gated, split {split}"
            );
        }
        let plain = ln.forward(&x)?;
        assert!(maxdiff(&plain, &ln.forward_candle(&x)?) < 1e-5);
        Ok(())
    }
}
