//! Video autoencoders.
//!
//! - [`cogvideox_vae`]: CogVideoX's 3D causal VAE (`AutoencoderKLCogVideoX`), encode and decode
//!   with diffusers' frame batching, conv caches and tiling.
//! - [`conv3d`]: the CPU f32 convolution kernels it runs on (candle has no conv3d): row bands in
//!   parallel, GroupNorm/SpatialNorm/SiLU and nearest upsampling fused into the input read,
//!   Winograd F(2x2, 3x3) for the 3x3 convs and a direct GEMM kernel without im2col otherwise.
//! - [`video`]: the channels-last activation buffer and the element-wise pieces.

pub mod cogvideox_vae;
pub mod conv3d;
pub mod video;

pub use cogvideox_vae::{
    AutoencoderKLCogVideoX, AutoencoderKLCogVideoXConfig, DiagonalGaussian, TileOptions,
};
