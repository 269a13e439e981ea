//! Shared building blocks. Each op has an f32 CPU fast path (own kernels over `gemm`, fused
//! element-wise passes, rayon) and a plain candle form used on other devices and dtypes; the
//! candle forms are the differentiable ones (candle's fast ops and these kernels drop gradients).
//!
//! - [`cpu`]: the f32 kernels (data access, vectorised exp/softmax/GELU/LayerNorm, gemm).
//! - [`linear`]: `nn.Linear`, optionally with GELU (tanh) fused.
//! - [`norm`]: LayerNorm with adaLN modulation and gated residuals over a two-span sequence.
//! - [`attention`]: memory-bounded scaled dot-product attention; per-head q/k norm + RoPE.
//! - [`rope`]: 3D rotary tables (`get_3d_rotary_pos_embed`) and their application.
//! - [`embeddings`]: timestep sinusoids, `TimestepEmbedding`, 3D sin-cos positions.

pub mod attention;
pub mod cpu;
pub mod embeddings;
pub mod linear;
pub mod norm;
pub mod rope;
