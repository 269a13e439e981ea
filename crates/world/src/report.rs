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
//!   whose record carries the scene take part).
//!
//! Values are `null` where nothing was measured, and rounded to 4 decimals; the printed table
//! shows the same numbers.

use crate::caption::ParsedCaption;
use crate::scene::Scene;
use crate::score::{judge_objects, tally, Attrs, ClipScore, JerkStats, Recovered, Tally};
use crate::split::{clip_rng, sample_scene, Split};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::OnceLock;

/// Scenes per split in the chance pool.
pub const CHANCE_POOL: usize = 1024;
/// Seed of the chance pool.
pub const CHANCE_SEED: u64 = 0xC4A7CE;

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
        }
        s
    }
}
