//! Video autoencoders.
//!
//! - [`cogvideox_vae`]: CogVideoX's 3D causal VAE (`AutoencoderKLCogVideoX`), encode and decode
//!   with diffusers' frame batching, conv caches and tiling.
//! - [`conv3d`]: the CPU f32 convolution kernel it runs on (candle has no conv3d): row bands,
//!   fused norm/SiLU/upsampling on input, one GEMM per tap pair without im2col.
//! - [`video`]: the channels-last activation buffer and the element-wise pieces.

pub mod cogvideox_vae;
pub mod conv3d;
pub mod video;

pub use cogvideox_vae::{
    AutoencoderKLCogVideoX, AutoencoderKLCogVideoXConfig, DiagonalGaussian, TileOptions,
};
