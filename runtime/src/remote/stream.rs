//! The two transports of a remote edge: TCP (`HOST:PORT`) and Unix sockets (`unix:PATH`).

use super::RemoteError;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};

/// A connected socket of either kind.
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

fn err(peer: &str, what: &str, e: std::io::Error) -> RemoteError {
    RemoteError::Io { peer: peer.into(), msg: format!("{what}: {e}") }
}

impl Stream {
    /// Connects to `addr`: `unix:PATH`, or `HOST:PORT`.
    pub fn connect(addr: &str) -> Result<Stream, RemoteError> {
        match addr.strip_prefix("unix:") {
            Some(path) => UnixStream::connect(path).map(Stream::Unix).map_err(|e| err(addr, "cannot connect", e)),
            None => {
                let s = TcpStream::connect(addr).map_err(|e| err(addr, "cannot connect", e))?;
                // Frames are written whole: send each at once.
                s.set_nodelay(true).map_err(|e| err(addr, "cannot set TCP_NODELAY", e))?;
                Ok(Stream::Tcp(s))
            }
        }
    }

    /// A second handle on the same socket (one thread reads while another writes).
    pub fn try_clone(&self, peer: &str) -> Result<Stream, RemoteError> {
        match self {
            Stream::Tcp(s) => s.try_clone().map(Stream::Tcp),
            Stream::Unix(s) => s.try_clone().map(Stream::Unix),
        }
        .map_err(|e| err(peer, "cannot share the socket", e))
    }

    /// Closes both directions (the other handles see the end).
    pub fn shutdown(&self) -> std::io::Result<()> {
        match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
        }
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush(),
            Stream::Unix(s) => s.flush(),
        }
    }
}

/// A listening socket of either kind.
pub(super) enum Listener {
    Tcp(TcpListener),
    Unix(UnixListener),
}

impl Listener {
    /// Binds `addr`; the address peers reach it at.
    pub(super) fn bind(addr: &str) -> Result<(Listener, String), RemoteError> {
        match addr.strip_prefix("unix:") {
            Some(path) => {
                // A socket file left by an earlier run would refuse the bind.
                if std::fs::symlink_metadata(path).is_ok_and(|m| {
                    use std::os::unix::fs::FileTypeExt;
                    m.file_type().is_socket()
                }) {
                    let _ = std::fs::remove_file(path);
                }
                let l = UnixListener::bind(path).map_err(|e| err(addr, "cannot listen", e))?;
                Ok((Listener::Unix(l), addr.to_string()))
            }
            None => {
                let l = TcpListener::bind(addr).map_err(|e| err(addr, "cannot listen", e))?;
                let local = l.local_addr().map_err(|e| err(addr, "cannot read the bound address", e))?;
                Ok((Listener::Tcp(l), local.to_string()))
            }
        }
    }

    /// Whether `accept` waits (`false`) or returns `WouldBlock` at once (`true`).
    pub(super) fn set_nonblocking(&self, on: bool, addr: &str) -> Result<(), RemoteError> {
        match self {
            Listener::Tcp(l) => l.set_nonblocking(on),
            Listener::Unix(l) => l.set_nonblocking(on),
        }
        .map_err(|e| err(addr, "cannot set the listener's blocking mode", e))
    }

    /// The next connection and the peer's address.
    pub(super) fn accept(&self, addr: &str) -> Result<(Stream, String), RemoteError> {
        self.try_accept(addr)?.ok_or_else(|| RemoteError::Io { peer: addr.into(), msg: "no connection waiting".into() })
    }

    /// The next connection, or `None` where a non-blocking listener has none waiting.
    pub(super) fn try_accept(&self, addr: &str) -> Result<Option<(Stream, String)>, RemoteError> {
        let none = |e: std::io::Error| {
            if e.kind() == std::io::ErrorKind::WouldBlock {
                Ok(None)
            } else {
                Err(err(addr, "cannot accept", e))
            }
        };
        Ok(Some(match self {
            Listener::Tcp(l) => {
                let (s, peer) = match l.accept() {
                    Ok(c) => c,
                    Err(e) => return none(e),
                };
                s.set_nonblocking(false).map_err(|e| err(addr, "cannot make a connection blocking", e))?;
                s.set_nodelay(true).map_err(|e| err(addr, "cannot set TCP_NODELAY", e))?;
                (Stream::Tcp(s), peer.to_string())
            }
            Listener::Unix(l) => {
                let (s, _) = match l.accept() {
                    Ok(c) => c,
                    Err(e) => return none(e),
                };
                s.set_nonblocking(false).map_err(|e| err(addr, "cannot make a connection blocking", e))?;
                // Unix peers have no address of their own: number them.
                static PEERS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
                let n = PEERS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                (Stream::Unix(s), format!("{addr}#{n}"))
            }
        }))
    }
}
