//! Throughput of the world: sample, render, caption, parse and score clips in memory.

use crate::caption::parse_caption;
use crate::dataset::sample_clip;
use crate::render::{render, RenderOpts};
use crate::report::Report;
use crate::score::score_clip_at;
use crate::split::Split;
use crate::Result;
use rayon::prelude::*;
use std::time::Instant;

/// Timings of [`fn@bench`].
#[derive(Debug, Clone)]
pub struct BenchResult {
    pub clips: u64,
    pub threads: usize,
    /// Seconds for sample + render + caption + parse + score + report, fused per clip.
    pub total_s: f64,
    /// Seconds for sample + render alone.
    pub render_s: f64,
    /// The report of the scored clips (ground truth, so it should be all correct).
    pub report: Report,
}

impl BenchResult {
    pub fn clips_per_s(&self) -> f64 {
        self.clips as f64 / self.total_s
    }
}

/// Renders and scores `count` clips of `split` in parallel (rayon's pool; memory holds one clip
/// per thread), then times rendering alone.
pub fn bench(split: Split, seed: u64, count: u64, opts: RenderOpts) -> Result<BenchResult> {
    opts.validate()?;
    let (w, h) = (opts.width, opts.height);
    let t = Instant::now();
    let scored: Vec<_> = (0..count)
        .into_par_iter()
        .map(|i| {
            let (scene, text) = sample_clip(split, seed, i, opts.duration());
            let frames = render(&scene, opts);
            let parsed = parse_caption(&text)?;
            let score = score_clip_at(&frames, w, h, opts.fps, &parsed)?;
            Ok((parsed, score))
        })
        .collect::<Result<_>>()?;
    let mut report = Report::new();
    for (p, s) in &scored {
        report.add(Some(split), p, s, None);
    }
    let total_s = t.elapsed().as_secs_f64();

    let t = Instant::now();
    let probe: usize = (0..count)
        .into_par_iter()
        .map(|i| {
            let (scene, _) = sample_clip(split, seed, i, opts.duration());
            render(&scene, opts)
                .iter()
                .map(|f| f[f.len() / 2] as usize)
                .sum::<usize>()
        })
        .sum();
    std::hint::black_box(probe);
    let render_s = t.elapsed().as_secs_f64();
    Ok(BenchResult {
        clips: count,
        threads: rayon::current_num_threads(),
        total_s,
        render_s,
        report,
    })
}
