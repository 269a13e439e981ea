//! Load: 200 submissions from 20 concurrent clients against one worker and a queue of 8, over
//! loopback. Each client submits, follows its job over SSE to the end, then submits again; a 429
//! is honoured by waiting its Retry-After and retrying. Asserts: every accepted job completes
//! with every step reported in order, the server's list holds exactly the accepted jobs, 429s
//! carry Retry-After, and the queue never holds more than its bound (sampled from /healthz and
//! checked by the store's count). Prints the figures (run with --nocapture to see them).

use serde_json::json;
use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use vdit_server::testing::{get, post_json, scratch, tiny_model, EventStream};
use vdit_server::{start, ServerConfig};

const CLIENTS: usize = 20;
const PER_CLIENT: usize = 10;
const MAX_QUEUE: usize = 8;

struct Outcome {
    id: String,
    first_progress: Option<Duration>,
}

fn client(addr: SocketAddr, c: usize, rejected: &AtomicUsize) -> Vec<Outcome> {
    let mut out = Vec::new();
    for k in 0..PER_CLIENT {
        let body = json!({"prompt": format!("client {c} job {k}"), "seed": (c * 100 + k) as u64});
        let deadline = Instant::now() + Duration::from_secs(50);
        let (job, t_accept) = loop {
            let r = post_json(addr, "/v1/videos", &body);
            match r.status {
                200 => break (r.json(), Instant::now()),
                429 => {
                    rejected.fetch_add(1, Ordering::SeqCst);
                    let wait: u64 = r
                        .header("retry-after")
                        .expect("a 429 carries Retry-After")
                        .parse()
                        .expect("Retry-After in seconds");
                    assert!((1..=600).contains(&wait), "{wait}");
                    assert!(Instant::now() < deadline, "client {c} never got in");
                    std::thread::sleep(Duration::from_secs(wait));
                }
                s => panic!("client {c}: unexpected {s}: {}", r.text()),
            }
        };
        let id = job["id"].as_str().unwrap().to_string();
        let total = job["params"]["num_inference_steps"].as_u64().unwrap();
        let mut s = EventStream::open(
            addr,
            &format!("/v1/videos/{id}/events"),
            Duration::from_secs(30),
        )
        .unwrap();
        let mut first_progress = None;
        let mut last_step = 0;
        let terminal = loop {
            let e = s
                .next_event()
                .unwrap()
                .expect("the stream ends with a terminal event");
            if e.event == "progress" {
                first_progress.get_or_insert_with(|| t_accept.elapsed());
                let step = e.json()["step"].as_u64().unwrap();
                assert!(step > last_step, "{id}: step {step} after {last_step}");
                assert_eq!(e.json()["total"].as_u64(), Some(total));
                last_step = step;
            } else {
                break e;
            }
        };
        assert_eq!(terminal.event, "completed", "{id}: {}", terminal.data);
        assert_eq!(
            last_step, total,
            "{id}: saw steps up to {last_step} of {total}"
        );
        assert!(
            s.next_event().unwrap().is_none(),
            "nothing after the terminal event"
        );
        out.push(Outcome { id, first_progress });
    }
    out
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

#[test]
fn two_hundred_jobs_from_twenty_clients_none_lost_bound_held() {
    let dir = scratch("load");
    let model = tiny_model(&dir, 2).unwrap();
    let mut cfg = ServerConfig::new(model, dir.join("data"));
    cfg.addr = SocketAddr::from(([127, 0, 0, 1], 0));
    cfg.max_queue = MAX_QUEUE;
    let h = start(cfg, false).unwrap();
    let addr = h.addr();

    let rejected = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let max_seen = Arc::new(Mutex::new(0u64));
    let monitor = {
        let (done, max_seen) = (done.clone(), max_seen.clone());
        std::thread::spawn(move || {
            let mut samples = 0;
            while !done.load(Ordering::SeqCst) {
                let q = get(addr, "/healthz").json()["jobs"]["queued"]
                    .as_u64()
                    .unwrap();
                assert!(q <= MAX_QUEUE as u64, "queue holds {q} > {MAX_QUEUE}");
                let mut m = max_seen.lock().unwrap();
                *m = (*m).max(q);
                samples += 1;
                drop(m);
                std::thread::sleep(Duration::from_millis(10));
            }
            samples
        })
    };
    let t0 = Instant::now();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| {
            let rejected = rejected.clone();
            std::thread::spawn(move || client(addr, c, &rejected))
        })
        .collect();
    let outcomes: Vec<Outcome> = clients
        .into_iter()
        .flat_map(|t| t.join().expect("client thread"))
        .collect();
    let wall = t0.elapsed();
    done.store(true, Ordering::SeqCst);
    let samples = monitor.join().expect("monitor");

    // Every submission is accounted for: 200 distinct accepted jobs, all completed, and the
    // server's own list holds exactly them.
    let ids: HashSet<&str> = outcomes.iter().map(|o| o.id.as_str()).collect();
    assert_eq!(outcomes.len(), CLIENTS * PER_CLIENT);
    assert_eq!(ids.len(), CLIENTS * PER_CLIENT);
    let mut listed = HashSet::new();
    let mut after: Option<String> = None;
    loop {
        let q = match &after {
            Some(a) => format!("/v1/videos?order=asc&limit=100&after={a}"),
            None => "/v1/videos?order=asc&limit=100".into(),
        };
        let page = get(addr, &q).json();
        for j in page["data"].as_array().unwrap() {
            assert_eq!(j["status"], "completed", "{j}");
            listed.insert(j["id"].as_str().unwrap().to_string());
        }
        if page["has_more"] != true {
            break;
        }
        after = page["last_id"].as_str().map(String::from);
    }
    assert_eq!(listed.len(), ids.len());
    assert!(listed.iter().all(|id| ids.contains(id.as_str())));
    let health = get(addr, "/healthz").json();
    assert_eq!(health["jobs"]["completed"], 200, "{health}");
    assert_eq!(health["jobs"]["queued"], 0, "{health}");

    let mut ttfp: Vec<Duration> = outcomes.iter().filter_map(|o| o.first_progress).collect();
    assert_eq!(ttfp.len(), outcomes.len(), "every job reported progress");
    ttfp.sort();
    let rejected = rejected.load(Ordering::SeqCst);
    // With 20 clients and room for 8 waiting jobs, the bound must have been hit.
    assert!(
        rejected > 0,
        "no 429 with 20 clients and max_queue {MAX_QUEUE}"
    );
    let max_seen = *max_seen.lock().unwrap();
    eprintln!(
        "load: {} jobs submitted and {} completed by {CLIENTS} clients in {:.1} s; time to first progress event p50 {:.0} ms, p95 {:.0} ms, max {:.0} ms; {rejected} answered 429; queue peak {max_seen}/{MAX_QUEUE} over {samples} samples",
        ids.len(),
        listed.len(),
        wall.as_secs_f64(),
        pct(&ttfp, 0.5).as_secs_f64() * 1e3,
        pct(&ttfp, 0.95).as_secs_f64() * 1e3,
        ttfp.last().unwrap().as_secs_f64() * 1e3,
    );
    h.stop();
}
