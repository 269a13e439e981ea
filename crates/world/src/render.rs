//! The renderer (SPEC.md, "Scene"). Pixel (i, j) of a W x H frame samples the scene at
//! ((j + 0.5) / W, (i + 0.5) / H). Aliased renders take that one sample; anti-aliased renders
//! average a 4 x 4 grid of samples inside the pixel, blending object over background in sRGB.
//! Frame k shows time k / fps seconds, so a scene is the same motion at any frame rate.

use crate::scene::{Object, Scene};
use crate::{Error, Result};

/// Sub-samples per axis for anti-aliased renders.
pub const AA_GRID: usize = 4;

/// Size, length and sampling of a render.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RenderOpts {
    pub width: usize,
    pub height: usize,
    pub frames: usize,
    pub fps: f32,
    /// 4 x 4 supersampling when true; one sample per pixel (the scoring renders) when false.
    pub antialias: bool,
}

impl Default for RenderOpts {
    /// The default clip: 64 x 64, 17 frames at 8 fps, aliased.
    fn default() -> Self {
        RenderOpts {
            width: 64,
            height: 64,
            frames: 17,
            fps: 8.0,
            antialias: false,
        }
    }
}

impl RenderOpts {
    /// Rejects sizes, lengths and rates that cannot make a clip.
    pub fn validate(&self) -> Result<()> {
        if self.width == 0 || self.height == 0 || self.width > 8192 || self.height > 8192 {
            return Err(Error::invalid(
                "width/height",
                format!(
                    "expected 1..=8192 pixels, found {}x{}",
                    self.width, self.height
                ),
            ));
        }
        if self.frames == 0 || self.frames > 10_000 {
            return Err(Error::invalid(
                "frames",
                format!("expected 1..=10000, found {}", self.frames),
            ));
        }
        if !(self.fps.is_finite() && self.fps > 0.0) {
            return Err(Error::invalid(
                "fps",
                format!("expected a positive number, found {}", self.fps),
            ));
        }
        Ok(())
    }

    /// Duration covered by the clip's frames, in seconds: (frames - 1) / fps.
    pub fn duration(&self) -> f64 {
        self.frames.saturating_sub(1) as f64 / self.fps as f64
    }
}

/// Renders every frame of `scene`: `opts.frames` frames of `width * height * 3` RGB8 bytes.
pub fn render(scene: &Scene, opts: RenderOpts) -> Vec<Vec<u8>> {
    (0..opts.frames)
        .map(|k| {
            render_at(
                scene,
                opts.width,
                opts.height,
                k as f64 / opts.fps as f64,
                opts.antialias,
            )
        })
        .collect()
}

/// Renders `scene` at time `t` seconds as one RGB8 frame.
pub fn render_at(scene: &Scene, width: usize, height: usize, t: f64, antialias: bool) -> Vec<u8> {
    let bg = scene.background.rgb();
    let mut frame = Vec::with_capacity(width * height * 3);
    for _ in 0..width * height {
        frame.extend_from_slice(&bg);
    }
    for o in &scene.objects {
        draw(&mut frame, width, height, o, t, antialias);
    }
    frame
}

/// Draws one object over `frame`.
fn draw(frame: &mut [u8], w: usize, h: usize, o: &Object, t: f64, antialias: bool) {
    let (x, y) = o.position(t);
    let (cx, cy) = (x * w as f64, y * h as f64);
    let r = o.size.radius() * w.min(h) as f64;
    if !(cx.is_finite() && cy.is_finite()) {
        return;
    }
    // Pixels whose area can meet the shape's bounding box.
    let j0 = (cx - r - 1.0).floor().max(0.0) as usize;
    let j1 = ((cx + r + 1.0).ceil().max(0.0) as usize).min(w);
    let i0 = (cy - r - 1.0).floor().max(0.0) as usize;
    let i1 = ((cy + r + 1.0).ceil().max(0.0) as usize).min(h);
    let rgb = o.colour.rgb();
    let n = AA_GRID;
    for i in i0..i1 {
        for j in j0..j1 {
            let cover = if antialias {
                let mut hits = 0usize;
                for a in 0..n {
                    let dy = i as f64 + (a as f64 + 0.5) / n as f64 - cy;
                    for b in 0..n {
                        let dx = j as f64 + (b as f64 + 0.5) / n as f64 - cx;
                        hits += o.shape.contains(dx, dy, r) as usize;
                    }
                }
                hits as f32 / (n * n) as f32
            } else {
                let (dx, dy) = (j as f64 + 0.5 - cx, i as f64 + 0.5 - cy);
                o.shape.contains(dx, dy, r) as u8 as f32
            };
            if cover <= 0.0 {
                continue;
            }
            let p = &mut frame[(i * w + j) * 3..(i * w + j) * 3 + 3];
            if cover >= 1.0 {
                p.copy_from_slice(&rgb);
            } else {
                for c in 0..3 {
                    p[c] = (p[c] as f32 * (1.0 - cover) + rgb[c] as f32 * cover).round() as u8;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scene::{Background, Colour, Motion, Shape, Size, Speed};

    fn one(shape: Shape, motion: Motion, speed: Option<Speed>) -> Scene {
        Scene {
            background: Background::Navy,
            objects: vec![Object {
                shape,
                colour: Colour::Orange,
                size: Size::Large,
                motion,
                speed,
                x0: 0.5,
                y0: 0.5,
            }],
        }
    }

    fn count(frame: &[u8], rgb: [u8; 3]) -> usize {
        frame.chunks(3).filter(|p| *p == rgb).count()
    }

    #[test]
    fn aliased_pixels_sample_pixel_centres() {
        let s = one(Shape::Square, Motion::Still, None);
        let f = render_at(&s, 64, 64, 0.0, false);
        // Half-extent 0.14 * 64 = 8.96 px around 32: centres 23.5..=40.5, i.e. 18 x 18 pixels.
        assert_eq!(count(&f, Colour::Orange.rgb()), 18 * 18);
        assert_eq!(count(&f, Background::Navy.rgb()), 64 * 64 - 18 * 18);
        let p = |i: usize, j: usize| &f[(i * 64 + j) * 3..(i * 64 + j) * 3 + 3];
        assert_eq!(p(23, 23), &Colour::Orange.rgb());
        assert_eq!(p(22, 23), &Background::Navy.rgb());
        assert_eq!(p(40, 40), &Colour::Orange.rgb());
        assert_eq!(p(41, 40), &Background::Navy.rgb());
        // r scales with min(W, H); x with W.
        let f = render_at(&s, 112, 64, 0.0, false);
        assert_eq!(count(&f, Colour::Orange.rgb()), 18 * 18);
    }

    #[test]
    fn antialiased_area_matches_geometry() {
        for &shape in Shape::ALL {
            let s = one(shape, Motion::Still, None);
            let f = render_at(&s, 64, 64, 0.0, true);
            let bg = Background::Navy.rgb();
            let fg = Colour::Orange.rgb();
            // Coverage from the blue channel, which differs most between the two colours.
            let area: f64 = f
                .chunks(3)
                .map(|p| (p[2] as f64 - bg[2] as f64) / (fg[2] as f64 - bg[2] as f64))
                .sum();
            let want = shape.area(0.14 * 64.0);
            assert!(
                (area - want).abs() < 0.02 * want,
                "{shape}: {area} vs {want}"
            );
        }
    }

    #[test]
    fn motion_is_the_same_at_any_frame_rate() {
        let mut s = one(Shape::Circle, Motion::Left, Some(Speed::Fast));
        s.objects[0].x0 = 0.7;
        let a = render(
            &s,
            RenderOpts {
                fps: 8.0,
                ..Default::default()
            },
        );
        let b = render(
            &s,
            RenderOpts {
                fps: 24.0,
                frames: 49,
                ..Default::default()
            },
        );
        assert_eq!(a.len(), 17);
        for k in 0..17 {
            assert_eq!(a[k], b[3 * k], "frame {k}");
        }
        // Fast: 0.025 of the width per frame at 8 fps, i.e. 0.4 over 16 frames = 25.6 px.
        let cx = |f: &[u8]| {
            let (mut sx, mut n) = (0.0, 0.0);
            for (k, p) in f.chunks(3).enumerate() {
                if p == Colour::Orange.rgb() {
                    sx += (k % 64) as f64 + 0.5;
                    n += 1.0;
                }
            }
            sx / n
        };
        let d = cx(&a[0]) - cx(&a[16]);
        assert!((d - 25.6).abs() < 0.5, "{d}");
    }

    #[test]
    fn validate_rejects_bad_options() {
        assert!(RenderOpts::default().validate().is_ok());
        let e = RenderOpts {
            fps: 0.0,
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        assert!(e.to_string().contains("fps"), "{e}");
        let e = RenderOpts {
            width: 0,
            ..Default::default()
        }
        .validate()
        .unwrap_err();
        assert!(e.to_string().contains("0x64"), "{e}");
    }
}
