//! Frames on a remote edge: `length: u32 LE | crc32: u32 LE | kind: u8 | payload`, the
//! checksum over the kind and the payload. Every read is checked: the kind known, the length
//! within [`MAX_FRAME`], the whole frame there, the checksum equal.

use super::{config, RemoteError};
use std::io::{Read, Write};

/// The longest payload a frame may carry (256 MiB): a larger length is a corrupt or foreign
/// peer, refused before anything is read. (A payload's buffer grows as its bytes come, so a
/// lying length costs no memory either.)
pub const MAX_FRAME: usize = 1 << 28;

const HEADER: usize = 9;

/// What a frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The handshake.
    Hello = 1,
    /// A message.
    Data = 2,
    /// Credits given back to the sender (a u32).
    Credit = 3,
    /// The sender is done: a clean end.
    Bye = 4,
}

impl Kind {
    fn from_byte(b: u8) -> Option<Kind> {
        [Kind::Hello, Kind::Data, Kind::Credit, Kind::Bye].into_iter().find(|k| *k as u8 == b)
    }
}

fn checksum(kind: u8, payload: &[u8]) -> u32 {
    let mut h = crc32fast::Hasher::new();
    h.update(&[kind]);
    h.update(payload);
    h.finalize()
}

fn io(peer: &str, e: std::io::Error) -> RemoteError {
    match e.kind() {
        std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::UnexpectedEof => {
            RemoteError::Closed { peer: peer.into() }
        }
        _ => RemoteError::Io { peer: peer.into(), msg: e.to_string() },
    }
}

/// Writes one frame (in one `write_all`, so frames from threads sharing a lock never interleave).
pub fn write_frame(w: &mut impl Write, kind: Kind, payload: &[u8], peer: &str) -> Result<(), RemoteError> {
    if payload.len() > MAX_FRAME {
        return Err(RemoteError::TooLong { peer: peer.into(), len: payload.len(), limit: MAX_FRAME });
    }
    let mut buf = Vec::with_capacity(HEADER + payload.len());
    buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    buf.extend_from_slice(&checksum(kind as u8, payload).to_le_bytes());
    buf.push(kind as u8);
    buf.extend_from_slice(payload);
    w.write_all(&buf).and_then(|_| w.flush()).map_err(|e| io(peer, e))
}

/// Reads as much of `buf` as comes: the count (less than asked only at the end of the stream).
fn read_full(r: &mut impl Read, buf: &mut [u8], peer: &str) -> Result<usize, RemoteError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(io(peer, e)),
        }
    }
    Ok(got)
}

/// Reads one frame: its kind and payload, checked.
pub fn read_frame(r: &mut impl Read, peer: &str) -> Result<(Kind, Vec<u8>), RemoteError> {
    let mut head = [0u8; HEADER];
    match read_full(r, &mut head, peer)? {
        0 => return Err(RemoteError::Closed { peer: peer.into() }),
        n if n < HEADER => return Err(RemoteError::Truncated { peer: peer.into(), got: n, want: HEADER }),
        _ => {}
    }
    let len = u32::from_le_bytes(head[0..4].try_into().unwrap_or_default()) as usize;
    let want = u32::from_le_bytes(head[4..8].try_into().unwrap_or_default());
    if len > MAX_FRAME {
        return Err(RemoteError::TooLong { peer: peer.into(), len, limit: MAX_FRAME });
    }
    let mut payload = Vec::with_capacity(len.min(1 << 20));
    let n = r.take(len as u64).read_to_end(&mut payload).map_err(|e| io(peer, e))?;
    if n < len {
        return Err(RemoteError::Truncated { peer: peer.into(), got: HEADER + n, want: HEADER + len });
    }
    let got = checksum(head[8], &payload);
    if got != want {
        return Err(RemoteError::Checksum { peer: peer.into(), want, got });
    }
    let Some(kind) = Kind::from_byte(head[8]) else {
        return Err(RemoteError::Protocol { peer: peer.into(), msg: format!("a frame of unknown kind {}", head[8]) });
    };
    Ok((kind, payload))
}

/// Writes a message as one frame of `kind`.
pub fn write_msg<M: bincode::Encode>(w: &mut impl Write, kind: Kind, msg: &M, peer: &str) -> Result<(), RemoteError> {
    let payload = bincode::encode_to_vec(msg, config())
        .map_err(|e| RemoteError::Protocol { peer: peer.into(), msg: format!("cannot encode a message: {e}") })?;
    write_frame(w, kind, &payload, peer)
}

/// Reads one frame that must be of `kind`, and decodes it.
pub fn read_msg<M: bincode::Decode<()>>(r: &mut impl Read, kind: Kind, peer: &str) -> Result<M, RemoteError> {
    let (got, payload) = read_frame(r, peer)?;
    if got != kind {
        return Err(RemoteError::Protocol {
            peer: peer.into(),
            msg: format!("a {got:?} frame where {kind:?} belongs"),
        });
    }
    bincode::decode_from_slice(&payload, config())
        .map(|(m, _)| m)
        .map_err(|e| RemoteError::Protocol { peer: peer.into(), msg: format!("a {kind:?} frame does not decode: {e}") })
}
