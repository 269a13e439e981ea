//! A job as the API shows it and the store keeps it: OpenAI's video-job shape (`id`, `object`,
//! `status`, `progress`, `created_at`, ...) with diffusers' parameter names in `params`.

use serde::{Deserialize, Serialize};

/// Where a job is in its life. `queued` → `in_progress` → `completed` | `failed`; `cancelled`
/// from `queued` or `in_progress` by `DELETE`. A restart puts `in_progress` back to `queued`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    Queued,
    InProgress,
    Completed,
    Failed,
    Cancelled,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Status::Queued => "queued",
            Status::InProgress => "in_progress",
            Status::Completed => "completed",
            Status::Failed => "failed",
            Status::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "queued" => Status::Queued,
            "in_progress" => Status::InProgress,
            "completed" => Status::Completed,
            "failed" => Status::Failed,
            "cancelled" => Status::Cancelled,
            _ => return None,
        })
    }

    /// Completed, failed or cancelled: nothing more will happen to the job.
    pub fn is_terminal(self) -> bool {
        matches!(self, Status::Completed | Status::Failed | Status::Cancelled)
    }
}

/// A request's parameters with every default filled in from the model, so that a job re-run
/// after a restart gives the same video (the seed is drawn at submission when not given).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Params {
    pub prompt: String,
    pub negative_prompt: String,
    pub num_frames: usize,
    pub height: usize,
    pub width: usize,
    pub num_inference_steps: usize,
    pub guidance_scale: f64,
    pub use_dynamic_cfg: bool,
    /// Guidance only at timesteps ≤ this (absent in jobs stored before the field existed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guidance_max_timestep: Option<usize>,
    /// Guidance rescale φ (0, and absent in jobs stored before the field existed: off).
    #[serde(default, skip_serializing_if = "vdit_pipeline::defaults::is_zero")]
    pub guidance_rescale: f64,
    pub seed: u64,
    pub fps: f32,
}

/// Why a job failed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobError {
    /// `generation_failed`, `interrupted` (the server died during the job too often), ...
    pub code: String,
    pub message: String,
}

/// One job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Job {
    pub id: String,
    /// Always `"video"`.
    pub object: String,
    pub status: Status,
    /// Percent, 0..=100: denoising steps done over steps; 100 once completed.
    pub progress: u32,
    /// Unix seconds.
    pub created_at: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub completed_at: Option<i64>,
    pub params: Params,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<JobError>,
}

/// Ids are `video_` + 32 hex digits, made by the server. A request's id is checked against this
/// form before it reaches the store or a file name.
pub const ID_PREFIX: &str = "video_";

pub fn new_id() -> String {
    let n: u128 = rand::random();
    format!("{ID_PREFIX}{n:032x}")
}

pub fn is_valid_id(id: &str) -> bool {
    id.strip_prefix(ID_PREFIX)
        .is_some_and(|h| h.len() == 32 && h.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')))
}

/// Percent of `step` out of `total`, rounded down; 100 only when the job completes.
pub fn percent(step: usize, total: usize) -> u32 {
    if total == 0 {
        return 0;
    }
    ((step.min(total) * 100) / total).min(99) as u32
}

pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_and_checked() {
        let a = new_id();
        let b = new_id();
        assert_ne!(a, b);
        assert!(is_valid_id(&a) && is_valid_id(&b), "{a} {b}");
        for bad in [
            "",
            "video_",
            "video_../../etc/passwd",
            "video_0123456789abcdef0123456789ABCDEF",
            "job_0123456789abcdef0123456789abcdef",
            "video_0123456789abcdef0123456789abcdef0",
        ] {
            assert!(!is_valid_id(bad), "{bad}");
        }
    }

    #[test]
    fn percent_stays_below_100_until_completion() {
        assert_eq!(percent(0, 4), 0);
        assert_eq!(percent(1, 4), 25);
        assert_eq!(percent(4, 4), 99);
        assert_eq!(percent(3, 0), 0);
    }

    #[test]
    fn status_round_trips() {
        for s in [
            Status::Queued,
            Status::InProgress,
            Status::Completed,
            Status::Failed,
            Status::Cancelled,
        ] {
            assert_eq!(Status::parse(s.as_str()), Some(s));
            assert_eq!(
                serde_json::to_value(s).unwrap(),
                serde_json::Value::String(s.as_str().into())
            );
        }
        assert_eq!(Status::parse("running"), None);
    }
}
