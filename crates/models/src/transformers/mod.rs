//! Diffusion transformers.
//!
//! - [`cogvideox`]: CogVideoX's expert transformer (2B, 5B, 5B-I2V, 1.5) and the pipeline-side
//!   RoPE tables.

pub mod cogvideox;
