//! vdit-server: video generation as a service (`vdit serve`).
//!
//! - [`api`]: the HTTP API, shaped like OpenAI's video jobs with diffusers' parameter names, plus
//!   SSE progress, the OpenAPI document (`/openapi.json`) and a web page (`/`).
//! - [`store`]: jobs in SQLite under the data folder, outputs as files beside it; a restart
//!   queues unfinished jobs again and keeps finished ones.
//! - [`worker`]: dedicated threads, each owning one loaded pipeline, one job at a time.
//! - [`validate`]: every request checked against the model and the server's [`Limits`] before a
//!   job exists.
//! - [`testing`]: a tiny model folder built from the repository's fixtures, and a small blocking
//!   HTTP/SSE client, for tests.
//!
//! [`start`] runs a server on its own threads and returns a [`ServerHandle`]; the CLI's
//! `vdit serve` waits on it until Ctrl-C/SIGTERM.

pub mod api;
pub mod hub;
pub mod job;
pub mod store;
pub mod testing;
pub mod validate;
pub mod worker;

pub use job::{Job, JobError, Params, Status};
pub use validate::{Limits, ModelInfo};

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use vdit_core::{Error, Result};

/// The output formats written for every completed job (file extensions).
pub const FORMATS: [&str; 2] = ["mp4", "gif"];

/// The OpenAPI 3.1 document served at `/openapi.json`.
pub const OPENAPI_JSON: &str = include_str!("openapi.json");

/// How to run a server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// A diffusers-format CogVideoX folder with a text encoder and tokenizer.
    pub model: PathBuf,
    /// Where to listen; port 0 picks a free port (see [`ServerHandle::addr`]).
    pub addr: SocketAddr,
    /// The job database and output files.
    pub data: PathBuf,
    pub limits: Limits,
    /// Most jobs waiting (not running) at once; more get 429.
    pub max_queue: usize,
    /// Worker threads, each with its own copy of the model, each running one job at a time.
    pub workers: usize,
    /// Start with the workers paused (tests: fill the queue deterministically).
    pub start_paused: bool,
}

impl ServerConfig {
    pub fn new(model: PathBuf, data: PathBuf) -> Self {
        Self {
            model,
            addr: SocketAddr::from(([127, 0, 0, 1], 8080)),
            data,
            limits: Limits::default(),
            max_queue: 64,
            workers: 1,
            start_paused: false,
        }
    }
}

/// A running server.
pub struct ServerHandle {
    addr: SocketAddr,
    hub: Arc<hub::Hub>,
    model: ModelInfo,
    recovery: store::Recovery,
    stop_tx: Option<tokio::sync::oneshot::Sender<()>>,
    http: Option<std::thread::JoinHandle<()>>,
    workers: Vec<std::thread::JoinHandle<()>>,
}

impl ServerHandle {
    /// The address the server listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn model(&self) -> &ModelInfo {
        &self.model
    }

    /// What the start-up recovery did.
    pub fn recovery(&self) -> &store::Recovery {
        &self.recovery
    }

    /// Pauses or resumes the workers (a running job finishes; no new one starts while paused).
    pub fn set_paused(&self, paused: bool) {
        self.hub.set_paused(paused);
    }

    /// Blocks until the HTTP side stops (Ctrl-C or SIGTERM when started with signals).
    pub fn wait(mut self) {
        if let Some(h) = self.http.take() {
            let _ = h.join();
        }
        self.stop();
    }

    /// Stops the server: no new connections, the running job is abandoned (it stays
    /// `in_progress` in the store, as after a crash, and is queued again at the next start).
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(tx) = self.stop_tx.take() {
            let _ = tx.send(());
        }
        self.hub.shutdown();
        if let Some(h) = self.http.take() {
            let _ = h.join();
        }
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Opens the store (recovering unfinished jobs), loads the model on the workers, binds the
/// address and serves on a background thread. With `signals`, Ctrl-C and SIGTERM stop it.
pub fn start(cfg: ServerConfig, signals: bool) -> Result<ServerHandle> {
    if cfg.max_queue == 0 {
        return Err(Error::invalid("max_queue", "must be at least 1"));
    }
    if cfg.workers == 0 {
        return Err(Error::invalid("workers", "must be at least 1"));
    }
    let store = Arc::new(store::Store::open(&cfg.data)?);
    let recovery = store.recover()?;
    if recovery.requeued + recovery.failed > 0 {
        tracing::info!(
            requeued = recovery.requeued,
            failed = recovery.failed,
            "recovered unfinished jobs"
        );
    }
    let hub = Arc::new(hub::Hub::new(cfg.start_paused));
    // Queued jobs (new or recovered) are tracked for progress before any worker starts.
    for (id, steps) in store.queued_jobs()? {
        hub.track(&id, steps);
    }
    let listener = std::net::TcpListener::bind(cfg.addr)
        .map_err(|e| Error::invalid("addr", format!("cannot listen on {}: {e}", cfg.addr)))?;
    let addr = listener
        .local_addr()
        .map_err(|e| Error::Msg(format!("listener address: {e}")))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| Error::Msg(format!("listener: {e}")))?;
    let (model, workers) = worker::spawn(&cfg.model, cfg.workers, store.clone(), hub.clone())?;
    let state = Arc::new(api::AppState {
        store,
        hub: hub.clone(),
        model: model.clone(),
        limits: cfg.limits.clone(),
        max_queue: cfg.max_queue,
        workers: cfg.workers,
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("vdit-http")
        .enable_all()
        .build()
        .map_err(|e| Error::Msg(format!("cannot start the async runtime: {e}")))?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let listener = {
        let _guard = runtime.enter();
        tokio::net::TcpListener::from_std(listener)
            .map_err(|e| Error::Msg(format!("listener: {e}")))?
    };
    let hub_http = hub.clone();
    let http = std::thread::Builder::new()
        .name("vdit-http-main".into())
        .spawn(move || {
            runtime.block_on(async move {
                let (grace_tx, grace_rx) = tokio::sync::oneshot::channel::<()>();
                let stop = async move {
                    if signals {
                        tokio::select! {
                            _ = stop_rx => {}
                            _ = shutdown_signal() => {}
                        }
                    } else {
                        let _ = stop_rx.await;
                    }
                    // The workers let go of their jobs now, not after the connections close.
                    hub_http.shutdown();
                    let _ = grace_tx.send(());
                };
                let app = api::router(state);
                let serve = axum::serve(listener, app).with_graceful_shutdown(stop);
                // Open SSE streams never end by themselves: after a moment, drop them.
                let grace = async {
                    let _ = grace_rx.await;
                    tokio::time::sleep(Duration::from_millis(500)).await;
                };
                tokio::select! {
                    r = serve => {
                        if let Err(e) = r {
                            tracing::error!("server error: {e}");
                        }
                    }
                    _ = grace => {}
                }
            });
            runtime.shutdown_timeout(Duration::from_millis(200));
        })
        .map_err(|e| Error::Msg(format!("cannot start the HTTP thread: {e}")))?;
    Ok(ServerHandle {
        addr,
        hub,
        model,
        recovery,
        stop_tx: Some(stop_tx),
        http: Some(http),
        workers,
    })
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(s) => s,
                Err(_) => {
                    let _ = tokio::signal::ctrl_c().await;
                    return;
                }
            };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
