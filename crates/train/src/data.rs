//! Batches of Shapes World clips, rendered on the fly.
//!
//! The batch of optimiser step `k` is a pure function of (config, seed, k): its bucket and clip
//! indices come from a ChaCha8 stream keyed by (seed, "data") on stream `k`, so a resumed run
//! needs no iterator state and sees exactly the batches an uninterrupted run sees. Micro-batches
//! of one step (gradient accumulation) are drawn one after another from that step's stream.
//!
//! Layout at this boundary: pixels `[B, 3, F, H, W]` f32 in [-1, 1] (diffusers' VAE input),
//! one caption per clip.

use crate::config::DataConfig;
use candle_core::{Device, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use vdit_core::{Error, Result};
use vdit_world::{render, sample_clip, RenderOpts, Scene, Shape};

/// One bucket: a clip size and length, and how often batches come from it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Bucket {
    pub width: usize,
    pub height: usize,
    /// 1 (an image) or 4k+1 (a video CogVideoX's VAE can encode).
    pub frames: usize,
    /// Relative probability; need not sum to 1 over the buckets.
    pub weight: f64,
    /// Clips per batch from this bucket (default: the run's `batch_size`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub batch_size: Option<usize>,
    /// The first optimiser step that draws from this bucket (default 0): a curriculum, e.g.
    /// images alone first, videos added once the spatial path has learned colour.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from_step: Option<u64>,
}

impl Bucket {
    /// Checks the bucket; the message names the field.
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.width == 0
            || self.height == 0
            || !self.width.is_multiple_of(16)
            || !self.height.is_multiple_of(16)
        {
            return Err(format!(
                "width and height must be positive multiples of 16, found {}x{}",
                self.width, self.height
            ));
        }
        if self.frames == 0 || !(self.frames - 1).is_multiple_of(4) {
            return Err(format!(
                "frames must be 1 or 4k+1 (1, 5, 9, 13, 17, ...), found {}",
                self.frames
            ));
        }
        if !(self.weight.is_finite() && self.weight >= 0.0) {
            return Err(format!("weight must be >= 0, found {}", self.weight));
        }
        if self.batch_size == Some(0) {
            return Err("batch_size must be at least 1, found 0".into());
        }
        Ok(())
    }

    /// This bucket's weight at optimiser step `step` (0 before `from_step`).
    pub fn weight_at(&self, step: u64) -> f64 {
        if step >= self.from_step.unwrap_or(0) {
            self.weight
        } else {
            0.0
        }
    }

    /// `WxHxF`, for logs.
    pub fn label(&self) -> String {
        format!("{}x{}x{}", self.width, self.height, self.frames)
    }
}

/// One micro-batch.
#[derive(Debug, Clone)]
pub struct Batch {
    /// The optimiser step (0-based) and the micro-batch within it.
    pub step: u64,
    pub micro: usize,
    /// Index of the bucket in the config.
    pub bucket: usize,
    pub width: usize,
    pub height: usize,
    pub frames: usize,
    /// `[B, 3, F, H, W]` f32 in [-1, 1].
    pub pixels: Tensor,
    pub captions: Vec<String>,
    /// Each clip's background colour (sRGB): pixels of another colour are objects.
    pub backgrounds: Vec<[u8; 3]>,
    /// World clip indices (under the data split and `world_seed`).
    pub clip_indices: Vec<u64>,
    /// The seed of the world the clips were drawn from.
    pub world_seed: u64,
}

/// Rendered clips: pixels `[B, 3, F, H, W]` in [-1, 1], captions and background colours.
#[derive(Debug, Clone)]
pub struct Rendered {
    pub pixels: Tensor,
    pub captions: Vec<String>,
    pub backgrounds: Vec<[u8; 3]>,
}

/// A ChaCha8 generator for `purpose` under `seed`, on stream `stream` (the step): a pure
/// function of its arguments. Each purpose ("data", "loss", ...) gets an independent key.
pub fn step_rng(seed: u64, purpose: &str, stream: u64) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    let p = purpose.as_bytes();
    let n = p.len().min(24);
    key[8..8 + n].copy_from_slice(&p[..n]);
    let mut rng = ChaCha8Rng::from_seed(key);
    rng.set_stream(stream);
    rng
}

/// Picks an index with probability ∝ `weights` (all finite, >= 0, not all 0).
pub fn weighted_choice<R: Rng + ?Sized>(weights: &[f64], rng: &mut R) -> usize {
    let total: f64 = weights.iter().sum();
    let mut u = rng.random::<f64>() * total;
    for (i, &w) in weights.iter().enumerate() {
        if u < w {
            return i;
        }
        u -= w;
    }
    // Rounding left u at the top: the last bucket with weight.
    weights.iter().rposition(|&w| w > 0.0).unwrap_or(0)
}

/// The micro-batches of optimiser step `step`.
pub fn batches_for_step(
    data: &DataConfig,
    seed: u64,
    world_seed: u64,
    default_batch: usize,
    grad_accum: usize,
    step: u64,
    dev: &Device,
) -> Result<Vec<Batch>> {
    let mut rng = step_rng(seed, "data", step);
    let weights: Vec<f64> = data.buckets.iter().map(|b| b.weight_at(step)).collect();
    (0..grad_accum)
        .map(|micro| {
            let bi = weighted_choice(&weights, &mut rng);
            let b = &data.buckets[bi];
            let n = b.batch_size.unwrap_or(default_batch);
            let indices: Vec<u64> = (0..n)
                .map(|_| match data.num_clips {
                    Some(m) => rng.random_range(0..m),
                    None => rng.random::<u64>(),
                })
                .collect();
            let r = render_clips(data, world_seed, b, &indices, dev)?;
            Ok(Batch {
                step,
                micro,
                bucket: bi,
                width: b.width,
                height: b.height,
                frames: b.frames,
                pixels: r.pixels,
                captions: r.captions,
                backgrounds: r.backgrounds,
                clip_indices: indices,
                world_seed,
            })
        })
        .collect()
}

/// Renders clips `indices` of the data split at the bucket's size.
pub fn render_clips(
    data: &DataConfig,
    world_seed: u64,
    b: &Bucket,
    indices: &[u64],
    dev: &Device,
) -> Result<Rendered> {
    let opts = render_opts(data, b)?;
    let (w, h, f) = (b.width, b.height, b.frames);
    let clip_len = 3 * f * w * h;
    let mut out = vec![0f32; indices.len() * clip_len];
    let mut captions = Vec::with_capacity(indices.len());
    let mut backgrounds = Vec::with_capacity(indices.len());
    for (i, &index) in indices.iter().enumerate() {
        let (scene, text) = sample_clip(data.split, world_seed, index, opts.duration());
        backgrounds.push(scene.background.rgb());
        write_clip(&scene, opts, &mut out[i * clip_len..(i + 1) * clip_len]);
        captions.push(text);
    }
    let pixels = Tensor::from_vec(out, (indices.len(), 3, f, h, w), dev)?;
    Ok(Rendered {
        pixels,
        captions,
        backgrounds,
    })
}

/// How the data split renders the bucket's clips.
fn render_opts(data: &DataConfig, b: &Bucket) -> Result<RenderOpts> {
    let opts = RenderOpts {
        width: b.width,
        height: b.height,
        frames: b.frames,
        fps: data.fps,
        antialias: data.antialias,
    };
    opts.validate()
        .map_err(|e| Error::invalid("data bucket", e.to_string()))?;
    Ok(opts)
}

/// Renders `scene` into `clip` (`[3, F, H, W]`, values v/127.5 − 1).
fn write_clip(scene: &Scene, opts: RenderOpts, clip: &mut [f32]) {
    let (f, plane) = (opts.frames, opts.width * opts.height);
    for (k, frame) in render(scene, opts).iter().enumerate() {
        for (p, rgb) in frame.chunks_exact(3).enumerate() {
            for c in 0..3 {
                clip[(c * f + k) * plane + p] = rgb[c] as f32 / 127.5 - 1.0;
            }
        }
    }
}

/// Clip `index` of the data split rendered at the bucket's size with object `object`'s shape
/// replaced by each of the other shapes in turn: `[3, 3, F, H, W]` (the other shapes in index
/// order) and the object's own shape. `None` when the clip has no object `object`.
pub fn render_shape_alternatives(
    data: &DataConfig,
    world_seed: u64,
    b: &Bucket,
    index: u64,
    object: usize,
    dev: &Device,
) -> Result<Option<(Tensor, Shape)>> {
    let opts = render_opts(data, b)?;
    let (mut scene, _) = sample_clip(data.split, world_seed, index, opts.duration());
    let Some(own) = scene.objects.get(object).map(|o| o.shape) else {
        return Ok(None);
    };
    let others: Vec<Shape> = Shape::ALL.iter().copied().filter(|&s| s != own).collect();
    let clip_len = 3 * b.frames * b.width * b.height;
    let mut out = vec![0f32; others.len() * clip_len];
    for (i, &s) in others.iter().enumerate() {
        scene.objects[object].shape = s;
        write_clip(&scene, opts, &mut out[i * clip_len..(i + 1) * clip_len]);
    }
    let pixels = Tensor::from_vec(out, (others.len(), 3, b.frames, b.height, b.width), dev)?;
    Ok(Some((pixels, own)))
}

/// The number of objects in clip `index` of the data split.
pub fn clip_object_count(data: &DataConfig, world_seed: u64, index: u64) -> usize {
    sample_clip(data.split, world_seed, index, 0.0)
        .0
        .objects
        .len()
}

/// Per-element loss weights `[B, F', 1, h, w]`: for clip i, `1 + object_weights[i]` at the
/// object cells of [`latent_object_mask`], else 1.
pub fn latent_object_weights(
    pixels: &Tensor,
    backgrounds: &[[u8; 3]],
    spatial: usize,
    temporal: usize,
    dilate: usize,
    object_weights: &[f64],
) -> Result<Tensor> {
    let mask = latent_object_mask(pixels, backgrounds, spatial, temporal, dilate)?;
    object_weights_from_mask(&mask, object_weights)
}

/// `1 + object_weights[i]·mask[i]` for a 0/1 mask `[B, ...]` of [`latent_object_mask`].
pub fn object_weights_from_mask(mask: &Tensor, object_weights: &[f64]) -> Result<Tensor> {
    let b = mask.dim(0)?;
    if object_weights.len() != b {
        return Err(Error::invalid(
            "object weights",
            format!("{} weights for {b} clips", object_weights.len()),
        ));
    }
    let mut shape = vec![1; mask.rank()];
    shape[0] = b;
    let w: Vec<f32> = object_weights.iter().map(|&w| w as f32).collect();
    let w = Tensor::from_vec(w, shape, mask.device())?;
    Ok((mask.broadcast_mul(&w)? + 1.0)?)
}

/// The object cells (1, else 0), `[B, F', 1, h, w]`, at the latent grid of a causal VAE
/// (`spatial`x spatial, `temporal`x temporal compression: latent frame 0 covers pixel frame 0,
/// latent frame j ≥ 1 pixel frames 4j−3..=4j for 4x): the cells whose footprint, grown by
/// `dilate` cells each way (the VAE spreads an edge into its neighbours), holds a pixel differing
/// from the clip's background colour.
pub fn latent_object_mask(
    pixels: &Tensor,
    backgrounds: &[[u8; 3]],
    spatial: usize,
    temporal: usize,
    dilate: usize,
) -> Result<Tensor> {
    let (b, c, f, h, w) = pixels.dims5()?;
    if c != 3 || backgrounds.len() != b {
        return Err(Error::invalid(
            "object weights",
            format!(
                "pixels {:?} with {} background colours: expected [B, 3, F, H, W] and B colours",
                pixels.dims(),
                backgrounds.len(),
            ),
        ));
    }
    if spatial == 0 || temporal == 0 || h % spatial != 0 || w % spatial != 0 {
        return Err(Error::invalid(
            "object weights",
            format!("{h}x{w} frames do not divide into {spatial}x{spatial} latent cells"),
        ));
    }
    if f == 0 || (f - 1) % temporal != 0 {
        return Err(Error::invalid(
            "object weights",
            format!("{f} frames is not 1 + {temporal}k"),
        ));
    }
    let (lf, lh, lw) = (1 + (f - 1) / temporal, h / spatial, w / spatial);
    let px = pixels.detach().flatten_all()?.to_vec1::<f32>()?;
    let plane = h * w;
    let mut out = vec![0f32; b * lf * lh * lw];
    // An 8-bit value v is stored as v/127.5 − 1; anything further than half a level is another
    // colour.
    let tol = 0.5 / 127.5;
    for (i, bg) in backgrounds.iter().enumerate() {
        let bg: Vec<f32> = bg.iter().map(|&v| v as f32 / 127.5 - 1.0).collect();
        let clip = &px[i * 3 * f * plane..(i + 1) * 3 * f * plane];
        let mut hit = vec![false; lf * lh * lw];
        for k in 0..f {
            let j = k.div_ceil(temporal);
            for y in 0..h {
                for x in 0..w {
                    let p = y * w + x;
                    let object =
                        (0..3).any(|ch| (clip[(ch * f + k) * plane + p] - bg[ch]).abs() > tol);
                    if object {
                        hit[(j * lh + y / spatial) * lw + x / spatial] = true;
                    }
                }
            }
        }
        let d = dilate as isize;
        for j in 0..lf {
            for y in 0..lh as isize {
                for x in 0..lw as isize {
                    let near = (-d..=d).any(|dy| {
                        (-d..=d).any(|dx| {
                            let (yy, xx) = (y + dy, x + dx);
                            yy >= 0
                                && xx >= 0
                                && yy < lh as isize
                                && xx < lw as isize
                                && hit[(j * lh + yy as usize) * lw + xx as usize]
                        })
                    });
                    if near {
                        out[((i * lf + j) * lh + y as usize) * lw + x as usize] = 1.0;
                    }
                }
            }
        }
    }
    Ok(Tensor::from_vec(out, (b, lf, 1, lh, lw), pixels.device())?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vdit_world::Split;

    fn cfg() -> DataConfig {
        DataConfig::default()
    }

    #[test]
    fn batches_are_a_pure_function_of_seed_and_step() {
        let d = cfg();
        let dev = Device::Cpu;
        let a = batches_for_step(&d, 3, 3, 2, 2, 17, &dev).unwrap();
        let b = batches_for_step(&d, 3, 3, 2, 2, 17, &dev).unwrap();
        assert_eq!(a.len(), 2);
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x.bucket, y.bucket);
            assert_eq!(x.clip_indices, y.clip_indices);
            assert_eq!(x.captions, y.captions);
            let dx = x.pixels.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            let dy = y.pixels.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert_eq!(dx, dy);
        }
        // Another step or seed draws other clips.
        let c = batches_for_step(&d, 3, 3, 2, 2, 18, &dev).unwrap();
        assert_ne!(a[0].clip_indices, c[0].clip_indices);
        let e = batches_for_step(&d, 4, 3, 2, 2, 17, &dev).unwrap();
        assert_ne!(a[0].clip_indices, e[0].clip_indices);
    }

    /// Each alternative draws the chosen object as one of the other three shapes (its colour
    /// exactly where that shape covers a pixel's centre) and leaves every pixel away from that
    /// object as rendered; the own shape is the scene's.
    #[test]
    fn shape_alternatives_redraw_only_the_chosen_object() {
        let data = DataConfig {
            split: vdit_world::Split::Train,
            antialias: false,
            ..Default::default()
        };
        let b = Bucket {
            width: 64,
            height: 64,
            frames: 5,
            weight: 1.0,
            batch_size: None,
            from_step: None,
        };
        let dev = Device::Cpu;
        let opts = render_opts(&data, &b).unwrap();
        let mut seen_two = false;
        for index in 0..12u64 {
            let (scene, _) = sample_clip(data.split, 7, index, opts.duration());
            let n = clip_object_count(&data, 7, index);
            assert_eq!(n, scene.objects.len());
            seen_two |= n == 2;
            assert!(render_shape_alternatives(&data, 7, &b, index, n, &dev)
                .unwrap()
                .is_none());
            let own = render_clips(&data, 7, &b, &[index], &dev).unwrap().pixels;
            let own = own.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            for k in 0..n {
                let obj = &scene.objects[k];
                let (alts, shape) = render_shape_alternatives(&data, 7, &b, index, k, &dev)
                    .unwrap()
                    .unwrap();
                assert_eq!(shape, obj.shape);
                assert_eq!(alts.dims(), &[3, 3, 5, 64, 64]);
                let others: Vec<Shape> =
                    Shape::ALL.iter().copied().filter(|&s| s != shape).collect();
                let alts = alts.flatten_all().unwrap().to_vec1::<f32>().unwrap();
                let r = obj.size.radius();
                let bg: Vec<f32> = scene
                    .background
                    .rgb()
                    .iter()
                    .map(|&v| v as f32 / 127.5 - 1.0)
                    .collect();
                let plane = 64 * 64;
                for (a, &s) in others.iter().enumerate() {
                    let alt = &alts[a * 3 * 5 * plane..(a + 1) * 3 * 5 * plane];
                    assert!(alt != &own[..], "{index}/{k}: {s:?} renders as {shape:?}");
                    let mut mismatched = 0usize;
                    for f in 0..5 {
                        let (cx, cy) = obj.position(f as f64 / opts.fps as f64);
                        for p in 0..plane {
                            let (x, y) = ((p % 64) as f64 + 0.5, (p / 64) as f64 + 0.5);
                            let near = (x / 64.0 - cx).abs() <= r + 1.5 / 64.0
                                && (y / 64.0 - cy).abs() <= r + 1.5 / 64.0;
                            let px = |c: usize| (c * 5 + f) * plane + p;
                            let changed = (0..3).any(|c| alt[px(c)] != own[px(c)]);
                            assert!(
                                near || !changed,
                                "{index}/{k} {s:?}: pixel {p} of frame {f} changed away from the object"
                            );
                            let colour = obj.colour.rgb();
                            let is_obj = (0..3).all(|c| {
                                (alt[px(c)] - (colour[c] as f32 / 127.5 - 1.0)).abs() < 1e-6
                            }) && (0..3).any(|c| (alt[px(c)] - bg[c]).abs() > 1e-6);
                            // within the object's box (no other object reaches it) the
                            // object's colour is where shape s covers the pixel's centre
                            let (dx, dy) = (x / 64.0 - cx, y / 64.0 - cy);
                            if dx.abs() <= r && dy.abs() <= r && is_obj != s.contains(dx, dy, r) {
                                mismatched += 1;
                            }
                        }
                    }
                    // (a centre on the boundary may round either way)
                    assert!(
                        mismatched <= 5,
                        "{index}/{k} {s:?}: {mismatched} pixels differ from the shape"
                    );
                }
            }
        }
        assert!(seen_two);
    }

    #[test]
    fn object_weights_cover_the_latent_cells_of_object_pixels() {
        let dev = Device::Cpu;
        // One 5-frame 16x8 clip on a gray background; an object pixel at frame 0 (2, 3) and one
        // at frame 3 (9, 14) (row, column); 4x spatial, 4x temporal, no dilation.
        let bg = [128u8, 128, 128];
        let (f, h, w) = (5, 16, 8);
        let mut px = vec![128f32 / 127.5 - 1.0; 3 * f * h * w];
        px[(2 * 3) + 3] = 1.0; // channel 0, frame 0
        px[((2 * f + 3) * h + 9) * w + 6] = -1.0; // channel 2, frame 3
        let t = Tensor::from_vec(px, (1, 3, f, h, w), &dev).unwrap();
        let wts = latent_object_weights(&t, &[bg], 4, 4, 0, &[2.5]).unwrap();
        assert_eq!(wts.dims(), &[1, 2, 1, 4, 2]);
        let got = wts.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mut want = vec![1f32; 16];
        want[0] = 3.5; // latent frame 0, cell (0, 0)
        want[8 + 2 * 2 + 1] = 3.5; // latent frame 1 (pixel frames 1..=4), cell (2, 1)
        assert_eq!(got, want);
        // Dilation by one cell grows each footprint to its 3x3 neighbourhood.
        let wts = latent_object_weights(&t, &[bg], 4, 4, 1, &[1.0]).unwrap();
        let got = wts.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let ones = |v: &[f32]| v.iter().filter(|&&x| x == 2.0).count();
        assert_eq!(ones(&got[..8]), 4); // (0..=1, 0..=1)
        assert_eq!(ones(&got[8..]), 6); // rows 1..=3, both columns
                                        // Shapes that do not fit the grid are errors naming what was expected.
        let e = latent_object_weights(&t, &[bg], 3, 4, 0, &[1.0]).unwrap_err();
        assert!(e.to_string().contains("3x3 latent cells"), "{e}");
        let e = latent_object_weights(&t, &[bg, bg], 4, 4, 0, &[1.0, 1.0]).unwrap_err();
        assert!(e.to_string().contains("2 background colours"), "{e}");
    }

    #[test]
    fn rendered_objects_are_weighted_and_backgrounds_are_not() {
        let d = cfg();
        let b = Bucket {
            width: 64,
            height: 64,
            frames: 17,
            weight: 1.0,
            batch_size: None,
            from_step: None,
        };
        let r = render_clips(&d, 0, &b, &[0, 1, 2, 3], &Device::Cpu).unwrap();
        let wts = latent_object_weights(&r.pixels, &r.backgrounds, 4, 4, 0, &[1.0; 4]).unwrap();
        assert_eq!(wts.dims(), &[4, 5, 1, 16, 16]);
        for i in 0..4 {
            let (scene, _) = sample_clip(d.split, 0, i as u64, 17.0 / 8.0);
            let v = wts
                .get(i)
                .unwrap()
                .flatten_all()
                .unwrap()
                .to_vec1::<f32>()
                .unwrap();
            let frac = v.iter().filter(|&&x| x == 2.0).count() as f64 / v.len() as f64;
            // Each object's disc (radius r px) lies in the cells it touches; the first latent
            // frame alone holds at least its area in cells.
            let area: f64 = scene
                .objects
                .iter()
                .map(|o| o.shape.area(o.size.radius() * 64.0) / 16.0)
                .sum();
            assert!(frac > 0.0 && frac < 0.6, "clip {i}: {frac}");
            let first = v[..256].iter().filter(|&&x| x == 2.0).count() as f64;
            assert!(first >= area * 0.9, "clip {i}: {first} cells for {area}");
        }
    }

    #[test]
    fn pixels_match_the_world_render() {
        let d = cfg();
        let b = Bucket {
            width: 96,
            height: 64,
            frames: 9,
            weight: 1.0,
            batch_size: None,
            from_step: None,
        };
        let r = render_clips(&d, 5, &b, &[7, 123456789], &Device::Cpu).unwrap();
        let (px, caps) = (r.pixels, r.captions);
        assert_eq!(px.dims(), &[2, 3, 9, 64, 96]);
        let (scene, text) = sample_clip(Split::Train, 5, 123456789, 1.0);
        assert_eq!(caps[1], text);
        let opts = RenderOpts {
            width: 96,
            height: 64,
            frames: 9,
            fps: 8.0,
            antialias: true,
        };
        let frames = render(&scene, opts);
        // Clip 1, channel 2 (blue), frame 8, row 10, column 50.
        let got = px
            .get(1)
            .unwrap()
            .get(2)
            .unwrap()
            .get(8)
            .unwrap()
            .get(10)
            .unwrap()
            .get(50)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let want = frames[8][(10 * 96 + 50) * 3 + 2] as f32 / 127.5 - 1.0;
        assert_eq!(got, want);
        let v = px.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(v.iter().all(|x| (-1.0..=1.0).contains(x)));
        // Anti-aliased: some pixels are blends, not palette colours.
        let mut levels: Vec<u32> = v
            .iter()
            .map(|x| ((x + 1.0) * 127.5).round() as u32)
            .collect();
        levels.sort_unstable();
        levels.dedup();
        assert!(levels.len() > 12, "{} grey levels", levels.len());
    }

    #[test]
    fn bucket_frequencies_follow_the_weights() {
        let mut d = cfg();
        d.buckets.truncate(3);
        d.buckets[0].weight = 1.0;
        d.buckets[1].weight = 0.0;
        d.buckets[2].weight = 3.0;
        let weights: Vec<f64> = d.buckets.iter().map(|b| b.weight).collect();
        let mut counts = [0usize; 3];
        for step in 0..4000 {
            let mut rng = step_rng(1, "data", step);
            counts[weighted_choice(&weights, &mut rng)] += 1;
        }
        assert_eq!(counts[1], 0);
        let frac = counts[2] as f64 / 4000.0;
        assert!((frac - 0.75).abs() < 0.03, "{counts:?}");
    }

    #[test]
    fn buckets_join_at_their_from_step() {
        let mut d = cfg();
        d.buckets.truncate(2);
        d.buckets[0].frames = 1;
        d.buckets[1].frames = 9;
        d.buckets[1].from_step = Some(5);
        let frames_at = |step| {
            batches_for_step(&d, 0, 0, 1, 2, step, &Device::Cpu)
                .unwrap()
                .iter()
                .map(|b| b.frames)
                .collect::<Vec<_>>()
        };
        for step in 0..5 {
            assert_eq!(frames_at(step), [1, 1], "step {step}");
        }
        let later: Vec<usize> = (5..25).flat_map(frames_at).collect();
        assert!(later.contains(&9) && later.contains(&1), "{later:?}");
    }

    #[test]
    fn mixed_batches_include_images_and_videos() {
        let d = cfg();
        let mut frames = std::collections::BTreeSet::new();
        let mut sizes = std::collections::BTreeSet::new();
        for step in 0..60 {
            let mut rng = step_rng(0, "data", step);
            let w: Vec<f64> = d.buckets.iter().map(|b| b.weight).collect();
            let b = &d.buckets[weighted_choice(&w, &mut rng)];
            frames.insert(b.frames);
            sizes.insert((b.width, b.height));
        }
        assert_eq!(frames.into_iter().collect::<Vec<_>>(), vec![1, 9, 17]);
        assert_eq!(sizes.len(), 4);
    }

    #[test]
    fn purposes_and_streams_are_independent() {
        let a: u64 = step_rng(0, "data", 0).random();
        let b: u64 = step_rng(0, "loss", 0).random();
        let c: u64 = step_rng(0, "data", 1).random();
        let d: u64 = step_rng(1, "data", 0).random();
        assert!(a != b && a != c && a != d && b != c);
        assert_eq!(a, step_rng(0, "data", 0).random::<u64>());
    }
}
