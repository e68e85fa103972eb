//! A `weir serve` started for a test, and a plain HTTP/1.1 client over loopback: enough to send
//! requests, read whole or streamed (chunked, server-sent events) responses, and hang up in
//! the middle of one.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A running `weir serve`, stopped (SIGKILL) when dropped unless stopped already.
pub struct Served {
    pub child: Option<Child>,
    pub port: u16,
    /// Its standard error, after the line that gave the port (read on a thread).
    pub log: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Served {
    /// `weir serve --model DIR --port 0 ARGS…`, once it listens.
    pub fn start(model: &std::path::Path, args: &[&str]) -> Served {
        let mut all = vec!["serve", "--model", model.to_str().unwrap(), "--port", "0", "--threads", "1"];
        all.extend_from_slice(args);
        Served::run(&all, "weir serve")
    }

    /// `weir route --port 0 --prefill URLS --decode URLS`, once it listens.
    pub fn route(prefill: &[&Served], decode: &[&Served]) -> Served {
        Served::route_with(prefill, decode, &[], &[])
    }

    /// `weir route` with mixed workers too, and more flags.
    pub fn route_with(prefill: &[&Served], decode: &[&Served], mixed: &[&Served], args: &[&str]) -> Served {
        let urls =
            |s: &[&Served]| s.iter().map(|s| format!("http://127.0.0.1:{}", s.port)).collect::<Vec<_>>().join(",");
        let (p, d, m) = (urls(prefill), urls(decode), urls(mixed));
        let mut all = vec!["route", "--port", "0"];
        for (flag, v) in [("--prefill", &p), ("--decode", &d), ("--mixed", &m)] {
            if !v.is_empty() {
                all.extend([flag, v.as_str()]);
            }
        }
        all.extend_from_slice(args);
        Served::run(&all, "weir route")
    }

    /// `weir ARGS…`, once it says `WHAT: listening on http://…`.
    fn run(args: &[&str], what: &str) -> Served {
        let mut child = Command::new(env!("CARGO_BIN_EXE_weir"))
            .args(args)
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("starting weir serve");
        let mut err = BufReader::new(child.stderr.take().unwrap());
        let mut port = None;
        let mut seen = String::new();
        for _ in 0..200 {
            let mut line = String::new();
            if err.read_line(&mut line).unwrap_or(0) == 0 {
                break;
            }
            seen.push_str(&line);
            if let Some(rest) = line.trim().strip_prefix(&format!("{what}: listening on http://")) {
                port = rest.rsplit(':').next().and_then(|p| p.parse().ok());
                break;
            }
        }
        let Some(port) = port else {
            let _ = child.kill();
            panic!("{what} did not start:\n{seen}");
        };
        let log = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let l = log.clone();
        std::thread::spawn(move || {
            let mut rest = String::new();
            let _ = err.read_to_string(&mut rest);
            l.lock().unwrap().push_str(&rest);
        });
        Served { child: Some(child), port, log }
    }

    pub fn post(&self, path: &str, body: &str) -> Response {
        request(self.port, "POST", path, Some(body.as_bytes()))
    }

    pub fn get(&self, path: &str) -> Response {
        request(self.port, "GET", path, None)
    }

    /// A metric's value from `/metrics` (the first line starting with `name`).
    pub fn metric(&self, name: &str) -> f64 {
        let m = self.get("/metrics").body;
        m.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no metric {name} in:\n{m}"))
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A response: status, headers (lowercase names), body (de-chunked).
#[derive(Debug)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Response {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }
    /// The `data:` payloads of a server-sent event stream, JSON but the final `[DONE]`.
    pub fn events(&self) -> Vec<String> {
        self.body.split("\n\n").filter_map(|e| e.strip_prefix("data: ")).map(str::to_string).collect()
    }
}

fn send(port: u16, method: &str, path: &str, body: Option<&[u8]>) -> TcpStream {
    let mut s = TcpStream::connect(("127.0.0.1", port)).expect("connecting");
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    let body = body.unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    s
}

/// Sends a request and reads the whole response.
pub fn request(port: u16, method: &str, path: &str, body: Option<&[u8]>) -> Response {
    let mut s = send(port, method, path, body);
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("reading the response");
    parse(&raw)
}

/// Sends a streamed request and hangs up once `bytes` of the body have come.
pub fn hang_up_after(port: u16, path: &str, body: &str, bytes: usize) {
    let mut s = send(port, "POST", path, Some(body.as_bytes()));
    let mut got = Vec::new();
    let mut buf = [0u8; 256];
    while got.len() < bytes {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => got.extend_from_slice(&buf[..n]),
        }
    }
    let _ = s.shutdown(std::net::Shutdown::Both);
}

fn parse(raw: &[u8]) -> Response {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n").expect("a response head");
    let head = String::from_utf8_lossy(&raw[..split]).to_string();
    let mut lines = head.lines();
    let status = lines.next().and_then(|l| l.split(' ').nth(1)).and_then(|s| s.parse().ok()).expect("a status");
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    if headers.iter().any(|(k, v)| k == "transfer-encoding" && v.contains("chunked")) {
        body = dechunk(&body);
    }
    Response { status, headers, body: String::from_utf8_lossy(&body).to_string() }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(eol) = b.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(String::from_utf8_lossy(&b[..eol]).trim(), 16).unwrap_or(0);
        if size == 0 {
            break;
        }
        let start = eol + 2;
        out.extend_from_slice(&b[start..(start + size).min(b.len())]);
        b = &b[(start + size + 2).min(b.len())..];
    }
    out
}
