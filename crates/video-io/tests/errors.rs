//! Bad input gives a VideoError naming the path and what was expected; nothing panics.

mod common;

use common::{scratch, shapes_clip};
use vdit_video::{read_image, read_video, write_video, Video, VideoError};

fn err_text(r: Result<impl std::fmt::Debug, VideoError>) -> String {
    r.expect_err("expected an error").to_string()
}

#[test]
fn odd_size_for_mp4_is_an_error_not_a_crop() {
    let dir = scratch("err_odd");
    let p = dir.join("out.mp4");
    let msg = err_text(write_video(&p, &shapes_clip(65, 64, 3, 8.0, 0)));
    assert!(
        msg.contains("out.mp4: width 65 is odd; H.264 yuv420p needs even width and height"),
        "{msg}"
    );
    assert!(msg.contains("64x64"), "suggests a size: {msg}");
    let msg = err_text(write_video(&p, &shapes_clip(64, 33, 3, 8.0, 0)));
    assert!(msg.contains("height 33 is odd"), "{msg}");
    assert!(!p.exists(), "nothing written");
    // GIF and PNG take odd sizes.
    write_video(&dir.join("odd.gif"), &shapes_clip(65, 33, 2, 8.0, 0)).unwrap();
    write_video(&dir.join("odd"), &shapes_clip(65, 33, 2, 8.0, 0)).unwrap();
}

#[test]
fn tiny_mp4_is_a_clear_error() {
    let p = scratch("err_tiny").join("tiny.mp4");
    let msg = err_text(write_video(&p, &shapes_clip(8, 8, 2, 8.0, 0)));
    assert!(
        msg.contains("tiny.mp4: 8x8") && msg.contains(">= 16"),
        "{msg}"
    );
}

#[test]
fn missing_inputs() {
    let dir = scratch("err_missing");
    let msg = err_text(read_video(&dir.join("clip")));
    assert!(msg.contains("clip: does not exist"), "{msg}");
    assert!(msg.contains("directory of frame_NNN.png"), "{msg}");
    let msg = err_text(read_video(&dir.join("gone.mp4")));
    assert!(msg.contains("gone.mp4: does not exist"), "{msg}");
    let msg = err_text(read_image(&dir.join("gone.png")));
    assert!(msg.contains("gone.png: cannot read file"), "{msg}");
}

#[test]
fn empty_and_gappy_directories() {
    let dir = scratch("err_dirs");
    let empty = dir.join("clip");
    std::fs::create_dir_all(&empty).unwrap();
    let msg = err_text(read_video(&empty));
    assert!(msg.contains("clip/: no frame_000.png"), "{msg}");

    let gappy = dir.join("gappy");
    write_video(&gappy, &shapes_clip(16, 16, 5, 8.0, 0)).unwrap();
    std::fs::remove_file(gappy.join("frame_002.png")).unwrap();
    let msg = err_text(read_video(&gappy));
    assert!(msg.contains("gappy/: no frame_002.png"), "{msg}");
    assert!(msg.contains("without gaps"), "{msg}");

    let dup = dir.join("dup");
    write_video(&dup, &shapes_clip(16, 16, 2, 8.0, 0)).unwrap();
    std::fs::copy(dup.join("frame_001.png"), dup.join("frame_01.png")).unwrap();
    let msg = err_text(read_video(&dup));
    assert!(msg.contains("are both frame 1"), "{msg}");
}

#[test]
fn empty_video_and_bad_fields() {
    let dir = scratch("err_fields");
    for name in ["a.mp4", "a.gif", "a"] {
        let p = dir.join(name);
        let empty = Video {
            width: 64,
            height: 64,
            fps: 8.0,
            frames: vec![],
        };
        let msg = err_text(write_video(&p, &empty));
        assert!(
            msg.contains(&format!("{name}: the video has no frames")),
            "{msg}"
        );

        let mut clip = shapes_clip(64, 64, 5, 8.0, 0);
        clip.frames[3].truncate(64 * 32 * 3);
        let msg = err_text(write_video(&p, &clip));
        assert!(
            msg.contains(&format!(
                "{name}: frame 3 is 6144 bytes, expected 12288 bytes (64x64 RGB8)"
            )),
            "{msg}"
        );

        for fps in [0.0, -1.0, f32::NAN, f32::INFINITY] {
            let clip = Video {
                fps,
                ..shapes_clip(16, 16, 1, 8.0, 0)
            };
            let msg = err_text(write_video(&p, &clip));
            assert!(
                msg.contains("is out of range; expected 0.01..=1000 frames per second"),
                "{msg}"
            );
        }
        let zero = Video {
            width: 0,
            height: 4,
            fps: 8.0,
            frames: vec![vec![]],
        };
        let msg = err_text(write_video(&p, &zero));
        assert!(msg.contains("size 0x4 is empty"), "{msg}");
    }
}

#[test]
fn mismatched_png_frame_sizes() {
    let dir = scratch("err_png_sizes").join("clip");
    write_video(&dir, &shapes_clip(64, 64, 5, 8.0, 0)).unwrap();
    image::RgbImage::new(64, 32)
        .save(dir.join("frame_003.png"))
        .unwrap();
    let msg = err_text(read_video(&dir));
    assert!(
        msg.contains("frame_003.png: frame 3 is 64x32, expected 64x64"),
        "{msg}"
    );
}

#[test]
fn unknown_and_corrupt_files() {
    let dir = scratch("err_unknown");
    let avi = dir.join("clip.avi");
    std::fs::write(&avi, b"RIFF....AVI LIST").unwrap();
    let msg = err_text(read_video(&avi));
    assert!(
        msg.contains("clip.avi: unsupported video format .avi"),
        "{msg}"
    );
    let msg = err_text(write_video(
        &dir.join("out.webm"),
        &shapes_clip(16, 16, 1, 8.0, 0),
    ));
    assert!(
        msg.contains("out.webm: cannot write .webm files; expected .mp4, .gif"),
        "{msg}"
    );

    // Garbage and truncated files with the right extensions fail cleanly.
    let bad = dir.join("bad.mp4");
    std::fs::write(&bad, b"\0\0\0\x08junkjunkjunk").unwrap();
    let msg = err_text(read_video(&bad));
    assert!(
        msg.starts_with(&format!("{}: invalid MP4", bad.display())),
        "{msg}"
    );
    let good = dir.join("good.mp4");
    write_video(&good, &shapes_clip(32, 32, 4, 8.0, 0)).unwrap();
    let bytes = std::fs::read(&good).unwrap();
    for cut in [bytes.len() / 3, bytes.len() - 10] {
        std::fs::write(&bad, &bytes[..cut]).unwrap();
        let msg = err_text(read_video(&bad));
        assert!(msg.starts_with(&bad.display().to_string()), "{msg}");
    }
    let gif = dir.join("bad.gif");
    std::fs::write(&gif, b"GIF89a\x01").unwrap();
    let msg = err_text(read_video(&gif));
    assert!(msg.contains("bad.gif: invalid GIF"), "{msg}");
    let png_dir = dir.join("pngs");
    std::fs::create_dir_all(&png_dir).unwrap();
    std::fs::write(png_dir.join("frame_000.png"), b"\x89PNG\r\n\x1a\nxx").unwrap();
    let msg = err_text(read_video(&png_dir));
    assert!(msg.contains("frame_000.png: invalid PNG"), "{msg}");

    // Content sniffing: an MP4 without its extension still reads.
    let renamed = dir.join("clip.bin");
    std::fs::copy(&good, &renamed).unwrap();
    assert_eq!(read_video(&renamed).unwrap().frames.len(), 4);

    // read_image takes PNG and JPEG only.
    write_video(&dir.join("anim.gif"), &shapes_clip(16, 16, 2, 8.0, 0)).unwrap();
    let msg = err_text(read_image(&dir.join("anim.gif")));
    assert!(
        msg.contains("anim.gif: is a Gif image; expected a PNG or JPEG image"),
        "{msg}"
    );
    let msg = err_text(read_image(&avi));
    assert!(msg.contains("unknown file signature"), "{msg}");
}
