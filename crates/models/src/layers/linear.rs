//! `y = x·Wᵀ + b` (torch's `nn.Linear`, weight `[out, in]`), optionally followed by GELU.
//!
//! On f32 CPU tensors the product goes straight to gemm with the bias preloaded into the output
//! (no separate broadcast-add pass) and GELU applied in place in parallel. Elsewhere (CUDA,
//! f16/bf16) it is candle's `broadcast_matmul` + `broadcast_add` + `gelu`, which is also the
//! differentiable form training will need (the fast path records no gradient).
#![allow(unsafe_code)]

use super::cpu::{self, F32View};
use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;
use rayon::prelude::*;

/// What follows the affine map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activation {
    None,
    /// GELU with the tanh approximation (torch's `gelu(approximate="tanh")`).
    GeluTanh,
}

#[derive(Debug, Clone)]
pub struct Linear {
    /// `[out, in]`
    weight: Tensor,
    /// `[out]`
    bias: Option<Tensor>,
}

impl Linear {
    /// Loads `weight` `[out, in]` and, with `bias`, `bias` `[out]` under `vb`.
    pub fn new(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = if bias {
            Some(vb.get(out_dim, "bias")?)
        } else {
            None
        };
        Ok(Self { weight, bias })
    }

    /// From tensors already at hand (`weight` `[out, in]`).
    pub fn from_tensors(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self { weight, bias }
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }

    pub fn in_dim(&self) -> usize {
        self.weight.dims()[1]
    }

    pub fn out_dim(&self) -> usize {
        self.weight.dims()[0]
    }

    /// `x [.., in] -> [.., out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_act(x, Activation::None)
    }

    /// `x [.., in] -> act(x·Wᵀ + b) [.., out]`.
    pub fn forward_act(&self, x: &Tensor, act: Activation) -> Result<Tensor> {
        let (out_dim, in_dim) = (self.out_dim(), self.in_dim());
        let Some(&last) = x.dims().last() else {
            candle_core::bail!("linear: input is a scalar, expected [.., {in_dim}]")
        };
        if last != in_dim {
            candle_core::bail!(
                "linear: input has shape {:?}, expected last dimension {in_dim}",
                x.dims()
            )
        }
        let fast = cpu::is_cpu_f32(x)
            && cpu::is_cpu_f32(&self.weight)
            && self.weight.is_contiguous()
            && self
                .bias
                .as_ref()
                .is_none_or(|b| cpu::is_cpu_f32(b) && b.is_contiguous());
        if !fast {
            return self.forward_candle(x, act);
        }
        let x = x.contiguous()?;
        let rows = x.elem_count() / in_dim;
        let mut out_shape = x.dims().to_vec();
        *out_shape.last_mut().expect("non-scalar") = out_dim;
        let mut out = cpu::zeroed(rows * out_dim);
        {
            let xv = F32View::new(&x)?;
            let wv = F32View::new(&self.weight)?;
            let bias_view = self.bias.as_ref().map(F32View::new).transpose()?;
            if let Some(bv) = &bias_view {
                let b = bv.slice();
                out.par_chunks_mut((out_dim * 64).max(1)).for_each(|block| {
                    for row in block.chunks_exact_mut(out_dim) {
                        row.copy_from_slice(b);
                    }
                });
            }
            let (xs, ws) = (xv.slice(), wv.slice());
            // SAFETY: `out` is rows×out_dim (row stride out_dim), `xs` rows×in_dim (row stride
            // in_dim), `ws` out_dim×in_dim read as its transpose: element (kk, j) at j·in_dim + kk.
            // All three are distinct allocations of exactly these sizes.
            unsafe {
                cpu::sgemm(
                    rows,
                    out_dim,
                    in_dim,
                    out.as_mut_ptr(),
                    (out_dim as isize, 1),
                    bias_view.is_some(),
                    xs.as_ptr(),
                    (in_dim as isize, 1),
                    ws.as_ptr(),
                    (1, in_dim as isize),
                    cpu::num_threads(),
                )
            };
        }
        if act == Activation::GeluTanh {
            out.par_chunks_mut(1 << 15).for_each(cpu::gelu_tanh);
        }
        Tensor::from_vec(out, out_shape, x.device())
    }

    /// The plain candle form (any device and dtype; differentiable).
    pub fn forward_candle(&self, x: &Tensor, act: Activation) -> Result<Tensor> {
        let y = x.broadcast_matmul(&self.weight.t()?)?;
        let y = match &self.bias {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        match act {
            Activation::None => Ok(y),
            Activation::GeluTanh => y.gelu(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Tensor};

    #[test]
    fn fast_path_matches_candle_ops() -> Result<()> {
        let dev = Device::Cpu;
        let x = Tensor::randn(0f32, 1.0, (2, 37, 24), &dev)?;
        let w = Tensor::randn(0f32, 0.3, (50, 24), &dev)?;
        let b = Tensor::randn(0f32, 0.3, 50, &dev)?;
        for (bias, act) in [
            (true, Activation::None),
            (false, Activation::GeluTanh),
            (true, Activation::GeluTanh),
        ] {
            let l = Linear::from_tensors(w.clone(), bias.then(|| b.clone()));
            let fast = l.forward_act(&x, act)?;
            let slow = l.forward_candle(&x, act)?;
            assert_eq!(fast.dims(), &[2, 37, 50]);
            let d = (fast - slow)?.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(d < 1e-5, "bias {bias} act {act:?}: {d}");
        }
        // a non-contiguous input takes the same path after a copy
        let xt = Tensor::randn(0f32, 1.0, (24, 5), &dev)?.t()?;
        let l = Linear::from_tensors(w, Some(b));
        let d = (l.forward(&xt)? - l.forward_candle(&xt, Activation::None)?)?
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(d < 1e-5);
        assert!(l
            .forward(&Tensor::zeros((3, 23), candle_core::DType::F32, &dev)?)
            .is_err());
        Ok(())
    }
}
