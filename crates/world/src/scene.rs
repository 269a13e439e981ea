//! Scenes: a background and one or two objects, each with a shape, colour, size, start position,
//! motion and speed (SPEC.md, "Scene", "Palette", "Objects").
//!
//! Coordinates are continuous: x to the right in units of the frame's width, y downwards in
//! units of its height, both in [0, 1]. A shape's half-extent r is in units of min(W, H). Motion
//! is defined in seconds, so a scene renders the same motion at any frame rate: at the reference
//! 8 fps an object moves `speed` (0.012 or 0.025 of the frame) per frame.

use serde::{Deserialize, Serialize};

/// The frame rate at which the spec states speeds per frame.
pub const REF_FPS: f64 = 8.0;
/// Length of a default clip in seconds: 17 frames at 8 fps span 16 steps of 1/8 s.
pub const DEFAULT_DURATION: f64 = 2.0;
/// Pixel margin (at 64x64) by which bounding boxes are grown when checking that two objects never
/// overlap: 1 pixel at 64x64, in frame units.
pub const OVERLAP_MARGIN: f64 = 1.0 / 64.0;

macro_rules! named_enum {
    ($(#[$m:meta])* $name:ident { $($var:ident = $s:literal),+ $(,)? }) => {
        $(#[$m])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(rename_all = "lowercase")]
        pub enum $name { $($var),+ }

        impl $name {
            /// Every value, in index order.
            pub const ALL: &'static [$name] = &[$($name::$var),+];

            /// The spec's index of this value.
            pub fn index(self) -> usize {
                self as usize
            }

            /// The value with the spec's index `i`.
            pub fn from_index(i: usize) -> Option<Self> {
                Self::ALL.get(i).copied()
            }

            /// The lower-case name used in captions and in `captions.jsonl`.
            pub fn name(self) -> &'static str {
                match self { $($name::$var => $s),+ }
            }

            /// The value named `s` (lower case), if any.
            pub fn from_name(s: &str) -> Option<Self> {
                match s { $($s => Some($name::$var),)+ _ => None }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.name())
            }
        }
    };
}

named_enum!(
    /// Object shape (SPEC index order).
    Shape { Circle = "circle", Square = "square", Triangle = "triangle", Cross = "cross" }
);
named_enum!(
    /// Object colour (SPEC index order).
    Colour {
        Red = "red", Orange = "orange", Yellow = "yellow", Green = "green",
        Cyan = "cyan", Blue = "blue", Purple = "purple", White = "white",
    }
);
named_enum!(
    /// Background colour (SPEC index order).
    Background { Black = "black", Gray = "gray", Navy = "navy", Brown = "brown" }
);
named_enum!(
    /// Object size class.
    Size { Small = "small", Large = "large" }
);
named_enum!(
    /// Motion (SPEC index order): still or a direction.
    Motion { Still = "still", Left = "left", Right = "right", Up = "up", Down = "down" }
);
named_enum!(
    /// Speed class of a moving object.
    Speed { Slow = "slow", Fast = "fast" }
);

impl Colour {
    /// sRGB value from the spec's palette.
    pub fn rgb(self) -> [u8; 3] {
        OBJECT_RGB[self.index()]
    }
}

impl Background {
    /// sRGB value from the spec's palette.
    pub fn rgb(self) -> [u8; 3] {
        BACKGROUND_RGB[self.index()]
    }
}

/// Object palette, by [`Colour`] index.
pub const OBJECT_RGB: [[u8; 3]; 8] = [
    [220, 40, 40],
    [245, 140, 30],
    [240, 220, 50],
    [50, 190, 70],
    [40, 200, 210],
    [50, 90, 230],
    [160, 70, 200],
    [240, 240, 240],
];

/// Background palette, by [`Background`] index.
pub const BACKGROUND_RGB: [[u8; 3]; 4] = [[10, 10, 10], [90, 90, 90], [20, 25, 75], [75, 45, 25]];

impl Size {
    /// Half-extent r in units of min(W, H).
    pub fn radius(self) -> f64 {
        match self {
            Size::Small => 0.075,
            Size::Large => 0.14,
        }
    }
}

impl Speed {
    /// Displacement per frame at 8 fps, in units of the frame's width or height.
    pub fn per_frame(self) -> f64 {
        match self {
            Speed::Slow => 0.012,
            Speed::Fast => 0.025,
        }
    }

    /// Displacement per second, in units of the frame's width or height.
    pub fn per_second(self) -> f64 {
        self.per_frame() * REF_FPS
    }

    /// The adverb captions say it with.
    pub fn adverb(self) -> &'static str {
        match self {
            Speed::Slow => "slowly",
            Speed::Fast => "quickly",
        }
    }
}

impl Motion {
    /// Unit direction (x right, y down); zero for still.
    pub fn direction(self) -> (f64, f64) {
        match self {
            Motion::Still => (0.0, 0.0),
            Motion::Left => (-1.0, 0.0),
            Motion::Right => (1.0, 0.0),
            Motion::Up => (0.0, -1.0),
            Motion::Down => (0.0, 1.0),
        }
    }
}

impl Shape {
    /// Area of the shape with half-extent r (any unit, squared).
    pub fn area(self, r: f64) -> f64 {
        match self {
            Shape::Circle => std::f64::consts::PI * r * r,
            Shape::Square => 4.0 * r * r,
            Shape::Triangle => 2.0 * r * r,
            // Two 2r x 2r/3 bars overlapping in a (2r/3)^2 square.
            Shape::Cross => 20.0 / 9.0 * r * r,
        }
    }

    /// Whether the point (dx, dy) relative to the shape's centre lies inside the shape of
    /// half-extent r (all in the same unit, y downwards). Boundaries count as inside.
    #[inline]
    pub fn contains(self, dx: f64, dy: f64, r: f64) -> bool {
        match self {
            Shape::Circle => dx * dx + dy * dy <= r * r,
            Shape::Square => dx.abs() <= r && dy.abs() <= r,
            // Apex (0, -r), base corners (-r, r) and (r, r): half-width (dy + r) / 2.
            Shape::Triangle => dy >= -r && dy <= r && dx.abs() <= (dy + r) * 0.5,
            Shape::Cross => {
                let (ax, ay, t) = (dx.abs(), dy.abs(), r / 3.0);
                (ax <= r && ay <= t) || (ax <= t && ay <= r)
            }
        }
    }
}

/// One object of a scene. `x0`, `y0` are the centre at time 0 (frame 0) in frame units.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Object {
    pub shape: Shape,
    pub colour: Colour,
    pub size: Size,
    pub motion: Motion,
    /// `None` exactly when `motion` is still (written as `null` in `captions.jsonl`).
    pub speed: Option<Speed>,
    pub x0: f64,
    pub y0: f64,
}

impl Object {
    /// Velocity in frame units per second (x right, y down).
    pub fn velocity(&self) -> (f64, f64) {
        let (dx, dy) = self.motion.direction();
        let v = self.speed.map_or(0.0, Speed::per_second);
        (dx * v, dy * v)
    }

    /// Centre at time `t` seconds, in frame units.
    pub fn position(&self, t: f64) -> (f64, f64) {
        let (vx, vy) = self.velocity();
        (self.x0 + vx * t, self.y0 + vy * t)
    }

    /// Whether the object stays entirely inside the frame over [0, duration] seconds, at any
    /// aspect ratio (r is at most r in both width and height units).
    pub fn inside_frame(&self, duration: f64) -> bool {
        let r = self.size.radius();
        let eps = 1e-9;
        [0.0, duration].iter().all(|&t| {
            let (x, y) = self.position(t);
            x - r >= -eps && x + r <= 1.0 + eps && y - r >= -eps && y + r <= 1.0 + eps
        })
    }

    /// Whether the bounding boxes of `self` and `other`, each grown by [`OVERLAP_MARGIN`], ever
    /// intersect (with positive area) during [0, duration] seconds. Checked in continuous time,
    /// so it holds at every frame rate; checked with r in both axes, so it holds at any aspect.
    pub fn overlaps(&self, other: &Object, duration: f64) -> bool {
        let s = self.size.radius() + other.size.radius() + 2.0 * OVERLAP_MARGIN;
        let (v1, v2) = (self.velocity(), other.velocity());
        // Relative position d(t) = d0 + v t on each axis; overlap on an axis iff |d(t)| < s.
        let axes = [
            (other.x0 - self.x0, v2.0 - v1.0),
            (other.y0 - self.y0, v2.1 - v1.1),
        ];
        let (mut lo, mut hi) = (0.0f64, duration);
        for (d0, v) in axes {
            if v.abs() < 1e-12 {
                if d0.abs() >= s {
                    return false;
                }
            } else {
                let (a, b) = ((-s - d0) / v, (s - d0) / v);
                lo = lo.max(a.min(b));
                hi = hi.min(a.max(b));
            }
        }
        lo < hi || (lo <= hi && duration == 0.0)
    }
}

/// A scene: background plus one or two objects; the first object is drawn first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Scene {
    pub background: Background,
    pub objects: Vec<Object>,
}

/// Squared Euclidean RGB distance.
#[inline]
pub(crate) fn dist2(a: [f32; 3], b: [f32; 3]) -> f32 {
    let (d0, d1, d2) = (a[0] - b[0], a[1] - b[1], a[2] - b[2]);
    d0 * d0 + d1 * d1 + d2 * d2
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_indices_follow_spec() {
        assert_eq!(Colour::from_index(6), Some(Colour::Purple));
        assert_eq!(Motion::Down.index(), 4);
        for c in Colour::ALL {
            assert_eq!(Colour::from_name(c.name()), Some(*c));
        }
        assert_eq!(Shape::from_name("hexagon"), None);
        let j = serde_json::to_string(&Background::Navy).unwrap();
        assert_eq!(j, "\"navy\"");
    }

    #[test]
    fn shape_geometry() {
        let r = 1.0;
        assert!(Shape::Triangle.contains(0.0, -0.99, r));
        assert!(!Shape::Triangle.contains(0.5, -0.5, r));
        assert!(Shape::Triangle.contains(0.99, 0.99, r));
        assert!(Shape::Cross.contains(0.9, 0.3, r));
        assert!(!Shape::Cross.contains(0.9, 0.4, r));
        assert!(!Shape::Circle.contains(0.8, 0.8, r));
        assert!(Shape::Square.contains(0.8, 0.8, r));
        // Areas by Monte Carlo on a grid.
        let n = 400;
        for s in Shape::ALL {
            let mut inside = 0;
            for i in 0..n {
                for j in 0..n {
                    let x = -1.0 + 2.0 * (j as f64 + 0.5) / n as f64;
                    let y = -1.0 + 2.0 * (i as f64 + 0.5) / n as f64;
                    inside += s.contains(x, y, r) as usize;
                }
            }
            let area = 4.0 * inside as f64 / (n * n) as f64;
            assert!(
                (area - s.area(r)).abs() < 0.02,
                "{s}: {area} vs {}",
                s.area(r)
            );
        }
    }

    #[test]
    fn overlap_in_continuous_time() {
        let a = Object {
            shape: Shape::Square,
            colour: Colour::Red,
            size: Size::Small,
            motion: Motion::Right,
            speed: Some(Speed::Fast),
            x0: 0.1,
            y0: 0.5,
        };
        let mut b = Object {
            colour: Colour::Blue,
            motion: Motion::Still,
            speed: None,
            x0: 0.6,
            ..a
        };
        // a sweeps through b's position during the 2 s clip.
        assert!(a.overlaps(&b, 2.0));
        assert!(b.overlaps(&a, 2.0));
        // ...but not during the first 0.5 s (a reaches x = 0.2).
        assert!(!a.overlaps(&b, 0.5));
        b.y0 = 0.5 + 0.15 + 2.0 / 64.0 + 1e-6;
        assert!(!a.overlaps(&b, 2.0));
        b.y0 = 0.5 + 0.15 + 2.0 / 64.0 - 1e-3;
        assert!(a.overlaps(&b, 2.0));
    }
}
