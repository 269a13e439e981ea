//! Degradations and null videos for the scorer's gates: Gaussian blur, additive Gaussian noise,
//! pure-noise and constant clips.

use rand::Rng;
use rand_distr::{Distribution, Normal};

/// Blurs every frame with a Gaussian of standard deviation `sigma` pixels (separable, kernel
/// radius ceil(3 sigma), edges clamped).
pub fn blur(frames: &[Vec<u8>], width: usize, height: usize, sigma: f64) -> Vec<Vec<u8>> {
    if sigma <= 0.0 {
        return frames.to_vec();
    }
    let rad = (3.0 * sigma).ceil() as isize;
    let mut k: Vec<f32> = (-rad..=rad).map(|d| (-(d * d) as f64 / (2.0 * sigma * sigma)).exp() as f32).collect();
    let s: f32 = k.iter().sum();
    k.iter_mut().for_each(|v| *v /= s);
    let (w, h) = (width as isize, height as isize);
    frames
        .iter()
        .map(|f| {
            let mut tmp = vec![0f32; f.len()];
            for i in 0..h {
                for j in 0..w {
                    for c in 0..3 {
                        let mut acc = 0.0;
                        for (t, kv) in k.iter().enumerate() {
                            let jj = (j + t as isize - rad).clamp(0, w - 1);
                            acc += kv * f[((i * w + jj) * 3 + c) as usize] as f32;
                        }
                        tmp[((i * w + j) * 3 + c) as usize] = acc;
                    }
                }
            }
            let mut out = vec![0u8; f.len()];
            for i in 0..h {
                for j in 0..w {
                    for c in 0..3 {
                        let mut acc = 0.0;
                        for (t, kv) in k.iter().enumerate() {
                            let ii = (i + t as isize - rad).clamp(0, h - 1);
                            acc += kv * tmp[((ii * w + j) * 3 + c) as usize];
                        }
                        out[((i * w + j) * 3 + c) as usize] = acc.round().clamp(0.0, 255.0) as u8;
                    }
                }
            }
            out
        })
        .collect()
}

/// Adds independent Gaussian noise of standard deviation `sigma` to every channel, clamped.
pub fn add_noise<R: Rng + ?Sized>(frames: &[Vec<u8>], sigma: f64, rng: &mut R) -> Vec<Vec<u8>> {
    let normal = Normal::new(0.0, sigma.max(0.0)).unwrap_or_else(|_| Normal::new(0.0, 0.0).expect("valid"));
    frames
        .iter()
        .map(|f| {
            f.iter()
                .map(|&v| (v as f64 + normal.sample(rng)).round().clamp(0.0, 255.0) as u8)
                .collect()
        })
        .collect()
}

/// A clip of uniform random bytes.
pub fn noise_clip<R: Rng + ?Sized>(width: usize, height: usize, frames: usize, rng: &mut R) -> Vec<Vec<u8>> {
    (0..frames)
        .map(|_| (0..width * height * 3).map(|_| rng.random::<u8>()).collect())
        .collect()
}

/// A clip whose every pixel of every frame is `rgb`.
pub fn constant_clip(width: usize, height: usize, frames: usize, rgb: [u8; 3]) -> Vec<Vec<u8>> {
    let f: Vec<u8> = (0..width * height).flat_map(|_| rgb).collect();
    vec![f; frames]
}
