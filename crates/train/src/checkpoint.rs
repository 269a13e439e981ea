//! Checkpoints: everything a run needs to continue exactly where it stopped.
//!
//! `<out_dir>/checkpoints/step-00000120/` holds
//! - `model.safetensors`: every trainable var by its name (diffusers keys);
//! - `optimizer.safetensors`: AdamW's `exp_avg.<name>` and `exp_avg_sq.<name>`;
//! - `ema.safetensors`: the EMA weights by name (when EMA is on);
//! - `state.json`: [`TrainState`] — format, steps done, AdamW's step count, EMA update count,
//!   wall time, the full config and the loss log up to this step.
//!
//! Data order and noise need no state: both are pure functions of (seed, step). A checkpoint is
//! written into `.tmp-step-…`, synced, then renamed into place, so a crash leaves either the
//! whole checkpoint or none; the newest complete `step-*` folder is the one `resume` uses.

use crate::config::TrainConfig;
use crate::log::LogRecord;
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use vdit_core::{Error, Result};

/// Version of the checkpoint layout.
pub const FORMAT: u32 = 1;

/// `state.json`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct TrainState {
    pub format: u32,
    /// Optimiser steps done; the next step to run.
    pub step: u64,
    /// AdamW's step count (bias correction).
    pub adam_step: u64,
    /// EMA updates so far (None when EMA is off).
    pub ema_updates: Option<u64>,
    /// Wall seconds spent training up to this step, over all sessions.
    pub elapsed: f64,
    pub config: TrainConfig,
    pub log: Vec<LogRecord>,
}

/// A loaded checkpoint.
pub struct Checkpoint {
    pub dir: PathBuf,
    pub state: TrainState,
    pub model: HashMap<String, Tensor>,
    pub optimizer: HashMap<String, Tensor>,
    pub ema: Option<HashMap<String, Tensor>>,
}

/// `<out_dir>/checkpoints`.
pub fn checkpoints_dir(out_dir: &Path) -> PathBuf {
    out_dir.join("checkpoints")
}

fn step_name(step: u64) -> String {
    format!("step-{step:08}")
}

/// Complete checkpoints under `out_dir`, oldest first.
pub fn list(out_dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let dir = checkpoints_dir(out_dir);
    if !dir.is_dir() {
        return Ok(Vec::new());
    }
    let mut out = Vec::new();
    for entry in std::fs::read_dir(&dir).map_err(|e| Error::io(&dir, e))? {
        let entry = entry.map_err(|e| Error::io(&dir, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(n) = name
            .strip_prefix("step-")
            .and_then(|s| s.parse::<u64>().ok())
        {
            if entry.path().join("state.json").is_file() {
                out.push((n, entry.path()));
            }
        }
    }
    out.sort();
    Ok(out)
}

/// The newest complete checkpoint, if any.
pub fn latest(out_dir: &Path) -> Result<Option<(u64, PathBuf)>> {
    Ok(list(out_dir)?.pop())
}

/// Writes `bytes` to `path` through a temporary file in the same folder and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| Error::invalid("path", format!("{} has no file name", path.display())))?;
    let tmp = path.with_file_name(format!(".{name}.tmp"));
    {
        let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        f.write_all(bytes).map_err(|e| Error::io(&tmp, e))?;
        f.sync_all().map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

fn save_tensors(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<()> {
    candle_core::safetensors::save(tensors, path)
        .map_err(|e| Error::Weights(format!("{}: cannot write: {e}", path.display())))?;
    std::fs::File::open(path)
        .and_then(|f| f.sync_all())
        .map_err(|e| Error::io(path, e))
}

fn load_tensors(path: &Path, dev: &Device) -> Result<HashMap<String, Tensor>> {
    candle_core::safetensors::load(path, dev)
        .map_err(|e| Error::Weights(format!("{}: cannot read: {e}", path.display())))
}

/// The weights `init_from` names, by var name, for fine-tuning. `dir` is one of
/// - a checkpoint folder (`<out_dir>/checkpoints/step-N`): its `model.safetensors`;
/// - a diffusers pipeline folder (`model_index.json`, e.g. an exported run or the shipped
///   model): the components `wanted` by name (e.g. `transformer`, `text_encoder`), each tensor
///   named `<component>.<key>` as the joint stages name their vars;
/// - one diffusers component folder (`config.json` and its `*.safetensors`, sharded or not,
///   e.g. `<model>/vae`): its keys as they are.
pub fn load_model_weights(
    dir: &Path,
    dev: &Device,
    wanted: &dyn Fn(&str) -> bool,
) -> Result<HashMap<String, Tensor>> {
    let p = dir.join("model.safetensors");
    if p.is_file() && !dir.join("config.json").is_file() {
        return load_tensors(&p, dev);
    }
    if dir.join("model_index.json").is_file() {
        let folder = vdit_core::folder::PipelineFolder::open(dir)?;
        let present: Vec<&String> = folder
            .components
            .iter()
            .filter(|(_, c)| c.is_some())
            .map(|(n, _)| n)
            .collect();
        let mut out = HashMap::new();
        for name in present.iter().filter(|n| wanted(n)) {
            let files = vdit_core::weights::find_safetensors(&folder.component(name)?)?;
            for (key, t) in load_files(&files, dev)? {
                out.insert(format!("{name}.{key}"), t);
            }
        }
        if out.is_empty() {
            return Err(Error::invalid(
                "init_from",
                format!(
                    "{} is a diffusers pipeline folder, but none of its components ({}) is one                      this stage trains; for a single-component stage name the component's                      folder (e.g. {})",
                    dir.display(),
                    present
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", "),
                    dir.join("vae").display()
                ),
            ));
        }
        return Ok(out);
    }
    // A component folder: its config and its weights (a run's out_dir has a config.json too).
    if dir.join("config.json").is_file() {
        if let Ok(files) = vdit_core::weights::find_safetensors(dir) {
            return load_files(&files, dev);
        }
    }
    Err(Error::invalid(
        "init_from",
        format!(
            "{} is neither a checkpoint folder (model.safetensors), a diffusers pipeline folder              (model_index.json) nor a component folder (config.json); expected e.g.              <out_dir>/checkpoints/step-N or <out_dir>/export",
            dir.display()
        ),
    ))
}

/// Every tensor of a component folder's safetensors files (its shards), by its key.
fn load_files(files: &[PathBuf], dev: &Device) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::new();
    for file in files {
        out.extend(load_tensors(file, dev)?);
    }
    Ok(out)
}

/// Writes a checkpoint for `state.step` and keeps only the newest `keep`. Returns its folder.
pub fn save(
    out_dir: &Path,
    state: &TrainState,
    model: &HashMap<String, Tensor>,
    optimizer: &HashMap<String, Tensor>,
    ema: Option<&HashMap<String, Tensor>>,
    keep: usize,
) -> Result<PathBuf> {
    let root = checkpoints_dir(out_dir);
    std::fs::create_dir_all(&root).map_err(|e| Error::io(&root, e))?;
    let name = step_name(state.step);
    let tmp = root.join(format!(".tmp-{name}"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
    save_tensors(&tmp.join("model.safetensors"), model)?;
    save_tensors(&tmp.join("optimizer.safetensors"), optimizer)?;
    if let Some(ema) = ema {
        save_tensors(&tmp.join("ema.safetensors"), ema)?;
    }
    let json = serde_json::to_vec_pretty(state).map_err(|e| Error::Msg(e.to_string()))?;
    write_atomic(&tmp.join("state.json"), &json)?;
    let dst = root.join(&name);
    if dst.exists() {
        // A checkpoint of the same step from an earlier (interrupted) session: replace it.
        std::fs::remove_dir_all(&dst).map_err(|e| Error::io(&dst, e))?;
    }
    std::fs::rename(&tmp, &dst).map_err(|e| Error::io(&dst, e))?;
    if let Ok(d) = std::fs::File::open(&root) {
        let _ = d.sync_all();
    }
    // Keep the newest `keep`, and drop checkpoints past this step (from a run that went
    // further before being resumed from an earlier one).
    let all = list(out_dir)?;
    let mut kept = 0;
    for (step, dir) in all.iter().rev() {
        let drop = *step > state.step || {
            kept += 1;
            kept > keep
        };
        if drop {
            std::fs::remove_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
    }
    tracing::info!(dir = %dst.display(), step = state.step, "checkpoint saved");
    Ok(dst)
}

/// Reads the checkpoint in `dir`.
pub fn load(dir: &Path, dev: &Device) -> Result<Checkpoint> {
    let sp = dir.join("state.json");
    let text = std::fs::read_to_string(&sp).map_err(|e| Error::io(&sp, e))?;
    let state: TrainState = serde_json::from_str(&text)
        .map_err(|e| Error::config(&sp, "<json>", format!("not a checkpoint state: {e}")))?;
    if state.format != FORMAT {
        return Err(Error::config(
            &sp,
            "format",
            format!(
                "checkpoint format {}, this build reads {FORMAT}",
                state.format
            ),
        ));
    }
    let model = load_tensors(&dir.join("model.safetensors"), dev)?;
    let optimizer = load_tensors(&dir.join("optimizer.safetensors"), dev)?;
    let ep = dir.join("ema.safetensors");
    let ema = if state.ema_updates.is_some() {
        Some(load_tensors(&ep, dev)?)
    } else {
        None
    };
    Ok(Checkpoint {
        dir: dir.to_path_buf(),
        state,
        model,
        optimizer,
        ema,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(step: u64) -> TrainState {
        TrainState {
            format: FORMAT,
            step,
            adam_step: step,
            ema_updates: Some(step),
            elapsed: 1.5,
            config: TrainConfig::default(),
            log: Vec::new(),
        }
    }

    #[test]
    fn save_load_round_trip_and_pruning() {
        let out = std::env::temp_dir().join(format!("vdit-train-ckpt-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&out);
        let dev = Device::Cpu;
        let mut m = HashMap::new();
        m.insert(
            "w".to_string(),
            Tensor::new(&[[0.1f32, f32::MIN_POSITIVE], [1e30, -0.0]], &dev).unwrap(),
        );
        let mut o = HashMap::new();
        o.insert("exp_avg.w".to_string(), Tensor::new(&[1f32], &dev).unwrap());
        for step in [5, 10, 15] {
            save(&out, &state(step), &m, &o, Some(&m), 2).unwrap();
        }
        let steps: Vec<u64> = list(&out).unwrap().iter().map(|x| x.0).collect();
        assert_eq!(steps, vec![10, 15]);
        let (s, dir) = latest(&out).unwrap().unwrap();
        assert_eq!(s, 15);
        let c = load(&dir, &dev).unwrap();
        assert_eq!(c.state.step, 15);
        let a = m["w"].flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = c.model["w"]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(
            a.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
            b.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
        );
        assert!(c.ema.is_some());
        // Resumed from 10 and checkpointing at 12: the stale 15 goes.
        save(&out, &state(12), &m, &o, None, 2).unwrap();
        let steps: Vec<u64> = list(&out).unwrap().iter().map(|x| x.0).collect();
        assert_eq!(steps, vec![10, 12]);
        // A half-written checkpoint (no state.json) is not listed.
        std::fs::create_dir_all(checkpoints_dir(&out).join("step-00000099")).unwrap();
        assert_eq!(latest(&out).unwrap().unwrap().0, 12);
        std::fs::remove_dir_all(&out).unwrap();
    }
}
