//! Helpers shared by the `vdit generate` end-to-end tests: running the binary, a scratch folder
//! per test, and the arguments that feed a parity fixture's inputs to `vdit generate`.

// Each test file uses its own subset of these.
#![allow(dead_code)]

use candle_core::Tensor;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use vdit_core::testing::{fixture_dir, load_tensors};

/// The fixture inputs holding the prompt embeddings, with the flags that pass them.
pub const EMBEDS: [(&str, &str); 2] = [
    ("--prompt-embeds", "prompt_embeds"),
    ("--negative-prompt-embeds", "negative_prompt_embeds"),
];

/// The `vdit` binary under test.
pub fn vdit() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vdit"))
}

/// An empty scratch folder, unique to this test binary, `name` and process.
pub fn tmpdir(name: &str) -> PathBuf {
    let test = env!("CARGO_CRATE_NAME");
    let d = std::env::temp_dir().join(format!("vdit-cli-{test}-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// Runs `cmd`, asserts it succeeded and returns its stderr.
pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "vdit failed: {err}");
    err
}

/// Runs `cmd`, asserts it failed without a panic and returns its stderr.
pub fn run_err(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(
        !out.status.success(),
        "expected failure, got success: {err}"
    );
    assert!(!err.contains("panicked"), "must not panic: {err}");
    err
}

/// A parity fixture case: its folder (with the diffusers pipeline in `pipeline/`) and inputs.
pub struct Fixture {
    pub case: PathBuf,
    pub inputs: HashMap<String, Tensor>,
}

impl Fixture {
    pub fn load(name: &str) -> Self {
        let case = fixture_dir(name);
        let inputs = load_tensors(&case.join("inputs.safetensors")).unwrap();
        Self { case, inputs }
    }

    /// `generate --model <case>/pipeline`, then for each `(flag, key)` of `tensors` the input
    /// `key` written to `dir/<key>.safetensors` and passed as `flag`, then `rest`.
    pub fn generate_args(
        &self,
        dir: &Path,
        tensors: &[(&str, &str)],
        rest: &[&str],
    ) -> Vec<String> {
        let mut args = vec![
            "generate".to_string(),
            "--model".into(),
            self.case.join("pipeline").display().to_string(),
        ];
        for &(flag, key) in tensors {
            let p = dir.join(format!("{key}.safetensors"));
            self.inputs[key].save_safetensors(key, &p).unwrap();
            args.push(flag.into());
            args.push(p.display().to_string());
        }
        args.extend(rest.iter().map(|a| a.to_string()));
        args
    }
}
