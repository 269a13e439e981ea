//! A run stopped at step k and resumed ends bit-identical to an uninterrupted run: same
//! parameters, optimiser moments, EMA weights and loss curve. Also: training lowers the toy's
//! loss, and the guards around resuming.

use std::path::{Path, PathBuf};
use vdit_train::checkpoint;
use vdit_train::config::{Stage, TrainConfig};
use vdit_train::data::Bucket;
use vdit_train::log::read_log;
use vdit_train::stages::run;
use vdit_train::Control;

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vdit-train-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn bucket(
    width: usize,
    height: usize,
    frames: usize,
    weight: f64,
    batch_size: Option<usize>,
) -> Bucket {
    Bucket {
        width,
        height,
        frames,
        weight,
        batch_size,
        from_step: None,
    }
}

fn config(out: &Path, steps: u64) -> TrainConfig {
    let mut cfg = TrainConfig {
        stage: Stage::Toy,
        out_dir: out.to_path_buf(),
        seed: 11,
        steps,
        batch_size: 2,
        grad_accum: 2,
        checkpoint_every: 5,
        keep_checkpoints: 2,
        plot_every: 4,
        model: serde_json::json!({"channels": 8, "groups": 2, "pool": 4}),
        ..Default::default()
    };
    cfg.data.buckets = vec![
        bucket(64, 64, 1, 1.0, Some(4)),
        bucket(64, 64, 9, 1.0, None),
        bucket(112, 64, 17, 1.0, Some(1)),
        bucket(64, 96, 5, 1.0, None),
    ];
    cfg.optim.warmup_steps = 3;
    cfg.optim.lr = 3e-3;
    cfg.optim.grad_clip = 0.5;
    cfg.ema.decay = 0.9;
    cfg
}

fn bytes(dir: &Path, file: &str) -> Vec<u8> {
    std::fs::read(dir.join(file)).unwrap_or_else(|e| panic!("{}: {e}", dir.join(file).display()))
}

fn final_checkpoint(out: &Path) -> PathBuf {
    checkpoint::latest(out).unwrap().unwrap().1
}

fn assert_same_run(a: &Path, b: &Path) {
    let (ca, cb) = (final_checkpoint(a), final_checkpoint(b));
    for f in [
        "model.safetensors",
        "optimizer.safetensors",
        "ema.safetensors",
    ] {
        assert!(bytes(&ca, f) == bytes(&cb, f), "{f} differs");
    }
    assert!(
        bytes(&a.join("export"), "toy.safetensors") == bytes(&b.join("export"), "toy.safetensors")
    );
    let (la, lb) = (
        read_log(&a.join("loss.jsonl")).unwrap(),
        read_log(&b.join("loss.jsonl")).unwrap(),
    );
    assert_eq!(la.len(), lb.len());
    for (x, y) in la.iter().zip(&lb) {
        assert_eq!(x.deterministic(), y.deterministic(), "step {}", x.step);
    }
    let sa = checkpoint::load(&ca, &candle_core::Device::Cpu)
        .unwrap()
        .state;
    let sb = checkpoint::load(&cb, &candle_core::Device::Cpu)
        .unwrap()
        .state;
    assert_eq!(
        (sa.step, sa.adam_step, sa.ema_updates),
        (sb.step, sb.adam_step, sb.ema_updates)
    );
    assert_eq!(sa.log.len(), sb.log.len());
}

#[test]
fn stopped_or_killed_runs_resume_bit_identically() {
    let steps = 12;
    // Uninterrupted.
    let a = tmp("full");
    let sa = run(&config(&a, steps), false, &mut |_| Control::Continue).unwrap();
    assert_eq!(sa.steps, steps);
    assert!(!sa.stopped);
    assert_eq!(sa.log.len(), steps as usize);
    let losses: Vec<f64> = sa.log.iter().map(|r| r.loss).collect();
    assert!(losses.iter().all(|l| l.is_finite() && *l > 0.0));
    // Buckets vary and both micro-batches are logged.
    assert!(sa.log.iter().all(|r| r.bucket.split(',').count() == 2));
    let kinds: std::collections::BTreeSet<&str> =
        sa.log.iter().flat_map(|r| r.bucket.split(',')).collect();
    assert!(kinds.len() >= 3, "{kinds:?}");
    assert!(a.join("loss.png").is_file());

    // Stopped cleanly at step 7 (a checkpoint is written there), then resumed.
    let b = tmp("stopped");
    let sb = run(&config(&b, steps), false, &mut |p| {
        if p.step == 7 {
            Control::Stop
        } else {
            Control::Continue
        }
    })
    .unwrap();
    assert!(sb.stopped);
    assert_eq!(sb.steps, 7);
    assert!(sb.export.is_none());
    assert_eq!(checkpoint::latest(&b).unwrap().unwrap().0, 7);
    let sb2 = run(&config(&b, steps), true, &mut |_| Control::Continue).unwrap();
    assert_eq!((sb2.start, sb2.steps), (7, steps));
    assert_same_run(&a, &b);

    // Killed after step 8: the newest checkpoint is step 5 and loss.jsonl runs ahead of it.
    let c = tmp("killed");
    let e = run(&config(&c, steps), false, &mut |p| {
        if p.step == 8 {
            Control::Abort
        } else {
            Control::Continue
        }
    })
    .unwrap_err();
    assert!(matches!(e, vdit_core::Error::Cancelled), "{e}");
    assert_eq!(checkpoint::latest(&c).unwrap().unwrap().0, 5);
    assert_eq!(read_log(&c.join("loss.jsonl")).unwrap().len(), 8);
    let sc = run(&config(&c, steps), true, &mut |_| Control::Continue).unwrap();
    assert_eq!(sc.start, 5);
    assert_same_run(&a, &c);

    // Guards: a fresh run refuses a folder with checkpoints; a resume refuses a changed config.
    let e = run(&config(&c, steps), false, &mut |_| Control::Continue)
        .unwrap_err()
        .to_string();
    assert!(e.contains("--resume"), "{e}");
    let mut changed = config(&c, steps + 4);
    changed.optim.lr = 1e-2;
    let e = run(&changed, true, &mut |_| Control::Continue)
        .unwrap_err()
        .to_string();
    assert!(e.contains("at optim.lr;"), "{e}");
    // Extending the run is allowed.
    let more = run(&config(&c, steps + 2), true, &mut |_| Control::Continue).unwrap();
    assert_eq!((more.start, more.steps), (steps, steps + 2));

    for d in [a, b, c] {
        std::fs::remove_dir_all(d).unwrap();
    }
}

#[test]
fn the_toy_learns() {
    let out = tmp("learns");
    let mut cfg = config(&out, 80);
    cfg.grad_accum = 1;
    cfg.checkpoint_every = 100;
    cfg.plot_every = 100;
    cfg.optim.lr = 1e-2;
    cfg.optim.warmup_steps = 5;
    cfg.optim.grad_clip = 1.0;
    cfg.data.buckets = vec![
        bucket(64, 64, 1, 1.0, Some(8)),
        bucket(64, 64, 9, 1.0, Some(2)),
    ];
    let mut etas = Vec::new();
    let s = run(&cfg, false, &mut |p| {
        etas.push((p.step, p.eta));
        Control::Continue
    })
    .unwrap();
    let mean = |r: &[vdit_train::LogRecord]| r.iter().map(|x| x.loss).sum::<f64>() / r.len() as f64;
    let (first, last) = (mean(&s.log[..10]), mean(&s.log[70..]));
    eprintln!(
        "toy loss: first 10 steps {first:.4}, last 10 {last:.4}; {:.2} s",
        s.seconds
    );
    assert!(last < 0.6 * first, "first {first} last {last}");
    // ETA counts down to zero.
    assert_eq!(etas.last().unwrap().1, std::time::Duration::ZERO);
    assert!(etas[10].1 > etas[60].1);
    assert!(out.join("export/toy.safetensors").is_file());
    let img = image::open(out.join("loss.png")).unwrap();
    assert_eq!(img.width(), vdit_train::plot::WIDTH);
    std::fs::remove_dir_all(out).unwrap();
}

fn weights(dir: &Path, file: &str) -> std::collections::HashMap<String, candle_core::Tensor> {
    candle_core::safetensors::load(dir.join(file), &candle_core::Device::Cpu).unwrap()
}

fn max_abs_diff(
    a: &std::collections::HashMap<String, candle_core::Tensor>,
    b: &std::collections::HashMap<String, candle_core::Tensor>,
) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .map(|(k, x)| {
            (x - &b[k])
                .unwrap()
                .abs()
                .unwrap()
                .flatten_all()
                .unwrap()
                .max(0)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        })
        .fold(0.0, f32::max)
}

#[test]
fn init_from_starts_a_fresh_run_from_a_checkpoints_weights() {
    // The source run: 5 steps from scratch.
    let a = tmp("init-src");
    run(&config(&a, 5), false, &mut |_| Control::Continue).unwrap();
    let src = final_checkpoint(&a);
    let src_model = weights(&src, "model.safetensors");

    // A fresh run from those weights, with a learning rate too small to move them: after one
    // step its weights and EMA are still the source's, and its step count starts at 0.
    let b = tmp("init-dst");
    let mut cb = config(&b, 1);
    cb.init_from = Some(src.clone());
    cb.optim.lr = 1e-12;
    cb.optim.min_lr = 1e-12;
    let sb = run(&cb, false, &mut |_| Control::Continue).unwrap();
    assert_eq!((sb.start, sb.steps), (0, 1));
    let end = final_checkpoint(&b);
    assert!(max_abs_diff(&weights(&end, "model.safetensors"), &src_model) < 1e-9);
    // The EMA's update (s·d + w·(1−d) with s = w) rounds in f32.
    let ema = max_abs_diff(&weights(&end, "ema.safetensors"), &src_model);
    assert!(ema < 1e-6, "EMA moved {ema} from the init_from weights");
    // From scratch the same config starts elsewhere.
    let c = tmp("init-none");
    let mut cc = cb.clone();
    cc.out_dir = c.clone();
    cc.init_from = None;
    run(&cc, false, &mut |_| Control::Continue).unwrap();
    assert!(
        max_abs_diff(
            &weights(&final_checkpoint(&c), "model.safetensors"),
            &src_model
        ) > 1e-3
    );

    // Not a checkpoint folder: named, with what was expected.
    let d = tmp("init-bad");
    let mut cd = config(&d, 1);
    cd.init_from = Some(a.clone());
    let e = run(&cd, false, &mut |_| Control::Continue)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("init_from") && e.contains("model.safetensors"),
        "{e}"
    );
    // A checkpoint of a different model: the var and both shapes are named.
    cd.model = serde_json::json!({"channels": 16, "groups": 2, "pool": 4});
    cd.init_from = Some(src.clone());
    let e = run(&cd, false, &mut |_| Control::Continue)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("has shape") && e.contains(&src.display().to_string()),
        "{e}"
    );

    for dir in [a, b, c, d] {
        let _ = std::fs::remove_dir_all(dir);
    }
}
