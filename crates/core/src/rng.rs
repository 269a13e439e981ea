//! Seeded noise. vdit's own generator (ChaCha8 + Box-Muller via `rand_distr`), stable across
//! platforms and releases; it cannot reproduce torch's generator, which is why parity runs pass
//! their initial latents explicitly.

use crate::Result;
use candle_core::{Device, Shape, Tensor};
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

/// A seeded standard-normal generator.
pub struct NoiseRng(rand_chacha::ChaCha8Rng);

impl NoiseRng {
    pub fn new(seed: u64) -> Self {
        Self(rand_chacha::ChaCha8Rng::seed_from_u64(seed))
    }

    /// A tensor of standard-normal f32 values.
    pub fn randn(&mut self, shape: impl Into<Shape>, dev: &Device) -> Result<Tensor> {
        let shape = shape.into();
        let data: Vec<f32> = (0..shape.elem_count())
            .map(|_| StandardNormal.sample(&mut self.0))
            .collect();
        Ok(Tensor::from_vec(data, shape, dev)?)
    }
}
