//! Still images and cover-and-crop resizing.

mod common;

use common::{scratch, shapes_clip};
use vdit_video::{fit, fit_video, psnr, read_image, Image};

fn flat(w: u32, h: u32, rgb: [u8; 3]) -> Image {
    Image {
        width: w,
        height: h,
        data: rgb
            .iter()
            .copied()
            .cycle()
            .take((w * h * 3) as usize)
            .collect(),
    }
}

#[test]
fn reads_png_exactly_and_jpeg_closely() {
    let dir = scratch("image_read");
    let clip = shapes_clip(48, 32, 1, 8.0, 2);
    let img = image::RgbImage::from_raw(48, 32, clip.frames[0].clone()).unwrap();
    img.save(dir.join("a.png")).unwrap();
    let back = read_image(&dir.join("a.png")).unwrap();
    assert_eq!((back.width, back.height), (48, 32));
    assert_eq!(back.data, clip.frames[0]);

    let mut jpeg = Vec::new();
    image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 95)
        .encode_image(&img)
        .unwrap();
    // The extension is ignored: the content decides.
    std::fs::write(dir.join("b.data"), &jpeg).unwrap();
    let back = read_image(&dir.join("b.data")).unwrap();
    assert_eq!((back.width, back.height), (48, 32));
    let q = psnr(&back.data, &clip.frames[0]);
    assert!(q > 30.0, "JPEG q95 PSNR {q:.2}");
}

#[test]
fn same_size_is_untouched() {
    let img = flat(64, 64, [1, 2, 3]);
    let (out, msg) = fit(&img, 64, 64);
    assert_eq!(out, img);
    assert_eq!(msg, None);
}

#[test]
fn wide_image_is_scaled_to_cover_and_centre_cropped() {
    // 100x50: left 25 columns red, middle 50 green, right 25 blue. Covering 64x64 scales by
    // 1.28 and crops the middle 50x50 of the source: all green.
    let mut data = Vec::new();
    for _ in 0..50 {
        for x in 0..100 {
            data.extend_from_slice(match x {
                0..25 => &[255, 0, 0],
                25..75 => &[0, 255, 0],
                _ => &[0, 0, 255],
            });
        }
    }
    let img = Image {
        width: 100,
        height: 50,
        data,
    };
    let (out, msg) = fit(&img, 64, 64);
    let msg = msg.expect("a message when the size changes");
    assert_eq!(
        msg,
        "image resized from 100x50 to 64x64: upscaled by 1.280 to cover, centre-cropped the source by 25 px left and 25 px right"
    );
    assert_eq!(
        (out.width, out.height, out.data.len()),
        (64, 64, 64 * 64 * 3)
    );
    assert_eq!(out, flat(64, 64, [0, 255, 0]));
}

#[test]
fn tall_image_crops_top_and_bottom_and_downscales_flat_colour_exactly() {
    let img = flat(40, 100, [10, 20, 30]);
    let (out, msg) = fit(&img, 20, 20);
    assert_eq!(out, flat(20, 20, [10, 20, 30]));
    let msg = msg.unwrap();
    assert!(
        msg.contains("downscaled by 0.500") && msg.contains("30 px top and 30 px bottom"),
        "{msg}"
    );

    // Same aspect: no crop.
    let (out, msg) = fit(&flat(128, 96, [5, 6, 7]), 64, 48);
    assert_eq!(out, flat(64, 48, [5, 6, 7]));
    assert!(msg.unwrap().contains("no crop needed"));
}

#[test]
fn a_half_and_half_image_keeps_its_edge_in_the_middle() {
    // 32x32, left half black, right half white, to 16x16: left columns dark, right bright.
    let mut data = Vec::new();
    for _ in 0..32 {
        for x in 0..32 {
            data.extend_from_slice(if x < 16 { &[0, 0, 0] } else { &[255, 255, 255] });
        }
    }
    let (out, _) = fit(
        &Image {
            width: 32,
            height: 32,
            data,
        },
        16,
        16,
    );
    for y in 0..16 {
        let px = |x: usize| out.data[(y * 16 + x) * 3];
        assert!(
            px(0) < 5 && px(6) < 5 && px(9) > 250 && px(15) > 250,
            "row {y}"
        );
    }
}

#[test]
fn fit_video_applies_one_crop_to_all_frames() {
    let clip = shapes_clip(96, 64, 3, 8.0, 0);
    let (out, msg) = fit_video(&clip, 64, 64);
    assert_eq!(
        (out.width, out.height, out.frames.len(), out.fps),
        (64, 64, 3, 8.0)
    );
    assert!(out.frames.iter().all(|f| f.len() == 64 * 64 * 3));
    assert!(msg.unwrap().starts_with("video resized from 96x64 to 64x64: kept the scale to cover, centre-cropped the source by 16 px left and 16 px right"));
    // No scaling: the crop is the exact middle 64 columns.
    for (f, g) in clip.frames.iter().zip(&out.frames) {
        for y in 0..64 {
            assert_eq!(
                &g[y * 64 * 3..(y + 1) * 64 * 3],
                &f[(y * 96 + 16) * 3..(y * 96 + 80) * 3]
            );
        }
    }
    let (same, none) = fit_video(&clip, 96, 64);
    assert_eq!((same, none), (clip, None));
}

#[test]
fn degenerate_inputs_do_not_panic() {
    let (out, msg) = fit(&flat(4, 4, [1, 1, 1]), 0, 8);
    assert_eq!(out.data.len(), 0);
    assert!(msg.unwrap().contains("target size 0x8 is empty"));
    let broken = Image {
        width: 4,
        height: 4,
        data: vec![0; 5],
    };
    let (out, msg) = fit(&broken, 8, 8);
    assert_eq!(out.data.len(), 8 * 8 * 3);
    assert!(msg.unwrap().contains("has 5 bytes, expected 48"));
    let mut clip = shapes_clip(16, 16, 2, 8.0, 0);
    clip.frames[1].pop();
    let (out, msg) = fit_video(&clip, 8, 8);
    assert_eq!(out.frames.len(), 2);
    assert!(msg.unwrap().contains("video frame 1 16x16 has 767 bytes"));
}
