//! Extension by latent replacement on the tiny fixture models: the clip is kept bit for bit, the
//! output has exactly N more frames, the window's known latents end at the encoded context, the
//! decoded window reproduces the context at its positions (to the VAE's own reconstruction), the
//! new frames are the window's and depend on the context, and long extensions chain windows.

use candle_core::{DType, Device, IndexOp, Tensor};
use std::ops::ControlFlow;
use vdit_core::testing::{assert_close, fixture_dir, load_tensors, max_abs_diff};
use vdit_pipeline::{
    CogVideoXPipeline, Direction, Event, ExtendRequest, GenerateRequest, PromptInput,
};

/// The text-to-video pipeline of the V2V fixture (sin-cos positions, 3-block VAE, 9-frame
/// sample), its prompt embeddings and its 9-frame 32x32 clip in [0, 1] as `[1, F, 3, H, W]`.
fn setup(case: &str) -> (CogVideoXPipeline, Tensor, Tensor, Tensor) {
    let dir = fixture_dir(case);
    let pipe = CogVideoXPipeline::load(&dir.join("pipeline"), DType::F32, &Device::Cpu).unwrap();
    let inputs = load_tensors(&dir.join("inputs.safetensors")).unwrap();
    let v2v = load_tensors(&fixture_dir("pipeline_v2v_like").join("inputs.safetensors")).unwrap();
    // [F, H, W, 3] bytes -> [1, F, 3, H, W] in [0, 1]
    let clip = (&v2v["video_u8"] / 255.0)
        .unwrap()
        .permute((0, 3, 1, 2))
        .unwrap()
        .unsqueeze(0)
        .unwrap()
        .contiguous()
        .unwrap();
    (
        pipe,
        inputs["prompt_embeds"].clone(),
        inputs["negative_prompt_embeds"].clone(),
        clip,
    )
}

fn request(pe: &Tensor, ne: &Tensor, window: Option<usize>, seed: u64) -> GenerateRequest {
    GenerateRequest {
        prompt: PromptInput::Embeds(pe.clone()),
        negative_prompt: Some(PromptInput::Embeds(ne.clone())),
        num_frames: window,
        num_inference_steps: 2,
        guidance_scale: 6.0,
        seed,
        ..Default::default()
    }
}

fn frames(x: &Tensor, start: usize, len: usize) -> Tensor {
    x.narrow(1, start, len).unwrap()
}

fn go(
    pipe: &mut CogVideoXPipeline,
    req: ExtendRequest,
) -> vdit_core::Result<vdit_pipeline::ExtendOutput> {
    pipe.extend(req, &mut |_| ControlFlow::Continue(()))
}

#[test]
fn forward_extension_keeps_the_clip_and_continues_from_its_end() {
    let (mut pipe, pe, ne, clip) = setup("pipeline_v2v_like");
    let sf = pipe.vae.config().scaling_factor;
    // Window 17 frames = 5 latents; 3 known latents = the clip's last 9 frames; 2 new = 8 frames.
    let req = |clip: &Tensor, seed| ExtendRequest {
        request: request(&pe, &ne, Some(17), seed),
        video: clip.clone(),
        direction: Direction::Forward,
        num_frames: 8,
        context_latents: Some(3),
    };
    let out = go(&mut pipe, req(&clip, 7)).unwrap();
    assert_eq!(out.frames.dims(), [1, 17, 3, 32, 32]);
    assert_eq!(out.added, 8);
    assert_eq!(out.chunks.len(), 1);
    // The clip's own frames, unchanged.
    assert_eq!(
        max_abs_diff(&frames(&out.frames, 0, 9), &clip).unwrap(),
        0.0
    );

    let ch = &out.chunks[0];
    assert_eq!(
        (ch.known.clone(), ch.context_frames.clone(), ch.padding),
        (0..3, 0..9, 0)
    );
    // The known latents are the scaled posterior mean of the context...
    let x = clip
        .affine(2.0, -1.0)
        .unwrap()
        .permute((0, 2, 1, 3, 4))
        .unwrap();
    let mean = pipe.vae.encode(&x).unwrap().mean; // [1, C, 3, h, w]
    let want = (mean.permute((0, 2, 1, 3, 4)).unwrap() * sf).unwrap();
    assert_close("known latents", &ch.known_latents, &want, 1e-6);
    // ...and the window ends exactly on them.
    assert_eq!(
        max_abs_diff(&frames(&ch.latents, 0, 3), &ch.known_latents).unwrap(),
        0.0
    );

    // Decoded, the window reproduces the context at its positions: its first 9 frames equal the
    // VAE's reconstruction of the clip (the decoder is causal and the frame batches align:
    // [0:3] + [3:5] for the window, [0:3] for the context alone).
    let window = pipe.decode_latents(&ch.latents).unwrap();
    assert_eq!(window.dim(1).unwrap(), 17);
    let recon = pipe.decode_latents(&ch.known_latents).unwrap();
    assert_close(
        "window's context frames vs VAE reconstruction",
        &frames(&window, 0, 9),
        &recon,
        1e-5,
    );
    // The new frames are the window's frames after the context.
    assert_eq!(ch.new_frames, 9..17);
    assert_eq!(
        max_abs_diff(&frames(&out.frames, 9, 8), &frames(&window, 9, 8)).unwrap(),
        0.0
    );

    // Deterministic for a seed; and the new frames depend on the context.
    let again = go(&mut pipe, req(&clip, 7)).unwrap();
    assert_eq!(max_abs_diff(&again.frames, &out.frames).unwrap(), 0.0);
    let other_clip = (1.0 - &clip).unwrap();
    let other = go(&mut pipe, req(&other_clip, 7)).unwrap();
    let d = max_abs_diff(&frames(&other.frames, 9, 8), &frames(&out.frames, 9, 8)).unwrap();
    assert!(d > 0.05, "new frames ignore the context (max diff {d})");
}

#[test]
fn backward_extension_keeps_the_clip_and_leads_into_its_start() {
    let (mut pipe, pe, ne, clip) = setup("pipeline_v2v_like");
    let sf = pipe.vae.config().scaling_factor;
    // Window 5 latents; 2 known group latents = the clip's first 8 frames at the window's end;
    // new: latent 0 + 2 groups = 9 frames, the last 8 kept.
    let out = go(
        &mut pipe,
        ExtendRequest {
            request: request(&pe, &ne, Some(17), 3),
            video: clip.clone(),
            direction: Direction::Backward,
            num_frames: 8,
            context_latents: Some(2),
        },
    )
    .unwrap();
    assert_eq!(out.frames.dims(), [1, 17, 3, 32, 32]);
    assert_eq!(
        max_abs_diff(&frames(&out.frames, 8, 9), &clip).unwrap(),
        0.0
    );
    let ch = &out.chunks[0];
    assert_eq!((ch.known.clone(), ch.context_frames.clone()), (3..5, 0..8));
    // Known latents: [f0, f0, f1, ..., f7] encoded, latent 0 dropped: whole 4-frame groups.
    let ctx = Tensor::cat(&[&frames(&clip, 0, 1), &frames(&clip, 0, 8)], 1).unwrap();
    let x = ctx
        .affine(2.0, -1.0)
        .unwrap()
        .permute((0, 2, 1, 3, 4))
        .unwrap();
    let mean = pipe.vae.encode(&x).unwrap().mean.narrow(2, 1, 2).unwrap();
    let want = (mean.permute((0, 2, 1, 3, 4)).unwrap() * sf).unwrap();
    assert_close("known latents", &ch.known_latents, &want, 1e-6);
    assert_eq!(
        max_abs_diff(&frames(&ch.latents, 3, 2), &ch.known_latents).unwrap(),
        0.0
    );
    // New frames: window frames 1..9 (frame 0, farthest from the seam, dropped); frames 9..17
    // of the window stand where the clip's first 8 frames are.
    assert_eq!(ch.new_frames, 1..9);
    let window = pipe.decode_latents(&ch.latents).unwrap();
    assert_eq!(
        max_abs_diff(&frames(&out.frames, 0, 8), &frames(&window, 1, 8)).unwrap(),
        0.0
    );
}

#[test]
fn long_extensions_chain_windows_on_the_extended_clip() {
    let (mut pipe, pe, ne, clip) = setup("pipeline_v2v_like");
    // The model's 9-frame window (3 latents), default context 2 latents (5 frames): 4 new frames
    // per window, so 12 frames take 3 windows; steps are numbered across windows.
    let mut seen = Vec::new();
    let mut started = None;
    let out = pipe
        .extend(
            ExtendRequest {
                request: request(&pe, &ne, None, 11),
                video: clip.clone(),
                direction: Direction::Forward,
                num_frames: 12,
                context_latents: None,
            },
            &mut |e| {
                match e {
                    Event::Started {
                        num_frames, steps, ..
                    } => started = Some((num_frames, steps)),
                    Event::Step { index, total, .. } => seen.push((index, total)),
                    _ => {}
                }
                ControlFlow::Continue(())
            },
        )
        .unwrap();
    assert_eq!(started, Some((21, 6)));
    assert_eq!(seen, (0..6).map(|i| (i, 6)).collect::<Vec<_>>());
    assert_eq!(out.frames.dim(1).unwrap(), 21);
    assert_eq!(out.chunks.len(), 3);
    let ctx: Vec<_> = out
        .chunks
        .iter()
        .map(|c| c.context_frames.clone())
        .collect();
    assert_eq!(ctx, [4..9, 8..13, 12..17]);
    assert_eq!(
        max_abs_diff(&frames(&out.frames, 0, 9), &clip).unwrap(),
        0.0
    );
    // Window 2's context includes frames window 1 made: its known latents encode them.
    let ctx2 = frames(&out.frames, 8, 5);
    let x = ctx2
        .affine(2.0, -1.0)
        .unwrap()
        .permute((0, 2, 1, 3, 4))
        .unwrap();
    let mean = pipe.vae.encode(&x).unwrap().mean;
    let want = (mean.permute((0, 2, 1, 3, 4)).unwrap() * pipe.vae.config().scaling_factor).unwrap();
    assert_close(
        "window 2 known latents",
        &out.chunks[1].known_latents,
        &want,
        1e-6,
    );
    // Backwards with a 17-frame window: 8 new frames per window, so 12 = 8 + 4, and the last
    // window's surplus is dropped far from the seam (its frames 1..5 go, 5..9 stay).
    let out = go(
        &mut pipe,
        ExtendRequest {
            request: request(&pe, &ne, Some(17), 11),
            video: clip.clone(),
            direction: Direction::Backward,
            num_frames: 12,
            context_latents: None,
        },
    )
    .unwrap();
    assert_eq!(out.frames.dim(1).unwrap(), 21);
    let new: Vec<_> = out.chunks.iter().map(|c| c.new_frames.clone()).collect();
    assert_eq!(new, [1..9, 5..9]);
    let ctx: Vec<_> = out
        .chunks
        .iter()
        .map(|c| c.context_frames.clone())
        .collect();
    assert_eq!(ctx, [0..8, 0..8]);
    assert_eq!(
        max_abs_diff(&frames(&out.frames, 12, 9), &clip).unwrap(),
        0.0
    );
}

#[test]
fn image_to_video_models_extend_too() {
    // CogVideoX1.5-like I2V model: window padded 3 -> 4 latents (1 in front), ofs, image channels
    // from the context's first frame.
    let (mut pipe, pe, ne, clip) = setup("pipeline_i2v_v15_like");
    let out = go(
        &mut pipe,
        ExtendRequest {
            request: request(&pe, &ne, None, 5),
            video: clip.clone(),
            direction: Direction::Forward,
            num_frames: 4,
            context_latents: None,
        },
    )
    .unwrap();
    assert_eq!(out.frames.dim(1).unwrap(), 13);
    let ch = &out.chunks[0];
    assert_eq!((ch.padding, ch.known.clone()), (1, 1..3));
    assert_eq!(ch.latents.dim(1).unwrap(), 4);
    assert_eq!(
        max_abs_diff(&frames(&ch.latents, 1, 2), &ch.known_latents).unwrap(),
        0.0
    );
    // 5b-I2V-like (learned positions): backwards, with zero image channels.
    let (mut pipe, pe, ne, clip) = setup("pipeline_i2v_5b_like");
    let out = go(
        &mut pipe,
        ExtendRequest {
            request: request(&pe, &ne, None, 5),
            video: clip.i((.., 0..4)).unwrap(),
            direction: Direction::Backward,
            num_frames: 4,
            context_latents: None,
        },
    )
    .unwrap();
    assert_eq!(out.frames.dim(1).unwrap(), 8);
    // Its learned positions exist only at the sample size (32x32).
    let small = clip.i((.., 0..4, .., 0..24, 0..24)).unwrap();
    let e = go(
        &mut pipe,
        ExtendRequest {
            request: request(&pe, &ne, None, 5),
            video: small,
            direction: Direction::Forward,
            num_frames: 4,
            context_latents: None,
        },
    )
    .unwrap_err()
    .to_string();
    assert!(
        e.contains("learned positional embeddings") && e.contains("32x32"),
        "{e}"
    );
    assert_eq!(
        max_abs_diff(&frames(&out.frames, 4, 4), &clip.i((.., 0..4)).unwrap()).unwrap(),
        0.0
    );
}

#[test]
fn bad_extension_requests_name_the_problem() {
    let (mut pipe, pe, ne, clip) = setup("pipeline_v2v_like");
    let base = |n: usize, window: Option<usize>, dir, ctx, video: &Tensor| ExtendRequest {
        request: request(&pe, &ne, window, 1),
        video: video.clone(),
        direction: dir,
        num_frames: n,
        context_latents: ctx,
    };
    let short = frames(&clip, 0, 3);
    let cases: Vec<(ExtendRequest, &[&str])> = vec![
        (
            base(0, None, Direction::Forward, None, &clip),
            &["num_frames", "multiple of 4"],
        ),
        (
            base(6, None, Direction::Forward, None, &clip),
            &["num_frames", "multiple of 4"],
        ),
        (
            base(4, Some(13), Direction::Forward, None, &clip),
            &["window", "odd"],
        ),
        (
            base(4, Some(8), Direction::Forward, None, &clip),
            &["num_frames", "4k+1"],
        ),
        (
            base(4, Some(1), Direction::Forward, None, &clip),
            &["window", "no room"],
        ),
        (
            base(4, None, Direction::Backward, None, &short),
            &["video", "at least 4"],
        ),
        (
            base(4, None, Direction::Forward, Some(3), &clip),
            &["context_latents", "between 1 and 2"],
        ),
        (
            base(4, None, Direction::Forward, None, &(&clip * 255.0).unwrap()),
            &["video", "[0, 1]"],
        ),
        (
            base(
                4,
                None,
                Direction::Forward,
                None,
                &clip.i((.., .., .., 0..12)).unwrap(),
            ),
            &["height", "multiple of 8"],
        ),
    ];
    for (req, needles) in cases {
        let e = go(&mut pipe, req).unwrap_err().to_string();
        for n in needles {
            assert!(e.contains(n), "error `{e}` should mention `{n}`");
        }
    }
}

#[test]
fn text_to_video_models_take_an_image_as_latent_zero() {
    use vdit_pipeline::ImageToVideoRequest;
    let (mut pipe, pe, ne, clip) = setup("pipeline_v2v_like");
    let sf = pipe.vae.config().scaling_factor;
    let image = clip.i((0, 4)).unwrap().contiguous().unwrap(); // [3, H, W], frame 4
    let mut events = 0;
    let out = pipe
        .image_to_video_by_replacement(
            ImageToVideoRequest::new(request(&pe, &ne, Some(9), 3), image.clone()),
            &mut |_| {
                events += 1;
                ControlFlow::Continue(())
            },
        )
        .unwrap();
    assert!(events > 0);
    let f = out.frames.unwrap();
    assert_eq!(f.dims(), [1, 9, 3, 32, 32]);
    assert_eq!(out.num_frames, 9);
    // Latent 0 is exactly the image's scaled posterior mean ...
    let x = image
        .affine(2.0, -1.0)
        .unwrap()
        .unsqueeze(0)
        .unwrap()
        .unsqueeze(2)
        .unwrap();
    let mean = pipe.vae.encode(&x).unwrap().mean; // [1, C, 1, h, w]
    let want = (mean.permute((0, 2, 1, 3, 4)).unwrap() * sf).unwrap();
    assert_eq!(out.latents.dim(1).unwrap(), 3);
    assert_close("latent 0", &frames(&out.latents, 0, 1), &want, 1e-6);
    // ... and the frames are the whole window decoded (frame 0 included: not the given pixels).
    let decoded = pipe.decode_latents(&out.latents).unwrap();
    assert_close("frames", &f, &decoded, 1e-6);
    // The other frames depend on the image.
    let other = pipe
        .image_to_video_by_replacement(
            ImageToVideoRequest::new(request(&pe, &ne, Some(9), 3), (1.0 - &image).unwrap()),
            &mut |_| ControlFlow::Continue(()),
        )
        .unwrap();
    let d = max_abs_diff(&frames(&other.frames.unwrap(), 1, 8), &frames(&f, 1, 8)).unwrap();
    assert!(d > 0.05, "frames ignore the image (max diff {d})");
    // Errors name the problem: image noise options, a batch of images, an I2V checkpoint.
    let mut r = ImageToVideoRequest::new(request(&pe, &ne, Some(9), 3), image.clone());
    r.image_noise_sigma = Some(0.1);
    let e = pipe
        .image_to_video_by_replacement(r, &mut |_| ControlFlow::Continue(()))
        .unwrap_err()
        .to_string();
    assert!(e.contains("image_noise_sigma"), "{e}");
    let two = Tensor::stack(&[&image, &image], 0).unwrap();
    let e = pipe
        .image_to_video_by_replacement(
            ImageToVideoRequest::new(request(&pe, &ne, Some(9), 3), two),
            &mut |_| ControlFlow::Continue(()),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("one RGB image"), "{e}");
    let (mut i2v, pe, ne, _) = setup("pipeline_i2v_5b_like");
    let e = i2v
        .image_to_video_by_replacement(
            ImageToVideoRequest::new(request(&pe, &ne, None, 3), image),
            &mut |_| ControlFlow::Continue(()),
        )
        .unwrap_err()
        .to_string();
    assert!(e.contains("image_to_video"), "{e}");
}
