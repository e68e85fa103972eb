//! Just enough HTTP/1.1 for the load generator: a `POST` over a fresh connection, its status
//! and headers, and a body read as it arrives (chunked, sized or to the end), line by line, so
//! each server-sent event is timed when its line is whole.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::time::Duration;

/// `http://host:port[/prefix]`: where a server's OpenAI routes are.
#[derive(Debug, Clone, PartialEq)]
pub struct Url {
    pub host: String,
    pub port: u16,
    /// What goes before `/v1/…` (empty, or a path starting with `/`).
    pub prefix: String,
}

impl std::str::FromStr for Url {
    type Err = String;
    fn from_str(s: &str) -> Result<Url, String> {
        let Some(rest) = s.strip_prefix("http://") else {
            return Err(format!("{s:?}: give an http:// address (https is not spoken here)"));
        };
        let (authority, prefix) = match rest.find('/') {
            Some(i) => (&rest[..i], rest[i..].trim_end_matches('/')),
            None => (rest, ""),
        };
        let (host, port) = match authority.rsplit_once(':') {
            Some((h, p)) => (h, p.parse().map_err(|_| format!("{s:?}: port {p:?} is not a number 0–65535"))?),
            None => (authority, 80),
        };
        if host.is_empty() {
            return Err(format!("{s:?}: no host"));
        }
        Ok(Url { host: host.into(), port, prefix: prefix.trim_end_matches("/v1").into() })
    }
}

impl std::fmt::Display for Url {
    fn fmt(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
        write!(f, "http://{}:{}{}", self.host, self.port, self.prefix)
    }
}

/// A response whose body is still to be read.
pub struct Response {
    pub status: u16,
    pub body: Box<dyn BufRead + Send>,
}

impl Response {
    /// The rest of the body as text (up to `limit` bytes), for an error message.
    pub fn text(mut self, limit: u64) -> String {
        let mut v = Vec::new();
        let _ = (&mut self.body).take(limit).read_to_end(&mut v);
        String::from_utf8_lossy(&v).trim().to_string()
    }
}

/// `POST url.prefix + path` with a JSON body, on a connection of its own (closed after).
pub fn post_json(url: &Url, path: &str, body: &str, timeout: Duration) -> io::Result<Response> {
    send(url, "POST", path, body, timeout)
}

/// `GET url.prefix + path`, on a connection of its own (closed after).
pub fn get(url: &Url, path: &str, timeout: Duration) -> io::Result<Response> {
    send(url, "GET", path, "", timeout)
}

fn send(url: &Url, method: &str, path: &str, body: &str, timeout: Duration) -> io::Result<Response> {
    let addr = (url.host.as_str(), url.port)
        .to_socket_addrs()?
        .next()
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("{}: no address", url.host)))?;
    let mut conn = TcpStream::connect_timeout(&addr, timeout.min(Duration::from_secs(10)))?;
    conn.set_read_timeout(Some(timeout))?;
    conn.set_nodelay(true)?;
    let head = format!(
        "{method} {}{path} HTTP/1.1\r\nHost: {}:{}\r\nContent-Type: application/json\r\nAccept: text/event-stream\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        url.prefix,
        url.host,
        url.port,
        body.len()
    );
    conn.write_all(head.as_bytes())?;
    conn.write_all(body.as_bytes())?;
    let mut r = BufReader::new(conn);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| bad(format!("not an HTTP status line: {:?}", line.trim())))?;
    let (mut chunked, mut length) = (false, None);
    loop {
        line.clear();
        if r.read_line(&mut line)? == 0 {
            return Err(bad("the connection closed within the headers".into()));
        }
        let l = line.trim_end();
        if l.is_empty() {
            break;
        }
        if let Some((k, v)) = l.split_once(':') {
            let (k, v) = (k.trim().to_ascii_lowercase(), v.trim());
            if k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked") {
                chunked = true;
            } else if k == "content-length" {
                length = v.parse::<u64>().ok();
            }
        }
    }
    let body: Box<dyn BufRead + Send> = match (chunked, length) {
        (true, _) => Box::new(BufReader::new(Chunked { inner: r, left: 0, done: false })),
        (false, Some(n)) => Box::new(r.take(n)),
        (false, None) => Box::new(r),
    };
    Ok(Response { status, body })
}

fn bad(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}

/// A chunked body's bytes, handed on as soon as any arrive.
struct Chunked<R> {
    inner: R,
    /// Bytes left in the current chunk.
    left: usize,
    done: bool,
}

impl<R: BufRead> Read for Chunked<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.done || buf.is_empty() {
            return Ok(0);
        }
        if self.left == 0 {
            let mut size = String::new();
            if self.inner.read_line(&mut size)? == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the body ended inside a chunk"));
            }
            let hex = size.trim().split(';').next().unwrap_or("");
            self.left = usize::from_str_radix(hex, 16).map_err(|_| bad(format!("a bad chunk size {hex:?}")))?;
            if self.left == 0 {
                self.done = true;
                return Ok(0);
            }
        }
        let n = buf.len().min(self.left);
        let got = self.inner.read(&mut buf[..n])?;
        if got == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "the body ended inside a chunk"));
        }
        self.left -= got;
        if self.left == 0 {
            let mut crlf = [0u8; 2];
            self.inner.read_exact(&mut crlf)?;
        }
        Ok(got)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_read_or_refused_by_name() {
        let u: Url = "http://127.0.0.1:8080".parse().unwrap();
        assert_eq!((u.host.as_str(), u.port, u.prefix.as_str()), ("127.0.0.1", 8080, ""));
        let u: Url = "http://box/api/v1/".parse().unwrap();
        assert_eq!((u.host.as_str(), u.port, u.prefix.as_str()), ("box", 80, "/api"));
        assert_eq!(u.to_string(), "http://box:80/api");
        for (s, words) in [("https://a:1", "https"), ("http://a:x", "port"), ("http://:8", "no host")] {
            let e = s.parse::<Url>().unwrap_err();
            assert!(e.contains(words), "{s}: {e}");
        }
    }

    #[test]
    fn chunked_bodies_are_joined_and_lines_come_whole() {
        let wire = b"7\r\ndata: a\r\n5\r\n\n\ndat\r\n6;ext=1\r\na: b\n\n\r\n0\r\n\r\n";
        let mut body = BufReader::new(Chunked { inner: &wire[..], left: 0, done: false });
        let mut lines = Vec::new();
        let mut l = String::new();
        while body.read_line(&mut l).unwrap() > 0 {
            lines.push(std::mem::take(&mut l));
        }
        assert_eq!(lines, ["data: a\n", "\n", "data: b\n", "\n"]);
        let cut = b"9\r\ndata";
        let mut body = BufReader::new(Chunked { inner: &cut[..], left: 0, done: false });
        assert!(body.read_to_end(&mut Vec::new()).is_err());
        let mut body = Chunked { inner: &b"zz\r\n"[..], left: 0, done: false };
        assert!(body.read(&mut [0; 4]).unwrap_err().to_string().contains("chunk size"));
    }
}
