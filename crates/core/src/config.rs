//! Reading component configs with their upstream (diffusers / transformers) field names.
//!
//! A field of the wrong type or an invalid value is an error naming the file and the key.
//! Keys the struct does not know are reported with `tracing::warn!` (diffusers ignores them
//! too), except the `_`-prefixed bookkeeping keys such as `_class_name`.

use crate::{Error, Result};
use serde::{de::DeserializeOwned, Serialize};
use std::path::Path;

/// Reads `path` as JSON into `T`, naming the offending key on error.
pub fn load_config<T: DeserializeOwned + Serialize>(path: &Path) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    parse_config(path, &text)
}

/// As [`load_config`] on text already read; `path` is used in messages only.
pub fn parse_config<T: DeserializeOwned + Serialize>(path: &Path, text: &str) -> Result<T> {
    let raw: serde_json::Value = serde_json::from_str(text)
        .map_err(|e| Error::config(path, "<json>", format!("not valid JSON: {e}")))?;
    let de = raw.clone();
    let value: T = serde_path_to_error::deserialize(de).map_err(|e| {
        let key = e.path().to_string();
        let key = if key == "." {
            "<root>".to_string()
        } else {
            key
        };
        Error::config(path, key, e.inner().to_string())
    })?;
    if let (serde_json::Value::Object(given), Ok(serde_json::Value::Object(known))) =
        (&raw, serde_json::to_value(&value))
    {
        for k in given.keys() {
            if !k.starts_with('_') && !known.contains_key(k) {
                tracing::warn!(file = %path.display(), key = %k, "unknown config key ignored");
            }
        }
    }
    Ok(value)
}

/// Checks a condition on a config value, producing an error naming file and key.
pub fn ensure(cond: bool, file: &Path, key: &str, msg: impl FnOnce() -> String) -> Result<()> {
    if cond {
        Ok(())
    } else {
        Err(Error::config(file, key, msg()))
    }
}
