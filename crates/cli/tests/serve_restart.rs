//! `vdit serve` as a process: killed with SIGKILL in the middle of a job and started again on
//! the same `--data`, it finishes the interrupted job and the queued one and keeps the finished
//! one untouched; stopped with SIGTERM it exits cleanly and resumes the same way.

use serde_json::{json, Value};
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use vdit_server::testing::{get, post_json, scratch, tiny_model, EventStream};

struct Server {
    child: Child,
    addr: SocketAddr,
    stderr: std::sync::mpsc::Receiver<String>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `vdit serve` on a free port and waits for its "listening on" line.
fn serve(model: &Path, data: &Path) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_vdit"))
        .args([
            "serve",
            "--addr",
            "127.0.0.1:0",
            "--max-steps",
            "1000",
            "--model",
        ])
        .arg(model)
        .arg("--data")
        .arg(data)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start vdit serve");
    let (tx, stderr) = std::sync::mpsc::channel();
    let err = child.stderr.take().unwrap();
    std::thread::spawn(move || {
        for line in BufReader::new(err).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let mut out = BufReader::new(child.stdout.take().unwrap());
    let mut line = String::new();
    out.read_line(&mut line).unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on http://")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .parse()
        .unwrap();
    Server {
        child,
        addr,
        stderr,
    }
}

fn submit(addr: SocketAddr, body: Value) -> String {
    let r = post_json(addr, "/v1/videos", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    r.json()["id"].as_str().unwrap().to_string()
}

fn wait_status(addr: SocketAddr, id: &str, want: &str) -> Value {
    let t0 = Instant::now();
    loop {
        let j = get(addr, &format!("/v1/videos/{id}")).json();
        if j["status"] == want {
            return j;
        }
        assert!(t0.elapsed() < Duration::from_secs(40), "{id} stuck: {j}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Submits a finished job, a long one (followed until its first step) and a queued one.
fn three_jobs(addr: SocketAddr) -> (String, Value, String, String) {
    let done = submit(
        addr,
        json!({"prompt": "a red ball", "num_inference_steps": 2}),
    );
    let finished = wait_status(addr, &done, "completed");
    let long = submit(
        addr,
        // About 2 s on an idle machine: still running when the server is stopped.
        json!({"prompt": "a blue cat", "num_inference_steps": 1000, "num_frames": 33, "seed": 11}),
    );
    let queued = submit(
        addr,
        json!({"prompt": "a green tree", "num_inference_steps": 2}),
    );
    let mut s = EventStream::open(
        addr,
        &format!("/v1/videos/{long}/events"),
        Duration::from_secs(30),
    )
    .unwrap();
    let e = s.next_event().unwrap().unwrap();
    assert_eq!(e.event, "progress");
    assert_eq!(e.json()["total"], 1000);
    (done, finished, long, queued)
}

fn check_resumed(addr: SocketAddr, done: &str, finished: &Value, long: &str, queued: &str) {
    let j = wait_status(addr, long, "completed");
    assert_eq!(j["params"]["seed"], 11);
    assert_eq!(j["params"]["num_inference_steps"], 1000);
    wait_status(addr, queued, "completed");
    assert_eq!(&get(addr, &format!("/v1/videos/{done}")).json(), finished);
    for id in [done, long, queued] {
        let mp4 = get(addr, &format!("/v1/videos/{id}/content"));
        assert_eq!(mp4.status, 200);
        assert_eq!(&mp4.body[4..8], b"ftyp");
    }
    let h = get(addr, "/healthz").json();
    assert_eq!(h["jobs"]["completed"], 3, "{h}");
}

fn saw_line(s: &Server, needle: &str) -> bool {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(10) {
        if let Ok(l) = s.stderr.recv_timeout(Duration::from_millis(200)) {
            if l.contains(needle) {
                return true;
            }
        }
    }
    false
}

#[test]
fn killed_mid_job_the_server_finishes_it_after_a_restart() {
    let dir = scratch("cli-kill");
    let model = tiny_model(&dir, 2).unwrap();
    let data = dir.join("data");
    let mut s = serve(&model, &data);
    let (done, finished, long, queued) = three_jobs(s.addr);
    s.child.kill().unwrap(); // SIGKILL: no chance to clean up
    s.child.wait().unwrap();
    assert!(!data.join(format!("videos/{long}.mp4")).exists());

    let s = serve(&model, &data);
    assert!(
        saw_line(&s, "recovered 1 unfinished job(s)"),
        "no recovery message"
    );
    check_resumed(s.addr, &done, &finished, &long, &queued);
}

#[test]
fn sigterm_stops_cleanly_and_the_job_resumes() {
    let dir = scratch("cli-term");
    let model = tiny_model(&dir, 2).unwrap();
    let data = dir.join("data");
    let mut s = serve(&model, &data);
    let (done, finished, long, queued) = three_jobs(s.addr);
    let t0 = Instant::now();
    // SAFETY: signalling our own child process.
    #[allow(unsafe_code)]
    let rc = unsafe { libc::kill(s.child.id() as libc::pid_t, libc::SIGTERM) };
    assert_eq!(rc, 0);
    let status = s.child.wait().unwrap();
    assert!(status.success(), "{status:?}");
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "slow stop: {:?}",
        t0.elapsed()
    );

    let s = serve(&model, &data);
    assert!(saw_line(&s, "recovered 1 unfinished job(s)"));
    check_resumed(s.addr, &done, &finished, &long, &queued);
}
