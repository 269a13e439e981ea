//! Memory-mapped safetensors behind a `VarBuilder` that checks every request.
//!
//! A component folder holds its weights as one `*.safetensors` file or as shards listed in a
//! `*.safetensors.index.json`. Tensors may be stored in f32, f16 or bf16 and are converted to the
//! compute dtype on load. Every error names the file and the key:
//! - a tensor the model needs but the checkpoint lacks,
//! - a tensor whose shape differs (expected against found),
//! - after construction, [`Weights::check_all_used`] lists tensors the model never asked for.

use crate::{Error, Result};
use candle_core::safetensors::{Load, MmapedSafetensors};
use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The weights of one component, memory-mapped.
pub struct Weights {
    files: Vec<(PathBuf, MmapedSafetensors)>,
    /// key -> index into `files`
    index: HashMap<String, usize>,
    used: Mutex<BTreeSet<String>>,
}

impl std::fmt::Debug for Weights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Weights")
            .field(
                "files",
                &self.files.iter().map(|f| &f.0).collect::<Vec<_>>(),
            )
            .field("tensors", &self.index.len())
            .finish()
    }
}

/// Finds the safetensors files of a component folder: a `*.safetensors.index.json` (sharded)
/// wins; otherwise the single `*.safetensors` file.
pub fn find_safetensors(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|e| Error::io(dir, e))?;
    let mut singles = Vec::new();
    let mut indexes = Vec::new();
    for e in entries {
        let p = e.map_err(|e| Error::io(dir, e))?.path();
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.ends_with(".safetensors.index.json") {
            indexes.push(p);
        } else if name.ends_with(".safetensors") {
            singles.push(p);
        }
    }
    indexes.sort();
    singles.sort();
    if let Some(idx) = indexes.first() {
        if indexes.len() > 1 {
            return Err(Error::Weights(format!(
                "{}: more than one *.safetensors.index.json: {:?}",
                dir.display(),
                indexes
            )));
        }
        return shards_from_index(idx);
    }
    match singles.len() {
        0 => Err(Error::Weights(format!(
            "{}: no *.safetensors file and no *.safetensors.index.json",
            dir.display()
        ))),
        1 => Ok(singles),
        _ => Err(Error::Weights(format!(
            "{}: several *.safetensors files but no *.safetensors.index.json to say how they fit: {:?}",
            dir.display(),
            singles
        ))),
    }
}

fn shards_from_index(idx: &Path) -> Result<Vec<PathBuf>> {
    let text = std::fs::read_to_string(idx).map_err(|e| Error::io(idx, e))?;
    let v: serde_json::Value = serde_json::from_str(&text)
        .map_err(|e| Error::config(idx, "<json>", format!("not valid JSON: {e}")))?;
    let map = v
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| Error::config(idx, "weight_map", "missing or not an object"))?;
    let dir = idx.parent().unwrap_or(Path::new("."));
    let mut files = BTreeSet::new();
    for (k, f) in map {
        let f = f
            .as_str()
            .ok_or_else(|| Error::config(idx, format!("weight_map.{k}"), "expected a file name"))?;
        if f.contains('/') || f.contains('\\') || f.contains("..") {
            return Err(Error::config(
                idx,
                format!("weight_map.{k}"),
                format!("`{f}` is not a plain file name"),
            ));
        }
        files.insert(dir.join(f));
    }
    for f in &files {
        if !f.is_file() {
            return Err(Error::Weights(format!(
                "{}: shard {} is listed but missing",
                idx.display(),
                f.display()
            )));
        }
    }
    Ok(files.into_iter().collect())
}

impl Weights {
    /// Memory-maps the given safetensors files.
    pub fn open(paths: &[PathBuf]) -> Result<Self> {
        let mut files = Vec::with_capacity(paths.len());
        let mut index = HashMap::new();
        for (i, p) in paths.iter().enumerate() {
            // SAFETY: the file is mapped read-only; vdit never writes to a checkpoint while
            // it is open, and the map is checked by the safetensors header parser.
            #[allow(unsafe_code)]
            let st = unsafe { MmapedSafetensors::new(p) }.map_err(|e| {
                Error::Weights(format!("{}: cannot read as safetensors: {e}", p.display()))
            })?;
            for (k, _) in st.tensors() {
                if let Some(prev) = index.insert(k.clone(), i) {
                    return Err(Error::Weights(format!(
                        "tensor `{k}` appears in both {} and {}",
                        paths[prev].display(),
                        p.display()
                    )));
                }
            }
            files.push((p.clone(), st));
        }
        Ok(Self {
            files,
            index,
            used: Mutex::new(BTreeSet::new()),
        })
    }

    /// Memory-maps the weights of a component folder (see [`find_safetensors`]).
    pub fn from_dir(dir: &Path) -> Result<Self> {
        Self::open(&find_safetensors(dir)?)
    }

    /// Describes where the weights come from, for messages.
    pub fn describe(&self) -> String {
        match self.files.as_slice() {
            [(p, _)] => p.display().to_string(),
            fs => format!(
                "{} ({} shards)",
                fs.first()
                    .and_then(|f| f.0.parent())
                    .unwrap_or(Path::new("."))
                    .display(),
                fs.len()
            ),
        }
    }

    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.index.keys()
    }

    pub fn contains(&self, key: &str) -> bool {
        self.index.contains_key(key)
    }

    /// Loads one tensor, checking its shape, converting to `dtype`.
    pub fn load(
        &self,
        key: &str,
        shape: Option<&Shape>,
        dtype: DType,
        dev: &Device,
    ) -> Result<Tensor> {
        let Some(&fi) = self.index.get(key) else {
            let exp = shape
                .map(|s| format!(" (expected shape {:?})", s.dims()))
                .unwrap_or_default();
            return Err(Error::Weights(format!(
                "{}: missing tensor `{key}`{exp}",
                self.describe()
            )));
        };
        let (path, st) = &self.files[fi];
        let view = st
            .get(key)
            .map_err(|e| Error::Weights(format!("{}: `{key}`: {e}", path.display())))?;
        if let Some(s) = shape {
            if view.shape() != s.dims() {
                return Err(Error::Weights(format!(
                    "{}: tensor `{key}` has shape {:?}, expected {:?}",
                    path.display(),
                    view.shape(),
                    s.dims()
                )));
            }
        }
        let t = view
            .load(dev)
            .and_then(|t| t.to_dtype(dtype))
            .map_err(|e| Error::Weights(format!("{}: `{key}`: {e}", path.display())))?;
        self.used
            .lock()
            .expect("weights lock")
            .insert(key.to_string());
        Ok(t)
    }

    /// Tensors present in the checkpoint that no layer asked for, except those matching `ignore`.
    pub fn unused(&self, ignore: &[&str]) -> Vec<String> {
        let used = self.used.lock().expect("weights lock");
        let mut v: Vec<String> = self
            .index
            .keys()
            .filter(|k| !used.contains(*k) && !ignore.iter().any(|p| k.contains(p)))
            .cloned()
            .collect();
        v.sort();
        v
    }

    /// Errors when the checkpoint has tensors the model did not use (a sign of a wrong config
    /// or a different architecture). `ignore` lists key substrings that are allowed to be unused.
    pub fn check_all_used(&self, ignore: &[&str]) -> Result<()> {
        let extra = self.unused(ignore);
        if extra.is_empty() {
            return Ok(());
        }
        let shown: Vec<_> = extra.iter().take(8).map(|s| format!("`{s}`")).collect();
        let more = if extra.len() > 8 {
            format!(" and {} more", extra.len() - 8)
        } else {
            String::new()
        };
        Err(Error::Weights(format!(
            "{}: {} tensor(s) not used by the model (does the config match the weights?): {}{more}",
            self.describe(),
            extra.len(),
            shown.join(", ")
        )))
    }

    /// A `VarBuilder` over these weights; `self` stays usable for [`Self::check_all_used`].
    pub fn var_builder(self: &Arc<Self>, dtype: DType, dev: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(Backend(self.clone())), dtype, dev.clone())
    }
}

struct Backend(Arc<Weights>);

impl SimpleBackend for Backend {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        self.0
            .load(name, Some(&s), dtype, dev)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.0
            .load(name, None, dtype, dev)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.contains(name)
    }
}

/// Maps an error from model construction to a clean weights error (candle wraps our message).
pub fn build_error(e: candle_core::Error) -> Error {
    Error::Weights(crate::error::candle_msg(&e))
}
