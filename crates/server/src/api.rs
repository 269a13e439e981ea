//! The HTTP API (axum): OpenAI's video-job routes with diffusers' parameter names.
//!
//! | route | |
//! |---|---|
//! | `POST /v1/videos` | validate, queue (429 + `Retry-After` when the queue is full), return the job |
//! | `GET /v1/videos` | a page of jobs: `limit` (1-100, 20), `after` (a job id), `order` (`desc`/`asc`) |
//! | `GET /v1/videos/{id}` | the job |
//! | `GET /v1/videos/{id}/events` | SSE: `progress` `{step, total}`..., then `completed`, `failed` or `cancelled` |
//! | `GET /v1/videos/{id}/content?format=mp4\|gif` | the video |
//! | `DELETE /v1/videos/{id}` | cancel a queued/running job; delete a finished one |
//! | `GET /healthz`, `GET /openapi.json`, `GET /` | health, the OpenAPI document, the web page |
//!
//! Errors are JSON, `{"error": {"message", "type", "param", "code"}}`, and never carry a
//! server path or internal detail beyond the message. Every store call runs on the blocking
//! pool (SQLite fsyncs).

use crate::hub::{Hub, Snapshot};
use crate::job::{is_valid_id, new_id, now_unix, Job, Status};
use crate::store::{Removal, Store};
use crate::validate::{validate, Limits, ModelInfo};
use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use serde_json::{json, Value};
use std::collections::HashMap;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio_stream::Stream;

/// Shared by every handler.
pub struct AppState {
    pub store: Arc<Store>,
    pub hub: Arc<Hub>,
    pub model: ModelInfo,
    pub limits: Limits,
    /// Most jobs waiting in the queue (running ones not counted).
    pub max_queue: usize,
    pub workers: usize,
}

/// An API error: status, message, and the offending parameter when there is one.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    param: Option<String>,
    retry_after: Option<u64>,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Self {
            status,
            message: message.into(),
            param: None,
            retry_after: None,
        }
    }

    fn param(mut self, p: impl Into<String>) -> Self {
        self.param = Some(p.into());
        self
    }

    fn not_found(id: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            format!("no video job with id {id:?}"),
        )
        .param("id")
    }

    fn internal(e: impl std::fmt::Display) -> Self {
        tracing::error!("internal error: {e}");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal error; see the server's log",
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let kind = match self.status {
            StatusCode::BAD_REQUEST | StatusCode::PAYLOAD_TOO_LARGE => "invalid_request_error",
            StatusCode::NOT_FOUND => "not_found_error",
            StatusCode::CONFLICT => "conflict_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            _ => "server_error",
        };
        let body = json!({"error": {
            "message": self.message,
            "type": kind,
            "param": self.param,
            "code": self.status.as_u16(),
        }});
        let mut r = (self.status, Json(body)).into_response();
        if let Some(s) = self.retry_after {
            r.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        r
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// Runs a store call on the blocking pool.
async fn db<T: Send + 'static>(
    st: &Arc<AppState>,
    f: impl FnOnce(&Store) -> vdit_core::Result<T> + Send + 'static,
) -> ApiResult<T> {
    let store = st.store.clone();
    tokio::task::spawn_blocking(move || f(&store))
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::internal)
}

/// A job with the live progress of a running one.
fn with_live(hub: &Hub, mut job: Job) -> Job {
    if job.status == Status::InProgress {
        if let Some(s) = hub.snapshot(&job.id) {
            job.progress = crate::job::percent(s.step, s.total);
        }
    }
    job
}

fn check_id(id: &str) -> ApiResult<()> {
    if is_valid_id(id) {
        Ok(())
    } else {
        Err(ApiError::not_found(id))
    }
}

pub fn router(state: Arc<AppState>) -> Router {
    let limit = state.limits.max_body_bytes;
    Router::new()
        .route("/", get(index))
        .route("/healthz", get(healthz))
        .route("/openapi.json", get(openapi))
        .route("/v1/videos", get(list).post(create))
        .route("/v1/videos/{id}", get(retrieve).delete(remove))
        .route("/v1/videos/{id}/events", get(events))
        .route("/v1/videos/{id}/content", get(content))
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "no such route") })
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

async fn index() -> Html<&'static str> {
    Html(include_str!("web/index.html"))
}

async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        crate::OPENAPI_JSON,
    )
        .into_response()
}

async fn healthz(State(st): State<Arc<AppState>>) -> ApiResult<Json<Value>> {
    let counts = db(&st, |s| s.counts()).await?;
    Ok(Json(json!({
        "status": "ok",
        "model": st.model.name,
        "workers": st.workers,
        "max_queue": st.max_queue,
        "paused": st.hub.is_paused(),
        "jobs": counts,
        "defaults": {
            "num_frames": st.model.default_frames,
            "height": st.model.default_height,
            "width": st.model.default_width,
            "num_inference_steps": st.model.default_steps,
            "guidance_scale": st.model.default_guidance_scale,
            "fps": st.model.default_fps,
        },
        "limits": {
            "max_frames": st.limits.max_frames,
            "max_pixels": st.limits.max_pixels,
            "max_steps": st.limits.max_steps,
            "max_body_bytes": st.limits.max_body_bytes,
            "max_prompt_chars": st.limits.max_prompt_chars,
            "max_job_memory_bytes": st.limits.max_job_bytes,
            "num_frames_multiple": st.model.temporal_compression,
            "size_multiple": st.model.size_multiple,
        },
    })))
}

async fn create(
    State(st): State<Arc<AppState>>,
    body: Result<Bytes, BytesRejection>,
) -> ApiResult<(StatusCode, Json<Job>)> {
    let body = body.map_err(|r| {
        if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "the request body is over this server's limit of {} bytes (max_body_bytes)",
                    st.limits.max_body_bytes
                ),
            )
            .param("body")
        } else {
            ApiError::new(r.status(), r.body_text()).param("body")
        }
    })?;
    let params = validate(&body, &st.model, &st.limits, rand::random::<u32>() as u64)
        .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e.message).param(e.param))?;
    let job = Job {
        id: new_id(),
        object: "video".into(),
        status: Status::Queued,
        progress: 0,
        created_at: now_unix(),
        started_at: None,
        completed_at: None,
        params,
        error: None,
    };
    // Tracked before the insert: a worker may claim the job the moment it is committed.
    st.hub.track(&job.id, job.params.num_inference_steps);
    let (j, max) = (job.clone(), st.max_queue);
    let inserted = db(&st, move |s| s.insert_if_room(&j, max)).await;
    match inserted {
        Ok(Ok(_)) => {
            st.hub.notify_work();
            Ok((StatusCode::OK, Json(job)))
        }
        Ok(Err(queued)) => {
            st.hub.untrack(&job.id);
            // About when a slot frees: one mean job time spread over the workers.
            let secs = st
                .hub
                .avg_job_time()
                .map(|d| d.as_secs_f64() / st.workers.max(1) as f64)
                .unwrap_or(1.0)
                .ceil()
                .clamp(1.0, 600.0) as u64;
            let mut e = ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                format!(
                    "the queue is full ({queued} jobs waiting, max_queue {}); retry in {secs} s",
                    st.max_queue
                ),
            );
            e.retry_after = Some(secs);
            Err(e)
        }
        Err(e) => {
            st.hub.untrack(&job.id);
            Err(e)
        }
    }
}

async fn retrieve(State(st): State<Arc<AppState>>, Path(id): Path<String>) -> ApiResult<Json<Job>> {
    check_id(&id)?;
    let i = id.clone();
    let job = db(&st, move |s| s.get(&i))
        .await?
        .ok_or_else(|| ApiError::not_found(&id))?;
    Ok(Json(with_live(&st.hub, job)))
}

async fn remove(State(st): State<Arc<AppState>>, Path(id): Path<String>) -> ApiResult<Json<Value>> {
    check_id(&id)?;
    let i = id.clone();
    match db(&st, move |s| s.remove(&i)).await? {
        Removal::Cancelled(job) => {
            st.hub.finish(&id, Status::Cancelled);
            Ok(Json(serde_json::to_value(job).map_err(ApiError::internal)?))
        }
        Removal::Deleted => Ok(Json(
            json!({"id": id, "object": "video.deleted", "deleted": true}),
        )),
        Removal::NotFound => Err(ApiError::not_found(&id)),
    }
}

async fn list(
    State(st): State<Arc<AppState>>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Json<Value>> {
    let limit = match q.get("limit") {
        None => 20,
        Some(v) => match v.parse::<usize>() {
            Ok(n) if (1..=100).contains(&n) => n,
            _ => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    format!("limit must be an integer from 1 to 100, got {v:?}"),
                )
                .param("limit"))
            }
        },
    };
    let desc = match q.get("order").map(String::as_str) {
        None | Some("desc") => true,
        Some("asc") => false,
        Some(o) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("order must be \"asc\" or \"desc\", got {o:?}"),
            )
            .param("order"))
        }
    };
    let after = q.get("after").cloned();
    if let Some(a) = &after {
        if !is_valid_id(a) {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("after must be a job id (video_...), got {a:?}"),
            )
            .param("after"));
        }
    }
    let a = after.clone();
    let page = db(&st, move |s| s.list(limit, a.as_deref(), desc))
        .await?
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("after: no job with id {:?}", after.unwrap_or_default()),
            )
            .param("after")
        })?;
    let data: Vec<Job> = page
        .jobs
        .into_iter()
        .map(|j| with_live(&st.hub, j))
        .collect();
    Ok(Json(json!({
        "object": "list",
        "first_id": data.first().map(|j| j.id.clone()),
        "last_id": data.last().map(|j| j.id.clone()),
        "has_more": page.has_more,
        "data": data,
    })))
}

async fn content(
    State(st): State<Arc<AppState>>,
    Path(id): Path<String>,
    Query(q): Query<HashMap<String, String>>,
) -> ApiResult<Response> {
    check_id(&id)?;
    let format = q.get("format").map(String::as_str).unwrap_or("mp4");
    let (ext, mime) = match format {
        "mp4" => ("mp4", "video/mp4"),
        "gif" => ("gif", "image/gif"),
        f => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("format must be \"mp4\" or \"gif\", got {f:?}"),
            )
            .param("format"))
        }
    };
    let i = id.clone();
    let job = db(&st, move |s| s.get(&i))
        .await?
        .ok_or_else(|| ApiError::not_found(&id))?;
    if job.status != Status::Completed {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            format!(
                "job {id} is {}: its video exists once it is completed",
                job.status.as_str()
            ),
        )
        .param("id"));
    }
    let path = st.store.output_path(&id, ext);
    let bytes = tokio::fs::read(&path)
        .await
        .map_err(|e| ApiError::internal(format!("{}: {e}", path.display())))?;
    Ok((
        [
            (header::CONTENT_TYPE, mime.to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("inline; filename=\"{id}.{ext}\""),
            ),
            (
                header::CACHE_CONTROL,
                "private, max-age=31536000, immutable".into(),
            ),
        ],
        bytes,
    )
        .into_response())
}

fn sse_event(name: &str, data: &Value) -> Result<Event, Infallible> {
    Ok(Event::default().event(name).data(data.to_string()))
}

fn progress_event(id: &str, step: usize, total: usize) -> Result<Event, Infallible> {
    sse_event(
        "progress",
        &json!({"id": id, "step": step, "total": total, "progress": crate::job::percent(step, total)}),
    )
}

/// The terminal event of a finished job: its status as the event name, the job as data.
async fn terminal_event(st: &Arc<AppState>, id: &str) -> Option<Result<Event, Infallible>> {
    let i = id.to_string();
    let job = db(st, move |s| s.get(&i)).await.ok().flatten()?;
    if !job.status.is_terminal() {
        return None;
    }
    let v = serde_json::to_value(&job).ok()?;
    Some(sse_event(job.status.as_str(), &v))
}

async fn events(
    State(st): State<Arc<AppState>>,
    Path(id): Path<String>,
) -> ApiResult<Sse<impl Stream<Item = Result<Event, Infallible>>>> {
    check_id(&id)?;
    // Subscribe first: a job that finishes between the two calls is then terminal in the store.
    let rx = st.hub.subscribe(&id);
    let i = id.clone();
    if db(&st, move |s| s.get(&i)).await?.is_none() {
        return Err(ApiError::not_found(&id));
    }
    let stream = async_stream::stream! {
        if let Some(mut rx) = rx {
            let mut sent: Option<usize> = None;
            loop {
                let snap: Snapshot = *rx.borrow_and_update();
                // Every step once, in order; a late subscriber starts at the current step.
                let from = match sent {
                    Some(s) => s + 1,
                    None => snap.step.max(1),
                };
                for step in from..=snap.step {
                    yield progress_event(&id, step, snap.total);
                }
                sent = Some(sent.unwrap_or(0).max(snap.step));
                if snap.status.is_terminal() {
                    break;
                }
                if rx.changed().await.is_err() {
                    break;
                }
            }
        }
        if let Some(e) = terminal_event(&st, &id).await {
            yield e;
        }
    };
    Ok(Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))))
}
