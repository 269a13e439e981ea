//! Device and dtype selection. CPU always; CUDA only when built with the `cuda` feature.

use crate::{Error, Result};
use candle_core::{DType, Device};

/// Parses a `--dtype` value: `f32`, `f16` or `bf16`.
pub fn parse_dtype(s: &str) -> Result<DType> {
    match s {
        "f32" | "float32" => Ok(DType::F32),
        "f16" | "float16" => Ok(DType::F16),
        "bf16" | "bfloat16" => Ok(DType::BF16),
        other => Err(Error::invalid(
            "dtype",
            format!("`{other}` is not one of f32, f16, bf16"),
        )),
    }
}

/// The best available device: the first CUDA device when compiled with `cuda`, else the CPU.
pub fn default_device() -> Result<Device> {
    #[cfg(feature = "cuda")]
    {
        if let Ok(d) = Device::new_cuda(0) {
            return Ok(d);
        }
    }
    Ok(Device::Cpu)
}
