//! Live state shared by the HTTP side and the workers: per unfinished job a `watch` channel
//! holding its latest [`Snapshot`] (SSE streams read it) and a cancel flag (the worker's
//! observer reads it); the wake-up signal for idle workers; shutdown and pause flags.
//!
//! The store is the truth; the hub only carries what changes too often to write to disk
//! (the current step). An entry exists from just before a job is inserted until its terminal
//! state is sent, so every subscriber that finds no entry finds a finished job in the store.

use crate::job::Status;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;
use tokio::sync::watch;

/// A job's live state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    pub status: Status,
    /// Denoising steps done.
    pub step: usize,
    pub total: usize,
}

struct Entry {
    tx: watch::Sender<Snapshot>,
    cancel: Arc<AtomicBool>,
}

pub struct Hub {
    entries: Mutex<HashMap<String, Entry>>,
    /// Set when work may be waiting; cleared by the worker that wakes.
    work: Mutex<bool>,
    work_cv: Condvar,
    shutdown: AtomicBool,
    paused: AtomicBool,
    /// Mean job time (exponential average, ms): the Retry-After estimate.
    avg_job_ms: AtomicU64,
}

impl Hub {
    pub fn new(paused: bool) -> Self {
        Self {
            entries: Mutex::new(HashMap::new()),
            work: Mutex::new(true),
            work_cv: Condvar::new(),
            shutdown: AtomicBool::new(false),
            paused: AtomicBool::new(paused),
            avg_job_ms: AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.entries.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Starts tracking a queued job (before it is inserted in the store).
    pub fn track(&self, id: &str, total: usize) {
        let (tx, _) = watch::channel(Snapshot {
            status: Status::Queued,
            step: 0,
            total,
        });
        self.lock().insert(
            id.to_string(),
            Entry {
                tx,
                cancel: Arc::new(AtomicBool::new(false)),
            },
        );
    }

    /// Stops tracking a job that was never inserted (the queue was full).
    pub fn untrack(&self, id: &str) {
        self.lock().remove(id);
    }

    pub fn subscribe(&self, id: &str) -> Option<watch::Receiver<Snapshot>> {
        self.lock().get(id).map(|e| e.tx.subscribe())
    }

    pub fn snapshot(&self, id: &str) -> Option<Snapshot> {
        self.lock().get(id).map(|e| *e.tx.borrow())
    }

    /// The cancel flag of a tracked job.
    pub fn cancel_flag(&self, id: &str) -> Option<Arc<AtomicBool>> {
        self.lock().get(id).map(|e| e.cancel.clone())
    }

    pub fn update(&self, id: &str, f: impl FnOnce(&mut Snapshot)) {
        if let Some(e) = self.lock().get(id) {
            e.tx.send_modify(f);
        }
    }

    /// Sends a job's terminal state to its subscribers and stops tracking it; a running job's
    /// worker sees its cancel flag.
    pub fn finish(&self, id: &str, status: Status) {
        if let Some(e) = self.lock().remove(id) {
            e.cancel.store(true, Ordering::SeqCst);
            e.tx.send_modify(|s| s.status = status);
        }
    }

    /// Wakes the workers: a job was queued (or the server is stopping).
    pub fn notify_work(&self) {
        *self.work.lock().unwrap_or_else(|p| p.into_inner()) = true;
        self.work_cv.notify_all();
    }

    /// Blocks until work may be waiting; false when the server is stopping.
    pub fn wait_work(&self) -> bool {
        let mut w = self.work.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if self.is_shutdown() {
                return false;
            }
            if *w && !self.paused.load(Ordering::SeqCst) {
                *w = false;
                return true;
            }
            // The timeout only guards against a bug elsewhere; wake-ups come from notify_work.
            w = self
                .work_cv
                .wait_timeout(w, Duration::from_secs(5))
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    pub fn shutdown(&self) {
        self.shutdown.store(true, Ordering::SeqCst);
        self.notify_work();
    }

    pub fn is_shutdown(&self) -> bool {
        self.shutdown.load(Ordering::SeqCst)
    }

    pub fn set_paused(&self, paused: bool) {
        self.paused.store(paused, Ordering::SeqCst);
        self.notify_work();
    }

    pub fn is_paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }

    /// Records a finished job's run time.
    pub fn record_job_time(&self, d: Duration) {
        let ms = d.as_millis().min(u64::MAX as u128) as u64;
        let old = self.avg_job_ms.load(Ordering::Relaxed);
        let new = if old == 0 { ms } else { (old * 7 + ms) / 8 };
        self.avg_job_ms.store(new.max(1), Ordering::Relaxed);
    }

    /// Mean job time, if any job has run.
    pub fn avg_job_time(&self) -> Option<Duration> {
        match self.avg_job_ms.load(Ordering::Relaxed) {
            0 => None,
            ms => Some(Duration::from_millis(ms)),
        }
    }
}
