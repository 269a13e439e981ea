//! The T5 encoder that conditions CogVideoX: T5 v1.1 XXL (gated-GELU feed-forward, RMS layer norm
//! without bias, relative position buckets in the first layer shared by all layers, no 1/√d
//! attention scale).
//!
//! Paper: Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified
//! Text-to-Text Transformer". Reference: transformers 5.23 `T5EncoderModel`
//! (`models/t5/modeling_t5.py`), called as diffusers' `CogVideoXPipeline._get_t5_prompt_embeds`
//! calls it: token ids only, **no attention mask**, so padding tokens are attended to.
//!
//! The network itself is candle-transformers' `t5::T5EncoderModel`, checked against the reference
//! before being reused: its gated activation for `gated-gelu` is the tanh approximation
//! (`gelu_new`); its relative-position buckets equal transformers' `_relative_position_bucket` for
//! every distance in [-600, 600] with the fixture's (8 buckets, distance 20) and T5-XXL's
//! (32, 128) settings, including the exact-integer log boundaries (16, 32, 64); its layer norm is
//! `x / sqrt(mean(x²) + eps) * w` with the variance in f32; and the parity fixture `t5_encoder`
//! matches within 1e-4. This module adds the config (transformers' `T5Config` names, validated),
//! a loader over vdit's checked weights, and input checks.
//!
//! Shapes: ids `[B, L]` (u32 or i64) → hidden states `[B, L, d_model]` in the weights' dtype.

use candle_core::{DType, Device, Tensor};
use candle_nn::{Activation, VarBuilder};
use candle_transformers::models::t5 as ct5;
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::Arc;
use vdit_core::config::{ensure, load_config};
use vdit_core::weights::{build_error, Weights};
use vdit_core::{Error, Result};

/// A checkpoint may store the token embedding twice: as `shared.weight` and, tied to it, as
/// `encoder.embed_tokens.weight`. The encoder reads `shared.weight`; the copy may go unused.
const TIED_EMBEDDING: &str = "encoder.embed_tokens.weight";

/// transformers' `T5Config`, with its field names and defaults. Fields marked "bookkeeping" are
/// read so the config round-trips and is checked for consistency, but do not change the encoder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct T5EncoderConfig {
    /// Rows of the token embedding (T5 v1.1: 32128, of which 32100 are used by the tokenizer).
    pub vocab_size: usize,
    /// Hidden size.
    pub d_model: usize,
    /// Size of one attention head (inner attention width is `num_heads * d_kv`).
    pub d_kv: usize,
    /// Feed-forward width.
    pub d_ff: usize,
    /// Encoder blocks.
    pub num_layers: usize,
    pub num_heads: usize,
    /// Relative-position buckets (half per direction); must be even and at least 4.
    pub relative_attention_num_buckets: usize,
    /// Distances at and beyond this share the last bucket.
    pub relative_attention_max_distance: usize,
    pub layer_norm_epsilon: f64,
    /// `relu`, or `gated-<act>` with act one of `gelu` (= `gelu_new`, tanh), `gelu_new`, `silu`, `relu`.
    pub feed_forward_proj: String,
    /// Bookkeeping, derived from `feed_forward_proj` by transformers; checked for consistency.
    pub dense_act_fn: Option<String>,
    /// Bookkeeping, derived from `feed_forward_proj` by transformers; checked for consistency.
    pub is_gated_act: Option<bool>,
    /// Must be false: this is the encoder stack.
    pub is_decoder: bool,
    /// Bookkeeping (training only).
    pub dropout_rate: f64,
    /// Bookkeeping (initialisation only).
    pub initializer_factor: f64,
    /// Bookkeeping.
    pub is_encoder_decoder: bool,
    /// Bookkeeping.
    pub use_cache: bool,
    /// Bookkeeping (decoder only).
    pub num_decoder_layers: Option<usize>,
    /// Bookkeeping (the tokenizer's pad id).
    pub pad_token_id: Option<i64>,
    /// Bookkeeping (an id or a list of ids).
    pub eos_token_id: Option<serde_json::Value>,
    /// Bookkeeping (decoder only).
    pub decoder_start_token_id: Option<i64>,
    /// Bookkeeping (decoder only).
    pub tie_word_embeddings: Option<bool>,
    /// Bookkeeping (decoder only).
    pub scale_decoder_outputs: Option<bool>,
    /// Bookkeeping.
    pub classifier_dropout: Option<f64>,
    /// Bookkeeping.
    pub model_type: Option<String>,
    /// Bookkeeping.
    pub architectures: Option<Vec<String>>,
    /// Bookkeeping (the dtype the checkpoint was saved in; the loader's `dtype` decides).
    pub dtype: Option<String>,
    /// Bookkeeping (older name of `dtype`).
    pub torch_dtype: Option<String>,
    /// Bookkeeping.
    pub transformers_version: Option<String>,
}

impl Default for T5EncoderConfig {
    /// transformers' `T5Config()` defaults (t5-small shaped, `relu` feed-forward).
    fn default() -> Self {
        Self {
            vocab_size: 32128,
            d_model: 512,
            d_kv: 64,
            d_ff: 2048,
            num_layers: 6,
            num_heads: 8,
            relative_attention_num_buckets: 32,
            relative_attention_max_distance: 128,
            layer_norm_epsilon: 1e-6,
            feed_forward_proj: "relu".into(),
            dense_act_fn: None,
            is_gated_act: None,
            is_decoder: false,
            dropout_rate: 0.1,
            initializer_factor: 1.0,
            is_encoder_decoder: true,
            use_cache: true,
            num_decoder_layers: None,
            pad_token_id: Some(0),
            eos_token_id: Some(serde_json::Value::from(1)),
            decoder_start_token_id: None,
            tie_word_embeddings: None,
            scale_decoder_outputs: None,
            classifier_dropout: None,
            model_type: Some("t5".into()),
            architectures: None,
            dtype: None,
            torch_dtype: None,
            transformers_version: None,
        }
    }
}

impl T5EncoderConfig {
    /// T5 v1.1 XXL, the text encoder of every CogVideoX model (4.76 B parameters in the encoder).
    pub fn t5_v1_1_xxl() -> Self {
        Self {
            vocab_size: 32128,
            d_model: 4096,
            d_kv: 64,
            d_ff: 10240,
            num_layers: 24,
            num_heads: 64,
            relative_attention_num_buckets: 32,
            relative_attention_max_distance: 128,
            layer_norm_epsilon: 1e-6,
            feed_forward_proj: "gated-gelu".into(),
            dropout_rate: 0.1,
            is_encoder_decoder: false,
            use_cache: false,
            tie_word_embeddings: Some(false),
            architectures: Some(vec!["T5EncoderModel".into()]),
            ..Self::default()
        }
    }

    /// The tiny encoder of the `t5_encoder` parity fixture.
    pub fn tiny() -> Self {
        Self {
            vocab_size: 1103,
            d_model: 32,
            d_kv: 8,
            d_ff: 37,
            num_layers: 2,
            num_heads: 4,
            relative_attention_num_buckets: 8,
            relative_attention_max_distance: 20,
            layer_norm_epsilon: 1e-6,
            feed_forward_proj: "gated-gelu".into(),
            dropout_rate: 0.0,
            is_encoder_decoder: false,
            use_cache: false,
            ..Self::default()
        }
    }

    /// The feed-forward as (gated, activation), as transformers derives `is_gated_act` and
    /// `dense_act_fn` from `feed_forward_proj`; `None` when unsupported.
    fn feed_forward(&self) -> Option<(bool, Activation, &'static str)> {
        match self.feed_forward_proj.as_str() {
            "relu" => Some((false, Activation::Relu, "relu")),
            // transformers maps "gated-gelu" to `gelu_new` (tanh approximation) for T5 v1.1.
            "gated-gelu" => Some((true, Activation::NewGelu, "gelu_new")),
            "gated-gelu_new" => Some((true, Activation::NewGelu, "gelu_new")),
            "gated-silu" => Some((true, Activation::Silu, "silu")),
            "gated-relu" => Some((true, Activation::Relu, "relu")),
            _ => None,
        }
    }

    /// Checks the values the encoder depends on; errors name `file` and the key.
    pub fn validate(&self, file: &Path) -> Result<()> {
        for (key, v) in [
            ("vocab_size", self.vocab_size),
            ("d_model", self.d_model),
            ("d_kv", self.d_kv),
            ("d_ff", self.d_ff),
            ("num_layers", self.num_layers),
            ("num_heads", self.num_heads),
        ] {
            ensure(v > 0, file, key, || "must be at least 1, found 0".into())?;
        }
        let nb = self.relative_attention_num_buckets;
        ensure(
            nb >= 4 && nb.is_multiple_of(2),
            file,
            "relative_attention_num_buckets",
            || {
                format!("must be even and at least 4 (half per direction, half of those exact), found {nb}")
            },
        )?;
        let max_exact = nb / 4;
        let md = self.relative_attention_max_distance;
        ensure(
            md > max_exact,
            file,
            "relative_attention_max_distance",
            || {
                format!("must exceed the exact range relative_attention_num_buckets/4 = {max_exact}, found {md}")
            },
        )?;
        let eps = self.layer_norm_epsilon;
        ensure(
            eps.is_finite() && eps > 0.0,
            file,
            "layer_norm_epsilon",
            || format!("must be a positive number, found {eps}"),
        )?;
        let Some((gated, _, act_name)) = self.feed_forward() else {
            return Err(Error::config(
                file,
                "feed_forward_proj",
                format!(
                    "unsupported `{}`: expected one of relu, gated-gelu, gated-gelu_new, gated-silu, gated-relu",
                    self.feed_forward_proj
                ),
            ));
        };
        if let Some(a) = &self.dense_act_fn {
            ensure(a == act_name, file, "dense_act_fn", || {
                format!(
                    "`{a}` contradicts feed_forward_proj `{}`, which means `{act_name}`",
                    self.feed_forward_proj
                )
            })?;
        }
        if let Some(g) = self.is_gated_act {
            ensure(g == gated, file, "is_gated_act", || {
                format!(
                    "{g} contradicts feed_forward_proj `{}`, which is {}gated",
                    self.feed_forward_proj,
                    if gated { "" } else { "not " }
                )
            })?;
        }
        ensure(!self.is_decoder, file, "is_decoder", || {
            "is true, but this is a T5 encoder (T5EncoderModel) config".into()
        })?;
        Ok(())
    }

    /// The equivalent candle-transformers config (encoder only, no cache).
    fn to_candle(&self) -> ct5::Config {
        let (gated, activation, _) =
            self.feed_forward()
                .unwrap_or((false, Activation::Relu, "relu"));
        ct5::Config {
            vocab_size: self.vocab_size,
            d_model: self.d_model,
            d_kv: self.d_kv,
            d_ff: self.d_ff,
            num_layers: self.num_layers,
            num_decoder_layers: None,
            num_heads: self.num_heads,
            relative_attention_num_buckets: self.relative_attention_num_buckets,
            relative_attention_max_distance: self.relative_attention_max_distance,
            dropout_rate: self.dropout_rate,
            layer_norm_epsilon: self.layer_norm_epsilon,
            initializer_factor: self.initializer_factor,
            feed_forward_proj: ct5::ActivationWithOptionalGating { gated, activation },
            tie_word_embeddings: true,
            is_decoder: false,
            is_encoder_decoder: false,
            use_cache: false,
            pad_token_id: 0,
            eos_token_id: 1,
            decoder_start_token_id: None,
        }
    }
}

/// The T5 encoder stack: embedding → `num_layers` × (self-attention, feed-forward) → final norm.
#[derive(Debug, Clone)]
pub struct T5Encoder {
    inner: ct5::T5EncoderModel,
    cfg: T5EncoderConfig,
    dtype: DType,
}

impl T5Encoder {
    /// Builds the encoder from a `VarBuilder` rooted at the checkpoint's top level (keys
    /// `shared.weight`, `encoder.block.{i}.…`, `encoder.final_layer_norm.weight`).
    pub fn new(cfg: &T5EncoderConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate(Path::new("<T5EncoderConfig>"))?;
        let dtype = vb.dtype();
        let inner = ct5::T5EncoderModel::load(vb, &cfg.to_candle()).map_err(build_error)?;
        Ok(Self {
            inner,
            cfg: cfg.clone(),
            dtype,
        })
    }

    /// Loads a transformers `T5EncoderModel` folder: `config.json` and a sharded
    /// `model.safetensors.index.json` or `model.safetensors` (else the folder's only
    /// `*.safetensors`), in any stored float dtype, converted to `dtype`.
    /// Tensors the encoder does not use are an error, except the tied copy of the embedding.
    pub fn load(dir: &Path, dtype: DType, dev: &Device) -> Result<Self> {
        let cfg_path = dir.join("config.json");
        let cfg: T5EncoderConfig = load_config(&cfg_path)?;
        cfg.validate(&cfg_path)?;
        // transformers' file names first (the folder may hold other safetensors files, such as
        // a test's inputs), then whatever single file or index the folder has.
        let single = dir.join("model.safetensors");
        let weights = if !dir.join("model.safetensors.index.json").is_file() && single.is_file() {
            Weights::open(&[single])?
        } else {
            Weights::from_dir(dir)?
        };
        let weights = Arc::new(weights);
        let vb = weights.var_builder(dtype, dev);
        let model = Self::new(&cfg, vb)?;
        // candle's loader reads `shared.weight` when present, else `encoder.embed_tokens.weight`.
        let ignore: &[&str] = if weights.contains("shared.weight") {
            &[TIED_EMBEDDING]
        } else {
            &[]
        };
        weights.check_all_used(ignore)?;
        tracing::debug!(weights = %weights.describe(), layers = cfg.num_layers, d_model = cfg.d_model, ?dtype, "loaded T5 encoder");
        Ok(model)
    }

    pub fn config(&self) -> &T5EncoderConfig {
        &self.cfg
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Encodes token ids `[B, L]` (u32 or i64) into hidden states `[B, L, d_model]`, attending to
    /// every position (no mask), as the CogVideoX pipeline calls transformers' encoder.
    pub fn forward(&self, ids: &Tensor) -> candle_core::Result<Tensor> {
        let _span = tracing::trace_span!("t5_encoder", shape = ?ids.dims()).entered();
        let (b, l) = ids.dims2().map_err(|_| {
            candle_core::Error::Msg(format!(
                "T5 encoder: token ids must be [batch, length], found shape {:?}",
                ids.dims()
            ))
        })?;
        if !matches!(ids.dtype(), DType::U32 | DType::I64) {
            candle_core::bail!(
                "T5 encoder: token ids must be u32 or i64, found {:?}",
                ids.dtype()
            );
        }
        if b == 0 || l == 0 {
            candle_core::bail!("T5 encoder: empty input of shape [{b}, {l}]");
        }
        // Out-of-range ids would otherwise be an index error deep inside the embedding (or, for
        // u32::MAX, silently a zero row).
        let ids_u = ids.to_dtype(DType::I64)?.flatten_all()?;
        let (lo, hi) = (
            ids_u.min(0)?.to_scalar::<i64>()?,
            ids_u.max(0)?.to_scalar::<i64>()?,
        );
        if lo < 0 || hi >= self.cfg.vocab_size as i64 {
            candle_core::bail!(
                "T5 encoder: token ids must lie in [0, {}) (vocab_size), found range [{lo}, {hi}]",
                self.cfg.vocab_size
            );
        }
        // candle's encoder keeps per-call state behind `&mut self` (an unused decoder cache);
        // the clone shares every weight tensor.
        let mut m = self.inner.clone();
        m.forward(ids) // [B, L, d_model]
    }
}
