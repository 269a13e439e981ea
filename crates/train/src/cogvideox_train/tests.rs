use super::kernels::{self, HeadNormRope, RopeTables};
use super::Block;
use super::*;
use crate::gradcheck::{assert_all_vars_get_grads, check_grad};
use crate::init::SeededVarMap;
use candle_core::{DType, Device, Tensor, D};
use std::collections::HashMap;
use vdit_models::transformers::cogvideox::{cogvideox_rotary_pos_embed, CogVideoXTransformer3D};

const EPS: f64 = 1e-6;
const TOL: f64 = 1e-6;

fn rnd(shape: &[usize], seed: u64) -> Tensor {
    let mut rng = crate::data::step_rng(seed, "cogvideox-test", 0);
    crate::objective::randn(shape, &mut rng, &Device::Cpu)
        .unwrap()
        .to_dtype(DType::F64)
        .unwrap()
}

fn max_diff(a: &Tensor, b: &Tensor) -> f64 {
    vdit_core::testing::max_abs_diff(a, b).unwrap()
}

fn cerr(e: vdit_core::Error) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

/// LayerNorm over the last dim from plain candle ops (the reference).
fn ln_ref(x: &Tensor, eps: f64) -> candle_core::Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    xc.broadcast_div(&(var + eps)?.sqrt()?)
}

/// Per-(sample, span) parameters `[Bp, G, n]` applied to rows of `[B, S, n]`, from candle ops.
fn per_span(
    y: &Tensor,
    p: &Tensor,
    split: usize,
    f: impl Fn(&Tensor, &Tensor) -> candle_core::Result<Tensor>,
) -> candle_core::Result<Tensor> {
    let s = y.dim(1)?;
    let g = p.dim(1)?;
    if g == 1 {
        return f(y, &p.narrow(1, 0, 1)?);
    }
    let a = f(&y.narrow(1, 0, split)?, &p.narrow(1, 0, 1)?)?;
    let b = f(&y.narrow(1, split, s - split)?, &p.narrow(1, 1, 1)?)?;
    Tensor::cat(&[a, b], 1)
}

#[test]
fn ada_norm_matches_candle_and_finite_differences() {
    // (B, S, n, Bp, G, split)
    for (i, &(b, s, n, bp, g, split)) in
        [(2, 5, 6, 2, 2, 2), (2, 4, 5, 1, 1, 0), (1, 3, 4, 1, 2, 3)]
            .iter()
            .enumerate()
    {
        let x = rnd(&[b, s, n], 10 + i as u64);
        let w = rnd(&[bp, g, n], 20 + i as u64);
        let bb = rnd(&[bp, g, n], 30 + i as u64);
        let reference = |v: &[Tensor]| -> candle_core::Result<Tensor> {
            let y = ln_ref(&v[0], 1e-5)?;
            let wy = per_span(&y, &v[1], split, |a, p| a.broadcast_mul(p))?;
            per_span(&wy, &v[2], split, |a, p| a.broadcast_add(p))
        };
        let fused = kernels::ada_norm(&x, &w, &bb, split, 1e-5).unwrap();
        let want = reference(&[x.clone(), w.clone(), bb.clone()]).unwrap();
        assert!(max_diff(&fused, &want) < 1e-12, "case {i}");
        let r = check_grad(
            |v| kernels::ada_norm(&v[0], &v[1], &v[2], split, 1e-5),
            &[x.clone(), w.clone(), bb.clone()],
            EPS,
            TOL,
        )
        .unwrap_or_else(|e| panic!("case {i}: {e}"));
        assert!(r.max_abs_grad > 0.1);
        // f32 agrees with f64
        let f32v = kernels::ada_norm(
            &x.to_dtype(DType::F32).unwrap(),
            &w.to_dtype(DType::F32).unwrap(),
            &bb.to_dtype(DType::F32).unwrap(),
            split,
            1e-5,
        )
        .unwrap();
        assert!(max_diff(&f32v.to_dtype(DType::F64).unwrap(), &fused) < 1e-5);
    }
}

#[test]
fn gated_residual_and_bias_gelu_gradients() {
    let (x, y, g) = (rnd(&[2, 5, 4], 1), rnd(&[2, 5, 4], 2), rnd(&[2, 2, 4], 3));
    let fused = kernels::gated_residual(&x, &y, &g, 3).unwrap();
    let want = (&x + per_span(&y, &g, 3, |a, p| a.broadcast_mul(p)).unwrap()).unwrap();
    assert!(max_diff(&fused, &want) < 1e-14);
    check_grad(
        |v| kernels::gated_residual(&v[0], &v[1], &v[2], 3),
        &[x, y, g],
        EPS,
        TOL,
    )
    .unwrap();
    let (u, b) = ((rnd(&[3, 4, 7], 4) * 2.0).unwrap(), rnd(&[7], 5));
    let fused = kernels::bias_gelu(&u, &b).unwrap();
    let want = u.broadcast_add(&b).unwrap().gelu().unwrap();
    assert!(max_diff(&fused, &want) < 1e-12);
    let f32v = kernels::bias_gelu(
        &u.to_dtype(DType::F32).unwrap(),
        &b.to_dtype(DType::F32).unwrap(),
    )
    .unwrap();
    assert!(max_diff(&f32v.to_dtype(DType::F64).unwrap(), &want) < 1e-5);
    check_grad(|v| kernels::bias_gelu(&v[0], &v[1]), &[u, b], EPS, TOL).unwrap();
}

fn rope_tables(rows: usize, dh: usize, seed: u64) -> (Tensor, Tensor, Arc<RopeTables>) {
    let ang = (rnd(&[rows, dh / 2], seed) * 2.0).unwrap();
    // repeat each angle twice, as the real tables do: [rows, dh/2, 2] -> [rows, dh]
    let ang = ang
        .unsqueeze(2)
        .unwrap()
        .broadcast_as((rows, dh / 2, 2))
        .unwrap()
        .reshape((rows, dh))
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let (c, s) = (ang.cos().unwrap(), ang.sin().unwrap());
    let v = |t: &Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let tables = Arc::new(RopeTables {
        cos: v(&c),
        sin: v(&s),
        rows,
    });
    (c, s, tables)
}

#[test]
fn head_norm_rope_matches_the_inference_form_and_finite_differences() {
    let (b, s, h, dh, text) = (2, 7, 2, 8, 3);
    let d = h * dh;
    let x = rnd(&[b, s, 3 * d], 40);
    let p = (rnd(&[4, dh], 41) * 0.5).unwrap();
    let (c, sn, tables) = rope_tables(s - text, dh, 42);
    for rope in [None, Some(tables)] {
        let op = HeadNormRope {
            heads: h,
            head_dim: dh,
            text_len: text,
            eps: 1e-6,
            rope: rope.clone(),
        };
        // reference: the models crate's candle form on each third
        let fused = kernels::head_norm_rope(&x, &p, op.clone()).unwrap();
        let vb = candle_nn::VarBuilder::from_tensors(
            HashMap::from([
                ("q.weight".to_string(), p.get(0).unwrap()),
                ("q.bias".to_string(), p.get(1).unwrap()),
                ("k.weight".to_string(), p.get(2).unwrap()),
                ("k.bias".to_string(), p.get(3).unwrap()),
            ]),
            DType::F64,
            &Device::Cpu,
        );
        let norm = |name: &str| {
            vdit_models::layers::norm::LayerNorm::new(dh, 1e-6, true, vb.pp(name)).unwrap()
        };
        let tab = rope.as_ref().map(|_| (&c, &sn));
        let third = |i: usize| x.narrow(2, i * d, d).unwrap();
        let q = vdit_models::layers::attention::head_norm_rope_candle(
            &third(0),
            &norm("q"),
            h,
            tab,
            text,
        )
        .unwrap();
        let k = vdit_models::layers::attention::head_norm_rope_candle(
            &third(1),
            &norm("k"),
            h,
            tab,
            text,
        )
        .unwrap();
        let want = Tensor::cat(&[q, k, third(2)], 2).unwrap();
        let dmax = max_diff(&fused, &want);
        assert!(dmax < 1e-6, "rope {}: {dmax}", rope.is_some());
        check_grad(
            |v| kernels::head_norm_rope(&v[0], &v[1], op.clone()),
            &[x.clone(), p.clone()],
            EPS,
            TOL,
        )
        .unwrap_or_else(|e| panic!("rope {}: {e}", rope.is_some()));
    }
}

#[test]
fn attention_matches_the_inference_kernel_and_finite_differences() {
    let (b, s, h, dh) = (2, 9, 2, 8);
    let d = h * dh;
    let x = rnd(&[b, s, 3 * d], 50);
    let fused = kernels::attention(&x, h, dh).unwrap();
    let third = |t: &Tensor, i: usize| t.narrow(2, i * d, d).unwrap();
    let want = vdit_models::layers::attention::sdpa_candle(
        &third(&x, 0),
        &third(&x, 1),
        &third(&x, 2),
        h,
        1.0 / (dh as f32).sqrt(),
    )
    .unwrap();
    assert!(max_diff(&fused, &want) < 1e-12);
    // f32: the inference kernel
    let x32 = x.to_dtype(DType::F32).unwrap();
    let f32v = kernels::attention(&x32, h, dh).unwrap();
    assert!(max_diff(&f32v.to_dtype(DType::F64).unwrap(), &want) < 1e-5);
    check_grad(
        |v| kernels::attention(&v[0], h, dh),
        std::slice::from_ref(&x),
        EPS,
        TOL,
    )
    .unwrap();
    // f32 gradient agrees with the f64 one
    let r = rnd(&[b, s, d], 51);
    let grad = |x: &Tensor| {
        let v = candle_core::Var::from_tensor(x).unwrap();
        let y = kernels::attention(v.as_tensor(), h, dh).unwrap();
        let l = (y * r.to_dtype(x.dtype()).unwrap())
            .unwrap()
            .sum_all()
            .unwrap();
        l.backward()
            .unwrap()
            .get(v.as_tensor())
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap()
    };
    assert!(max_diff(&grad(&x32), &grad(&x)) < 1e-5);
}

/// The block from the single-kernel ops (each checked against finite differences above): the
/// reference for the fused [`kernels::BlockOp`].
fn block_unfused(
    blk: &Block,
    x: &Tensor,
    temb_act: &Tensor,
    cfg: &CogVideoXTransformerConfig,
    text_len: usize,
    rope: Option<&Arc<RopeTables>>,
) -> candle_core::Result<Tensor> {
    let (d, eps) = (cfg.inner_dim(), cfg.norm_eps);
    let (h, dh) = (cfg.num_attention_heads, cfg.attention_head_dim);
    let zero_mods =
        |norm: &super::Norm, m: &Tensor| -> candle_core::Result<(Tensor, Tensor, Tensor)> {
            let c = |i: usize| m.narrow(1, i * d, d);
            let (tw, tb) = norm.modulated(&c(3)?, &c(4)?)?;
            let (vw, vb) = norm.modulated(&c(0)?, &c(1)?)?;
            Ok((
                Tensor::stack(&[tw, vw], 1)?,
                Tensor::stack(&[tb, vb], 1)?,
                Tensor::stack(&[c(5)?, c(2)?], 1)?,
            ))
        };
    let (w, b, gate) = zero_mods(&blk.norm1, &blk.norm1_linear.forward(temb_act)?)?;
    let hn = kernels::ada_norm(x, &w, &b, text_len, eps)?;
    let q = blk.to_q.forward(&hn)?;
    let k = blk.to_k.forward(&hn)?;
    let v = blk.to_v.forward(&hn)?;
    let qkv = Tensor::cat(&[q, k, v], 2)?;
    let params = Tensor::stack(
        &[&blk.norm_q.0, &blk.norm_q.1, &blk.norm_k.0, &blk.norm_k.1],
        0,
    )?;
    let op = HeadNormRope {
        heads: h,
        head_dim: dh,
        text_len,
        eps: 1e-6,
        rope: rope.cloned(),
    };
    let qkv = kernels::head_norm_rope(&qkv, &params, op)?;
    let o = kernels::attention(&qkv, h, dh)?;
    let a = blk.to_out.forward(&o)?;
    let x = kernels::gated_residual(x, &a, &gate, text_len)?;
    let (w, b, gate) = zero_mods(&blk.norm2, &blk.norm2_linear.forward(temb_act)?)?;
    let hn = kernels::ada_norm(&x, &w, &b, text_len, eps)?;
    let u = super::Lin {
        w: blk.ff_in.w.clone(),
        b: None,
    }
    .forward(&hn)?;
    let f = kernels::bias_gelu(&u, blk.ff_in.b.as_ref().unwrap())?;
    let f = blk.ff_out.forward(&f)?;
    kernels::gated_residual(&x, &f, &gate, text_len)
}

/// The fused block op against the composition of single-kernel ops, value and every gradient
/// (f64), with and without RoPE, affine norms and q/k/v biases; and against finite differences.
#[test]
fn fused_block_matches_the_unfused_ops() {
    let dev = Device::Cpu;
    for (rope, affine, bias) in [
        (false, true, true),
        (true, true, true),
        (false, false, false),
    ] {
        let cfg = CogVideoXTransformerConfig {
            norm_elementwise_affine: affine,
            attention_bias: bias,
            ..tiny(rope)
        };
        let vars = random_vars(12);
        let blk = Block::new(&cfg, vars.var_builder(DType::F64, &dev)).unwrap();
        let (b, text, n) = (2, 3, 6);
        let x = candle_core::Var::from_tensor(&rnd(&[b, text + n, cfg.inner_dim()], 13)).unwrap();
        let temb = candle_core::Var::from_tensor(&rnd(&[b, cfg.time_embed_dim], 14)).unwrap();
        let tables = rope.then(|| rope_tables(n, cfg.attention_head_dim, 15).2);
        let r = rnd(&[b, text + n, cfg.inner_dim()], 16);
        let run = |fused: bool| {
            let y = if fused {
                blk.forward(x.as_tensor(), temb.as_tensor(), &cfg, text, tables.as_ref())
            } else {
                block_unfused(
                    &blk,
                    x.as_tensor(),
                    temb.as_tensor(),
                    &cfg,
                    text,
                    tables.as_ref(),
                )
            }
            .unwrap();
            let g = (&y * &r).unwrap().sum_all().unwrap().backward().unwrap();
            (y, g)
        };
        let ((yf, gf), (yu, gu)) = (run(true), run(false));
        let case = format!("rope {rope} affine {affine} bias {bias}");
        assert!(max_diff(&yf, &yu) < 1e-12, "{case}: {}", max_diff(&yf, &yu));
        let mut all = vars.vars();
        all.push(("x".into(), x.clone()));
        all.push(("temb".into(), temb.clone()));
        for (name, v) in &all {
            let (a, c) = (
                gf.get(v.as_tensor()).unwrap(),
                gu.get(v.as_tensor()).unwrap(),
            );
            let dm = max_diff(a, c);
            assert!(dm < 1e-10, "{case}: gradient of {name} differs by {dm}");
        }
        assert_all_vars_get_grads(&vars.vars(), &gf).unwrap();
        // and the op on its own against finite differences (inputs, modulation, parameters)
        let mods = blk.mods(temb.as_tensor()).unwrap().detach();
        let params = blk.flat_params().unwrap().detach();
        let dims = Block::dims(&cfg, text);
        check_grad(
            |v| kernels::block(&v[0], &v[1], &v[2], dims.clone(), tables.clone()),
            &[x.as_tensor().detach(), mods, params],
            EPS,
            TOL,
        )
        .unwrap_or_else(|e| panic!("{case}: {e}"));
    }
}

/// A tiny config: 2 heads x 16, 2 layers, latents 4 x 8x8 at 9 frames (3 latent frames).
fn tiny(rope: bool) -> CogVideoXTransformerConfig {
    CogVideoXTransformerConfig {
        num_attention_heads: 2,
        attention_head_dim: 16,
        in_channels: 4,
        out_channels: 4,
        time_embed_dim: 16,
        text_embed_dim: 24,
        num_layers: 2,
        sample_width: 8,
        sample_height: 8,
        sample_frames: 9,
        max_text_seq_length: 7,
        use_rotary_positional_embeddings: rope,
        ..CogVideoXTransformerConfig::cogvideox_2b()
    }
}

/// Every tensor random (norm scales around 1), so that each part of the forward matters.
fn random_vars(seed: u64) -> SeededVarMap {
    SeededVarMap::with_rule(
        seed,
        Arc::new(|name: &str, shape: &[usize], _| {
            if shape.len() >= 2 {
                let fan_in: usize = shape[1..].iter().product();
                let b = 1.0 / (fan_in as f64).sqrt();
                Init::Uniform { lo: -b, up: b }
            } else if name.ends_with("weight") {
                Init::Uniform { lo: 0.5, up: 1.5 }
            } else {
                Init::Uniform { lo: -0.3, up: 0.3 }
            }
        }),
    )
}

fn exported(vars: &SeededVarMap) -> HashMap<String, Tensor> {
    vars.vars()
        .into_iter()
        .map(|(k, v)| (k, v.as_tensor().detach()))
        .collect()
}

#[test]
fn forward_matches_the_inference_model() {
    let dev = Device::Cpu;
    // the tiny config (sample 8x8 latents, 3 latent frames) and the default model's geometry
    // (sample 16x16, 17 frames = 5 latent frames) with one layer
    let geometry16 = |rope: bool| CogVideoXTransformerConfig {
        sample_width: 16,
        sample_height: 16,
        sample_frames: 17,
        num_layers: 1,
        ..tiny(rope)
    };
    let cases: [(
        &str,
        fn(bool) -> CogVideoXTransformerConfig,
        &[(usize, usize, usize, usize)],
    ); 2] = [
        (
            "tiny",
            tiny,
            &[(2, 3, 8, 8), (2, 1, 8, 8), (1, 3, 8, 14), (2, 5, 4, 8)],
        ),
        (
            "16x16x17",
            geometry16,
            &[(1, 5, 16, 16), (1, 5, 16, 28), (2, 1, 16, 16)],
        ),
    ];
    for rope in [false, true] {
        for (name, make, shapes) in cases {
            let cfg = make(rope);
            let vars = random_vars(3);
            let model = TrainCogVideoX::new(&cfg, vars.var_builder(DType::F32, &dev)).unwrap();
            let vb = candle_nn::VarBuilder::from_tensors(exported(&vars), DType::F32, &dev);
            let inf = CogVideoXTransformer3D::new(&cfg, vb).unwrap();
            let names: Vec<String> = vars.vars().into_iter().map(|v| v.0).collect();
            assert!(names.contains(&"transformer_blocks.0.attn1.norm_k.bias".to_string()));
            assert!(names.contains(&"patch_embed.proj.weight".to_string()));
            // (B, latent frames, h, w): sample size, one frame (images), resized grids
            for (i, &(b, f, h, w)) in shapes.iter().enumerate() {
                let seed = 100 + i as u64;
                let x = rnd(&[b, f, 4, h, w], seed).to_dtype(DType::F32).unwrap();
                let text = rnd(&[b, 7, 24], seed + 1).to_dtype(DType::F32).unwrap();
                let t = Tensor::new(&[999f32, 17.0][..b], &dev).unwrap();
                let tables = if rope {
                    Some(cogvideox_rotary_pos_embed(&cfg, h * 8, w * 8, f, 8, &dev).unwrap())
                } else {
                    None
                };
                let tabs = tables.as_ref().map(|(c, s)| (c, s));
                let got = model.forward(&x, &text, &t, tabs).unwrap();
                let want = inf.forward(&x, &text, &t, tabs, None).unwrap();
                assert_eq!(got.dims(), &[b, f, 4, h, w]);
                let dmax = max_diff(&got, &want);
                let scale = want
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(scale > 0.1, "{scale}");
                assert!(
                    dmax < 1e-4,
                    "{name} rope {rope} ({b}x{f}x{h}x{w}): max diff {dmax}"
                );
                eprintln!("{name} rope {rope} {b}x{f}x{h}x{w}: max diff {dmax:.2e} (output max {scale:.2})");
            }
        }
    }
}

#[test]
fn every_var_gets_a_gradient() {
    let dev = Device::Cpu;
    for rope in [false, true] {
        let cfg = tiny(rope);
        let vars = random_vars(4);
        let model = TrainCogVideoX::new(&cfg, vars.var_builder(DType::F32, &dev)).unwrap();
        let x = rnd(&[2, 3, 4, 8, 8], 7).to_dtype(DType::F32).unwrap();
        let text = rnd(&[2, 7, 24], 8).to_dtype(DType::F32).unwrap();
        let t = Tensor::new(&[500f32, 3.0], &dev).unwrap();
        let tables = rope.then(|| cogvideox_rotary_pos_embed(&cfg, 64, 64, 3, 8, &dev).unwrap());
        let out = model
            .forward(&x, &text, &t, tables.as_ref().map(|(c, s)| (c, s)))
            .unwrap();
        let loss = out.sqr().unwrap().mean_all().unwrap();
        let g = loss.backward().unwrap();
        let all = vars.vars();
        assert_eq!(all.len(), 2 * 24 + 16);
        assert_all_vars_get_grads(&all, &g).unwrap();
    }
}

/// The whole backward pass (through every fused op, in f64) against finite differences, for
/// the inputs and a few weights standing for each kind of layer.
#[test]
fn model_gradient_matches_finite_differences() {
    let dev = Device::Cpu;
    for rope in [false, true] {
        let cfg = CogVideoXTransformerConfig {
            num_layers: 1,
            ..tiny(rope)
        };
        let vars = random_vars(5);
        let vb = vars.var_builder(DType::F64, &dev);
        let model = TrainCogVideoX::new(&cfg, vb).unwrap();
        let x = rnd(&[2, 2, 4, 4, 4], 9);
        let text = rnd(&[2, 3, 24], 10);
        let t = Tensor::new(&[400f64, 60.0], &dev).unwrap();
        let tables = rope.then(|| cogvideox_rotary_pos_embed(&cfg, 32, 32, 2, 8, &dev).unwrap());
        let r = check_grad(
            |v| {
                model
                    .forward(&v[0], &v[1], &t, tables.as_ref().map(|(c, s)| (c, s)))
                    .map_err(cerr)
            },
            &[x.clone(), text.clone()],
            1e-6,
            1e-5,
        )
        .unwrap_or_else(|e| panic!("rope {rope}: {e}"));
        assert!(r.max_abs_grad > 1e-3);
        // weights: gradients by autograd vs finite differences on the var
        let probe = [
            "transformer_blocks.0.norm1.linear.weight",
            "transformer_blocks.0.attn1.norm_q.weight",
            "transformer_blocks.0.attn1.to_k.weight",
            "transformer_blocks.0.ff.net.0.proj.bias",
            "norm_out.linear.bias",
        ];
        let all: HashMap<String, candle_core::Var> = vars.vars().into_iter().collect();
        let rr = rnd(&[2, 2, 4, 4, 4], 11);
        let loss = |m: &TrainCogVideoX| -> f64 {
            let y = m
                .forward(&x, &text, &t, tables.as_ref().map(|(c, s)| (c, s)))
                .unwrap();
            (y * &rr)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f64>()
                .unwrap()
        };
        let y = model
            .forward(&x, &text, &t, tables.as_ref().map(|(c, s)| (c, s)))
            .unwrap();
        let grads = (y * &rr).unwrap().sum_all().unwrap().backward().unwrap();
        for name in probe {
            let var = &all[name];
            let g = grads.get(var.as_tensor()).unwrap().flatten_all().unwrap();
            let base = var
                .as_tensor()
                .flatten_all()
                .unwrap()
                .to_vec1::<f64>()
                .unwrap();
            for j in [0, base.len() / 2, base.len() - 1] {
                let at = |delta: f64| {
                    let mut p = base.clone();
                    p[j] += delta;
                    var.set(&Tensor::from_vec(p, var.dims(), &dev).unwrap())
                        .unwrap();
                    loss(&model)
                };
                let fd = (at(1e-6) - at(-1e-6)) / 2e-6;
                var.set(&Tensor::from_vec(base.clone(), var.dims(), &dev).unwrap())
                    .unwrap();
                let ad = g.get(j).unwrap().to_scalar::<f64>().unwrap();
                assert!(
                    (ad - fd).abs() <= 1e-5 * fd.abs().max(1.0),
                    "rope {rope} {name}[{j}]: autograd {ad}, finite differences {fd}"
                );
            }
        }
    }
}

#[test]
fn bad_inputs_are_errors() {
    let dev = Device::Cpu;
    let cfg = tiny(false);
    let vars = random_vars(6);
    let model = TrainCogVideoX::new(&cfg, vars.var_builder(DType::F32, &dev)).unwrap();
    let text = Tensor::zeros((1, 7, 24), DType::F32, &dev).unwrap();
    let t = Tensor::new(&[1f32], &dev).unwrap();
    let e = model
        .forward(
            &Tensor::zeros((1, 1, 3, 8, 8), DType::F32, &dev).unwrap(),
            &text,
            &t,
            None,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("in_channels"), "{e}");
    let e = model
        .forward(
            &Tensor::zeros((1, 1, 4, 7, 8), DType::F32, &dev).unwrap(),
            &text,
            &t,
            None,
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("patch_size"), "{e}");
    let bad = CogVideoXTransformerConfig {
        patch_size_t: Some(2),
        use_rotary_positional_embeddings: true,
        ..tiny(true)
    };
    let e = TrainCogVideoX::new(&bad, vars.var_builder(DType::F32, &dev))
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("patch_size_t"), "{e}");
}

/// Timing of one training step (forward + backward) and one inference forward; run with
/// `cargo test --release -p vdit-train bench_cogvideox -- --ignored --nocapture`.
#[test]
#[ignore]
fn bench_cogvideox_step() {
    let dev = Device::Cpu;
    let heads: usize = std::env::var("BENCH_HEADS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(4);
    let hd: usize = std::env::var("BENCH_HD")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(32);
    let layers: usize = std::env::var("BENCH_LAYERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let cfg = CogVideoXTransformerConfig {
        num_attention_heads: heads,
        attention_head_dim: hd,
        in_channels: 16,
        out_channels: 16,
        time_embed_dim: 128,
        text_embed_dim: 128,
        num_layers: layers,
        sample_width: 16,
        sample_height: 16,
        sample_frames: 17,
        max_text_seq_length: 32,
        ..CogVideoXTransformerConfig::cogvideox_2b()
    };
    let vars = random_vars(1);
    let model = TrainCogVideoX::new(&cfg, vars.var_builder(DType::F32, &dev)).unwrap();
    let vb = candle_nn::VarBuilder::from_tensors(exported(&vars), DType::F32, &dev);
    let inf = CogVideoXTransformer3D::new(&cfg, vb).unwrap();
    for &(b, f, h, w) in &[
        (8, 5, 16, 16),
        (16, 1, 16, 16),
        (4, 5, 16, 28),
        (8, 3, 16, 16),
    ] {
        let x = rnd(&[b, f, 16, h, w], 1).to_dtype(DType::F32).unwrap();
        let text = rnd(&[b, 32, 128], 2).to_dtype(DType::F32).unwrap();
        let t = Tensor::new(vec![500f32; b], &dev).unwrap();
        let mut best = (f64::MAX, f64::MAX);
        for _ in 0..3 {
            let t0 = std::time::Instant::now();
            let y = model.forward(&x, &text, &t, None).unwrap();
            let loss = y.sqr().unwrap().mean_all().unwrap();
            let t1 = t0.elapsed().as_secs_f64();
            let _g = loss.backward().unwrap();
            let t2 = t0.elapsed().as_secs_f64();
            best = (best.0.min(t1), best.1.min(t2));
        }
        eprintln!(
            "train {b}x{f}x{h}x{w}: forward {:.1} ms, forward+backward {:.1} ms",
            best.0 * 1e3,
            best.1 * 1e3
        );
    }
    let x = rnd(&[2, 5, 16, 16, 16], 1).to_dtype(DType::F32).unwrap();
    let text = rnd(&[2, 32, 128], 2).to_dtype(DType::F32).unwrap();
    let t = Tensor::new(&[500f32, 500.0], &dev).unwrap();
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t0 = std::time::Instant::now();
        let _ = inf.forward(&x, &text, &t, None, None).unwrap();
        best = best.min(t0.elapsed().as_secs_f64());
    }
    eprintln!("inference forward 2x5x16x16: {:.1} ms", best * 1e3);
}
