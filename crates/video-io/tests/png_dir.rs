//! PNG-frame directories: exact round trips, naming, numeric order, fps.txt, stale frames.

mod common;

use common::{gradient_clip, scratch, shapes_clip};
use vdit_video::{frame_name, read_video, write_video, Video, DEFAULT_FPS};

#[test]
fn round_trip_is_exact() {
    let dir = scratch("png_exact");
    for (i, clip) in [
        shapes_clip(64, 64, 17, 8.0, 2),
        gradient_clip(33, 17, 4, 12.5),
    ]
    .into_iter()
    .enumerate()
    {
        let out = dir.join(format!("clip{i}"));
        write_video(&out, &clip).unwrap();
        assert!(out.join("frame_000.png").is_file());
        assert_eq!(
            std::fs::read_to_string(out.join("fps.txt")).unwrap().trim(),
            clip.fps.to_string()
        );
        let back = read_video(&out).unwrap();
        assert_eq!(back, clip);
    }
}

#[test]
fn rewriting_a_directory_drops_stale_frames() {
    let out = scratch("png_stale").join("clip");
    write_video(&out, &shapes_clip(32, 32, 17, 8.0, 0)).unwrap();
    let short = shapes_clip(32, 32, 5, 4.0, 1);
    write_video(&out, &short).unwrap();
    assert!(!out.join("frame_005.png").exists());
    assert_eq!(read_video(&out).unwrap(), short);
}

#[test]
fn names_widen_past_1000_frames() {
    assert_eq!(frame_name(0, 1000), "frame_000.png");
    assert_eq!(frame_name(999, 1000), "frame_999.png");
    assert_eq!(frame_name(0, 1001), "frame_0000.png");
    let out = scratch("png_1001").join("clip");
    let frames: Vec<Vec<u8>> = (0..1001u32)
        .map(|i| vec![(i % 256) as u8, (i / 256) as u8, 7])
        .collect();
    let clip = Video {
        width: 1,
        height: 1,
        fps: 24.0,
        frames,
    };
    write_video(&out, &clip).unwrap();
    assert!(out.join("frame_0000.png").is_file());
    assert!(out.join("frame_1000.png").is_file());
    assert!(!out.join("frame_000.png").exists());
    assert_eq!(read_video(&out).unwrap(), clip);
}

#[test]
fn frames_sort_numerically_and_fps_defaults_to_8() {
    // Unpadded names: lexical order would put frame_10 before frame_2.
    let out = scratch("png_numeric");
    let mut expected = Vec::new();
    for i in 0..12u8 {
        let frame = vec![i * 20, 255 - i * 20, i];
        let img = image::RgbImage::from_raw(1, 1, frame.clone()).unwrap();
        img.save(out.join(format!("frame_{i}.png"))).unwrap();
        expected.push(frame);
    }
    std::fs::write(out.join("notes.txt"), "not a frame").unwrap();
    let back = read_video(&out).unwrap();
    assert_eq!(back.frames, expected);
    assert_eq!(back.fps, DEFAULT_FPS);
    assert_eq!(DEFAULT_FPS, 8.0);

    std::fs::write(out.join("fps.txt"), " 12.5\n").unwrap();
    assert_eq!(read_video(&out).unwrap().fps, 12.5);
}

#[test]
fn reads_grey_and_rgba_pngs_as_rgb() {
    let out = scratch("png_kinds");
    image::GrayImage::from_raw(2, 1, vec![10, 200])
        .unwrap()
        .save(out.join("frame_000.png"))
        .unwrap();
    image::RgbaImage::from_raw(2, 1, vec![1, 2, 3, 0, 4, 5, 6, 255])
        .unwrap()
        .save(out.join("frame_001.png"))
        .unwrap();
    let back = read_video(&out).unwrap();
    assert_eq!(
        back.frames,
        vec![vec![10, 10, 10, 200, 200, 200], vec![1, 2, 3, 4, 5, 6]]
    );
}
