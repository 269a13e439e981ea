//! Test helpers: a tiny text-to-video model folder made from the repository's fixtures, and a
//! small blocking HTTP/1.1 + SSE client over `std::net` (tests talk to a real socket).

use serde_json::Value;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The repository root (from this crate's source location).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The model shipped with the repository (`models/vdit-shapes`), when it is there.
pub fn default_model() -> Option<PathBuf> {
    let p = repo_root().join("models/vdit-shapes");
    p.join("model_index.json").is_file().then_some(p)
}

fn copy_dir(src: &Path, dst: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dst)?;
    for e in std::fs::read_dir(src)? {
        let e = e?;
        if e.file_type()?.is_file() {
            std::fs::copy(e.path(), dst.join(e.file_name()))?;
        }
    }
    Ok(())
}

/// Builds `<dir>/tiny-model`: the transformer, VAE, scheduler and T5 encoder of the
/// `pipeline_2b_like` parity fixture (text_embed_dim 32 = the encoder's d_model) with the
/// word-level tokenizer fixture (49 words, ids below the encoder's vocabulary), and a
/// `generation_config.json` of `steps` steps. Sizes: 9 frames of 32x48 by default; a job of a
/// few steps takes well under a second.
pub fn tiny_model(dir: &Path, steps: usize) -> std::io::Result<PathBuf> {
    let root = repo_root();
    let src = root.join("tests/fixtures/parity/pipeline_2b_like/pipeline");
    let out = dir.join("tiny-model");
    for c in ["transformer", "vae", "scheduler", "text_encoder"] {
        copy_dir(&src.join(c), &out.join(c))?;
    }
    std::fs::create_dir_all(out.join("tokenizer"))?;
    std::fs::copy(
        root.join("tests/fixtures/tokenizer/wordlevel/tokenizer.json"),
        out.join("tokenizer/tokenizer.json"),
    )?;
    let index = serde_json::json!({
        "_class_name": "CogVideoXPipeline",
        "_diffusers_version": "0.42.1",
        "scheduler": ["diffusers", "CogVideoXDDIMScheduler"],
        "text_encoder": ["transformers", "T5EncoderModel"],
        "tokenizer": ["transformers", "PreTrainedTokenizerFast"],
        "transformer": ["diffusers", "CogVideoXTransformer3DModel"],
        "vae": ["diffusers", "AutoencoderKLCogVideoX"],
    });
    std::fs::write(out.join("model_index.json"), index.to_string())?;
    let gen = serde_json::json!({"num_inference_steps": steps, "guidance_scale": 6.0, "fps": 8.0});
    std::fs::write(out.join("generation_config.json"), gen.to_string())?;
    Ok(out)
}

/// A fresh scratch folder under the system temp dir.
pub fn scratch(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("vdit-server-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("create scratch dir");
    d
}

/// An HTTP response.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// The body as JSON (panics with the body when it is not: for tests).
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text()))
    }
}

/// Reads a chunked body as a plain stream.
struct Chunked<R> {
    inner: R,
    left: usize,
    done: bool,
}

impl<R: BufRead> Read for Chunked<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        if self.done || buf.is_empty() {
            return Ok(0);
        }
        if self.left == 0 {
            let mut line = String::new();
            if self.inner.read_line(&mut line)? == 0 {
                self.done = true;
                return Ok(0);
            }
            let size = line.trim().split(';').next().unwrap_or("");
            self.left = usize::from_str_radix(size, 16).map_err(|_| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("bad chunk size {line:?}"),
                )
            })?;
            if self.left == 0 {
                self.done = true;
                return Ok(0);
            }
        }
        let n = buf.len().min(self.left);
        let got = self.inner.read(&mut buf[..n])?;
        if got == 0 {
            self.done = true;
            return Ok(0);
        }
        self.left -= got;
        if self.left == 0 {
            let mut crlf = [0u8; 2];
            self.inner.read_exact(&mut crlf)?;
        }
        Ok(got)
    }
}

fn send(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    timeout: Duration,
) -> std::io::Result<(u16, Vec<(String, String)>, BufReader<TcpStream>)> {
    let mut s = TcpStream::connect_timeout(&addr, timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    if let Some(b) = body {
        head.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes())?;
    if let Some(b) = body {
        // A server may answer (413) before reading it all; that is not an error here.
        let _ = s.write_all(b);
    }
    let mut r = BufReader::new(s);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| {
            std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("bad status line {line:?}"),
            )
        })?;
    let mut headers = Vec::new();
    loop {
        line.clear();
        r.read_line(&mut line)?;
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
    }
    Ok((status, headers, r))
}

fn is_chunked(headers: &[(String, String)]) -> bool {
    headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked"))
}

/// One request (`Connection: close`), the whole response read.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
) -> std::io::Result<Response> {
    let (status, headers, mut r) = send(addr, method, path, body, Duration::from_secs(30))?;
    let mut body = Vec::new();
    if is_chunked(&headers) {
        Chunked {
            inner: r,
            left: 0,
            done: false,
        }
        .read_to_end(&mut body)?;
    } else if let Some(n) = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse::<usize>().ok())
    {
        body.resize(n, 0);
        r.read_exact(&mut body)?;
    } else {
        r.read_to_end(&mut body)?;
    }
    Ok(Response {
        status,
        headers,
        body,
    })
}

pub fn get(addr: SocketAddr, path: &str) -> Response {
    request(addr, "GET", path, None).unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

pub fn post_json(addr: SocketAddr, path: &str, body: &Value) -> Response {
    request(addr, "POST", path, Some(body.to_string().as_bytes()))
        .unwrap_or_else(|e| panic!("POST {path}: {e}"))
}

pub fn delete(addr: SocketAddr, path: &str) -> Response {
    request(addr, "DELETE", path, None).unwrap_or_else(|e| panic!("DELETE {path}: {e}"))
}

/// One server-sent event.
#[derive(Debug, Clone, PartialEq)]
pub struct SseEvent {
    pub event: String,
    pub data: String,
}

impl SseEvent {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data)
            .unwrap_or_else(|e| panic!("event data not JSON ({e}): {}", self.data))
    }
}

/// An open `text/event-stream` response.
pub struct EventStream {
    pub status: u16,
    reader: Box<dyn BufRead + Send>,
}

impl EventStream {
    /// Opens `GET path`; each read waits at most `timeout`.
    pub fn open(addr: SocketAddr, path: &str, timeout: Duration) -> std::io::Result<Self> {
        let (status, headers, r) = send(addr, "GET", path, None, timeout)?;
        let reader: Box<dyn BufRead + Send> = if is_chunked(&headers) {
            Box::new(BufReader::new(Chunked {
                inner: r,
                left: 0,
                done: false,
            }))
        } else {
            Box::new(r)
        };
        Ok(Self { status, reader })
    }

    /// The next event (comments and keep-alives skipped); `None` at the end of the stream.
    pub fn next_event(&mut self) -> std::io::Result<Option<SseEvent>> {
        let (mut event, mut data) = (String::new(), Vec::<String>::new());
        let mut line = String::new();
        loop {
            line.clear();
            if self.reader.read_line(&mut line)? == 0 {
                return Ok(None);
            }
            let l = line.trim_end_matches(['\r', '\n']);
            if l.is_empty() {
                if !data.is_empty() || !event.is_empty() {
                    return Ok(Some(SseEvent {
                        event: if event.is_empty() {
                            "message".into()
                        } else {
                            event
                        },
                        data: data.join("\n"),
                    }));
                }
                continue;
            }
            if l.starts_with(':') {
                continue;
            }
            let (k, v) = l.split_once(':').unwrap_or((l, ""));
            let v = v.strip_prefix(' ').unwrap_or(v);
            match k {
                "event" => event = v.to_string(),
                "data" => data.push(v.to_string()),
                _ => {}
            }
        }
    }

    /// Every event until the stream ends.
    pub fn collect(mut self) -> std::io::Result<Vec<SseEvent>> {
        let mut out = Vec::new();
        while let Some(e) = self.next_event()? {
            out.push(e);
        }
        Ok(out)
    }
}
