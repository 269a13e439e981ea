//! GIF: exact round trips for <= 256 colours, delays from fps, compositing of partial frames.

mod common;

use std::borrow::Cow;

use common::{gradient_clip, scratch, shapes_clip};
use gif::{DisposalMethod, Encoder, Frame, Repeat};
use vdit_video::{gif_delay_cs, psnr, read_video, video_psnr, write_video, Video};

#[test]
fn few_colours_round_trip_exactly_with_fps_from_the_delay() {
    let dir = scratch("gif_exact");
    // 10 fps divides 100: the delay (10 cs) and so the fps survive exactly.
    let clip = shapes_clip(64, 64, 17, 10.0, 3);
    let p = dir.join("clip.gif");
    write_video(&p, &clip).unwrap();
    let back = read_video(&p).unwrap();
    assert_eq!(back, clip);

    // 8 fps is 12.5 cs, rounded to 13: reads back as 100 / 13 fps, frames still exact.
    let clip = shapes_clip(64, 64, 17, 8.0, 0);
    write_video(&p, &clip).unwrap();
    let back = read_video(&p).unwrap();
    assert_eq!(gif_delay_cs(8.0), 13);
    assert!((back.fps - 100.0 / 13.0).abs() < 1e-5, "{}", back.fps);
    assert_eq!(back.frames, clip.frames);
}

#[test]
fn delays_are_rounded_and_at_least_2cs() {
    assert_eq!(gif_delay_cs(25.0), 4);
    assert_eq!(gif_delay_cs(30.0), 3); // 3.33 cs
    assert_eq!(gif_delay_cs(60.0), 2); // 1.67 cs rounds to 2
    assert_eq!(gif_delay_cs(200.0), 2); // 0.5 cs would be shown at 10 cs by browsers
    assert_eq!(gif_delay_cs(0.5), 200);
}

#[test]
fn many_colours_are_quantised_near_exactly_and_loop() {
    let dir = scratch("gif_many");
    let clip = gradient_clip(64, 48, 4, 20.0);
    let p = dir.join("clip.gif");
    write_video(&p, &clip).unwrap();
    let back = read_video(&p).unwrap();
    assert_eq!(
        (back.width, back.height, back.frames.len(), back.fps),
        (64, 48, 4, 20.0)
    );
    let q = video_psnr(&clip, &back);
    eprintln!("NeuQuant GIF PSNR {q:.2} dB");
    assert!(q > 28.0, "NeuQuant GIF PSNR {q:.2} dB");
    // The file loops forever (NETSCAPE2.0 application extension with count 0).
    let bytes = std::fs::read(&p).unwrap();
    let at = bytes
        .windows(11)
        .position(|w| w == b"NETSCAPE2.0")
        .expect("loop extension");
    assert_eq!(&bytes[at + 11..at + 16], &[3, 1, 0, 0, 0]);
}

/// A 4x4 GIF whose later frames cover only part of the screen, with transparency and the
/// three disposal methods, checked against a hand-composited result.
#[test]
fn partial_frames_are_composited_like_a_browser() {
    let dir = scratch("gif_composite");
    let p = dir.join("partial.gif");
    // Palette: 0 red, 1 green, 2 blue, 3 white.
    let palette = [255, 0, 0, 0, 255, 0, 0, 0, 255, 255, 255, 255];
    {
        let file = std::fs::File::create(&p).unwrap();
        let mut enc = Encoder::new(file, 4, 4, &palette).unwrap();
        enc.set_repeat(Repeat::Infinite).unwrap();
        let frame = |left, top, w, h, px: Vec<u8>, dispose, transparent, delay| Frame {
            left,
            top,
            width: w,
            height: h,
            buffer: Cow::Owned(px),
            dispose,
            transparent,
            delay,
            ..Frame::default()
        };
        // 0: full red, kept.
        enc.write_frame(&frame(
            0,
            0,
            4,
            4,
            vec![0; 16],
            DisposalMethod::Keep,
            None,
            10,
        ))
        .unwrap();
        // 1: 2x2 green at (1,1) whose top-left pixel is transparent (index 3), then cleared to background.
        enc.write_frame(&frame(
            1,
            1,
            2,
            2,
            vec![3, 1, 1, 1],
            DisposalMethod::Background,
            Some(3),
            20,
        ))
        .unwrap();
        // 2: 1x1 blue at (3,0), then restored to the previous canvas.
        enc.write_frame(&frame(
            3,
            0,
            1,
            1,
            vec![2],
            DisposalMethod::Previous,
            None,
            30,
        ))
        .unwrap();
        // 3: 1x1 white at (0,3).
        enc.write_frame(&frame(0, 3, 1, 1, vec![3], DisposalMethod::Keep, None, 40))
            .unwrap();
    }
    let v = read_video(&p).unwrap();
    assert_eq!((v.width, v.height, v.frames.len()), (4, 4, 4));
    // fps = 4 frames / 1.0 s.
    assert!((v.fps - 4.0).abs() < 1e-6);
    let (r, g, b, w, k) = (
        [255, 0, 0],
        [0, 255, 0],
        [0, 0, 255],
        [255, 255, 255],
        [0, 0, 0],
    );
    let paint = |cells: [[[u8; 3]; 4]; 4]| -> Vec<u8> {
        cells.iter().flatten().flatten().copied().collect()
    };
    let f0 = paint([[r, r, r, r], [r, r, r, r], [r, r, r, r], [r, r, r, r]]);
    let f1 = paint([[r, r, r, r], [r, r, g, r], [r, g, g, r], [r, r, r, r]]);
    // Frame 1's rectangle cleared to transparent (black), then blue drawn at (3,0).
    let f2 = paint([[r, r, r, b], [r, k, k, r], [r, k, k, r], [r, r, r, r]]);
    // Frame 2 restored (blue gone), white drawn at (0,3).
    let f3 = paint([[r, r, r, r], [r, k, k, r], [r, k, k, r], [w, r, r, r]]);
    for (i, expected) in [f0, f1, f2, f3].iter().enumerate() {
        assert_eq!(&v.frames[i], expected, "frame {i}");
    }
}

#[test]
fn one_frame_gif() {
    let dir = scratch("gif_one");
    let clip = Video {
        width: 3,
        height: 2,
        fps: 1.0,
        frames: vec![(0..18).collect()],
    };
    let p = dir.join("one.gif");
    write_video(&p, &clip).unwrap();
    let back = read_video(&p).unwrap();
    assert_eq!(psnr(&back.frames[0], &clip.frames[0]), f64::INFINITY);
    assert_eq!(back.fps, 1.0);
}

#[test]
fn frames_with_their_own_256_colours_use_local_palettes_and_stay_exact() {
    // 400 distinct colours over the clip, 200 in each frame: no global palette fits, but each
    // frame's own does.
    let frame = |base: u8| -> Vec<u8> {
        (0..200u32)
            .flat_map(|i| [base, (i % 256) as u8, (i / 2) as u8])
            .collect()
    };
    let clip = Video {
        width: 20,
        height: 10,
        fps: 5.0,
        frames: vec![frame(3), frame(250)],
    };
    let p = scratch("gif_local").join("local.gif");
    write_video(&p, &clip).unwrap();
    assert_eq!(read_video(&p).unwrap(), clip);
}
