//! Request validation: a `POST /v1/videos` body to resolved [`Params`], or a [`FieldError`] naming
//! the field and its rule. Everything is checked here, against the model's sizes and the
//! server's [`Limits`], before a job exists; the worker never sees a request that could not run.

use crate::job::Params;
use serde_json::{Map, Value};
use std::fmt;

/// The fields `POST /v1/videos` accepts (diffusers' call parameters); anything else is refused.
pub const FIELDS: &[&str] = &[
    "prompt",
    "negative_prompt",
    "num_frames",
    "height",
    "width",
    "num_inference_steps",
    "guidance_scale",
    "use_dynamic_cfg",
    "guidance_max_timestep",
    "guidance_rescale",
    "seed",
    "fps",
];

/// What one request may ask for. Every limit is a `vdit serve` flag.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// Largest `num_frames`.
    pub max_frames: usize,
    /// Largest `height * width`.
    pub max_pixels: usize,
    /// Largest `num_inference_steps`.
    pub max_steps: usize,
    /// Largest request body, bytes (413 above).
    pub max_body_bytes: usize,
    /// Longest `prompt` / `negative_prompt`, characters.
    pub max_prompt_chars: usize,
    /// Memory one job may use at its peak, bytes (by [`ModelInfo::estimate_job_bytes`]).
    pub max_job_bytes: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_frames: 161,
            // CogVideoX 1.5's 1360x768.
            max_pixels: 1360 * 768,
            max_steps: 200,
            max_body_bytes: 64 * 1024,
            max_prompt_chars: 2000,
            max_job_bytes: default_job_bytes(),
        }
    }
}

/// Half the machine's memory (`/proc/meminfo`), else 8 GiB.
pub fn default_job_bytes() -> u64 {
    let total_kib = std::fs::read_to_string("/proc/meminfo").ok().and_then(|s| {
        s.lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
    });
    match total_kib {
        Some(k) => k * 1024 / 2,
        None => 8 << 30,
    }
}

/// What validation needs to know of the loaded model.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ModelInfo {
    /// The model folder's name.
    pub name: String,
    /// The transformer's training size: the defaults of a request.
    pub default_frames: usize,
    pub default_height: usize,
    pub default_width: usize,
    /// `num_frames` must be `temporal_compression * k + 1`.
    pub temporal_compression: usize,
    /// `height`/`width` must be multiples of this (VAE scale * patch size).
    pub size_multiple: usize,
    /// VAE spatial scale.
    pub vae_scale: usize,
    /// Scheduler's `num_train_timesteps`: the most steps a schedule can have.
    pub num_train_timesteps: usize,
    pub default_steps: usize,
    pub default_guidance_scale: f64,
    pub default_use_dynamic_cfg: bool,
    pub default_guidance_max_timestep: Option<usize>,
    pub default_guidance_rescale: f64,
    pub default_fps: f32,
    /// Transformer sizes, for the memory estimate.
    pub inner_dim: usize,
    pub text_len: usize,
    pub patch_size: usize,
    pub patch_size_t: usize,
    pub latent_channels: usize,
    /// The VAE decoder's widest channel count at full resolution.
    pub vae_channels: usize,
    /// The VAE's decode tile, pixels (0: no tiling).
    pub vae_tile_height: usize,
    pub vae_tile_width: usize,
    /// Bytes of all weight files (held once per worker).
    pub weight_bytes: u64,
}

impl ModelInfo {
    /// A rough upper estimate of the memory one job needs on top of the loaded weights, bytes.
    /// The larger of two phases, plus the decoded video (f32 frames, a permuted copy, RGB8):
    /// - denoising: the joint sequence `text + F'·h/p·w/p` tokens (twice with guidance) times
    ///   the inner width, with about 24 such tensors alive at once (q, k, v, the 4x MLP, the
    ///   residual stream); attention itself runs in blocks of at most 16 MB per thread;
    /// - decoding: the VAE decodes a few latent frames at a time (about 9 pixel frames) and, above
    ///   its tile size, tile by tile; about 16 `vae_channels`-wide activations of one such batch
    ///   are alive at once (conv caches, the 3x3 im2col buffers, the block's in/out).
    pub fn estimate_job_bytes(&self, p: &Params) -> u64 {
        let tc = self.temporal_compression.max(1);
        let pt = self.patch_size_t.max(1);
        let lat_frames = ((p.num_frames - 1) / tc + 1).div_ceil(pt) * pt;
        let s = self.vae_scale.max(1) * self.patch_size.max(1);
        let tokens = (lat_frames / pt) * (p.height / s) * (p.width / s);
        let seq = (self.text_len + tokens) as u64;
        let batch = if p.guidance_scale > 1.0 { 2 } else { 1 };
        let denoise = batch * seq * self.inner_dim as u64 * 4 * 24 + 16 * (1 << 20) * 8;
        let tile = |v: usize, t: usize| if t > 0 { v.min(t) } else { v } as u64;
        let area = tile(p.height, self.vae_tile_height) * tile(p.width, self.vae_tile_width);
        let frames = (p.num_frames as u64).min(9);
        let decode = frames * area * self.vae_channels as u64 * 4 * 16;
        let video = (p.num_frames * p.height * p.width) as u64 * 3 * (4 + 4 + 1);
        denoise.max(decode) + video
    }
}

/// A request error: the field and what is wrong with it.
#[derive(Debug, Clone, PartialEq)]
pub struct FieldError {
    /// The field's name, or `body` for the request as a whole.
    pub param: String,
    pub message: String,
}

impl FieldError {
    fn new(param: &str, message: impl Into<String>) -> Self {
        Self {
            param: param.into(),
            message: message.into(),
        }
    }
}

fn get_uint(obj: &Map<String, Value>, k: &str) -> Result<Option<u64>, FieldError> {
    match obj.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v.as_u64().map(Some).ok_or_else(|| {
            FieldError::new(
                k,
                format!("{k} must be a non-negative integer, got {}", short(v)),
            )
        }),
    }
}

fn get_num(obj: &Map<String, Value>, k: &str) -> Result<Option<f64>, FieldError> {
    match obj.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .map(Some)
            .ok_or_else(|| FieldError::new(k, format!("{k} must be a number, got {}", short(v)))),
    }
}

fn get_str<'a>(obj: &'a Map<String, Value>, k: &str) -> Result<Option<&'a str>, FieldError> {
    match obj.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(v) => Err(FieldError::new(
            k,
            format!("{k} must be a string, got {}", short(v)),
        )),
    }
}

/// A rule a numeric field must keep. A value that breaks it is refused with
/// "`{field} must be {rule}, got {value}`", the rule as [`Rule::describe`] states it.
trait Rule<T> {
    fn holds(&self, v: T) -> bool;
    /// The rule as the error message states it; `v` is the refused value (for examples).
    fn describe(&self, v: T) -> String;
}

/// `lo <= v <= hi`.
struct Between<T>(T, T);

impl<T: PartialOrd + fmt::Display> Rule<T> for Between<T> {
    fn holds(&self, v: T) -> bool {
        self.0 <= v && v <= self.1
    }
    fn describe(&self, _: T) -> String {
        format!("between {} and {}", self.0, self.1)
    }
}

/// `lo < v <= hi`.
struct AboveAtMost<T>(T, T);

impl<T: PartialOrd + fmt::Display> Rule<T> for AboveAtMost<T> {
    fn holds(&self, v: T) -> bool {
        self.0 < v && v <= self.1
    }
    fn describe(&self, _: T) -> String {
        format!("in ({}, {}]", self.0, self.1)
    }
}

/// `m * k` for some `k >= 1`.
struct PositiveMultipleOf(u64);

impl Rule<u64> for PositiveMultipleOf {
    fn holds(&self, v: u64) -> bool {
        v > 0 && v.is_multiple_of(self.0)
    }
    fn describe(&self, _: u64) -> String {
        format!("a positive multiple of {}", self.0)
    }
}

/// `m * k + 1` for some `k >= 0`; the message gives the two nearest such values.
struct MultiplePlusOne(u64);

impl Rule<u64> for MultiplePlusOne {
    fn holds(&self, v: u64) -> bool {
        v > 0 && (v - 1).is_multiple_of(self.0)
    }
    fn describe(&self, v: u64) -> String {
        let m = self.0;
        let below = v.saturating_sub(1) / m * m + 1;
        // The next one may be past u64::MAX: state it all the same.
        format!(
            "{m}k+1 (e.g. {below}, {})",
            u128::from(below) + u128::from(m)
        )
    }
}

/// A request body's fields, read and checked against their rules (absent or null: the default).
struct Fields<'a>(&'a Map<String, Value>);

impl Fields<'_> {
    fn uint(&self, k: &str, default: usize, rule: impl Rule<u64>) -> Result<u64, FieldError> {
        check(k, get_uint(self.0, k)?.unwrap_or(default as u64), rule)
    }

    fn num(&self, k: &str, default: f64, rule: impl Rule<f64>) -> Result<f64, FieldError> {
        check(k, get_num(self.0, k)?.unwrap_or(default), rule)
    }
}

fn check<T: Copy + fmt::Display>(k: &str, v: T, rule: impl Rule<T>) -> Result<T, FieldError> {
    if rule.holds(v) {
        return Ok(v);
    }
    let rule = rule.describe(v);
    Err(FieldError::new(k, format!("{k} must be {rule}, got {v}")))
}

/// `v <= max`, else "`{what} is over this server's limit of {max} ({flag})`" on field `k`.
fn within_limit(
    k: &str,
    v: u64,
    max: usize,
    flag: &str,
    what: impl FnOnce() -> String,
) -> Result<(), FieldError> {
    if v <= max as u64 {
        return Ok(());
    }
    let what = what();
    Err(FieldError::new(
        k,
        format!("{what} is over this server's limit of {max} ({flag})"),
    ))
}

/// A value for an error message, cut short.
fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 40 {
        format!("{}...", s.chars().take(40).collect::<String>())
    } else {
        s
    }
}

/// Parses and checks a request body. `seed` is the seed to use when the request gives none.
pub fn validate(
    body: &[u8],
    model: &ModelInfo,
    limits: &Limits,
    seed: u64,
) -> Result<Params, FieldError> {
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| FieldError::new("body", format!("body is not valid JSON: {e}")))?;
    let Value::Object(obj) = value else {
        return Err(FieldError::new(
            "body",
            format!("body must be a JSON object, got {}", short(&value)),
        ));
    };
    if let Some(k) = obj.keys().find(|k| !FIELDS.contains(&k.as_str())) {
        return Err(FieldError::new(
            k,
            format!("unknown field {k:?}; accepted: {}", FIELDS.join(", ")),
        ));
    }
    let prompt = get_str(&obj, "prompt")?
        .ok_or_else(|| FieldError::new("prompt", "prompt is required (a non-empty string)"))?;
    if prompt.trim().is_empty() {
        return Err(FieldError::new("prompt", "prompt must not be empty"));
    }
    let negative_prompt = get_str(&obj, "negative_prompt")?.unwrap_or("");
    for (k, s) in [("prompt", prompt), ("negative_prompt", negative_prompt)] {
        let n = s.chars().count();
        if n > limits.max_prompt_chars {
            return Err(FieldError::new(
                k,
                format!(
                    "{k} has {n} characters; this server accepts at most {} (max_prompt_chars)",
                    limits.max_prompt_chars
                ),
            ));
        }
    }

    let tc = model.temporal_compression.max(1) as u64;
    let m = model.size_multiple.max(1) as u64;
    let max_steps = limits.max_steps.min(model.num_train_timesteps) as u64;
    let f = Fields(&obj);
    let num_frames = f.uint("num_frames", model.default_frames, MultiplePlusOne(tc))?;
    within_limit(
        "num_frames",
        num_frames,
        limits.max_frames,
        "max_frames",
        || format!("num_frames {num_frames}"),
    )?;
    let height = f.uint("height", model.default_height, PositiveMultipleOf(m))?;
    let width = f.uint("width", model.default_width, PositiveMultipleOf(m))?;
    let pixels = height.saturating_mul(width);
    let k = if height >= width { "height" } else { "width" };
    within_limit(k, pixels, limits.max_pixels, "max_pixels", || {
        format!("height x width = {height} x {width} = {pixels} pixels")
    })?;
    let steps = f.uint(
        "num_inference_steps",
        model.default_steps,
        Between(1, max_steps),
    )?;
    let guidance = f.num(
        "guidance_scale",
        model.default_guidance_scale,
        Between(0.0, 50.0),
    )?;
    let use_dynamic_cfg = match obj.get("use_dynamic_cfg") {
        None | Some(Value::Null) => model.default_use_dynamic_cfg,
        Some(Value::Bool(b)) => *b,
        Some(v) => {
            return Err(FieldError::new(
                "use_dynamic_cfg",
                format!("use_dynamic_cfg must be true or false, got {}", short(v)),
            ))
        }
    };
    let guidance_max_timestep = match get_uint(&obj, "guidance_max_timestep")? {
        None => model.default_guidance_max_timestep,
        Some(m) if m <= model.num_train_timesteps as u64 => Some(m as usize),
        Some(m) => {
            return Err(FieldError::new(
                "guidance_max_timestep",
                format!(
                    "guidance_max_timestep must be at most {} (the schedule's timesteps), got {m}",
                    model.num_train_timesteps
                ),
            ))
        }
    };
    let guidance_rescale = f.num(
        "guidance_rescale",
        model.default_guidance_rescale,
        Between(0.0, 1.0),
    )?;
    let seed = get_uint(&obj, "seed")?.unwrap_or(seed);
    let fps = f.num("fps", model.default_fps.into(), AboveAtMost(0.0, 120.0))?;
    let params = Params {
        prompt: prompt.to_string(),
        negative_prompt: negative_prompt.to_string(),
        num_frames: num_frames as usize,
        height: height as usize,
        width: width as usize,
        num_inference_steps: steps as usize,
        guidance_scale: guidance,
        use_dynamic_cfg,
        guidance_max_timestep,
        guidance_rescale,
        seed,
        fps: fps as f32,
    };
    let need = model.estimate_job_bytes(&params);
    if need > limits.max_job_bytes {
        return Err(FieldError::new(
            "num_frames",
            format!(
                "num_frames x height x width = {} x {} x {}: the job would need about {:.1} GiB, over this server's limit of {:.1} GiB (max_job_memory_gb); ask for fewer frames or fewer pixels",
                params.num_frames,
                params.height,
                params.width,
                need as f64 / (1u64 << 30) as f64,
                limits.max_job_bytes as f64 / (1u64 << 30) as f64
            ),
        ));
    }
    Ok(params)
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn model() -> ModelInfo {
        ModelInfo {
            name: "tiny".into(),
            default_frames: 9,
            default_height: 32,
            default_width: 48,
            temporal_compression: 4,
            size_multiple: 16,
            vae_scale: 8,
            num_train_timesteps: 1000,
            default_steps: 3,
            default_guidance_scale: 6.0,
            default_use_dynamic_cfg: false,
            default_guidance_max_timestep: None,
            default_guidance_rescale: 0.0,
            default_fps: 8.0,
            inner_dim: 32,
            text_len: 16,
            patch_size: 2,
            patch_size_t: 1,
            latent_channels: 4,
            vae_channels: 8,
            vae_tile_height: 32,
            vae_tile_width: 48,
            weight_bytes: 1 << 20,
        }
    }

    fn check(body: &str) -> Result<Params, FieldError> {
        validate(body.as_bytes(), &model(), &Limits::default(), 99)
    }

    fn err(body: &str) -> FieldError {
        check(body).expect_err(body)
    }

    #[test]
    fn defaults_come_from_the_model_and_the_drawn_seed() {
        let p = check(r#"{"prompt": "a red ball"}"#).unwrap();
        assert_eq!(
            p,
            Params {
                prompt: "a red ball".into(),
                negative_prompt: String::new(),
                num_frames: 9,
                height: 32,
                width: 48,
                num_inference_steps: 3,
                guidance_scale: 6.0,
                use_dynamic_cfg: false,
                guidance_max_timestep: None,
                guidance_rescale: 0.0,
                seed: 99,
                fps: 8.0,
            }
        );
        let p = check(
            r#"{"prompt": "x", "negative_prompt": null, "num_frames": 17, "height": 64, "width": 16,
                "num_inference_steps": 7, "guidance_scale": 1, "seed": 5, "fps": 12.5,
                "use_dynamic_cfg": true, "guidance_max_timestep": 800, "guidance_rescale": 0.7}"#,
        )
        .unwrap();
        assert_eq!(
            (p.num_frames, p.height, p.width, p.num_inference_steps),
            (17, 64, 16, 7)
        );
        assert_eq!((p.guidance_scale, p.seed, p.fps), (1.0, 5, 12.5));
        assert!(p.use_dynamic_cfg);
        assert_eq!(p.guidance_max_timestep, Some(800));
        assert_eq!(p.guidance_rescale, 0.7);
    }

    #[test]
    fn each_bad_field_is_named_with_its_rule() {
        // (body, field named, rule stated)
        let whole: &[(&str, &str, &str)] = &[
            ("{}", "prompt", "required"),
            (r#"{"prompt": "  "}"#, "prompt", "must not be empty"),
            (r#"{"prompt": 3}"#, "prompt", "must be a string"),
            (r#"[1, 2]"#, "body", "JSON object"),
            (r#"{"prompt": "a""#, "body", "not valid JSON"),
        ];
        // (fields after `"prompt": "a"`, rule stated): the first field is the one named.
        let after_prompt: &[(&str, &str)] = &[
            (r#""num_frames": 10"#, "must be 4k+1 (e.g. 9, 13), got 10"),
            (r#""num_frames": 0"#, "4k+1"),
            (r#""num_frames": -5"#, "non-negative integer"),
            (r#""num_frames": 9.5"#, "non-negative integer"),
            (r#""num_frames": 165"#, "limit of 161 (max_frames)"),
            (r#""height": 40"#, "multiple of 16, got 40"),
            (r#""width": "wide""#, "non-negative integer"),
            (r#""height": 2048, "width": 1024"#, "max_pixels"),
            (r#""num_inference_steps": 0"#, "between 1 and 200"),
            (r#""num_inference_steps": 201"#, "between 1 and 200"),
            (r#""guidance_scale": -1"#, "between 0 and 50"),
            (r#""guidance_scale": "high""#, "must be a number"),
            (r#""seed": -1"#, "non-negative integer"),
            (r#""fps": 0"#, "(0, 120]"),
            (r#""use_dynamic_cfg": 1"#, "true or false"),
            (r#""guidance_max_timestep": 1001"#, "at most 1000"),
            (r#""guidance_max_timestep": -3"#, "non-negative integer"),
            (r#""guidance_rescale": 1.5"#, "between 0 and 1"),
            (r#""guidance_rescale": "some""#, "must be a number"),
            (r#""output_path": "/etc/passwd""#, "unknown field"),
        ];
        let bodies = after_prompt.iter().map(|(fields, rule)| {
            let param = fields.split('"').nth(1).unwrap();
            (format!(r#"{{"prompt": "a", {fields}}}"#), param, *rule)
        });
        let whole = whole
            .iter()
            .map(|&(body, param, rule)| (body.to_string(), param, rule));
        for (body, param, rule) in whole.chain(bodies) {
            let e = err(&body);
            assert_eq!(e.param, param, "{body}: {e:?}");
            assert!(
                e.message.contains(rule),
                "{body}: {:?} lacks {rule:?}",
                e.message
            );
            assert!(
                e.message.contains(param) || param == "body",
                "{body}: {e:?}"
            );
        }
        let long = format!(r#"{{"prompt": "{}"}}"#, "a".repeat(2001));
        assert!(err(&long).message.contains("max_prompt_chars"));
    }

    #[test]
    fn huge_values_are_refused_without_overflow() {
        let max = u64::MAX;
        let e = err(&format!(r#"{{"prompt": "a", "num_frames": {max}}}"#));
        assert_eq!(
            e.message,
            format!(
                "num_frames must be 4k+1 (e.g. {}, {}), got {max}",
                max - 2,
                max as u128 + 2
            )
        );
        let e = err(r#"{"prompt": "a", "height": 4294967296, "width": 4294967296}"#);
        assert_eq!(e.param, "height");
        assert!(
            e.message.contains(&format!("= {max} pixels")) && e.message.contains("(max_pixels)"),
            "{e:?}"
        );
    }

    #[test]
    fn range_bounds_are_inclusive_where_the_rule_says() {
        let body =
            r#"{"prompt": "a", "num_inference_steps": 200, "guidance_scale": 50, "fps": 120}"#;
        let p = check(body).unwrap();
        assert_eq!(
            (p.num_inference_steps, p.guidance_scale, p.fps),
            (200, 50.0, 120.0)
        );
        let body = r#"{"prompt": "a", "num_inference_steps": 1, "guidance_scale": 0, "fps": 0.5}"#;
        let p = check(body).unwrap();
        assert_eq!(
            (p.num_inference_steps, p.guidance_scale, p.fps),
            (1, 0.0, 0.5)
        );
        let e = err(r#"{"prompt": "a", "guidance_scale": 50.5}"#);
        assert_eq!(
            e.message,
            "guidance_scale must be between 0 and 50, got 50.5"
        );
        let e = err(r#"{"prompt": "a", "fps": 120.25}"#);
        assert_eq!(e.message, "fps must be in (0, 120], got 120.25");
    }

    #[test]
    fn memory_estimate_refuses_what_would_not_fit() {
        let m = model();
        let small = check(r#"{"prompt": "a"}"#).unwrap();
        let unlimited = Limits {
            max_job_bytes: u64::MAX,
            ..Limits::default()
        };
        let body = br#"{"prompt": "a", "num_frames": 161, "height": 768, "width": 1360}"#;
        let big = validate(body, &m, &unlimited, 0).unwrap();
        let (s, b) = (m.estimate_job_bytes(&small), m.estimate_job_bytes(&big));
        assert!(s < b / 20, "{s} vs {b}");
        let limits = Limits {
            max_job_bytes: (s + b) / 2,
            ..Limits::default()
        };
        let e = validate(body, &m, &limits, 0).unwrap_err();
        assert_eq!(e.param, "num_frames");
        assert!(
            e.message.contains("GiB") && e.message.contains("max_job_memory"),
            "{e:?}"
        );
        assert!(validate(br#"{"prompt": "a"}"#, &m, &limits, 0).is_ok());
    }

    #[test]
    fn memory_estimate_of_cogvideox_2b_at_its_size_is_plausible() {
        // CogVideoX-2b: inner 1920, 226 text tokens, VAE [128, 256, 256, 512], tiles 240x360.
        let m = ModelInfo {
            default_frames: 49,
            default_height: 480,
            default_width: 720,
            inner_dim: 1920,
            text_len: 226,
            vae_channels: 128,
            vae_tile_height: 240,
            vae_tile_width: 360,
            default_steps: 50,
            ..model()
        };
        let unlimited = Limits {
            max_job_bytes: u64::MAX,
            ..Limits::default()
        };
        let p = validate(br#"{"prompt": "a"}"#, &m, &unlimited, 0).unwrap();
        let gib = m.estimate_job_bytes(&p) as f64 / (1u64 << 30) as f64;
        // 17,776 tokens x 1920 x 2 (guidance): about 6 GiB of activations while denoising.
        assert!((4.0..12.0).contains(&gib), "{gib:.2} GiB");
        // Without guidance the denoising phase halves.
        let p1 = Params {
            guidance_scale: 1.0,
            ..p.clone()
        };
        assert!(m.estimate_job_bytes(&p1) < m.estimate_job_bytes(&p));
    }
}
