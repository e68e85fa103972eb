//! Remote edges: a bounded channel between two processes (or machines), over TCP or a Unix
//! socket.
//!
//! A remote edge is still a bounded channel: its capacity is counted in *credits*. The
//! receiving end grants its capacity when the connection opens and gives one credit back each
//! time its consumer takes a message, so a sender never has more than `capacity` messages in
//! flight or waiting at the far end; a slow receiver stalls the sender within that bound, as
//! a full in-process edge does, and nothing grows without bound on either side.
//!
//! On the wire (`frame.rs`): frames of `length | CRC-32 | kind | payload`, each checked as it
//! is read (a length over the limit, a checksum that does not match and a connection closed
//! mid-frame are refused by name); payloads are **bincode 2** (standard configuration). The
//! connection opens with a versioned handshake ([`Hello`]): each side sends its protocol
//! version, the edge's name, a fingerprint of what it carries (for KV blocks: the model's
//! shape and the cache's element type) and its capacity, and refuses a peer that differs.
//!
//! Addresses: `HOST:PORT` for TCP, `unix:PATH` for a Unix socket.
//!
//! Threads: a sender has one thread reading the credits that come back; a receiver one
//! reading frames into its bounded buffer; [`serve`] one accepting connections and one per
//! connection handing messages to the handler. All are spawned here, in the runtime.

mod frame;
mod stream;

pub use frame::{Kind, MAX_FRAME};
pub use stream::Stream;

use crossbeam_channel::{Receiver, Sender};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// The version of the wire protocol this build speaks (frames, handshake, credits).
pub const PROTOCOL_VERSION: u32 = 1;

/// Why a remote edge failed. Every variant names the peer (its address).
#[derive(Debug, Clone, thiserror::Error, PartialEq)]
pub enum RemoteError {
    #[error("remote edge to {peer}: {msg}")]
    Io { peer: String, msg: String },
    #[error("remote edge to {peer}: the peer closed the connection")]
    Closed { peer: String },
    #[error("remote edge to {peer}: the connection closed mid-frame ({got} of {want} bytes)")]
    Truncated { peer: String, got: usize, want: usize },
    #[error("remote edge to {peer}: a frame's checksum does not match (CRC-32 {want:#010x} sent, {got:#010x} received): the frame is corrupt")]
    Checksum { peer: String, want: u32, got: u32 },
    #[error("remote edge to {peer}: a frame of {len} bytes exceeds the limit of {limit}")]
    TooLong { peer: String, len: usize, limit: usize },
    #[error("remote edge to {peer}: the peer speaks weir edge protocol version {theirs}, this build {ours}")]
    Version { peer: String, theirs: u32, ours: u32 },
    #[error("remote edge to {peer}: the peer's {what} is {theirs:?}, this side's {ours:?}")]
    Mismatch { peer: String, what: &'static str, theirs: String, ours: String },
    #[error("remote edge to {peer}: {msg}")]
    Protocol { peer: String, msg: String },
    #[error("remote edge to {peer}: no credit came back within {secs:.1} s (the receiver is stalled)")]
    Stalled { peer: String, secs: f64 },
}

/// The handshake each end sends when a connection opens.
#[derive(Debug, Clone, PartialEq, Eq, bincode::Encode, bincode::Decode)]
pub struct Hello {
    /// Always `weir-edge`: refuses a peer that is not a weir edge at all.
    pub magic: String,
    /// [`PROTOCOL_VERSION`] of the sender of this hello.
    pub version: u32,
    /// Which edge this is (both ends must name the same).
    pub edge: String,
    /// What the messages carry, as a string both ends must agree on.
    pub fingerprint: String,
    /// The receiver's capacity (its initial credits); the sender's own bound otherwise.
    pub capacity: u32,
}

impl Hello {
    /// This build's hello for edge `edge` carrying `fingerprint`, with `capacity` ≥ 1.
    pub fn new(edge: &str, fingerprint: &str, capacity: usize) -> Hello {
        Hello {
            magic: "weir-edge".into(),
            version: PROTOCOL_VERSION,
            edge: edge.into(),
            fingerprint: fingerprint.into(),
            capacity: capacity.clamp(1, u32::MAX as usize) as u32,
        }
    }

    /// Refuses a peer's hello that does not match this side's.
    fn check(&self, theirs: &Hello, peer: &str) -> Result<(), RemoteError> {
        let peer = peer.to_string();
        if theirs.magic != self.magic {
            return Err(RemoteError::Mismatch {
                peer,
                what: "greeting",
                theirs: theirs.magic.clone(),
                ours: self.magic.clone(),
            });
        }
        if theirs.version != self.version {
            return Err(RemoteError::Version { peer, theirs: theirs.version, ours: self.version });
        }
        if theirs.edge != self.edge {
            return Err(RemoteError::Mismatch {
                peer,
                what: "edge",
                theirs: theirs.edge.clone(),
                ours: self.edge.clone(),
            });
        }
        if theirs.fingerprint != self.fingerprint {
            let (theirs, ours) = (theirs.fingerprint.clone(), self.fingerprint.clone());
            return Err(RemoteError::Mismatch { peer, what: "fingerprint", theirs, ours });
        }
        if theirs.capacity == 0 {
            return Err(RemoteError::Protocol { peer, msg: "the peer offers a capacity of 0".into() });
        }
        Ok(())
    }
}

fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// The sender's credits and whether the connection still stands.
struct Credits {
    state: Mutex<(usize, Option<RemoteError>)>,
    changed: Condvar,
    /// Lanes to wake when credits come back or the connection ends.
    waiters: Waiters,
}

/// Lanes waiting on a remote edge (a sender for credits, a receiver for messages), each woken
/// once when what it waits for changes.
#[derive(Default)]
struct Waiters(Mutex<Vec<Arc<crate::channel::Waker>>>);

impl Waiters {
    fn add(&self, lane: &crate::pool::LaneWaker) {
        let mut w = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if !w.iter().any(|x| Arc::ptr_eq(x, &lane.0)) {
            w.push(lane.0.clone());
        }
    }
    fn wake(&self) {
        for w in std::mem::take(&mut *self.0.lock().unwrap_or_else(|p| p.into_inner())) {
            w.wake();
        }
    }
}

/// The sending end of a remote edge. `send` takes `&self`: share it behind an `Arc`.
pub struct RemoteTx<T> {
    peer: String,
    writer: Mutex<Stream>,
    credits: Arc<Credits>,
    capacity: usize,
    /// How long `send` waits for a credit before it calls the receiver stalled.
    patience: Duration,
    sent_bytes: std::sync::atomic::AtomicU64,
    _t: std::marker::PhantomData<fn(T)>,
}

impl<T: bincode::Encode> RemoteTx<T> {
    /// Connects to `addr` (`HOST:PORT` or `unix:PATH`) and shakes hands as `hello`'s edge; the
    /// capacity is the receiver's.
    pub fn connect(addr: &str, hello: &Hello) -> Result<RemoteTx<T>, RemoteError> {
        let mut stream = Stream::connect(addr)?;
        frame::write_msg(&mut stream, Kind::Hello, hello, addr)?;
        let theirs: Hello = frame::read_msg(&mut stream, Kind::Hello, addr)?;
        if let Err(e) = hello.check(&theirs, addr) {
            let _ = stream.shutdown();
            return Err(e);
        }
        let capacity = theirs.capacity as usize;
        let credits = Arc::new(Credits {
            state: Mutex::new((capacity, None)),
            changed: Condvar::new(),
            waiters: Waiters::default(),
        });
        let mut reader = stream.try_clone(addr)?;
        let (c, peer) = (credits.clone(), addr.to_string());
        std::thread::Builder::new()
            .name(format!("weir-edge-credits {addr}"))
            .spawn(move || read_credits(&mut reader, &c, &peer))
            .map_err(|e| RemoteError::Io { peer: addr.into(), msg: format!("cannot start its thread: {e}") })?;
        Ok(RemoteTx {
            peer: addr.into(),
            writer: Mutex::new(stream),
            credits,
            capacity,
            patience: Duration::from_secs(600),
            sent_bytes: Default::default(),
            _t: Default::default(),
        })
    }

    /// Waits at most `patience` for a credit before `send` fails as stalled (default 10 min).
    pub fn with_patience(mut self, patience: Duration) -> Self {
        self.patience = patience;
        self
    }

    /// The peer's address.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// The receiver's capacity: messages in flight at most.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Credits left now (messages that may be sent without waiting).
    pub fn credits(&self) -> usize {
        self.credits.state.lock().map_or(0, |s| s.0)
    }

    /// Whether a message could be sent now without waiting (a credit, and the peer there).
    pub fn has_room(&self) -> bool {
        self.credits.state.lock().is_ok_and(|s| s.0 > 0 && s.1.is_none())
    }

    /// Wakes `lane` when credits come back or the connection ends (once; an actor that finds
    /// no room registers, then looks again: a credit between the two is not lost).
    pub fn notify_on_credit(&self, lane: &crate::pool::LaneWaker) {
        self.credits.waiters.add(lane);
    }

    /// Why the connection failed, if it has.
    pub fn failed(&self) -> Option<RemoteError> {
        self.credits.state.lock().ok().and_then(|s| s.1.clone())
    }

    /// Payload bytes sent so far.
    pub fn sent_bytes(&self) -> u64 {
        self.sent_bytes.load(Ordering::Relaxed)
    }

    /// Sends `msg` once a credit is there: waits while the receiver has `capacity` messages
    /// unconsumed; an error when the connection has failed or no credit came within the
    /// patience.
    pub fn send(&self, msg: &T) -> Result<(), RemoteError> {
        let payload = bincode::encode_to_vec(msg, config()).map_err(|e| RemoteError::Protocol {
            peer: self.peer.clone(),
            msg: format!("cannot encode a message: {e}"),
        })?;
        self.take_credit()?;
        let mut w = self.writer.lock().map_err(|_| self.poisoned())?;
        frame::write_frame(&mut *w, Kind::Data, &payload, &self.peer).inspect_err(|e| self.fail(e.clone()))?;
        self.sent_bytes.fetch_add(payload.len() as u64, Ordering::Relaxed);
        Ok(())
    }

    fn take_credit(&self) -> Result<(), RemoteError> {
        let deadline = Instant::now() + self.patience;
        let mut s = self.credits.state.lock().map_err(|_| self.poisoned())?;
        loop {
            if let Some(e) = &s.1 {
                return Err(e.clone());
            }
            if s.0 > 0 {
                s.0 -= 1;
                return Ok(());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(RemoteError::Stalled { peer: self.peer.clone(), secs: self.patience.as_secs_f64() });
            }
            s = self.credits.changed.wait_timeout(s, left).map_err(|_| self.poisoned())?.0;
        }
    }

    fn fail(&self, e: RemoteError) {
        if let Ok(mut s) = self.credits.state.lock() {
            s.1.get_or_insert(e);
        }
        self.credits.changed.notify_all();
        self.credits.waiters.wake();
    }

    fn poisoned(&self) -> RemoteError {
        RemoteError::Protocol { peer: self.peer.clone(), msg: "a thread panicked while sending".into() }
    }
}

impl<T> Drop for RemoteTx<T> {
    /// Says goodbye (so the receiver tells a clean end from a lost peer) and closes.
    fn drop(&mut self) {
        if let Ok(mut w) = self.writer.lock() {
            let _ = frame::write_frame(&mut *w, Kind::Bye, &[], &self.peer);
            let _ = w.shutdown();
        }
    }
}

/// The sender's thread: adds the credits that come back; records why the connection ended.
fn read_credits(stream: &mut Stream, credits: &Credits, peer: &str) {
    let end = loop {
        match frame::read_frame(stream, peer) {
            Ok((Kind::Credit, payload)) => match bincode::decode_from_slice::<u32, _>(&payload, config()) {
                Ok((n, _)) => {
                    if let Ok(mut s) = credits.state.lock() {
                        s.0 += n as usize;
                    }
                    credits.changed.notify_all();
                    credits.waiters.wake();
                }
                Err(e) => {
                    break RemoteError::Protocol {
                        peer: peer.into(),
                        msg: format!("a credit frame does not decode: {e}"),
                    }
                }
            },
            Ok((Kind::Bye, _)) => break RemoteError::Closed { peer: peer.into() },
            Ok((kind, _)) => {
                break RemoteError::Protocol {
                    peer: peer.into(),
                    msg: format!("a {kind:?} frame where credits belong"),
                }
            }
            Err(e) => break e,
        }
    };
    if let Ok(mut s) = credits.state.lock() {
        s.1.get_or_insert(end);
    }
    credits.changed.notify_all();
    credits.waiters.wake();
}

/// The receiving end of a remote edge: `recv` takes a message and gives its credit back.
pub struct RemoteRx<T> {
    peer: String,
    writer: Mutex<Stream>,
    inbox: Receiver<Result<T, RemoteError>>,
    ended: Mutex<Option<RemoteError>>,
    received_bytes: Arc<std::sync::atomic::AtomicU64>,
    arrivals: Arc<Waiters>,
}

impl<T: bincode::Decode<()> + Send + 'static> RemoteRx<T> {
    /// The peer's address.
    pub fn peer(&self) -> &str {
        &self.peer
    }

    /// Payload bytes received so far.
    pub fn received_bytes(&self) -> u64 {
        self.received_bytes.load(Ordering::Relaxed)
    }

    /// The next message (waiting for it), its credit sent back to the sender; `Closed` after
    /// the sender said goodbye, another error when the connection broke.
    pub fn recv(&self) -> Result<T, RemoteError> {
        let msg = self.take()?;
        self.give_credit();
        Ok(msg)
    }

    /// The next message if one is there, without waiting (its credit sent back); `None` when
    /// none has come; the error once the connection has ended.
    pub fn try_recv(&self) -> Option<Result<T, RemoteError>> {
        if let Some(e) = self.ended.lock().ok().and_then(|e| e.clone()) {
            return Some(Err(e));
        }
        let got = match self.inbox.try_recv() {
            Ok(got) => got,
            Err(crossbeam_channel::TryRecvError::Empty) => return None,
            Err(crossbeam_channel::TryRecvError::Disconnected) => Err(RemoteError::Closed { peer: self.peer.clone() }),
        };
        match &got {
            Ok(_) => self.give_credit(),
            Err(e) => {
                if let Ok(mut end) = self.ended.lock() {
                    *end = Some(e.clone());
                }
            }
        }
        Some(got)
    }

    /// Why the connection ended, once a receive has met its end.
    pub fn ended(&self) -> Option<RemoteError> {
        self.ended.lock().ok().and_then(|e| e.clone())
    }

    /// Whether [`RemoteRx::try_recv`] would return something now (a message, or the end).
    pub fn has_message(&self) -> bool {
        !self.inbox.is_empty() || self.ended.lock().is_ok_and(|e| e.is_some())
    }

    /// Wakes `lane` when a message (or the end) arrives (once; register, then look again).
    pub fn notify_on_arrival(&self, lane: &crate::pool::LaneWaker) {
        self.arrivals.add(lane);
    }

    /// The next message, its credit kept until [`RemoteRx::give_credit`].
    fn take(&self) -> Result<T, RemoteError> {
        if let Some(e) = self.ended.lock().ok().and_then(|e| e.clone()) {
            return Err(e);
        }
        let got = self.inbox.recv().unwrap_or_else(|_| Err(RemoteError::Closed { peer: self.peer.clone() }));
        if let Err(e) = &got {
            if let Ok(mut end) = self.ended.lock() {
                *end = Some(e.clone());
            }
        }
        got
    }

    /// Gives the sender one credit back.
    fn give_credit(&self) {
        let credit = bincode::encode_to_vec(1u32, config()).unwrap_or_default();
        if let Ok(mut w) = self.writer.lock() {
            // A sender that is gone needs no credit: its end is reported by the reader.
            let _ = frame::write_frame(&mut *w, Kind::Credit, &credit, &self.peer);
        }
    }
}

impl<T> Drop for RemoteRx<T> {
    fn drop(&mut self) {
        if let Ok(w) = self.writer.lock() {
            let _ = w.shutdown();
        }
    }
}

/// A listening socket that remote edges connect to.
pub struct RemoteListener {
    listener: stream::Listener,
    addr: String,
}

impl RemoteListener {
    /// Listens on `addr` (`HOST:PORT`, port 0 for any; `unix:PATH`, the file replaced).
    pub fn bind(addr: &str) -> Result<RemoteListener, RemoteError> {
        let (listener, addr) = stream::Listener::bind(addr)?;
        Ok(RemoteListener { listener, addr })
    }

    /// The address peers connect to (the port chosen where 0 was asked).
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Waits for a sender and shakes hands as `hello` (its capacity is this end's).
    pub fn accept<T: bincode::Decode<()> + Send + 'static>(&self, hello: &Hello) -> Result<RemoteRx<T>, RemoteError> {
        let (stream, peer) = self.listener.accept(&self.addr)?;
        handshake_rx(stream, peer, std::slice::from_ref(hello)).map(|(_, rx)| rx)
    }

    /// Waits for a sender of any of these edges (one listener serving a process's edges) and
    /// shakes hands as the hello of the edge it names: which one, and its receiving end. A
    /// sender of an edge not among them is refused (both ends say which edge).
    pub fn accept_any<T: bincode::Decode<()> + Send + 'static>(
        &self,
        hellos: &[Hello],
    ) -> Result<(usize, RemoteRx<T>), RemoteError> {
        let (stream, peer) = self.listener.accept(&self.addr)?;
        handshake_rx(stream, peer, hellos)
    }
}

impl RemoteListener {
    /// [`RemoteListener::accept_any`] waiting until `deadline` at most: `Ok(None)` when no
    /// sender came by then (the listener is left as it was, ready for the next call).
    pub fn accept_any_until<T: bincode::Decode<()> + Send + 'static>(
        &self,
        hellos: &[Hello],
        deadline: Instant,
    ) -> Result<Option<(usize, RemoteRx<T>)>, RemoteError> {
        self.listener.set_nonblocking(true, &self.addr)?;
        let got = loop {
            match self.listener.try_accept(&self.addr) {
                Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
                other => break other,
            }
        };
        self.listener.set_nonblocking(false, &self.addr)?;
        match got? {
            Some((stream, peer)) => handshake_rx(stream, peer, hellos).map(Some),
            None => Ok(None),
        }
    }
}

/// The receiving side's handshake: reads the sender's hello, answers with the hello in `hellos`
/// of the edge it names (or the first, which the sender then refuses), checks it.
fn handshake_rx<T: bincode::Decode<()> + Send + 'static>(
    mut stream: Stream,
    peer: String,
    hellos: &[Hello],
) -> Result<(usize, RemoteRx<T>), RemoteError> {
    let theirs: Hello = frame::read_msg(&mut stream, Kind::Hello, &peer)?;
    let which = hellos.iter().position(|h| h.edge == theirs.edge).unwrap_or(0);
    let hello = &hellos[which];
    frame::write_msg(&mut stream, Kind::Hello, hello, &peer)?;
    if let Err(e) = hello.check(&Hello { capacity: theirs.capacity.max(1), ..theirs }, &peer) {
        let _ = stream.shutdown();
        return Err(e);
    }
    let capacity = hello.capacity as usize;
    // One more than the credits: a sender that overruns them is caught, not blocked on.
    let (tx, inbox) = crossbeam_channel::bounded(capacity + 1);
    let mut reader = stream.try_clone(&peer)?;
    let received_bytes = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let arrivals = Arc::new(Waiters::default());
    let (p, counted, woken) = (peer.clone(), received_bytes.clone(), arrivals.clone());
    std::thread::Builder::new()
        .name(format!("weir-edge-recv {peer}"))
        .spawn(move || read_data::<T>(&mut reader, &tx, capacity, &p, &counted, &woken))
        .map_err(|e| RemoteError::Io { peer: peer.clone(), msg: format!("cannot start its thread: {e}") })?;
    let rx = RemoteRx { peer, writer: Mutex::new(stream), inbox, ended: Mutex::new(None), received_bytes, arrivals };
    Ok((which, rx))
}

/// The receiver's thread: decodes data frames into the inbox, ends it with why it stopped.
fn read_data<T: bincode::Decode<()>>(
    stream: &mut Stream,
    inbox: &Sender<Result<T, RemoteError>>,
    capacity: usize,
    peer: &str,
    counted: &std::sync::atomic::AtomicU64,
    arrivals: &Waiters,
) {
    let end = loop {
        match frame::read_frame(stream, peer) {
            Ok((Kind::Data, payload)) => {
                let msg = match bincode::decode_from_slice::<T, _>(&payload, config()) {
                    Ok((m, used)) if used == payload.len() => m,
                    Ok((_, used)) => {
                        let msg = format!("a message of {} bytes decoded from only {used}", payload.len());
                        break RemoteError::Protocol { peer: peer.into(), msg };
                    }
                    Err(e) => {
                        break RemoteError::Protocol {
                            peer: peer.into(),
                            msg: format!("a message does not decode: {e}"),
                        }
                    }
                };
                counted.fetch_add(payload.len() as u64, Ordering::Relaxed);
                // Credits keep the unconsumed messages at `capacity`; the last slot is the end's.
                if inbox.len() >= capacity {
                    let msg = format!("the peer sent more than its {capacity} credits allow");
                    break RemoteError::Protocol { peer: peer.into(), msg };
                }
                if inbox.send(Ok(msg)).is_err() {
                    return;
                }
                arrivals.wake();
            }
            Ok((Kind::Bye, _)) => break RemoteError::Closed { peer: peer.into() },
            Ok((kind, _)) => {
                break RemoteError::Protocol { peer: peer.into(), msg: format!("a {kind:?} frame where data belongs") }
            }
            Err(e) => break e,
        }
    };
    // The inbox has room for this one: it holds at most `capacity` messages plus the end.
    let _ = inbox.send(Err(end));
    arrivals.wake();
}

/// A running [`serve`]: accepting until dropped or shut down.
pub struct Server {
    addr: String,
    stop: Arc<AtomicBool>,
}

impl Server {
    /// The address peers connect to.
    pub fn addr(&self) -> &str {
        &self.addr
    }

    /// Stops accepting (connections already open run until their senders leave).
    pub fn shutdown(&self) {
        if !self.stop.swap(true, Ordering::SeqCst) {
            // Wake the accepting thread with a connection of our own.
            let _ = Stream::connect(&self.addr);
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Accepts senders on `listener` as `hello`'s edge, each on a thread of its own that hands
/// every message to `handler` (its credit goes back when the handler returns); a connection
/// that ends — cleanly (`Closed`) or not — is handed over as its error, once.
pub fn serve<T, H>(listener: RemoteListener, hello: Hello, handler: H) -> Result<Server, RemoteError>
where
    T: bincode::Decode<()> + Send + 'static,
    H: Fn(&str, Result<T, RemoteError>) + Send + Sync + 'static,
{
    let stop = Arc::new(AtomicBool::new(false));
    let addr = listener.addr.clone();
    let (s, handler) = (stop.clone(), Arc::new(handler));
    std::thread::Builder::new()
        .name(format!("weir-edge-accept {addr}"))
        .spawn(move || {
            while !s.load(Ordering::SeqCst) {
                let (stream, peer) = match listener.listener.accept(&listener.addr) {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!("{e}");
                        std::thread::sleep(Duration::from_millis(50));
                        continue;
                    }
                };
                if s.load(Ordering::SeqCst) {
                    break;
                }
                let (h, hello) = (handler.clone(), hello.clone());
                let spawned = std::thread::Builder::new().name(format!("weir-edge-serve {peer}")).spawn(move || {
                    let rx = match handshake_rx::<T>(stream, peer.clone(), std::slice::from_ref(&hello)) {
                        Ok((_, rx)) => rx,
                        Err(e) => return h(&peer, Err(e)),
                    };
                    loop {
                        match rx.take() {
                            Ok(msg) => {
                                h(&peer, Ok(msg));
                                rx.give_credit();
                            }
                            Err(e) => return h(&peer, Err(e)),
                        }
                    }
                });
                if let Err(e) = spawned {
                    tracing::warn!("remote edge {}: cannot start a connection's thread: {e}", listener.addr);
                }
            }
        })
        .map_err(|e| RemoteError::Io { peer: addr.clone(), msg: format!("cannot start its thread: {e}") })?;
    Ok(Server { addr, stop })
}

#[cfg(test)]
mod tests;
