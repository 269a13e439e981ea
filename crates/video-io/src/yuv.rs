//! RGB8 <-> I420 (yuv420p) with BT.601 coefficients in limited ("TV", 16-235 / 16-240) range,
//! the convention the MP4 writer signals in the SPS VUI (matrix/primaries/transfer = SMPTE 170M,
//! video_full_range_flag = 0) and the one ffmpeg and browsers assume for untagged SD H.264.
//!
//! Chroma is subsampled by averaging each 2x2 block (chroma sited at the block centre) and
//! reconstructed by bilinear interpolation between chroma sample centres (weights 3/4, 1/4, the
//! "fancy upsampling" of libjpeg), which suits that siting and halves the error at colour edges
//! compared with nearest-neighbour replication. All conversions round to nearest.

// Forward: Kr = 0.299, Kb = 0.114, luma scaled to 219 levels, chroma to 224 levels.
const KR: f32 = 0.299;
const KB: f32 = 0.114;
const KG: f32 = 1.0 - KR - KB;
const YS: f32 = 219.0 / 255.0;
const CS: f32 = 224.0 / 255.0;

/// Converts packed RGB8 (`w * h * 3` bytes, even `w` and `h`) into one I420 buffer laid out as
/// Y (`w * h`), U (`w/2 * h/2`), V (`w/2 * h/2`).
pub fn rgb_to_i420(rgb: &[u8], w: usize, h: usize) -> Vec<u8> {
    debug_assert!(w % 2 == 0 && h % 2 == 0 && rgb.len() == w * h * 3);
    let (cw, ch) = (w / 2, h / 2);
    let mut out = vec![0u8; w * h + 2 * cw * ch];
    let (y_plane, uv) = out.split_at_mut(w * h);
    let (u_plane, v_plane) = uv.split_at_mut(cw * ch);

    for (px, y) in rgb.chunks_exact(3).zip(y_plane.iter_mut()) {
        let (r, g, b) = (px[0] as f32, px[1] as f32, px[2] as f32);
        *y = to_u8(16.0 + YS * (KR * r + KG * g + KB * b));
    }
    // Chroma of the 2x2 average (the transform is linear, so averaging RGB first is exact).
    for cy in 0..ch {
        for cx in 0..cw {
            let mut sum = [0f32; 3];
            for (dy, dx) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
                let i = ((2 * cy + dy) * w + 2 * cx + dx) * 3;
                sum[0] += rgb[i] as f32;
                sum[1] += rgb[i + 1] as f32;
                sum[2] += rgb[i + 2] as f32;
            }
            let (r, g, b) = (sum[0] * 0.25, sum[1] * 0.25, sum[2] * 0.25);
            let luma = KR * r + KG * g + KB * b;
            u_plane[cy * cw + cx] = to_u8(128.0 + CS * 0.5 * (b - luma) / (1.0 - KB));
            v_plane[cy * cw + cx] = to_u8(128.0 + CS * 0.5 * (r - luma) / (1.0 - KR));
        }
    }
    out
}

/// Planes of an I420 picture with their row strides (decoder output is padded).
pub struct I420<'a> {
    pub y: &'a [u8],
    pub u: &'a [u8],
    pub v: &'a [u8],
    pub y_stride: usize,
    pub uv_stride: usize,
}

/// Converts an I420 picture of even size `w x h` into packed RGB8, appending `w * h * 3` bytes.
pub fn i420_to_rgb(pic: &I420<'_>, w: usize, h: usize, out: &mut Vec<u8>) {
    let (cw, ch) = (w / 2, h / 2);
    // Chroma upsampled to full resolution, one row at a time: horizontally first into two
    // neighbouring chroma rows, then blended vertically.
    let mut row_u = vec![[0f32; 2]; w];
    let mut row_v = vec![[0f32; 2]; w];
    out.reserve(w * h * 3);
    const YM: f32 = 255.0 / 219.0;
    const RV: f32 = 255.0 / 224.0 * 2.0 * (1.0 - KR);
    const BU: f32 = 255.0 / 224.0 * 2.0 * (1.0 - KB);
    const GU: f32 = -255.0 / 224.0 * 2.0 * (1.0 - KB) * KB / KG;
    const GV: f32 = -255.0 / 224.0 * 2.0 * (1.0 - KR) * KR / KG;
    for y in 0..h {
        // The chroma row whose centre is nearest, and the next-nearest neighbour.
        let c0 = y / 2;
        let c1 = neighbour(y, ch);
        for x in 0..w {
            let (a, b) = (x / 2, neighbour(x, cw));
            for (row, plane) in [(&mut row_u, pic.u), (&mut row_v, pic.v)] {
                let s = |cy: usize, cx: usize| plane[cy * pic.uv_stride + cx] as f32;
                row[x][0] = 0.75 * s(c0, a) + 0.25 * s(c0, b);
                row[x][1] = 0.75 * s(c1, a) + 0.25 * s(c1, b);
            }
        }
        let y_row = &pic.y[y * pic.y_stride..y * pic.y_stride + w];
        for x in 0..w {
            let l = YM * (y_row[x] as f32 - 16.0);
            let u = 0.75 * row_u[x][0] + 0.25 * row_u[x][1] - 128.0;
            let v = 0.75 * row_v[x][0] + 0.25 * row_v[x][1] - 128.0;
            out.push(to_u8(l + RV * v));
            out.push(to_u8(l + GU * u + GV * v));
            out.push(to_u8(l + BU * u));
        }
    }
}

/// For full-resolution coordinate `i`, the index of the second-nearest chroma sample centre
/// (centres sit at `2j + 0.5`), clamped at the borders.
#[inline]
fn neighbour(i: usize, n: usize) -> usize {
    let j = i / 2;
    if i % 2 == 0 {
        j.saturating_sub(1)
    } else {
        (j + 1).min(n - 1)
    }
}

#[inline]
fn to_u8(v: f32) -> u8 {
    v.round().clamp(0.0, 255.0) as u8
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(rgb: &[u8], w: usize, h: usize) -> Vec<u8> {
        let yuv = rgb_to_i420(rgb, w, h);
        let (yp, uv) = yuv.split_at(w * h);
        let (u, v) = uv.split_at(w * h / 4);
        let mut out = Vec::new();
        let pic = I420 {
            y: yp,
            u,
            v,
            y_stride: w,
            uv_stride: w / 2,
        };
        i420_to_rgb(&pic, w, h, &mut out);
        out
    }

    #[test]
    fn flat_colours_survive_within_one_level() {
        // Flat areas have no subsampling error: only the 219/224-level quantisation remains.
        for colour in [[0u8, 0, 0], [255, 255, 255], [255, 0, 0], [0, 255, 0], [0, 0, 255], [
            37, 200, 99,
        ]] {
            let rgb: Vec<u8> = colour.iter().copied().cycle().take(8 * 4 * 3).collect();
            let back = roundtrip(&rgb, 8, 4);
            for (a, b) in rgb.iter().zip(&back) {
                assert!((*a as i32 - *b as i32).abs() <= 1, "{colour:?}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn limited_range_levels() {
        let yuv = rgb_to_i420(&[0; 12], 2, 2);
        assert_eq!(yuv, vec![16, 16, 16, 16, 128, 128]);
        let yuv = rgb_to_i420(&[255; 12], 2, 2);
        assert_eq!(yuv, vec![235, 235, 235, 235, 128, 128]);
        let red: Vec<u8> = [255u8, 0, 0].repeat(4);
        let yuv = rgb_to_i420(&red, 2, 2);
        // BT.601 limited: red = (81, 90, 240).
        assert_eq!(yuv, vec![81, 81, 81, 81, 90, 240]);
    }
}
