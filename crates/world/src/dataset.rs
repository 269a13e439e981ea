//! Datasets on disk: `vdit world sample` writes them and `vdit eval world` scores them.
//!
//! A dataset directory holds `captions.jsonl` and one clip per line: `DIR/<id>/frame_000.png`,
//! ... (PNG frames, the default), or `DIR/<id>.gif` / `DIR/<id>.mp4`. Each line of
//! `captions.jsonl` is a [`ClipRecord`]:
//!
//! ```json
//! {"id": "val-comp-000003", "split": "val-comp", "caption": "a small red circle resting on a gray background",
//!  "scene": {"background": "gray", "objects": [{"shape": "circle", "colour": "red", "size": "small",
//!            "motion": "still", "speed": null, "x0": 0.41, "y0": 0.63}]},
//!  "seed": 0, "index": 3, "width": 64, "height": 64, "frames": 17, "fps": 8.0, "antialias": false}
//! ```
//!
//! Only `id` and `caption` are required when scoring. `split` (`train`, `val-iid` or `val-comp`)
//! groups the report (clips without it count only under `all`, with train's chance baseline);
//! `scene` enables the jerk ratio (its ground truth is rendered from it); `fps` is the rate of a
//! PNG-frame clip that has no `fps.txt`. `speed` is `null` exactly for still objects. Ids are
//! `<split>-<index:06>`.

use crate::caption::{caption, parse_caption, ParsedCaption};
use crate::render::{render, RenderOpts};
use crate::report::Report;
use crate::scene::{Scene, DEFAULT_DURATION};
use crate::score::{score_clip_at, ClipScore};
use crate::split::{clip_rng, sample_scene_for, Split, MAX_DURATION};
use crate::{Error, Result};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

/// One line of `captions.jsonl`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClipRecord {
    pub id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub split: Option<Split>,
    pub caption: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scene: Option<Scene>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub index: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub width: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub height: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frames: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fps: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub antialias: Option<bool>,
}

/// The id of clip `index` of `split`.
pub fn clip_id(split: Split, index: u64) -> String {
    format!("{}-{index:06}", split.name())
}

/// The scene and caption of clip `index` of `split` under `seed`. Scenes are sampled for
/// `duration` seconds (at least the default 2 s, so 1-, 9- and 17-frame clips of one index show
/// the same scene; at most [`MAX_DURATION`]).
pub fn sample_clip(split: Split, seed: u64, index: u64, duration: f64) -> (Scene, String) {
    let mut rng = clip_rng(split, seed, index);
    let scene = sample_scene_for(split, duration.max(DEFAULT_DURATION), &mut rng);
    let text = caption(&scene, &mut rng);
    (scene, text)
}

/// The container clips are written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClipFormat {
    /// `DIR/<id>/frame_000.png`, ...
    Png,
    Gif,
    Mp4,
}

impl ClipFormat {
    fn path(self, dir: &Path, id: &str) -> PathBuf {
        match self {
            ClipFormat::Png => dir.join(id),
            ClipFormat::Gif => dir.join(format!("{id}.gif")),
            ClipFormat::Mp4 => dir.join(format!("{id}.mp4")),
        }
    }
}

impl std::str::FromStr for ClipFormat {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s {
            "png" => Ok(ClipFormat::Png),
            "gif" => Ok(ClipFormat::Gif),
            "mp4" => Ok(ClipFormat::Mp4),
            _ => Err(Error::invalid(
                "format",
                format!("expected png, gif or mp4, found {s:?}"),
            )),
        }
    }
}

/// Renders `count` clips of `split` under `seed` into `out` (created if needed) and writes
/// `out/captions.jsonl`. Clips are made in parallel; memory holds one clip per worker.
pub fn export(
    out: &Path,
    split: Split,
    count: u64,
    seed: u64,
    opts: RenderOpts,
    format: ClipFormat,
) -> Result<Vec<ClipRecord>> {
    opts.validate()?;
    if format == ClipFormat::Mp4 && (opts.width % 2 == 1 || opts.height % 2 == 1) {
        return Err(Error::invalid(
            "format",
            format!(
                "mp4 needs even width and height, found {}x{}",
                opts.width, opts.height
            ),
        ));
    }
    if opts.duration() > MAX_DURATION {
        tracing::warn!(
            duration = opts.duration(),
            max = MAX_DURATION,
            "clips longer than the world's longest path: fast objects may leave the frame"
        );
    }
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let records: Vec<ClipRecord> = (0..count)
        .into_par_iter()
        .map(|index| {
            let (scene, text) = sample_clip(split, seed, index, opts.duration());
            let id = clip_id(split, index);
            let video = vdit_video::Video {
                width: opts.width as u32,
                height: opts.height as u32,
                fps: opts.fps,
                frames: render(&scene, opts),
            };
            let path = format.path(out, &id);
            vdit_video::write_video(&path, &video)
                .map_err(|e| Error::video(&path, e.to_string()))?;
            Ok(ClipRecord {
                id,
                split: Some(split),
                caption: text,
                scene: Some(scene),
                seed: Some(seed),
                index: Some(index),
                width: Some(opts.width),
                height: Some(opts.height),
                frames: Some(opts.frames),
                fps: Some(opts.fps),
                antialias: Some(opts.antialias),
            })
        })
        .collect::<Result<_>>()?;
    write_records(&out.join("captions.jsonl"), &records)?;
    Ok(records)
}

/// Writes records as JSON lines.
pub fn write_records(path: &Path, records: &[ClipRecord]) -> Result<()> {
    write_json_lines(path, records)
}

/// Writes one JSON line per item.
fn write_json_lines<T: Serialize>(path: &Path, items: impl IntoIterator<Item = T>) -> Result<()> {
    let f = std::fs::File::create(path).map_err(|e| Error::io(path, e))?;
    let mut w = std::io::BufWriter::new(f);
    for item in items {
        let line = serde_json::to_string(&item).map_err(|e| Error::video(path, e.to_string()))?;
        writeln!(w, "{line}").map_err(|e| Error::io(path, e))?;
    }
    w.flush().map_err(|e| Error::io(path, e))
}

/// Reads `captions.jsonl` (blank lines skipped), checking ids and captions. Errors name the
/// line and the field or caption word at fault.
pub fn read_records(path: &Path) -> Result<Vec<ClipRecord>> {
    let f = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut out = Vec::new();
    let mut ids = std::collections::HashSet::new();
    for (i, line) in std::io::BufReader::new(f).lines().enumerate() {
        let line = line.map_err(|e| Error::io(path, e))?;
        if line.trim().is_empty() {
            continue;
        }
        let rec: ClipRecord = serde_json::from_str(&line).map_err(|e| Error::Record {
            path: path.into(),
            line: i + 1,
            msg: e.to_string(),
        })?;
        if rec.id.is_empty() || rec.id.contains(['/', '\\']) || rec.id.starts_with('.') {
            return Err(Error::Record {
                path: path.into(),
                line: i + 1,
                msg: format!("id {:?} is not a plain file name", rec.id),
            });
        }
        if let Err(e) = parse_caption(&rec.caption) {
            return Err(Error::Record {
                path: path.into(),
                line: i + 1,
                msg: format!("id {:?}: {e}", rec.id),
            });
        }
        if !ids.insert(rec.id.clone()) {
            return Err(Error::Record {
                path: path.into(),
                line: i + 1,
                msg: format!("id {:?} appears twice", rec.id),
            });
        }
        out.push(rec);
    }
    Ok(out)
}

/// The clip of `id` in `dir`: `DIR/<id>/`, `DIR/<id>.gif` or `DIR/<id>.mp4`, the first that
/// exists.
pub fn find_clip(dir: &Path, id: &str) -> Result<PathBuf> {
    let cands = [
        dir.join(id),
        dir.join(format!("{id}.gif")),
        dir.join(format!("{id}.mp4")),
    ];
    let found = if cands[0].is_dir() {
        Some(&cands[0])
    } else {
        cands[1..].iter().find(|p| p.is_file())
    };
    found.cloned().ok_or_else(|| {
        Error::video(
            dir,
            format!("no clip for id {id:?}: expected a directory {id}/ of PNG frames, {id}.gif or {id}.mp4"),
        )
    })
}

/// One scored clip of a dataset.
#[derive(Debug, Clone)]
pub struct ScoredClip {
    pub record: ClipRecord,
    pub caption: ParsedCaption,
    pub score: ClipScore,
    /// The score of the aliased ground-truth render of `record.scene`, when present.
    pub ground_truth: Option<ClipScore>,
}

/// Reads and scores every clip of the dataset in `dir` (in parallel), in `captions.jsonl` order.
pub fn score_dir(dir: &Path) -> Result<Vec<ScoredClip>> {
    let list = dir.join("captions.jsonl");
    let records = read_records(&list)?;
    records
        .into_par_iter()
        .map(|record| {
            // Already validated (with its line number) by read_records.
            let parsed = parse_caption(&record.caption)?;
            let path = find_clip(dir, &record.id)?;
            let video =
                vdit_video::read_video(&path).map_err(|e| Error::video(&path, e.to_string()))?;
            let (w, h) = (video.width as usize, video.height as usize);
            // A PNG directory without fps.txt reads at 8 fps; the record may know better.
            let fps = if path.is_dir() && !path.join("fps.txt").exists() {
                record.fps.unwrap_or(video.fps)
            } else {
                video.fps
            };
            let score = score_clip_at(&video.frames, w, h, fps, &parsed)
                .map_err(|e| Error::video(&path, e.to_string()))?;
            let ground_truth = match &record.scene {
                Some(scene) => {
                    let opts = RenderOpts {
                        width: w,
                        height: h,
                        frames: video.frames.len(),
                        fps,
                        antialias: false,
                    };
                    Some(score_clip_at(&render(scene, opts), w, h, fps, &parsed)?)
                }
                None => None,
            };
            Ok(ScoredClip {
                record,
                caption: parsed,
                score,
                ground_truth,
            })
        })
        .collect()
}

/// One line of a per-clip score file ([`write_clip_scores`]): a clip's id, its caption and
/// everything the scorer recovered from it (background, every track with its per-frame
/// centroids, areas and shapes, and the judgement of each caption object).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClipScoreLine {
    pub id: String,
    pub caption: String,
    pub score: ClipScore,
}

/// Writes one [`ClipScoreLine`] per clip as JSON lines, in the clips' order: what to read when
/// the report's rates are not enough to tell why a model fails (spurious tracks, a shape
/// drawn as another, a direction reversed).
pub fn write_clip_scores(path: &Path, clips: &[ScoredClip]) -> Result<()> {
    write_json_lines(
        path,
        clips.iter().map(|c| ClipScoreLine {
            id: c.record.id.clone(),
            caption: c.record.caption.clone(),
            score: c.score.clone(),
        }),
    )
}

/// The report over scored clips.
pub fn report(clips: &[ScoredClip]) -> Report {
    let mut r = Report::new();
    for c in clips {
        r.add(
            c.record.split,
            &c.caption,
            &c.score,
            c.ground_truth.as_ref(),
        );
    }
    r
}
