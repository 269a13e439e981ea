//! Helpers for parity tests: loading fixture tensors and comparing with a tolerance.

use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::HashMap;
use std::path::{Path, PathBuf};

/// The repository's committed parity fixtures: `<repo>/tests/fixtures/parity/<case>`.
pub fn fixture_dir(case: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../tests/fixtures/parity")
        .join(case)
}

/// All tensors of a safetensors file, on the CPU, in their stored dtype.
pub fn load_tensors(path: &Path) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .map_err(|e| Error::Weights(format!("{}: {e}", path.display())))
}

/// A fixture's `meta.json`.
pub fn load_meta(dir: &Path) -> Result<serde_json::Value> {
    let p = dir.join("meta.json");
    let text = std::fs::read_to_string(&p).map_err(|e| Error::io(&p, e))?;
    serde_json::from_str(&text).map_err(|e| Error::config(&p, "<json>", e.to_string()))
}

/// Max absolute difference between two tensors of the same shape (compared in f64).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f64> {
    if a.dims() != b.dims() {
        return Err(Error::Msg(format!(
            "shape {:?} != {:?}",
            a.dims(),
            b.dims()
        )));
    }
    let a = a.to_dtype(DType::F64)?.flatten_all()?;
    let b = b.to_dtype(DType::F64)?.flatten_all()?;
    Ok(a.sub(&b)?.abs()?.max(0)?.to_scalar::<f64>()?)
}

/// Asserts `max|a-b| <= tol`, printing the figure either way.
pub fn assert_close(name: &str, got: &Tensor, want: &Tensor, tol: f64) {
    let d = max_abs_diff(got, want).unwrap_or_else(|e| panic!("{name}: {e}"));
    eprintln!("{name}: max abs diff {d:.3e} (tolerance {tol:.0e})");
    assert!(d <= tol, "{name}: max abs diff {d:.3e} > {tol:.0e}");
}
