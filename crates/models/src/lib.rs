//! vdit-models: the networks, each built from a `VarBuilder` whose prefixes are the checkpoint keys.
//!
//! - [`layers`]: shared building blocks (attention kernel, embeddings, norms).
//! - [`transformers`]: CogVideoX's expert transformer (2B, 5B, 1.5).
//! - [`autoencoders`]: CogVideoX's 3D causal VAE.
//! - [`text`]: the T5 encoder and its tokenizer.
//!
//! Layout at crate boundaries: video tensors are `[B, F, C, H, W]` for the transformer (as the
//! diffusers pipeline passes latents) and `[B, C, F, H, W]` for the VAE (as diffusers' VAE takes them).
//! Models know nothing of noise schedules.

pub mod autoencoders;
pub mod layers;
pub mod text;
pub mod transformers;
