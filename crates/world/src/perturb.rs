//! Degradations and null videos for the scorer's gates: Gaussian blur, additive Gaussian noise,
//! pure-noise and constant clips.

use rand::Rng;
use rand_distr::{Distribution, Normal};

/// Blurs every frame with a Gaussian of standard deviation `sigma` pixels (separable, kernel
/// radius ceil(3 sigma), edges clamped).
pub fn blur(frames: &[Vec<u8>], width: usize, height: usize, sigma: f64) -> Vec<Vec<u8>> {
    if sigma <= 0.0 || width == 0 || height == 0 {
        return frames.to_vec();
    }
    let rad = (3.0 * sigma).ceil() as isize;
    let mut k: Vec<f32> = (-rad..=rad)
        .map(|d| (-(d * d) as f64 / (2.0 * sigma * sigma)).exp() as f32)
        .collect();
    let s: f32 = k.iter().sum();
    k.iter_mut().for_each(|v| *v /= s);
    // Clamped source index of each tap, per column and per row.
    let taps = |n: usize| -> Vec<usize> {
        (0..n as isize)
            .flat_map(|x| (-rad..=rad).map(move |d| (x + d).clamp(0, n as isize - 1) as usize))
            .collect()
    };
    let (cols, rows, nk) = (taps(width), taps(height), k.len());
    frames
        .iter()
        .map(|f| {
            // Horizontal pass into f32, then vertical pass back to u8.
            let mut tmp = vec![0f32; f.len()];
            for (row_in, row_out) in f
                .chunks_exact(width * 3)
                .zip(tmp.chunks_exact_mut(width * 3))
            {
                for (j, out) in row_out.chunks_exact_mut(3).enumerate() {
                    let mut acc = [0f32; 3];
                    for (&kv, &jj) in k.iter().zip(&cols[j * nk..(j + 1) * nk]) {
                        let p = &row_in[jj * 3..jj * 3 + 3];
                        acc[0] += kv * p[0] as f32;
                        acc[1] += kv * p[1] as f32;
                        acc[2] += kv * p[2] as f32;
                    }
                    out.copy_from_slice(&acc);
                }
            }
            let mut out = vec![0u8; f.len()];
            let stride = width * 3;
            for (i, row_out) in out.chunks_exact_mut(stride).enumerate() {
                let mut acc = vec![0f32; stride];
                for (&kv, &ii) in k.iter().zip(&rows[i * nk..(i + 1) * nk]) {
                    for (a, &v) in acc.iter_mut().zip(&tmp[ii * stride..(ii + 1) * stride]) {
                        *a += kv * v;
                    }
                }
                for (o, a) in row_out.iter_mut().zip(&acc) {
                    *o = (a + 0.5).clamp(0.0, 255.0) as u8;
                }
            }
            out
        })
        .collect()
}

/// Adds independent Gaussian noise of standard deviation `sigma` to every channel, clamped.
pub fn add_noise<R: Rng + ?Sized>(frames: &[Vec<u8>], sigma: f64, rng: &mut R) -> Vec<Vec<u8>> {
    let normal =
        Normal::new(0.0, sigma.max(0.0)).unwrap_or_else(|_| Normal::new(0.0, 0.0).expect("valid"));
    frames
        .iter()
        .map(|f| {
            f.iter()
                .map(|&v| (v as f64 + normal.sample(rng) + 0.5).clamp(0.0, 255.0) as u8)
                .collect()
        })
        .collect()
}

/// A clip of uniform random bytes.
pub fn noise_clip<R: Rng + ?Sized>(
    width: usize,
    height: usize,
    frames: usize,
    rng: &mut R,
) -> Vec<Vec<u8>> {
    (0..frames)
        .map(|_| {
            (0..width * height * 3)
                .map(|_| rng.random::<u8>())
                .collect()
        })
        .collect()
}

/// A clip whose every pixel of every frame is `rgb`.
pub fn constant_clip(width: usize, height: usize, frames: usize, rgb: [u8; 3]) -> Vec<Vec<u8>> {
    let f: Vec<u8> = (0..width * height).flat_map(|_| rgb).collect();
    vec![f; frames]
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn blur_preserves_mass_and_spreads_a_point() {
        let (w, h) = (15, 11);
        let mut f = vec![0u8; w * h * 3];
        let c = (5 * w + 7) * 3;
        f[c..c + 3].copy_from_slice(&[200, 100, 250]);
        let b = &blur(&[f], w, h, 1.0)[0];
        // Centre weight of a 2-D Gaussian with sigma 1 (7 taps): g(0)^2 = 0.3990^2 = 0.1592.
        assert!((b[c] as f64 - 200.0 * 0.1592).abs() <= 1.0, "{}", b[c]);
        // Symmetric and mass-preserving (up to rounding).
        assert_eq!(b[c - 3], b[c + 3]);
        assert_eq!(b[c - w * 3], b[c + w * 3]);
        let mass: u32 = b.chunks(3).map(|p| p[1] as u32).sum();
        assert!((mass as i32 - 100).abs() <= 8, "{mass}");
    }

    #[test]
    fn noise_has_the_requested_sigma() {
        let f = constant_clip(32, 32, 4, [128, 128, 128]);
        let n = add_noise(&f, 10.0, &mut rand_chacha::ChaCha8Rng::seed_from_u64(1));
        let d: Vec<f64> = n.iter().flatten().map(|&v| v as f64 - 128.0).collect();
        let mean = d.iter().sum::<f64>() / d.len() as f64;
        let sd = (d.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / d.len() as f64).sqrt();
        assert!(mean.abs() < 0.2 && (sd - 10.0).abs() < 0.2, "{mean} {sd}");
    }
}
