//! Looping GIF in and out.
//!
//! Writing is lossless whenever the clip uses at most 256 distinct colours in total (one global
//! palette) or per frame (a local palette per frame), which covers flat-colour synthetic clips;
//! frames with more colours are quantised with NeuQuant (the `gif` crate's `from_rgb_speed`),
//! which is lossy.
//!
//! GIF frame delays are whole hundredths of a second, so the delay is
//! `round(100 / fps)` centiseconds, at least 2: most browsers replace delays of 0 or 1 cs with
//! 10 cs. A clip written at 8 fps therefore gets 13 cs per frame and reads back at
//! 100 / 13 = 7.69 fps; rates that divide 100 (1, 2, 4, 5, 10, 20, 25, 50 fps) survive exactly.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, BufWriter};
use std::path::Path;

use gif::{ColorOutput, DecodeOptions, DisposalMethod, Encoder, Frame, Repeat};

use crate::error::VideoError;
use crate::Video;

/// The GIF delay, in centiseconds, used for `fps` (see the module docs for the rounding).
pub fn gif_delay_cs(fps: f32) -> u16 {
    (100.0 / fps as f64).round().clamp(2.0, u16::MAX as f64) as u16
}

/// Builds a palette (RGB triplets) and index buffer if `pixels` (RGB8) use at most 256 colours.
fn exact_palette<'a>(
    frames: impl Iterator<Item = &'a [u8]>,
) -> Option<(Vec<u8>, HashMap<u32, u8>)> {
    let mut map: HashMap<u32, u8> = HashMap::new();
    let mut palette = Vec::new();
    for frame in frames {
        for px in frame.chunks_exact(3) {
            let key = u32::from_be_bytes([0, px[0], px[1], px[2]]);
            if !map.contains_key(&key) {
                if map.len() == 256 {
                    return None;
                }
                map.insert(key, (map.len()) as u8);
                palette.extend_from_slice(px);
            }
        }
    }
    Some((palette, map))
}

fn indices(frame: &[u8], map: &HashMap<u32, u8>) -> Vec<u8> {
    frame
        .chunks_exact(3)
        .map(|px| map[&u32::from_be_bytes([0, px[0], px[1], px[2]])])
        .collect()
}

pub(crate) fn write(path: &Path, video: &Video) -> Result<(), VideoError> {
    let (w, h) = (video.width, video.height);
    if w > u16::MAX as u32 || h > u16::MAX as u32 {
        return Err(VideoError::invalid(
            path,
            format!("{w}x{h} is too large for GIF; expected at most 65535x65535"),
        ));
    }
    let (w16, h16) = (w as u16, h as u16);
    let gif_err = |e: gif::EncodingError| VideoError::format(path, "GIF (while writing)", e);
    let file = File::create(path).map_err(|e| VideoError::io(path, "create file", e))?;
    let delay = gif_delay_cs(video.fps);

    let global = exact_palette(video.frames.iter().map(|f| f.as_slice()));
    let global_palette: &[u8] = global.as_ref().map_or(&[], |(p, _)| p.as_slice());
    let mut encoder =
        Encoder::new(BufWriter::new(file), w16, h16, global_palette).map_err(gif_err)?;
    encoder.set_repeat(Repeat::Infinite).map_err(gif_err)?;
    for frame in &video.frames {
        let mut out = match &global {
            Some((_, map)) => Frame {
                width: w16,
                height: h16,
                buffer: indices(frame, map).into(),
                ..Frame::default()
            },
            None => match exact_palette(std::iter::once(frame.as_slice())) {
                Some((palette, map)) => Frame {
                    width: w16,
                    height: h16,
                    buffer: indices(frame, &map).into(),
                    palette: Some(palette),
                    ..Frame::default()
                },
                None => Frame::from_rgb_speed(w16, h16, frame, 1),
            },
        };
        out.delay = delay;
        out.dispose = DisposalMethod::Keep;
        encoder.write_frame(&out).map_err(gif_err)?;
    }
    let mut writer = encoder.into_inner().map_err(gif_err)?;
    std::io::Write::flush(&mut writer).map_err(|e| VideoError::io(path, "write file", e))
}

/// Reads every frame composited onto the logical screen, as a browser shows it: each frame is
/// drawn over the canvas left by the previous one after applying that one's disposal method
/// (keep, restore to background = transparent, restore to previous). Pixels never painted (or
/// cleared to transparent) come out black. fps = 100 / mean delay, with delays of 0 or 1 cs
/// counted as 10 cs (the browser convention).
pub(crate) fn read(path: &Path) -> Result<Video, VideoError> {
    let file = File::open(path).map_err(|e| VideoError::io(path, "open file", e))?;
    let gif_err = |e: gif::DecodingError| VideoError::format(path, "GIF", e);
    let mut options = DecodeOptions::new();
    options.set_color_output(ColorOutput::RGBA);
    let mut decoder = options.read_info(BufReader::new(file)).map_err(gif_err)?;
    let (cw, ch) = (decoder.width() as usize, decoder.height() as usize);
    let mut canvas = vec![0u8; cw * ch * 4];
    let mut saved: Option<Vec<u8>> = None;
    // Disposal of the previous frame: method and rectangle (left, top, width, height).
    let mut pending: Option<(DisposalMethod, (usize, usize, usize, usize))> = None;
    let mut frames = Vec::new();
    let mut total_delay = 0u64;

    while let Some(frame) = decoder.read_next_frame().map_err(gif_err)? {
        match pending.take() {
            Some((DisposalMethod::Background, (l, t, fw, fh))) => {
                for y in t..(t + fh).min(ch) {
                    let row = y * cw * 4;
                    canvas[row + l.min(cw) * 4..row + (l + fw).min(cw) * 4].fill(0);
                }
            }
            Some((DisposalMethod::Previous, _)) => {
                if let Some(s) = saved.take() {
                    canvas = s;
                }
            }
            _ => {}
        }
        let (l, t) = (frame.left as usize, frame.top as usize);
        let (fw, fh) = (frame.width as usize, frame.height as usize);
        if frame.dispose == DisposalMethod::Previous {
            saved = Some(canvas.clone());
        }
        for y in 0..fh {
            let cy = t + y;
            if cy >= ch {
                break;
            }
            for x in 0..fw {
                let cx = l + x;
                if cx >= cw {
                    break;
                }
                let src = &frame.buffer[(y * fw + x) * 4..(y * fw + x) * 4 + 4];
                if src[3] != 0 {
                    canvas[(cy * cw + cx) * 4..(cy * cw + cx) * 4 + 4].copy_from_slice(src);
                }
            }
        }
        pending = Some((frame.dispose, (l, t, fw, fh)));
        total_delay += if frame.delay <= 1 {
            10
        } else {
            frame.delay as u64
        };
        let mut rgb = Vec::with_capacity(cw * ch * 3);
        for px in canvas.chunks_exact(4) {
            if px[3] == 0 {
                rgb.extend_from_slice(&[0, 0, 0]);
            } else {
                rgb.extend_from_slice(&px[..3]);
            }
        }
        frames.push(rgb);
    }
    if frames.is_empty() {
        return Err(VideoError::format(path, "GIF", "the file has no frames"));
    }
    let fps = (100.0 * frames.len() as f64 / total_delay as f64) as f32;
    Ok(Video {
        width: cw as u32,
        height: ch as u32,
        fps,
        frames,
    })
}
