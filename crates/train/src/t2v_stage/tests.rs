use super::*;
use crate::config::{CaptionWord, ContrastPartners, Stage, TimestepBias};
use crate::data::{batches_for_step, latent_object_weights, step_rng, Bucket};
use crate::gradcheck::assert_all_vars_get_grads;
use crate::objective::sample_noised;
use crate::trainer::{export_dir, train, Control};
use vdit_core::folder::PipelineFolder;
use vdit_models::autoencoders::cogvideox_vae::AutoencoderKLCogVideoXConfig;
use vdit_models::text::t5::T5Encoder;
use vdit_models::text::tokenizer::TextTokenizer;
use vdit_models::transformers::cogvideox::CogVideoXTransformer3D;
use vdit_schedulers::{load_scheduler, NoiseSource};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vdit-t2v-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

/// A diffusers VAE folder with the parity fixtures' tiny shape (8x spatial, 4x temporal, 4
/// latent channels) and seeded random weights.
fn tiny_vae(dir: &Path) -> AutoencoderKLCogVideoXConfig {
    let cfg = AutoencoderKLCogVideoXConfig::tiny();
    let vars = SeededVarMap::new(5);
    AutoencoderKLCogVideoX::new(cfg.clone(), vars.var_builder(DType::F32, &Device::Cpu)).unwrap();
    // a near-deterministic posterior (logvar −12, as a trained VAE's is small), so that the
    // latents carry the clips and not the sampling noise
    let c = cfg.latent_channels;
    for (name, v) in vars.vars() {
        if name == "encoder.conv_out.conv.weight" || name == "encoder.conv_out.conv.bias" {
            let t = v.as_tensor();
            let logvar = if name.ends_with("bias") {
                Tensor::full(-12f32, c, &Device::Cpu).unwrap()
            } else {
                t.narrow(0, c, c).unwrap().zeros_like().unwrap()
            };
            v.set(&Tensor::cat(&[&t.narrow(0, 0, c).unwrap(), &logvar], 0).unwrap())
                .unwrap();
        }
    }
    std::fs::create_dir_all(dir).unwrap();
    let w: Vec<(String, Tensor)> = vars
        .vars()
        .into_iter()
        .map(|(k, v)| (k, v.as_tensor().detach()))
        .collect();
    save_weights(&dir.join("diffusion_pytorch_model.safetensors"), &w).unwrap();
    std::fs::write(
        dir.join("config.json"),
        diffusers_config("AutoencoderKLCogVideoX", &cfg).unwrap(),
    )
    .unwrap();
    cfg
}

/// A tiny text-to-video run config over `vae_dir` (32x32 clips → 4x4 latents).
fn tiny_config(vae_dir: &Path, out: &Path) -> TrainConfig {
    let t5 = T5Config::tiny(3 + world_vocabulary().len());
    let mut cfg = TrainConfig {
        stage: Stage::Transformer,
        out_dir: out.to_path_buf(),
        seed: 3,
        steps: 150,
        batch_size: 2,
        checkpoint_every: 1000,
        plot_every: 1000,
        model: serde_json::json!({
            "vae_dir": vae_dir,
            "caption_dropout": 0.2,
            "max_text_seq_length": 16,
            "transformer": {
                "num_attention_heads": 2, "attention_head_dim": 16, "num_layers": 2,
                "in_channels": 4, "out_channels": 4, "time_embed_dim": 16,
                "text_embed_dim": t5.d_model, "sample_width": 4, "sample_height": 4,
                "sample_frames": 9, "max_text_seq_length": 16,
            },
            "text_encoder": t5,
        }),
        ..Default::default()
    };
    cfg.data.num_clips = Some(2);
    cfg.data.buckets = vec![
        Bucket {
            width: 32,
            height: 32,
            frames: 9,
            weight: 1.0,
            batch_size: None,
            from_step: None,
        },
        Bucket {
            width: 32,
            height: 32,
            frames: 1,
            weight: 1.0,
            batch_size: Some(4),
            from_step: None,
        },
    ];
    cfg.optim.lr = 3e-3;
    cfg.optim.warmup_steps = 3;
    cfg.ema.decay = 0.0;
    cfg
}

#[test]
fn config_errors_name_the_key() {
    let root = tmp("errors");
    let vae = root.join("vae");
    tiny_vae(&vae);
    let base = tiny_config(&vae, &root.join("run"));
    let dev = Device::Cpu;
    let err = |edit: &dyn Fn(&mut serde_json::Value)| {
        let mut cfg = base.clone();
        edit(&mut cfg.model);
        TextToVideoStage::new(&cfg, &dev)
            .err()
            .expect("an error")
            .to_string()
    };
    let e = err(&|m| m["max_text_seq_length"] = 20.into());
    assert!(
        e.contains("model.max_text_seq_length") && e.contains("20"),
        "{e}"
    );
    let e = err(&|m| m["vae_dri"] = "x".into());
    assert!(e.contains("vae_dri"), "{e}");
    let e = err(&|m| m["transformer"]["num_layer"] = 3.into());
    assert!(e.contains("model.transformer.num_layer"), "{e}");
    let e = err(&|m| m["transformer"]["text_embed_dim"] = 24.into());
    assert!(e.contains("text_embed_dim") && e.contains("d_model"), "{e}");
    let e = err(&|m| m["transformer"]["in_channels"] = 16.into());
    assert!(
        e.contains("in_channels") && e.contains("latent_channels 4"),
        "{e}"
    );
    let e = err(&|m| m["caption_dropout"] = 1.5.into());
    assert!(e.contains("model.caption_dropout"), "{e}");
    let e = err(&|m| m["vae_dir"] = root.join("nowhere").to_str().unwrap().into());
    assert!(e.contains("model.vae_dir") && e.contains("nowhere"), "{e}");
    let e = err(&|m| m["text_encoder"]["vocab_size"] = 10.into());
    assert!(e.contains("model.text_encoder.vocab_size"), "{e}");
    let mut cfg = base.clone();
    cfg.data.buckets[0].width = 48;
    cfg.model["transformer"]["patch_size"] = 4.into();
    let e = TextToVideoStage::new(&cfg, &dev).err().unwrap().to_string();
    assert!(e.contains("data.buckets[0]") && e.contains("32"), "{e}");
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn init_is_adaln_zero_and_every_var_gets_a_gradient_once_moved() {
    let root = tmp("init");
    let vae = root.join("vae");
    tiny_vae(&vae);
    let cfg = tiny_config(&vae, &root.join("run"));
    let dev = Device::Cpu;
    let stage = TextToVideoStage::new(&cfg, &dev).unwrap();
    let vars = stage.vars();
    let get = |n: &str| {
        vars.iter()
            .find(|(k, _)| k == n)
            .unwrap_or_else(|| panic!("no var {n}"))
            .1
            .as_tensor()
            .clone()
    };
    for zero in [
        "transformer.proj_out.weight",
        "transformer.norm_out.linear.bias",
        "transformer.transformer_blocks.1.norm2.linear.weight",
    ] {
        assert_eq!(
            get(zero)
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap(),
            0.0
        );
    }
    let w = get("transformer.transformer_blocks.0.attn1.to_q.weight");
    let bound = (6.0f32 / 64.0).sqrt();
    let m = w
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(m <= bound && m > 0.5 * bound, "{m}");
    assert!(vars.iter().any(|(k, _)| k == "text_encoder.shared.weight"));
    // from zero init, gradients reach only proj_out; perturb every var and all of them get one
    for (_, v) in &vars {
        let mut rng = step_rng(9, "perturb", v.elem_count() as u64);
        let noise = crate::objective::randn(v.dims(), &mut rng, &dev).unwrap();
        v.set(&(v.as_tensor() + (noise * 0.05).unwrap()).unwrap())
            .unwrap();
    }
    let b = &batches_for_step(&cfg.data, 0, 0, 2, 1, 0, &dev).unwrap()[0];
    let mut rng = step_rng(0, "loss", 0);
    let out = stage.loss(b, &mut rng).unwrap();
    let g = out.loss.backward().unwrap();
    assert_all_vars_get_grads(&vars, &g).unwrap();
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn latent_cache_is_exact_and_bounded() {
    let root = tmp("cache");
    let vae_dir = root.join("vae");
    tiny_vae(&vae_dir);
    let dev = Device::Cpu;
    let cfg = tiny_config(&vae_dir, &root.join("run"));
    let stage = TextToVideoStage::new(&cfg, &dev).unwrap();
    let vae = AutoencoderKLCogVideoX::load(&vae_dir, DType::F32, &dev).unwrap();
    let mut seen = 0;
    for step in 0..6 {
        let b = &batches_for_step(&cfg.data, 0, 0, 2, 1, step, &dev).unwrap()[0];
        let (m, l) = stage.posterior(b).unwrap();
        let p = vae.encode_plain(&b.pixels).unwrap();
        assert_eq!(vdit_core::testing::max_abs_diff(&m, &p.mean).unwrap(), 0.0);
        assert_eq!(
            vdit_core::testing::max_abs_diff(&l, &p.logvar).unwrap(),
            0.0
        );
        seen += b.clip_indices.len() as u64;
    }
    let (n, mb, hits, misses) = stage.cache_stats().unwrap();
    // 2 clips x 2 buckets at most (a batch may hold a clip twice)
    assert!(
        n <= 4 && n as u64 <= misses && hits + misses == seen && hits > 0,
        "{n} {hits} {misses}"
    );
    let bytes: usize = {
        let c = stage.cache.as_ref().unwrap().lock().unwrap();
        c.map
            .values()
            .map(|(m, l)| 4 * (m.elem_count() + l.elem_count()))
            .sum()
    };
    assert!(bytes > 0);
    assert_eq!(mb, bytes as f64 / (1 << 20) as f64);
    // a zero budget keeps nothing, and gives the same latents
    let mut cfg0 = cfg.clone();
    cfg0.model["latent_cache_mb"] = 0.into();
    let stage0 = TextToVideoStage::new(&cfg0, &dev).unwrap();
    let b = &batches_for_step(&cfg.data, 0, 0, 2, 1, 0, &dev).unwrap()[0];
    let (x, y) = (
        stage.latents(b, &mut step_rng(1, "loss", 0)).unwrap(),
        stage0.latents(b, &mut step_rng(1, "loss", 0)).unwrap(),
    );
    assert_eq!(vdit_core::testing::max_abs_diff(&x, &y).unwrap(), 0.0);
    assert_eq!(stage0.cache_stats().unwrap().0, 0);
    std::fs::remove_dir_all(&root).unwrap();
}

/// A few training steps lower the loss; the exported folder loads with the pipeline's loaders,
/// its parts reproduce the training models, and it generates a 2-step 9-frame video with CFG.
#[test]
fn trains_exports_and_the_folder_generates() {
    let root = tmp("train");
    let vae_dir = root.join("vae");
    tiny_vae(&vae_dir);
    let dev = Device::Cpu;
    let cfg = tiny_config(&vae_dir, &root.join("run"));
    let stage = TextToVideoStage::new(&cfg, &dev).unwrap();
    // the loss on fixed batches and draws, before and after training (the per-step losses are
    // dominated by the random timesteps)
    let eval = |stage: &TextToVideoStage| -> f64 {
        let mut total = 0.0;
        for k in 0..16 {
            let b = &batches_for_step(&cfg.data, 77, 0, 2, 1, k, &dev).unwrap()[0];
            let out = stage.loss(b, &mut step_rng(77, "eval", k)).unwrap();
            total += out.loss.to_scalar::<f32>().unwrap() as f64;
        }
        total / 16.0
    };
    let before = eval(&stage);
    train(&cfg, &stage, &dev, false, &mut |_| Control::Continue).unwrap();
    let log = crate::log::read_log(&crate::trainer::log_path(&cfg)).unwrap();
    assert_eq!(log.len() as u64, cfg.steps);
    assert!(log
        .iter()
        .all(|r| r.loss.is_finite() && r.grad_norm.is_finite()));
    let after = eval(&stage);
    eprintln!("fixed-draw loss {before:.4} -> {after:.4}");
    assert!(after < 0.8 * before, "loss {before} -> {after}");

    let dir = export_dir(&cfg);
    let folder = PipelineFolder::open(&dir).unwrap();
    let gen: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("generation_config.json")).unwrap())
            .unwrap();
    assert_eq!(gen["num_inference_steps"], serde_json::json!(25));
    assert_eq!(folder.class_name, "CogVideoXPipeline");
    for (c, class) in [
        ("scheduler", "CogVideoXDDIMScheduler"),
        ("text_encoder", "T5EncoderModel"),
        ("tokenizer", "PreTrainedTokenizerFast"),
        ("transformer", "CogVideoXTransformer3DModel"),
        ("vae", "AutoencoderKLCogVideoX"),
    ] {
        assert_eq!(folder.class_of(c), Some(class));
    }
    // diffusers computes shapes with the VAE's temporal ratio: it must be an integer
    let vcfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("vae/config.json")).unwrap())
            .unwrap();
    assert_eq!(vcfg["temporal_compression_ratio"], serde_json::json!(4));
    let transformer =
        CogVideoXTransformer3D::load(&folder.component("transformer").unwrap(), DType::F32, &dev)
            .unwrap();
    let vae =
        AutoencoderKLCogVideoX::load(&folder.component("vae").unwrap(), DType::F32, &dev).unwrap();
    let mut sched = load_scheduler(&folder.component("scheduler").unwrap()).unwrap();
    let tok = TextTokenizer::load(&folder.component("tokenizer").unwrap()).unwrap();
    let t5 = T5Encoder::load(&folder.component("text_encoder").unwrap(), DType::F32, &dev).unwrap();

    // the pipeline tokenizes as training did
    let b = &batches_for_step(&cfg.data, 0, 0, 4, 1, 0, &dev).unwrap()[0];
    let mut prompts: Vec<&str> = b.captions.iter().map(|s| s.as_str()).collect();
    prompts.push("");
    prompts.push("a huge purple WORDS nobody knows, moving moving moving moving moving moving");
    let ids = stage.tokenize(&prompts).unwrap();
    let want = tok.encode_padded(&prompts, 16).unwrap();
    assert_eq!(ids.to_vec2::<u32>().unwrap(), want);
    // the exported text encoder and transformer compute what the trained ones compute
    let emb = t5.forward(&ids).unwrap();
    let emb_train = stage.text_encoder().forward(&ids).unwrap();
    let d_t5 = vdit_core::testing::max_abs_diff(&emb, &emb_train).unwrap();
    assert!(d_t5 < 1e-4, "T5 {d_t5}");
    let x = crate::objective::randn(&[2, 3, 4, 4, 4], &mut step_rng(2, "x", 0), &dev).unwrap();
    let t = Tensor::new(&[900f32, 20.0], &dev).unwrap();
    let e2 = emb.narrow(0, 0, 2).unwrap();
    let got = stage.transformer().forward(&x, &e2, &t, None).unwrap();
    let want = transformer.forward(&x, &e2, &t, None, None).unwrap();
    let d_tr = vdit_core::testing::max_abs_diff(&got, &want).unwrap();
    assert!(d_tr < 1e-4, "transformer {d_tr}");

    // a 2-step, 9-frame generation with classifier-free guidance, as the pipeline runs it
    let cond = t5
        .forward(
            &stage
                .tokenize(&["a red circle on a black background", ""])
                .unwrap(),
        )
        .unwrap();
    let cond = Tensor::cat(
        &[cond.narrow(0, 1, 1).unwrap(), cond.narrow(0, 0, 1).unwrap()],
        0,
    )
    .unwrap(); // [uncond; cond]
    sched.set_timesteps(2).unwrap();
    let mut lat =
        crate::objective::randn(&[1, 3, 4, 4, 4], &mut step_rng(4, "noise", 0), &dev).unwrap();
    struct NoNoise;
    impl NoiseSource for NoNoise {
        fn randn(&mut self, _shape: &[usize], _dev: &Device) -> vdit_core::Result<Tensor> {
            Err(Error::Msg("DDIM draws no noise".into()))
        }
    }
    for &t in sched.timesteps().to_vec().iter() {
        let inp = Tensor::cat(&[&lat, &lat], 0).unwrap();
        let tt = Tensor::new(&[t as f32, t as f32], &dev).unwrap();
        let out = transformer.forward(&inp, &cond, &tt, None, None).unwrap();
        let (u, c) = (out.narrow(0, 0, 1).unwrap(), out.narrow(0, 1, 1).unwrap());
        let guided = (&u + ((c - &u).unwrap() * 6.0).unwrap()).unwrap();
        lat = sched.step(&guided, t, &lat, &mut NoNoise).unwrap();
    }
    let z = (lat.permute((0, 2, 1, 3, 4)).unwrap() / vae.config().scaling_factor).unwrap();
    let frames = vae.decode(&z).unwrap();
    assert_eq!(frames.dims(), &[1, 3, 9, 32, 32]);
    let v = frames.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(v.iter().all(|x| x.is_finite()));
    std::fs::remove_dir_all(&root).unwrap();
}

/// The committed config with `vae_dir` replaced by `runs/vae/export` when it exists, else by
/// a random VAE of configs/vae.toml's architecture written to `tmp`.
fn committed_config(tmp_dir: &Path) -> TrainConfig {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut cfg = TrainConfig::load(&root.join("configs/t2v.toml")).unwrap();
    let real = root.join("../../runs/vae/export");
    let vae_dir = if real.join("config.json").is_file() {
        real
    } else {
        let v = TrainConfig::load(&root.join("configs/vae.toml")).unwrap();
        let vc: AutoencoderKLCogVideoXConfig =
            serde_json::from_value(v.model["vae"].clone()).unwrap();
        let vars = SeededVarMap::new(1);
        AutoencoderKLCogVideoX::new(vc.clone(), vars.var_builder(DType::F32, &Device::Cpu))
            .unwrap();
        std::fs::create_dir_all(tmp_dir).unwrap();
        let w: Vec<(String, Tensor)> = vars
            .vars()
            .into_iter()
            .map(|(k, v)| (k, v.as_tensor().detach()))
            .collect();
        save_weights(&tmp_dir.join("diffusion_pytorch_model.safetensors"), &w).unwrap();
        std::fs::write(
            tmp_dir.join("config.json"),
            diffusers_config("AutoencoderKLCogVideoX", &vc).unwrap(),
        )
        .unwrap();
        tmp_dir.to_path_buf()
    };
    cfg.model["vae_dir"] = vae_dir.to_str().unwrap().into();
    cfg
}

/// Time of the parts of a training step of the committed config:
/// `cargo test --release -p vdit-train bench_t2v_step -- --ignored --nocapture`.
#[test]
#[ignore]
fn bench_t2v_step() {
    let dir = tmp("bench");
    let mut cfg = committed_config(&dir.join("vae"));
    if let Some(n) = std::env::var("BENCH_NUM_CLIPS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        cfg.data.num_clips = Some(n);
    }
    let dev = Device::Cpu;
    let stage = TextToVideoStage::new(&cfg, &dev).unwrap();
    let n: usize = stage.vars().iter().map(|(_, v)| v.elem_count()).sum();
    eprintln!("params {n}");
    let steps: u64 = std::env::var("BENCH_STEPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(12);
    let mut tot = [0f64; 5];
    for step in 0..steps {
        let t0 = std::time::Instant::now();
        let b = &batches_for_step(&cfg.data, 0, 0, cfg.batch_size, 1, step, &dev).unwrap()[0];
        let t1 = t0.elapsed().as_secs_f64();
        let mut rng = step_rng(0, "loss", step);
        let prompts: Vec<&str> = b.captions.iter().map(|s| s.as_str()).collect();
        let text = stage
            .t5
            .forward(&stage.tokenize(&prompts).unwrap())
            .unwrap();
        let t2 = t0.elapsed().as_secs_f64();
        let x0 = stage.latents(b, &mut rng).unwrap();
        let t3 = t0.elapsed().as_secs_f64();
        let nb = sample_noised(&stage.sched, &x0, &mut rng).unwrap();
        let t: Vec<f32> = nb.timesteps.iter().map(|&t| t as f32).collect();
        let t = Tensor::from_vec(t, x0.dim(0).unwrap(), &dev).unwrap();
        let pred = stage
            .transformer
            .forward(&nb.noisy, &text, &t, None)
            .unwrap();
        let loss = diffusion_loss(
            &stage.sched,
            &pred,
            &nb,
            &x0,
            LossWeighting::Cogvideox,
            None,
        )
        .unwrap();
        let t4 = t0.elapsed().as_secs_f64();
        let _g = loss.backward().unwrap();
        let t5 = t0.elapsed().as_secs_f64();
        let parts = [t1, t2 - t1, t3 - t2, t4 - t3, t5 - t4];
        for (a, p) in tot.iter_mut().zip(parts) {
            *a += p;
        }
        eprintln!(
            "{:>10} x{:<2}: render {:5.0} ms, text {:4.0} ms, vae {:5.0} ms, transformer fwd {:5.0} ms, bwd {:5.0} ms, total {:5.0} ms",
            format!("{}x{}x{}", b.width, b.height, b.frames), b.clip_indices.len(),
            parts[0] * 1e3, parts[1] * 1e3, parts[2] * 1e3, parts[3] * 1e3, parts[4] * 1e3, t5 * 1e3
        );
    }
    let k = steps as f64;
    eprintln!(
        "mean: render {:.0} ms, text {:.0} ms, vae {:.0} ms, fwd {:.0} ms, bwd {:.0} ms, step {:.0} ms",
        tot[0] / k * 1e3, tot[1] / k * 1e3, tot[2] / k * 1e3, tot[3] / k * 1e3, tot[4] / k * 1e3,
        tot.iter().sum::<f64>() / k * 1e3
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// A few steps of the committed config (random VAE unless runs/vae/export exists), exported to
/// `$VDIT_T2V_OUT/export`, for checks by hand (diffusers, `vdit generate`):
/// `VDIT_T2V_OUT=/tmp/t2v cargo test --release -p vdit-train export_committed -- --ignored`.
#[test]
#[ignore]
fn export_committed_config() {
    let out = PathBuf::from(std::env::var("VDIT_T2V_OUT").expect("set VDIT_T2V_OUT"));
    let _ = std::fs::remove_dir_all(&out);
    let mut cfg = committed_config(&out.join("random-vae"));
    cfg.out_dir = out.clone();
    if let Some(n) = std::env::var("BENCH_NUM_CLIPS")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        cfg.data.num_clips = Some(n);
    }
    cfg.steps = std::env::var("VDIT_T2V_STEPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let dev = Device::Cpu;
    let stage = TextToVideoStage::new(&cfg, &dev).unwrap();
    train(&cfg, &stage, &dev, false, &mut |p| {
        eprintln!(
            "step {} loss {:.4} ({:.2} s)",
            p.step, p.record.loss, p.record.seconds
        );
        Control::Continue
    })
    .unwrap();
}

/// configs/t2v.toml parses and builds against a VAE of configs/vae.toml's architecture, its
/// prompt length holds every caption, and the model stays small.
#[test]
fn committed_config_builds() {
    let dir = tmp("committed");
    let cfg = committed_config(&dir.join("vae"));
    cfg.validate(Path::new("configs/t2v.toml")).unwrap();
    let stage = TextToVideoStage::new(&cfg, &Device::Cpu).unwrap();
    let longest = crate::word_tokenizer::longest_caption_tokens(300).unwrap();
    assert!(
        longest <= stage.cfg.transformer.max_text_seq_length,
        "{longest}"
    );
    let count = |prefix: &str| -> usize {
        stage
            .vars()
            .iter()
            .filter(|(k, _)| k.starts_with(prefix))
            .map(|(_, v)| v.elem_count())
            .sum()
    };
    let (tr, te) = (count("transformer."), count("text_encoder."));
    // f32 bytes: the shipped folder (with the VAE's ~10 MB) must stay under 25 MB
    assert!(tr * 4 < 11_000_000 && te * 4 < 2_000_000, "{tr} {te}");
    assert!(cfg.data.num_clips.is_some() && stage.cache.is_some());
    let _ = std::fs::remove_dir_all(&dir);
}

/// Moves every var off its adaLN-Zero start (which predicts 0 whatever the text) by fixed noise.
fn perturb(stage: &TextToVideoStage) {
    for (_, v) in &stage.vars() {
        let mut rng = step_rng(9, "perturb", v.elem_count() as u64);
        let noise = crate::objective::randn(v.dims(), &mut rng, v.device()).unwrap();
        v.set(&(v.as_tensor() + (noise * 0.05).unwrap()).unwrap())
            .unwrap();
    }
}

/// The stage's prediction for the noised batch `nb` under `prompts`, as its loss computes it.
fn predict(stage: &TextToVideoStage, prompts: &[&str], nb: &Noised) -> Tensor {
    let text = stage.t5.forward(&stage.tokenize(prompts).unwrap()).unwrap();
    let t: Vec<f32> = nb.timesteps.iter().map(|&t| t as f32).collect();
    let t = Tensor::from_vec(t, nb.timesteps.len(), nb.noisy.device()).unwrap();
    stage
        .transformer
        .forward(&nb.noisy, &text, &t, None)
        .unwrap()
}

/// `diffusion.object_weight` makes the stage's loss the weighted mean whose weights come from
/// the batch's object pixels at the VAE's latent grid; 0 keeps the plain mean.
#[test]
fn object_weight_weights_the_loss_at_object_cells() {
    let root = tmp("objw");
    let vae = root.join("vae");
    tiny_vae(&vae);
    let dev = Device::Cpu;
    let mut cfg = tiny_config(&vae, &root.join("run"));
    cfg.diffusion.object_weight = 3.0;
    cfg.diffusion.object_dilate = 0;
    let mut stage = TextToVideoStage::new(&cfg, &dev).unwrap();
    perturb(&stage);
    let b = &batches_for_step(&cfg.data, 0, 0, 2, 1, 0, &dev).unwrap()[0];
    let got = stage
        .loss(b, &mut step_rng(0, "loss", 0))
        .unwrap()
        .loss
        .to_scalar::<f32>()
        .unwrap();
    // The same draws by hand: caption dropout, posterior noise, timesteps and noise.
    let mut rng = step_rng(0, "loss", 0);
    let prompts: Vec<&str> = b
        .captions
        .iter()
        .map(|c| {
            if rng.random::<f64>() < 0.2 {
                ""
            } else {
                c.as_str()
            }
        })
        .collect();
    let x0 = stage.latents(b, &mut rng).unwrap();
    let nb = sample_noised(&stage.sched, &x0, &mut rng).unwrap();
    let pred = predict(&stage, &prompts, &nb);
    let w = latent_object_weights(
        &b.pixels,
        &b.backgrounds,
        8,
        4,
        0,
        &vec![3.0; b.captions.len()],
    )
    .unwrap();
    assert_eq!(w.dims()[..2], x0.dims()[..2]);
    assert_eq!(w.dims()[3..], x0.dims()[3..]);
    let loss = |w: Option<&Tensor>| {
        diffusion_loss(&stage.sched, &pred, &nb, &x0, LossWeighting::Cogvideox, w)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    let (weighted, plain) = (loss(Some(&w)), loss(None));
    assert!(
        (got - weighted).abs() <= 1e-6 * weighted,
        "{got} vs {weighted}"
    );
    assert!(
        (weighted - plain).abs() > 1e-3 * plain,
        "{weighted} vs {plain}"
    );
    // With object_max_t below the noisier sample's timestep, that sample keeps plain weights.
    let (t0, t1) = (nb.timesteps[0], nb.timesteps[1]);
    assert_ne!(t0, t1);
    let noisier = usize::from(t1 > t0);
    let ones = w.narrow(0, noisier, 1).unwrap().ones_like().unwrap();
    let kept = w.narrow(0, 1 - noisier, 1).unwrap();
    let parts = if noisier == 0 {
        [&ones, &kept]
    } else {
        [&kept, &ones]
    };
    let want = loss(Some(&Tensor::cat(&parts, 0).unwrap()));
    stage.train_cfg.diffusion.object_max_t = t0.min(t1);
    let got = stage
        .loss(b, &mut step_rng(0, "loss", 0))
        .unwrap()
        .loss
        .to_scalar::<f32>()
        .unwrap();
    assert!((got - want).abs() <= 1e-6 * want, "{got} vs {want}");
    assert!(
        (want - weighted).abs() > 1e-4 * want,
        "{want} vs {weighted}"
    );
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn caption_contrast_by_hand_and_its_gradient() {
    let dev = Device::Cpu;
    // 4 samples of 1x2x3: sample 0 valid, 1 invalid (dropped caption), 2 valid but without an
    // object cell, 3 valid with the wrong caption already worse by more than the margin.
    let n = 4 * 6;
    let own: Vec<f64> = (0..n).map(|i| ((i * 7 % 11) as f64 - 5.0) / 10.0).collect();
    let wrong: Vec<f64> = (0..n).map(|i| ((i * 5 % 13) as f64 - 6.0) / 8.0).collect();
    let target: Vec<f64> = (0..n).map(|i| ((i * 3 % 7) as f64 - 3.0) / 9.0).collect();
    let mut mask = vec![0f64; n];
    for (i, m) in mask.iter_mut().enumerate() {
        let (s, k) = (i / 6, i % 6);
        *m = f64::from(s != 2 && k % 2 == 0);
    }
    let valid = [true, false, true, true];
    let margin = 0.02;
    let t = |v: &[f64]| Tensor::from_vec(v.to_vec(), (4, 1, 2, 3), &dev).unwrap();
    let (term, ratio) =
        caption_contrast(&t(&own), &t(&wrong), &t(&target), &t(&mask), &valid, margin).unwrap();
    let e = |p: &[f64], s: usize| -> f64 {
        (s * 6..s * 6 + 6)
            .map(|i| mask[i] * (p[i] - target[i]).powi(2))
            .sum()
    };
    let r: Vec<f64> = [0, 3]
        .iter()
        .map(|&s| (e(&wrong, s) / e(&own, s)).ln())
        .collect();
    let want_term = r.iter().map(|r| (margin - r).max(0.0)).sum::<f64>() / 2.0;
    let want_ratio = (r[0] + r[1]) / 2.0;
    let got = term.to_scalar::<f64>().unwrap();
    assert!((got - want_term).abs() < 1e-9, "{got} vs {want_term}");
    assert!((ratio.unwrap() - want_ratio).abs() < 1e-9);
    // The data above exercise both sides of the hinge.
    assert!(
        r.iter().any(|&r| r < margin) && r.iter().any(|&r| r > margin),
        "{r:?}"
    );
    // No usable pair: a zero term, no ratio.
    let (zero, none) = caption_contrast(
        &t(&own),
        &t(&wrong),
        &t(&target),
        &t(&mask),
        &[false; 4],
        margin,
    )
    .unwrap();
    assert_eq!(zero.to_scalar::<f64>().unwrap(), 0.0);
    assert!(none.is_none());
    let err = caption_contrast(
        &t(&own),
        &t(&wrong),
        &t(&target),
        &t(&mask),
        &valid[..3],
        0.1,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("3 validity flags"), "{err}");
    // Autograd through log, relu and the masked sums against finite differences.
    let report = crate::gradcheck::check_grad(
        |x| {
            caption_contrast(&x[0], &x[1], &t(&target), &t(&mask), &valid, margin)
                .map(|(term, _)| term)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))
        },
        &[t(&own), t(&wrong)],
        1e-6,
        1e-6,
    )
    .unwrap();
    assert!(report.max_abs_grad > 0.1, "{report:?}");
}

/// `diffusion.contrast_weight` adds λ times the caption-contrast term of the predictions with
/// the batch's own captions and with its partners' captions, from the same draws.
#[test]
fn caption_contrast_adds_the_partner_caption_term() {
    contrast_term_equals_the_one_by_hand(ContrastPartners::Batch, false, None);
}

/// With `contrast_min_t`, only the samples noised at or above it are in the term (and only
/// they are predicted with the wrong caption).
#[test]
fn caption_contrast_takes_only_the_samples_from_contrast_min_t() {
    contrast_term_equals_the_one_by_hand(ContrastPartners::Edit, true, None);
}

/// The same with `contrast_partners = "edit"`: the wrong captions are the batch's own with one
/// word changed, drawn after the noise.
#[test]
fn caption_contrast_adds_the_edited_caption_term() {
    contrast_term_equals_the_one_by_hand(ContrastPartners::Edit, false, None);
}

/// `diffusion.word_contrast_weight` adds a second term, beside the batch partners', against the
/// sample's own caption with its shape word changed (drawn after the noise), in the same
/// forward; each term is logged under its own name.
#[test]
fn word_contrast_adds_the_shape_edited_term_beside_the_partners() {
    contrast_term_equals_the_one_by_hand(
        ContrastPartners::Batch,
        false,
        Some(&[CaptionWord::Shape]),
    );
}

/// The same with `contrast_min_t`: it leaves samples out of both terms.
#[test]
fn word_contrast_takes_only_the_samples_from_contrast_min_t() {
    contrast_term_equals_the_one_by_hand(
        ContrastPartners::Edit,
        true,
        Some(&[CaptionWord::Direction, CaptionWord::Size]),
    );
}

/// The loss with the contrast against the same draws by hand. With `from_max_t`,
/// `contrast_min_t` is set to the largest timestep drawn, so that some samples are left out.
/// With `word`, the word-contrast term too (weight 0.4, margin 0.25, those attributes).
fn contrast_term_equals_the_one_by_hand(
    mode: ContrastPartners,
    from_max_t: bool,
    word: Option<&[CaptionWord]>,
) {
    let root = tmp(&format!(
        "contrast-{mode:?}-{from_max_t}-{}",
        word.is_some()
    ));
    let vae = root.join("vae");
    tiny_vae(&vae);
    let dev = Device::Cpu;
    let mut cfg = tiny_config(&vae, &root.join("run"));
    cfg.model["caption_dropout"] = serde_json::json!(0.0);
    cfg.data.num_clips = Some(50);
    cfg.diffusion.contrast_weight = 0.5;
    cfg.diffusion.contrast_margin = 0.3;
    cfg.diffusion.contrast_partners = mode;
    cfg.diffusion.object_dilate = 0;
    // with the word term, timesteps biased towards the low end too (the stage must draw them
    // as the biased sampler does)
    let bias = word.map(|_| TimestepBias {
        begin: 0,
        end: 400,
        multiplier: 5.0,
    });
    if let Some(words) = word {
        cfg.diffusion.word_contrast_weight = 0.4;
        cfg.diffusion.word_contrast_margin = 0.25;
        cfg.diffusion.word_contrast_words = words.to_vec();
        cfg.diffusion.timestep_bias = bias.clone();
    }
    let stage = TextToVideoStage::new(&cfg, &dev).unwrap();
    perturb(&stage);
    // The first step whose batch has two clips on one background (a pair to contrast).
    let b = &(0..100)
        .map(|step| {
            batches_for_step(&cfg.data, 0, 0, 3, 1, step, &dev)
                .unwrap()
                .remove(0)
        })
        .find(|b| {
            let caps: Vec<&str> = b.captions.iter().map(|c| c.as_str()).collect();
            contrast_partners(&caps, &b.backgrounds)
                .iter()
                .any(Option::is_some)
        })
        .unwrap();
    // The same draws by hand, each caption set in its own forward.
    let mut rng = step_rng(0, "loss", 0);
    let prompts: Vec<&str> = b.captions.iter().map(|c| c.as_str()).collect();
    for _ in &prompts {
        let _: f64 = rng.random();
    }
    let x0 = stage.latents(b, &mut rng).unwrap();
    let nb =
        crate::objective::sample_noised_biased(&stage.sched, &x0, bias.as_ref(), &mut rng).unwrap();
    let (wrong_prompts, valid): (Vec<String>, Vec<bool>) = match mode {
        ContrastPartners::Batch => contrast_partners(&prompts, &b.backgrounds)
            .iter()
            .enumerate()
            .map(|(i, p)| (prompts[p.unwrap_or(i)].to_string(), p.is_some()))
            .unzip(),
        ContrastPartners::Edit => prompts
            .iter()
            .map(|p| {
                let e = edit_caption(p, &mut rng).unwrap();
                assert_ne!(&e, p);
                (e, true)
            })
            .unzip(),
    };
    // the word term's edits, drawn after the partners'; every caption here states a shape,
    // a size and a direction or is still (no direction)
    let (word_prompts, word_valid): (Vec<String>, Vec<bool>) = match word {
        None => (vec![], vec![]),
        Some(words) => prompts
            .iter()
            .map(|p| match edit_caption_of(p, words, &mut rng) {
                Some(e) => {
                    let changed: Vec<(&str, &str)> = p
                        .split_whitespace()
                        .zip(e.split_whitespace())
                        .filter(|(a, b)| a != b && !matches!(*a, "a" | "an"))
                        .collect();
                    assert_eq!(changed.len(), 1, "{p} -> {e}");
                    let class = word_class(changed[0].0).unwrap();
                    assert!(words.contains(&class), "{p} -> {e}");
                    (e, true)
                }
                None => (p.to_string(), false),
            })
            .unzip(),
    };
    if word.is_some() {
        assert!(word_valid.iter().any(|v| *v), "{prompts:?}");
    }
    let mut valid = valid;
    let mut word_valid = word_valid;
    let mask = latent_object_mask(&b.pixels, &b.backgrounds, 8, 4, 0).unwrap();
    let stage = if from_max_t {
        // the noisiest sample with object cells (one without is in no term's mean) and in
        // every term (a caption may state no word of the word term's attributes)
        let cells = mask
            .flatten_from(1)
            .unwrap()
            .sum(1)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let max_t = (0..cells.len())
            .filter(|&i| cells[i] > 0.0 && valid[i] && (word.is_none() || word_valid[i]))
            .map(|i| nb.timesteps[i])
            .max()
            .unwrap();
        let left_out = (0..valid.len())
            .filter(|&i| valid[i] && nb.timesteps[i] < max_t)
            .count();
        assert!(left_out > 0, "{:?}", nb.timesteps);
        for (v, &t) in valid.iter_mut().zip(&nb.timesteps) {
            *v &= t >= max_t;
        }
        for (v, &t) in word_valid.iter_mut().zip(&nb.timesteps) {
            *v &= t >= max_t;
        }
        cfg.diffusion.contrast_min_t = max_t;
        let s = TextToVideoStage::new(&cfg, &dev).unwrap();
        perturb(&s);
        s
    } else {
        stage
    };
    let out = stage.loss(b, &mut step_rng(0, "loss", 0)).unwrap();
    let got = out.loss.to_scalar::<f32>().unwrap();
    assert!(valid.iter().any(|v| *v));
    let wrong_prompts: Vec<&str> = wrong_prompts.iter().map(String::as_str).collect();
    let (own, wrong) = (
        predict(&stage, &prompts, &nb),
        predict(&stage, &wrong_prompts, &nb),
    );
    let plain = diffusion_loss(&stage.sched, &own, &nb, &x0, LossWeighting::Cogvideox, None)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let (term, ratio) = caption_contrast(&own, &wrong, &nb.target, &mask, &valid, 0.3).unwrap();
    let term = term.to_scalar::<f32>().unwrap();
    assert!(
        term > 0.0,
        "the hinge should be active (captions barely move a perturbed model): {term}"
    );
    let mut want = plain + 0.5 * term;
    let logged = |name: &str| out.metrics.iter().find(|(k, _)| k == name).map(|m| m.1);
    if word.is_some() {
        let word_prompts: Vec<&str> = word_prompts.iter().map(String::as_str).collect();
        let word_wrong = predict(&stage, &word_prompts, &nb);
        let (word_term, word_ratio) =
            caption_contrast(&own, &word_wrong, &nb.target, &mask, &word_valid, 0.25).unwrap();
        let word_term = word_term.to_scalar::<f32>().unwrap();
        assert!(word_term > 0.0, "{word_term}");
        want += 0.4 * word_term;
        // logged when a sample in the term has object cells
        match (logged("word_contrast"), word_ratio) {
            (Some(l), Some(r)) => assert!((l - r).abs() < 1e-4, "{l} vs {r}"),
            other => panic!("logged vs by hand: {other:?}"),
        }
    } else {
        assert_eq!(logged("word_contrast"), None);
    }
    assert!((got - want).abs() <= 1e-5 * want, "{got} vs {want}");
    let l = logged("contrast").unwrap();
    assert!((l - ratio.unwrap()).abs() < 1e-4, "{l} vs {ratio:?}");
    std::fs::remove_dir_all(&root).ok();
}

/// The attribute a caption word names, if any.
fn word_class(w: &str) -> Option<CaptionWord> {
    use vdit_world::{Colour, Shape, Size};
    let named = |names: Vec<&str>| names.contains(&w);
    let classes = [
        named(Colour::ALL.iter().map(|c| c.name()).collect()),
        named(Shape::ALL.iter().map(|c| c.name()).collect()),
        named(Size::ALL.iter().map(|c| c.name()).collect()),
        named(["left", "right", "up", "down"].into()),
        named(["slowly", "quickly"].into()),
    ];
    classes.iter().position(|x| *x).map(|i| CaptionWord::ALL[i])
}

/// Limited to some attributes, an edit changes a word of one of them, drawn among those the
/// caption states; a caption stating none of them has no edit.
#[test]
fn edit_caption_of_changes_only_the_listed_attributes() {
    let mut rng = step_rng(4, "edit", 0);
    let mut seen = std::collections::BTreeSet::new();
    let mut none = 0;
    for i in 0..300 {
        let (_, cap) = vdit_world::sample_clip(
            vdit_world::Split::Train,
            0,
            i,
            vdit_world::scene::DEFAULT_DURATION,
        );
        for words in [
            &[CaptionWord::Shape][..],
            &[CaptionWord::Direction, CaptionWord::Speed][..],
        ] {
            match edit_caption_of(&cap, words, &mut rng) {
                Some(e) => {
                    let changed: Vec<CaptionWord> = cap
                        .split_whitespace()
                        .zip(e.split_whitespace())
                        .filter(|(a, b)| a != b && !matches!(*a, "a" | "an"))
                        .map(|(a, b)| {
                            assert_eq!(word_class(a), word_class(b), "{cap} -> {e}");
                            word_class(a).unwrap()
                        })
                        .collect();
                    assert_eq!(changed.len(), 1, "{cap} -> {e}");
                    assert!(words.contains(&changed[0]), "{words:?}: {cap} -> {e}");
                    seen.insert(format!("{:?}", changed[0]));
                }
                None => {
                    // every caption names a shape; some state no motion
                    assert_eq!(words.len(), 2, "{cap}");
                    assert!(
                        cap.split_whitespace()
                            .all(|w| !matches!(word_class(w), Some(c) if words.contains(&c))),
                        "{cap}"
                    );
                    none += 1;
                }
            }
        }
    }
    assert!(none > 0, "some train captions are still");
    assert_eq!(
        seen.into_iter().collect::<Vec<_>>(),
        ["Direction", "Shape", "Speed"]
    );
}

/// An edited caption differs from the caption in one object word (colour, shape, size,
/// direction or speed), replaced by another value of the same attribute, and in the article
/// before it when the new word needs the other one; it stays within the tokenizer's vocabulary.
/// Over the world's captions every attribute gets edited.
#[test]
fn edit_caption_changes_one_object_word() {
    let class_of =
        |w: &str| word_class(w).map(|c| CaptionWord::ALL.iter().position(|x| *x == c).unwrap());
    let vocab = world_vocabulary();
    let articles_agree = |words: &[&str]| {
        words.windows(2).all(|p| match p[0] {
            "a" => !p[1].starts_with(['a', 'e', 'i', 'o', 'u']),
            "an" => p[1].starts_with(['a', 'e', 'i', 'o', 'u']),
            _ => true,
        })
    };
    let mut rng = step_rng(3, "edit", 0);
    let mut edited_classes = [0usize; 5];
    for i in 0..300 {
        let (_, cap) = vdit_world::sample_clip(
            vdit_world::Split::Train,
            0,
            i,
            vdit_world::scene::DEFAULT_DURATION,
        );
        let cap = cap.as_str();
        let e = edit_caption(cap, &mut rng).unwrap();
        let (a, b): (Vec<&str>, Vec<&str>) = (
            cap.split_whitespace().collect(),
            e.split_whitespace().collect(),
        );
        assert_eq!(a.len(), b.len(), "{cap} -> {e}");
        let changed: Vec<usize> = (0..a.len()).filter(|&k| a[k] != b[k]).collect();
        let attr: Vec<usize> = changed
            .iter()
            .copied()
            .filter(|&k| !matches!(a[k], "a" | "an"))
            .collect();
        assert_eq!(attr.len(), 1, "{cap} -> {e}");
        let k = attr[0];
        let class = class_of(a[k]).unwrap_or_else(|| panic!("{cap} -> {e}: {}", a[k]));
        assert_eq!(class_of(b[k]), Some(class), "{cap} -> {e}");
        edited_classes[class] += 1;
        // an article changed only right before the edited word
        assert!(
            changed.iter().all(|&c| c == k || c + 1 == k),
            "{cap} -> {e}"
        );
        assert!(articles_agree(&a) && articles_agree(&b), "{cap} -> {e}");
        assert!(b.iter().all(|w| vocab.iter().any(|v| v == w)), "{e}");
    }
    assert!(edited_classes.iter().all(|&n| n > 0), "{edited_classes:?}");
    assert_eq!(edit_caption("", &mut rng), None);
    assert_eq!(edit_caption("on a gray background", &mut rng), None);
    // "an orange square": a new colour takes "a", a new shape keeps "an orange"
    let outs: Vec<String> = (0..40)
        .map(|_| edit_caption("an orange square", &mut rng).unwrap())
        .collect();
    assert!(
        outs.iter()
            .any(|o| o.starts_with("a ") && !o.contains("orange")),
        "{outs:?}"
    );
    assert!(
        outs.iter()
            .any(|o| o.starts_with("an orange ") && !o.ends_with("square")),
        "{outs:?}"
    );
}

#[test]
fn contrast_partners_share_the_background_and_differ_in_caption() {
    let (k, g) = ([10, 10, 10], [90, 90, 90]);
    let prompts = [
        "a red circle on black",
        "",
        "a blue square on black",
        "a red circle on black",
        "a dot on gray",
        "a big dot on black",
    ];
    let bgs = [k, k, k, k, g, k];
    // 0 skips the dropped 1; 2 pairs with 3; 3 skips gray 4 for 5; 4 is alone on gray; 5 wraps round
    // to 0; the dropped caption has no partner.
    assert_eq!(
        contrast_partners(&prompts, &bgs),
        vec![Some(2), None, Some(3), Some(5), None, Some(0)]
    );
    // Equal captions never pair: 0 and 3 alone have none.
    assert_eq!(
        contrast_partners(&[prompts[0], prompts[3]], &[k, k]),
        vec![None, None]
    );
}

#[test]
fn a_frozen_text_encoder_stays_as_init_from_holds_it() {
    let root = tmp("freeze");
    let vae_dir = root.join("vae");
    tiny_vae(&vae_dir);
    let dev = Device::Cpu;
    let load = |p: PathBuf| vdit_core::testing::load_tensors(&p).unwrap();
    let max_diff = |a: &Tensor, b: &Tensor| vdit_core::testing::max_abs_diff(a, b).unwrap();
    // The source: a few steps of a joint run, exported.
    let mut a = tiny_config(&vae_dir, &root.join("a"));
    a.steps = 3;
    let sa = TextToVideoStage::new(&a, &dev).unwrap();
    train(&a, &sa, &dev, false, &mut |_| Control::Continue).unwrap();
    let (_, src) = crate::checkpoint::latest(&a.out_dir).unwrap().unwrap();

    // Frozen without init_from: an error naming the key and what it needs.
    let mut b = tiny_config(&vae_dir, &root.join("b"));
    b.steps = 4;
    b.model["freeze_text_encoder"] = serde_json::json!(true);
    let e = TextToVideoStage::new(&b, &dev).err().unwrap().to_string();
    assert!(
        e.contains("model.freeze_text_encoder") && e.contains("init_from"),
        "{e}"
    );

    b.init_from = Some(src.clone());
    let sb = TextToVideoStage::new(&b, &dev).unwrap();
    let names: Vec<String> = sb.vars().into_iter().map(|(n, _)| n).collect();
    assert!(
        names.iter().all(|n| n.starts_with("transformer.")),
        "{names:?}"
    );
    let t5_vars = sa
        .vars()
        .iter()
        .filter(|(n, _)| is_text_encoder_var(n))
        .count();
    assert!(t5_vars > 0);
    assert_eq!(names.len(), sa.vars().len() - t5_vars);
    train(&b, &sb, &dev, false, &mut |_| Control::Continue).unwrap();
    // Stretched and resumed: still frozen.
    b.steps = 6;
    let sb = TextToVideoStage::new(&b, &dev).unwrap();
    train(&b, &sb, &dev, true, &mut |_| Control::Continue).unwrap();

    let (ea, eb) = (export_dir(&a), export_dir(&b));
    let ta = load(ea.join("text_encoder/model.safetensors"));
    let tb = load(eb.join("text_encoder/model.safetensors"));
    assert_eq!(ta.len(), tb.len());
    for (k, v) in &ta {
        assert_eq!(max_diff(v, &tb[k]), 0.0, "text encoder {k} moved");
    }
    let xa = load(ea.join("transformer/diffusion_pytorch_model.safetensors"));
    let xb = load(eb.join("transformer/diffusion_pytorch_model.safetensors"));
    let moved = xa
        .iter()
        .filter(|(k, v)| max_diff(v, &xb[*k]) > 1e-6)
        .count();
    assert!(
        moved > xa.len() / 2,
        "only {moved} of {} transformer tensors moved",
        xa.len()
    );
    let _ = std::fs::remove_dir_all(&root);
}

#[test]
fn init_from_a_pipeline_folder_trains_as_from_the_checkpoint_it_was_exported_from() {
    let root = tmp("init-pipeline");
    let vae_dir = root.join("vae");
    tiny_vae(&vae_dir);
    let dev = Device::Cpu;
    // The source: a few steps, exported (EMA off, so the export holds the checkpoint's weights).
    let mut a = tiny_config(&vae_dir, &root.join("a"));
    a.steps = 3;
    let sa = TextToVideoStage::new(&a, &dev).unwrap();
    train(&a, &sa, &dev, false, &mut |_| Control::Continue).unwrap();
    let (_, ckpt) = crate::checkpoint::latest(&a.out_dir).unwrap().unwrap();
    let export = export_dir(&a);

    // Two fine-tuning runs, one from the checkpoint and one from the exported pipeline folder:
    // the same losses to the bit.
    let run = |name: &str, from: &Path| {
        let mut c = tiny_config(&vae_dir, &root.join(name));
        c.steps = 4;
        c.seed = 9;
        c.init_from = Some(from.to_path_buf());
        let s = TextToVideoStage::new(&c, &dev).unwrap();
        train(&c, &s, &dev, false, &mut |_| Control::Continue).unwrap()
    };
    let from_ckpt = run("c", &ckpt);
    let from_export = run("d", &export);
    let losses = |s: &crate::trainer::Summary| s.log.iter().map(|r| r.loss).collect::<Vec<_>>();
    assert_eq!(losses(&from_ckpt).len(), 4);
    assert_eq!(losses(&from_ckpt), losses(&from_export));
    // ... and not those of a run from scratch with that seed.
    let mut e = tiny_config(&vae_dir, &root.join("e"));
    e.steps = 4;
    e.seed = 9;
    let se = TextToVideoStage::new(&e, &dev).unwrap();
    let scratch = train(&e, &se, &dev, false, &mut |_| Control::Continue).unwrap();
    assert_ne!(losses(&scratch)[0], losses(&from_export)[0]);

    // Only the components with vars are read: the export's VAE is not asked for.
    let names: Vec<String> = crate::checkpoint::load_model_weights(&export, &dev, &|c| {
        c == "transformer" || c == "text_encoder"
    })
    .unwrap()
    .into_keys()
    .collect();
    let mut vars: Vec<String> = sa.vars().into_iter().map(|(n, _)| n).collect();
    let mut names = names;
    names.sort();
    vars.sort();
    assert_eq!(names, vars);

    // Wrong folders: errors that name the folder and what was expected.
    let fail = |name: &str, from: &Path| {
        let mut c = tiny_config(&vae_dir, &root.join(name));
        c.steps = 1;
        c.init_from = Some(from.to_path_buf());
        let s = TextToVideoStage::new(&c, &dev).unwrap();
        train(&c, &s, &dev, false, &mut |_| Control::Continue)
            .err()
            .unwrap()
            .to_string()
    };
    // A component folder of the wrong model: its keys match no var.
    let msg = fail("f", &export.join("vae"));
    assert!(
        msg.contains("vae") && msg.contains("no tensor for var"),
        "{msg}"
    );
    // A folder that holds no weights at all.
    let msg = fail("g", &root);
    assert!(
        msg.contains("init_from") && msg.contains(&root.display().to_string()),
        "{msg}"
    );
    // A pipeline folder with none of this stage's components.
    let only_vae = root.join("only-vae");
    std::fs::create_dir_all(&only_vae).unwrap();
    std::fs::write(
        only_vae.join("model_index.json"),
        r#"{"_class_name": "CogVideoXPipeline", "vae": ["diffusers", "AutoencoderKLCogVideoX"]}"#,
    )
    .unwrap();
    copy_dir(&export.join("vae"), &only_vae.join("vae"));
    let msg = fail("h", &only_vae);
    assert!(
        msg.contains("init_from") && msg.contains("none of its components (vae)"),
        "{msg}"
    );
    let _ = std::fs::remove_dir_all(&root);
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
    }
}

/// `shape_choice_loss` against the full distances by hand in f64, its limits (a perfect
/// estimate leads each other shape by 1/temperature; one at another shape's latents loses),
/// its shape errors, and its gradient against finite differences.
#[test]
fn shape_choice_by_hand_and_its_gradient() {
    let dev = Device::Cpu;
    let (n, k, e) = (3usize, 3usize, 6usize);
    let val = |i: usize, a: usize, b: usize, d: f64| ((i * a % b) as f64 - (b / 2) as f64) / d;
    let own: Vec<f64> = (0..n * e).map(|i| val(i, 7, 11, 4.0)).collect();
    // the others differ from the own latents in a few elements only, as shapes do
    let alts: Vec<f64> = (0..n * k * e)
        .map(|i| {
            let (s, j) = (i / (k * e), i % e);
            let base = own[s * e + j];
            if j % 3 == (i / e) % k % 3 {
                base + val(i, 5, 13, 3.0) + 0.5
            } else {
                base
            }
        })
        .collect();
    // sample 0 near its own latents, 1 near its second other shape's, 2 anywhere
    let x: Vec<f64> = (0..n * e)
        .map(|i| {
            let (s, j) = (i / e, i % e);
            let wobble = val(i, 3, 7, 20.0);
            match s {
                0 => own[i] + wobble,
                1 => alts[(s * k + 1) * e + j] + wobble,
                _ => val(i, 3, 7, 2.0),
            }
        })
        .collect();
    let tau = 0.4;
    let t = |v: &[f64], dims: &[usize]| Tensor::from_vec(v.to_vec(), dims, &dev).unwrap();
    let sc = shape_choice_loss(
        &t(&x, &[n, 2, 3]),
        &t(&own, &[n, 2, 3]),
        &t(&alts, &[n, k, 2, 3]),
        tau,
    )
    .unwrap();
    let d = |p: &[f64], q: &[f64]| p.iter().zip(q).map(|(a, b)| (a - b).powi(2)).sum::<f64>();
    let (mut want, mut right, mut gap) = (0.0, 0usize, 0.0);
    for i in 0..n {
        let xi = &x[i * e..(i + 1) * e];
        let oi = &own[i * e..(i + 1) * e];
        let rel: Vec<f64> = (0..k)
            .map(|s| {
                let a = &alts[(i * k + s) * e..(i * k + s + 1) * e];
                gap += d(a, oi) / (n * k) as f64;
                -(d(xi, a) - d(xi, oi)) / (d(a, oi) * tau)
            })
            .collect();
        want += (1.0 + rel.iter().map(|r| r.exp()).sum::<f64>()).ln() / n as f64;
        right += usize::from(rel.iter().all(|&r| r < 0.0));
    }
    let got = sc.loss.to_scalar::<f64>().unwrap();
    assert!((got - want).abs() < 1e-9, "{got} vs {want}");
    assert!((sc.accuracy - right as f64 / n as f64).abs() < 1e-12);
    assert!(right > 0 && right < n, "the data should have both: {right}");
    assert!((sc.gap - gap).abs() < 1e-9, "{} vs {gap}", sc.gap);
    // x̂₀ = μ_own: each other shape trails by 1/temperature.
    let perfect = shape_choice_loss(
        &t(&own, &[n, 2, 3]),
        &t(&own, &[n, 2, 3]),
        &t(&alts, &[n, k, 2, 3]),
        tau,
    )
    .unwrap();
    let want = (1.0 + 3.0 * (-1.0 / tau).exp()).ln();
    assert!((perfect.loss.to_scalar::<f64>().unwrap() - want).abs() < 1e-9);
    assert_eq!(perfect.accuracy, 1.0);
    // x̂₀ = the first other shape's latents: that shape wins every sample.
    let first: Vec<f64> = (0..n)
        .flat_map(|i| alts[i * k * e..i * k * e + e].to_vec())
        .collect();
    let wrong = shape_choice_loss(
        &t(&first, &[n, 2, 3]),
        &t(&own, &[n, 2, 3]),
        &t(&alts, &[n, k, 2, 3]),
        tau,
    )
    .unwrap();
    assert_eq!(wrong.accuracy, 0.0);
    assert!(wrong.loss.to_scalar::<f64>().unwrap() > 1.0 / tau);
    let err = shape_choice_loss(
        &t(&x, &[n, 2, 3]),
        &t(&own, &[n, 6]),
        &t(&alts, &[n, k, 2, 3]),
        tau,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        err.contains("shape choice") && err.contains("[N, K, ...]"),
        "{err}"
    );
    let report = crate::gradcheck::check_grad(
        |xs| {
            shape_choice_loss(&xs[0], &t(&own, &[n, 2, 3]), &t(&alts, &[n, k, 2, 3]), tau)
                .map(|sc| sc.loss)
                .map_err(|e| candle_core::Error::Msg(e.to_string()))
        },
        &[t(&x, &[n, 2, 3])],
        1e-6,
        1e-6,
    )
    .unwrap();
    assert!(report.max_abs_grad > 0.1, "{report:?}");
}

/// `diffusion.shape_choice_weight` adds λ times the shape-choice term of the batch's own
/// prediction, from the same draws: one object per sample drawn after the noise, the clip
/// re-rendered with the other shapes and encoded by the VAE; samples above
/// `shape_choice_max_t` or on the empty prompt are left out; the term is logged.
#[test]
fn shape_choice_adds_the_term_from_the_same_draws() {
    shape_choice_term_by_hand(false);
}

/// The same with `shape_choice_min_t`: the samples below it are left out.
#[test]
fn shape_choice_takes_only_the_samples_from_shape_choice_min_t() {
    shape_choice_term_by_hand(true);
}

/// The stage's loss against the plain loss plus λ times the shape-choice term by hand; the
/// window of timesteps set so that one kept sample is left out, from above (`max_t`) or
/// from below (`min_t`, when `from_below`).
fn shape_choice_term_by_hand(from_below: bool) {
    let root = tmp(if from_below {
        "shape-choice-min-t"
    } else {
        "shape-choice"
    });
    let vae = root.join("vae");
    tiny_vae(&vae);
    let dev = Device::Cpu;
    let mut cfg = tiny_config(&vae, &root.join("run"));
    cfg.model["caption_dropout"] = serde_json::json!(0.3);
    cfg.data.num_clips = Some(50);
    cfg.diffusion.shape_choice_weight = 0.7;
    cfg.diffusion.shape_choice_temperature = 0.5;
    let probe = TextToVideoStage::new(&cfg, &dev).unwrap();
    // The draws by hand; the first step with a dropped prompt and a sample in the term.
    let (b, dropped, x0, means, nb) = (0..100)
        .find_map(|step| {
            let b = batches_for_step(&cfg.data, 0, 0, 3, 1, step, &dev)
                .unwrap()
                .remove(0);
            let mut rng = step_rng(0, "loss", step);
            let dropped: Vec<bool> = b
                .captions
                .iter()
                .map(|_| rng.random::<f64>() < 0.3)
                .collect();
            let (x0, means) = probe.latents_and_means(&b, &mut rng).unwrap();
            let nb = sample_noised(&probe.sched, &x0, &mut rng).unwrap();
            let kept = dropped.iter().filter(|d| !**d).count();
            (dropped.iter().any(|d| *d) && kept >= 2).then_some((b, dropped, x0, means, nb))
        })
        .unwrap();
    // the window's end between the kept samples' timesteps, so that one is left out
    let mut kept_t: Vec<usize> = (0..dropped.len())
        .filter(|&i| !dropped[i])
        .map(|i| nb.timesteps[i])
        .collect();
    kept_t.sort();
    let (lo, hi) = (kept_t[0], *kept_t.last().unwrap());
    assert!(lo < hi, "{kept_t:?}");
    let window = if from_below { hi..=999 } else { 0..=lo };
    cfg.diffusion.shape_choice_min_t = *window.start();
    cfg.diffusion.shape_choice_max_t = *window.end();
    let stage = TextToVideoStage::new(&cfg, &dev).unwrap();
    perturb(&stage);
    let mut rng = step_rng(0, "loss", b.step);
    for _ in &b.captions {
        let _: f64 = rng.random();
    }
    let _ = stage.latents_and_means(&b, &mut rng).unwrap();
    let _ = sample_noised(&stage.sched, &x0, &mut rng).unwrap();
    let rows: Vec<usize> = (0..dropped.len())
        .filter(|&i| !dropped[i] && window.contains(&nb.timesteps[i]))
        .collect();
    assert!(rows.len() < kept_t.len() && !rows.is_empty(), "{rows:?}");
    let mut alts = Vec::new();
    for &i in &rows {
        let clip = b.clip_indices[i];
        let n = crate::data::clip_object_count(&cfg.data, 0, clip);
        let k = rng.random_range(0..n);
        let (px, _) =
            render_shape_alternatives(&cfg.data, 0, &cfg.data.buckets[b.bucket], clip, k, &dev)
                .unwrap()
                .unwrap();
        let m = stage.vae.encode_plain(&px).unwrap().mean;
        alts.push(
            (m * stage.vae.config().scaling_factor)
                .unwrap()
                .permute((0, 2, 1, 3, 4))
                .unwrap(),
        );
    }
    let out = stage.loss(&b, &mut step_rng(0, "loss", b.step)).unwrap();
    let got = out.loss.to_scalar::<f32>().unwrap();
    let prompts: Vec<&str> = b
        .captions
        .iter()
        .zip(&dropped)
        .map(|(c, &d)| if d { "" } else { c.as_str() })
        .collect();
    let pred = predict(&stage, &prompts, &nb);
    let plain = diffusion_loss(
        &stage.sched,
        &pred,
        &nb,
        &x0,
        LossWeighting::Cogvideox,
        None,
    )
    .unwrap()
    .to_scalar::<f32>()
    .unwrap();
    // x̂₀ = √ᾱ·x_t − √(1−ᾱ)·v̂ per kept sample
    let x0_hat: Vec<Tensor> = rows
        .iter()
        .map(|&i| {
            let a = nb.alphas_cumprod[i];
            ((nb.noisy.get(i).unwrap() * a.sqrt()).unwrap()
                - (pred.get(i).unwrap() * (1.0 - a).sqrt()).unwrap())
            .unwrap()
        })
        .collect();
    let own: Vec<Tensor> = rows.iter().map(|&i| means.get(i).unwrap()).collect();
    let sc = shape_choice_loss(
        &Tensor::stack(&x0_hat, 0).unwrap(),
        &Tensor::stack(&own, 0).unwrap(),
        &Tensor::stack(&alts, 0).unwrap(),
        0.5,
    )
    .unwrap();
    let term = sc.loss.to_scalar::<f32>().unwrap();
    assert!(term > 0.0);
    let want = plain + 0.7 * term;
    assert!((got - want).abs() <= 1e-5 * want, "{got} vs {want}");
    let logged = |name: &str| out.metrics.iter().find(|(k, _)| k == name).map(|m| m.1);
    assert!((logged("shape_choice").unwrap() - term as f64).abs() < 1e-5);
    assert_eq!(logged("shape_choice_acc").unwrap(), sc.accuracy);
    assert!((logged("shape_gap").unwrap() - sc.gap).abs() < 1e-6 * sc.gap.max(1.0));
    std::fs::remove_dir_all(&root).ok();
}
