//! The job store: one SQLite file (`<data>/jobs.sqlite3`, WAL, `synchronous=FULL`) plus the
//! output files under `<data>/videos/`. A job is committed before its id is returned, so a
//! crash at any point loses no accepted job; every state change is one statement, and the ones
//! made by the worker are conditional on the state it expects (`... WHERE status =
//! 'in_progress'`), so a `DELETE` that races a finishing job has one clear winner.
//!
//! Output files are named by the job id alone (server-made, checked by [`crate::job::is_valid_id`]):
//! `<id>.mp4` and `<id>.gif`, written as `<id>.part.<ext>` and renamed when complete.

use crate::job::{now_unix, Job, JobError, Params, Status};
use rusqlite::{params, Connection, OptionalExtension, Row};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use vdit_core::{Error, Result};

/// A job that was interrupted this many times (a server death while it ran) is failed on the
/// next start instead of re-queued: it may be what kills the server.
pub const MAX_ATTEMPTS: i64 = 3;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS jobs (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    id           TEXT NOT NULL UNIQUE,
    status       TEXT NOT NULL,
    progress     INTEGER NOT NULL DEFAULT 0,
    created_at   INTEGER NOT NULL,
    started_at   INTEGER,
    completed_at INTEGER,
    params       TEXT NOT NULL,
    error_code   TEXT,
    error        TEXT,
    attempts     INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_by_status ON jobs(status, seq);
";

/// Counts of jobs by state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Counts {
    pub queued: usize,
    pub in_progress: usize,
    pub completed: usize,
    pub failed: usize,
    pub cancelled: usize,
}

/// What `DELETE /v1/videos/{id}` did.
#[derive(Debug, Clone, PartialEq)]
pub enum Removal {
    /// A queued or running job, now `cancelled` (its row stays).
    Cancelled(Box<Job>),
    /// A finished job, deleted with its files.
    Deleted,
    NotFound,
}

/// What [`Store::recover`] did at start-up.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Recovery {
    /// Jobs that were running when the server stopped, queued again.
    pub requeued: usize,
    /// Jobs interrupted [`MAX_ATTEMPTS`] times, failed.
    pub failed: usize,
    /// Partial output files removed.
    pub partial_files: usize,
}

/// One page of [`Store::list`].
#[derive(Debug, Clone)]
pub struct Page {
    pub jobs: Vec<Job>,
    pub has_more: bool,
}

pub struct Store {
    conn: Mutex<Connection>,
    db_path: PathBuf,
    videos: PathBuf,
}

fn sql_err(path: &Path, e: rusqlite::Error) -> Error {
    Error::Msg(format!("{}: {e}", path.display()))
}

fn row_to_job(row: &Row<'_>) -> rusqlite::Result<Job> {
    let status: String = row.get("status")?;
    let params: String = row.get("params")?;
    let code: Option<String> = row.get("error_code")?;
    let msg: Option<String> = row.get("error")?;
    let bad = |what: &str, v: &str| {
        rusqlite::Error::FromSqlConversionFailure(
            0,
            rusqlite::types::Type::Text,
            format!("stored {what} {v:?} is not valid").into(),
        )
    };
    Ok(Job {
        id: row.get("id")?,
        object: "video".into(),
        status: Status::parse(&status).ok_or_else(|| bad("status", &status))?,
        progress: row.get::<_, i64>("progress")?.clamp(0, 100) as u32,
        created_at: row.get("created_at")?,
        started_at: row.get("started_at")?,
        completed_at: row.get("completed_at")?,
        params: serde_json::from_str::<Params>(&params).map_err(|_| bad("params", &params))?,
        error: msg.map(|message| JobError {
            code: code.unwrap_or_else(|| "error".into()),
            message,
        }),
    })
}

impl Store {
    /// Opens (creating) `<data>/jobs.sqlite3` and `<data>/videos/`.
    pub fn open(data: &Path) -> Result<Self> {
        let videos = data.join("videos");
        std::fs::create_dir_all(&videos).map_err(|e| Error::io(&videos, e))?;
        let db_path = data.join("jobs.sqlite3");
        let conn = Connection::open(&db_path).map_err(|e| sql_err(&db_path, e))?;
        conn.busy_timeout(std::time::Duration::from_secs(10))
            .map_err(|e| sql_err(&db_path, e))?;
        // WAL: readers do not block the writer; FULL: a committed job survives power loss too.
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(|e| sql_err(&db_path, e))?;
        conn.pragma_update(None, "synchronous", "FULL")
            .map_err(|e| sql_err(&db_path, e))?;
        conn.execute_batch(SCHEMA)
            .map_err(|e| sql_err(&db_path, e))?;
        Ok(Self {
            conn: Mutex::new(conn),
            db_path,
            videos,
        })
    }

    fn with<T>(&self, f: impl FnOnce(&mut Connection) -> rusqlite::Result<T>) -> Result<T> {
        // A panic while holding the lock leaves the connection usable (each call is one
        // statement or one transaction), so a poisoned lock is taken over.
        let mut conn = self.conn.lock().unwrap_or_else(|p| p.into_inner());
        f(&mut conn).map_err(|e| sql_err(&self.db_path, e))
    }

    /// The folder of output files.
    pub fn videos_dir(&self) -> &Path {
        &self.videos
    }

    /// `<videos>/<id>.<ext>`: `id` must be server-made ([`crate::job::is_valid_id`]).
    pub fn output_path(&self, id: &str, ext: &str) -> PathBuf {
        debug_assert!(crate::job::is_valid_id(id));
        self.videos.join(format!("{id}.{ext}"))
    }

    /// `<videos>/<id>.part.<ext>`: where an output is written before it is renamed into place.
    pub fn partial_path(&self, id: &str, ext: &str) -> PathBuf {
        self.videos.join(format!("{id}.part.{ext}"))
    }

    fn remove_outputs(&self, id: &str) {
        for ext in crate::FORMATS {
            for p in [self.output_path(id, ext), self.partial_path(id, ext)] {
                if let Err(e) = std::fs::remove_file(&p) {
                    if e.kind() != std::io::ErrorKind::NotFound {
                        tracing::warn!(path = %p.display(), "cannot remove: {e}");
                    }
                }
            }
        }
    }

    /// Start-up: jobs that were running go back to the queue (or fail after [`MAX_ATTEMPTS`]),
    /// and partial output files are removed. Finished jobs are kept as they are.
    pub fn recover(&self) -> Result<Recovery> {
        let mut r = Recovery::default();
        let now = now_unix();
        self.with(|c| {
            let tx = c.transaction()?;
            r.failed = tx.execute(
                "UPDATE jobs SET status = 'failed', completed_at = ?1, error_code = 'interrupted',
                 error = 'the server stopped during this job ' || attempts || ' times; not retried'
                 WHERE status = 'in_progress' AND attempts >= ?2",
                params![now, MAX_ATTEMPTS],
            )?;
            r.requeued = tx.execute(
                "UPDATE jobs SET status = 'queued', progress = 0, started_at = NULL
                 WHERE status = 'in_progress'",
                [],
            )?;
            tx.commit()
        })?;
        if let Ok(dir) = std::fs::read_dir(&self.videos) {
            for e in dir.flatten() {
                if e.file_name().to_string_lossy().contains(".part.")
                    && std::fs::remove_file(e.path()).is_ok()
                {
                    r.partial_files += 1;
                }
            }
        }
        Ok(r)
    }

    /// Inserts a queued job unless `max_queued` jobs are already queued; returns the number
    /// queued before the insert, or `Err(queued)` when full. Count and insert are one
    /// transaction under the store's lock, so the bound holds under any concurrency.
    pub fn insert_if_room(&self, job: &Job, max_queued: usize) -> Result<Result<usize, usize>> {
        let params_json = serde_json::to_string(&job.params).expect("plain struct serialises");
        self.with(|c| {
            let tx = c.transaction()?;
            let queued: i64 = tx.query_row(
                "SELECT COUNT(*) FROM jobs WHERE status = 'queued'",
                [],
                |r| r.get(0),
            )?;
            let queued = queued as usize;
            if queued >= max_queued {
                return Ok(Err(queued));
            }
            tx.execute(
                "INSERT INTO jobs (id, status, progress, created_at, params) VALUES (?1, ?2, 0, ?3, ?4)",
                params![job.id, job.status.as_str(), job.created_at, params_json],
            )?;
            tx.commit()?;
            Ok(Ok(queued))
        })
    }

    /// Takes the oldest queued job and marks it running (one statement: two workers never get
    /// the same job).
    pub fn claim_next(&self) -> Result<Option<Job>> {
        let now = now_unix();
        self.with(|c| {
            c.query_row(
                "UPDATE jobs SET status = 'in_progress', started_at = ?1, progress = 0,
                     attempts = attempts + 1
                 WHERE seq = (SELECT seq FROM jobs WHERE status = 'queued' ORDER BY seq LIMIT 1)
                 RETURNING *",
                params![now],
                row_to_job,
            )
            .optional()
        })
    }

    /// Records a running job's progress (percent). Only while it is still running.
    pub fn set_progress(&self, id: &str, progress: u32) -> Result<()> {
        self.with(|c| {
            c.execute(
                "UPDATE jobs SET progress = ?2 WHERE id = ?1 AND status = 'in_progress'",
                params![id, progress],
            )
        })?;
        Ok(())
    }

    /// A running job finished: `completed` (progress 100) or `failed` with an error. Returns
    /// false when the job was no longer running (cancelled or deleted meanwhile); its outputs
    /// are then removed.
    pub fn finish(&self, id: &str, outcome: std::result::Result<(), JobError>) -> Result<bool> {
        let now = now_unix();
        let n = self.with(|c| match &outcome {
            Ok(()) => c.execute(
                "UPDATE jobs SET status = 'completed', progress = 100, completed_at = ?2
                 WHERE id = ?1 AND status = 'in_progress'",
                params![id, now],
            ),
            Err(e) => c.execute(
                "UPDATE jobs SET status = 'failed', completed_at = ?2, error_code = ?3, error = ?4
                 WHERE id = ?1 AND status = 'in_progress'",
                params![id, now, e.code, e.message],
            ),
        })?;
        if n == 0 {
            self.remove_outputs(id);
        }
        Ok(n == 1)
    }

    /// `DELETE`: cancels a queued or running job; deletes a finished one and its files.
    pub fn remove(&self, id: &str) -> Result<Removal> {
        let now = now_unix();
        let out = self.with(|c| {
            let tx = c.transaction()?;
            let job = tx
                .query_row("SELECT * FROM jobs WHERE id = ?1", params![id], row_to_job)
                .optional()?;
            let out = match job {
                None => Removal::NotFound,
                Some(j) if j.status.is_terminal() => {
                    tx.execute("DELETE FROM jobs WHERE id = ?1", params![id])?;
                    Removal::Deleted
                }
                Some(_) => {
                    let j = tx.query_row(
                        "UPDATE jobs SET status = 'cancelled', completed_at = ?2 WHERE id = ?1
                         RETURNING *",
                        params![id, now],
                        row_to_job,
                    )?;
                    Removal::Cancelled(Box::new(j))
                }
            };
            tx.commit()?;
            Ok(out)
        })?;
        if out == Removal::Deleted {
            self.remove_outputs(id);
        }
        Ok(out)
    }

    pub fn get(&self, id: &str) -> Result<Option<Job>> {
        self.with(|c| {
            c.query_row("SELECT * FROM jobs WHERE id = ?1", params![id], row_to_job)
                .optional()
        })
    }

    /// Jobs in submission order (`desc`: newest first), `limit` per page, starting after the
    /// job `after` (a cursor; unknown ids give `Ok(None)`).
    pub fn list(&self, limit: usize, after: Option<&str>, desc: bool) -> Result<Option<Page>> {
        self.with(|c| {
            let cursor: Option<i64> = match after {
                None => None,
                Some(a) => {
                    match c
                        .query_row("SELECT seq FROM jobs WHERE id = ?1", params![a], |r| {
                            r.get(0)
                        })
                        .optional()?
                    {
                        Some(s) => Some(s),
                        None => return Ok(None),
                    }
                }
            };
            let sql = match (desc, cursor.is_some()) {
                (true, true) => "SELECT * FROM jobs WHERE seq < ?1 ORDER BY seq DESC LIMIT ?2",
                (true, false) => "SELECT * FROM jobs WHERE ?1 IS NULL ORDER BY seq DESC LIMIT ?2",
                (false, true) => "SELECT * FROM jobs WHERE seq > ?1 ORDER BY seq ASC LIMIT ?2",
                (false, false) => "SELECT * FROM jobs WHERE ?1 IS NULL ORDER BY seq ASC LIMIT ?2",
            };
            let mut stmt = c.prepare(sql)?;
            let mut jobs = stmt
                .query_map(params![cursor, (limit + 1) as i64], row_to_job)?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            let has_more = jobs.len() > limit;
            jobs.truncate(limit);
            Ok(Some(Page { jobs, has_more }))
        })
    }

    pub fn counts(&self) -> Result<Counts> {
        self.with(|c| {
            let mut stmt = c.prepare("SELECT status, COUNT(*) FROM jobs GROUP BY status")?;
            let mut n = Counts::default();
            let rows = stmt.query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))?;
            for row in rows {
                let (s, k) = row?;
                let k = k as usize;
                match Status::parse(&s) {
                    Some(Status::Queued) => n.queued = k,
                    Some(Status::InProgress) => n.in_progress = k,
                    Some(Status::Completed) => n.completed = k,
                    Some(Status::Failed) => n.failed = k,
                    Some(Status::Cancelled) => n.cancelled = k,
                    None => {}
                }
            }
            Ok(n)
        })
    }

    /// (id, steps) of the queued jobs, oldest first.
    pub fn queued_jobs(&self) -> Result<Vec<(String, usize)>> {
        self.with(|c| {
            let mut stmt = c.prepare("SELECT * FROM jobs WHERE status = 'queued' ORDER BY seq")?;
            let jobs = stmt
                .query_map([], |r| {
                    row_to_job(r).map(|j| (j.id, j.params.num_inference_steps))
                })?
                .collect::<rusqlite::Result<Vec<_>>>()?;
            Ok(jobs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::new_id;

    fn params() -> Params {
        Params {
            prompt: "a red ball".into(),
            negative_prompt: String::new(),
            num_frames: 9,
            height: 32,
            width: 48,
            num_inference_steps: 2,
            guidance_scale: 6.0,
            use_dynamic_cfg: false,
            guidance_max_timestep: None,
            guidance_rescale: 0.0,
            seed: 7,
            fps: 8.0,
        }
    }

    fn job() -> Job {
        Job {
            id: new_id(),
            object: "video".into(),
            status: Status::Queued,
            progress: 0,
            created_at: now_unix(),
            started_at: None,
            completed_at: None,
            params: params(),
            error: None,
        }
    }

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("vdit-store-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn lifecycle_bound_recovery_and_paging() {
        let d = tmp("life");
        let s = Store::open(&d).unwrap();
        let jobs: Vec<Job> = (0..3).map(|_| job()).collect();
        for (i, j) in jobs.iter().enumerate() {
            assert_eq!(s.insert_if_room(j, 3).unwrap(), Ok(i));
        }
        assert_eq!(s.insert_if_room(&job(), 3).unwrap(), Err(3));
        assert_eq!(s.get(&jobs[1].id).unwrap().unwrap(), jobs[1]);

        // Oldest first; a claimed job leaves room in the queue.
        let a = s.claim_next().unwrap().unwrap();
        assert_eq!(a.id, jobs[0].id);
        assert_eq!(a.status, Status::InProgress);
        assert!(a.started_at.is_some());
        assert_eq!(s.insert_if_room(&job(), 3).unwrap(), Ok(2));

        // A restart re-queues the running job ahead of the others and keeps finished ones.
        let b = s.claim_next().unwrap().unwrap();
        assert!(s.finish(&b.id, Ok(())).unwrap());
        drop(s);
        let s = Store::open(&d).unwrap();
        std::fs::write(s.partial_path(&a.id, "mp4"), b"half").unwrap();
        let r = s.recover().unwrap();
        assert_eq!(
            r,
            Recovery {
                requeued: 1,
                failed: 0,
                partial_files: 1
            }
        );
        assert_eq!(s.get(&b.id).unwrap().unwrap().status, Status::Completed);
        assert_eq!(s.get(&b.id).unwrap().unwrap().progress, 100);
        assert_eq!(s.claim_next().unwrap().unwrap().id, a.id);
        assert_eq!(
            s.counts().unwrap(),
            Counts {
                queued: 2,
                in_progress: 1,
                completed: 1,
                ..Counts::default()
            }
        );

        // Paging: 4 jobs, newest first, 3 per page.
        let p1 = s.list(3, None, true).unwrap().unwrap();
        assert!(p1.has_more);
        assert_eq!(p1.jobs.len(), 3);
        let p2 = s.list(3, Some(&p1.jobs[2].id), true).unwrap().unwrap();
        assert!(!p2.has_more);
        assert_eq!(p2.jobs.len(), 1);
        assert_eq!(p2.jobs[0].id, jobs[0].id);
        let asc = s.list(10, None, false).unwrap().unwrap();
        assert_eq!(asc.jobs[0].id, jobs[0].id);
        assert!(s.list(3, Some("video_nope"), true).unwrap().is_none());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn cancel_delete_and_races_with_the_worker() {
        let d = tmp("cancel");
        let s = Store::open(&d).unwrap();
        let (q, r, f) = (job(), job(), job());
        for j in [&r, &f, &q] {
            s.insert_if_room(j, 10).unwrap().unwrap();
        }
        let running = s.claim_next().unwrap().unwrap();
        assert_eq!(running.id, r.id);
        let done = s.claim_next().unwrap().unwrap();
        std::fs::write(s.output_path(&done.id, "mp4"), b"video").unwrap();
        assert!(s.finish(&done.id, Ok(())).unwrap());

        // Queued -> cancelled; running -> cancelled, and the worker's late finish loses.
        match s.remove(&q.id).unwrap() {
            Removal::Cancelled(j) => assert_eq!(j.status, Status::Cancelled),
            other => panic!("{other:?}"),
        }
        std::fs::write(s.partial_path(&r.id, "mp4"), b"half").unwrap();
        assert!(matches!(s.remove(&r.id).unwrap(), Removal::Cancelled(_)));
        assert!(!s.finish(&r.id, Ok(())).unwrap());
        assert_eq!(s.get(&r.id).unwrap().unwrap().status, Status::Cancelled);
        assert!(!s.partial_path(&r.id, "mp4").exists());

        // Finished -> deleted with its files.
        assert_eq!(s.remove(&done.id).unwrap(), Removal::Deleted);
        assert!(s.get(&done.id).unwrap().is_none());
        assert!(!s.output_path(&done.id, "mp4").exists());
        assert_eq!(s.remove(&done.id).unwrap(), Removal::NotFound);
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_job_that_keeps_killing_the_server_is_failed() {
        let d = tmp("attempts");
        let j = job();
        {
            let s = Store::open(&d).unwrap();
            s.insert_if_room(&j, 10).unwrap().unwrap();
        }
        for i in 1..=MAX_ATTEMPTS {
            let s = Store::open(&d).unwrap();
            let r = s.recover().unwrap();
            assert_eq!(r.requeued, usize::from(i > 1), "start {i}");
            assert_eq!(s.claim_next().unwrap().unwrap().id, j.id);
            // the server dies here
        }
        let s = Store::open(&d).unwrap();
        let r = s.recover().unwrap();
        assert_eq!((r.requeued, r.failed), (0, 1));
        let got = s.get(&j.id).unwrap().unwrap();
        assert_eq!(got.status, Status::Failed);
        let e = got.error.unwrap();
        assert_eq!(e.code, "interrupted");
        assert!(e.message.contains("3 times"), "{}", e.message);
        std::fs::remove_dir_all(&d).unwrap();
    }
}
