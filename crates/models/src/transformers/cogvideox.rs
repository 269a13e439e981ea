//! CogVideoX expert transformer: diffusers' `CogVideoXTransformer3DModel`
//! (diffusers 0.42.1, `models/transformers/cogvideox_transformer_3d.py`), for every released
//! configuration: 2B (3D sin-cos positions), 5B (3D RoPE), 5B-I2V (learned positions), and
//! 1.5 (temporal patches, linear patch embedding, "slice" RoPE, optional `ofs` embedding).
//!
//! Paper: Yang et al., "CogVideoX: Text-to-Video Diffusion Models with An Expert Transformer"
//! (arXiv:2408.06072).
//!
//! Shapes (2B at 480×720, 49 frames: F = 13, H×W = 60×90 latents, p = 2, D = 30·64 = 1920):
//! - in: latents `[B, F, C, H, W]`, text `[B, L, 4096]` (L = 226), timesteps `[B]`;
//! - tokens: text `[B, L, D]` then video `[B, F·H/p·W/p, D]` (1.5: `F/p_t·H/p·W/p`), joined as
//!   one sequence `[B, L + N, D]`, text first. The sequence stays joined through the blocks: the
//!   text and video "experts" differ only in their adaLN shift/scale/gate, which the fused norm
//!   and residual kernels pick per row, so the model never splits or re-concatenates it;
//! - out: `[B, F, C_out, H, W]`.
//!
//! RoPE tables are made by the caller ([`cogvideox_rotary_pos_embed`], as diffusers' pipeline
//! does) and passed to [`CogVideoXTransformer3D::forward`].
//!
//! Inference only: the f32 CPU kernels used here record no gradients. Training will need the
//! candle forms of each layer (`forward_candle`, `sdpa_candle`, ... in [`crate::layers`]).

use crate::layers::attention::{head_norm_rope, sdpa};
use crate::layers::embeddings::{sincos_pos_embed_3d, timestep_embedding, TimestepEmbedding};
use crate::layers::linear::{Activation, Linear};
use crate::layers::norm::{gated_residual, LayerNorm, Modulation};
use crate::layers::rope::{rotary_pos_embed_3d, RopeGrid};
use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::Arc;
use vdit_core::config::{ensure, load_config};
use vdit_core::weights::{build_error, Weights};

/// `config.json` of a `CogVideoXTransformer3DModel`, with diffusers' names and defaults (the
/// defaults are CogVideoX-2B's).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CogVideoXTransformerConfig {
    pub num_attention_heads: usize,
    pub attention_head_dim: usize,
    /// Latent channels in (32 for image-to-video: noise and image latents concatenated).
    pub in_channels: usize,
    pub out_channels: usize,
    /// Timestep sinusoid layout `[cos | sin]` when true.
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub time_embed_dim: usize,
    /// CogVideoX 1.5 I2V: an extra sinusoidal embedding of the `ofs` input, added to the time one.
    pub ofs_embed_dim: Option<usize>,
    pub text_embed_dim: usize,
    pub num_layers: usize,
    /// Training only; ignored here.
    pub dropout: f64,
    pub attention_bias: bool,
    /// Latent width the model was trained at (positions are built for it).
    pub sample_width: usize,
    pub sample_height: usize,
    /// In *pixel* frames (49 ↔ 13 latent frames), a historical quirk kept by diffusers.
    pub sample_frames: usize,
    pub patch_size: usize,
    /// CogVideoX 1.5: frames per temporal patch.
    pub patch_size_t: Option<usize>,
    pub temporal_compression_ratio: usize,
    pub max_text_seq_length: usize,
    /// Only "gelu-approximate" exists in released checkpoints.
    pub activation_fn: String,
    pub timestep_activation_fn: String,
    pub norm_elementwise_affine: bool,
    pub norm_eps: f64,
    pub spatial_interpolation_scale: f64,
    pub temporal_interpolation_scale: f64,
    pub use_rotary_positional_embeddings: bool,
    pub use_learned_positional_embeddings: bool,
    pub patch_bias: bool,
}

impl Default for CogVideoXTransformerConfig {
    fn default() -> Self {
        Self::cogvideox_2b()
    }
}

impl CogVideoXTransformerConfig {
    /// THUDM/CogVideoX-2b (diffusers' defaults).
    pub fn cogvideox_2b() -> Self {
        Self {
            num_attention_heads: 30,
            attention_head_dim: 64,
            in_channels: 16,
            out_channels: 16,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            time_embed_dim: 512,
            ofs_embed_dim: None,
            text_embed_dim: 4096,
            num_layers: 30,
            dropout: 0.0,
            attention_bias: true,
            sample_width: 90,
            sample_height: 60,
            sample_frames: 49,
            patch_size: 2,
            patch_size_t: None,
            temporal_compression_ratio: 4,
            max_text_seq_length: 226,
            activation_fn: "gelu-approximate".into(),
            timestep_activation_fn: "silu".into(),
            norm_elementwise_affine: true,
            norm_eps: 1e-5,
            spatial_interpolation_scale: 1.875,
            temporal_interpolation_scale: 1.0,
            use_rotary_positional_embeddings: false,
            use_learned_positional_embeddings: false,
            patch_bias: true,
        }
    }

    /// THUDM/CogVideoX-5b: 48 heads, 42 layers, 3D RoPE.
    pub fn cogvideox_5b() -> Self {
        Self {
            num_attention_heads: 48,
            num_layers: 42,
            use_rotary_positional_embeddings: true,
            ..Self::cogvideox_2b()
        }
    }

    /// THUDM/CogVideoX1.5-5B: temporal patches of 2, linear patch embedding, "slice" RoPE over
    /// a 150×150 base grid, 81 pixel frames.
    pub fn cogvideox15_5b() -> Self {
        Self {
            patch_size_t: Some(2),
            patch_bias: false,
            sample_width: 300,
            sample_height: 300,
            sample_frames: 81,
            ..Self::cogvideox_5b()
        }
    }

    /// The tiny shape of the parity fixtures (2 heads × 16, 2 layers), for tests.
    pub fn tiny() -> Self {
        Self {
            num_attention_heads: 2,
            attention_head_dim: 16,
            in_channels: 4,
            out_channels: 4,
            time_embed_dim: 16,
            text_embed_dim: 24,
            num_layers: 2,
            sample_width: 12,
            sample_height: 8,
            sample_frames: 9,
            max_text_seq_length: 7,
            ..Self::cogvideox_2b()
        }
    }

    /// `num_attention_heads · attention_head_dim`.
    pub fn inner_dim(&self) -> usize {
        self.num_attention_heads * self.attention_head_dim
    }

    /// Latent frames of the sample size: `(sample_frames − 1) / temporal_compression_ratio + 1`.
    pub fn sample_latent_frames(&self) -> usize {
        (self.sample_frames.saturating_sub(1)) / self.temporal_compression_ratio.max(1) + 1
    }

    /// Rejects values this implementation (or diffusers) cannot run; errors name `file` and the key.
    pub fn validate(&self, file: &Path) -> vdit_core::Result<()> {
        let pos =
            |v: usize, key: &str| ensure(v > 0, file, key, || "must be at least 1, found 0".into());
        pos(self.num_attention_heads, "num_attention_heads")?;
        pos(self.attention_head_dim, "attention_head_dim")?;
        pos(self.in_channels, "in_channels")?;
        pos(self.out_channels, "out_channels")?;
        pos(self.time_embed_dim, "time_embed_dim")?;
        pos(self.text_embed_dim, "text_embed_dim")?;
        pos(self.patch_size, "patch_size")?;
        pos(
            self.temporal_compression_ratio,
            "temporal_compression_ratio",
        )?;
        pos(self.sample_width, "sample_width")?;
        pos(self.sample_height, "sample_height")?;
        pos(self.sample_frames, "sample_frames")?;
        if let Some(pt) = self.patch_size_t {
            ensure(pt > 0, file, "patch_size_t", || {
                "must be at least 1 (or null), found 0".into()
            })?;
            ensure(
                self.use_rotary_positional_embeddings,
                file,
                "patch_size_t",
                || {
                    "temporal patches need use_rotary_positional_embeddings = true (the sin-cos table has one row per latent frame)".into()
                },
            )?;
        }
        ensure(
            self.activation_fn == "gelu-approximate",
            file,
            "activation_fn",
            || {
                format!(
                    "only \"gelu-approximate\" is supported, found {:?}",
                    self.activation_fn
                )
            },
        )?;
        ensure(
            self.timestep_activation_fn == "silu",
            file,
            "timestep_activation_fn",
            || {
                format!(
                    "only \"silu\" is supported, found {:?}",
                    self.timestep_activation_fn
                )
            },
        )?;
        ensure(
            self.norm_eps > 0.0 && self.norm_eps.is_finite(),
            file,
            "norm_eps",
            || format!("must be a positive number, found {}", self.norm_eps),
        )?;
        ensure((0.0..1.0).contains(&self.dropout), file, "dropout", || {
            format!("must be in [0, 1), found {}", self.dropout)
        })?;
        let half = (self.inner_dim() / 2) as f64;
        ensure(
            self.freq_shift.is_finite() && half - self.freq_shift != 0.0,
            file,
            "freq_shift",
            || {
                format!(
                    "{} makes the timestep frequencies divide by zero",
                    self.freq_shift
                )
            },
        )?;
        if let Some(o) = self.ofs_embed_dim {
            ensure(o == self.time_embed_dim, file, "ofs_embed_dim", || {
                format!("the ofs embedding is added to the time embedding, so it must equal time_embed_dim {}, found {o}", self.time_embed_dim)
            })?;
        }
        if self.use_learned_positional_embeddings {
            ensure(
                self.use_rotary_positional_embeddings,
                file,
                "use_learned_positional_embeddings",
                || {
                    "learned positions without rotary embeddings exist in no CogVideoX checkpoint (diffusers rejects them too)".into()
                },
            )?;
        }
        if self.use_rotary_positional_embeddings {
            ensure(
                self.attention_head_dim.is_multiple_of(16),
                file,
                "attention_head_dim",
                || {
                    format!(
                    "3D RoPE splits the head into t/h/w parts of d/4, 3d/8, 3d/8 (each even), so it must be a multiple of 16, found {}",
                    self.attention_head_dim
                )
                },
            )?;
        } else {
            ensure(
                self.inner_dim().is_multiple_of(16),
                file,
                "attention_head_dim",
                || {
                    format!(
                    "3D sin-cos positions need num_attention_heads·attention_head_dim divisible by 16, found {}·{} = {}",
                    self.num_attention_heads,
                    self.attention_head_dim,
                    self.inner_dim()
                )
                },
            )?;
            for (v, key) in [
                (
                    self.spatial_interpolation_scale,
                    "spatial_interpolation_scale",
                ),
                (
                    self.temporal_interpolation_scale,
                    "temporal_interpolation_scale",
                ),
            ] {
                ensure(v > 0.0 && v.is_finite(), file, key, || {
                    format!("must be a positive number, found {v}")
                })?;
            }
        }
        Ok(())
    }
}

/// diffusers' `get_resize_crop_region_for_grid((h, w), tgt_width, tgt_height)`: the region of
/// the `tgt_height × tgt_width` base grid the `h × w` grid maps to, resized to fit and centred.
/// Python's `round` rounds half to even, hence `round_ties_even`.
fn resize_crop_region(
    h: usize,
    w: usize,
    tgt_width: usize,
    tgt_height: usize,
) -> ((i64, i64), (i64, i64)) {
    let (tw, th) = (tgt_width as f64, tgt_height as f64);
    let (hf, wf) = (h as f64, w as f64);
    let (rh, rw) = if hf / wf > th / tw {
        (th, (th / hf * wf).round_ties_even())
    } else {
        ((tw / wf * hf).round_ties_even(), tw)
    };
    let top = ((th - rh) / 2.0).round_ties_even() as i64;
    let left = ((tw - rw) / 2.0).round_ties_even() as i64;
    ((top, left), (top + rh as i64, left + rw as i64))
}

/// The RoPE tables `(cos, sin)`, each `[F'·(H/p)·(W/p), attention_head_dim]` f32, exactly as
/// diffusers' `CogVideoXPipeline._prepare_rotary_positional_embeddings(height, width, frames)`:
/// - 1.0 (`patch_size_t` null): a linspace grid over the crop region of the base grid
///   (`sample_height/p × sample_width/p`) that the `H/p × W/p` grid resizes to; F' = latent frames.
/// - 1.5: "slice" grid (integer positions, at most the base grid), F' = ⌈latent frames / p_t⌉.
///
/// `height_px`, `width_px` are in pixels; `latent_frames` counts latent frames (after any
/// padding to a multiple of `patch_size_t`).
pub fn cogvideox_rotary_pos_embed(
    cfg: &CogVideoXTransformerConfig,
    height_px: usize,
    width_px: usize,
    latent_frames: usize,
    vae_scale_factor_spatial: usize,
    dev: &Device,
) -> Result<(Tensor, Tensor)> {
    let p = cfg.patch_size;
    let cell = vae_scale_factor_spatial * p;
    if cell == 0 || latent_frames == 0 {
        candle_core::bail!("rotary embedding: patch_size {p}, VAE scale {vae_scale_factor_spatial} and {latent_frames} latent frames must all be positive")
    }
    let (grid_h, grid_w) = (height_px / cell, width_px / cell);
    if grid_h == 0 || grid_w == 0 {
        candle_core::bail!(
            "rotary embedding: {height_px}x{width_px} px is smaller than one {cell}-pixel patch"
        )
    }
    let (base_h, base_w) = (cfg.sample_height / p, cfg.sample_width / p);
    let grid = match cfg.patch_size_t {
        None => RopeGrid::Linspace {
            crop: resize_crop_region(grid_h, grid_w, base_w, base_h),
            grid_h,
            grid_w,
            frames: latent_frames,
        },
        Some(pt) => RopeGrid::Slice {
            max_h: base_h,
            max_w: base_w,
            grid_h,
            grid_w,
            frames: latent_frames.div_ceil(pt.max(1)),
        },
    };
    rotary_pos_embed_3d(cfg.attention_head_dim, &grid, 10000.0, dev)
}

/// Self-attention over the joint sequence with per-head q/k LayerNorm (eps 1e-6) and RoPE on
/// the video rows (diffusers' `Attention` + `CogVideoXAttnProcessor2_0`).
#[derive(Debug, Clone)]
struct JointAttention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    norm_q: LayerNorm,
    norm_k: LayerNorm,
    to_out: Linear,
    heads: usize,
    head_dim: usize,
}

impl JointAttention {
    fn new(cfg: &CogVideoXTransformerConfig, vb: VarBuilder) -> Result<Self> {
        let (d, dh) = (cfg.inner_dim(), cfg.attention_head_dim);
        Ok(Self {
            to_q: Linear::new(d, d, cfg.attention_bias, vb.pp("to_q"))?,
            to_k: Linear::new(d, d, cfg.attention_bias, vb.pp("to_k"))?,
            to_v: Linear::new(d, d, cfg.attention_bias, vb.pp("to_v"))?,
            norm_q: LayerNorm::new(dh, 1e-6, true, vb.pp("norm_q"))?,
            norm_k: LayerNorm::new(dh, 1e-6, true, vb.pp("norm_k"))?,
            to_out: Linear::new(d, d, true, vb.pp("to_out").pp("0"))?,
            heads: cfg.num_attention_heads,
            head_dim: dh,
        })
    }

    /// `x [B, L+N, D]` → `[B, L+N, D]`; RoPE on rows `text_len..`.
    fn forward(
        &self,
        x: &Tensor,
        text_len: usize,
        rope: Option<(&Tensor, &Tensor)>,
    ) -> Result<Tensor> {
        let o = {
            let q = head_norm_rope(
                &self.to_q.forward(x)?,
                &self.norm_q,
                self.heads,
                rope,
                text_len,
            )?;
            let k = head_norm_rope(
                &self.to_k.forward(x)?,
                &self.norm_k,
                self.heads,
                rope,
                text_len,
            )?;
            let v = self.to_v.forward(x)?;
            sdpa(&q, &k, &v, self.heads, 1.0 / (self.head_dim as f32).sqrt())? // [B, L+N, D]
        };
        self.to_out.forward(&o)
    }
}

/// The six `[B, D]` chunks of a `CogVideoXLayerNormZero` modulation, in diffusers' order.
struct ZeroMods {
    shift: Tensor,
    scale: Tensor,
    gate: Tensor,
    enc_shift: Tensor,
    enc_scale: Tensor,
    enc_gate: Tensor,
}

impl ZeroMods {
    /// `m [B, 6D]` → `[shift, scale, gate, enc_shift, enc_scale, enc_gate]`.
    fn split(m: &Tensor, d: usize) -> Result<Self> {
        let c = |i: usize| m.narrow(1, i * d, d)?.contiguous();
        Ok(Self {
            shift: c(0)?,
            scale: c(1)?,
            gate: c(2)?,
            enc_shift: c(3)?,
            enc_scale: c(4)?,
            enc_gate: c(5)?,
        })
    }

    fn text(&self) -> Modulation<'_> {
        Modulation {
            shift: &self.enc_shift,
            scale: &self.enc_scale,
        }
    }

    fn video(&self) -> Modulation<'_> {
        Modulation {
            shift: &self.shift,
            scale: &self.scale,
        }
    }
}

/// `CogVideoXBlock`: adaLN-zero attention then adaLN-zero feed-forward (GELU tanh, 4×), both on
/// the joint sequence, with separate text/video shift, scale and gate.
#[derive(Debug, Clone)]
struct Block {
    norm1_linear: Linear,
    norm1: LayerNorm,
    attn: JointAttention,
    norm2_linear: Linear,
    norm2: LayerNorm,
    ff_in: Linear,
    ff_out: Linear,
    dim: usize,
}

impl Block {
    fn new(cfg: &CogVideoXTransformerConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.inner_dim();
        let (t, eps, affine) = (
            cfg.time_embed_dim,
            cfg.norm_eps,
            cfg.norm_elementwise_affine,
        );
        Ok(Self {
            norm1_linear: Linear::new(t, 6 * d, true, vb.pp("norm1").pp("linear"))?,
            norm1: LayerNorm::new(d, eps, affine, vb.pp("norm1").pp("norm"))?,
            attn: JointAttention::new(cfg, vb.pp("attn1"))?,
            norm2_linear: Linear::new(t, 6 * d, true, vb.pp("norm2").pp("linear"))?,
            norm2: LayerNorm::new(d, eps, affine, vb.pp("norm2").pp("norm"))?,
            ff_in: Linear::new(d, 4 * d, true, vb.pp("ff").pp("net").pp("0").pp("proj"))?,
            ff_out: Linear::new(4 * d, d, true, vb.pp("ff").pp("net").pp("2"))?,
            dim: d,
        })
    }

    /// `x [B, L+N, D]`, `temb_act = silu(temb) [B, time_embed_dim]` → `[B, L+N, D]`.
    fn forward(
        &self,
        x: &Tensor,
        temb_act: &Tensor,
        text_len: usize,
        rope: Option<(&Tensor, &Tensor)>,
    ) -> Result<Tensor> {
        let x = {
            let m = ZeroMods::split(&self.norm1_linear.forward(temb_act)?, self.dim)?;
            let a = {
                let h = self
                    .norm1
                    .forward_joint(x, text_len, Some(m.text()), Some(m.video()))?;
                self.attn.forward(&h, text_len, rope)?
            };
            gated_residual(x, &a, text_len, &m.enc_gate, &m.gate)?
        };
        let m = ZeroMods::split(&self.norm2_linear.forward(temb_act)?, self.dim)?;
        let f = {
            let h = self
                .norm2
                .forward_joint(&x, text_len, Some(m.text()), Some(m.video()))?;
            let hidden = self.ff_in.forward_act(&h, Activation::GeluTanh)?; // [B, L+N, 4D]
            drop(h);
            self.ff_out.forward(&hidden)?
        };
        gated_residual(&x, &f, text_len, &m.enc_gate, &m.gate)
    }
}

/// Where the absolute positions come from.
#[derive(Debug, Clone)]
enum Positions {
    /// 5B / 1.5: RoPE inside attention, nothing added here.
    None,
    /// 2B: the sin-cos table of the sample size `[N, D]` (video rows only; text rows are zero).
    SinCos(Tensor),
    /// 5B-I2V: the checkpoint's `patch_embed.pos_embedding [1, L + N, D]`, text rows included.
    Learned(Tensor),
}

/// diffusers' `CogVideoXTransformer3DModel`; see the module docs.
#[derive(Debug, Clone)]
pub struct CogVideoXTransformer3D {
    cfg: CogVideoXTransformerConfig,
    /// Conv2d(kernel = stride = p) as a Linear over (C, p, p) features, or 1.5's Linear over
    /// (C, p_t, p, p) features.
    patch_proj: Linear,
    text_proj: Linear,
    positions: Positions,
    time_embedding: TimestepEmbedding,
    ofs_embedding: Option<TimestepEmbedding>,
    blocks: Vec<Block>,
    norm_final: LayerNorm,
    norm_out_linear: Linear,
    norm_out_norm: LayerNorm,
    proj_out: Linear,
}

impl CogVideoXTransformer3D {
    /// Builds the model from `vb` (prefixes are diffusers' parameter names). An invalid config
    /// is an error here too; [`Self::load`] reports it against the config file instead.
    pub fn new(cfg: &CogVideoXTransformerConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate(Path::new("<config>"))
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let d = cfg.inner_dim();
        let (c, p) = (cfg.in_channels, cfg.patch_size);
        let pe = vb.pp("patch_embed");
        let patch_proj = match cfg.patch_size_t {
            None => {
                let w = pe
                    .get((d, c, p, p), "proj.weight")?
                    .reshape((d, c * p * p))?; // [D, C·p·p]
                let b = if cfg.patch_bias {
                    Some(pe.get(d, "proj.bias")?)
                } else {
                    None
                };
                Linear::from_tensors(w, b)
            }
            // diffusers' nn.Linear here always has a bias, whatever patch_bias says
            Some(pt) => Linear::new(c * pt * p * p, d, true, pe.pp("proj"))?,
        };
        let text_proj = Linear::new(cfg.text_embed_dim, d, true, pe.pp("text_proj"))?;
        let (gh, gw, gf) = (
            cfg.sample_height / p,
            cfg.sample_width / p,
            cfg.sample_latent_frames(),
        );
        let positions = if cfg.use_learned_positional_embeddings {
            let n = cfg.max_text_seq_length + gf * gh * gw;
            Positions::Learned(pe.get((1, n, d), "pos_embedding")?.squeeze(0)?) // [L + N, D]
        } else if !cfg.use_rotary_positional_embeddings {
            Positions::SinCos(
                Self::sincos_table(cfg, gf, gh, gw, vb.device())?.to_dtype(vb.dtype())?,
            )
        } else {
            Positions::None
        };
        let ofs_embedding = match cfg.ofs_embed_dim {
            Some(o) => Some(TimestepEmbedding::new(o, o, vb.pp("ofs_embedding"))?),
            None => None,
        };
        let blocks = (0..cfg.num_layers)
            .map(|i| Block::new(cfg, vb.pp("transformer_blocks").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let out_dim = p * p * cfg.patch_size_t.unwrap_or(1) * cfg.out_channels;
        let (eps, affine) = (cfg.norm_eps, cfg.norm_elementwise_affine);
        Ok(Self {
            cfg: cfg.clone(),
            patch_proj,
            text_proj,
            positions,
            time_embedding: TimestepEmbedding::new(d, cfg.time_embed_dim, vb.pp("time_embedding"))?,
            ofs_embedding,
            blocks,
            norm_final: LayerNorm::new(d, eps, affine, vb.pp("norm_final"))?,
            norm_out_linear: Linear::new(
                cfg.time_embed_dim,
                2 * d,
                true,
                vb.pp("norm_out").pp("linear"),
            )?,
            norm_out_norm: LayerNorm::new(d, eps, affine, vb.pp("norm_out").pp("norm"))?,
            proj_out: Linear::new(d, out_dim, true, vb.pp("proj_out"))?,
        })
    }

    /// Reads `dir/config.json`, validates it, memory-maps the weights, builds the model in
    /// `dtype` on `dev` and rejects checkpoint tensors the model does not use.
    pub fn load(dir: &Path, dtype: DType, dev: &Device) -> vdit_core::Result<Self> {
        let file = dir.join("config.json");
        let cfg: CogVideoXTransformerConfig = load_config(&file)?;
        cfg.validate(&file)?;
        let weights = Arc::new(Weights::from_dir(dir)?);
        let model = Self::new(&cfg, weights.var_builder(dtype, dev)).map_err(build_error)?;
        weights.check_all_used(&[])?;
        Ok(model)
    }

    pub fn config(&self) -> &CogVideoXTransformerConfig {
        &self.cfg
    }

    /// The 2B position table `[frames·gh·gw, D]` f32.
    fn sincos_table(
        cfg: &CogVideoXTransformerConfig,
        frames: usize,
        gh: usize,
        gw: usize,
        dev: &Device,
    ) -> Result<Tensor> {
        sincos_pos_embed_3d(
            cfg.inner_dim(),
            gh,
            gw,
            frames,
            cfg.spatial_interpolation_scale,
            cfg.temporal_interpolation_scale,
            dev,
        )
    }

    /// One denoiser evaluation.
    ///
    /// - `hidden`: latents `[B, F, C_in, H, W]`; H and W multiples of `patch_size`, F of
    ///   `patch_size_t` (1.5).
    /// - `text`: `[B, L, text_embed_dim]` (L = `max_text_seq_length` for learned positions).
    /// - `timestep`: `[B]` (or `[1]`, shared) timestep values.
    /// - `rope`: `(cos, sin)`, each `[F'·H/p·W/p, attention_head_dim]`, from
    ///   [`cogvideox_rotary_pos_embed`]; required exactly when the config uses RoPE.
    /// - `ofs`: `[B]` or `[1]`, required exactly when `ofs_embed_dim` is set (the pipeline passes 2.0).
    ///
    /// Returns `[B, F, C_out, H, W]`.
    pub fn forward(
        &self,
        hidden: &Tensor,
        text: &Tensor,
        timestep: &Tensor,
        rope: Option<(&Tensor, &Tensor)>,
        ofs: Option<&Tensor>,
    ) -> Result<Tensor> {
        let cfg = &self.cfg;
        let (b, f, c, h, w) = hidden.dims5()?;
        let (p, pt) = (cfg.patch_size, cfg.patch_size_t.unwrap_or(1));
        let d = cfg.inner_dim();
        if c != cfg.in_channels {
            candle_core::bail!(
                "hidden_states: {c} channels in shape {:?}, expected in_channels {}",
                hidden.dims(),
                cfg.in_channels
            )
        }
        if !h.is_multiple_of(p) || !w.is_multiple_of(p) || h == 0 || w == 0 {
            candle_core::bail!(
                "hidden_states: latent size {h}x{w} is not a positive multiple of patch_size {p}"
            )
        }
        if !f.is_multiple_of(pt) || f == 0 {
            candle_core::bail!("hidden_states: {f} latent frames is not a positive multiple of patch_size_t {pt} (pad the latents first, as the pipeline does)")
        }
        let (tb, l, te) = text.dims3()?;
        if tb != b || te != cfg.text_embed_dim {
            candle_core::bail!(
                "encoder_hidden_states: shape {:?}, expected [{b}, L, {}]",
                text.dims(),
                cfg.text_embed_dim
            )
        }
        let (ft, gh, gw) = (f / pt, h / p, w / p);
        let n = ft * gh * gw;
        match (rope, cfg.use_rotary_positional_embeddings) {
            (None, true) => candle_core::bail!(
                "this model uses rotary embeddings: pass (cos, sin) of shape [{n}, {}]",
                cfg.attention_head_dim
            ),
            (Some(_), false) => candle_core::bail!(
                "this model uses sin-cos positions; rotary embeddings were passed"
            ),
            _ => {}
        }
        let dtype = hidden.dtype();

        // 1. Time (and ofs) embedding: sinusoid of width D in f32 → MLP → [B, T]
        let check_1d = |t: &Tensor, what: &str| -> Result<()> {
            match t.dims() {
                [n] if *n == b || *n == 1 => Ok(()),
                other => candle_core::bail!("{what}: shape {other:?}, expected [{b}] or [1]"),
            }
        };
        check_1d(timestep, "timestep")?;
        let t_emb = timestep_embedding(timestep, d, cfg.flip_sin_to_cos, cfg.freq_shift, 10000.0)?
            .to_dtype(dtype)?;
        let mut emb = self.time_embedding.forward(&t_emb)?; // [B or 1, T]
        match (&self.ofs_embedding, ofs) {
            (Some(oe), Some(o)) => {
                check_1d(o, "ofs")?;
                let od = cfg.ofs_embed_dim.unwrap_or(cfg.time_embed_dim);
                let o = timestep_embedding(o, od, cfg.flip_sin_to_cos, cfg.freq_shift, 10000.0)?
                    .to_dtype(dtype)?;
                emb = emb.broadcast_add(&oe.forward(&o)?)?;
            }
            (Some(_), None) => candle_core::bail!(
                "this model has an ofs embedding (ofs_embed_dim is set): pass `ofs`"
            ),
            (None, Some(_)) => {
                candle_core::bail!("`ofs` was passed but this model has no ofs embedding")
            }
            (None, None) => {}
        }
        let emb = emb.broadcast_as((b, cfg.time_embed_dim))?.contiguous()?; // [B, T]
        let temb_act = candle_nn::ops::silu(&emb)?; // shared by every adaLN linear

        // 2. Tokens: text then video, [B, L+N, D], plus absolute positions (2B, 5B-I2V)
        let at_sample_size = h == cfg.sample_height
            && w == cfg.sample_width
            && (f - 1) * cfg.temporal_compression_ratio + 1 == cfg.sample_frames;
        let sincos = || Self::sincos_table(cfg, f, gh, gw, hidden.device())?.to_dtype(dtype); // [N, D]
                                                                                              // (text rows, video rows) to add; text rows of a sin-cos table are zero, so none
        let (text_pos, video_pos): (Option<Tensor>, Option<Tensor>) = match &self.positions {
            Positions::None => (None, None),
            // diffusers recomputes the table whenever the input is not the sample size
            Positions::SinCos(table) if at_sample_size => (None, Some(table.clone())),
            Positions::SinCos(_) => (None, Some(sincos()?)),
            Positions::Learned(table) => {
                if (h, w) != (cfg.sample_height, cfg.sample_width) {
                    candle_core::bail!(
                        "learned positions exist only for the sample size {}x{}; got latents {h}x{w}",
                        cfg.sample_height,
                        cfg.sample_width
                    )
                }
                if l != cfg.max_text_seq_length {
                    candle_core::bail!(
                        "learned positions cover {} text tokens; got {l}",
                        cfg.max_text_seq_length
                    )
                }
                if at_sample_size {
                    let rows = table.dim(0)?;
                    (
                        Some(table.narrow(0, 0, l)?),
                        Some(table.narrow(0, l, rows - l)?),
                    )
                } else {
                    // a different frame count: diffusers swaps in the sin-cos table (zero text rows)
                    (None, Some(sincos()?))
                }
            }
        };
        let x = {
            let mut text_tok = self.text_proj.forward(text)?; // [B, L, D]
            let mut video_tok = self.patch_proj.forward(&self.patchify(hidden)?)?; // [B, N, D]
            if let Some(t) = text_pos {
                text_tok = text_tok.broadcast_add(&t.unsqueeze(0)?)?;
            }
            if let Some(v) = video_pos {
                if v.dim(0)? != n {
                    candle_core::bail!(
                        "the position table has {} video rows; the input has {n} video tokens",
                        v.dim(0)?
                    )
                }
                video_tok = video_tok.broadcast_add(&v.unsqueeze(0)?)?;
            }
            Tensor::cat(&[text_tok, video_tok], 1)? // [B, L+N, D]
        };
        self.run_blocks(x, &temb_act, l, rope, (b, f, h, w))
    }

    /// Blocks, final norms, projection and unpatchify: `x [B, L+N, D]` → `[B, F, C_out, H, W]`.
    fn run_blocks(
        &self,
        mut x: Tensor,
        temb_act: &Tensor,
        l: usize,
        rope: Option<(&Tensor, &Tensor)>,
        (b, f, h, w): (usize, usize, usize, usize),
    ) -> Result<Tensor> {
        let d = self.cfg.inner_dim();
        for (i, blk) in self.blocks.iter().enumerate() {
            let _span = tracing::trace_span!("block", i).entered();
            x = blk.forward(&x, temb_act, l, rope)?;
        }
        let n = x.dim(1)? - l;
        let video = x.narrow(1, l, n)?.contiguous()?; // [B, N, D]
        drop(x);
        let video = self.norm_final.forward(&video)?;
        let m = self.norm_out_linear.forward(temb_act)?; // [B, 2D] = [shift | scale]
        let (shift, scale) = (
            m.narrow(1, 0, d)?.contiguous()?,
            m.narrow(1, d, d)?.contiguous()?,
        );
        let video = self.norm_out_norm.forward_joint(
            &video,
            0,
            None,
            Some(Modulation {
                shift: &shift,
                scale: &scale,
            }),
        )?;
        let out = self.proj_out.forward(&video)?; // [B, N, C_out·p_t·p·p]
        self.unpatchify(&out, b, f, h, w)
    }

    /// `[B, F, C, H, W]` → patch features `[B, N, C·p·p]` (1.0) or `[B, N, C·p_t·p·p]` (1.5),
    /// tokens in (t, h, w) order.
    fn patchify(&self, x: &Tensor) -> Result<Tensor> {
        let (b, f, c, h, w) = x.dims5()?;
        let p = self.cfg.patch_size;
        match self.cfg.patch_size_t {
            None => x
                .reshape((b * f, c, h / p, p, w / p, p))? // [B·F, C, H/p, p, W/p, p]
                .permute((0, 2, 4, 1, 3, 5))? // [B·F, H/p, W/p, C, p, p]
                .reshape((b, f * (h / p) * (w / p), c * p * p)), // [B, N, C·p·p]
            Some(pt) => x
                .reshape(vec![b * (f / pt), pt, c, h / p, p, w / p, p])? // [B·F/pt, pt, C, H/p, p, W/p, p]
                .permute(vec![0, 3, 5, 2, 1, 4, 6])? // [B·F/pt, H/p, W/p, C, pt, p, p]
                .reshape((b, (f / pt) * (h / p) * (w / p), c * pt * p * p)), // [B, N, C·pt·p·p]
        }
    }

    /// Inverse of [`Self::patchify`] for the output channels: `[B, N, C·(p_t·)p·p]` → `[B, F, C, H, W]`.
    fn unpatchify(&self, y: &Tensor, b: usize, f: usize, h: usize, w: usize) -> Result<Tensor> {
        let p = self.cfg.patch_size;
        let c = self.cfg.out_channels;
        match self.cfg.patch_size_t {
            None => y
                .reshape((b * f, h / p, w / p, c, p, p))? // [B·F, H/p, W/p, C, p, p]
                .permute((0, 3, 1, 4, 2, 5))? // [B·F, C, H/p, p, W/p, p]
                .reshape((b, f, c, h, w)), // [B, F, C, H, W]
            Some(pt) => y
                .reshape(vec![b * (f / pt), h / p, w / p, c, pt, p, p])? // [B·F/pt, H/p, W/p, C, pt, p, p]
                .permute(vec![0, 4, 3, 1, 5, 2, 6])? // [B·F/pt, pt, C, H/p, p, W/p, p]
                .reshape((b, f, c, h, w)), // [B, F, C, H, W]
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crop_region_rounds_half_to_even() {
        // 5B at 480x720: the grid is the base grid
        assert_eq!(resize_crop_region(30, 45, 45, 30), ((0, 0), (30, 45)));
        // the transformer_rope fixture: a 4x4 grid inside a 4x6 base grid
        assert_eq!(resize_crop_region(4, 4, 6, 4), ((0, 1), (4, 5)));
        // (3 - 2) / 2 = 0.5 rounds to 0, not 1
        assert_eq!(resize_crop_region(2, 2, 3, 2), ((0, 0), (2, 2)));
        // a tall grid: width is resized; round(2.5) = 2
        assert_eq!(resize_crop_region(4, 5, 4, 2), ((0, 1), (2, 3)));
    }

    #[test]
    fn presets_validate_and_round_trip() {
        let f = Path::new("config.json");
        for c in [
            CogVideoXTransformerConfig::cogvideox_2b(),
            CogVideoXTransformerConfig::cogvideox_5b(),
            CogVideoXTransformerConfig::cogvideox15_5b(),
            CogVideoXTransformerConfig::tiny(),
        ] {
            c.validate(f).unwrap();
            let s = serde_json::to_string(&c).unwrap();
            let back: CogVideoXTransformerConfig = serde_json::from_str(&s).unwrap();
            assert_eq!(back, c);
        }
        // an empty object gives diffusers' defaults
        let d: CogVideoXTransformerConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(d, CogVideoXTransformerConfig::cogvideox_2b());
    }

    #[test]
    fn invalid_values_name_their_key() {
        let f = Path::new("x/config.json");
        let cases: Vec<(&str, Box<dyn Fn(&mut CogVideoXTransformerConfig)>)> = vec![
            (
                "activation_fn",
                Box::new(|c| c.activation_fn = "gelu".into()),
            ),
            ("patch_size", Box::new(|c| c.patch_size = 0)),
            ("patch_size_t", Box::new(|c| c.patch_size_t = Some(2))),
            (
                "use_learned_positional_embeddings",
                Box::new(|c| c.use_learned_positional_embeddings = true),
            ),
            (
                "attention_head_dim",
                Box::new(|c| {
                    c.use_rotary_positional_embeddings = true;
                    c.attention_head_dim = 24;
                }),
            ),
            (
                "num_attention_heads",
                Box::new(|c| c.num_attention_heads = 0),
            ),
            ("ofs_embed_dim", Box::new(|c| c.ofs_embed_dim = Some(3))),
            ("norm_eps", Box::new(|c| c.norm_eps = 0.0)),
            (
                "timestep_activation_fn",
                Box::new(|c| c.timestep_activation_fn = "relu".into()),
            ),
        ];
        for (key, edit) in cases {
            let mut c = CogVideoXTransformerConfig::tiny();
            edit(&mut c);
            let e = c.validate(f).unwrap_err().to_string();
            assert!(e.contains(key) && e.contains("x/config.json"), "{key}: {e}");
        }
    }
}
