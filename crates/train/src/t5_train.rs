//! A trainable T5 encoder: the differentiable twin of `vdit_models::text::t5::T5Encoder`.
//!
//! Paper: Raffel et al. 2020, "Exploring the Limits of Transfer Learning with a Unified
//! Text-to-Text Transformer" (T5 v1.1 variant: gated-GELU feed-forward, no biases). Reference:
//! transformers 5.23 `T5EncoderModel` (`models/t5/modeling_t5.py`), called as diffusers'
//! `CogVideoXPipeline._get_t5_prompt_embeds` calls it: ids only, **no attention mask**.
//!
//! The forward is written from [`crate::diffops`] (candle's fast `rms_norm` / `softmax_last_dim`,
//! which the inference model uses, return tensors cut from the graph):
//!
//! ```text
//! x = shared[ids]                                               [B, L, D]
//! bias = relative_attention_bias[bucket(j - i)]                 [1, H, L, L]  (block 0's table,
//!                                                                used by every block)
//! per block:  h = rms(x)·w;  x += o(softmax(q kᵀ + bias) v)     (no 1/√d_kv scale)
//!             h = rms(x)·w;  x += wo(gelu_tanh(wi_0 h) ⊙ wi_1 h)
//! out = rms(x)·final_layer_norm                                 [B, L, D]
//! ```
//!
//! Buckets are bidirectional: half for keys after the query, distances below a quarter of the
//! buckets exact, larger ones logarithmic up to `relative_attention_max_distance`. They are
//! computed on the host with the same f32 formula as candle-transformers' T5, which the inference
//! module checked against transformers' `_relative_position_bucket`.
//!
//! Vars carry transformers' `T5EncoderModel` keys (`shared.weight`,
//! `encoder.block.{i}.layer.0.SelfAttention.q.weight`, ...); [`write_text_encoder_folder`]
//! writes them as a folder that `T5Encoder::load` and transformers'
//! `T5EncoderModel.from_pretrained` both read. Initialisation is transformers' `_init_weights`,
//! passed as `VarBuilder` hints (so [`crate::SeededVarMap`]'s default rule keeps it).
//!
//! Shapes: ids `[B, L]` (u32 or i64) → hidden states `[B, L, d_model]` in the vars' dtype.

use crate::diffops::{gelu_tanh, linear, rms_norm, softmax};
use candle_core::{DType, Tensor, D};
use candle_nn::{Init, VarBuilder};
use serde::{Deserialize, Serialize};
use std::path::Path;
use vdit_core::{Error, Result};
use vdit_models::text::t5::T5EncoderConfig;

/// transformers' `T5Config` fields that shape the encoder, with their upstream names. Unknown
/// keys are errors (a training config with a typo never trains the wrong model); a missing key
/// takes its value from [`T5Config::default`] (the small preset over the world vocabulary).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct T5Config {
    /// Rows of the token embedding (at least the tokenizer's vocabulary size).
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
    /// Relative-position buckets (half per direction); even, at least 4.
    pub relative_attention_num_buckets: usize,
    /// Distances at and beyond this share the last bucket.
    pub relative_attention_max_distance: usize,
    pub layer_norm_epsilon: f64,
    /// Only `gated-gelu` (= `gated-gelu_new`, tanh GELU) is trained here.
    pub feed_forward_proj: String,
    /// Must be 0: the training forward has no dropout (it is written to `config.json` as is).
    pub dropout_rate: f64,
    /// Scales every initial standard deviation (transformers' `initializer_factor`).
    pub initializer_factor: f64,
}

impl Default for T5Config {
    /// [`T5Config::small`] over the Shapes World vocabulary (3 special tokens + the words).
    fn default() -> Self {
        Self::small(3 + crate::word_tokenizer::world_vocabulary().len())
    }
}

impl T5Config {
    /// vdit's default text encoder: d_model 128, 4 heads of 32, d_ff 256, 2 layers, 32 buckets
    /// up to distance 128, gated-GELU, eps 1e-6, no dropout.
    pub fn small(vocab_size: usize) -> Self {
        Self {
            vocab_size,
            d_model: 128,
            d_kv: 32,
            d_ff: 256,
            num_layers: 2,
            num_heads: 4,
            relative_attention_num_buckets: 32,
            relative_attention_max_distance: 128,
            layer_norm_epsilon: 1e-6,
            feed_forward_proj: "gated-gelu".into(),
            dropout_rate: 0.0,
            initializer_factor: 1.0,
        }
    }

    /// A tiny encoder for tests.
    pub fn tiny(vocab_size: usize) -> Self {
        Self {
            d_model: 16,
            d_kv: 4,
            d_ff: 24,
            num_heads: 2,
            relative_attention_num_buckets: 8,
            relative_attention_max_distance: 12,
            ..Self::small(vocab_size)
        }
    }

    /// The inference model's config (transformers' `T5Config` of a `T5EncoderModel`).
    pub fn to_encoder_config(&self) -> T5EncoderConfig {
        T5EncoderConfig {
            vocab_size: self.vocab_size,
            d_model: self.d_model,
            d_kv: self.d_kv,
            d_ff: self.d_ff,
            num_layers: self.num_layers,
            num_heads: self.num_heads,
            relative_attention_num_buckets: self.relative_attention_num_buckets,
            relative_attention_max_distance: self.relative_attention_max_distance,
            layer_norm_epsilon: self.layer_norm_epsilon,
            feed_forward_proj: self.feed_forward_proj.clone(),
            dense_act_fn: Some("gelu_new".into()),
            is_gated_act: Some(true),
            is_decoder: false,
            dropout_rate: self.dropout_rate,
            initializer_factor: self.initializer_factor,
            is_encoder_decoder: false,
            use_cache: false,
            num_decoder_layers: None,
            pad_token_id: Some(i64::from(crate::word_tokenizer::PAD_ID)),
            eos_token_id: Some(serde_json::Value::from(crate::word_tokenizer::EOS_ID)),
            decoder_start_token_id: None,
            tie_word_embeddings: Some(false),
            scale_decoder_outputs: None,
            classifier_dropout: None,
            model_type: Some("t5".into()),
            architectures: Some(vec!["T5EncoderModel".into()]),
            dtype: Some("float32".into()),
            torch_dtype: None,
            transformers_version: None,
        }
    }

    /// Checks the values the training forward depends on; errors name the key.
    pub fn validate(&self) -> Result<()> {
        let file = Path::new("<T5Config>");
        if !matches!(
            self.feed_forward_proj.as_str(),
            "gated-gelu" | "gated-gelu_new"
        ) {
            return Err(Error::config(
                file,
                "feed_forward_proj",
                format!(
                    "`{}`: the training forward supports gated-gelu (= gated-gelu_new) only",
                    self.feed_forward_proj
                ),
            ));
        }
        if self.dropout_rate != 0.0 {
            return Err(Error::config(
                file,
                "dropout_rate",
                format!(
                    "{}: the training forward has no dropout; set 0",
                    self.dropout_rate
                ),
            ));
        }
        let f = self.initializer_factor;
        if !(f.is_finite() && f > 0.0) {
            return Err(Error::config(
                file,
                "initializer_factor",
                format!("must be a positive number, found {f}"),
            ));
        }
        self.to_encoder_config().validate(file)
    }

    /// Every weight of the encoder with its shape, in transformers' key names.
    pub fn weight_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (d, inner) = (self.d_model, self.num_heads * self.d_kv);
        let mut v = vec![("shared.weight".to_string(), vec![self.vocab_size, d])];
        for i in 0..self.num_layers {
            let p = format!("encoder.block.{i}.layer");
            for (n, s) in [("q", [inner, d]), ("k", [inner, d]), ("v", [inner, d])] {
                v.push((format!("{p}.0.SelfAttention.{n}.weight"), s.to_vec()));
            }
            v.push((format!("{p}.0.SelfAttention.o.weight"), vec![d, inner]));
            if i == 0 {
                v.push((
                    format!("{p}.0.SelfAttention.relative_attention_bias.weight"),
                    vec![self.relative_attention_num_buckets, self.num_heads],
                ));
            }
            v.push((format!("{p}.0.layer_norm.weight"), vec![d]));
            v.push((
                format!("{p}.1.DenseReluDense.wi_0.weight"),
                vec![self.d_ff, d],
            ));
            v.push((
                format!("{p}.1.DenseReluDense.wi_1.weight"),
                vec![self.d_ff, d],
            ));
            v.push((
                format!("{p}.1.DenseReluDense.wo.weight"),
                vec![d, self.d_ff],
            ));
            v.push((format!("{p}.1.layer_norm.weight"), vec![d]));
        }
        v.push(("encoder.final_layer_norm.weight".to_string(), vec![d]));
        v
    }

    /// The number of parameters.
    pub fn num_params(&self) -> usize {
        self.weight_shapes()
            .iter()
            .map(|(_, s)| s.iter().product::<usize>())
            .sum()
    }

    /// transformers' `T5PreTrainedModel._init_weights` for the weight `key` (a key of
    /// [`Self::weight_shapes`]): norms `factor`, the embedding N(0, factor²), q
    /// N(0, factor²/(d_model·d_kv)) (it absorbs the missing 1/√d_kv), k, v, wi_0, wi_1 and the
    /// bias table N(0, factor²/d_model), o N(0, factor²/(heads·d_kv)), wo N(0, factor²/d_ff).
    pub fn init(&self, key: &str) -> Init {
        let f = self.initializer_factor;
        let normal = |fan: usize| Init::Randn {
            mean: 0.0,
            stdev: f / (fan as f64).sqrt(),
        };
        let last = key.rsplit('.').nth(1).unwrap_or("");
        match last {
            "shared" => normal(1),
            "q" => normal(self.d_model * self.d_kv),
            "k" | "v" | "wi_0" | "wi_1" | "relative_attention_bias" => normal(self.d_model),
            "o" => normal(self.num_heads * self.d_kv),
            "wo" => normal(self.d_ff),
            _ => Init::Const(f), // layer_norm, final_layer_norm
        }
    }
}

/// One encoder block's weights.
struct Block {
    ln_attn: Tensor, // [D]
    q: Tensor,       // [H·Dk, D]
    k: Tensor,
    v: Tensor,
    o: Tensor, // [D, H·Dk]
    ln_ff: Tensor,
    wi_0: Tensor, // [F, D]
    wi_1: Tensor,
    wo: Tensor, // [D, F]
}

/// The trainable T5 encoder (see the module docs).
pub struct TrainT5 {
    cfg: T5Config,
    shared: Tensor,   // [V, D]
    rel_bias: Tensor, // [buckets, H]
    blocks: Vec<Block>,
    final_norm: Tensor, // [D]
}

impl TrainT5 {
    /// Creates (or reads) the vars under `vb` with transformers' `T5EncoderModel` keys, each
    /// with its [`T5Config::init`] hint.
    pub fn new(cfg: &T5Config, vb: VarBuilder) -> Result<Self> {
        cfg.validate()?;
        let shapes = cfg.weight_shapes();
        let get = |key: &str| -> Result<Tensor> {
            let shape = shapes
                .iter()
                .find(|(k, _)| k == key)
                .map(|(_, s)| s.clone())
                .ok_or_else(|| Error::Msg(format!("internal: no shape for `{key}`")))?;
            vb.get_with_hints(shape, key, cfg.init(key))
                .map_err(vdit_core::weights::build_error)
        };
        let mut blocks = Vec::with_capacity(cfg.num_layers);
        for i in 0..cfg.num_layers {
            let p = format!("encoder.block.{i}.layer");
            let a = |n: &str| get(&format!("{p}.0.SelfAttention.{n}.weight"));
            let ff = |n: &str| get(&format!("{p}.1.DenseReluDense.{n}.weight"));
            blocks.push(Block {
                q: a("q")?,
                k: a("k")?,
                v: a("v")?,
                o: a("o")?,
                ln_attn: get(&format!("{p}.0.layer_norm.weight"))?,
                wi_0: ff("wi_0")?,
                wi_1: ff("wi_1")?,
                wo: ff("wo")?,
                ln_ff: get(&format!("{p}.1.layer_norm.weight"))?,
            });
        }
        Ok(Self {
            cfg: cfg.clone(),
            shared: get("shared.weight")?,
            rel_bias: get("encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight")?,
            blocks,
            final_norm: get("encoder.final_layer_norm.weight")?,
        })
    }

    pub fn config(&self) -> &T5Config {
        &self.cfg
    }

    /// Encodes ids `[B, L]` (u32 or i64) into the last hidden state `[B, L, d_model]`, every
    /// position attending to every other (no mask, as the CogVideoX pipeline calls T5).
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let (b, l) = ids.dims2().map_err(|_| {
            Error::invalid(
                "ids",
                format!("expected [batch, length], found shape {:?}", ids.dims()),
            )
        })?;
        if !matches!(ids.dtype(), DType::U32 | DType::I64) {
            return Err(Error::invalid(
                "ids",
                format!("expected u32 or i64 token ids, found {:?}", ids.dtype()),
            ));
        }
        if b == 0 || l == 0 {
            return Err(Error::invalid(
                "ids",
                format!("empty input of shape [{b}, {l}]"),
            ));
        }
        let flat = ids.flatten_all()?.to_dtype(DType::I64)?; // [B·L]
        let (lo, hi) = (
            flat.min(0)?.to_scalar::<i64>()?,
            flat.max(0)?.to_scalar::<i64>()?,
        );
        if lo < 0 || hi >= self.cfg.vocab_size as i64 {
            return Err(Error::invalid(
                "ids",
                format!(
                    "token ids must lie in [0, {}) (vocab_size), found range [{lo}, {hi}]",
                    self.cfg.vocab_size
                ),
            ));
        }
        let (d, h, dk) = (self.cfg.d_model, self.cfg.num_heads, self.cfg.d_kv);
        let eps = self.cfg.layer_norm_epsilon;
        let mut x = self.shared.index_select(&flat, 0)?.reshape((b, l, d))?; // [B, L, D]
        let bias = self.position_bias(l)?; // [1, H, L, L]
        let heads = |t: Tensor| -> candle_core::Result<Tensor> {
            // [B, L, H·Dk] -> [B, L, H, Dk] -> [B, H, L, Dk]
            t.reshape((b, l, h, dk))?.transpose(1, 2)?.contiguous()
        };
        for blk in &self.blocks {
            let n = rms_norm(&x, Some(&blk.ln_attn), eps)?; // [B, L, D]
            let q = heads(linear(&n, &blk.q, None)?)?;
            let k = heads(linear(&n, &blk.k, None)?)?;
            let v = heads(linear(&n, &blk.v, None)?)?;
            // T5 does not scale the scores (its q init does).
            let scores = q.matmul(&k.t()?)?.broadcast_add(&bias)?; // [B, H, L, L]
            let a = softmax(&scores, D::Minus1)?.matmul(&v)?; // [B, H, L, Dk]
            let a = a.transpose(1, 2)?.reshape((b, l, h * dk))?; // [B, L, H·Dk]
            x = (x + linear(&a, &blk.o, None)?)?;
            let n = rms_norm(&x, Some(&blk.ln_ff), eps)?;
            let g = gelu_tanh(&linear(&n, &blk.wi_0, None)?)?; // [B, L, F]
            let u = linear(&n, &blk.wi_1, None)?;
            x = (x + linear(&(g * u)?, &blk.wo, None)?)?;
        }
        Ok(rms_norm(&x, Some(&self.final_norm), eps)?)
    }

    /// The relative-position bias of block 0 for length `l`: `[1, H, L, L]`.
    fn position_bias(&self, l: usize) -> Result<Tensor> {
        let idx = relative_buckets(
            l,
            self.cfg.relative_attention_num_buckets,
            self.cfg.relative_attention_max_distance,
        );
        let idx = Tensor::from_vec(idx, l * l, self.rel_bias.device())?; // [L·L]
        let h = self.cfg.num_heads;
        Ok(self
            .rel_bias
            .index_select(&idx, 0)? // [L·L, H]
            .reshape((l, l, h))? // [Lq, Lk, H]
            .permute((2, 0, 1))? // [H, Lq, Lk]
            .unsqueeze(0)?) // [1, H, Lq, Lk]
    }
}

/// Bidirectional relative-position buckets `[Lq·Lk]` (row = query i, column = key j) as
/// transformers' `_relative_position_bucket(j - i, bidirectional=True, num_buckets,
/// max_distance)`, in candle-transformers' f32 arithmetic (the inference model's).
pub fn relative_buckets(l: usize, num_buckets: usize, max_distance: usize) -> Vec<u32> {
    let half = num_buckets / 2;
    let max_exact = half / 2;
    let log_bucket = |dist: usize| -> usize {
        // Distances >= max_exact: logarithmic up to max_distance, capped at the last bucket.
        let b = f32::log(
            dist as f32 / max_exact as f32,
            max_distance as f32 / max_exact as f32,
        ) * (half - max_exact) as f32;
        (max_exact + b as usize).min(half - 1)
    };
    let mut out = Vec::with_capacity(l * l);
    for i in 0..l {
        for j in 0..l {
            let (dist, offset) = if j > i { (j - i, half) } else { (i - j, 0) };
            let bucket = if dist < max_exact {
                dist
            } else {
                log_bucket(dist)
            };
            out.push((offset + bucket) as u32);
        }
    }
    out
}

/// Writes a transformers `T5EncoderModel` folder into `dir` (created if needed): `config.json`
/// (`architectures: ["T5EncoderModel"]`, `model_type: "t5"`, every field) and `model.safetensors`
/// from `weights`, which must be exactly [`T5Config::weight_shapes`] (names and shapes).
pub fn write_text_encoder_folder(
    dir: &Path,
    cfg: &T5Config,
    weights: &[(String, Tensor)],
) -> Result<()> {
    cfg.validate()?;
    let shapes = cfg.weight_shapes();
    for (key, shape) in &shapes {
        let t = weights
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, t)| t)
            .ok_or_else(|| Error::Weights(format!("text encoder export: missing `{key}`")))?;
        if t.dims() != shape.as_slice() {
            return Err(Error::Weights(format!(
                "text encoder export: `{key}` has shape {:?}, the config says {shape:?}",
                t.dims()
            )));
        }
    }
    if let Some((extra, _)) = weights
        .iter()
        .find(|(k, _)| !shapes.iter().any(|(s, _)| s == k))
    {
        return Err(Error::Weights(format!(
            "text encoder export: `{extra}` is not a T5 encoder weight of this config"
        )));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut config = serde_json::to_value(cfg.to_encoder_config())
        .map_err(|e| Error::Msg(format!("cannot serialise the T5 config: {e}")))?;
    if let serde_json::Value::Object(m) = &mut config {
        m.retain(|_, v| !v.is_null());
    }
    let path = dir.join("config.json");
    let text = serde_json::to_string_pretty(&config)
        .map_err(|e| Error::Msg(format!("{}: {e}", path.display())))?;
    std::fs::write(&path, text + "\n").map_err(|e| Error::io(&path, e))?;
    let tensors = weights
        .iter()
        .map(|(k, t)| Ok((k.clone(), t.to_dtype(DType::F32)?.contiguous()?)))
        .collect::<Result<Vec<_>>>()?;
    crate::save_weights(&dir.join("model.safetensors"), &tensors)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{assert_all_vars_get_grads, check_grad};
    use crate::SeededVarMap;
    use candle_core::Device;
    use rand::{Rng, SeedableRng};
    use vdit_core::testing::{assert_close, max_abs_diff};
    use vdit_models::text::t5::T5Encoder;

    fn tmp_dir(tag: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("vdit-t5train-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn random_ids(b: usize, l: usize, vocab: usize, seed: u64) -> Tensor {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        let v: Vec<u32> = (0..b * l)
            .map(|_| rng.random_range(0..vocab as u32))
            .collect();
        Tensor::from_vec(v, (b, l), &Device::Cpu).unwrap()
    }

    fn build(cfg: &T5Config, seed: u64) -> (SeededVarMap, TrainT5) {
        let m = SeededVarMap::new(seed);
        let t5 = TrainT5::new(cfg, m.var_builder(DType::F32, &Device::Cpu)).unwrap();
        (m, t5)
    }

    fn weights_of(m: &SeededVarMap) -> Vec<(String, Tensor)> {
        m.vars()
            .into_iter()
            .map(|(k, v)| (k, v.as_tensor().clone()))
            .collect()
    }

    /// The exported folder loads in the inference encoder, which gives the same hidden states;
    /// lengths past the exact-bucket range and past max_distance exercise every bucket kind.
    #[test]
    fn matches_the_inference_encoder_after_export() {
        for (cfg, l) in [(T5Config::small(43), 40), (T5Config::tiny(11), 30)] {
            let (m, t5) = build(&cfg, 3);
            let names: Vec<String> = m.vars().into_iter().map(|(k, _)| k).collect();
            let mut want: Vec<String> = cfg.weight_shapes().into_iter().map(|(k, _)| k).collect();
            want.sort();
            assert_eq!(names, want);
            let ids = random_ids(3, l, cfg.vocab_size, 1);
            let got = t5.forward(&ids).unwrap();
            assert_eq!(got.dims(), &[3, l, cfg.d_model]);
            let dir = tmp_dir(&format!("export{}", cfg.d_model));
            write_text_encoder_folder(&dir, &cfg, &weights_of(&m)).unwrap();
            let inf = T5Encoder::load(&dir, DType::F32, &Device::Cpu).unwrap();
            assert_eq!(inf.config(), &cfg.to_encoder_config());
            let reference = inf.forward(&ids).unwrap();
            assert_close("TrainT5 vs T5Encoder", &got, &reference, 1e-5);
            // i64 ids give the same result.
            let got64 = t5.forward(&ids.to_dtype(DType::I64).unwrap()).unwrap();
            assert_eq!(max_abs_diff(&got, &got64).unwrap(), 0.0);
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }

    #[test]
    fn every_var_gets_a_gradient() {
        let cfg = T5Config::small(43);
        let (m, t5) = build(&cfg, 5);
        let ids = random_ids(2, 24, cfg.vocab_size, 2);
        let out = t5.forward(&ids).unwrap();
        let r = random_ids(2 * 24, cfg.d_model, 7, 3)
            .to_dtype(DType::F32)
            .unwrap()
            .reshape(out.dims())
            .unwrap();
        let g = (out * r).unwrap().sum_all().unwrap().backward().unwrap();
        assert_all_vars_get_grads(&m.vars(), &g).unwrap();
    }

    /// Autograd through the whole encoder (embedding gather, bias table gather, attention,
    /// gated FF, norms) against finite differences in f64.
    #[test]
    fn gradients_match_finite_differences() {
        let cfg = T5Config {
            num_layers: 2,
            ..T5Config::tiny(7)
        };
        let m = SeededVarMap::new(9);
        TrainT5::new(&cfg, m.var_builder(DType::F64, &Device::Cpu)).unwrap();
        let vars = m.vars();
        let names: Vec<String> = vars.iter().map(|(k, _)| k.clone()).collect();
        // Norm scales away from 1 so their gradients are generic.
        let inputs: Vec<Tensor> = vars
            .iter()
            .map(|(_, v)| {
                let t = v.as_tensor().to_dtype(DType::F64).unwrap();
                if t.rank() == 1 {
                    (t * 0.8).unwrap().affine(1.0, 0.1).unwrap()
                } else {
                    t
                }
            })
            .collect();
        // Length 14 > max_distance 12: exact, logarithmic and capped buckets in both directions.
        let ids = random_ids(2, 14, cfg.vocab_size, 4);
        let f = |v: &[Tensor]| -> candle_core::Result<Tensor> {
            let map = names.iter().cloned().zip(v.iter().cloned()).collect();
            let vb = VarBuilder::from_tensors(map, DType::F64, &Device::Cpu);
            let t5 = TrainT5::new(&cfg, vb).map_err(|e| candle_core::Error::Msg(e.to_string()))?;
            t5.forward(&ids)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))
        };
        // 1e-5, not 1e-6: candle's GELU backward uses 6-digit constants (0.797885 for √(2/π)),
        // a relative gradient error of ~2e-6 at some elements.
        let r = check_grad(f, &inputs, 1e-6, 1e-5).unwrap();
        eprintln!("T5 gradcheck: {r:?}");
        assert!(r.max_abs_grad > 0.1 && r.checked > 500, "{r:?}");
    }

    /// Golden values from transformers' `T5Attention._relative_position_bucket(j - i,
    /// bidirectional=True, ...)` (torch 2, transformers 5.23).
    #[test]
    fn buckets_match_transformers() {
        // T5-XXL's and vdit's small (32 buckets, max distance 128).
        let l = 300;
        let b = relative_buckets(l, 32, 128);
        let at = |i: usize, j: usize| b[i * l + j];
        let dist = [
            8, 11, 12, 15, 16, 22, 23, 31, 32, 45, 46, 63, 64, 90, 91, 127, 128, 299,
        ];
        let key_after = [
            24, 24, 25, 25, 26, 26, 27, 27, 28, 28, 29, 29, 30, 30, 31, 31, 31, 31,
        ];
        let key_before = [
            8, 8, 9, 9, 10, 10, 11, 11, 12, 12, 13, 13, 14, 14, 15, 15, 15, 15,
        ];
        for (k, &d) in dist.iter().enumerate() {
            assert_eq!(at(0, d), key_after[k], "distance +{d}");
            assert_eq!(at(d, 0), key_before[k], "distance -{d}");
            assert_eq!(at(299 - d, 299), key_after[k], "distance +{d} at the end");
        }
        for d in 0..8 {
            assert_eq!(at(d, 0), d as u32);
            assert_eq!(at(0, d), if d == 0 { 0 } else { 16 + d as u32 });
        }
        // The tiny config (8, 12), relative positions -14..=14 (query 14, keys 0..=28).
        let b = relative_buckets(29, 8, 12);
        let want = [
            3, 3, 3, 3, 3, 3, 3, 3, 3, 3, 2, 2, 2, 1, 0, 5, 6, 6, 6, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7,
        ];
        assert_eq!(&b[14 * 29..15 * 29], &want);
    }

    #[test]
    fn init_follows_transformers() {
        let cfg = T5Config::small(43);
        let (m, _) = build(&cfg, 11);
        let std = |name: &str| -> f64 {
            let v = m
                .vars()
                .into_iter()
                .find(|(k, _)| k == name)
                .unwrap()
                .1
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            (v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>() / v.len() as f64).sqrt()
        };
        let b0 = "encoder.block.0.layer";
        for (name, want) in [
            ("shared.weight".to_string(), 1.0),
            (format!("{b0}.0.SelfAttention.q.weight"), 1.0 / 64.0),
            (format!("{b0}.0.SelfAttention.k.weight"), 128f64.powf(-0.5)),
            (format!("{b0}.0.SelfAttention.o.weight"), 128f64.powf(-0.5)),
            (
                format!("{b0}.1.DenseReluDense.wi_0.weight"),
                128f64.powf(-0.5),
            ),
            (
                format!("{b0}.1.DenseReluDense.wo.weight"),
                256f64.powf(-0.5),
            ),
            (
                format!("{b0}.0.SelfAttention.relative_attention_bias.weight"),
                128f64.powf(-0.5),
            ),
        ] {
            let s = std(&name);
            assert!((s / want - 1.0).abs() < 0.1, "{name}: std {s}, want {want}");
        }
        assert_eq!(std("encoder.final_layer_norm.weight"), 1.0);
        assert_eq!(std(&format!("{b0}.1.layer_norm.weight")), 1.0);
    }

    #[test]
    fn bad_configs_inputs_and_exports_are_errors() {
        let e = serde_json::from_str::<T5Config>(r#"{"d_model": 64, "num_layer": 3}"#)
            .unwrap_err()
            .to_string();
        assert!(e.contains("num_layer"), "{e}");
        let c: T5Config = serde_json::from_str(r#"{"d_model": 64}"#).unwrap();
        assert_eq!(
            c,
            T5Config {
                d_model: 64,
                ..T5Config::default()
            }
        );
        assert_eq!(
            c.vocab_size,
            3 + crate::word_tokenizer::world_vocabulary().len()
        );
        for (cfg, key) in [
            (
                T5Config {
                    feed_forward_proj: "relu".into(),
                    ..T5Config::tiny(5)
                },
                "feed_forward_proj",
            ),
            (
                T5Config {
                    dropout_rate: 0.1,
                    ..T5Config::tiny(5)
                },
                "dropout_rate",
            ),
            (
                T5Config {
                    relative_attention_num_buckets: 3,
                    ..T5Config::tiny(5)
                },
                "relative_attention_num_buckets",
            ),
            (
                T5Config {
                    num_heads: 0,
                    ..T5Config::tiny(5)
                },
                "num_heads",
            ),
        ] {
            let e = cfg.validate().unwrap_err().to_string();
            assert!(e.contains(key), "{e}");
        }
        let cfg = T5Config::tiny(5);
        let (m, t5) = build(&cfg, 0);
        for (ids, needle) in [
            (Tensor::new(&[[0u32, 5]], &Device::Cpu).unwrap(), "[0, 5]"),
            (
                Tensor::new(&[0u32, 1], &Device::Cpu).unwrap(),
                "[batch, length]",
            ),
            (
                Tensor::new(&[[0f32, 1.0]], &Device::Cpu).unwrap(),
                "u32 or i64",
            ),
            (Tensor::new(&[[-1i64, 1]], &Device::Cpu).unwrap(), "[-1, 1]"),
        ] {
            let e = t5.forward(&ids).unwrap_err().to_string();
            assert!(e.contains(needle), "{e}");
        }
        let mut w = weights_of(&m);
        let dir = tmp_dir("bad-export");
        w.push(("extra.weight".into(), w[0].1.clone()));
        let e = write_text_encoder_folder(&dir, &cfg, &w)
            .unwrap_err()
            .to_string();
        assert!(e.contains("`extra.weight`"), "{e}");
        w.pop();
        let (k, t) = w.remove(0);
        let e = write_text_encoder_folder(&dir, &cfg, &w)
            .unwrap_err()
            .to_string();
        assert!(e.contains(&format!("missing `{k}`")), "{e}");
        w.push((k.clone(), t.t().unwrap()));
        let e = write_text_encoder_folder(&dir, &cfg, &w)
            .unwrap_err()
            .to_string();
        assert!(e.contains(&k) && e.contains("the config says"), "{e}");
        assert!(!dir.exists());
    }

    fn fixture_dir() -> std::path::PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tokenizer")
    }

    /// The committed tiny encoder: 8 buckets up to distance 12, so 32-token prompts reach
    /// exact, logarithmic and capped buckets.
    fn fixture_t5_config() -> T5Config {
        T5Config::tiny(3 + crate::word_tokenizer::world_vocabulary().len())
    }

    /// Writes the folders `make_fixture.py` reads (then run it to refresh the references).
    #[test]
    #[ignore = "regenerates tests/fixtures/tokenizer/{tokenizer,text_encoder}; run by hand"]
    fn write_fixture_folders() {
        use crate::word_tokenizer::{build_tokenizer, world_vocabulary, write_tokenizer_folder};
        let dir = fixture_dir();
        let tok = build_tokenizer(&world_vocabulary()).unwrap();
        write_tokenizer_folder(&dir.join("tokenizer"), &tok, 32).unwrap();
        let cfg = fixture_t5_config();
        let (m, _) = build(&cfg, 2024);
        // Norm scales away from 1, so the comparison covers them too.
        let w: Vec<(String, Tensor)> = weights_of(&m)
            .into_iter()
            .map(|(k, t)| {
                let t = if t.rank() == 1 {
                    Tensor::randn(1f32, 0.2, t.dims(), t.device()).unwrap()
                } else {
                    t
                };
                (k, t)
            })
            .collect();
        write_text_encoder_folder(&dir.join("text_encoder"), &cfg, &w).unwrap();
    }

    /// transformers' `T5EncoderModel.from_pretrained` on a folder vdit wrote gives the hidden
    /// states of both the training forward and the inference encoder.
    #[test]
    fn matches_transformers_on_the_committed_fixture() {
        let dir = fixture_dir();
        let exp: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap())
                .unwrap();
        let ids: Vec<Vec<u32>> = serde_json::from_value(exp["input_ids"].clone()).unwrap();
        let (n, l) = (ids.len(), ids[0].len());
        let ids = Tensor::from_vec(ids.concat(), (n, l), &Device::Cpu).unwrap();
        let want = vdit_core::testing::load_tensors(&dir.join("hidden_states.safetensors"))
            .unwrap()
            .remove("hidden_states")
            .unwrap();
        let te = dir.join("text_encoder");
        let cfg = fixture_t5_config();
        let stored: T5EncoderConfig =
            vdit_core::config::load_config(&te.join("config.json")).unwrap();
        assert_eq!(stored, cfg.to_encoder_config());
        let weights = std::sync::Arc::new(vdit_core::weights::Weights::from_dir(&te).unwrap());
        let t5 = TrainT5::new(&cfg, weights.var_builder(DType::F32, &Device::Cpu)).unwrap();
        weights.check_all_used(&[]).unwrap();
        assert_close(
            "TrainT5 vs transformers",
            &t5.forward(&ids).unwrap(),
            &want,
            1e-5,
        );
        let inf = T5Encoder::load(&te, DType::F32, &Device::Cpu).unwrap();
        assert_close(
            "T5Encoder vs transformers",
            &inf.forward(&ids).unwrap(),
            &want,
            1e-5,
        );
    }
}
