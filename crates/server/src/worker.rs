//! Workers: each a dedicated OS thread that owns one loaded [`CogVideoXPipeline`] and runs one
//! job at a time, oldest queued first. Generation is CPU-bound and blocking, so it never runs
//! on the async runtime.
//!
//! A job's life here: claim it in the store (`in_progress`), generate with an observer that
//! publishes each step to the hub and breaks on the job's cancel flag or on shutdown, write
//! `<id>.mp4` and `<id>.gif` (as `.part` files, renamed when whole), then mark it `completed`
//! or `failed`. A job abandoned at shutdown stays `in_progress` in the store, which is what a
//! crash leaves too: the next start queues it again.

use crate::hub::Hub;
use crate::job::{percent, Job, JobError, Status};
use crate::store::Store;
use crate::validate::ModelInfo;
use candle_core::DType;
use std::ops::ControlFlow;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use vdit_core::{Error, Result};
use vdit_pipeline::{CogVideoXPipeline, Event, GenerateRequest, PromptInput, TextEncoderPolicy};

/// Loads the pipeline a worker owns: f32 on the default device, text encoder kept. The server
/// takes text prompts, so the folder must have a tokenizer and a text encoder, and be a
/// text-to-video model.
pub fn load_pipeline(model: &Path) -> Result<CogVideoXPipeline> {
    let device = vdit_core::device::default_device()?;
    let mut pipe = CogVideoXPipeline::load(model, DType::F32, &device)?;
    for c in ["tokenizer", "text_encoder"] {
        if pipe.folder.optional_component(c).is_none() {
            return Err(Error::invalid(
                "model",
                format!(
                    "{} has no {c}/ component: vdit serve takes text prompts, so the model needs a tokenizer and a text encoder",
                    model.display()
                ),
            ));
        }
    }
    if pipe.is_image_to_video() {
        return Err(Error::invalid(
            "model",
            format!(
                "{} is an image-to-video model; vdit serve runs text-to-video models",
                model.display()
            ),
        ));
    }
    pipe.text_encoder_policy = TextEncoderPolicy::Keep;
    Ok(pipe)
}

/// What the API needs to know of a loaded pipeline.
pub fn model_info(pipe: &CogVideoXPipeline) -> ModelInfo {
    let (f, h, w) = pipe.default_size();
    let t = pipe.transformer.config();
    let v = pipe.vae.config();
    let s = pipe.vae_scale_spatial();
    // The decoder's widest activation relative to full resolution: stage i runs at 1/2^i.
    let vae_channels = v
        .block_out_channels
        .iter()
        .enumerate()
        .map(|(i, &c)| c.div_ceil(1 << (2 * i)))
        .max()
        .unwrap_or(3);
    let tiles = pipe.vae.tile_options();
    let root = &pipe.folder.root;
    ModelInfo {
        name: root
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| root.display().to_string()),
        default_frames: f,
        default_height: h,
        default_width: w,
        temporal_compression: pipe.vae_scale_temporal(),
        size_multiple: s * t.patch_size,
        vae_scale: s,
        num_train_timesteps: pipe.scheduler.num_train_timesteps(),
        default_steps: pipe.defaults.num_inference_steps,
        default_guidance_scale: pipe.defaults.guidance_scale,
        default_use_dynamic_cfg: pipe.defaults.use_dynamic_cfg,
        default_guidance_max_timestep: pipe.defaults.guidance_max_timestep,
        default_guidance_rescale: pipe.defaults.guidance_rescale,
        default_fps: pipe.defaults.fps,
        inner_dim: t.inner_dim(),
        text_len: t.max_text_seq_length,
        patch_size: t.patch_size,
        patch_size_t: t.patch_size_t.unwrap_or(1),
        latent_channels: v.latent_channels,
        vae_channels,
        vae_tile_height: if tiles.enabled {
            tiles.tile_sample_min_height
        } else {
            0
        },
        vae_tile_width: if tiles.enabled {
            tiles.tile_sample_min_width
        } else {
            0
        },
        weight_bytes: weight_bytes(root),
    }
}

/// Bytes of the `*.safetensors` files one level below `root` (the components).
fn weight_bytes(root: &Path) -> u64 {
    let mut n = 0;
    for comp in std::fs::read_dir(root).into_iter().flatten().flatten() {
        for f in std::fs::read_dir(comp.path())
            .into_iter()
            .flatten()
            .flatten()
        {
            if f.path().extension().is_some_and(|e| e == "safetensors") {
                n += f.metadata().map(|m| m.len()).unwrap_or(0);
            }
        }
    }
    n
}

/// Starts `n` workers, each loading its own pipeline from `model`; returns once all are loaded
/// (with the model's [`ModelInfo`]) or the first load error.
pub fn spawn(
    model: &Path,
    n: usize,
    store: Arc<Store>,
    hub: Arc<Hub>,
) -> Result<(ModelInfo, Vec<std::thread::JoinHandle<()>>)> {
    let (tx, rx) = mpsc::channel::<Result<ModelInfo>>();
    let mut handles = Vec::new();
    for i in 0..n.max(1) {
        let (tx, store, hub, model) = (tx.clone(), store.clone(), hub.clone(), model.to_path_buf());
        let h = std::thread::Builder::new()
            .name(format!("vdit-worker-{i}"))
            .spawn(move || {
                let mut pipe = match load_pipeline(&model) {
                    Ok(p) => p,
                    Err(e) => {
                        let _ = tx.send(Err(e));
                        return;
                    }
                };
                let _ = tx.send(Ok(model_info(&pipe)));
                drop(tx);
                run(&mut pipe, &store, &hub);
            })
            .map_err(|e| Error::Msg(format!("cannot start a worker thread: {e}")))?;
        handles.push(h);
    }
    drop(tx);
    let mut info = None;
    for _ in 0..handles.len() {
        match rx.recv() {
            Ok(Ok(i)) => info = Some(i),
            Ok(Err(e)) => {
                hub.shutdown();
                return Err(e);
            }
            Err(_) => {
                hub.shutdown();
                return Err(Error::Msg(
                    "a worker stopped while loading the model".into(),
                ));
            }
        }
    }
    Ok((info.expect("at least one worker"), handles))
}

/// A worker's loop: wait for work, run queued jobs until none is left.
fn run(pipe: &mut CogVideoXPipeline, store: &Store, hub: &Hub) {
    while hub.wait_work() {
        while !hub.is_shutdown() && !hub.is_paused() {
            match store.claim_next() {
                Ok(Some(job)) => {
                    // Another idle worker may take the next job meanwhile.
                    hub.notify_work();
                    run_job(pipe, job, store, hub);
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::error!("cannot read the job queue: {e}");
                    std::thread::sleep(Duration::from_secs(1));
                    break;
                }
            }
        }
    }
}

fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown panic".into())
}

fn run_job(pipe: &mut CogVideoXPipeline, job: Job, store: &Store, hub: &Hub) {
    let id = job.id.clone();
    let _span = tracing::info_span!("job", id = %id).entered();
    let t0 = Instant::now();
    let total = job.params.num_inference_steps;
    hub.update(&id, |s| {
        s.status = Status::InProgress;
        s.step = 0;
        s.total = total;
    });
    let cancel = hub.cancel_flag(&id);
    let cancelled = || cancel.as_ref().is_some_and(|c| c.load(Ordering::SeqCst));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        generate(pipe, &job, store, hub, &cancelled)
    }))
    .unwrap_or_else(|p| {
        Err(Error::Msg(format!(
            "internal error: the generation panicked: {}",
            panic_message(p.as_ref())
        )))
    });
    let outcome = match result {
        Ok(()) => Ok(()),
        Err(Error::Cancelled) if hub.is_shutdown() && !cancelled() => {
            // Left in_progress: the next start queues it again.
            tracing::info!("abandoned at shutdown");
            return;
        }
        Err(Error::Cancelled) => Err(JobError {
            code: "cancelled".into(),
            message: "cancelled".into(),
        }),
        Err(e) => Err(JobError {
            code: "generation_failed".into(),
            message: redact(&e.to_string(), pipe, store),
        }),
    };
    let failed = outcome.is_err();
    match store.finish(&id, outcome) {
        Ok(true) => {
            let status = if failed {
                Status::Failed
            } else {
                Status::Completed
            };
            hub.record_job_time(t0.elapsed());
            tracing::info!(
                status = status.as_str(),
                ms = t0.elapsed().as_millis() as u64,
                "job done"
            );
            hub.finish(&id, status);
        }
        // Cancelled or deleted meanwhile: the DELETE already told the subscribers.
        Ok(false) => hub.finish(&id, Status::Cancelled),
        Err(e) => tracing::error!("cannot record the job's end: {e}"),
    }
}

/// An error message for API clients: the server's own folders are named `<model>` and `<data>`.
fn redact(msg: &str, pipe: &CogVideoXPipeline, store: &Store) -> String {
    let mut m = msg.to_string();
    let data = store.videos_dir().parent().unwrap_or(store.videos_dir());
    for (dir, name) in [(pipe.folder.root.as_path(), "<model>"), (data, "<data>")] {
        let d = dir.display().to_string();
        if !d.is_empty() {
            m = m.replace(&d, name);
        }
    }
    m
}

fn generate(
    pipe: &mut CogVideoXPipeline,
    job: &Job,
    store: &Store,
    hub: &Hub,
    cancelled: &dyn Fn() -> bool,
) -> Result<()> {
    let p = &job.params;
    let req = GenerateRequest {
        prompt: PromptInput::Text(p.prompt.clone()),
        negative_prompt: Some(PromptInput::Text(p.negative_prompt.clone())),
        num_frames: Some(p.num_frames),
        height: Some(p.height),
        width: Some(p.width),
        num_inference_steps: p.num_inference_steps,
        guidance_scale: p.guidance_scale,
        use_dynamic_cfg: p.use_dynamic_cfg,
        guidance_max_timestep: p.guidance_max_timestep,
        guidance_rescale: p.guidance_rescale,
        seed: p.seed,
        ..GenerateRequest::default()
    };
    let mut last_write = Instant::now();
    let mut observer = |e: Event<'_>| {
        if let Event::Step { index, total, .. } = e {
            hub.update(&job.id, |s| {
                s.step = index + 1;
                s.total = total;
            });
            // The store's progress is for listings and restarts; a write per second is plenty.
            if last_write.elapsed() >= Duration::from_secs(1) {
                last_write = Instant::now();
                if let Err(e) = store.set_progress(&job.id, percent(index + 1, total)) {
                    tracing::warn!("cannot record progress: {e}");
                }
            }
        }
        if cancelled() || hub.is_shutdown() {
            ControlFlow::Break(())
        } else {
            ControlFlow::Continue(())
        }
    };
    let out = pipe.generate(req, &mut observer)?;
    let frames = out
        .frames
        .ok_or_else(|| Error::Msg("the pipeline returned no frames".into()))?;
    let (_, f, _, h, w) = frames.dims5()?;
    if (f, h, w) != (p.num_frames, p.height, p.width) {
        return Err(Error::Msg(format!(
            "the model decoded {f} frames of {w}x{h}, expected {} of {}x{}; this model's VAE does not decode this size correctly, try its default size ({}x{})",
            p.num_frames,
            p.width,
            p.height,
            pipe.default_size().2,
            pipe.default_size().1
        )));
    }
    let frames = vdit_pipeline::frames_to_rgb8(&frames)?
        .into_iter()
        .next()
        .ok_or_else(|| Error::Msg("the pipeline returned no video".into()))?;
    let video = vdit_video::Video {
        width: out.width as u32,
        height: out.height as u32,
        fps: p.fps,
        frames,
    };
    for ext in crate::FORMATS {
        if cancelled() {
            return Err(Error::Cancelled);
        }
        let part = store.partial_path(&job.id, ext);
        vdit_video::write_video(&part, &video).map_err(|e| Error::Msg(e.to_string()))?;
        let dst = store.output_path(&job.id, ext);
        std::fs::rename(&part, &dst).map_err(|e| Error::io(&dst, e))?;
    }
    Ok(())
}
