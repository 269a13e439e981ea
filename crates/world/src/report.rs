//! Aggregation of clip scores into the report `vdit eval world` prints and writes.
//!
//! A report has one group per split present plus `all`. Each group carries:
//! - `n`: clips;
//! - `accuracy[a]`: correct / judged over the judgements of attribute `a` the captions state
//!   (colour and shape: every caption object; size, motion, speed: objects stating them;
//!   background: clips stating it; count: every clip);
//! - `chance[a]`: see [`ChanceModel`];
//! - `all_correct`: the rate of clips with every stated attribute and the count right, also
//!   restricted to captions of one and of two objects;
//! - `identity_consistency`: the mean over matched tracks of [`crate::Track::identity_consistency`];
//! - `flicker`: the mean VBench flicker score over clips whose caption states every object still;
//! - `jerk_ratio`: the pooled RMS third difference of matched centroid tracks divided by that of
//!   aliased ground-truth renders of the same scenes at the same size, length and rate (only clips
//!   whose record carries the scene take part);
//! - `confusion_one_object[a][stated][drawn]`: what was drawn for what was asked, counted over
//!   the one-object captions whose clip has exactly one counted track (so the drawn object is
//!   unambiguous even when its colour is wrong): for colour and shape always, for size, motion
//!   and speed when the caption states them (motion and speed only with two or more frames; a
//!   still track's speed is drawn as `none`). The diagonal is the right answers. The table lists
//!   the largest off-diagonal cells ([`Report::top_confusions`]).
//!
//! Values are `null` where nothing was measured, and rounded to 4 decimals; the printed table
//! shows the same numbers.

use crate::caption::ParsedCaption;
use crate::scene::Scene;
use crate::score::{judge_objects, tally, Attrs, ClipScore, JerkStats, Recovered, Tally, Track};
use crate::split::{clip_rng, sample_scene, Split};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::OnceLock;

/// Scenes per split in the chance pool.
pub const CHANCE_POOL: usize = 1024;
/// Seed of the chance pool.
pub const CHANCE_SEED: u64 = 0xC4A7CE;
/// Off-diagonal confusion cells the table lists per group.
pub const TABLE_CONFUSIONS: usize = 6;

/// The chance baseline.
///
/// `chance[a]` is the expected accuracy on attribute `a` of a guesser that ignores the caption
/// and shows a random scene of the clip's split (train when the split is unknown), recovered
/// perfectly and judged by the scorer's own rules: a caption object matches a scene object of
/// its colour (else every stated attribute of it is wrong), shape, size and motion must then
/// equal, a stated speed needs a moving object of that speed, count and background must equal.
/// Exactly: for each clip, every judgement the scorer made on it is replaced by its mean
/// correctness over the pool `sample_scene(split, clip_rng(split, CHANCE_SEED, i))`,
/// i = 0..CHANCE_POOL; these expectations are summed and divided by the same judgement counts
/// as the accuracy. So a video unrelated to its caption (shuffled captions) scores `chance` in
/// expectation, and one that shows nothing recoverable (noise, constant frames) scores at most
/// about that.
pub struct ChanceModel;

fn pool(split: Split) -> &'static [Scene] {
    static POOLS: OnceLock<Vec<Vec<Scene>>> = OnceLock::new();
    let pools = POOLS.get_or_init(|| {
        Split::ALL
            .iter()
            .map(|&s| {
                (0..CHANCE_POOL as u64)
                    .map(|i| sample_scene(s, &mut clip_rng(s, CHANCE_SEED, i)))
                    .collect()
            })
            .collect()
    });
    &pools[Split::ALL.iter().position(|&s| s == split).unwrap_or(0)]
}

impl ChanceModel {
    /// Expected tallies (correct = expectation, total = the judgements made) for one clip.
    pub fn expected(
        caption: &ParsedCaption,
        split: Option<Split>,
        motion_judged: bool,
    ) -> Attrs<Tally> {
        let scenes = pool(split.unwrap_or(Split::Train));
        let mut acc = Attrs::<Tally>::default();
        for s in scenes {
            let rec: Vec<Recovered> = s
                .objects
                .iter()
                .map(|o| Recovered {
                    colour: o.colour,
                    shape: o.shape,
                    size: o.size,
                    motion: o.motion,
                    speed: o.speed,
                })
                .collect();
            let objs = judge_objects(caption, &rec, motion_judged);
            let t = tally(
                &objs,
                caption.background.map(|b| b == s.background),
                rec.len() == caption.objects.len(),
            );
            acc.merge(&t);
        }
        let k = scenes.len() as f64;
        acc.map(|t| Tally {
            correct: t.correct / k,
            total: t.total / k,
        })
    }
}

#[derive(Debug, Clone, Default)]
struct Group {
    n: usize,
    acc: Attrs<Tally>,
    chance: Attrs<Tally>,
    all: Tally,
    one: Tally,
    two: Tally,
    identity: Tally,
    flicker: Tally,
    jerk: JerkStats,
    jerk_gt: JerkStats,
    confusion: Confusion,
}

/// Counts by attribute, then stated value, then drawn value (see the module docs).
pub type Confusion = BTreeMap<String, BTreeMap<String, BTreeMap<String, usize>>>;

/// The one counted track of a clip scored against a one-object caption, if there is exactly one.
fn sole_counted_track(score: &ClipScore) -> Option<&Track> {
    if score.count != 1 {
        return None;
    }
    score.tracks.iter().find(|t| t.is_counted(score.frames))
}

fn add_confusion(confusion: &mut Confusion, caption: &ParsedCaption, score: &ClipScore) {
    let ([p], Some(t)) = (caption.objects.as_slice(), sole_counted_track(score)) else {
        return;
    };
    let mut count = |attr: &str, stated: &str, drawn: &str| {
        *confusion
            .entry(attr.into())
            .or_default()
            .entry(stated.into())
            .or_default()
            .entry(drawn.into())
            .or_default() += 1;
    };
    count("colour", p.colour.name(), t.colour.name());
    count("shape", p.shape.name(), t.shape.name());
    if let Some(s) = p.size {
        count("size", s.name(), t.size.name());
    }
    if score.frames >= 2 {
        if let Some(m) = p.motion {
            count("motion", m.name(), t.motion.name());
        }
        if let Some(s) = p.speed {
            count("speed", s.name(), t.speed.map_or("none", |s| s.name()));
        }
    }
}

impl Group {
    fn add(
        &mut self,
        caption: &ParsedCaption,
        score: &ClipScore,
        chance: &Attrs<Tally>,
        gt: Option<&ClipScore>,
    ) {
        self.n += 1;
        self.acc.merge(&score.tally());
        self.chance.merge(chance);
        let ok = Some(score.all_correct());
        self.all.add(ok);
        match caption.objects.len() {
            1 => self.one.add(ok),
            2 => self.two.add(ok),
            _ => {}
        }
        for &i in &score.identity {
            self.identity.correct += i;
            self.identity.total += 1.0;
        }
        if let Some(f) = score.flicker {
            self.flicker.correct += f;
            self.flicker.total += 1.0;
        }
        if let Some(g) = gt {
            self.jerk.merge(score.jerk);
            self.jerk_gt.merge(g.jerk);
        }
        add_confusion(&mut self.confusion, caption, score);
    }

    fn summary(&self) -> GroupSummary {
        let r = |t: &Tally| t.rate().map(round4);
        let jerk_ratio = match (self.jerk.rms(), self.jerk_gt.rms()) {
            (Some(a), Some(b)) if b > 0.0 => Some(round4(a / b)),
            _ => None,
        };
        GroupSummary {
            n: self.n,
            accuracy: self.acc.map(r),
            chance: self.chance.map(r),
            all_correct: r(&self.all),
            all_correct_one_object: r(&self.one),
            all_correct_two_objects: r(&self.two),
            identity_consistency: r(&self.identity),
            flicker: r(&self.flicker),
            jerk_ratio,
            confusion_one_object: self.confusion.clone(),
        }
    }
}

fn round4(x: f64) -> f64 {
    (x * 1e4).round() / 1e4
}

/// One group of the JSON report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupSummary {
    pub n: usize,
    pub accuracy: Attrs<Option<f64>>,
    pub chance: Attrs<Option<f64>>,
    pub all_correct: Option<f64>,
    pub all_correct_one_object: Option<f64>,
    pub all_correct_two_objects: Option<f64>,
    pub identity_consistency: Option<f64>,
    pub flicker: Option<f64>,
    pub jerk_ratio: Option<f64>,
    /// Absent from reports written before it was added.
    #[serde(default)]
    pub confusion_one_object: Confusion,
}

/// One off-diagonal cell of a confusion table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Confused {
    pub attribute: String,
    pub stated: String,
    pub drawn: String,
    /// Clips where `stated` was drawn as `drawn`.
    pub count: usize,
    /// Clips stating `stated` (the row's total).
    pub of: usize,
}

impl std::fmt::Display for Confused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} {}->{} {}/{}",
            self.attribute, self.stated, self.drawn, self.count, self.of
        )
    }
}

impl GroupSummary {
    /// The `k` largest off-diagonal cells of `confusion_one_object`, largest count first (ties:
    /// the larger share of its row, then attribute and value names).
    pub fn top_confusions(&self, k: usize) -> Vec<Confused> {
        let mut cells = Vec::new();
        for (attr, rows) in &self.confusion_one_object {
            for (stated, row) in rows {
                let of = row.values().sum();
                for (drawn, &count) in row {
                    if drawn != stated {
                        cells.push(Confused {
                            attribute: attr.clone(),
                            stated: stated.clone(),
                            drawn: drawn.clone(),
                            count,
                            of,
                        });
                    }
                }
            }
        }
        cells.sort_by(|a, b| {
            b.count
                .cmp(&a.count)
                .then((b.count * a.of).cmp(&(a.count * b.of)))
                .then_with(|| {
                    (&a.attribute, &a.stated, &a.drawn).cmp(&(&b.attribute, &b.stated, &b.drawn))
                })
        });
        cells.truncate(k);
        cells
    }
}

/// Scores aggregated per split and over all clips.
#[derive(Debug, Clone, Default)]
pub struct Report {
    groups: BTreeMap<String, Group>,
}

impl Report {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one clip: its split (if known), caption, score, and optionally the score of the
    /// aliased ground-truth render of its scene (for the jerk ratio).
    pub fn add(
        &mut self,
        split: Option<Split>,
        caption: &ParsedCaption,
        score: &ClipScore,
        ground_truth: Option<&ClipScore>,
    ) {
        let chance = ChanceModel::expected(caption, split, score.frames >= 2);
        self.groups
            .entry("all".into())
            .or_default()
            .add(caption, score, &chance, ground_truth);
        if let Some(s) = split {
            self.groups.entry(s.name().into()).or_default().add(
                caption,
                score,
                &chance,
                ground_truth,
            );
        }
    }

    /// Number of clips added.
    pub fn len(&self) -> usize {
        self.groups.get("all").map_or(0, |g| g.n)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The report: group name (`all`, `train`, `val-iid`, `val-comp`) to its summary.
    pub fn summary(&self) -> BTreeMap<String, GroupSummary> {
        self.groups
            .iter()
            .map(|(k, g)| (k.clone(), g.summary()))
            .collect()
    }

    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self.summary()).unwrap_or(serde_json::Value::Null)
    }

    /// The report as pretty JSON, keys in the documented order.
    pub fn to_json_pretty(&self) -> String {
        serde_json::to_string_pretty(&self.summary()).unwrap_or_else(|_| "null".into())
    }

    /// A text table of the same numbers as the JSON report: per group one accuracy row and one
    /// chance row.
    pub fn table(&self) -> String {
        let f = |v: Option<f64>| v.map_or("-".to_string(), |x| format!("{x:.4}"));
        let mut s = String::new();
        s.push_str(&format!(
            "{:<10} {:>6} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} | {:>7} {:>7} {:>7} {:>7} {:>7} {:>7}\n",
            "split", "n", "colour", "shape", "size", "motion", "speed", "bg", "count", "all", "1-obj", "2-obj",
            "ident", "flicker", "jerk"
        ));
        for (name, g) in self.summary() {
            let a = g.accuracy.as_array().map(|v| f(*v));
            s.push_str(&format!(
                "{:<10} {:>6} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} | {:>7} {:>7} {:>7} {:>7} {:>7} {:>7}\n",
                name,
                g.n,
                a[0],
                a[1],
                a[2],
                a[3],
                a[4],
                a[5],
                a[6],
                f(g.all_correct),
                f(g.all_correct_one_object),
                f(g.all_correct_two_objects),
                f(g.identity_consistency),
                f(g.flicker),
                f(g.jerk_ratio)
            ));
            let c = g.chance.as_array().map(|v| f(*v));
            s.push_str(&format!(
                "{:<10} {:>6} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} {:>7} |\n",
                "  chance", "", c[0], c[1], c[2], c[3], c[4], c[5], c[6]
            ));
            let top = g.top_confusions(TABLE_CONFUSIONS);
            if !top.is_empty() {
                let cells: Vec<String> = top.iter().map(|c| c.to_string()).collect();
                s.push_str(&format!("  confused (1-obj): {}\n", cells.join(", ")));
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::caption::parse_caption;
    use crate::render::{render, RenderOpts};
    use crate::scene::{Background, Colour, Motion, Object, Shape, Size, Speed};
    use crate::score::score_clip;

    fn clip(objects: Vec<Object>, text: &str, frames: usize) -> (ParsedCaption, ClipScore) {
        let scene = Scene {
            background: Background::Black,
            objects,
        };
        let opts = RenderOpts {
            width: 64,
            height: 64,
            frames,
            fps: 8.0,
            antialias: false,
        };
        let parsed = parse_caption(text).unwrap();
        let score = score_clip(&render(&scene, opts), 64, 64, &parsed).unwrap();
        (parsed, score)
    }

    fn obj(colour: Colour, shape: Shape, motion: Motion, speed: Option<Speed>, x0: f64) -> Object {
        Object {
            shape,
            colour,
            size: Size::Large,
            motion,
            speed,
            x0,
            y0: 0.5,
        }
    }

    #[test]
    fn confusion_counts_what_was_drawn_for_what_was_asked() {
        let mut r = Report::new();
        let still = |c| obj(c, Shape::Circle, Motion::Still, None, 0.5);
        // Asked orange, drawn red, twice; asked orange and drawn orange once.
        for _ in 0..2 {
            let (p, s) = clip(
                vec![still(Colour::Red)],
                "a large orange circle standing still on a black background",
                17,
            );
            r.add(Some(Split::ValIid), &p, &s, None);
        }
        let (p, s) = clip(
            vec![still(Colour::Orange)],
            "a large orange square standing still",
            17,
        );
        r.add(Some(Split::ValIid), &p, &s, None);
        // A moving square asked to move slowly left: drawn moving slowly right.
        let (p, s) = clip(
            vec![obj(
                Colour::Blue,
                Shape::Square,
                Motion::Right,
                Some(Speed::Slow),
                0.3,
            )],
            "a large blue square moving slowly left",
            17,
        );
        r.add(Some(Split::ValIid), &p, &s, None);
        // Not counted: two objects drawn for a one-object caption, and a two-object caption.
        let two = vec![
            still(Colour::Red),
            obj(Colour::Green, Shape::Square, Motion::Still, None, 0.15),
        ];
        for text in [
            "a large red circle standing still",
            "a large red circle standing still and a large green square standing still",
        ] {
            let (p, s) = clip(two.clone(), text, 17);
            assert_eq!(s.count, 2, "{text}");
            r.add(Some(Split::ValIid), &p, &s, None);
        }

        let g = &r.summary()["val-iid"];
        let c = &g.confusion_one_object;
        let cell = |a: &str, s: &str, d: &str| c[a][s].get(d).copied().unwrap_or(0);
        assert_eq!(cell("colour", "orange", "red"), 2);
        assert_eq!(cell("colour", "orange", "orange"), 1);
        assert_eq!(c["colour"]["orange"].values().sum::<usize>(), 3);
        assert_eq!(
            c["colour"]["blue"],
            BTreeMap::from([("blue".to_string(), 1)])
        );
        assert!(!c["colour"].contains_key("red"), "{c:?}");
        assert_eq!(cell("shape", "circle", "circle"), 2);
        assert_eq!(cell("shape", "square", "circle"), 1);
        assert_eq!(cell("shape", "square", "square"), 1);
        assert_eq!(cell("size", "large", "large"), 4);
        assert_eq!(cell("motion", "still", "still"), 3);
        assert_eq!(cell("motion", "left", "right"), 1);
        assert_eq!(cell("speed", "slow", "slow"), 1);
        assert_eq!(r.summary()["all"].confusion_one_object, *c);

        let top = g.top_confusions(2);
        assert_eq!(top[0].to_string(), "colour orange->red 2/3");
        // Ties at one: motion left->right (1 of 1) before shape square->circle (1 of 2).
        assert_eq!(top[1].to_string(), "motion left->right 1/1");
        assert!(r
            .table()
            .contains("confused (1-obj): colour orange->red 2/3, motion left->right 1/1"));

        // Reports written before the field existed still read.
        let mut v = serde_json::to_value(g).unwrap();
        v.as_object_mut().unwrap().remove("confusion_one_object");
        let old: GroupSummary = serde_json::from_value(v).unwrap();
        assert!(old.confusion_one_object.is_empty());
    }

    #[test]
    fn a_still_track_asked_for_a_speed_is_drawn_as_none() {
        let mut r = Report::new();
        let (p, s) = clip(
            vec![obj(Colour::White, Shape::Cross, Motion::Still, None, 0.5)],
            "a large white cross moving quickly up",
            17,
        );
        r.add(None, &p, &s, None);
        let c = &r.summary()["all"].confusion_one_object;
        assert_eq!(
            c["speed"]["fast"],
            BTreeMap::from([("none".to_string(), 1)])
        );
        assert_eq!(
            c["motion"]["up"],
            BTreeMap::from([("still".to_string(), 1)])
        );
        // One frame: motion and speed are not judged, so not counted.
        let mut r = Report::new();
        let (p, s) = clip(
            vec![obj(Colour::White, Shape::Cross, Motion::Still, None, 0.5)],
            "a large white cross moving quickly up",
            1,
        );
        r.add(None, &p, &s, None);
        let c = &r.summary()["all"].confusion_one_object;
        assert!(
            !c.contains_key("motion") && !c.contains_key("speed"),
            "{c:?}"
        );
        assert_eq!(c["colour"]["white"]["white"], 1);
    }
}
