//! The training loop: batches → loss → backward → clip → AdamW → EMA → log → checkpoint.
//!
//! Step `k` (0-based) uses the batches of (seed, k) and the loss stream (seed, "loss", k), the
//! learning rate `lr_at(k)`, and leaves `k + 1` steps done. A run stopped anywhere and resumed
//! from its latest checkpoint therefore ends bit-identical to an uninterrupted run (same
//! parameters, moments, EMA and loss log): `tests/resume.rs` checks it.
//!
//! Progress goes to a callback (the CLI draws an indicatif bar; a server could stream it), which
//! also decides whether to go on: [`Control::Stop`] saves a checkpoint and returns,
//! [`Control::Abort`] returns at once as if the process had been killed.

use crate::checkpoint::{self, TrainState, FORMAT};
use crate::config::TrainConfig;
use crate::data::{batches_for_step, step_rng};
use crate::log::{append_log, write_log, LogRecord};
use crate::optim::{clip_grad_norm, lr_at, AdamW, Ema, NamedVars};
use crate::plot::plot_loss;
use crate::trainable::Trainable;
use candle_core::{Device, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};
use vdit_core::{Error, Result};

/// What the callback sees after each step.
#[derive(Debug, Clone)]
pub struct Progress<'a> {
    /// Steps done (1 after the first step).
    pub step: u64,
    pub total: u64,
    /// The step this session started from (0, or the resumed checkpoint's step).
    pub start: u64,
    pub record: &'a LogRecord,
    /// Wall time of this session so far.
    pub session: Duration,
    /// Remaining time at this session's mean step time.
    pub eta: Duration,
}

/// The callback's answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Control {
    Continue,
    /// Save a checkpoint now and return (a clean interruption, e.g. Ctrl-C).
    Stop,
    /// Return `Error::Cancelled` at once, writing nothing more (as if killed).
    Abort,
}

/// How a run ended.
#[derive(Debug, Clone)]
pub struct Summary {
    /// Steps done in total.
    pub steps: u64,
    /// The step this session started from.
    pub start: u64,
    /// True when the callback stopped the run before `steps`.
    pub stopped: bool,
    /// The last checkpoint written (None if this session wrote none).
    pub checkpoint: Option<PathBuf>,
    /// The export folder, when the run finished.
    pub export: Option<PathBuf>,
    pub log: Vec<LogRecord>,
    /// Wall seconds of this session.
    pub seconds: f64,
}

/// Files under `out_dir`.
pub fn log_path(cfg: &TrainConfig) -> PathBuf {
    cfg.out_dir.join("loss.jsonl")
}
pub fn plot_path(cfg: &TrainConfig) -> PathBuf {
    cfg.out_dir.join("loss.png")
}
pub fn export_dir(cfg: &TrainConfig) -> PathBuf {
    cfg.out_dir.join("export")
}

fn named_tensors(vars: &NamedVars) -> HashMap<String, Tensor> {
    vars.iter()
        .map(|(n, v)| (n.clone(), v.as_tensor().detach()))
        .collect()
}

/// Sets every var from `tensors` (read from `src`): each must be there with the var's shape, and
/// no tensor may be left over.
pub(crate) fn set_vars(
    vars: &NamedVars,
    tensors: &HashMap<String, Tensor>,
    src: &Path,
) -> Result<()> {
    let names: std::collections::HashSet<&String> = vars.iter().map(|v| &v.0).collect();
    for (name, var) in vars {
        let t = tensors.get(name).ok_or_else(|| {
            Error::Weights(format!("{}: no tensor for var {name:?}", src.display()))
        })?;
        if t.dims() != var.dims() {
            return Err(Error::Weights(format!(
                "{}: {name:?} has shape {:?}, the model's var {:?}",
                src.display(),
                t.dims(),
                var.dims()
            )));
        }
        var.set(&t.to_dtype(var.dtype())?)?;
    }
    if let Some(extra) = tensors.keys().find(|k| !names.contains(k)) {
        return Err(Error::Weights(format!(
            "{}: tensor {extra:?} matches no var of the model",
            src.display()
        )));
    }
    Ok(())
}

/// Trains `model` per `cfg`: from scratch (or from `cfg.init_from`'s weights), or (with
/// `resume`) from the newest checkpoint in `cfg.out_dir`. `dev` is where batches are built (the
/// model's device).
pub fn train(
    cfg: &TrainConfig,
    model: &dyn Trainable,
    dev: &Device,
    resume: bool,
    on_progress: &mut dyn FnMut(&Progress) -> Control,
) -> Result<Summary> {
    let session_start = Instant::now();
    let mut vars: NamedVars = model.vars();
    vars.sort_by(|a, b| a.0.cmp(&b.0));
    if vars.is_empty() {
        return Err(Error::Msg("the model has no trainable vars".into()));
    }
    if let Some(w) = vars.windows(2).find(|w| w[0].0 == w[1].0) {
        return Err(Error::Msg(format!(
            "two trainable vars are named {:?}",
            w[0].0
        )));
    }
    let n_params: usize = vars.iter().map(|(_, v)| v.elem_count()).sum();
    let out = &cfg.out_dir;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let existing = checkpoint::latest(out)?;
    if let (Some(src), None) = (&cfg.init_from, &existing) {
        // Fine-tuning: before the optimiser and the EMA, which start from these values.
        // From a pipeline folder, the components this model has vars of (`transformer.*`).
        let has_component = |c: &str| {
            let prefix = format!("{c}.");
            vars.iter().any(|(n, _)| n.starts_with(&prefix))
        };
        let mut weights = checkpoint::load_model_weights(src, dev, &has_component)?;
        weights.retain(|name, _| !model.frozen(name));
        set_vars(&vars, &weights, src)?;
        tracing::info!(from = %src.display(), "starting from the weights of init_from");
    }
    let mut opt = AdamW::new(&cfg.optim, &vars)?;
    let mut ema = Ema::new(&cfg.ema, &vars)?;

    let (start, mut log, elapsed0) = match (resume, existing) {
        (false, Some((step, dir))) => {
            return Err(Error::invalid(
                "out_dir",
                format!(
                    "{} already holds a checkpoint ({}, step {step}): pass --resume to continue it, or choose another out_dir",
                    out.display(),
                    dir.display()
                ),
            ))
        }
        (true, Some((_, dir))) => {
            let ck = checkpoint::load(&dir, dev)?;
            let diff = ck.state.config.incompatible_keys(cfg);
            if !diff.is_empty() {
                return Err(Error::invalid(
                    "config",
                    format!(
                        "differs from the checkpoint's ({}) at {}; a resumed run must keep them (only {} may change)",
                        dir.display(),
                        diff.join(", "),
                        crate::config::RESUMABLE_KEYS.join(", ")
                    ),
                ));
            }
            if ck.state.config.steps != cfg.steps && cfg.optim.decay_steps == 0 {
                tracing::warn!(
                    was = ck.state.config.steps,
                    now = cfg.steps,
                    "steps changed on resume: the cosine schedule is stretched from here on"
                );
            }
            set_vars(&vars, &ck.model, &dir)?;
            opt.load_state(&ck.optimizer, ck.state.adam_step)?;
            match (&mut ema, &ck.ema, ck.state.ema_updates) {
                (Some(e), Some(t), Some(n)) => e.load_state(t, n)?,
                (None, None, None) => {}
                _ => {
                    return Err(Error::Weights(format!(
                        "{}: EMA state does not match ema.decay",
                        dir.display()
                    )))
                }
            }
            tracing::info!(dir = %dir.display(), step = ck.state.step, "resuming");
            (ck.state.step, ck.state.log, ck.state.elapsed)
        }
        (true, None) => {
            tracing::warn!(out_dir = %out.display(), "--resume: no checkpoint found, starting from scratch");
            (0, Vec::new(), 0.0)
        }
        (false, None) => (0, Vec::new(), 0.0),
    };
    log.truncate(start as usize);
    write_log(&log_path(cfg), &log)?;
    let cfg_json = serde_json::to_vec_pretty(cfg).map_err(|e| Error::Msg(e.to_string()))?;
    checkpoint::write_atomic(&out.join("config.json"), &cfg_json)?;
    tracing::info!(
        stage = cfg.stage.name(),
        vars = vars.len(),
        params = n_params,
        start,
        steps = cfg.steps,
        "training"
    );

    let world_seed = cfg.world_seed();
    let mut last_ckpt = None;
    let mut stopped = false;
    let mut step = start;
    let loop_start = Instant::now();
    while step < cfg.steps {
        let t0 = Instant::now();
        let batches = batches_for_step(
            &cfg.data,
            cfg.seed,
            world_seed,
            cfg.batch_size,
            cfg.grad_accum,
            step,
            dev,
        )?;
        let mut rng = step_rng(cfg.seed, "loss", step);
        let n_micro = batches.len() as f64;
        let mut grads: BTreeMap<String, Tensor> = BTreeMap::new();
        let mut loss_sum = 0f64;
        let mut metrics: BTreeMap<String, f64> = BTreeMap::new();
        let mut labels = Vec::new();
        for b in &batches {
            let out = model.loss(b, &mut rng)?;
            if out.loss.elem_count() != 1 {
                return Err(Error::Msg(format!(
                    "the model's loss has shape {:?}, expected a scalar",
                    out.loss.dims()
                )));
            }
            let lv = out
                .loss
                .to_dtype(candle_core::DType::F64)?
                .flatten_all()?
                .to_vec1::<f64>()?[0];
            if !lv.is_finite() {
                return Err(Error::Msg(format!(
                    "the loss is {lv} at step {} (bucket {}x{}x{}): lower optim.lr or check the data",
                    step + 1,
                    b.width,
                    b.height,
                    b.frames
                )));
            }
            loss_sum += lv;
            for (k, v) in out.metrics {
                *metrics.entry(k).or_default() += v / n_micro;
            }
            labels.push(format!("{}x{}x{}", b.width, b.height, b.frames));
            let scaled = if n_micro > 1.0 {
                out.loss.affine(1.0 / n_micro, 0.0)?
            } else {
                out.loss
            };
            let gs = scaled.backward()?;
            let mut missing = Vec::new();
            for (name, var) in &vars {
                match gs.get(var.as_tensor()) {
                    Some(g) => {
                        let g = g.detach();
                        let acc = match grads.remove(name) {
                            Some(a) => (a + g)?,
                            None => g,
                        };
                        grads.insert(name.clone(), acc);
                    }
                    None => missing.push(name.as_str()),
                }
            }
            if !missing.is_empty() && !cfg.allow_unused_vars {
                return Err(Error::Msg(format!(
                    "{} of {} trainable vars received no gradient at step {}: {} — a fast op that \
                     drops gradients (STACK.md) or an unused var; set allow_unused_vars = true to \
                     accept it",
                    missing.len(),
                    vars.len(),
                    step + 1,
                    missing.join(", ")
                )));
            }
        }
        let grad_norm = clip_grad_norm(&mut grads, cfg.optim.grad_clip)?;
        if !grad_norm.is_finite() {
            return Err(Error::Msg(format!(
                "the gradient norm is {grad_norm} at step {}: lower optim.lr",
                step + 1
            )));
        }
        let lr = lr_at(&cfg.optim, cfg.steps, step);
        opt.step(&vars, &grads, lr)?;
        if let Some(e) = ema.as_mut() {
            e.update(&vars)?;
        }
        step += 1;
        let session = session_start.elapsed();
        let record = LogRecord {
            step,
            loss: loss_sum / n_micro,
            lr,
            grad_norm,
            seconds: t0.elapsed().as_secs_f64(),
            elapsed: elapsed0 + session.as_secs_f64(),
            bucket: labels.join(","),
            metrics,
        };
        append_log(&log_path(cfg), &record)?;
        log.push(record);
        let done_here = step - start;
        let per_step = loop_start.elapsed().as_secs_f64() / done_here as f64;
        let eta = Duration::from_secs_f64(per_step * (cfg.steps - step) as f64);
        let control = on_progress(&Progress {
            step,
            total: cfg.steps,
            start,
            record: log.last().expect("just pushed"),
            session,
            eta,
        });
        if control == Control::Abort {
            return Err(Error::Cancelled);
        }
        if step % cfg.plot_every == 0 {
            plot_loss(&plot_path(cfg), &log)?;
        }
        let stop = control == Control::Stop && step < cfg.steps;
        if step % cfg.checkpoint_every == 0 || step == cfg.steps || stop {
            let state = TrainState {
                format: FORMAT,
                step,
                adam_step: opt.steps(),
                ema_updates: ema.as_ref().map(|e| e.updates()),
                elapsed: elapsed0 + session_start.elapsed().as_secs_f64(),
                config: cfg.clone(),
                log: log.clone(),
            };
            let (optim_tensors, _) = opt.state_tensors();
            let ema_tensors: Option<HashMap<String, Tensor>> = ema.as_ref().map(|e| {
                e.weights()
                    .iter()
                    .map(|(k, v)| (k.clone(), v.clone()))
                    .collect()
            });
            last_ckpt = Some(checkpoint::save(
                out,
                &state,
                &named_tensors(&vars),
                &optim_tensors,
                ema_tensors.as_ref(),
                cfg.keep_checkpoints,
            )?);
        }
        if stop {
            stopped = true;
            break;
        }
    }
    plot_loss(&plot_path(cfg), &log)?;
    let export = if step >= cfg.steps {
        let dir = export_dir(cfg);
        let weights: Vec<(String, Tensor)> = match &ema {
            Some(e) => e
                .weights()
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
            None => vars
                .iter()
                .map(|(k, v)| (k.clone(), v.as_tensor().detach()))
                .collect(),
        };
        model.export(&dir, &weights)?;
        Some(dir)
    } else {
        None
    };
    Ok(Summary {
        steps: step,
        start,
        stopped,
        checkpoint: last_ckpt,
        export,
        log,
        seconds: session_start.elapsed().as_secs_f64(),
    })
}
