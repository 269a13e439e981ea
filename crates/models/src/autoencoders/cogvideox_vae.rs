//! CogVideoX's 3D causal VAE (`AutoencoderKLCogVideoX`).
//!
//! Paper: Yang et al., "CogVideoX: Text-to-Video Diffusion Models with An Expert Transformer"
//! (arXiv:2408.06072), section 2.1. Reference: diffusers 0.42.1
//! `models/autoencoders/autoencoder_kl_cogvideox.py` (+ `CogVideoXDownsample3D` /
//! `CogVideoXUpsample3D`), matched to 1e-4 by `tests/parity_vae.rs`.
//!
//! Shapes (at the crate boundary, as diffusers): video `[B, 3, F, H, W]` in [-1, 1] <->
//! latent `[B, 16, (F-1)/4 + 1, H/8, W/8]` (2B/5B). `decode` takes latents already divided by
//! `scaling_factor` and returns unclamped pixels.
//!
//! What is mirrored exactly (see `shared/parity/README.md`, sections 13-18):
//! - frame batching: encode 8 frames per call (the first call 8 + F mod 8), decode 2 latent
//!   frames per call (the first 2 + F mod 2); each causal conv carries its last 2 padded input
//!   frames from call to call (`conv_cache`); GroupNorm statistics are per call;
//! - causal time padding by replicating frame 0 on the first call; zero spatial padding;
//! - temporal down/upsampling with the odd-frame rule per call; SpatialNorm3D with the zq
//!   nearest-resize rule (frame 0 resized alone when the feature has an odd frame count > 1);
//! - tiling: `tiled_decode` / `tiled_encode` with their exact tile grid, per-tile frame batching
//!   and caches, in-place blending order and cropping; on by default above the tile size.
//!
//! Computation: the VAE always computes in f32 on the CPU with the kernels of
//! [`super::conv3d`] (candle has no conv3d on any device), channels last (`[T, H, W, C]`), one
//! sample at a time. Weights are read from the `VarBuilder` in its dtype (like a diffusers model
//! loaded with `torch_dtype`) and kept as f32; outputs are returned in the input's dtype and on
//! the input's device. Norms and SiLU are applied as the next conv reads its input, the nearest
//! upsampling is an index map, residual adds go into the existing buffer, and the last frame
//! batch keeps no conv cache, so a resnet holds at most its input and two conv outputs.

use super::conv3d::{self, ConvWeights, Front, Geom, Pre, Source, UpMaps};
use super::video::{self, nearest_map, Video};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::Arc;
use vdit_core::config::{ensure, load_config};
use vdit_core::weights::{build_error, Weights};

const DOWN_BLOCK: &str = "CogVideoXDownBlock3D";
const UP_BLOCK: &str = "CogVideoXUpBlock3D";

/// `config.json` of `AutoencoderKLCogVideoX`, with diffusers' field names and defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AutoencoderKLCogVideoXConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub down_block_types: Vec<String>,
    pub up_block_types: Vec<String>,
    pub block_out_channels: Vec<usize>,
    pub latent_channels: usize,
    pub layers_per_block: usize,
    /// Activation of the resnets: "silu" (or its alias "swish").
    pub act_fn: String,
    /// GroupNorm eps of the encoder resnets (the spatial norms and `norm_out` use 1e-6).
    pub norm_eps: f64,
    pub norm_num_groups: usize,
    /// Temporal compression (a power of two); log2 of it is the number of time-compressing blocks.
    pub temporal_compression_ratio: f64,
    /// Pixel size the model was trained at; the default tile is half of it.
    pub sample_height: usize,
    pub sample_width: usize,
    /// Latents are multiplied by this after encoding and divided by it before decoding
    /// (by the pipeline, not by this model).
    pub scaling_factor: f64,
    pub shift_factor: Option<f64>,
    pub latents_mean: Option<Vec<f64>>,
    pub latents_std: Option<Vec<f64>>,
    pub force_upcast: bool,
    /// Not used by any CogVideoX checkpoint; `true` is rejected.
    pub use_quant_conv: bool,
    /// Not used by any CogVideoX checkpoint; `true` is rejected.
    pub use_post_quant_conv: bool,
    /// Used by the CogVideoX 1.5 image-to-video pipeline for the image latents.
    pub invert_scale_latents: bool,
}

impl Default for AutoencoderKLCogVideoXConfig {
    /// diffusers' defaults, which are the CogVideoX-2B VAE.
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            down_block_types: vec![DOWN_BLOCK.to_string(); 4],
            up_block_types: vec![UP_BLOCK.to_string(); 4],
            block_out_channels: vec![128, 256, 256, 512],
            latent_channels: 16,
            layers_per_block: 3,
            act_fn: "silu".to_string(),
            norm_eps: 1e-6,
            norm_num_groups: 32,
            temporal_compression_ratio: 4.0,
            sample_height: 480,
            sample_width: 720,
            scaling_factor: 1.15258426,
            shift_factor: None,
            latents_mean: None,
            latents_std: None,
            force_upcast: true,
            use_quant_conv: false,
            use_post_quant_conv: false,
            invert_scale_latents: false,
        }
    }
}

impl AutoencoderKLCogVideoXConfig {
    /// THUDM/CogVideoX-2b's VAE.
    pub fn cogvideox_2b() -> Self {
        Self::default()
    }

    /// THUDM/CogVideoX-5b's VAE: as 2B with `scaling_factor` 0.7.
    pub fn cogvideox_5b() -> Self {
        Self {
            scaling_factor: 0.7,
            ..Self::default()
        }
    }

    /// The tiny random VAE of the parity fixtures (diffusers' own tests use the same shape).
    pub fn tiny() -> Self {
        Self {
            block_out_channels: vec![8, 16, 16, 16],
            latent_channels: 4,
            layers_per_block: 1,
            norm_num_groups: 4,
            sample_height: 64,
            sample_width: 96,
            ..Self::default()
        }
    }

    /// Spatial compression factor: `2^(len(block_out_channels) - 1)`.
    pub fn spatial_compression(&self) -> usize {
        1 << self.block_out_channels.len().saturating_sub(1)
    }

    /// `int(log2(temporal_compression_ratio))`: how many blocks compress time.
    pub fn temporal_compress_level(&self) -> usize {
        self.temporal_compression_ratio.log2().floor().max(0.0) as usize
    }

    /// Checks every value this implementation relies on; errors name `file` and the key.
    pub fn validate(&self, file: &Path) -> vdit_core::Result<()> {
        let n = self.block_out_channels.len();
        ensure(self.in_channels > 0, file, "in_channels", || {
            "must be positive, found 0".into()
        })?;
        ensure(self.out_channels > 0, file, "out_channels", || {
            "must be positive, found 0".into()
        })?;
        ensure(self.latent_channels > 0, file, "latent_channels", || {
            "must be positive, found 0".into()
        })?;
        ensure(n > 0, file, "block_out_channels", || {
            "must not be empty".into()
        })?;
        ensure(self.norm_num_groups > 0, file, "norm_num_groups", || {
            "must be positive, found 0".into()
        })?;
        for (i, &c) in self.block_out_channels.iter().enumerate() {
            ensure(
                c > 0 && c % self.norm_num_groups == 0,
                file,
                "block_out_channels",
                || {
                    format!(
                    "entry {i} is {c}: every entry must be a positive multiple of norm_num_groups ({})",
                    self.norm_num_groups
                )
                },
            )?;
        }
        ensure(self.layers_per_block > 0, file, "layers_per_block", || {
            "must be at least 1, found 0".into()
        })?;
        ensure(
            self.down_block_types.len() == n,
            file,
            "down_block_types",
            || {
                format!(
                    "expected {n} entries (one per block_out_channels), found {}",
                    self.down_block_types.len()
                )
            },
        )?;
        ensure(
            self.up_block_types.len() == n,
            file,
            "up_block_types",
            || {
                format!(
                    "expected {n} entries (one per block_out_channels), found {}",
                    self.up_block_types.len()
                )
            },
        )?;
        if let Some(t) = self.down_block_types.iter().find(|t| *t != DOWN_BLOCK) {
            return Err(vdit_core::Error::config(
                file,
                "down_block_types",
                format!("expected \"{DOWN_BLOCK}\", found \"{t}\""),
            ));
        }
        if let Some(t) = self.up_block_types.iter().find(|t| *t != UP_BLOCK) {
            return Err(vdit_core::Error::config(
                file,
                "up_block_types",
                format!("expected \"{UP_BLOCK}\", found \"{t}\""),
            ));
        }
        ensure(
            matches!(self.act_fn.as_str(), "silu" | "swish"),
            file,
            "act_fn",
            || format!("only \"silu\" is supported, found \"{}\"", self.act_fn),
        )?;
        ensure(
            self.norm_eps.is_finite() && self.norm_eps > 0.0,
            file,
            "norm_eps",
            || format!("must be a positive number, found {}", self.norm_eps),
        )?;
        let r = self.temporal_compression_ratio;
        ensure(
            r >= 1.0 && r.log2().fract() == 0.0,
            file,
            "temporal_compression_ratio",
            || format!("must be a power of two >= 1, found {r}"),
        )?;
        ensure(
            self.scaling_factor.is_finite() && self.scaling_factor > 0.0,
            file,
            "scaling_factor",
            || format!("must be a positive number, found {}", self.scaling_factor),
        )?;
        let min = 2 * self.spatial_compression();
        ensure(self.sample_height >= min, file, "sample_height", || {
            format!(
                "must be at least {min} (two latent pixels per half-size tile), found {}",
                self.sample_height
            )
        })?;
        ensure(self.sample_width >= min, file, "sample_width", || {
            format!(
                "must be at least {min} (two latent pixels per half-size tile), found {}",
                self.sample_width
            )
        })?;
        ensure(!self.use_quant_conv, file, "use_quant_conv", || {
            "true is not supported (no CogVideoX VAE uses it)".into()
        })?;
        ensure(
            !self.use_post_quant_conv,
            file,
            "use_post_quant_conv",
            || "true is not supported (no CogVideoX VAE uses it)".into(),
        )?;
        Ok(())
    }
}

/// Tiling settings, with diffusers' attribute names (`enable_tiling` arguments).
#[derive(Debug, Clone, PartialEq)]
pub struct TileOptions {
    /// Whether `encode` / `decode` tile inputs larger than one tile.
    pub enabled: bool,
    pub tile_sample_min_height: usize,
    pub tile_sample_min_width: usize,
    pub tile_overlap_factor_height: f64,
    pub tile_overlap_factor_width: f64,
}

impl TileOptions {
    /// diffusers' defaults: half the sample size, overlaps 1/6 (height) and 1/5 (width); enabled.
    pub fn for_config(cfg: &AutoencoderKLCogVideoXConfig) -> Self {
        Self {
            enabled: true,
            tile_sample_min_height: cfg.sample_height / 2,
            tile_sample_min_width: cfg.sample_width / 2,
            tile_overlap_factor_height: 1.0 / 6.0,
            tile_overlap_factor_width: 1.0 / 5.0,
        }
    }

    /// `int(tile_sample_min / 2^(blocks-1))` for height and width.
    pub fn latent_min(&self, spatial_compression: usize) -> (usize, usize) {
        (
            self.tile_sample_min_height / spatial_compression,
            self.tile_sample_min_width / spatial_compression,
        )
    }

    /// The tile grids as diffusers derives them, for decode (latent tiles) or encode (pixel tiles).
    fn grid(&self, spatial_compression: usize, decode: bool) -> TileGrid {
        let (lh, lw) = self.latent_min(spatial_compression);
        let (sh, sw) = (self.tile_sample_min_height, self.tile_sample_min_width);
        let (fh, fw) = (
            self.tile_overlap_factor_height,
            self.tile_overlap_factor_width,
        );
        // Python's int() of a float truncates; same f64 arithmetic as diffusers.
        let (in_h, in_w, out_h, out_w) = if decode {
            (lh, lw, sh, sw)
        } else {
            (sh, sw, lh, lw)
        };
        let blend_h = (out_h as f64 * fh) as usize;
        let blend_w = (out_w as f64 * fw) as usize;
        TileGrid {
            tile_h: in_h,
            tile_w: in_w,
            step_h: (in_h as f64 * (1.0 - fh)) as usize,
            step_w: (in_w as f64 * (1.0 - fw)) as usize,
            blend_h,
            blend_w,
            limit_h: out_h.saturating_sub(blend_h),
            limit_w: out_w.saturating_sub(blend_w),
        }
    }

    /// Whether diffusers' tiling gives the untiled output size with these tiles: each tile's
    /// kept extent must equal its step times the compression. With tiles smaller than the
    /// blend rules assume (tiny sample sizes) it does not (e.g. 64x96 decoding to 70x110).
    pub fn consistent(&self, spatial_compression: usize, decode: bool) -> bool {
        let g = self.grid(spatial_compression, decode);
        let s = spatial_compression;
        if decode {
            g.step_h * s == g.limit_h && g.step_w * s == g.limit_w
        } else {
            g.step_h == g.limit_h * s && g.step_w == g.limit_w * s
        }
    }

    fn check(&self, spatial_compression: usize) -> vdit_core::Result<()> {
        let bad = |name: &str, msg: String| Err(vdit_core::Error::invalid(name, msg));
        for (name, f) in [
            (
                "tile_overlap_factor_height",
                self.tile_overlap_factor_height,
            ),
            ("tile_overlap_factor_width", self.tile_overlap_factor_width),
        ] {
            if !(0.0..1.0).contains(&f) {
                return bad(name, format!("must be in [0, 1), found {f}"));
            }
        }
        for decode in [true, false] {
            let g = self.grid(spatial_compression, decode);
            if g.tile_h == 0 || g.step_h == 0 || g.limit_h == 0 {
                return bad(
                    "tile_sample_min_height",
                    format!(
                        "{} with overlap {} gives an empty tile or tile step (need at least {} px per latent pixel)",
                        self.tile_sample_min_height, self.tile_overlap_factor_height, spatial_compression
                    ),
                );
            }
            if g.tile_w == 0 || g.step_w == 0 || g.limit_w == 0 {
                return bad(
                    "tile_sample_min_width",
                    format!(
                        "{} with overlap {} gives an empty tile or tile step (need at least {} px per latent pixel)",
                        self.tile_sample_min_width, self.tile_overlap_factor_width, spatial_compression
                    ),
                );
            }
        }
        Ok(())
    }
}

/// One tiling pass: input tile size and step, output blend extents and kept sizes.
#[derive(Debug, Clone, Copy)]
struct TileGrid {
    tile_h: usize,
    tile_w: usize,
    step_h: usize,
    step_w: usize,
    blend_h: usize,
    blend_w: usize,
    limit_h: usize,
    limit_w: usize,
}

/// The posterior `N(mean, exp(logvar))` of `encode`, `[B, latent, F', h, w]` each.
#[derive(Debug, Clone)]
pub struct DiagonalGaussian {
    pub mean: Tensor,
    /// Clamped to [-30, 20] as diffusers does.
    pub logvar: Tensor,
}

impl DiagonalGaussian {
    /// The mean (what the pipelines use).
    pub fn mode(&self) -> Tensor {
        self.mean.clone()
    }

    /// `exp(0.5 * logvar)`.
    pub fn std(&self) -> candle_core::Result<Tensor> {
        (&self.logvar * 0.5)?.exp()
    }

    /// `mean + std * noise` with caller-supplied standard-normal `noise` of the mean's shape.
    pub fn sample(&self, noise: &Tensor) -> candle_core::Result<Tensor> {
        self.mean.add(&self.std()?.mul(noise)?)
    }
}

// ------------------------------------------------------------------------------------------ layers

/// Conv caches, one slot per causal conv (kt = 3) of the encoder or decoder, carried from one
/// frame batch to the next. `keep` is false on the last batch, whose caches nobody reads (this
/// saves their memory: 2 frames per conv, ~1.3 GB at 240x360 for the real decoder).
struct Cache {
    slots: Vec<Option<Video>>,
    keep: bool,
}

impl Cache {
    fn new(n: usize) -> Self {
        Self {
            slots: (0..n).map(|_| None).collect(),
            keep: true,
        }
    }
}

fn f32_param(vb: &VarBuilder, shape: &[usize], name: &str) -> candle_core::Result<Vec<f32>> {
    conv3d::to_f32_vec(&vb.get(shape, name)?)
}

fn conv_weights(
    vb: &VarBuilder,
    cin: usize,
    cout: usize,
    k: &[usize],
) -> candle_core::Result<ConvWeights> {
    let mut dims = vec![cout, cin];
    dims.extend_from_slice(k);
    let w = f32_param(vb, &dims, "weight")?;
    let b = f32_param(vb, &[cout], "bias")?;
    Ok(ConvWeights::from_torch(&w, &dims, b))
}

/// `CogVideoXCausalConv3d` with a 3x3x3 kernel (`pad_mode="first"`): the conv sees the cached
/// last two padded input frames of the previous call, or frame 0 twice on the first call.
struct CausalConv3d {
    w: ConvWeights,
    slot: usize,
}

impl CausalConv3d {
    fn new(
        vb: VarBuilder,
        cin: usize,
        cout: usize,
        slots: &mut usize,
    ) -> candle_core::Result<Self> {
        let w = conv_weights(&vb.pp("conv"), cin, cout, &[3, 3, 3])?;
        *slots += 1;
        Ok(Self {
            w,
            slot: *slots - 1,
        })
    }

    /// `x` `[T, H, W, Cin]` read through `pre` -> `[T, H, W, Cout]` (added into `acc` when
    /// given); updates the cache slot.
    fn forward(&self, x: &Video, pre: &Pre, cache: &mut Cache, acc: Option<Video>) -> Video {
        let src = Source { x, up: None, pre };
        let prev = cache.slots[self.slot].take();
        let front = match &prev {
            Some(c) => Front::Cache(c),
            None => Front::ReplicateFirst,
        };
        let out = match acc {
            Some(acc) => conv3d::conv_add(&src, &front, &self.w, Geom::same(1), acc),
            None => conv3d::conv(&src, &front, &self.w, Geom::same(1)),
        };
        if cache.keep {
            let tv = x.t + 2;
            cache.slots[self.slot] = Some(conv3d::virtual_frames(&src, &front, 2, tv - 2..tv));
        }
        out
    }
}

/// `nn.GroupNorm` over one call's clip.
struct GroupNorm {
    gamma: Vec<f32>,
    beta: Vec<f32>,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    fn new(vb: VarBuilder, c: usize, groups: usize, eps: f64) -> candle_core::Result<Self> {
        Ok(Self {
            gamma: f32_param(&vb, &[c], "weight")?,
            beta: f32_param(&vb, &[c], "bias")?,
            groups,
            eps,
        })
    }

    fn affine(&self, x: &Video) -> (Vec<f32>, Vec<f32>) {
        video::group_norm_affine(x, self.groups, self.eps, &self.gamma, &self.beta)
    }
}

/// `CogVideoXSpatialNorm3D`: `GroupNorm(f) * conv_y(zq) + conv_b(zq)` with zq nearest-resized
/// to f. Both 1x1x1 convs commute with the nearest resize, so they run at latent resolution and
/// the resize becomes an index map read by the next convolution.
struct SpatialNorm3D {
    norm: GroupNorm,
    conv_y: ConvWeights,
    conv_b: ConvWeights,
}

impl SpatialNorm3D {
    fn new(
        vb: VarBuilder,
        f_channels: usize,
        zq_channels: usize,
        groups: usize,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            norm: GroupNorm::new(vb.pp("norm_layer"), f_channels, groups, 1e-6)?,
            conv_y: conv_weights(
                &vb.pp("conv_y").pp("conv"),
                zq_channels,
                f_channels,
                &[1, 1, 1],
            )?,
            conv_b: conv_weights(
                &vb.pp("conv_b").pp("conv"),
                zq_channels,
                f_channels,
                &[1, 1, 1],
            )?,
        })
    }

    fn prepare(&self, f: &Video, zq: &Video) -> Prepared {
        let (scale, shift) = self.norm.affine(f);
        let y = conv3d::pointwise(zq, &self.conv_y); // [Tz, hz, wz, Cf]
        let b = conv3d::pointwise(zq, &self.conv_b); // [Tz, hz, wz, Cf]
                                                     // zq frames -> f frames; with an odd f frame count > 1 frame 0 is resized on its own.
        let tmap = if f.t > 1 && f.t % 2 == 1 {
            let rest = zq.t.saturating_sub(1).max(1);
            std::iter::once(0)
                .chain(
                    nearest_map(rest, f.t - 1)
                        .into_iter()
                        .map(|i| (1 + i).min(zq.t - 1)),
                )
                .collect()
        } else {
            nearest_map(zq.t, f.t)
        };
        Prepared::Spatial {
            scale,
            shift,
            y,
            b,
            tmap,
            hmap: nearest_map(zq.h, f.h),
            wmap: nearest_map(zq.w, f.w),
        }
    }
}

/// A norm's parameters for one call, ready to be fused into the next convolution.
enum Prepared {
    Affine(Vec<f32>, Vec<f32>),
    Spatial {
        scale: Vec<f32>,
        shift: Vec<f32>,
        y: Video,
        b: Video,
        tmap: Vec<usize>,
        hmap: Vec<usize>,
        wmap: Vec<usize>,
    },
}

impl Prepared {
    /// The norm followed by SiLU.
    fn pre_silu(&self) -> Pre<'_> {
        match self {
            Prepared::Affine(scale, shift) => Pre::Affine {
                scale,
                shift,
                silu: true,
            },
            Prepared::Spatial {
                scale,
                shift,
                y,
                b,
                tmap,
                hmap,
                wmap,
            } => Pre::Spatial {
                scale,
                shift,
                y,
                b,
                tmap,
                hmap,
                wmap,
                silu: true,
            },
        }
    }
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
    ) -> candle_core::Result<Self> {
        Ok(match spatial_dim {
            None => Norm::Group(GroupNorm::new(vb, c, groups, eps)?),
            Some(zc) => Norm::Spatial(SpatialNorm3D::new(vb, c, zc, groups)?),
        })
    }

    fn prepare(&self, f: &Video, zq: Option<&Video>) -> Prepared {
        match (self, zq) {
            (Norm::Group(g), _) => {
                let (s, b) = g.affine(f);
                Prepared::Affine(s, b)
            }
            (Norm::Spatial(s), Some(zq)) => s.prepare(f, zq),
            (Norm::Spatial(_), None) => {
                unreachable!("spatial norms exist only in the decoder, which passes zq")
            }
        }
    }
}

/// `CogVideoXResnetBlock3D` (no time embedding, no dropout at inference, 1x1x1 shortcut).
struct ResnetBlock3D {
    norm1: Norm,
    conv1: CausalConv3d,
    norm2: Norm,
    conv2: CausalConv3d,
    shortcut: Option<ConvWeights>,
}

impl ResnetBlock3D {
    fn new(
        vb: VarBuilder,
        cin: usize,
        cout: usize,
        groups: usize,
        eps: f64,
        spatial_dim: Option<usize>,
        slots: &mut usize,
    ) -> candle_core::Result<Self> {
        Ok(Self {
            norm1: Norm::new(vb.pp("norm1"), cin, groups, eps, spatial_dim)?,
            conv1: CausalConv3d::new(vb.pp("conv1"), cin, cout, slots)?,
            norm2: Norm::new(vb.pp("norm2"), cout, groups, eps, spatial_dim)?,
            conv2: CausalConv3d::new(vb.pp("conv2"), cout, cout, slots)?,
            shortcut: if cin != cout {
                Some(conv_weights(
                    &vb.pp("conv_shortcut"),
                    cin,
                    cout,
                    &[1, 1, 1],
                )?)
            } else {
                None
            },
        })
    }

    /// `x` `[T, H, W, Cin]` -> `[T, H, W, Cout]`: `conv2(act(norm2(conv1(act(norm1(x)))))) + shortcut(x)`,
    /// norms and SiLU fused into the convs that read them.
    fn forward(&self, x: Video, zq: Option<&Video>, cache: &mut Cache) -> Video {
        let n1 = self.norm1.prepare(&x, zq);
        let h = self.conv1.forward(&x, &n1.pre_silu(), cache, None); // [T, H, W, Cout]
        drop(n1);
        let n2 = self.norm2.prepare(&h, zq);
        match &self.shortcut {
            Some(w) => {
                let mut out = self.conv2.forward(&h, &n2.pre_silu(), cache, None);
                drop((h, n2));
                conv3d::pointwise_add(&x, w, &mut out);
                out
            }
            // same channels: conv2's output is added straight into x's buffer
            None => self.conv2.forward(&h, &n2.pre_silu(), cache, Some(x)),
        }
    }
}

/// `CogVideoXDownsample3D`: optional temporal average pooling, then zero-pad right/bottom by one
/// and a 3x3 stride-2 Conv2d per frame.
struct Downsample {
    w: ConvWeights,
    compress_time: bool,
}

impl Downsample {
    fn forward(&self, x: Video) -> Video {
        let x = if self.compress_time {
            video::time_avg_pool(&x)
        } else {
            x
        };
        let g = Geom {
            stride: 2,
            pad_top: 0,
            pad_left: 0,
            pad_bottom: 1,
            pad_right: 1,
        };
        conv3d::conv(
            &Source {
                x: &x,
                up: None,
                pre: &Pre::Identity,
            },
            &Front::None,
            &self.w,
            g,
        )
    }
}

/// `CogVideoXUpsample3D`: nearest x2 (in time too when compressing time, frame 0 alone when the
/// frame count is odd), then a 3x3 Conv2d per frame; the upsampling is an index map.
struct Upsample {
    w: ConvWeights,
    compress_time: bool,
}

impl Upsample {
    fn forward(&self, x: &Video) -> Video {
        let t = x.t;
        let tmap: Vec<usize> = if !self.compress_time || t == 1 {
            (0..t).collect()
        } else if t % 2 == 1 {
            // [first] + nearest x2 of the rest: 1 + 2 (T - 1) frames
            std::iter::once(0)
                .chain((0..2 * (t - 1)).map(|j| 1 + j / 2))
                .collect()
        } else {
            (0..2 * t).map(|j| j / 2).collect()
        };
        let up = UpMaps {
            tmap,
            hmap: (0..2 * x.h).map(|i| i / 2).collect(),
            wmap: (0..2 * x.w).map(|i| i / 2).collect(),
        };
        conv3d::conv(
            &Source {
                x,
                up: Some(&up),
                pre: &Pre::Identity,
            },
            &Front::None,
            &self.w,
            Geom::same(1),
        )
    }
}

struct DownBlock {
    resnets: Vec<ResnetBlock3D>,
    down: Option<Downsample>,
}

struct UpBlock {
    resnets: Vec<ResnetBlock3D>,
    up: Option<Upsample>,
}

/// `CogVideoXEncoder3D`.
struct Encoder {
    conv_in: CausalConv3d,
    down_blocks: Vec<DownBlock>,
    mid: Vec<ResnetBlock3D>,
    norm_out: GroupNorm,
    conv_out: CausalConv3d,
    slots: usize,
}

impl Encoder {
    fn new(cfg: &AutoencoderKLCogVideoXConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let ch = &cfg.block_out_channels;
        let (g, eps) = (cfg.norm_num_groups, cfg.norm_eps);
        let mut slots = 0;
        let conv_in = CausalConv3d::new(vb.pp("conv_in"), cfg.in_channels, ch[0], &mut slots)?;
        let level = cfg.temporal_compress_level();
        let mut down_blocks = Vec::with_capacity(ch.len());
        let mut cin = ch[0];
        for (i, &cout) in ch.iter().enumerate() {
            let vbb = vb.pp("down_blocks").pp(i);
            let mut resnets = Vec::with_capacity(cfg.layers_per_block);
            for l in 0..cfg.layers_per_block {
                let rin = if l == 0 { cin } else { cout };
                resnets.push(ResnetBlock3D::new(
                    vbb.pp("resnets").pp(l),
                    rin,
                    cout,
                    g,
                    eps,
                    None,
                    &mut slots,
                )?);
            }
            let down = if i + 1 < ch.len() {
                let w = conv_weights(
                    &vbb.pp("downsamplers").pp(0).pp("conv"),
                    cout,
                    cout,
                    &[3, 3],
                )?;
                Some(Downsample {
                    w,
                    compress_time: i < level,
                })
            } else {
                None
            };
            down_blocks.push(DownBlock { resnets, down });
            cin = cout;
        }
        let c = *ch.last().expect("validated non-empty");
        let mut mid = Vec::with_capacity(2);
        for l in 0..2 {
            mid.push(ResnetBlock3D::new(
                vb.pp("mid_block").pp("resnets").pp(l),
                c,
                c,
                g,
                eps,
                None,
                &mut slots,
            )?);
        }
        let norm_out = GroupNorm::new(vb.pp("norm_out"), c, g, 1e-6)?;
        let conv_out =
            CausalConv3d::new(vb.pp("conv_out"), c, 2 * cfg.latent_channels, &mut slots)?;
        Ok(Self {
            conv_in,
            down_blocks,
            mid,
            norm_out,
            conv_out,
            slots,
        })
    }

    /// One frame batch `[T, H, W, 3]` -> `[T', h, w, 2 * latent]`.
    fn forward(&self, x: &Video, cache: &mut Cache) -> Video {
        let mut h = self.conv_in.forward(x, &Pre::Identity, cache, None); // [T, H, W, C0]
        for blk in &self.down_blocks {
            for r in &blk.resnets {
                h = r.forward(h, None, cache);
            }
            if let Some(d) = &blk.down {
                h = d.forward(h);
            }
        }
        for r in &self.mid {
            h = r.forward(h, None, cache);
        }
        let (scale, shift) = self.norm_out.affine(&h);
        let pre = Pre::Affine {
            scale: &scale,
            shift: &shift,
            silu: true,
        };
        self.conv_out.forward(&h, &pre, cache, None) // [T', h, w, 2 * latent]
    }
}

/// `CogVideoXDecoder3D`.
struct Decoder {
    conv_in: CausalConv3d,
    mid: Vec<ResnetBlock3D>,
    up_blocks: Vec<UpBlock>,
    norm_out: SpatialNorm3D,
    conv_out: CausalConv3d,
    slots: usize,
}

impl Decoder {
    fn new(cfg: &AutoencoderKLCogVideoXConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        let rev: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let (g, zc) = (cfg.norm_num_groups, cfg.latent_channels);
        let mut slots = 0;
        let conv_in = CausalConv3d::new(vb.pp("conv_in"), zc, rev[0], &mut slots)?;
        let mut mid = Vec::with_capacity(2);
        for l in 0..2 {
            let vbr = vb.pp("mid_block").pp("resnets").pp(l);
            mid.push(ResnetBlock3D::new(
                vbr,
                rev[0],
                rev[0],
                g,
                1e-6,
                Some(zc),
                &mut slots,
            )?);
        }
        let level = cfg.temporal_compress_level();
        let mut up_blocks = Vec::with_capacity(rev.len());
        let mut cin = rev[0];
        for (i, &cout) in rev.iter().enumerate() {
            let vbb = vb.pp("up_blocks").pp(i);
            let mut resnets = Vec::with_capacity(cfg.layers_per_block + 1);
            for l in 0..cfg.layers_per_block + 1 {
                let rin = if l == 0 { cin } else { cout };
                resnets.push(ResnetBlock3D::new(
                    vbb.pp("resnets").pp(l),
                    rin,
                    cout,
                    g,
                    1e-6,
                    Some(zc),
                    &mut slots,
                )?);
            }
            let up = if i + 1 < rev.len() {
                let w = conv_weights(&vbb.pp("upsamplers").pp(0).pp("conv"), cout, cout, &[3, 3])?;
                Some(Upsample {
                    w,
                    compress_time: i < level,
                })
            } else {
                None
            };
            up_blocks.push(UpBlock { resnets, up });
            cin = cout;
        }
        let c = *rev.last().expect("validated non-empty");
        let norm_out = SpatialNorm3D::new(vb.pp("norm_out"), c, zc, g)?;
        let conv_out = CausalConv3d::new(vb.pp("conv_out"), c, cfg.out_channels, &mut slots)?;
        Ok(Self {
            conv_in,
            mid,
            up_blocks,
            norm_out,
            conv_out,
            slots,
        })
    }

    /// One latent frame batch `z` `[T, h, w, latent]` -> `[T', H, W, out]`.
    fn forward(&self, z: &Video, cache: &mut Cache) -> Video {
        let mut h = self.conv_in.forward(z, &Pre::Identity, cache, None); // [T, h, w, C_last]
        for r in &self.mid {
            h = r.forward(h, Some(z), cache);
        }
        for blk in &self.up_blocks {
            for r in &blk.resnets {
                h = r.forward(h, Some(z), cache);
            }
            if let Some(u) = &blk.up {
                h = u.forward(&h);
            }
        }
        let n = self.norm_out.prepare(&h, z);
        self.conv_out.forward(&h, &n.pre_silu(), cache, None) // [T, H, W, out]
    }
}

// ------------------------------------------------------------------------------------------ model

/// Frame ranges of diffusers' frame batching: `max(n / bs, 1)` calls, the remainder `n % bs`
/// going to the first call (ranges clamped to `n`).
pub fn frame_batches(n: usize, bs: usize) -> Vec<std::ops::Range<usize>> {
    let calls = (n / bs).max(1);
    let rem = n % bs;
    (0..calls)
        .map(|i| {
            let start = bs * i + if i == 0 { 0 } else { rem };
            let end = (bs * (i + 1) + rem).min(n);
            start..end
        })
        .collect()
}

/// A channels-first `[C, T, H, W]` block of one sample.
#[derive(Debug, Clone, Default)]
struct Chw {
    c: usize,
    t: usize,
    h: usize,
    w: usize,
    data: Vec<f32>,
}

impl Chw {
    fn from_video(v: &Video) -> Self {
        Self {
            c: v.c,
            t: v.t,
            h: v.h,
            w: v.w,
            data: v.to_cthw(),
        }
    }
}

/// diffusers' `blend_v`: the first `ext` rows of `b` ramp from the last rows of `a` (in place).
fn blend_v(a: &Chw, b: &mut Chw, ext: usize) {
    let ext = ext.min(a.h).min(b.h);
    for y in 0..ext {
        let wb = (y as f64 / ext as f64) as f32;
        let wa = (1.0 - y as f64 / ext as f64) as f32;
        for ct in 0..b.c * b.t {
            let ra = &a.data[(ct * a.h + a.h - ext + y) * a.w..][..a.w];
            let rb = &mut b.data[(ct * b.h + y) * b.w..][..b.w];
            rb.iter_mut()
                .zip(ra)
                .for_each(|(q, &p)| *q = p * wa + *q * wb);
        }
    }
}

/// diffusers' `blend_h`: the first `ext` columns of `b` ramp from the last columns of `a`.
fn blend_h(a: &Chw, b: &mut Chw, ext: usize) {
    let ext = ext.min(a.w).min(b.w);
    for x in 0..ext {
        let wb = (x as f64 / ext as f64) as f32;
        let wa = (1.0 - x as f64 / ext as f64) as f32;
        for row in 0..b.c * b.t * b.h {
            let p = a.data[row * a.w + a.w - ext + x];
            let q = &mut b.data[row * b.w + x];
            *q = p * wa + *q * wb;
        }
    }
}

/// Blends a grid of tiles in diffusers' order (each tile blended in place with its already
/// blended upper and left neighbours), crops each to `limit_h x limit_w` and concatenates.
fn blend_tiles(mut rows: Vec<Vec<Chw>>, g: &TileGrid) -> Chw {
    for i in 0..rows.len() {
        for j in 0..rows[i].len() {
            let mut tile = std::mem::take(&mut rows[i][j]);
            if i > 0 {
                blend_v(&rows[i - 1][j], &mut tile, g.blend_h);
            }
            if j > 0 {
                blend_h(&rows[i][j - 1], &mut tile, g.blend_w);
            }
            rows[i][j] = tile;
        }
    }
    let (c, t) = (rows[0][0].c, rows[0][0].t);
    let out_h: usize = rows.iter().map(|r| r[0].h.min(g.limit_h)).sum();
    let out_w: usize = rows[0].iter().map(|tile| tile.w.min(g.limit_w)).sum();
    let mut out = Chw {
        c,
        t,
        h: out_h,
        w: out_w,
        data: vec![0.0; c * t * out_h * out_w],
    };
    let mut y0 = 0;
    for row in &rows {
        let mut x0 = 0;
        let th = row[0].h.min(g.limit_h);
        for tile in row {
            let tw = tile.w.min(g.limit_w);
            for ct in 0..c * t {
                for y in 0..th {
                    let src = &tile.data[(ct * tile.h + y) * tile.w..][..tw];
                    out.data[(ct * out_h + y0 + y) * out_w + x0..][..tw].copy_from_slice(src);
                }
            }
            x0 += tw;
        }
        y0 += th;
    }
    out
}

/// `AutoencoderKLCogVideoX`: encoder, decoder, frame batching and tiling.
pub struct AutoencoderKLCogVideoX {
    cfg: AutoencoderKLCogVideoXConfig,
    encoder: Encoder,
    decoder: Decoder,
    tiling: TileOptions,
}

impl AutoencoderKLCogVideoX {
    /// Latent frames per decoder call (`num_latent_frames_batch_size`).
    pub const LATENT_FRAMES_PER_CALL: usize = 2;
    /// Video frames per encoder call (`num_sample_frames_batch_size`).
    pub const SAMPLE_FRAMES_PER_CALL: usize = 8;

    /// Builds the model from `vb` (prefixes `encoder.`, `decoder.` as in diffusers checkpoints).
    pub fn new(cfg: AutoencoderKLCogVideoXConfig, vb: VarBuilder) -> candle_core::Result<Self> {
        cfg.validate(Path::new("<AutoencoderKLCogVideoXConfig>"))
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
        let encoder = Encoder::new(&cfg, vb.pp("encoder"))?;
        let decoder = Decoder::new(&cfg, vb.pp("decoder"))?;
        let tiling = TileOptions::for_config(&cfg);
        Ok(Self {
            cfg,
            encoder,
            decoder,
            tiling,
        })
    }

    /// Loads a diffusers `vae/` folder: `config.json` and the safetensors weights. Every tensor
    /// must be used and have the expected shape; errors name the file and the key.
    pub fn load(dir: &Path, dtype: DType, dev: &Device) -> vdit_core::Result<Self> {
        let file = dir.join("config.json");
        let cfg: AutoencoderKLCogVideoXConfig = load_config(&file)?;
        cfg.validate(&file)?;
        let weights = Arc::new(Weights::from_dir(dir)?);
        let model = Self::new(cfg, weights.var_builder(dtype, dev)).map_err(build_error)?;
        weights.check_all_used(&[])?;
        Ok(model)
    }

    pub fn config(&self) -> &AutoencoderKLCogVideoXConfig {
        &self.cfg
    }

    /// Turns automatic tiling on or off (on by default, as the CogVideoX pipelines use it).
    pub fn set_tiling(&mut self, enabled: bool) {
        self.tiling.enabled = enabled;
    }

    /// Sets the tile size and overlaps (diffusers' `enable_tiling` arguments); checked.
    pub fn set_tile_options(&mut self, opts: TileOptions) -> vdit_core::Result<()> {
        opts.check(self.cfg.spatial_compression())?;
        self.tiling = opts;
        Ok(())
    }

    pub fn tile_options(&self) -> &TileOptions {
        &self.tiling
    }

    /// Encodes `x` `[B, in_channels, F, H, W]` (values in [-1, 1]) into the posterior
    /// `[B, latent, F', H/8, W/8]`; tiles when tiling is on and H or W exceeds the tile.
    pub fn encode(&self, x: &Tensor) -> candle_core::Result<DiagonalGaussian> {
        let (_, _, _, h, w) = self.check_input(x, self.cfg.in_channels, "encode")?;
        let tile = self.tiling.enabled
            && (w > self.tiling.tile_sample_min_width || h > self.tiling.tile_sample_min_height);
        let tile = tile && self.tiles_fit(false, h, w);
        self.encode_impl(x, tile)
    }

    /// As [`Self::encode`], never tiling.
    pub fn encode_plain(&self, x: &Tensor) -> candle_core::Result<DiagonalGaussian> {
        self.check_input(x, self.cfg.in_channels, "encode")?;
        self.encode_impl(x, false)
    }

    /// Decodes `z` `[B, latent, F, h, w]` (already divided by `scaling_factor`) into unclamped
    /// pixels `[B, out_channels, F', 8h, 8w]`; tiles when tiling is on and h or w exceeds the
    /// latent tile (30x45 for 480x720 models).
    pub fn decode(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        let (_, _, _, h, w) = self.check_input(z, self.cfg.latent_channels, "decode")?;
        let (lh, lw) = self.tiling.latent_min(self.cfg.spatial_compression());
        let tile = self.tiling.enabled && (w > lw || h > lh);
        let tile = tile && self.tiles_fit(true, h, w);
        self.decode_impl(z, tile)
    }

    /// As [`Self::decode`], never tiling.
    pub fn decode_plain(&self, z: &Tensor) -> candle_core::Result<Tensor> {
        self.check_input(z, self.cfg.latent_channels, "decode")?;
        self.decode_impl(z, false)
    }

    /// False (with a warning) when this VAE's tiles would give a wrongly sized output
    /// (see [`TileOptions::consistent`]): the input is then processed untiled.
    fn tiles_fit(&self, decode: bool, h: usize, w: usize) -> bool {
        let ok = self
            .tiling
            .consistent(self.cfg.spatial_compression(), decode);
        if !ok {
            tracing::warn!(
                what = if decode { "decode" } else { "encode" },
                height = h,
                width = w,
                tile_height = self.tiling.tile_sample_min_height,
                tile_width = self.tiling.tile_sample_min_width,
                "tiles this small would change the output size (as they do in diffusers); running untiled"
            );
        }
        ok
    }

    fn check_input(
        &self,
        x: &Tensor,
        c: usize,
        what: &str,
    ) -> candle_core::Result<(usize, usize, usize, usize, usize)> {
        let dims = match x.dims() {
            &[b, ch, f, h, w] => (b, ch, f, h, w),
            d => {
                candle_core::bail!("{what}: expected a [B, {c}, F, H, W] tensor, found shape {d:?}")
            }
        };
        let (b, ch, f, h, w) = dims;
        if ch != c {
            candle_core::bail!(
                "{what}: expected {c} channels (dim 1), found shape {:?}",
                x.dims()
            );
        }
        if b == 0 || f == 0 || h == 0 || w == 0 {
            candle_core::bail!("{what}: empty input of shape {:?}", x.dims());
        }
        if what == "encode" {
            // each downsampling conv needs 2 pixels (3x3 stride 2 after padding by one)
            let (mut hh, mut ww) = (h, w);
            for _ in 1..self.cfg.block_out_channels.len() {
                if hh < 2 || ww < 2 {
                    candle_core::bail!("encode: frames of {h}x{w} are too small for this VAE");
                }
                hh = (hh - 2) / 2 + 1;
                ww = (ww - 2) / 2 + 1;
            }
        }
        Ok(dims)
    }

    fn encode_impl(&self, x: &Tensor, tile: bool) -> candle_core::Result<DiagonalGaussian> {
        let b = x.dim(0)?;
        let lc = self.cfg.latent_channels;
        let mut mean = Vec::new();
        let mut logvar = Vec::new();
        let mut shape = (0, 0, 0);
        for i in 0..b {
            let v = Video::from_ncthw(x, i)?;
            let enc = if tile {
                self.tiled_encode_video(&v)?
            } else {
                Chw::from_video(&self.encode_video(&v))
            };
            // channels [0, lc) are the mean, [lc, 2lc) the log-variance (clamped)
            let n = enc.t * enc.h * enc.w;
            mean.extend_from_slice(&enc.data[..lc * n]);
            logvar.extend(enc.data[lc * n..].iter().map(|v| v.clamp(-30.0, 20.0)));
            shape = (enc.t, enc.h, enc.w);
        }
        let (t, h, w) = shape;
        let to = |d: Vec<f32>| {
            Tensor::from_vec(d, (b, lc, t, h, w), &Device::Cpu)?
                .to_dtype(x.dtype())?
                .to_device(x.device())
        };
        Ok(DiagonalGaussian {
            mean: to(mean)?,
            logvar: to(logvar)?,
        })
    }

    fn decode_impl(&self, z: &Tensor, tile: bool) -> candle_core::Result<Tensor> {
        let b = z.dim(0)?;
        let mut out = Vec::new();
        let mut shape = (0, 0, 0, 0);
        for i in 0..b {
            let v = Video::from_ncthw(z, i)?;
            let dec = if tile {
                self.tiled_decode_video(&v)?
            } else {
                Chw::from_video(&self.decode_video(&v))
            };
            shape = (dec.c, dec.t, dec.h, dec.w);
            if b == 1 {
                out = dec.data; // no copy of a possibly large single video
            } else {
                out.extend_from_slice(&dec.data);
            }
        }
        let (c, t, h, w) = shape; // [B, C, F', H, W]
        Tensor::from_vec(out, (b, c, t, h, w), &Device::Cpu)?
            .to_dtype(z.dtype())?
            .to_device(z.device())
    }

    /// Frame-batched encoder over one sample `[F, H, W, 3]` -> `[F', h, w, 2 * latent]`.
    fn encode_video(&self, v: &Video) -> Video {
        let _span = tracing::debug_span!("vae_encode", t = v.t, h = v.h, w = v.w).entered();
        let mut cache = Cache::new(self.encoder.slots);
        let batches = frame_batches(v.t, Self::SAMPLE_FRAMES_PER_CALL);
        let n = batches.len();
        let parts: Vec<Video> = batches
            .into_iter()
            .enumerate()
            .map(|(i, r)| {
                cache.keep = i + 1 < n;
                self.encoder.forward(&v.frames(r.start, r.end), &mut cache)
            })
            .collect();
        Video::cat_time(&parts)
    }

    /// Frame-batched decoder over one sample `[F, h, w, latent]` -> `[F', H, W, out]`.
    fn decode_video(&self, z: &Video) -> Video {
        let _span = tracing::debug_span!("vae_decode", t = z.t, h = z.h, w = z.w).entered();
        let mut cache = Cache::new(self.decoder.slots);
        let batches = frame_batches(z.t, Self::LATENT_FRAMES_PER_CALL);
        let n = batches.len();
        let parts: Vec<Video> = batches
            .into_iter()
            .enumerate()
            .map(|(i, r)| {
                cache.keep = i + 1 < n;
                self.decoder.forward(&z.frames(r.start, r.end), &mut cache)
            })
            .collect();
        Video::cat_time(&parts)
    }

    /// diffusers' `tiled_decode` for one sample.
    fn tiled_decode_video(&self, z: &Video) -> candle_core::Result<Chw> {
        let g = self.tiling.grid(self.cfg.spatial_compression(), true);
        let rows = (0..z.h)
            .step_by(g.step_h)
            .map(|i| {
                (0..z.w)
                    .step_by(g.step_w)
                    .map(|j| {
                        let tile = z.crop(i, (i + g.tile_h).min(z.h), j, (j + g.tile_w).min(z.w));
                        Chw::from_video(&self.decode_video(&tile))
                    })
                    .collect()
            })
            .collect();
        Ok(blend_tiles(rows, &g))
    }

    /// diffusers' `tiled_encode` for one sample.
    fn tiled_encode_video(&self, x: &Video) -> candle_core::Result<Chw> {
        let g = self.tiling.grid(self.cfg.spatial_compression(), false);
        let mut rows = Vec::new();
        for i in (0..x.h).step_by(g.step_h) {
            let mut row = Vec::new();
            for j in (0..x.w).step_by(g.step_w) {
                let (h1, w1) = ((i + g.tile_h).min(x.h), (j + g.tile_w).min(x.w));
                if h1 - i < 2 || w1 - j < 2 {
                    candle_core::bail!(
                        "encode: a {}x{} edge tile at ({i}, {j}) is too small to encode",
                        h1 - i,
                        w1 - j
                    );
                }
                row.push(Chw::from_video(&self.encode_video(&x.crop(i, h1, j, w1))));
            }
            rows.push(row);
        }
        Ok(blend_tiles(rows, &g))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_batches_match_diffusers() {
        let r = |v: Vec<std::ops::Range<usize>>| {
            v.into_iter().map(|r| (r.start, r.end)).collect::<Vec<_>>()
        };
        assert_eq!(
            r(frame_batches(49, 8)),
            vec![(0, 9), (9, 17), (17, 25), (25, 33), (33, 41), (41, 49)]
        );
        assert_eq!(
            r(frame_batches(13, 2)),
            vec![(0, 3), (3, 5), (5, 7), (7, 9), (9, 11), (11, 13)]
        );
        assert_eq!(r(frame_batches(1, 2)), vec![(0, 1)]);
        assert_eq!(r(frame_batches(17, 8)), vec![(0, 9), (9, 17)]);
        assert_eq!(r(frame_batches(5, 8)), vec![(0, 5)]);
    }

    #[test]
    fn default_tile_grid_matches_readme() {
        let t = TileOptions::for_config(&AutoencoderKLCogVideoXConfig::cogvideox_2b());
        assert_eq!(t.latent_min(8), (30, 45));
        let g = t.grid(8, true);
        assert_eq!(
            (g.step_h, g.step_w, g.blend_h, g.blend_w, g.limit_h, g.limit_w),
            (25, 36, 40, 72, 200, 288)
        );
        assert!(t.consistent(8, true) && t.consistent(8, false));
    }

    #[test]
    fn tiny_tiles_are_flagged_inconsistent() {
        // A 3-block VAE with sample size 64: 32 px tiles keep 27 px rows but step 24 px, so
        // diffusers' tiled output would have the wrong size; vdit then runs untiled.
        let mut cfg = AutoencoderKLCogVideoXConfig::tiny();
        cfg.block_out_channels = vec![8, 8, 8];
        cfg.sample_height = 64;
        cfg.sample_width = 64;
        let t = TileOptions::for_config(&cfg);
        assert!(!t.consistent(cfg.spatial_compression(), true));
    }
}
