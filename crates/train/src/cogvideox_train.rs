//! The differentiable CogVideoX transformer: diffusers' `CogVideoXTransformer3DModel`
//! (diffusers 0.42.1, `models/transformers/cogvideox_transformer_3d.py`) for training, with the
//! same parameter names and the same numbers as the inference model
//! ([`vdit_models::transformers::cogvideox::CogVideoXTransformer3D`]).
//!
//! Paper: Yang et al., "CogVideoX: Text-to-Video Diffusion Models with An Expert Transformer"
//! (arXiv:2408.06072); adaLN-zero blocks as in Peebles & Xie, "Scalable Diffusion Models with
//! Transformers" (DiT, arXiv:2212.09748).
//!
//! Shapes: latents `[B, F, C, H, W]`, text `[B, L, text_embed_dim]`, timesteps `[B]` (or `[1]`)
//! → `[B, F, C_out, H, W]`. Inside: one joint sequence `[B, L + N, D]`, text rows first,
//! `N = F·(H/p)·(W/p)`. Supported: CogVideoX 1.0 layouts (`patch_size_t` null) with 3D sin-cos
//! positions (2B) or 3D RoPE (5B); not learned positions or the `ofs` embedding.
//!
//! Speed: each `CogVideoXBlock` is one graph node ([`kernels::BlockOp`]) with a hand-written
//! backward pass: its matmuls (q, k, v fused into one) run through candle/gemm, everything
//! between them (LayerNorm with the adaLN modulation of both spans, the per-head q/k norm with
//! RoPE, attention, bias + GELU, the gated residuals) as parallel slice kernels, and the
//! activations the backward needs are kept from the forward. Built from candle ops, a block
//! was ~50 graph nodes and candle's backward (a `zeros_like` + `add` per gradient, each a
//! single-threaded pass) made a training step 4x slower (2.6 s → 0.66 s for 8 clips of
//! 64x64x17 at the default size, 2 cores). The embeddings and final layers stay candle ops
//! plus the single-kernel [`kernels::AdaNorm`]. CPU only (f32 for training, f64 for gradient
//! checks); every kernel's backward is tested against finite differences, the fused block
//! against the composition of single-kernel ops, and the forward against the inference model.

pub mod kernels;

use candle_core::{DType, Tensor};
use candle_nn::{Init, VarBuilder};
use kernels::{BlockDims, RopeTables};
use std::path::Path;
use std::sync::Arc;
use vdit_core::{Error, Result};
use vdit_models::layers::embeddings::{sincos_pos_embed_3d, timestep_embedding};
use vdit_models::transformers::cogvideox::CogVideoXTransformerConfig;

/// Weight `[out, in]` and optional bias `[out]` of a `nn.Linear`.
#[derive(Debug, Clone)]
struct Lin {
    w: Tensor,
    b: Option<Tensor>,
}

impl Lin {
    fn new(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> candle_core::Result<Self> {
        let w = vb.get_with_hints((out_dim, in_dim), "weight", Init::Const(0.0))?;
        let b = if bias {
            Some(vb.get_with_hints(out_dim, "bias", Init::Const(0.0))?)
        } else {
            None
        };
        Ok(Self { w, b })
    }

    /// `x [..., in]` → `[..., out]` as one 2-D matmul.
    fn forward(&self, x: &Tensor) -> candle_core::Result<Tensor> {
        let dims = x.dims().to_vec();
        let k = *dims.last().unwrap_or(&0);
        let rows = x.elem_count() / k.max(1);
        let y = x.reshape((rows, k))?.matmul(&self.w.t()?)?; // [rows, out]
        let y = match &self.b {
            Some(b) => y.broadcast_add(b)?,
            None => y,
        };
        let mut out = dims;
        *out.last_mut().expect("rank >= 1") = self.w.dim(0)?;
        y.reshape(out)
    }
}

/// `nn.LayerNorm` parameters (None when not elementwise-affine).
#[derive(Debug, Clone)]
struct Norm {
    affine: Option<(Tensor, Tensor)>,
}

impl Norm {
    fn new(dim: usize, affine: bool, vb: VarBuilder) -> candle_core::Result<Self> {
        Ok(Self {
            affine: if affine {
                Some((
                    vb.get_with_hints(dim, "weight", Init::Const(1.0))?,
                    vb.get_with_hints(dim, "bias", Init::Const(0.0))?,
                ))
            } else {
                None
            },
        })
    }

    /// The affine pair folded with a modulation: `w·(1 + scale)` and `b·(1 + scale) + shift`,
    /// `scale`, `shift` `[B, D]` → `[B, D]` each.
    fn modulated(&self, shift: &Tensor, scale: &Tensor) -> candle_core::Result<(Tensor, Tensor)> {
        let s1 = (scale + 1.0)?;
        match &self.affine {
            Some((w, b)) => Ok((s1.broadcast_mul(w)?, s1.broadcast_mul(b)?.add(shift)?)),
            None => Ok((s1, shift.clone())),
        }
    }

    /// Plain LayerNorm of `x [B, S, D]`.
    fn forward(&self, x: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
        let d = x.dim(2)?;
        let (w, b) = match &self.affine {
            Some((w, b)) => (w.clone(), b.clone()),
            None => (
                Tensor::ones(d, x.dtype(), x.device())?,
                Tensor::zeros(d, x.dtype(), x.device())?,
            ),
        };
        kernels::ada_norm(x, &w.reshape((1, 1, d))?, &b.reshape((1, 1, d))?, 0, eps)
    }
}

/// `CogVideoXBlock` (see the inference model): adaLN-zero attention, then adaLN-zero GELU MLP.
#[derive(Debug, Clone)]
struct Block {
    norm1_linear: Lin,
    norm1: Norm,
    to_q: Lin,
    to_k: Lin,
    to_v: Lin,
    norm_q: (Tensor, Tensor),
    norm_k: (Tensor, Tensor),
    to_out: Lin,
    norm2_linear: Lin,
    norm2: Norm,
    ff_in: Lin,
    ff_out: Lin,
}

impl Block {
    fn new(cfg: &CogVideoXTransformerConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let (d, dh, t) = (cfg.inner_dim(), cfg.attention_head_dim, cfg.time_embed_dim);
        let affine = cfg.norm_elementwise_affine;
        let a = vb.pp("attn1");
        let head_norm = |name: &str| -> candle_core::Result<(Tensor, Tensor)> {
            let p = a.pp(name);
            Ok((
                p.get_with_hints(dh, "weight", Init::Const(1.0))?,
                p.get_with_hints(dh, "bias", Init::Const(0.0))?,
            ))
        };
        Ok(Self {
            norm1_linear: Lin::new(t, 6 * d, true, vb.pp("norm1").pp("linear"))?,
            norm1: Norm::new(d, affine, vb.pp("norm1").pp("norm"))?,
            to_q: Lin::new(d, d, cfg.attention_bias, a.pp("to_q"))?,
            to_k: Lin::new(d, d, cfg.attention_bias, a.pp("to_k"))?,
            to_v: Lin::new(d, d, cfg.attention_bias, a.pp("to_v"))?,
            norm_q: head_norm("norm_q")?,
            norm_k: head_norm("norm_k")?,
            to_out: Lin::new(d, d, true, a.pp("to_out").pp("0"))?,
            norm2_linear: Lin::new(t, 6 * d, true, vb.pp("norm2").pp("linear"))?,
            norm2: Norm::new(d, affine, vb.pp("norm2").pp("norm"))?,
            ff_in: Lin::new(d, 4 * d, true, vb.pp("ff").pp("net").pp("0").pp("proj"))?,
            ff_out: Lin::new(4 * d, d, true, vb.pp("ff").pp("net").pp("2"))?,
        })
    }

    /// The sizes of this block for [`kernels::BlockOp`].
    fn dims(cfg: &CogVideoXTransformerConfig, text_len: usize) -> BlockDims {
        BlockDims {
            heads: cfg.num_attention_heads,
            head_dim: cfg.attention_head_dim,
            text_len,
            eps: cfg.norm_eps,
            affine: cfg.norm_elementwise_affine,
            qkv_bias: cfg.attention_bias,
        }
    }

    /// The block's parameters as one flat vector in [`BlockDims::layout`]'s order.
    fn flat_params(&self) -> candle_core::Result<Tensor> {
        let mut parts: Vec<&Tensor> = vec![&self.to_q.w, &self.to_k.w, &self.to_v.w];
        if let (Some(q), Some(k), Some(v)) = (&self.to_q.b, &self.to_k.b, &self.to_v.b) {
            parts.extend([q, k, v]);
        }
        parts.extend([
            &self.norm_q.0,
            &self.norm_q.1,
            &self.norm_k.0,
            &self.norm_k.1,
        ]);
        parts.push(&self.to_out.w);
        parts.extend(self.to_out.b.as_ref());
        parts.push(&self.ff_in.w);
        parts.extend(self.ff_in.b.as_ref());
        parts.push(&self.ff_out.w);
        parts.extend(self.ff_out.b.as_ref());
        if let (Some((w1, b1)), Some((w2, b2))) = (&self.norm1.affine, &self.norm2.affine) {
            parts.extend([w1, b1, w2, b2]);
        }
        let flat = parts
            .into_iter()
            .map(|t| t.flatten_all())
            .collect::<candle_core::Result<Vec<_>>>()?;
        Tensor::cat(&flat, 0)
    }

    /// The adaLN modulation of both norms, `[B, 12D]`: norm1.linear's output then norm2's.
    fn mods(&self, temb_act: &Tensor) -> candle_core::Result<Tensor> {
        let lin = Lin {
            w: Tensor::cat(&[&self.norm1_linear.w, &self.norm2_linear.w], 0)?, // [12D, T]
            b: match (&self.norm1_linear.b, &self.norm2_linear.b) {
                (Some(a), Some(b)) => Some(Tensor::cat(&[a, b], 0)?),
                _ => None,
            },
        };
        lin.forward(temb_act)
    }

    /// `x [B, L+N, D]`, `temb_act = silu(temb) [B, T]` → `[B, L+N, D]`, as one fused op.
    fn forward(
        &self,
        x: &Tensor,
        temb_act: &Tensor,
        cfg: &CogVideoXTransformerConfig,
        text_len: usize,
        rope: Option<&Arc<RopeTables>>,
    ) -> candle_core::Result<Tensor> {
        kernels::block(
            x,
            &self.mods(temb_act)?,
            &self.flat_params()?,
            Self::dims(cfg, text_len),
            rope.cloned(),
        )
    }
}

/// The trainable CogVideoX transformer; see the module docs.
#[derive(Debug, Clone)]
pub struct TrainCogVideoX {
    cfg: CogVideoXTransformerConfig,
    /// `patch_embed.proj.weight [D, C, p, p]`.
    patch_w: Tensor,
    patch_b: Option<Tensor>,
    text_proj: Lin,
    time_1: Lin,
    time_2: Lin,
    blocks: Vec<Block>,
    norm_final: Norm,
    norm_out_linear: Lin,
    norm_out_norm: Norm,
    proj_out: Lin,
    /// The sin-cos table of the sample size `[N, D]` (f32), or None with RoPE.
    sincos: Option<Tensor>,
}

impl TrainCogVideoX {
    /// Builds the vars through `vb` under diffusers' names (`patch_embed.proj.weight`,
    /// `transformer_blocks.0.attn1.to_q.weight`, ...). Linear weights are requested with the
    /// hint `Init::Const(0.0)` (no preference) so that the var builder's rule decides.
    pub fn new(cfg: &CogVideoXTransformerConfig, vb: VarBuilder) -> Result<Self> {
        let file = Path::new("<transformer config>");
        cfg.validate(file)?;
        if cfg.patch_size_t.is_some() {
            return Err(Error::config(
                file,
                "patch_size_t",
                "temporal patches (CogVideoX 1.5) are not supported for training; use null",
            ));
        }
        if cfg.use_learned_positional_embeddings {
            return Err(Error::config(
                file,
                "use_learned_positional_embeddings",
                "learned positions are not supported for training; use false",
            ));
        }
        if cfg.ofs_embed_dim.is_some() {
            return Err(Error::config(
                file,
                "ofs_embed_dim",
                "the ofs embedding is not supported for training; use null",
            ));
        }
        Self::build(cfg, vb).map_err(|e| Error::Msg(format!("building the transformer: {e}")))
    }

    fn build(cfg: &CogVideoXTransformerConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let d = cfg.inner_dim();
        let (c, p) = (cfg.in_channels, cfg.patch_size);
        let pe = vb.pp("patch_embed");
        let patch_w = pe.get_with_hints((d, c, p, p), "proj.weight", Init::Const(0.0))?;
        let patch_b = if cfg.patch_bias {
            Some(pe.get_with_hints(d, "proj.bias", Init::Const(0.0))?)
        } else {
            None
        };
        let sincos = if cfg.use_rotary_positional_embeddings {
            None
        } else {
            Some(sincos_pos_embed_3d(
                d,
                cfg.sample_height / p,
                cfg.sample_width / p,
                cfg.sample_latent_frames(),
                cfg.spatial_interpolation_scale,
                cfg.temporal_interpolation_scale,
                vb.device(),
            )?)
        };
        let (t, eps_affine) = (cfg.time_embed_dim, cfg.norm_elementwise_affine);
        Ok(Self {
            cfg: cfg.clone(),
            patch_w,
            patch_b,
            text_proj: Lin::new(cfg.text_embed_dim, d, true, pe.pp("text_proj"))?,
            time_1: Lin::new(d, t, true, vb.pp("time_embedding").pp("linear_1"))?,
            time_2: Lin::new(t, t, true, vb.pp("time_embedding").pp("linear_2"))?,
            blocks: (0..cfg.num_layers)
                .map(|i| Block::new(cfg, vb.pp("transformer_blocks").pp(i)))
                .collect::<candle_core::Result<Vec<_>>>()?,
            norm_final: Norm::new(d, eps_affine, vb.pp("norm_final"))?,
            norm_out_linear: Lin::new(t, 2 * d, true, vb.pp("norm_out").pp("linear"))?,
            norm_out_norm: Norm::new(d, eps_affine, vb.pp("norm_out").pp("norm"))?,
            proj_out: Lin::new(d, p * p * cfg.out_channels, true, vb.pp("proj_out"))?,
            sincos,
        })
    }

    pub fn config(&self) -> &CogVideoXTransformerConfig {
        &self.cfg
    }

    /// One denoiser evaluation, as [`CogVideoXTransformer3D::forward`]
    /// (`vdit_models::transformers::cogvideox`):
    ///
    /// - `hidden`: latents `[B, F, C_in, H, W]`, H and W multiples of `patch_size`;
    /// - `text`: `[B, L, text_embed_dim]`;
    /// - `timestep`: `[B]` or `[1]` timestep values (any dtype; used as f32);
    /// - `rope`: `(cos, sin)` `[F·H/p·W/p, attention_head_dim]` from
    ///   `cogvideox_rotary_pos_embed`, required exactly when the config uses RoPE.
    ///
    /// Returns `[B, F, C_out, H, W]`, connected to every var.
    pub fn forward(
        &self,
        hidden: &Tensor,
        text: &Tensor,
        timestep: &Tensor,
        rope: Option<(&Tensor, &Tensor)>,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (b, f, c, h, w) = hidden.dims5()?;
        let p = cfg.patch_size;
        let d = cfg.inner_dim();
        let bad = |what: &str, msg: String| Err(Error::invalid(what, msg));
        if c != cfg.in_channels {
            return bad(
                "hidden_states",
                format!(
                    "{c} channels in {:?}, expected in_channels {}",
                    hidden.dims(),
                    cfg.in_channels
                ),
            );
        }
        if h == 0 || w == 0 || f == 0 || !h.is_multiple_of(p) || !w.is_multiple_of(p) {
            return bad(
                "hidden_states",
                format!("latent size {f}x{h}x{w} is not a positive multiple of patch_size {p}"),
            );
        }
        let (tb, l, te) = text.dims3()?;
        if tb != b || te != cfg.text_embed_dim {
            return bad(
                "encoder_hidden_states",
                format!(
                    "shape {:?}, expected [{b}, L, {}]",
                    text.dims(),
                    cfg.text_embed_dim
                ),
            );
        }
        match timestep.dims() {
            [n] if *n == b || *n == 1 => {}
            other => {
                return bad(
                    "timestep",
                    format!("shape {other:?}, expected [{b}] or [1]"),
                );
            }
        }
        let (gh, gw) = (h / p, w / p);
        let n = f * gh * gw;
        let dtype = hidden.dtype();
        let rope = match (rope, cfg.use_rotary_positional_embeddings) {
            (None, false) => None,
            (Some((cos, sin)), true) => {
                let dh = cfg.attention_head_dim;
                if cos.dims() != [n, dh] || sin.dims() != [n, dh] {
                    return bad(
                        "rope",
                        format!(
                            "cos {:?} / sin {:?}, expected [{n}, {dh}] ({n} video tokens)",
                            cos.dims(),
                            sin.dims()
                        ),
                    );
                }
                let v = |t: &Tensor| -> candle_core::Result<Vec<f32>> {
                    t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()
                };
                Some(Arc::new(RopeTables {
                    cos: v(cos)?,
                    sin: v(sin)?,
                    rows: n,
                }))
            }
            (None, true) => {
                return bad(
                    "rope",
                    "this model uses rotary embeddings: pass (cos, sin)".into(),
                )
            }
            (Some(_), false) => {
                return bad(
                    "rope",
                    "this model uses sin-cos positions; rotary embeddings were passed".into(),
                )
            }
        };

        // 1. time embedding: sinusoid (f32) → MLP → [B, T]; silu once for every adaLN linear
        let t_emb = timestep_embedding(timestep, d, cfg.flip_sin_to_cos, cfg.freq_shift, 10000.0)?
            .to_dtype(dtype)?;
        let emb = self.time_2.forward(&self.time_1.forward(&t_emb)?.silu()?)?;
        let temb_act = emb.broadcast_as((b, cfg.time_embed_dim))?.silu()?; // [B, T]

        // 2. tokens: text then video, [B, L+N, D], sin-cos positions on the video rows
        let text_tok = self.text_proj.forward(text)?; // [B, L, D]
        let patches = hidden
            .reshape((b * f, c, gh, p, gw, p))? // [B·F, C, H/p, p, W/p, p]
            .permute((0, 2, 4, 1, 3, 5))? // [B·F, H/p, W/p, C, p, p]
            .reshape((b, n, c * p * p))?; // [B, N, C·p·p]
        let video_tok = Lin {
            w: self.patch_w.reshape((d, c * p * p))?, // [D, C·p·p]
            b: self.patch_b.clone(),
        }
        .forward(&patches)?; // [B, N, D]
        let video_tok = match &self.sincos {
            None => video_tok,
            Some(table) => {
                let at_sample = h == cfg.sample_height
                    && w == cfg.sample_width
                    && (f - 1) * cfg.temporal_compression_ratio + 1 == cfg.sample_frames;
                // diffusers recomputes the table for any other size
                let table = if at_sample {
                    table.clone()
                } else {
                    sincos_pos_embed_3d(
                        d,
                        gh,
                        gw,
                        f,
                        cfg.spatial_interpolation_scale,
                        cfg.temporal_interpolation_scale,
                        hidden.device(),
                    )?
                };
                video_tok.broadcast_add(&table.to_dtype(dtype)?.unsqueeze(0)?)?
            }
        };
        let mut x = Tensor::cat(&[text_tok, video_tok], 1)?; // [B, L+N, D]

        // 3. blocks
        for blk in &self.blocks {
            x = blk.forward(&x, &temb_act, cfg, l, rope.as_ref())?;
        }

        // 4. final norms on the video rows, projection, unpatchify
        let video = self.norm_final.forward(&x.narrow(1, l, n)?, cfg.norm_eps)?; // [B, N, D]
        let m = self.norm_out_linear.forward(&temb_act)?; // [B, 2D] = [shift | scale]
        let (wm, bm) = self
            .norm_out_norm
            .modulated(&m.narrow(1, 0, d)?, &m.narrow(1, d, d)?)?;
        let video = kernels::ada_norm(
            &video,
            &wm.unsqueeze(1)?, // [B, 1, D]
            &bm.unsqueeze(1)?,
            0,
            cfg.norm_eps,
        )?;
        let co = cfg.out_channels;
        let out = self.proj_out.forward(&video)?; // [B, N, C_out·p·p]
        Ok(out
            .reshape((b * f, gh, gw, co, p, p))? // [B·F, H/p, W/p, C, p, p]
            .permute((0, 3, 1, 4, 2, 5))? // [B·F, C, H/p, p, W/p, p]
            .reshape((b, f, co, h, w))?) // [B, F, C, H, W]
    }
}

#[cfg(test)]
mod tests;
