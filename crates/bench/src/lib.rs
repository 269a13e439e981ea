//! Benchmarks at the real model widths with random weights, measured the same way as the
//! diffusers scripts in `shared/bench/` so that the two can be compared side by side.

pub mod transformer;
pub mod vae;

/// Peak resident set size of this process so far, in bytes (Linux `VmHWM`), if known.
pub fn peak_rss_bytes() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}
