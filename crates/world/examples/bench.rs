//! Throughput of rendering and scoring: `cargo run --release -p vdit-world --example bench -- [COUNT] [WxHxF] [aa]`
//! (the same measurement as `vdit world bench`).

use vdit_world::{bench::bench, RenderOpts, Split};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let count: u64 = args.first().map_or(Ok(1000), |s| s.parse())?;
    let mut opts = RenderOpts::default();
    if let Some(dims) = args.get(1) {
        let v: Vec<usize> = dims.split('x').map(str::parse).collect::<Result<_, _>>()?;
        if let [w, h, f] = v[..] {
            (opts.width, opts.height, opts.frames) = (w, h, f);
        } else {
            return Err(format!("expected WxHxF, found {dims:?}").into());
        }
    }
    opts.antialias = args.get(2).is_some_and(|s| s == "aa");
    let r = bench(Split::Train, 0, count, opts)?;
    println!(
        "{} clips of {}x{}x{}{}, {} threads: render + score {:.2} s = {:.0} clips/s (render alone {:.2} s); all-correct {:?}",
        r.clips,
        opts.frames,
        opts.width,
        opts.height,
        if opts.antialias { " anti-aliased" } else { "" },
        r.threads,
        r.total_s,
        r.clips_per_s(),
        r.render_s,
        r.report.summary()["all"].all_correct
    );
    Ok(())
}
