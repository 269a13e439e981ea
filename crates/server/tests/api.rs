//! The API over a real socket on loopback, with a tiny model (9 frames of 32x48): jobs run and
//! report every step over SSE in order; bad requests get 400/413 naming the field; a full queue
//! gets 429 with Retry-After; DELETE cancels and deletes; paging; the OpenAPI document matches
//! the routes and the accepted fields; a stopped server's running job resumes after a restart.

use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use vdit_server::testing::{delete, get, post_json, request, scratch, tiny_model, EventStream};
use vdit_server::{start, Limits, ServerConfig};

fn config(name: &str, steps: usize) -> ServerConfig {
    let dir = scratch(name);
    let model = tiny_model(&dir, steps).unwrap();
    let mut cfg = ServerConfig::new(model, dir.join("data"));
    cfg.addr = SocketAddr::from(([127, 0, 0, 1], 0));
    cfg
}

fn events(addr: SocketAddr, id: &str) -> EventStream {
    let s = EventStream::open(
        addr,
        &format!("/v1/videos/{id}/events"),
        Duration::from_secs(30),
    )
    .unwrap();
    assert_eq!(s.status, 200);
    s
}

fn submit(addr: SocketAddr, body: Value) -> Value {
    let r = post_json(addr, "/v1/videos", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()
}

fn wait_status(addr: SocketAddr, id: &str, want: &str) -> Value {
    let t0 = Instant::now();
    loop {
        let j = get(addr, &format!("/v1/videos/{id}")).json();
        if j["status"] == want {
            return j;
        }
        assert!(t0.elapsed() < Duration::from_secs(30), "{id} stuck: {j}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn error_of(r: &vdit_server::testing::Response) -> (String, String) {
    let v = r.json();
    (
        v["error"]["param"].as_str().unwrap_or("").to_string(),
        v["error"]["message"].as_str().unwrap_or("").to_string(),
    )
}

#[test]
fn a_job_runs_and_sse_reports_every_step_in_order() {
    let mut cfg = config("run", 2);
    cfg.start_paused = true;
    let h = start(cfg.clone(), false).unwrap();
    let addr = h.addr();
    let job = submit(
        addr,
        json!({"prompt": "a red ball", "num_inference_steps": 5, "seed": 3}),
    );
    let id = job["id"].as_str().unwrap().to_string();
    assert_eq!(job["status"], "queued");
    assert_eq!(job["object"], "video");
    assert_eq!(job["progress"], 0);
    // Defaults resolved from the model, the request's values kept.
    assert_eq!(
        job["params"],
        json!({"prompt": "a red ball", "negative_prompt": "", "num_frames": 9, "height": 32,
               "width": 48, "num_inference_steps": 5, "guidance_scale": 6.0,
               "use_dynamic_cfg": false, "seed": 3, "fps": 8.0})
    );
    let stream = events(addr, &id);
    let t0 = Instant::now();
    h.set_paused(false);
    let evs = stream.collect().unwrap();
    let took = t0.elapsed();
    eprintln!(
        "one 5-step job at 9x32x48: {:.0} ms",
        took.as_secs_f64() * 1e3
    );
    let names: Vec<&str> = evs.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(
        names,
        [
            "progress",
            "progress",
            "progress",
            "progress",
            "progress",
            "completed"
        ]
    );
    for (i, e) in evs[..5].iter().enumerate() {
        let d = e.json();
        assert_eq!(
            (d["step"].as_u64(), d["total"].as_u64()),
            (Some(i as u64 + 1), Some(5))
        );
        assert_eq!(d["id"], id.as_str());
    }
    let done = evs[5].json();
    assert_eq!(done["status"], "completed");
    assert_eq!(done["progress"], 100);
    assert!(done["completed_at"].as_i64().unwrap() >= done["created_at"].as_i64().unwrap());

    let j = get(addr, &format!("/v1/videos/{id}")).json();
    assert_eq!(j, done);
    let mp4 = get(addr, &format!("/v1/videos/{id}/content"));
    assert_eq!(mp4.status, 200);
    assert_eq!(mp4.header("content-type"), Some("video/mp4"));
    assert_eq!(&mp4.body[4..8], b"ftyp", "an MP4 starts with its ftyp box");
    let gif = get(addr, &format!("/v1/videos/{id}/content?format=gif"));
    assert_eq!(gif.header("content-type"), Some("image/gif"));
    assert_eq!(&gif.body[..6], b"GIF89a");
    // The GIF decodes to the job's size and frame count.
    let dir = scratch("run-gif");
    std::fs::write(dir.join("v.gif"), &gif.body).unwrap();
    let v = vdit_video::read_video(&dir.join("v.gif")).unwrap();
    assert_eq!((v.width, v.height, v.frames.len()), (48, 32, 9));
    let bad = get(addr, &format!("/v1/videos/{id}/content?format=webm"));
    assert_eq!(bad.status, 400);
    assert_eq!(error_of(&bad).0, "format");

    // The same seed gives the same video (params are complete and generation is deterministic).
    let again = submit(
        addr,
        json!({"prompt": "a red ball", "num_inference_steps": 5, "seed": 3}),
    );
    let again_id = again["id"].as_str().unwrap();
    let e = events(addr, again_id).collect().unwrap();
    assert_eq!(e.last().unwrap().event, "completed");
    let gif2 = get(addr, &format!("/v1/videos/{again_id}/content?format=gif"));
    assert_eq!(gif2.body, gif.body);
    // A subscriber to a finished job gets its terminal event at once.
    let late = events(addr, &id).collect().unwrap();
    assert_eq!(late.len(), 1);
    assert_eq!(late[0].event, "completed");
    h.stop();
}

#[test]
fn bad_requests_get_400_or_413_naming_the_field() {
    let mut cfg = config("bad", 2);
    cfg.limits = Limits {
        max_frames: 17,
        max_pixels: 64 * 64,
        max_steps: 20,
        max_body_bytes: 1024,
        ..Limits::default()
    };
    cfg.start_paused = true;
    let h = start(cfg, false).unwrap();
    let addr = h.addr();
    let cases: &[(Value, &str, &str)] = &[
        (json!({}), "prompt", "required"),
        (json!({"prompt": ""}), "prompt", "must not be empty"),
        (
            json!({"prompt": "a", "num_frames": 10}),
            "num_frames",
            "must be 4k+1 (e.g. 9, 13), got 10",
        ),
        (
            json!({"prompt": "a", "num_frames": 21}),
            "num_frames",
            "limit of 17 (max_frames)",
        ),
        (
            json!({"prompt": "a", "height": 40}),
            "height",
            "multiple of 16",
        ),
        (
            json!({"prompt": "a", "height": 64, "width": 80}),
            "width",
            "max_pixels",
        ),
        (
            json!({"prompt": "a", "num_inference_steps": 21}),
            "num_inference_steps",
            "between 1 and 20",
        ),
        (
            json!({"prompt": "a", "guidance_scale": "x"}),
            "guidance_scale",
            "must be a number",
        ),
        (
            json!({"prompt": "a", "seed": -2}),
            "seed",
            "non-negative integer",
        ),
        (json!({"prompt": "a", "fps": 500}), "fps", "(0, 120]"),
        (
            json!({"prompt": "a", "output": "/tmp/x.mp4"}),
            "output",
            "unknown field",
        ),
        (json!(["a"]), "body", "JSON object"),
    ];
    for (body, param, rule) in cases {
        let r = post_json(addr, "/v1/videos", body);
        assert_eq!(r.status, 400, "{body}: {}", r.text());
        let (p, m) = error_of(&r);
        assert_eq!(&p, param, "{body}: {m}");
        assert!(m.contains(rule), "{body}: {m:?} lacks {rule:?}");
        assert_eq!(r.json()["error"]["type"], "invalid_request_error");
    }
    let r = request(addr, "POST", "/v1/videos", Some(b"{\"prompt\": ")).unwrap();
    assert_eq!((r.status, error_of(&r).0.as_str()), (400, "body"));
    let big = json!({"prompt": "a".repeat(2000)});
    let r = post_json(addr, "/v1/videos", &big);
    assert_eq!(r.status, 413, "{}", r.text());
    let (p, m) = error_of(&r);
    assert_eq!(p, "body");
    assert!(m.contains("1024 bytes (max_body_bytes)"), "{m}");

    // Nothing was queued by any of these.
    let health = get(addr, "/healthz").json();
    assert_eq!(health["jobs"]["queued"], 0, "{health}");
    // Ids are checked before any lookup; unknown ones are 404.
    for path in [
        "/v1/videos/video_0123456789abcdef0123456789abcdef",
        "/v1/videos/..%2F..%2Fjobs.sqlite3",
        "/v1/videos/video_0123456789abcdef0123456789abcdef/content",
        "/v1/videos/nope/events",
        "/nowhere",
    ] {
        let r = get(addr, path);
        assert_eq!(r.status, 404, "{path}: {}", r.text());
    }
    let queued = submit(addr, json!({"prompt": "a"}));
    let r = get(
        addr,
        &format!("/v1/videos/{}/content", queued["id"].as_str().unwrap()),
    );
    assert_eq!(r.status, 409);
    assert!(error_of(&r).1.contains("is queued"), "{}", r.text());
    h.stop();
}

#[test]
fn a_full_queue_answers_429_with_retry_after() {
    let mut cfg = config("full", 2);
    cfg.max_queue = 3;
    cfg.start_paused = true;
    let h = start(cfg, false).unwrap();
    let addr = h.addr();
    let ids: Vec<String> = (0..3)
        .map(|i| {
            submit(addr, json!({"prompt": format!("job {i}")}))["id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let r = post_json(addr, "/v1/videos", &json!({"prompt": "one too many"}));
    assert_eq!(r.status, 429, "{}", r.text());
    let wait: u64 = r
        .header("retry-after")
        .expect("Retry-After")
        .parse()
        .unwrap();
    assert!(wait >= 1, "{wait}");
    assert!(error_of(&r).1.contains("max_queue 3"), "{}", r.text());
    assert_eq!(get(addr, "/healthz").json()["jobs"]["queued"], 3);

    // Cancelling a queued job frees its slot; its stream ends with `cancelled`.
    let c = delete(addr, &format!("/v1/videos/{}", ids[1]));
    assert_eq!(c.status, 200);
    assert_eq!(c.json()["status"], "cancelled");
    let evs = events(addr, &ids[1]).collect().unwrap();
    assert_eq!(
        evs.iter().map(|e| e.event.as_str()).collect::<Vec<_>>(),
        ["cancelled"]
    );
    let extra = submit(addr, json!({"prompt": "now there is room"}));
    h.set_paused(false);
    for id in [&ids[0], &ids[2], &extra["id"].as_str().unwrap().to_string()] {
        wait_status(addr, id, "completed");
    }
    assert_eq!(
        get(addr, &format!("/v1/videos/{}", ids[1])).json()["status"],
        "cancelled"
    );
    let health = get(addr, "/healthz").json();
    assert_eq!(health["jobs"]["completed"], 3, "{health}");
    assert_eq!(health["jobs"]["cancelled"], 1, "{health}");
    h.stop();
}

#[test]
fn delete_cancels_a_running_job_then_deletes_it() {
    let mut cfg = config("cancel", 2);
    cfg.limits.max_steps = 1000;
    let data = cfg.data.clone();
    let h = start(cfg, false).unwrap();
    let addr = h.addr();
    // Long enough to still be running when the DELETE arrives.
    let job = submit(
        addr,
        json!({"prompt": "a long one", "num_inference_steps": 1000, "num_frames": 33}),
    );
    let id = job["id"].as_str().unwrap().to_string();
    let mut s = events(addr, &id);
    let first = s.next_event().unwrap().unwrap();
    assert_eq!(first.event, "progress");
    let r = delete(addr, &format!("/v1/videos/{id}"));
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(r.json()["status"], "cancelled");
    let rest = s.collect().unwrap();
    let last = rest.last().expect("a terminal event");
    assert_eq!(last.event, "cancelled");
    assert!(rest[..rest.len() - 1].iter().all(|e| e.event == "progress"));
    // The worker lets go and runs the next job.
    let next = submit(addr, json!({"prompt": "next"}));
    let next_id = next["id"].as_str().unwrap();
    wait_status(addr, next_id, "completed");
    assert_eq!(
        get(addr, &format!("/v1/videos/{id}")).json()["status"],
        "cancelled"
    );
    assert_eq!(get(addr, &format!("/v1/videos/{id}/content")).status, 409);
    let leftovers: Vec<_> = std::fs::read_dir(data.join("videos"))
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&id))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    // A finished job is deleted with its files.
    let r = delete(addr, &format!("/v1/videos/{next_id}"));
    assert_eq!(
        r.json(),
        json!({"id": next_id, "object": "video.deleted", "deleted": true})
    );
    assert_eq!(get(addr, &format!("/v1/videos/{next_id}")).status, 404);
    assert!(!data.join(format!("videos/{next_id}.mp4")).exists());
    assert_eq!(delete(addr, &format!("/v1/videos/{next_id}")).status, 404);
    h.stop();
}

#[test]
fn listing_pages_health_page_and_openapi() {
    let mut cfg = config("list", 1);
    cfg.start_paused = true;
    let h = start(cfg, false).unwrap();
    let addr = h.addr();
    let ids: Vec<String> = (0..5)
        .map(|i| {
            submit(addr, json!({"prompt": format!("p{i}")}))["id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let p1 = get(addr, "/v1/videos?limit=2").json();
    assert_eq!(p1["object"], "list");
    assert_eq!(p1["has_more"], true);
    let got: Vec<&str> = p1["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|j| j["id"].as_str().unwrap())
        .collect();
    assert_eq!(got, [ids[4].as_str(), ids[3].as_str()]);
    assert_eq!(p1["last_id"], ids[3].as_str());
    let p3 = get(addr, &format!("/v1/videos?limit=2&after={}", ids[1])).json();
    assert_eq!(p3["data"][0]["id"], ids[0].as_str());
    assert_eq!(p3["has_more"], false);
    let asc = get(addr, "/v1/videos?order=asc&limit=100").json();
    assert_eq!(asc["data"].as_array().unwrap().len(), 5);
    assert_eq!(asc["first_id"], ids[0].as_str());
    for (q, param) in [
        ("limit=0", "limit"),
        ("limit=x", "limit"),
        ("order=up", "order"),
        ("after=../x", "after"),
    ] {
        let r = get(addr, &format!("/v1/videos?{q}"));
        assert_eq!((r.status, error_of(&r).0.as_str()), (400, param), "{q}");
    }
    let health = get(addr, "/healthz").json();
    assert_eq!(health["status"], "ok");
    assert_eq!(health["model"], "tiny-model");
    assert_eq!(health["jobs"]["queued"], 5);
    assert_eq!(health["defaults"]["num_frames"], 9);

    let page = get(addr, "/");
    assert_eq!(page.status, 200);
    assert!(page
        .header("content-type")
        .unwrap()
        .starts_with("text/html"));
    let html = page.text();
    for needle in [
        "id=\"prompt\"",
        "id=\"bar\"",
        "id=\"player\"",
        "id=\"gallery\"",
        "EventSource",
    ] {
        assert!(html.contains(needle), "page lacks {needle}");
    }

    // The OpenAPI document names every route and exactly the fields the server accepts.
    let doc = get(addr, "/openapi.json").json();
    assert!(doc["openapi"].as_str().unwrap().starts_with("3.1"));
    let paths = doc["paths"].as_object().unwrap();
    for (p, methods) in [
        ("/v1/videos", &["get", "post"][..]),
        ("/v1/videos/{id}", &["get", "delete"][..]),
        ("/v1/videos/{id}/events", &["get"][..]),
        ("/v1/videos/{id}/content", &["get"][..]),
        ("/healthz", &["get"][..]),
        ("/openapi.json", &["get"][..]),
        ("/", &["get"][..]),
    ] {
        for m in methods {
            assert!(
                paths[p][m].is_object(),
                "{m} {p} missing from the OpenAPI document"
            );
        }
    }
    let mut fields: Vec<&str> = doc["components"]["schemas"]["CreateVideo"]["properties"]
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    fields.sort_unstable();
    let mut accepted = vdit_server::validate::FIELDS.to_vec();
    accepted.sort_unstable();
    assert_eq!(fields, accepted);
    let statuses: Vec<&str> = doc["components"]["schemas"]["Job"]["properties"]["status"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s.as_str().unwrap())
        .collect();
    assert_eq!(
        statuses,
        ["queued", "in_progress", "completed", "failed", "cancelled"]
    );
    h.stop();
}

#[test]
fn a_stopped_server_resumes_its_jobs_after_a_restart() {
    let mut cfg = config("restart", 2);
    cfg.limits.max_steps = 1000;
    let h = start(cfg.clone(), false).unwrap();
    let addr = h.addr();
    let done = submit(
        addr,
        json!({"prompt": "finished before", "num_inference_steps": 2}),
    );
    let done_id = done["id"].as_str().unwrap().to_string();
    let finished = wait_status(addr, &done_id, "completed");
    let long = submit(
        addr,
        json!({"prompt": "interrupted", "num_inference_steps": 1000, "num_frames": 33, "seed": 1}),
    );
    let long_id = long["id"].as_str().unwrap().to_string();
    let waiting = submit(addr, json!({"prompt": "waiting", "num_inference_steps": 2}));
    let waiting_id = waiting["id"].as_str().unwrap().to_string();
    let mut s = events(addr, &long_id);
    assert_eq!(s.next_event().unwrap().unwrap().event, "progress");
    let data = cfg.data.clone();
    h.stop();

    let h = start(cfg.clone(), false).unwrap();
    assert_eq!(h.recovery().requeued, 1);
    let addr = h.addr();
    let j = wait_status(addr, &long_id, "completed");
    assert_eq!(j["params"]["seed"], 1);
    wait_status(addr, &waiting_id, "completed");
    // The finished job was kept as it was, not run again.
    assert_eq!(get(addr, &format!("/v1/videos/{done_id}")).json(), finished);
    assert_eq!(
        get(addr, &format!("/v1/videos/{done_id}/content")).status,
        200
    );
    assert!(data.join(format!("videos/{long_id}.mp4")).is_file());
    h.stop();
}

#[test]
fn a_failing_job_is_reported_failed_without_server_paths() {
    let mut cfg = config("fail", 2);
    cfg.start_paused = true;
    let data = cfg.data.clone();
    let h = start(cfg, false).unwrap();
    let addr = h.addr();
    let id = submit(addr, json!({"prompt": "doomed", "num_inference_steps": 3}))["id"]
        .as_str()
        .unwrap()
        .to_string();
    // The outputs cannot be written: the videos folder is now a file.
    std::fs::remove_dir_all(data.join("videos")).unwrap();
    std::fs::write(data.join("videos"), b"not a folder").unwrap();
    let s = events(addr, &id);
    h.set_paused(false);
    let evs = s.collect().unwrap();
    let names: Vec<&str> = evs.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(names, ["progress", "progress", "progress", "failed"]);
    let job = evs[3].json();
    assert_eq!(job["status"], "failed");
    assert_eq!(job["error"]["code"], "generation_failed");
    let msg = job["error"]["message"].as_str().unwrap();
    assert!(msg.starts_with("<data>/videos/"), "{msg}");
    assert!(!msg.contains(data.to_str().unwrap()), "{msg}");
    assert_eq!(get(addr, &format!("/v1/videos/{id}")).json(), job);
    assert_eq!(get(addr, &format!("/v1/videos/{id}/content")).status, 409);
    h.stop();
}

#[test]
fn two_workers_run_two_jobs_at_once() {
    let mut cfg = config("workers", 2);
    cfg.workers = 2;
    cfg.limits.max_steps = 1000;
    let h = start(cfg, false).unwrap();
    let addr = h.addr();
    assert_eq!(get(addr, "/healthz").json()["workers"], 2);
    let ids: Vec<String> = (0..2)
        .map(|i| {
            submit(
                addr,
                json!({"prompt": format!("long {i}"), "num_inference_steps": 1000, "num_frames": 33}),
            )["id"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    let t0 = Instant::now();
    loop {
        let jobs = get(addr, "/healthz").json()["jobs"].clone();
        if jobs["in_progress"] == 2 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "never two at once: {jobs}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    for id in &ids {
        assert_eq!(
            delete(addr, &format!("/v1/videos/{id}")).json()["status"],
            "cancelled"
        );
    }
    h.stop();
}

#[test]
fn a_model_without_a_text_encoder_is_refused_at_start() {
    let dir = scratch("notext");
    let model = vdit_core::testing::fixture_dir("pipeline_2b_like").join("pipeline");
    let mut cfg = ServerConfig::new(model, dir.join("data"));
    cfg.addr = SocketAddr::from(([127, 0, 0, 1], 0));
    let e = start(cfg, false).err().expect("no tokenizer").to_string();
    assert!(e.contains("no tokenizer/ component"), "{e}");
}
