//! `loss.png`: the loss curve, raw (light) and smoothed (dark), on a log axis when every loss is
//! positive, with tick labels in a built-in 5x7 pixel font (no system fonts needed).

use crate::log::LogRecord;
use image::{Rgb, RgbImage};
use std::path::Path;
use vdit_core::{Error, Result};

pub const WIDTH: u32 = 800;
pub const HEIGHT: u32 = 450;
const LEFT: i64 = 78;
const RIGHT: i64 = 20;
const TOP: i64 = 34;
const BOTTOM: i64 = 42;

pub const RAW: Rgb<u8> = Rgb([170, 200, 235]);
pub const SMOOTH: Rgb<u8> = Rgb([20, 60, 160]);
const AXIS: Rgb<u8> = Rgb([0, 0, 0]);
const GRID: Rgb<u8> = Rgb([228, 228, 228]);
const TEXT: Rgb<u8> = Rgb([40, 40, 40]);

/// Trailing exponential smoothing with bias correction (TensorBoard's), with a window that
/// grows with the run: α = 1 − 1/w, w = clamp(n/20, 1, 500).
pub fn smooth(values: &[f64]) -> Vec<f64> {
    let w = (values.len() as f64 / 20.0).clamp(1.0, 500.0);
    let a = 1.0 - 1.0 / w;
    let (mut s, mut norm) = (0.0, 0.0);
    values
        .iter()
        .map(|&v| {
            s = a * s + (1.0 - a) * v;
            norm = a * norm + (1.0 - a);
            s / norm
        })
        .collect()
}

/// Draws the loss of `records` into a PNG at `path` (written atomically).
pub fn plot_loss(path: &Path, records: &[LogRecord]) -> Result<()> {
    let img = render_plot(records);
    let mut bytes = Vec::new();
    image::DynamicImage::ImageRgb8(img)
        .write_to(
            &mut std::io::Cursor::new(&mut bytes),
            image::ImageFormat::Png,
        )
        .map_err(|e| Error::Msg(format!("{}: cannot encode PNG: {e}", path.display())))?;
    crate::checkpoint::write_atomic(path, &bytes)
}

/// The plot as an image.
pub fn render_plot(records: &[LogRecord]) -> RgbImage {
    let mut img = RgbImage::from_pixel(WIDTH, HEIGHT, Rgb([255, 255, 255]));
    let pts: Vec<(f64, f64)> = records
        .iter()
        .filter(|r| r.loss.is_finite())
        .map(|r| (r.step as f64, r.loss))
        .collect();
    let (x0, x1) = (LEFT, WIDTH as i64 - RIGHT);
    let (y0, y1) = (TOP, HEIGHT as i64 - BOTTOM);
    text(&mut img, LEFT, 10, "loss", TEXT);
    text(&mut img, x1 - 4 * 12, HEIGHT as i64 - 18, "step", TEXT);
    legend(&mut img, x1);
    if pts.is_empty() {
        axes(&mut img, x0, x1, y0, y1);
        return img;
    }
    let log = pts.iter().all(|p| p.1 > 0.0);
    let f = |v: f64| if log { v.log10() } else { v };
    let ys: Vec<f64> = pts.iter().map(|p| f(p.1)).collect();
    let sm = smooth(&ys);
    let (mut lo, mut hi) = ys
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| {
            (a.min(v), b.max(v))
        });
    if hi - lo < 1e-9 {
        lo -= 0.5;
        hi += 0.5;
    }
    let pad = 0.04 * (hi - lo);
    let (lo, hi) = (lo - pad, hi + pad);
    let (smin, smax) = (pts[0].0.min(0.0), pts[pts.len() - 1].0.max(1.0));
    let px = |s: f64| x0 + ((s - smin) / (smax - smin) * (x1 - x0) as f64).round() as i64;
    let py = |v: f64| y1 - ((v - lo) / (hi - lo) * (y1 - y0) as f64).round() as i64;
    // Grid and tick labels.
    for t in y_ticks(lo, hi, log) {
        let y = py(f(t));
        hline(&mut img, x0, x1, y, GRID);
        let label = fmt_num(t);
        text(
            &mut img,
            x0 - 6 - 12 * label.len() as i64,
            y - 7,
            &label,
            TEXT,
        );
    }
    for t in x_ticks(smin, smax) {
        let x = px(t);
        vline(&mut img, x, y0, y1, GRID);
        let label = fmt_num(t);
        text(&mut img, x - 6 * label.len() as i64, y1 + 8, &label, TEXT);
    }
    axes(&mut img, x0, x1, y0, y1);
    for (series, colour, thick) in [(&ys, RAW, false), (&sm, SMOOTH, true)] {
        for i in 1..pts.len() {
            let (a, b) = (
                (px(pts[i - 1].0), py(series[i - 1])),
                (px(pts[i].0), py(series[i])),
            );
            line(&mut img, a, b, colour);
            if thick {
                line(&mut img, (a.0, a.1 + 1), (b.0, b.1 + 1), colour);
            }
        }
        if pts.len() == 1 {
            put(&mut img, px(pts[0].0), py(series[0]), colour);
        }
    }
    img
}

fn legend(img: &mut RgbImage, x1: i64) {
    let x = x1 - 230;
    for k in 0..20 {
        put(img, x + k, 16, RAW);
        put(img, x + 110 + k, 16, SMOOTH);
        put(img, x + 110 + k, 17, SMOOTH);
    }
    text(img, x + 26, 10, "raw", TEXT);
    text(img, x + 136, 10, "smoothed", TEXT);
}

fn axes(img: &mut RgbImage, x0: i64, x1: i64, y0: i64, y1: i64) {
    hline(img, x0, x1, y1, AXIS);
    vline(img, x0, y0, y1, AXIS);
}

/// 1-2-5 ticks inside [lo, hi] (in plotted units: log10 when `log`), as data values.
fn y_ticks(lo: f64, hi: f64, log: bool) -> Vec<f64> {
    if log {
        let mut out = Vec::new();
        let span = hi - lo;
        let mults: &[f64] = if span > 3.0 {
            &[1.0]
        } else if span > 1.2 {
            &[1.0, 2.0, 5.0]
        } else {
            &[1.0, 1.5, 2.0, 3.0, 5.0, 7.0]
        };
        for e in (lo.floor() as i32)..=(hi.ceil() as i32) {
            for &m in mults {
                let v = m * 10f64.powi(e);
                if (lo..=hi).contains(&v.log10()) {
                    out.push(v);
                }
            }
        }
        out
    } else {
        nice_ticks(lo, hi)
    }
}

fn x_ticks(lo: f64, hi: f64) -> Vec<f64> {
    nice_ticks(lo, hi)
        .into_iter()
        .filter(|v| *v >= 0.0)
        .collect()
}

/// About six ticks at a 1-2-5 spacing covering [lo, hi].
fn nice_ticks(lo: f64, hi: f64) -> Vec<f64> {
    let raw = (hi - lo) / 6.0;
    let mag = 10f64.powf(raw.log10().floor());
    let step = [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * mag)
        .find(|s| *s >= raw)
        .unwrap_or(10.0 * mag);
    let mut v = (lo / step).ceil() * step;
    let mut out = Vec::new();
    while v <= hi + 1e-9 * step && out.len() < 50 {
        out.push(if v.abs() < 1e-12 * step { 0.0 } else { v });
        v += step;
    }
    out
}

/// Short labels: integers as they are, small or large numbers in `1e-3` form.
fn fmt_num(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        return "0".into();
    }
    if v.fract() == 0.0 && a < 1e7 {
        return format!("{}", v as i64);
    }
    if (1e-3..1e4).contains(&a) {
        let s = format!("{v:.4}");
        let s = s.trim_end_matches('0').trim_end_matches('.');
        return s.to_string();
    }
    let e = a.log10().floor() as i32;
    let m = v / 10f64.powi(e);
    if (m - m.round()).abs() < 1e-9 {
        format!("{}e{e}", m.round() as i64)
    } else {
        format!("{m:.1}e{e}")
    }
}

fn put(img: &mut RgbImage, x: i64, y: i64, c: Rgb<u8>) {
    if x >= 0 && y >= 0 && (x as u32) < img.width() && (y as u32) < img.height() {
        img.put_pixel(x as u32, y as u32, c);
    }
}

fn hline(img: &mut RgbImage, x0: i64, x1: i64, y: i64, c: Rgb<u8>) {
    for x in x0..=x1 {
        put(img, x, y, c);
    }
}

fn vline(img: &mut RgbImage, x: i64, y0: i64, y1: i64, c: Rgb<u8>) {
    for y in y0..=y1 {
        put(img, x, y, c);
    }
}

/// Bresenham's line.
fn line(img: &mut RgbImage, (mut x, mut y): (i64, i64), (x1, y1): (i64, i64), c: Rgb<u8>) {
    let (dx, dy) = ((x1 - x).abs(), -(y1 - y).abs());
    let (sx, sy) = (if x < x1 { 1 } else { -1 }, if y < y1 { 1 } else { -1 });
    let mut err = dx + dy;
    loop {
        put(img, x, y, c);
        if x == x1 && y == y1 {
            break;
        }
        let e2 = 2 * err;
        if e2 >= dy {
            err += dy;
            x += sx;
        }
        if e2 <= dx {
            err += dx;
            y += sy;
        }
    }
}

/// 5x7 glyphs, one byte per row, bit 4 leftmost.
fn glyph(ch: char) -> [u8; 7] {
    match ch {
        '0' => [0x0E, 0x11, 0x13, 0x15, 0x19, 0x11, 0x0E],
        '1' => [0x04, 0x0C, 0x04, 0x04, 0x04, 0x04, 0x0E],
        '2' => [0x0E, 0x11, 0x01, 0x02, 0x04, 0x08, 0x1F],
        '3' => [0x1F, 0x02, 0x04, 0x02, 0x01, 0x11, 0x0E],
        '4' => [0x02, 0x06, 0x0A, 0x12, 0x1F, 0x02, 0x02],
        '5' => [0x1F, 0x10, 0x1E, 0x01, 0x01, 0x11, 0x0E],
        '6' => [0x06, 0x08, 0x10, 0x1E, 0x11, 0x11, 0x0E],
        '7' => [0x1F, 0x01, 0x02, 0x04, 0x08, 0x08, 0x08],
        '8' => [0x0E, 0x11, 0x11, 0x0E, 0x11, 0x11, 0x0E],
        '9' => [0x0E, 0x11, 0x11, 0x0F, 0x01, 0x02, 0x0C],
        '.' => [0, 0, 0, 0, 0, 0x0C, 0x0C],
        '-' => [0, 0, 0, 0x0E, 0, 0, 0],
        '+' => [0, 0x04, 0x04, 0x1F, 0x04, 0x04, 0],
        'a' => [0, 0, 0x0E, 0x01, 0x0F, 0x11, 0x0F],
        'd' => [0x01, 0x01, 0x0D, 0x13, 0x11, 0x11, 0x0F],
        'e' => [0, 0, 0x0E, 0x11, 0x1F, 0x10, 0x0E],
        'h' => [0x10, 0x10, 0x16, 0x19, 0x11, 0x11, 0x11],
        'l' => [0x0C, 0x04, 0x04, 0x04, 0x04, 0x04, 0x0E],
        'm' => [0, 0, 0x1A, 0x15, 0x15, 0x11, 0x11],
        'o' => [0, 0, 0x0E, 0x11, 0x11, 0x11, 0x0E],
        'p' => [0, 0, 0x1E, 0x11, 0x1E, 0x10, 0x10],
        'r' => [0, 0, 0x16, 0x19, 0x10, 0x10, 0x10],
        's' => [0, 0, 0x0F, 0x10, 0x0E, 0x01, 0x1E],
        't' => [0x08, 0x08, 0x1C, 0x08, 0x08, 0x09, 0x06],
        'w' => [0, 0, 0x11, 0x11, 0x15, 0x15, 0x0A],
        _ => [0; 7],
    }
}

/// Draws `s` at 2x scale with its top-left at (x, y); 12 px per character.
fn text(img: &mut RgbImage, x: i64, y: i64, s: &str, c: Rgb<u8>) {
    for (k, ch) in s.chars().enumerate() {
        let g = glyph(ch);
        for (row, bits) in g.iter().enumerate() {
            for col in 0..5 {
                if bits & (0x10 >> col) != 0 {
                    for (a, b) in [(0, 0), (0, 1), (1, 0), (1, 1)] {
                        put(
                            img,
                            x + 12 * k as i64 + 2 * col + a,
                            y + 2 * row as i64 + b,
                            c,
                        );
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(step: u64, loss: f64) -> LogRecord {
        LogRecord {
            step,
            loss,
            lr: 0.0,
            grad_norm: 0.0,
            seconds: 0.0,
            elapsed: 0.0,
            bucket: String::new(),
            metrics: Default::default(),
        }
    }

    /// The row of the topmost pixel of `colour` in column `x`.
    fn row_of(img: &RgbImage, x: u32, colour: Rgb<u8>) -> Option<u32> {
        (0..img.height()).find(|&y| *img.get_pixel(x, y) == colour)
    }

    #[test]
    fn a_falling_loss_is_drawn_falling() {
        let recs: Vec<LogRecord> = (1..=300)
            .map(|s| {
                rec(
                    s,
                    2.0 * (-(s as f64) / 80.0).exp()
                        + 0.05
                        + 0.02 * ((s * 7919) % 13) as f64 / 13.0,
                )
            })
            .collect();
        let dir = std::env::temp_dir().join(format!("vdit-train-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("loss.png");
        plot_loss(&p, &recs).unwrap();
        let img = image::open(&p).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (WIDTH, HEIGHT));
        let left = row_of(&img, LEFT as u32 + 20, SMOOTH).expect("smoothed curve at the left");
        let right =
            row_of(&img, WIDTH - RIGHT as u32 - 5, SMOOTH).expect("smoothed curve at the right");
        assert!(left + 150 < right, "left {left} right {right}");
        let raw = (LEFT as u32..WIDTH - RIGHT as u32)
            .filter(|&x| row_of(&img, x, RAW).is_some())
            .count();
        assert!(raw > 500, "raw curve in {raw} columns");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn smoothing_and_labels() {
        assert_eq!(smooth(&[3.0]), vec![3.0]);
        let s = smooth(&[1.0; 100]);
        assert!(s.iter().all(|v| (v - 1.0).abs() < 1e-12));
        assert_eq!(fmt_num(0.05), "0.05");
        assert_eq!(fmt_num(2000.0), "2000");
        assert_eq!(fmt_num(1e-4), "1e-4");
        assert_eq!(
            nice_ticks(0.0, 300.0),
            vec![0.0, 50.0, 100.0, 150.0, 200.0, 250.0, 300.0]
        );
        let t = y_ticks(-1.3, 0.4, true);
        assert!(
            t.contains(&0.1) && t.contains(&1.0) && t.contains(&2.0),
            "{t:?}"
        );
        // Empty and constant logs still draw.
        render_plot(&[]);
        render_plot(&[rec(1, 0.5), rec(2, 0.5)]);
        render_plot(&[rec(1, -0.5), rec(2, 0.5)]);
    }
}
