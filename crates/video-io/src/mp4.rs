//! MP4 with one H.264 video track, from crates only: openh264 (built from source) encodes and
//! decodes, the `mp4` crate writes and reads the boxes.
//!
//! Written files are what browsers play: an `avc1` sample entry whose `avcC` carries the SPS and
//! PPS (stripped from the samples), 4-byte NAL length prefixes, constrained-baseline H.264
//! (no B-frames, so decode order = presentation order and no `ctts`/edit list is needed),
//! yuv420p in BT.601 limited range signalled in the SPS VUI, a media timescale of
//! `round(fps * 1000)` ticks per second with every sample lasting 1000 ticks (so 8 fps is
//! exactly 8000/1000 and 29.97 fps exactly 29970/1000), and the `moov` box moved in front of
//! `mdat` ("faststart") so a browser can start playing before the whole file has arrived.

use std::io::Cursor;
use std::path::Path;

use mp4::{
    AvcConfig, MediaConfig, MediaType, Mp4Config, Mp4Reader, Mp4Sample, Mp4Writer, TrackConfig,
    TrackType, WriteBox,
};
use openh264::decoder::{Decoder, DecoderConfig, Flush};
use openh264::encoder::{
    BitRate, Complexity, Encoder, EncoderConfig, FrameRate, FrameType, IntraFramePeriod, Profile,
    QpRange, RateControlMode, UsageType, VuiConfig,
};
use openh264::formats::{YUVBuffer, YUVSource};
use openh264::OpenH264API;

use crate::error::{DisplayPath, VideoError};
use crate::yuv::{i420_to_rgb, rgb_to_i420, I420};
use crate::Video;

/// H.264 encoder settings for [`crate::write_video_with`].
///
/// openh264's default rate control let the quantiser float up to 42 (STACK.md measured 25 dB
/// PSNR on a 64x64 clip); here every frame is coded at one fixed quantiser (buffer-based rate
/// control with min = max QP, frame skipping off, so the frame count is always preserved).
/// QP 12 is the lowest openh264 accepts with rate control on. On 64x64 Shapes-World-like clips
/// (17 frames, 8 fps) it gives 42-44 dB PSNR through [`crate::read_video`] for about 13 kbit/s;
/// QP 20 gives 38.7-40.8 dB. (Standard players, which upsample chroma without luma guidance,
/// show about 30 dB on such clips: the yuv420p limit, not the codec's.)
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct H264Options {
    /// Quantiser for every frame, `MIN_QP..=51` (lower is better quality and bigger files).
    pub qp: u8,
    /// An IDR (key) frame every this many seconds (at least every frame), for seeking.
    pub keyframe_seconds: f32,
}

/// The lowest quantiser openh264 honours with rate control on (it clamps lower values).
pub const MIN_QP: u8 = 12;

impl Default for H264Options {
    fn default() -> Self {
        H264Options {
            qp: MIN_QP,
            keyframe_seconds: 2.0,
        }
    }
}

/// Splits an Annex-B buffer (what openh264 emits) into NAL units without start codes.
fn annexb_nals(buf: &[u8]) -> Vec<&[u8]> {
    let mut starts = Vec::new(); // (start of the start code, start of the payload)
    let mut i = 0;
    while i + 3 <= buf.len() {
        if buf[i] == 0 && buf[i + 1] == 0 && buf[i + 2] == 1 {
            let code_start = if i > 0 && buf[i - 1] == 0 { i - 1 } else { i };
            starts.push((code_start, i + 3));
            i += 3;
        } else {
            i += 1;
        }
    }
    let mut nals = Vec::with_capacity(starts.len());
    for (k, &(_, payload)) in starts.iter().enumerate() {
        let end = starts.get(k + 1).map_or(buf.len(), |&(code, _)| code);
        if end > payload {
            nals.push(&buf[payload..end]);
        }
    }
    nals
}

const NAL_IDR: u8 = 5;
const NAL_SPS: u8 = 7;
const NAL_PPS: u8 = 8;
const NAL_AUD: u8 = 9;

/// The media timescale and per-sample duration for `fps` (see the module docs).
pub(crate) fn timing(fps: f32) -> (u32, u32) {
    let ticks = (fps as f64 * 1000.0).round() as u32;
    (ticks, 1000)
}

pub(crate) fn write(path: &Path, video: &Video, opts: &H264Options) -> Result<(), VideoError> {
    let (w, h) = (video.width, video.height);
    for (axis, value) in [("width", w), ("height", h)] {
        if value % 2 == 1 {
            return Err(VideoError::OddSize {
                path: DisplayPath::file(path),
                axis,
                value,
                suggest_w: w & !1,
                suggest_h: h & !1,
            });
        }
    }
    if w < 16 || h < 16 {
        return Err(VideoError::invalid(
            path,
            format!("{w}x{h} is smaller than openh264 encodes; expected width and height >= 16"),
        ));
    }
    if w > 3840 || h > 3840 || w.min(h) > 2160 {
        return Err(VideoError::invalid(
            path,
            format!("{w}x{h} is too large for openh264; expected at most 3840x2160 (or 2160x3840)"),
        ));
    }
    if !(MIN_QP..=51).contains(&opts.qp) {
        return Err(VideoError::invalid(
            path,
            format!(
                "H.264 QP {} is out of range; expected {MIN_QP}..=51",
                opts.qp
            ),
        ));
    }
    if !(opts.keyframe_seconds.is_finite() && opts.keyframe_seconds >= 0.0) {
        return Err(VideoError::invalid(
            path,
            format!(
                "keyframe interval {} s is invalid; expected a finite number >= 0",
                opts.keyframe_seconds
            ),
        ));
    }
    let fps = video.fps;
    // Buffer-based rate control ignores the bitrate for QP decisions, but openh264 validates
    // it against the level limits: keep it plausible (1 bit per pixel, capped at 200 Mbit/s).
    let bitrate = (w as f64 * h as f64 * fps as f64).clamp(64_000.0, 200e6) as u32;
    let keyframe_every = ((opts.keyframe_seconds * fps).round() as u32).max(1);
    let config = EncoderConfig::new()
        .profile(Profile::Baseline)
        .usage_type(UsageType::CameraVideoRealTime)
        .rate_control_mode(RateControlMode::Bufferbased)
        .bitrate(BitRate::from_bps(bitrate))
        .qp(QpRange::new(opts.qp, opts.qp))
        .max_frame_rate(FrameRate::from_hz(fps))
        .skip_frames(false)
        .complexity(Complexity::High)
        .adaptive_quantization(false)
        .background_detection(false)
        .scene_change_detect(false)
        .intra_frame_period(IntraFramePeriod::from_num_frames(keyframe_every))
        .num_threads(1)
        .vui(VuiConfig::bt601());
    let mut encoder = Encoder::with_api_config(OpenH264API::from_source(), config)
        .map_err(|e| VideoError::codec(path, "encoder setup", None, e))?;

    let (timescale, delta) = timing(fps);
    let mut sps: Option<Vec<u8>> = None;
    let mut pps: Option<Vec<u8>> = None;
    let mut samples: Vec<(Vec<u8>, bool)> = Vec::with_capacity(video.frames.len());
    let mut annexb = Vec::new();
    for (i, frame) in video.frames.iter().enumerate() {
        let yuv = YUVBuffer::from_vec(
            rgb_to_i420(frame, w as usize, h as usize),
            w as usize,
            h as usize,
        );
        let stream = encoder
            .encode(&yuv)
            .map_err(|e| VideoError::codec(path, "encoding", Some(i), e))?;
        if matches!(stream.frame_type(), FrameType::Skip | FrameType::Invalid) {
            return Err(VideoError::codec(
                path,
                "encoding",
                Some(i),
                format!(
                    "encoder returned a {:?} frame instead of a picture",
                    stream.frame_type()
                ),
            ));
        }
        annexb.clear();
        stream.write_vec(&mut annexb);
        let mut sample = Vec::with_capacity(annexb.len() + 16);
        let mut is_sync = false;
        for nal in annexb_nals(&annexb) {
            match nal[0] & 0x1f {
                NAL_SPS => {
                    if sps.as_deref().is_some_and(|s| s != nal) {
                        return Err(VideoError::codec(
                            path,
                            "encoding",
                            Some(i),
                            "the SPS changed mid-stream",
                        ));
                    }
                    sps = Some(nal.to_vec());
                }
                NAL_PPS => {
                    if pps.as_deref().is_some_and(|p| p != nal) {
                        return Err(VideoError::codec(
                            path,
                            "encoding",
                            Some(i),
                            "the PPS changed mid-stream",
                        ));
                    }
                    pps = Some(nal.to_vec());
                }
                NAL_AUD => {}
                t => {
                    is_sync |= t == NAL_IDR;
                    sample.extend_from_slice(&(nal.len() as u32).to_be_bytes());
                    sample.extend_from_slice(nal);
                }
            }
        }
        if sample.is_empty() {
            return Err(VideoError::codec(
                path,
                "encoding",
                Some(i),
                "encoder produced no picture data",
            ));
        }
        samples.push((sample, is_sync));
    }
    let (Some(sps), Some(pps)) = (sps, pps) else {
        return Err(VideoError::codec(
            path,
            "encoding",
            None,
            "encoder produced no SPS/PPS",
        ));
    };
    if !samples[0].1 {
        return Err(VideoError::codec(
            path,
            "encoding",
            Some(0),
            "first frame is not an IDR picture",
        ));
    }

    let bytes = mux(&sps, &pps, w, h, timescale, delta, samples)
        .map_err(|e| VideoError::format(path, "MP4 (while writing)", e))?;
    std::fs::write(path, bytes).map_err(|e| VideoError::io(path, "write file", e))
}

fn fourcc(s: &str) -> mp4::FourCC {
    let b = s.as_bytes();
    mp4::FourCC::from([b[0], b[1], b[2], b[3]])
}

/// Writes ftyp + moov + mdat into memory.
fn mux(
    sps: &[u8],
    pps: &[u8],
    w: u32,
    h: u32,
    timescale: u32,
    delta: u32,
    samples: Vec<(Vec<u8>, bool)>,
) -> mp4::Result<Vec<u8>> {
    let config = Mp4Config {
        major_brand: fourcc("isom"),
        minor_version: 512,
        compatible_brands: ["isom", "iso2", "avc1", "mp41"].map(fourcc).to_vec(),
        // Movie timescale = media timescale so track and movie durations are exact.
        timescale,
    };
    let mut writer = Mp4Writer::write_start(Cursor::new(Vec::new()), &config)?;
    writer.add_track(&TrackConfig {
        track_type: TrackType::Video,
        timescale,
        language: "und".to_string(),
        media_conf: MediaConfig::AvcConfig(AvcConfig {
            width: w as u16,
            height: h as u16,
            seq_param_set: sps.to_vec(),
            pic_param_set: pps.to_vec(),
        }),
    })?;
    for (i, (bytes, is_sync)) in samples.into_iter().enumerate() {
        writer.write_sample(
            1,
            &Mp4Sample {
                start_time: i as u64 * delta as u64,
                duration: delta,
                rendering_offset: 0,
                is_sync,
                bytes: bytes.into(),
            },
        )?;
    }
    writer.write_end()?;
    let file = writer.into_writer().into_inner();
    faststart(file)
}

/// Moves `moov` in front of `mdat` (shifting the chunk offsets) and fixes two fields the `mp4`
/// crate leaves at audio-ish defaults: track flags (enabled | in movie) and volume (0 for video).
fn faststart(file: Vec<u8>) -> mp4::Result<Vec<u8>> {
    let size = file.len() as u64;
    let reader = Mp4Reader::read_header(Cursor::new(&file), size)?;
    let ftyp_size = {
        let mut probe = Vec::new();
        reader.ftyp.write_box(&mut probe)?;
        probe.len()
    };
    // A 32-bit mdat size (the writer uses the 64-bit form only past 4 GiB: keep such files as
    // they are, moov last).
    let mdat_len = match file.get(ftyp_size..ftyp_size + 4) {
        Some(b) => u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize,
        None => return Ok(file),
    };
    if mdat_len < 8 {
        return Ok(file);
    }
    let Some(mdat) = file.get(ftyp_size..ftyp_size + mdat_len) else {
        return Ok(file);
    };
    let mut moov = reader.moov.clone();
    let moov_size = mp4::Mp4Box::box_size(&moov);
    moov.mvhd.next_track_id = moov.traks.len() as u32 + 1;
    for trak in &mut moov.traks {
        trak.tkhd.flags = 0x3;
        trak.tkhd.volume = mp4::FixedPointU8::new(0);
        let stbl = &mut trak.mdia.minf.stbl;
        if let Some(stco) = stbl.stco.as_mut() {
            for off in &mut stco.entries {
                let moved = *off as u64 + moov_size;
                if moved > u32::MAX as u64 {
                    // Too big to shift within 32-bit offsets: keep the original layout.
                    return Ok(file);
                }
                *off = moved as u32;
            }
        }
        if let Some(co64) = stbl.co64.as_mut() {
            for off in &mut co64.entries {
                *off += moov_size;
            }
        }
    }
    let mut out = Vec::with_capacity(file.len());
    reader.ftyp.write_box(&mut out)?;
    moov.write_box(&mut out)?;
    debug_assert_eq!(out.len() as u64, ftyp_size as u64 + moov_size);
    out.extend_from_slice(mdat);
    Ok(out)
}

pub(crate) fn read(path: &Path) -> Result<Video, VideoError> {
    let data = std::fs::read(path).map_err(|e| VideoError::io(path, "read file", e))?;
    let len = data.len() as u64;
    let mut reader = Mp4Reader::read_header(Cursor::new(&data), len)
        .map_err(|e| VideoError::format(path, "MP4", e))?;
    let mut ids: Vec<u32> = reader.tracks().keys().copied().collect();
    ids.sort_unstable();
    let track_id = ids
        .iter()
        .copied()
        .find(|id| matches!(reader.tracks()[id].media_type(), Ok(MediaType::H264)))
        .ok_or_else(|| {
            let found: Vec<String> = ids
                .iter()
                .map(|id| match reader.tracks()[id].media_type() {
                    Ok(t) => format!("{t}"),
                    Err(_) => "unknown".to_string(),
                })
                .collect();
            VideoError::Unsupported {
                path: DisplayPath::file(path),
                what: format!(
                    "no H.264 video track (tracks found: [{}])",
                    found.join(", ")
                ),
                expected: "an MP4 with an avc1 (H.264) video track",
            }
        })?;
    let track = &reader.tracks()[&track_id];
    let (w, h) = (track.width() as u32, track.height() as u32);
    let timescale = track.timescale();
    let n = track.sample_count();
    let avc1 = track
        .trak
        .mdia
        .minf
        .stbl
        .stsd
        .avc1
        .as_ref()
        .expect("media_type H264 implies avc1");
    let length_size = (avc1.avcc.length_size_minus_one & 3) as usize + 1;
    let mut headers = Vec::new();
    for ps in avc1
        .avcc
        .sequence_parameter_sets
        .iter()
        .chain(&avc1.avcc.picture_parameter_sets)
    {
        headers.extend_from_slice(&[0, 0, 0, 1]);
        headers.extend_from_slice(&ps.bytes);
    }
    let total_ticks: u64 = track
        .trak
        .mdia
        .minf
        .stbl
        .stts
        .entries
        .iter()
        .map(|e| e.sample_count as u64 * e.sample_delta as u64)
        .sum();
    if n == 0 {
        return Err(VideoError::format(
            path,
            "MP4",
            "the H.264 track has no samples",
        ));
    }
    if total_ticks == 0 || timescale == 0 {
        return Err(VideoError::format(
            path,
            "MP4",
            format!(
                "track duration is {total_ticks} ticks at timescale {timescale}; cannot derive fps"
            ),
        ));
    }
    let fps = (n as f64 * timescale as f64 / total_ticks as f64) as f32;

    let mut decoder = Decoder::with_api_config(
        OpenH264API::from_source(),
        DecoderConfig::new().flush_after_decode(Flush::NoFlush),
    )
    .map_err(|e| VideoError::codec(path, "decoder setup", None, e))?;
    let mut frames = Vec::with_capacity(n as usize);
    let mut packet = Vec::new();
    let take = |img: &openh264::decoder::DecodedYUV<'_>, frames: &mut Vec<Vec<u8>>| {
        let (dw, dh) = img.dimensions();
        if (dw as u32, dh as u32) != (w, h) {
            return Err(VideoError::FrameMismatch {
                path: DisplayPath::file(path),
                index: frames.len(),
                found: format!("{dw}x{dh} after decoding"),
                expected: format!("{w}x{h} (the avc1 sample entry's size)"),
            });
        }
        let (ys, us, _) = img.strides();
        let mut rgb = Vec::with_capacity((w * h * 3) as usize);
        let pic = I420 {
            y: img.y(),
            u: img.u(),
            v: img.v(),
            y_stride: ys,
            uv_stride: us,
        };
        if !pic.fits(w as usize, h as usize) {
            return Err(VideoError::codec(
                path,
                "decoding",
                Some(frames.len()),
                format!("decoder returned planes too short for {w}x{h}"),
            ));
        }
        i420_to_rgb(&pic, w as usize, h as usize, &mut rgb);
        frames.push(rgb);
        Ok(())
    };
    for i in 1..=n {
        let sample = reader
            .read_sample(track_id, i)
            .map_err(|e| VideoError::format(path, "MP4", format!("sample {}: {e}", i - 1)))?
            .ok_or_else(|| {
                VideoError::format(path, "MP4", format!("sample {} is missing", i - 1))
            })?;
        packet.clear();
        if i == 1 {
            packet.extend_from_slice(&headers);
        }
        let mut rest: &[u8] = &sample.bytes;
        while !rest.is_empty() {
            if rest.len() < length_size {
                return Err(VideoError::format(
                    path,
                    "MP4",
                    format!("sample {} has a truncated NAL length", i - 1),
                ));
            }
            let nal_len = rest[..length_size]
                .iter()
                .fold(0usize, |acc, &b| (acc << 8) | b as usize);
            rest = &rest[length_size..];
            if nal_len > rest.len() {
                return Err(VideoError::format(
                    path,
                    "MP4",
                    format!(
                        "sample {} declares a {nal_len}-byte NAL but only {} bytes remain",
                        i - 1,
                        rest.len()
                    ),
                ));
            }
            packet.extend_from_slice(&[0, 0, 0, 1]);
            packet.extend_from_slice(&rest[..nal_len]);
            rest = &rest[nal_len..];
        }
        let decoded = decoder
            .decode(&packet)
            .map_err(|e| VideoError::codec(path, "decoding", Some(i as usize - 1), e))?;
        if let Some(img) = decoded {
            take(&img, &mut frames)?;
        }
    }
    let remaining = decoder
        .flush_remaining()
        .map_err(|e| VideoError::codec(path, "decoding", None, e))?;
    for img in &remaining {
        take(img, &mut frames)?;
    }
    if frames.len() != n as usize {
        return Err(VideoError::codec(
            path,
            "decoding",
            None,
            format!("got {} pictures from {n} samples", frames.len()),
        ));
    }
    Ok(Video {
        width: w,
        height: h,
        fps,
        frames,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn annexb_split_handles_3_and_4_byte_start_codes() {
        let buf = [
            0, 0, 0, 1, 0x67, 1, 2, 0, 0, 1, 0x68, 3, 0, 0, 0, 1, 0x65, 4, 5,
        ];
        let nals = annexb_nals(&buf);
        assert_eq!(
            nals,
            vec![&[0x67, 1, 2][..], &[0x68, 3][..], &[0x65, 4, 5][..]]
        );
    }

    #[test]
    fn timescale_is_exact_for_common_rates() {
        assert_eq!(timing(8.0), (8000, 1000));
        assert_eq!(timing(29.97), (29970, 1000));
        assert_eq!(timing(7.5), (7500, 1000));
    }
}
