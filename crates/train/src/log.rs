//! The loss log: one JSON line per optimiser step in `<out_dir>/loss.jsonl`,
//! `{"step": 12, "loss": 0.41, "lr": 0.0009, "grad_norm": 1.7, "seconds": 0.05, "elapsed": 0.6,
//! "bucket": "64x64x17", ...metrics}`. `step` counts steps done (1 for the first); `seconds` is
//! the wall time of that step and `elapsed` the wall time since the run began (over resumes).
//! The whole log is also kept in each checkpoint, so a resumed run rewrites the file up to its
//! step and the file never holds steps the parameters do not reflect.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;
use vdit_core::{Error, Result};

/// One line of `loss.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LogRecord {
    pub step: u64,
    pub loss: f64,
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    pub seconds: f64,
    pub elapsed: f64,
    /// The bucket(s) of the step's micro-batches (`WxHxF`, comma-separated).
    pub bucket: String,
    /// The model's extra metrics (mean over micro-batches).
    #[serde(flatten)]
    pub metrics: BTreeMap<String, f64>,
}

impl LogRecord {
    /// The record without its wall-clock fields, for comparing runs.
    pub fn deterministic(&self) -> (u64, u64, u64, u64, &str, Vec<(&String, u64)>) {
        (
            self.step,
            self.loss.to_bits(),
            self.lr.to_bits(),
            self.grad_norm.to_bits(),
            self.bucket.as_str(),
            self.metrics.iter().map(|(k, v)| (k, v.to_bits())).collect(),
        )
    }
}

/// Rewrites `path` with `records` (write to a temporary file, then rename).
pub fn write_log(path: &Path, records: &[LogRecord]) -> Result<()> {
    let mut text = String::new();
    for r in records {
        text.push_str(&serde_json::to_string(r).map_err(|e| Error::Msg(e.to_string()))?);
        text.push('\n');
    }
    crate::checkpoint::write_atomic(path, text.as_bytes())
}

/// Appends one record to `path`.
pub fn append_log(path: &Path, r: &LogRecord) -> Result<()> {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    let line = serde_json::to_string(r).map_err(|e| Error::Msg(e.to_string()))?;
    writeln!(f, "{line}").map_err(|e| Error::io(path, e))
}

/// Reads a `loss.jsonl`; errors name the line.
pub fn read_log(path: &Path) -> Result<Vec<LogRecord>> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(i, l)| {
            serde_json::from_str(l).map_err(|e| {
                Error::config(
                    path,
                    format!("line {}", i + 1),
                    format!("not a log record: {e}"),
                )
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_with_metrics() {
        let dir = std::env::temp_dir().join(format!("vdit-train-log-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("loss.jsonl");
        let mut m = BTreeMap::new();
        m.insert("kl".to_string(), 0.125);
        let r = LogRecord {
            step: 1,
            loss: 0.1 + 0.2,
            lr: 1e-4,
            grad_norm: 3.5,
            seconds: 0.01,
            elapsed: 0.01,
            bucket: "64x64x17".into(),
            metrics: m,
        };
        write_log(&p, std::slice::from_ref(&r)).unwrap();
        let r2 = LogRecord {
            step: 2,
            ..r.clone()
        };
        append_log(&p, &r2).unwrap();
        let back = read_log(&p).unwrap();
        assert_eq!(back, vec![r.clone(), r2]);
        // f64 survives exactly (serde_json writes shortest round-trip decimals).
        assert_eq!(back[0].loss.to_bits(), (0.1f64 + 0.2).to_bits());
        let line = std::fs::read_to_string(&p).unwrap();
        assert!(line.starts_with("{\"step\":1,\"loss\":"), "{line}");
        assert!(line.contains("\"kl\":0.125"));
        std::fs::write(&p, "{\"step\": 1}\n").unwrap();
        let e = read_log(&p).unwrap_err().to_string();
        assert!(e.contains("line 1"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
