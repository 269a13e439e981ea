//! `vdit train --stop-at N` then `--resume` with a longer `--steps` reproduces a run that was
//! interrupted at step N and resumed with other steps (how the default model's VAE was trained):
//! the loss log is the same line for line as the two-leg run, and differs from a one-leg run
//! of the longer schedule (the cosine is stretched from step N on).

mod common;
use common::{run_ok, tmpdir, vdit};
use std::path::Path;

fn config(dir: &Path, out: &str) -> std::path::PathBuf {
    let p = dir.join(format!("{out}.toml"));
    std::fs::write(
        &p,
        format!(
            r#"stage = "toy"
out_dir = "{}"
seed = 3
steps = 8
batch_size = 2
checkpoint_every = 100
[data]
buckets = [{{ width = 64, height = 64, frames = 1, weight = 1.0 }}]
[optim]
lr = 5e-3
min_lr = 5e-4
warmup_steps = 2
[model]
channels = 8
groups = 4
pool = 4
"#,
            dir.join(out).display()
        ),
    )
    .unwrap();
    p
}

fn losses(dir: &Path, out: &str) -> Vec<(u64, String)> {
    std::fs::read_to_string(dir.join(out).join("loss.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            (
                v["step"].as_u64().unwrap(),
                format!("{} {}", v["loss"], v["lr"]),
            )
        })
        .collect()
}

#[test]
fn stop_at_then_resume_with_more_steps_is_reproducible() {
    let dir = tmpdir("stop-at");
    for out in ["a", "b"] {
        let cfg = config(&dir, out);
        let first = run_ok(
            vdit()
                .args(["train", "--quiet", "--stop-at", "5", "--config"])
                .arg(&cfg),
        );
        assert!(first.contains("checkpoint"), "{first}");
        assert!(dir.join(out).join("checkpoints/step-00000005").is_dir());
        assert!(!dir.join(out).join("export").exists());
        run_ok(
            vdit()
                .args(["train", "--quiet", "--resume", "--steps", "12", "--config"])
                .arg(&cfg),
        );
    }
    let (a, b) = (losses(&dir, "a"), losses(&dir, "b"));
    assert_eq!(a.len(), 12);
    assert_eq!(a, b, "two identical two-leg runs differ");
    // One leg of 12 steps: same first steps' data, other learning rates after warmup.
    let cfg = config(&dir, "c");
    run_ok(
        vdit()
            .args(["train", "--quiet", "--steps", "12", "--config"])
            .arg(&cfg),
    );
    let c = losses(&dir, "c");
    assert_ne!(a[5..], c[5..], "--stop-at had no effect on the schedule");
}
