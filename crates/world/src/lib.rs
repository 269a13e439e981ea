//! Shapes World v1: the captioned synthetic video world vdit's default model is trained on and
//! scored against. The contract is `/work/shared/world/SPEC.md` (palette, shapes, sizes, speeds,
//! caption grammar, splits, scorer); this crate implements it.
//!
//! ```no_run
//! use vdit_world::*;
//! let mut rng = clip_rng(Split::Train, 0, 42);
//! let scene = sample_scene(Split::Train, &mut rng);
//! let text = caption(&scene, &mut rng);
//! let frames = render(&scene, RenderOpts { width: 64, height: 64, frames: 17, fps: 8.0, antialias: true });
//! let parsed = parse_caption(&text).unwrap();
//! let score = score_clip(&frames, 64, 64, &parsed).unwrap();
//! let mut report = Report::new();
//! report.add(Some(Split::Train), &parsed, &score, None);
//! println!("{}", report.table());
//! ```
//!
//! Modules: [`mod@scene`] (types, palette, geometry, kinematics), [`mod@split`] (split rules,
//! sampler, seeding), [`mod@render`], [`mod@caption`] (sampler and parser), [`mod@score`] (the
//! scorer), [`mod@report`] (aggregation, chance), [`mod@dataset`] (`captions.jsonl` + clips on
//! disk), [`mod@perturb`] (blur, noise, null clips for the gates), [`mod@bench`] (throughput).

pub mod bench;
pub mod caption;
pub mod dataset;
mod error;
pub mod perturb;
pub mod render;
pub mod report;
pub mod scene;
pub mod score;
pub mod split;

pub use caption::{caption, parse_caption, Attribute, ParsedCaption, ParsedObject};
pub use dataset::{
    clip_id, export, read_records, report, sample_clip, score_dir, write_clip_scores, ClipFormat,
    ClipRecord, ClipScoreLine, ScoredClip,
};
pub use error::{Error, Result};
pub use render::{render, render_at, RenderOpts};
pub use report::{ChanceModel, Confused, Confusion, GroupSummary, Report};
pub use scene::{Background, Colour, Motion, Object, Scene, Shape, Size, Speed};
pub use score::{score_clip, score_clip_at, Attrs, ClipScore, ObjectScore, Tally, Track};
pub use split::{clip_rng, sample_scene, sample_scene_for, PairClass, Split};
