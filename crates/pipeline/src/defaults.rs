//! A model folder's own generation defaults: `generation_config.json` at the folder's root.
//!
//! diffusers' CogVideoX defaults (50 steps, guidance 6, 8 fps) suit CogVideoX-2b/5b; a small
//! model trained by vdit ships the settings it was tuned at, so `vdit generate --prompt ...`
//! with no other flag uses them. diffusers ignores the file. Every field is optional:
//!
//! ```json
//! { "num_inference_steps": 25, "guidance_scale": 5.0, "fps": 8.0, "use_dynamic_cfg": false,
//!   "guidance_max_timestep": 800, "guidance_rescale": 0.7 }
//! ```
//!
//! Sizes are not here: the transformer's `sample_frames`/`sample_height`/`sample_width` give them.

use serde::{Deserialize, Serialize};
use std::path::Path;
use vdit_core::config::{ensure, load_config};
use vdit_core::Result;

/// File name of the defaults inside a pipeline folder.
pub const GENERATION_CONFIG: &str = "generation_config.json";

/// Generation settings a model folder recommends.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GenerationDefaults {
    pub num_inference_steps: usize,
    pub guidance_scale: f64,
    pub use_dynamic_cfg: bool,
    /// Guidance only at timesteps ≤ this (`GenerateRequest::guidance_max_timestep`); absent:
    /// every step.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub guidance_max_timestep: Option<usize>,
    /// φ of `GenerateRequest::guidance_rescale`; absent: 0 (off).
    #[serde(skip_serializing_if = "is_zero")]
    pub guidance_rescale: f64,
    /// Frames per second of written videos.
    pub fps: f32,
}

impl Default for GenerationDefaults {
    /// diffusers' `CogVideoXPipeline.__call__` defaults and CogVideoX's 8 fps.
    fn default() -> Self {
        Self {
            num_inference_steps: 50,
            guidance_scale: 6.0,
            use_dynamic_cfg: false,
            guidance_max_timestep: None,
            guidance_rescale: 0.0,
            fps: 8.0,
        }
    }
}

impl GenerationDefaults {
    /// Reads `<root>/generation_config.json`, or diffusers' defaults when the folder has none.
    pub fn load(root: &Path) -> Result<Self> {
        let path = root.join(GENERATION_CONFIG);
        if !path.is_file() {
            return Ok(Self::default());
        }
        let d: Self = load_config(&path)?;
        ensure(
            d.num_inference_steps >= 1,
            &path,
            "num_inference_steps",
            || format!("must be at least 1, got {}", d.num_inference_steps),
        )?;
        ensure(
            d.guidance_scale.is_finite() && d.guidance_scale >= 0.0,
            &path,
            "guidance_scale",
            || format!("must be a finite number >= 0, got {}", d.guidance_scale),
        )?;
        ensure(
            (0.0..=1.0).contains(&d.guidance_rescale),
            &path,
            "guidance_rescale",
            || format!("must be in [0, 1], got {}", d.guidance_rescale),
        )?;
        ensure(d.fps.is_finite() && d.fps > 0.0, &path, "fps", || {
            format!("must be a positive number, got {}", d.fps)
        })?;
        Ok(d)
    }

    /// Writes the defaults into a pipeline folder.
    pub fn save(&self, root: &Path) -> Result<()> {
        let path = root.join(GENERATION_CONFIG);
        let text = serde_json::to_string_pretty(self).expect("plain struct serialises") + "\n";
        std::fs::write(&path, text).map_err(|e| vdit_core::Error::io(&path, e))
    }
}

/// `skip_serializing_if` for settings whose 0 means off (here and in the server's stored jobs).
pub fn is_zero(x: &f64) -> bool {
    *x == 0.0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> std::path::PathBuf {
        let d = std::env::temp_dir().join(format!("vdit-gendef-{name}-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn missing_file_gives_diffusers_defaults_and_round_trips() {
        let d = tmp("rt");
        assert_eq!(
            GenerationDefaults::load(&d).unwrap(),
            GenerationDefaults::default()
        );
        let g = GenerationDefaults {
            num_inference_steps: 20,
            guidance_scale: 4.5,
            use_dynamic_cfg: true,
            guidance_max_timestep: Some(800),
            guidance_rescale: 0.7,
            fps: 12.0,
        };
        g.save(&d).unwrap();
        assert_eq!(GenerationDefaults::load(&d).unwrap(), g);
        // Partial files keep the other defaults.
        std::fs::write(d.join(GENERATION_CONFIG), r#"{"guidance_scale": 3.0}"#).unwrap();
        let p = GenerationDefaults::load(&d).unwrap();
        assert_eq!(p.guidance_scale, 3.0);
        assert_eq!(p.num_inference_steps, 50);
        assert_eq!(p.guidance_max_timestep, None);
        assert_eq!(p.guidance_rescale, 0.0);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn bad_values_name_the_key() {
        let d = tmp("bad");
        std::fs::write(d.join(GENERATION_CONFIG), r#"{"num_inference_steps": 0}"#).unwrap();
        let e = GenerationDefaults::load(&d).unwrap_err().to_string();
        assert!(
            e.contains("num_inference_steps") && e.contains("at least 1"),
            "{e}"
        );
        std::fs::write(d.join(GENERATION_CONFIG), r#"{"fps": "fast"}"#).unwrap();
        let e = GenerationDefaults::load(&d).unwrap_err().to_string();
        assert!(e.contains("fps") && e.contains(GENERATION_CONFIG), "{e}");
        std::fs::write(d.join(GENERATION_CONFIG), r#"{"guidance_rescale": 1.5}"#).unwrap();
        let e = GenerationDefaults::load(&d).unwrap_err().to_string();
        assert!(
            e.contains("guidance_rescale") && e.contains("[0, 1]"),
            "{e}"
        );
        std::fs::remove_dir_all(&d).unwrap();
    }
}
