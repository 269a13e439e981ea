//! A diffusers pipeline folder: `model_index.json` naming each component, one sub-folder per
//! component (`transformer/`, `vae/`, `text_encoder/`, `tokenizer/`, `scheduler/`).

use crate::{Error, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// `model_index.json`: the pipeline class and, per component, `[library, class]`
/// (`[null, null]` for a component that is absent).
#[derive(Debug, Clone)]
pub struct PipelineFolder {
    pub root: PathBuf,
    pub class_name: String,
    pub components: BTreeMap<String, Option<(String, String)>>,
}

impl PipelineFolder {
    pub fn open(root: &Path) -> Result<Self> {
        if !root.is_dir() {
            return Err(Error::invalid(
                "model",
                format!(
                    "{} is not a directory (expected a diffusers pipeline folder)",
                    root.display()
                ),
            ));
        }
        let file = root.join("model_index.json");
        let text = std::fs::read_to_string(&file).map_err(|e| Error::io(&file, e))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| Error::config(&file, "<json>", format!("not valid JSON: {e}")))?;
        let obj = v
            .as_object()
            .ok_or_else(|| Error::config(&file, "<root>", "expected a JSON object"))?;
        let class_name = obj
            .get("_class_name")
            .and_then(|c| c.as_str())
            .ok_or_else(|| Error::config(&file, "_class_name", "missing or not a string"))?
            .to_string();
        let mut components = BTreeMap::new();
        for (k, val) in obj {
            if k.starts_with('_') {
                continue;
            }
            let Some(arr) = val.as_array() else { continue };
            let entry = match arr.as_slice() {
                [serde_json::Value::String(lib), serde_json::Value::String(cls)] => {
                    Some((lib.clone(), cls.clone()))
                }
                [serde_json::Value::Null, serde_json::Value::Null] => None,
                _ => {
                    return Err(Error::config(
                        &file,
                        k,
                        format!("expected [library, class] or [null, null], found {val}"),
                    ))
                }
            };
            components.insert(k.clone(), entry);
        }
        Ok(Self {
            root: root.to_path_buf(),
            class_name,
            components,
        })
    }

    /// The class named for a component, if the component is present.
    pub fn class_of(&self, name: &str) -> Option<&str> {
        self.components
            .get(name)
            .and_then(|c| c.as_ref())
            .map(|c| c.1.as_str())
    }

    /// The folder of a component that `model_index.json` lists; an error if it is absent.
    pub fn component(&self, name: &str) -> Result<PathBuf> {
        let file = self.root.join("model_index.json");
        match self.components.get(name) {
            None => Err(Error::config(&file, name, "component not listed")),
            Some(None) => Err(Error::config(
                &file,
                name,
                "component is [null, null] (absent)",
            )),
            Some(Some(_)) => {
                let dir = self.root.join(name);
                if dir.is_dir() {
                    Ok(dir)
                } else {
                    Err(Error::config(
                        &file,
                        name,
                        format!("listed, but folder {} is missing", dir.display()),
                    ))
                }
            }
        }
    }

    /// The folder of an optional component: `None` when absent or `[null, null]`.
    pub fn optional_component(&self, name: &str) -> Option<PathBuf> {
        match self.components.get(name) {
            Some(Some(_)) => Some(self.root.join(name)).filter(|d| d.is_dir()),
            _ => None,
        }
    }
}
