//! The scorer (SPEC.md, "Scorer"): recovers the background and the objects of a clip by classical
//! means and judges each attribute a caption states.
//!
//! 1. Background: the per-pixel temporal median (per channel; the mean of the two middle values
//!    for an even frame count); each median pixel votes for its nearest background colour and the
//!    majority wins (ties to the lower index).
//! 2. Segmentation: a pixel takes its nearest object colour when it lies within RGB distance 80 of
//!    it and farther than 40 from the recovered background's palette colour; 8-connected
//!    components per colour; components under 6 pixels at 64x64 (scaled with W*H) are dropped.
//!    Blurred and anti-aliased edges mix an object with the background, and such a mixture can
//!    sit nearer another palette colour (70% orange over black is within 80 of red): a component
//!    that is such a rim is merged into the component it surrounds (see `merge_rims`).
//! 3. Per component: area, centroid and bounding box, measured on the component's extent at half
//!    coverage (its pixels plus those within 2 px that are at least half way from the background
//!    to its colour; identical to the component on clean aliased renders, and where a blurred
//!    or anti-aliased edge truly lies — the 80-distance rule alone puts white-on-black edges at
//!    80% coverage, which rounds small squares into circles); shape by the best IoU against this
//!    renderer's aliased templates centred on the bounding box, with the half-extent the bounding
//!    box gives (the component's size).
//! 4. Tracking per colour: components link to the nearest live track of their colour (greedy by
//!    distance) within 0.1 of the frame per frame elapsed (times 8/fps below 8 fps), across gaps
//!    of up to 3 frames; unlinked components start tracks. A track's shape is the majority of
//!    its components' shapes (ties to the larger summed IoU); its size class compares its median
//!    area with the midpoint of the small and large areas of that shape at this frame size.
//! 5. Motion: still when the centroid's first-to-last displacement (in frame units) is under
//!    0.04; otherwise the dominant axis and sign of that displacement. Speed: the least-squares
//!    slope of the centroid on that axis, per frame at 8 fps (slope * fps / 8), against 0.0185,
//!    midway between slow and fast; a track recovered as still has no speed (a stated speed is
//!    then wrong). Clips of one frame do not judge motion or speed.
//! 6. Tracks present in at least half the frames count; the recovered count is their number. A
//!    caption object is matched to an unused counted track of its colour (the one agreeing on most
//!    stated attributes, then the longest); an unmatched object gets every stated attribute wrong.

use crate::caption::{ParsedCaption, ParsedObject};
use crate::scene::{
    dist2, Background, Colour, Motion, Shape, Size, Speed, BACKGROUND_RGB, OBJECT_RGB, REF_FPS,
};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};

/// A pixel is an object pixel only within this RGB distance of its nearest object colour.
pub const MAX_OBJECT_DIST: f32 = 80.0;
/// ...and only farther than this from the background colour.
pub const MIN_BACKGROUND_DIST: f32 = 40.0;
/// Smallest kept component at 64x64, in pixels (scaled with the frame's area).
pub const MIN_COMPONENT_PX_64: f64 = 6.0;
/// A track whose centroid moves less than this (frame units) from first to last frame is still.
pub const STILL_DISPLACEMENT: f64 = 0.04;
/// Speed threshold per frame at 8 fps, midway between slow (0.012) and fast (0.025).
pub const SPEED_THRESHOLD: f64 = 0.0185;
/// Largest centroid step (frame units) per elapsed frame for tracking at >= 8 fps.
pub const TRACK_GATE: f64 = 0.1;
/// Largest gap (frames) a track may bridge.
pub const TRACK_MAX_GAP: usize = 3;
/// Relative area tolerance for identity consistency.
pub const IDENTITY_AREA_TOL: f64 = 0.2;

/// Correct judgements out of stated (judged) ones.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Tally {
    pub correct: f64,
    pub total: f64,
}

impl Tally {
    pub fn add(&mut self, judged: Option<bool>) {
        if let Some(ok) = judged {
            self.total += 1.0;
            self.correct += ok as u8 as f64;
        }
    }

    pub fn merge(&mut self, o: Tally) {
        self.correct += o.correct;
        self.total += o.total;
    }

    /// correct / total, `None` when nothing was judged.
    pub fn rate(&self) -> Option<f64> {
        (self.total > 0.0).then(|| self.correct / self.total)
    }
}

/// One value per reported attribute.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Attrs<T> {
    pub colour: T,
    pub shape: T,
    pub size: T,
    pub motion: T,
    pub speed: T,
    pub background: T,
    pub count: T,
}

impl<T> Attrs<T> {
    /// The attribute names in report order.
    pub const NAMES: [&'static str; 7] = [
        "colour",
        "shape",
        "size",
        "motion",
        "speed",
        "background",
        "count",
    ];

    pub fn as_array(&self) -> [&T; 7] {
        [
            &self.colour,
            &self.shape,
            &self.size,
            &self.motion,
            &self.speed,
            &self.background,
            &self.count,
        ]
    }

    pub fn map<U>(&self, f: impl Fn(&T) -> U) -> Attrs<U> {
        Attrs {
            colour: f(&self.colour),
            shape: f(&self.shape),
            size: f(&self.size),
            motion: f(&self.motion),
            speed: f(&self.speed),
            background: f(&self.background),
            count: f(&self.count),
        }
    }
}

impl Attrs<Tally> {
    pub fn merge(&mut self, o: &Attrs<Tally>) {
        self.colour.merge(o.colour);
        self.shape.merge(o.shape);
        self.size.merge(o.size);
        self.motion.merge(o.motion);
        self.speed.merge(o.speed);
        self.background.merge(o.background);
        self.count.merge(o.count);
    }
}

/// The attributes of one recovered object (a counted track, or a scene object when judging
/// symbolically).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Recovered {
    pub colour: Colour,
    pub shape: Shape,
    pub size: Size,
    pub motion: Motion,
    pub speed: Option<Speed>,
}

/// The judgement of one caption object; `None` where the caption does not state the attribute
/// (or, for motion and speed, the clip has a single frame).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ObjectScore {
    pub stated: ParsedObject,
    /// Index of the matched track in [`ClipScore::tracks`] (or of the recovered object).
    pub matched: Option<usize>,
    pub colour: bool,
    pub shape: bool,
    pub size: Option<bool>,
    pub motion: Option<bool>,
    pub speed: Option<bool>,
}

impl ObjectScore {
    pub fn all_correct(&self) -> bool {
        self.colour
            && self.shape
            && self.size != Some(false)
            && self.motion != Some(false)
            && self.speed != Some(false)
    }
}

/// A tracked object: per-frame observations plus its recovered attributes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Track {
    pub colour: Colour,
    /// Centroid per frame in frame units (x / W, y / H), `None` where the track is absent.
    pub centroids: Vec<Option<(f64, f64)>>,
    /// Area in pixels per frame.
    pub areas: Vec<Option<usize>>,
    /// Best-IoU shape per frame.
    pub shapes: Vec<Option<Shape>>,
    pub frames_present: usize,
    pub shape: Shape,
    pub median_area: f64,
    pub size: Size,
    pub motion: Motion,
    pub speed: Option<Speed>,
}

impl Track {
    pub fn recovered(&self) -> Recovered {
        Recovered {
            colour: self.colour,
            shape: self.shape,
            size: self.size,
            motion: self.motion,
            speed: self.speed,
        }
    }

    /// Whether the track counts as an object of a clip of `frames` frames: present in at least
    /// half of them.
    pub fn is_counted(&self, frames: usize) -> bool {
        2 * self.frames_present >= frames
    }

    /// Fraction of the clip's frames in which the track is present with its own shape and an
    /// area within 20% of its median.
    pub fn identity_consistency(&self) -> f64 {
        let n = self.centroids.len().max(1);
        let ok = (0..self.centroids.len())
            .filter(|&f| {
                self.shapes[f] == Some(self.shape)
                    && self.areas[f].is_some_and(|a| {
                        (a as f64 - self.median_area).abs() <= IDENTITY_AREA_TOL * self.median_area
                    })
            })
            .count();
        ok as f64 / n as f64
    }

    /// Sum of squared third differences of the centroid (frame units) over every run of four
    /// consecutive present frames, and the number of such runs.
    pub fn jerk(&self) -> JerkStats {
        let c = &self.centroids;
        let mut j = JerkStats::default();
        for f in 0..c.len().saturating_sub(3) {
            if let (Some(a), Some(b), Some(d), Some(e)) = (c[f], c[f + 1], c[f + 2], c[f + 3]) {
                let jx = e.0 - 3.0 * d.0 + 3.0 * b.0 - a.0;
                let jy = e.1 - 3.0 * d.1 + 3.0 * b.1 - a.1;
                j.sum_sq += jx * jx + jy * jy;
                j.n += 1;
            }
        }
        j
    }
}

/// Pooled squared jerk: RMS = sqrt(sum_sq / n).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct JerkStats {
    pub sum_sq: f64,
    pub n: usize,
}

impl JerkStats {
    pub fn merge(&mut self, o: JerkStats) {
        self.sum_sq += o.sum_sq;
        self.n += o.n;
    }

    pub fn rms(&self) -> Option<f64> {
        (self.n > 0).then(|| (self.sum_sq / self.n as f64).sqrt())
    }
}

/// Everything the scorer recovered from one clip and how it judged the caption.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClipScore {
    pub width: usize,
    pub height: usize,
    pub frames: usize,
    pub fps: f32,
    /// Recovered background.
    pub background: Background,
    /// `None` when the caption does not state the background.
    pub background_ok: Option<bool>,
    /// Number of tracks present in at least half the frames.
    pub count: usize,
    pub count_ok: bool,
    /// One judgement per caption object, in caption order.
    pub objects: Vec<ObjectScore>,
    /// Every track (counted or not).
    pub tracks: Vec<Track>,
    /// Identity consistency of each matched track.
    pub identity: Vec<f64>,
    /// VBench flicker score when the caption states every object still (and frames >= 2).
    pub flicker: Option<f64>,
    /// Jerk of the matched tracks.
    pub jerk: JerkStats,
}

impl ClipScore {
    /// Per-attribute tallies of this clip's judgements.
    pub fn tally(&self) -> Attrs<Tally> {
        tally(&self.objects, self.background_ok, self.count_ok)
    }

    /// Whether every stated attribute (and the count) is right.
    pub fn all_correct(&self) -> bool {
        self.count_ok
            && self.background_ok != Some(false)
            && self.objects.iter().all(ObjectScore::all_correct)
    }
}

pub(crate) fn tally(
    objects: &[ObjectScore],
    background_ok: Option<bool>,
    count_ok: bool,
) -> Attrs<Tally> {
    let mut t = Attrs::<Tally>::default();
    for o in objects {
        t.colour.add(Some(o.colour));
        t.shape.add(Some(o.shape));
        t.size.add(o.size);
        t.motion.add(o.motion);
        t.speed.add(o.speed);
    }
    t.background.add(background_ok);
    t.count.add(Some(count_ok));
    t
}

/// Judges each caption object against recovered objects (in order of preference), greedily in
/// caption order: an object matches an unused recovered object of its colour, preferring the one
/// agreeing on most stated attributes, then the earliest.
pub fn judge_objects(
    caption: &ParsedCaption,
    recovered: &[Recovered],
    motion_judged: bool,
) -> Vec<ObjectScore> {
    let mut used = vec![false; recovered.len()];
    caption
        .objects
        .iter()
        .map(|p| {
            let agree = |r: &Recovered| {
                (p.shape == r.shape) as usize
                    + p.size.is_some_and(|s| s == r.size) as usize
                    + p.motion.is_some_and(|m| m == r.motion) as usize
                    + p.speed.is_some_and(|s| Some(s) == r.speed) as usize
            };
            let mut best: Option<(usize, usize)> = None;
            for (i, r) in recovered.iter().enumerate() {
                if used[i] || r.colour != p.colour {
                    continue;
                }
                let a = agree(r);
                if best.is_none_or(|(_, b)| a > b) {
                    best = Some((i, a));
                }
            }
            let m = best.map(|(i, _)| i);
            if let Some(i) = m {
                used[i] = true;
            }
            let r = m.map(|i| &recovered[i]);
            let judge =
                |stated: bool, ok: &dyn Fn(&Recovered) -> bool| stated.then(|| r.is_some_and(ok));
            ObjectScore {
                stated: *p,
                matched: m,
                colour: r.is_some(),
                shape: r.is_some_and(|r| r.shape == p.shape),
                size: p.size.and_then(|s| judge(true, &|r| r.size == s)),
                motion: p
                    .motion
                    .and_then(|mo| judge(motion_judged, &|r| r.motion == mo)),
                speed: p
                    .speed
                    .and_then(|s| judge(motion_judged, &|r| r.speed == Some(s))),
            }
        })
        .collect()
}

/// Scores a clip at the reference 8 fps. See [`score_clip_at`].
pub fn score_clip(
    frames: &[Vec<u8>],
    width: usize,
    height: usize,
    caption: &ParsedCaption,
) -> Result<ClipScore> {
    score_clip_at(frames, width, height, REF_FPS as f32, caption)
}

/// Scores a clip of `frames` (RGB8, `width * height * 3` bytes each) shown at `fps` against the
/// attributes `caption` states.
pub fn score_clip_at(
    frames: &[Vec<u8>],
    width: usize,
    height: usize,
    fps: f32,
    caption: &ParsedCaption,
) -> Result<ClipScore> {
    if frames.is_empty() {
        return Err(Error::invalid(
            "frames",
            "expected at least one frame, found none",
        ));
    }
    if width == 0 || height == 0 {
        return Err(Error::invalid(
            "width/height",
            format!("expected positive sizes, found {width}x{height}"),
        ));
    }
    if !(fps.is_finite() && fps > 0.0) {
        return Err(Error::invalid(
            "fps",
            format!("expected a positive number, found {fps}"),
        ));
    }
    for (k, f) in frames.iter().enumerate() {
        if f.len() != width * height * 3 {
            return Err(Error::invalid(
                "frames",
                format!(
                    "frame {k} has {} bytes, expected {width}x{height}x3 = {}",
                    f.len(),
                    width * height * 3
                ),
            ));
        }
    }
    let n = frames.len();
    let background = recover_background(frames, width * height);
    let min_px = ((MIN_COMPONENT_PX_64 * (width * height) as f64 / 4096.0).round() as usize).max(1);

    // Steps 2-3: components per frame.
    let mut labels = vec![NONE; width * height];
    let mut comp_of = vec![u32::MAX; width * height];
    let mut owner = vec![u32::MAX; width * height];
    let bg = background.rgb().map(|v| v as f32);
    let per_frame: Vec<Vec<Component>> = frames
        .iter()
        .map(|f| {
            label_pixels(f, background, &mut labels);
            let mut blobs = components(&labels, &mut comp_of, width, height);
            merge_rims(&mut blobs, &mut comp_of, f, bg, width, height);
            let kept: Vec<bool> = blobs.iter().map(|b| b.pixels.len() >= min_px).collect();
            owner.fill(u32::MAX);
            let mut comps = Vec::new();
            for (k, b) in blobs.iter().enumerate() {
                if kept[k] {
                    let mask = b.half_coverage(f, bg, &comp_of, &kept, &mut owner, width, height);
                    comps.push(measure(b.colour, &mask, &owner, width, height));
                }
            }
            comps
        })
        .collect();

    // Steps 4-5: tracks and their attributes.
    let mut tracks = track(&per_frame, width, height, fps);
    // Counted tracks first, longest first, so matching prefers them.
    tracks.sort_by(|a, b| {
        b.frames_present
            .cmp(&a.frames_present)
            .then(b.median_area.total_cmp(&a.median_area))
    });
    let counted: Vec<usize> = (0..tracks.len())
        .filter(|&i| tracks[i].is_counted(n))
        .collect();
    let recovered: Vec<Recovered> = counted.iter().map(|&i| tracks[i].recovered()).collect();

    // Step 6: judgements.
    let mut objects = judge_objects(caption, &recovered, n >= 2);
    for o in &mut objects {
        o.matched = o.matched.map(|i| counted[i]);
    }
    let matched: Vec<&Track> = objects
        .iter()
        .filter_map(|o| o.matched.map(|i| &tracks[i]))
        .collect();
    let identity = matched.iter().map(|t| t.identity_consistency()).collect();
    let mut jerk = JerkStats::default();
    for t in &matched {
        jerk.merge(t.jerk());
    }
    let flicker = (caption.all_still() && n >= 2).then(|| flicker(frames));
    Ok(ClipScore {
        width,
        height,
        frames: n,
        fps,
        background,
        background_ok: caption.background.map(|b| b == background),
        count: counted.len(),
        count_ok: counted.len() == caption.objects.len(),
        objects,
        tracks,
        identity,
        flicker,
        jerk,
    })
}

/// VBench's flicker score: (255 - mean |I_t - I_{t+1}|) / 255 over all pixels, channels and
/// consecutive frame pairs.
pub fn flicker(frames: &[Vec<u8>]) -> f64 {
    let mut sum = 0u64;
    let mut cnt = 0u64;
    for w in frames.windows(2) {
        sum += w[0]
            .iter()
            .zip(&w[1])
            .map(|(&a, &b)| a.abs_diff(b) as u64)
            .sum::<u64>();
        cnt += w[0].len() as u64;
    }
    if cnt == 0 {
        return 1.0;
    }
    (255.0 - sum as f64 / cnt as f64) / 255.0
}

/// Step 1: temporal median per pixel and channel, then a majority vote of nearest background
/// colours.
fn recover_background(frames: &[Vec<u8>], pixels: usize) -> Background {
    let n = frames.len();
    let mut votes = [0usize; 4];
    let mut buf = vec![0u8; n];
    let bgs = BACKGROUND_RGB.map(|c| c.map(|v| v as f32));
    for p in 0..pixels {
        let mut med = [0f32; 3];
        for (c, m) in med.iter_mut().enumerate() {
            for (k, f) in frames.iter().enumerate() {
                buf[k] = f[p * 3 + c];
            }
            if n <= 64 {
                insertion_sort(&mut buf);
            } else {
                buf.sort_unstable();
            }
            *m = if n % 2 == 1 {
                buf[n / 2] as f32
            } else {
                0.5 * (buf[n / 2 - 1] as f32 + buf[n / 2] as f32)
            };
        }
        let best = (0..4)
            .min_by(|&a, &b| dist2(med, bgs[a]).total_cmp(&dist2(med, bgs[b])))
            .unwrap_or(0);
        votes[best] += 1;
    }
    let mut best = 0;
    for i in 1..4 {
        if votes[i] > votes[best] {
            best = i;
        }
    }
    Background::ALL[best]
}

/// Sorts a short slice (cheaper than the general sort for a pixel's few frames).
fn insertion_sort(v: &mut [u8]) {
    for i in 1..v.len() {
        let x = v[i];
        let mut j = i;
        while j > 0 && v[j - 1] > x {
            v[j] = v[j - 1];
            j -= 1;
        }
        v[j] = x;
    }
}

const NONE: u8 = u8::MAX;

/// Step 2: the object colour index of each pixel, or `NONE`.
fn label_pixels(frame: &[u8], background: Background, labels: &mut [u8]) {
    let bg = background.rgb().map(|v| v as f32);
    let objs = OBJECT_RGB.map(|c| c.map(|v| v as f32));
    let (max_obj, min_bg) = (
        MAX_OBJECT_DIST * MAX_OBJECT_DIST,
        MIN_BACKGROUND_DIST * MIN_BACKGROUND_DIST,
    );
    for (p, l) in labels.iter_mut().enumerate() {
        let px = [
            frame[p * 3] as f32,
            frame[p * 3 + 1] as f32,
            frame[p * 3 + 2] as f32,
        ];
        *l = NONE;
        if dist2(px, bg) <= min_bg {
            continue;
        }
        let (mut best, mut bd) = (0usize, f32::INFINITY);
        for (c, o) in objs.iter().enumerate() {
            let d = dist2(px, *o);
            if d < bd {
                bd = d;
                best = c;
            }
        }
        if bd <= max_obj {
            *l = best as u8;
        }
    }
}

/// A connected set of same-colour pixels in one frame.
struct Blob {
    colour: u8,
    pixels: Vec<u32>,
}

/// 8-connected components of equal labels. Writes each pixel's blob index to `comp_of`.
fn components(labels: &[u8], comp_of: &mut [u32], w: usize, h: usize) -> Vec<Blob> {
    comp_of.fill(u32::MAX);
    let mut blobs = Vec::new();
    let mut stack = Vec::new();
    for start in 0..w * h {
        if labels[start] == NONE || comp_of[start] != u32::MAX {
            continue;
        }
        let id = blobs.len() as u32;
        let colour = labels[start];
        let mut pixels = Vec::new();
        comp_of[start] = id;
        stack.push(start);
        while let Some(p) = stack.pop() {
            pixels.push(p as u32);
            let (i, j) = ((p / w) as isize, (p % w) as isize);
            for di in -1..=1isize {
                for dj in -1..=1isize {
                    let (ni, nj) = (i + di, j + dj);
                    if ni < 0 || nj < 0 || ni >= h as isize || nj >= w as isize {
                        continue;
                    }
                    let q = ni as usize * w + nj as usize;
                    if labels[q] == colour && comp_of[q] == u32::MAX {
                        comp_of[q] = id;
                        stack.push(q);
                    }
                }
            }
        }
        blobs.push(Blob { colour, pixels });
    }
    blobs
}

/// Largest RGB distance of a rim pixel from the line between the background and its core's
/// colour.
pub const RIM_RESIDUAL: f32 = 30.0;

/// Where `px` lies on the way from `bg` to `c` (0 at the background, 1 at the colour), and its
/// distance from that line.
fn mixture(px: [f32; 3], bg: [f32; 3], c: [f32; 3]) -> (f32, f32) {
    let d = [c[0] - bg[0], c[1] - bg[1], c[2] - bg[2]];
    let q = [px[0] - bg[0], px[1] - bg[1], px[2] - bg[2]];
    let dd = (d[0] * d[0] + d[1] * d[1] + d[2] * d[2]).max(1.0);
    let a = (q[0] * d[0] + q[1] * d[1] + q[2] * d[2]) / dd;
    let r = [q[0] - a * d[0], q[1] - a * d[1], q[2] - a * d[2]];
    (a, (r[0] * r[0] + r[1] * r[1] + r[2] * r[2]).sqrt())
}

/// Merges rims into the components they surround: a blob joins a larger blob of another colour
/// (taking its colour) when at least half of its pixels are 8-adjacent to it and at least two
/// thirds of its pixels are mixtures of that blob's colour with the background (within
/// [`RIM_RESIDUAL`] of the line between them, at least 20% of the way to the colour), as blurred
/// and anti-aliased edges are. Repeats until nothing changes. Two real objects never merge this
/// way: they stay more than a pixel apart, share at most a short stretch of border, and are not
/// mixtures of each other's colour with the background; nor do noise speckles, which are not
/// such mixtures either.
fn merge_rims(
    blobs: &mut Vec<Blob>,
    comp_of: &mut [u32],
    frame: &[u8],
    bg: [f32; 3],
    w: usize,
    h: usize,
) {
    loop {
        let mut changed = false;
        // Smallest first, so a rim joins its core before the core is considered.
        let mut order: Vec<usize> = (0..blobs.len())
            .filter(|&b| !blobs[b].pixels.is_empty())
            .collect();
        order.sort_by_key(|&b| blobs[b].pixels.len());
        for b in order {
            let size = blobs[b].pixels.len();
            if size == 0 {
                continue;
            }
            // For each neighbouring larger blob, how many of b's pixels touch it.
            let mut touch: Vec<(u32, usize)> = Vec::new();
            for &p in &blobs[b].pixels {
                let p = p as usize;
                let (i, j) = ((p / w) as isize, (p % w) as isize);
                let mut seen: [u32; 8] = [u32::MAX; 8];
                let mut ns = 0;
                for di in -1..=1isize {
                    for dj in -1..=1isize {
                        let (ni, nj) = (i + di, j + dj);
                        if ni < 0 || nj < 0 || ni >= h as isize || nj >= w as isize {
                            continue;
                        }
                        let o = comp_of[ni as usize * w + nj as usize];
                        if o == u32::MAX || o as usize == b || seen[..ns].contains(&o) {
                            continue;
                        }
                        if blobs[o as usize].pixels.len() > size {
                            seen[ns] = o;
                            ns += 1;
                        }
                    }
                }
                for &o in &seen[..ns] {
                    match touch.iter_mut().find(|t| t.0 == o) {
                        Some(t) => t.1 += 1,
                        None => touch.push((o, 1)),
                    }
                }
            }
            let Some(&(target, k)) = touch
                .iter()
                .max_by_key(|t| (t.1, blobs[t.0 as usize].pixels.len()))
            else {
                continue;
            };
            if 2 * k < size {
                continue;
            }
            let c = OBJECT_RGB[blobs[target as usize].colour as usize].map(|v| v as f32);
            let mixed = blobs[b]
                .pixels
                .iter()
                .filter(|&&p| {
                    let p = p as usize;
                    let px = [
                        frame[p * 3] as f32,
                        frame[p * 3 + 1] as f32,
                        frame[p * 3 + 2] as f32,
                    ];
                    let (a, res) = mixture(px, bg, c);
                    a >= 0.2 && res <= RIM_RESIDUAL
                })
                .count();
            if 3 * mixed < 2 * size {
                continue;
            }
            let moved = std::mem::take(&mut blobs[b].pixels);
            for &p in &moved {
                comp_of[p as usize] = target;
            }
            blobs[target as usize].pixels.extend(moved);
            changed = true;
        }
        if !changed {
            break;
        }
    }
    // Compact: drop emptied blobs and renumber.
    let mut remap = vec![u32::MAX; blobs.len()];
    let mut kept = Vec::with_capacity(blobs.len());
    for (i, b) in std::mem::take(blobs).into_iter().enumerate() {
        if !b.pixels.is_empty() {
            remap[i] = kept.len() as u32;
            kept.push(b);
        }
    }
    for c in comp_of.iter_mut() {
        if *c != u32::MAX {
            *c = remap[*c as usize];
        }
    }
    *blobs = kept;
}

/// A measured component.
#[derive(Debug, Clone)]
struct Component {
    colour: Colour,
    area: usize,
    /// Centroid in pixels (x, y).
    cx: f64,
    cy: f64,
    shape: Shape,
    iou: f64,
}

impl Blob {
    /// The blob's extent at half coverage: its own pixels and those within 2 pixels of it (not in
    /// another kept blob) whose colour lies at least half way from the background to the blob's
    /// colour (projected on that line). Blur and anti-aliasing move the segmentation's edge
    /// (80 from the colour is 80% coverage for white on black); half coverage is where the true
    /// shape's edge lies. Ownership goes to `owner` (first blob wins); on clean aliased renders
    /// this is exactly the blob.
    fn half_coverage(
        &self,
        frame: &[u8],
        bg: [f32; 3],
        comp_of: &[u32],
        kept: &[bool],
        owner: &mut [u32],
        w: usize,
        h: usize,
    ) -> Vec<u32> {
        const GROW: usize = 2;
        let id = comp_of[self.pixels[0] as usize];
        let c = OBJECT_RGB[self.colour as usize].map(|v| v as f32);
        let d = [c[0] - bg[0], c[1] - bg[1], c[2] - bg[2]];
        let dd = (d[0] * d[0] + d[1] * d[1] + d[2] * d[2]).max(1.0);
        let (mut i0, mut i1, mut j0, mut j1) = (usize::MAX, 0, usize::MAX, 0);
        for &p in &self.pixels {
            let (i, j) = (p as usize / w, p as usize % w);
            (i0, i1, j0, j1) = (i0.min(i), i1.max(i), j0.min(j), j1.max(j));
        }
        let (wi0, wj0) = (i0.saturating_sub(GROW), j0.saturating_sub(GROW));
        let (wi1, wj1) = ((i1 + GROW).min(h - 1), (j1 + GROW).min(w - 1));
        let ww = wj1 - wj0 + 1;
        // Chebyshev dilation of the blob within the window.
        let mut near = vec![false; (wi1 - wi0 + 1) * ww];
        for &p in &self.pixels {
            let (i, j) = (p as usize / w, p as usize % w);
            for ii in i.saturating_sub(GROW).max(wi0)..=(i + GROW).min(wi1) {
                for jj in j.saturating_sub(GROW).max(wj0)..=(j + GROW).min(wj1) {
                    near[(ii - wi0) * ww + jj - wj0] = true;
                }
            }
        }
        let mut mask = Vec::with_capacity(self.pixels.len() * 2);
        for i in wi0..=wi1 {
            for j in wj0..=wj1 {
                if !near[(i - wi0) * ww + j - wj0] {
                    continue;
                }
                let p = i * w + j;
                let other = comp_of[p];
                if other != u32::MAX && other != id && kept[other as usize] {
                    continue;
                }
                if owner[p] != u32::MAX {
                    continue;
                }
                let px = [
                    frame[p * 3] as f32 - bg[0],
                    frame[p * 3 + 1] as f32 - bg[1],
                    frame[p * 3 + 2] as f32 - bg[2],
                ];
                let alpha = (px[0] * d[0] + px[1] * d[1] + px[2] * d[2]) / dd;
                if alpha >= 0.5 {
                    owner[p] = id;
                    mask.push(p as u32);
                }
            }
        }
        if mask.is_empty() {
            // Nothing reaches half coverage (a blob of a far-off colour): fall back to the blob.
            for &p in &self.pixels {
                if owner[p as usize] == u32::MAX {
                    owner[p as usize] = id;
                    mask.push(p);
                }
            }
        }
        mask
    }
}

/// Step 3: area, centroid, bounding box and best-IoU shape of the pixels `mask`, all owned by
/// the same id in `owner`.
fn measure(colour: u8, mask: &[u32], owner: &[u32], w: usize, h: usize) -> Component {
    let colour = Colour::ALL[colour as usize];
    let Some(&first) = mask.first() else {
        return Component {
            colour,
            area: 0,
            cx: 0.0,
            cy: 0.0,
            shape: Shape::Circle,
            iou: 0.0,
        };
    };
    let id = owner[first as usize];
    let (mut sx, mut sy) = (0.0, 0.0);
    let (mut i0, mut i1, mut j0, mut j1) = (usize::MAX, 0, usize::MAX, 0);
    for &p in mask {
        let (i, j) = (p as usize / w, p as usize % w);
        sx += j as f64 + 0.5;
        sy += i as f64 + 0.5;
        (i0, i1, j0, j1) = (i0.min(i), i1.max(i), j0.min(j), j1.max(j));
    }
    let area = mask.len();
    let (cx, cy) = (sx / area as f64, sy / area as f64);
    // Template centre: the bounding box's centre (every shape's box is centred on it).
    let (tx, ty) = ((j0 + j1 + 1) as f64 / 2.0, (i0 + i1 + 1) as f64 / 2.0);
    let r_box = ((j1 + 1 - j0) + (i1 + 1 - i0)) as f64 / 4.0;
    let mut best = (Shape::Circle, -1.0);
    for &s in Shape::ALL {
        let iou = template_iou(s, tx, ty, r_box, id, owner, w, h, (i0, i1, j0, j1));
        if iou > best.1 {
            best = (s, iou);
        }
    }
    Component {
        colour,
        area,
        cx,
        cy,
        shape: best.0,
        iou: best.1,
    }
}

/// IoU between blob `id` and the aliased template of `shape` at (tx, ty) with half-extent r.
fn template_iou(
    shape: Shape,
    tx: f64,
    ty: f64,
    r: f64,
    id: u32,
    comp_of: &[u32],
    w: usize,
    h: usize,
    bbox: (usize, usize, usize, usize),
) -> f64 {
    let (bi0, bi1, bj0, bj1) = bbox;
    let i0 = bi0.min((ty - r - 1.0).floor().max(0.0) as usize);
    let i1 = bi1.max(((ty + r + 1.0).ceil().max(0.0) as usize).min(h - 1));
    let j0 = bj0.min((tx - r - 1.0).floor().max(0.0) as usize);
    let j1 = bj1.max(((tx + r + 1.0).ceil().max(0.0) as usize).min(w - 1));
    let (mut inter, mut uni) = (0usize, 0usize);
    for i in i0..=i1 {
        let dy = i as f64 + 0.5 - ty;
        for j in j0..=j1 {
            let a = comp_of[i * w + j] == id;
            let b = shape.contains(j as f64 + 0.5 - tx, dy, r);
            inter += (a && b) as usize;
            uni += (a || b) as usize;
        }
    }
    if uni == 0 {
        0.0
    } else {
        inter as f64 / uni as f64
    }
}

/// Step 4-5: links components into tracks per colour and summarises each track.
fn track(per_frame: &[Vec<Component>], w: usize, h: usize, fps: f32) -> Vec<Track> {
    struct Live {
        colour: Colour,
        last: (f64, f64),
        last_frame: usize,
        obs: Vec<Option<Component>>,
    }
    let n = per_frame.len();
    let gate = TRACK_GATE * (REF_FPS / fps as f64).max(1.0);
    let mut live: Vec<Live> = Vec::new();
    for (f, comps) in per_frame.iter().enumerate() {
        let pos: Vec<(f64, f64)> = comps
            .iter()
            .map(|c| (c.cx / w as f64, c.cy / h as f64))
            .collect();
        let mut pairs: Vec<(f64, usize, usize)> = Vec::new();
        for (t, l) in live.iter().enumerate() {
            let gap = f - l.last_frame;
            if gap > TRACK_MAX_GAP + 1 {
                continue;
            }
            for (c, comp) in comps.iter().enumerate() {
                if comp.colour != l.colour {
                    continue;
                }
                let d = ((pos[c].0 - l.last.0).powi(2) + (pos[c].1 - l.last.1).powi(2)).sqrt();
                if d <= gate * gap as f64 {
                    pairs.push((d, t, c));
                }
            }
        }
        pairs.sort_by(|a, b| a.0.total_cmp(&b.0));
        let mut t_used = vec![false; live.len()];
        let mut c_used = vec![false; comps.len()];
        for (_, t, c) in pairs {
            if t_used[t] || c_used[c] {
                continue;
            }
            t_used[t] = true;
            c_used[c] = true;
            live[t].last = pos[c];
            live[t].last_frame = f;
            live[t].obs[f] = Some(comps[c].clone());
        }
        for (c, comp) in comps.iter().enumerate() {
            if !c_used[c] {
                let mut obs = vec![None; n];
                obs[f] = Some(comp.clone());
                live.push(Live {
                    colour: comp.colour,
                    last: pos[c],
                    last_frame: f,
                    obs,
                });
            }
        }
    }
    live.into_iter()
        .map(|l| summarise(l.colour, l.obs, w, h, fps))
        .collect()
}

fn summarise(colour: Colour, obs: Vec<Option<Component>>, w: usize, h: usize, fps: f32) -> Track {
    let centroids: Vec<Option<(f64, f64)>> = obs
        .iter()
        .map(|o| o.as_ref().map(|c| (c.cx / w as f64, c.cy / h as f64)))
        .collect();
    let areas: Vec<Option<usize>> = obs.iter().map(|o| o.as_ref().map(|c| c.area)).collect();
    let shapes: Vec<Option<Shape>> = obs.iter().map(|o| o.as_ref().map(|c| c.shape)).collect();
    let present: Vec<&Component> = obs.iter().flatten().collect();
    // Majority shape, ties to the larger summed IoU.
    let mut votes = [(0usize, 0.0f64); 4];
    for c in &present {
        votes[c.shape.index()].0 += 1;
        votes[c.shape.index()].1 += c.iou;
    }
    let mut shape = 0;
    for s in 1..4 {
        if (votes[s].0, votes[s].1) > (votes[shape].0, votes[shape].1) {
            shape = s;
        }
    }
    let shape = Shape::ALL[shape];
    let mut a: Vec<f64> = present.iter().map(|c| c.area as f64).collect();
    a.sort_by(f64::total_cmp);
    let median_area = match a.len() {
        0 => 0.0,
        k if k % 2 == 1 => a[k / 2],
        k => 0.5 * (a[k / 2 - 1] + a[k / 2]),
    };
    let unit = w.min(h) as f64;
    let threshold =
        0.5 * (shape.area(Size::Small.radius() * unit) + shape.area(Size::Large.radius() * unit));
    let size = if median_area > threshold {
        Size::Large
    } else {
        Size::Small
    };
    let (motion, speed) = motion_of(&centroids, fps);
    Track {
        colour,
        frames_present: present.len(),
        centroids,
        areas,
        shapes,
        shape,
        median_area,
        size,
        motion,
        speed,
    }
}

/// Step 5: motion from the first-to-last displacement, speed from the fitted slope.
fn motion_of(centroids: &[Option<(f64, f64)>], fps: f32) -> (Motion, Option<Speed>) {
    let pts: Vec<(f64, (f64, f64))> = centroids
        .iter()
        .enumerate()
        .filter_map(|(f, c)| c.map(|c| (f as f64, c)))
        .collect();
    let (Some(first), Some(last)) = (pts.first(), pts.last()) else {
        return (Motion::Still, None);
    };
    let (dx, dy) = (last.1 .0 - first.1 .0, last.1 .1 - first.1 .1);
    if pts.len() < 2 || (dx * dx + dy * dy).sqrt() < STILL_DISPLACEMENT {
        return (Motion::Still, None);
    }
    let horizontal = dx.abs() >= dy.abs();
    let motion = match (horizontal, if horizontal { dx } else { dy } < 0.0) {
        (true, true) => Motion::Left,
        (true, false) => Motion::Right,
        (false, true) => Motion::Up,
        (false, false) => Motion::Down,
    };
    // Least-squares slope of the dominant coordinate against the frame index.
    let k = pts.len() as f64;
    let coord = |p: &(f64, (f64, f64))| if horizontal { p.1 .0 } else { p.1 .1 };
    let mt = pts.iter().map(|p| p.0).sum::<f64>() / k;
    let mc = pts.iter().map(coord).sum::<f64>() / k;
    let (mut num, mut den) = (0.0, 0.0);
    for p in &pts {
        num += (p.0 - mt) * (coord(p) - mc);
        den += (p.0 - mt).powi(2);
    }
    let per_frame_at_8 = (num / den).abs() * fps as f64 / REF_FPS;
    let speed = if per_frame_at_8 > SPEED_THRESHOLD {
        Speed::Fast
    } else {
        Speed::Slow
    };
    (motion, Some(speed))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::caption::parse_caption;
    use crate::render::{render, RenderOpts};
    use crate::scene::{Object, Scene};

    fn obj(
        shape: Shape,
        colour: Colour,
        size: Size,
        motion: Motion,
        speed: Option<Speed>,
        x0: f64,
        y0: f64,
    ) -> Object {
        Object {
            shape,
            colour,
            size,
            motion,
            speed,
            x0,
            y0,
        }
    }

    fn scene() -> Scene {
        Scene {
            background: Background::Brown,
            objects: vec![
                obj(
                    Shape::Cross,
                    Colour::Orange,
                    Size::Large,
                    Motion::Down,
                    Some(Speed::Slow),
                    0.25,
                    0.2,
                ),
                obj(
                    Shape::Triangle,
                    Colour::Cyan,
                    Size::Small,
                    Motion::Left,
                    Some(Speed::Fast),
                    0.85,
                    0.75,
                ),
            ],
        }
    }

    const CAPTION: &str = "a large orange cross moving slowly down and a small cyan triangle going quickly left on a brown background";

    #[test]
    fn recovers_a_known_scene_at_any_frame_rate() {
        let cap = parse_caption(CAPTION).unwrap();
        for (fps, frames) in [(8.0, 17), (24.0, 49), (4.0, 9)] {
            let opts = RenderOpts {
                width: 64,
                height: 96,
                frames,
                fps,
                antialias: false,
            };
            let s = score_clip_at(&render(&scene(), opts), 64, 96, fps, &cap).unwrap();
            assert!(s.all_correct(), "{fps} fps: {s:#?}");
            assert_eq!(s.count, 2);
            assert_eq!(s.background, Background::Brown);
            let t = &s.tracks[s.objects[0].matched.unwrap()];
            assert_eq!(
                (t.shape, t.size, t.motion, t.speed),
                (Shape::Cross, Size::Large, Motion::Down, Some(Speed::Slow))
            );
            assert_eq!(t.frames_present, frames);
            // Slow: 0.012 of the height per frame at 8 fps over 2 s = 0.192.
            let (first, last) = (t.centroids[0].unwrap(), t.centroids[frames - 1].unwrap());
            assert!(
                (last.1 - first.1 - 0.192).abs() < 0.01,
                "{first:?} {last:?}"
            );
        }
        // The same clip declared at the wrong rate reads as the wrong speed: at 4 fps the fast
        // triangle moves 0.0125 per frame at 8 fps.
        let opts = RenderOpts {
            width: 64,
            height: 96,
            ..Default::default()
        };
        let s = score_clip_at(&render(&scene(), opts), 64, 96, 4.0, &cap).unwrap();
        assert_eq!(s.objects[1].speed, Some(false));
        assert_eq!(s.objects[0].speed, Some(true), "slow stays slow");
    }

    #[test]
    fn judges_only_stated_attributes_and_catches_wrong_ones() {
        let opts = RenderOpts::default();
        let frames = render(&scene(), opts);
        let cap = parse_caption("a purple cross and a small cyan square moving right").unwrap();
        let s = score_clip(&frames, 64, 64, &cap).unwrap();
        let (a, b) = (&s.objects[0], &s.objects[1]);
        assert!(!a.colour && !a.shape && a.matched.is_none());
        assert_eq!((a.size, a.motion, a.speed), (None, None, None));
        assert!(b.colour && !b.shape);
        assert_eq!((b.size, b.motion, b.speed), (Some(true), Some(false), None));
        assert_eq!(s.background_ok, None);
        assert!(s.count_ok);
        let t = s.tally();
        assert_eq!((t.colour.correct, t.colour.total), (1.0, 2.0));
        assert_eq!((t.motion.correct, t.motion.total), (0.0, 1.0));
        assert_eq!(t.background.total, 0.0);
        assert!(!s.all_correct());

        // A frozen video: every object still, so stated motions are wrong.
        let frozen = vec![frames[0].clone(); 17];
        let s = score_clip(&frozen, 64, 64, &parse_caption(CAPTION).unwrap()).unwrap();
        assert_eq!(s.objects[0].motion, Some(false));
        assert_eq!(s.objects[1].speed, Some(false));
        assert!(s.objects[0].shape && s.count_ok);
        assert!(s.jerk.sum_sq < 1e-20, "{:?}", s.jerk);
    }

    #[test]
    fn same_colour_objects_match_distinct_tracks() {
        let sc = Scene {
            background: Background::Black,
            objects: vec![
                obj(
                    Shape::Square,
                    Colour::Red,
                    Size::Large,
                    Motion::Still,
                    None,
                    0.25,
                    0.3,
                ),
                obj(
                    Shape::Circle,
                    Colour::Red,
                    Size::Small,
                    Motion::Still,
                    None,
                    0.75,
                    0.7,
                ),
            ],
        };
        let frames = render(&sc, RenderOpts::default());
        let cap =
            parse_caption("a small red circle resting and a large red square resting").unwrap();
        let s = score_clip(&frames, 64, 64, &cap).unwrap();
        assert!(s.all_correct(), "{s:#?}");
        assert_ne!(s.objects[0].matched, s.objects[1].matched);
        assert_eq!(s.flicker, Some(1.0));
        // One caption object for two tracks: the count is wrong.
        let s = score_clip(&frames, 64, 64, &parse_caption("a red circle").unwrap()).unwrap();
        assert!(s.objects[0].shape && !s.count_ok);
    }

    #[test]
    fn flicker_and_jerk() {
        let a = vec![0u8; 12];
        let b = vec![51u8; 12];
        // Mean |diff| 51 between every consecutive pair: (255 - 51) / 255 = 0.8.
        assert!((flicker(&[a.clone(), b.clone(), a]) - 0.8).abs() < 1e-12);
        let t = Track {
            colour: Colour::Red,
            centroids: vec![
                Some((0.0, 0.0)),
                Some((0.1, 0.0)),
                Some((0.2, 0.0)),
                Some((0.4, 0.0)),
                None,
            ],
            areas: vec![Some(10), Some(11), Some(13), Some(9), None],
            shapes: vec![
                Some(Shape::Square),
                Some(Shape::Square),
                Some(Shape::Square),
                Some(Shape::Circle),
                None,
            ],
            frames_present: 4,
            shape: Shape::Square,
            median_area: 10.0,
            size: Size::Small,
            motion: Motion::Right,
            speed: Some(Speed::Fast),
        };
        // Third difference 0.4 - 3*0.2 + 3*0.1 - 0 = 0.1 over the one full window.
        let j = t.jerk();
        assert_eq!(j.n, 1);
        assert!((j.sum_sq - 0.01).abs() < 1e-12);
        // Frames 0 and 1 keep shape and area (13 is 30% off, frame 3 changes shape, 4 is absent).
        assert!((t.identity_consistency() - 0.4).abs() < 1e-12);
    }

    #[test]
    fn bad_frames_are_errors() {
        let cap = parse_caption("a red circle").unwrap();
        let e = score_clip(&[], 64, 64, &cap).unwrap_err().to_string();
        assert!(e.contains("no"), "{e}");
        let e = score_clip(&[vec![0; 10]], 64, 64, &cap)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("frame 0 has 10 bytes") && e.contains("12288"),
            "{e}"
        );
        let e = score_clip_at(&[vec![0; 12]], 2, 2, 0.0, &cap)
            .unwrap_err()
            .to_string();
        assert!(e.contains("fps"), "{e}");
    }
}
