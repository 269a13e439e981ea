//! Export and evaluation on disk: `captions.jsonl` + PNG / GIF / MP4 clips, read back through
//! vdit-video and scored; the report's JSON and table agree; bad inputs give clear errors.

use std::path::{Path, PathBuf};
use vdit_world::*;

struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> Self {
        let p = std::env::temp_dir().join(format!("vdit-world-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn summary(dir: &Path) -> (Report, std::collections::BTreeMap<String, GroupSummary>) {
    let clips = score_dir(dir).unwrap();
    let r = report(&clips);
    let s = r.summary();
    (r, s)
}

#[test]
fn png_export_round_trips_and_scores_perfectly() {
    let d = TempDir::new("png");
    let opts = RenderOpts {
        width: 96,
        height: 64,
        ..Default::default()
    };
    let recs = export(&d.0, Split::ValComp, 30, 5, opts, ClipFormat::Png).unwrap();
    assert_eq!(recs.len(), 30);
    assert!(d.0.join("val-comp-000000/frame_000.png").is_file());
    assert!(d.0.join("val-comp-000029/frame_016.png").is_file());
    assert!(!d.0.join("val-comp-000000/frame_017.png").exists());

    // captions.jsonl: one line per clip with the documented fields.
    let text = std::fs::read_to_string(d.0.join("captions.jsonl")).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 30);
    let v: serde_json::Value = serde_json::from_str(lines[3]).unwrap();
    assert_eq!(v["id"], "val-comp-000003");
    assert_eq!(v["split"], "val-comp");
    for k in ["shape", "colour", "size", "motion", "speed", "x0", "y0"] {
        assert!(
            v["scene"]["objects"][0].get(k).is_some(),
            "{k} missing in {v}"
        );
    }
    assert!(v["scene"]["background"].is_string());
    assert_eq!(read_records(&d.0.join("captions.jsonl")).unwrap(), recs);
    // The same clip regenerates identically (deterministic in split, seed, index).
    let (scene, cap) = sample_clip(Split::ValComp, 5, 3, opts.duration());
    assert_eq!(recs[3].scene.as_ref(), Some(&scene));
    assert_eq!(recs[3].caption, cap);
    assert!(Split::ValComp.admits(&scene));

    let (r, s) = summary(&d.0);
    assert_eq!(s.keys().collect::<Vec<_>>(), ["all", "val-comp"]);
    let g = &s["all"];
    assert_eq!(g.n, 30);
    for v in g.accuracy.as_array() {
        assert_eq!(*v, Some(1.0), "{g:?}");
    }
    assert_eq!(g.all_correct, Some(1.0));
    assert_eq!(
        g.jerk_ratio,
        Some(1.0),
        "ground truth is its own ground truth"
    );

    // The table prints exactly the report's numbers.
    let table = r.table();
    let json = r.to_json();
    let all_row = table.lines().find(|l| l.starts_with("all ")).unwrap();
    for k in Attrs::<()>::NAMES {
        let x = json["all"]["accuracy"][k].as_f64().unwrap();
        assert!(
            all_row.contains(&format!("{x:.4}")),
            "{k}: {x} not in {all_row}"
        );
    }
    for k in ["all_correct", "identity_consistency", "jerk_ratio"] {
        let x = json["all"][k].as_f64().unwrap();
        assert!(
            all_row.contains(&format!("{x:.4}")),
            "{k}: {x} not in {all_row}"
        );
    }
    println!("{table}");
}

#[test]
fn gif_and_mp4_clips_score() {
    for (fmt, ext, min) in [
        (ClipFormat::Gif, "gif", 0.995),
        (ClipFormat::Mp4, "mp4", 0.97),
    ] {
        let d = TempDir::new(ext);
        export(&d.0, Split::Train, 24, 9, RenderOpts::default(), fmt).unwrap();
        assert!(d.0.join(format!("train-000000.{ext}")).is_file());
        let (r, s) = summary(&d.0);
        println!("{ext}:\n{}", r.table());
        for (k, v) in Attrs::<()>::NAMES.iter().zip(s["all"].accuracy.as_array()) {
            assert!(v.unwrap() >= min, "{ext}: {k} {v:?}");
        }
    }
}

#[test]
fn records_without_split_or_scene_count_under_all() {
    let d = TempDir::new("minimal");
    export(
        &d.0,
        Split::Train,
        4,
        1,
        RenderOpts::default(),
        ClipFormat::Png,
    )
    .unwrap();
    // Keep only id and caption.
    let recs = read_records(&d.0.join("captions.jsonl")).unwrap();
    let lines: Vec<String> = recs
        .iter()
        .map(|r| serde_json::json!({"id": r.id, "caption": r.caption}).to_string())
        .collect();
    std::fs::write(d.0.join("captions.jsonl"), lines.join("\n") + "\n\n").unwrap();
    let (_, s) = summary(&d.0);
    assert_eq!(s.keys().collect::<Vec<_>>(), ["all"]);
    assert_eq!(s["all"].n, 4);
    assert_eq!(s["all"].jerk_ratio, None);
    assert_eq!(s["all"].all_correct, Some(1.0));
}

#[test]
fn bad_datasets_give_clear_errors() {
    let d = TempDir::new("bad");
    let write = |s: &str| std::fs::write(d.0.join("captions.jsonl"), s).unwrap();
    let err = |_: ()| score_dir(&d.0).unwrap_err().to_string();

    write("{\"id\": \"x\", \"caption\": \"a red circle\"}\n{\"id\": \"y\"}\n");
    let e = err(());
    assert!(e.contains("line 2") && e.contains("caption"), "{e}");

    write("{\"id\": \"x\", \"caption\": \"a red circle\"}\n{\"id\": \"y\", \"caption\": \"a pink circle\"}\n");
    let e = err(());
    assert!(e.contains("line 2") && e.contains("\"pink\""), "{e}");

    write("{\"id\": \"x\", \"caption\": \"a red circle\"}\n{\"id\": \"x\", \"caption\": \"a red circle\"}\n");
    assert!(err(()).contains("appears twice"));

    write("{\"id\": \"../x\", \"caption\": \"a red circle\"}\n");
    assert!(err(()).contains("not a plain file name"));

    write("{\"id\": \"missing\", \"caption\": \"a red circle\", \"split\": \"train\"}\n");
    let e = err(());
    assert!(
        e.contains("\"missing\"") && e.contains("missing.gif"),
        "{e}"
    );

    write("{\"id\": \"x\", \"caption\": \"a red circle\", \"split\": \"test\"}\n");
    let e = err(());
    assert!(e.contains("line 1") && e.contains("test"), "{e}");

    std::fs::remove_file(d.0.join("captions.jsonl")).unwrap();
    assert!(err(()).contains("captions.jsonl"));
}

/// `write_clip_scores`: one JSON line per clip, in order, that reads back to the same score;
/// on ground-truth renders each line shows the scene's objects recovered as its tracks.
#[test]
fn per_clip_scores_round_trip_and_show_the_scene() {
    let d = TempDir::new("clip-scores");
    let opts = RenderOpts::default(); // 64x64, 17 frames
    let recs = export(&d.0, Split::ValIid, 12, 3, opts, ClipFormat::Png).unwrap();
    let clips = score_dir(&d.0).unwrap();
    let path = d.0.join("scores.jsonl");
    write_clip_scores(&path, &clips).unwrap();
    let text = std::fs::read_to_string(&path).unwrap();
    let lines: Vec<ClipScoreLine> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), recs.len());
    for ((line, rec), clip) in lines.iter().zip(&recs).zip(&clips) {
        assert_eq!(line.id, rec.id);
        assert_eq!(line.caption, rec.caption);
        // Equal up to the last digit of a float (serde_json's parser may round the shortest
        // decimal to a neighbouring f64).
        let (a, b) = (
            serde_json::to_value(&line.score).unwrap(),
            serde_json::to_value(&clip.score).unwrap(),
        );
        assert!(nearly_equal(&a, &b), "{}: {a} vs {b}", line.id);
        let scene = rec.scene.as_ref().unwrap();
        assert_eq!(line.score.count, scene.objects.len(), "{}", line.id);
        let counted: Vec<_> = line
            .score
            .tracks
            .iter()
            .filter(|t| t.is_counted(line.score.frames))
            .collect();
        assert_eq!(counted.len(), scene.objects.len(), "{}", line.id);
        for o in &scene.objects {
            assert!(
                counted
                    .iter()
                    .any(|t| t.colour == o.colour && t.shape == o.shape && t.motion == o.motion),
                "{}: {o:?} not among the tracks",
                line.id
            );
        }
    }
}

fn nearly_equal(a: &serde_json::Value, b: &serde_json::Value) -> bool {
    use serde_json::Value::*;
    match (a, b) {
        (Number(x), Number(y)) => {
            let (x, y) = (x.as_f64().unwrap(), y.as_f64().unwrap());
            (x - y).abs() <= 1e-12 * x.abs().max(1.0)
        }
        (Array(x), Array(y)) => {
            x.len() == y.len() && x.iter().zip(y).all(|(u, v)| nearly_equal(u, v))
        }
        (Object(x), Object(y)) => {
            x.len() == y.len()
                && x.iter()
                    .all(|(k, u)| y.get(k).is_some_and(|v| nearly_equal(u, v)))
        }
        _ => a == b,
    }
}
