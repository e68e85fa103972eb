//! Loader: reads weight tensors from their files and sends each, as stored, to the operators
//! that use it. A source: it fires once per tensor.
//!
//! *Resident* tensors are read once and kept by their consumers (sticky edges). *Streamed*
//! tensors are read again for every pass, in the order the plan lists them (layer order), each
//! into a buffer from the loader's pool; the consumer drops it after one firing, which returns
//! the bytes. The loader is ready only when the pool has room for the next tensor, so the pool's
//! budget bounds how far reading runs ahead of compute: prefetch is backpressure.
//!
//! *Held* tensors (a subset of the streamed ones: FlexGen's DRAM tier, for weights computed
//! on a GPU) are read from storage once and kept in memory (twice where reading runs ahead into
//! the second pass before the first read has landed); every pass after takes them from there
//! instead of the disk — through the same pool, in the same order, so the
//! window bounds them (and their copies on the GPU) as it bounds those read from storage.
//!
//! Two ways to read: `pread` into an aligned buffer (I/O lanes), or io_uring with `O_DIRECT`,
//! several chunk reads in flight (NVMe lanes), falling back to buffered reads, said once in the
//! log, where the filesystem refuses `O_DIRECT`. Every read is checked against the tensor's
//! place in the file; a short read or a changed file is an error naming the tensor and file.

mod probe;
mod uring;

pub use probe::{evict_page_cache, measure_read, measure_read_ranges};

use crate::spec::{Mem, OpEnv, OpSpec, ParamValue, Params, Port};
use crate::Packet;
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use uring::{Flight, Stream, BLOCK};
use weir_runtime::{DType, Emit, FireCx, HostBuffer, Inputs, OpError, Operator, Pool, ReadyCx, SpanKind, Step, Tensor};

/// A loader node: made from a graph's `weight` statements (one per loader lane), not written
/// as a node. `streamed[i]`: tensor `i` is read again for every pass instead of once;
/// `held[i]` (streamed tensors only): read once, held in memory and sent every pass — the DRAM
/// tier of weights a GPU computes with. `mode` follows from the lane it reads on.
#[derive(Debug, Clone, PartialEq)]
pub struct Spec {
    pub tensors: Vec<TensorSource>,
    pub streamed: Vec<bool>,
    pub held: Vec<bool>,
    pub mode: IoMode,
}

impl OpSpec for Spec {
    const KIND: &'static str = "load";
    const WRITTEN: bool = false;
    fn from_params(_: &mut Params) -> Spec {
        Spec { tensors: Vec::new(), streamed: Vec::new(), held: Vec::new(), mode: IoMode::Pread }
    }
    fn params(&self) -> Vec<(&'static str, ParamValue)> {
        Vec::new()
    }
    fn inputs(&self) -> Vec<Port> {
        Vec::new()
    }
    /// Each tensor on a port of its own, named after it.
    fn outputs(&self) -> Vec<Port> {
        self.tensors.iter().map(|t| Port::weight(&t.name, t.shape.clone())).collect()
    }
    /// It reads into host memory wherever it runs.
    fn memories(&self) -> (Mem, Mem) {
        (Mem::Host, Mem::Host)
    }
    fn instantiate(&self, env: &OpEnv, _: Option<u32>) -> Box<dyn Operator<Packet>> {
        let mut l = Loader::new(self.tensors.clone(), self.streamed.clone(), self.mode, env.host_pool.clone());
        if self.held.iter().any(|h| *h) {
            l.hold(self.held.clone(), env.held_pool.clone());
        }
        l.count_into(env.disk_bytes.clone());
        l.hold_bf16_as_f16(env.bf16_as_f16);
        Box::new(l)
    }
}

impl Spec {
    /// Tensor `i`'s tier: `host` (resident), `dram` (held) or `nvme` (read every pass).
    pub fn tier(&self, i: usize) -> &'static str {
        match (self.streamed[i], self.held[i]) {
            (false, _) => "host",
            (true, true) => "dram",
            (true, false) => "nvme",
        }
    }
}

/// Where one tensor's bytes are.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorSource {
    /// The tensor's name in the weights (`model.layers.0.mlp.up_proj.weight`).
    pub name: String,
    /// The file holding it.
    pub path: PathBuf,
    /// Absolute byte offset in the file.
    pub offset: u64,
    /// Element type as stored.
    pub dtype: DType,
    /// Shape as stored.
    pub shape: Vec<usize>,
}

impl TensorSource {
    /// Bytes of data.
    pub fn nbytes(&self) -> u64 {
        (self.shape.iter().product::<usize>() * self.dtype.size()) as u64
    }
}

/// How a loader reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoMode {
    /// `pread` into an aligned buffer, through the page cache.
    Pread,
    /// io_uring, `O_DIRECT` where the filesystem allows, `depth` reads of `chunk` bytes in flight.
    /// `ahead`: reads of the next tensors go on between firings, as far as the pool has room (a
    /// reader lane); otherwise each firing reads one tensor and nothing is in flight after it
    /// (a loader on a compute lane, where reading and computing take turns).
    Uring { depth: usize, chunk: usize, ahead: bool },
}

struct OpenFile {
    file: File,
    len: u64,
    direct: bool,
}

/// A position in the loader's order: residents once, then streamed tensors round and round.
#[derive(Debug, Clone, Copy)]
struct Cursor {
    i: usize,
    residents_done: bool,
}

impl Cursor {
    /// Moves to the next tensor due at or after `i`: the next resident during the first round,
    /// then the next streamed tensor, cyclically; `i == streamed.len()` when none is left.
    fn settle(&mut self, streamed: &[bool]) {
        let n = streamed.len();
        if !self.residents_done {
            while self.i < n && streamed[self.i] {
                self.i += 1;
            }
            if self.i < n {
                return;
            }
            self.residents_done = true;
            self.i = 0;
        }
        if !streamed.iter().any(|s| *s) {
            self.i = n;
            return;
        }
        while !streamed[self.i % n] {
            self.i += 1;
        }
        self.i %= n;
    }

    fn step(&mut self, streamed: &[bool]) {
        self.i += 1;
        self.settle(streamed);
    }
}

/// See the module doc.
pub struct Loader {
    tensors: Vec<TensorSource>,
    streamed: Vec<bool>,
    mode: IoMode,
    pool: Option<Pool>,
    /// The next tensor to send; residents first, then streamed ones round and round.
    next: Cursor,
    /// The next tensor to start reading (io_uring reads run ahead of `next`).
    ahead: Cursor,
    /// Before `files`: dropping it waits for reads from those files.
    stream: Option<Stream>,
    files: HashMap<PathBuf, OpenFile>,
    /// Bytes read from storage so far.
    pub bytes_read: u64,
    counter: Option<Arc<std::sync::atomic::AtomicU64>>,
    bf16_as_f16: bool,
    /// Held tensors, their copies once read, and where the copies' memory comes from.
    held: Vec<bool>,
    copies: Vec<Option<Tensor>>,
    held_pool: Option<Pool>,
}

/// At most this many tensors are being read at once (small tensors are many per chunk depth).
const MAX_AHEAD: usize = 64;

impl Loader {
    /// A loader sending `tensors[i]` on output port `i`; `streamed[i]` says whether tensor `i`
    /// is read for every pass. Streamed tensors need a pool.
    pub fn new(tensors: Vec<TensorSource>, streamed: Vec<bool>, mode: IoMode, pool: Option<Pool>) -> Loader {
        assert_eq!(tensors.len(), streamed.len());
        let mut next = Cursor { i: 0, residents_done: false };
        next.settle(&streamed);
        Loader {
            tensors,
            streamed,
            mode,
            pool,
            next,
            ahead: next,
            stream: None,
            files: HashMap::new(),
            bytes_read: 0,
            counter: None,
            bf16_as_f16: false,
            held: Vec::new(),
            copies: Vec::new(),
            held_pool: None,
        }
    }

    /// Keeps the streamed tensors with `held[i]` in memory after their first read (their
    /// copies from `pool`, which the plan sizes for them; the heap without one), and takes them
    /// from there every pass after.
    pub fn hold(&mut self, held: Vec<bool>, pool: Option<Pool>) {
        assert_eq!(held.len(), self.tensors.len(), "a flag per tensor");
        debug_assert!(held.iter().zip(&self.streamed).all(|(h, s)| !h || *s), "only streamed tensors are held");
        self.copies = vec![None; held.len()];
        (self.held, self.held_pool) = (held, pool);
    }

    /// Whether tensor `i` comes from its copy in memory.
    fn copied(&self, i: usize) -> bool {
        self.copies.get(i).is_some_and(Option::is_some)
    }

    /// Held tensor `i` from its copy, sent as it is — no copy into the window: it takes the
    /// window's room that its buffer would have (a reservation the tensor keeps), not its
    /// memory, so the window still bounds what is in flight downstream (a GPU's streamed
    /// copies). `Ok(None)` when the window has no room now.
    fn held_copy(&self, i: usize) -> Result<Option<Tensor>, OpError> {
        let copy = self.copies[i].clone().expect("a held tensor's copy");
        let Some(pool) = &self.pool else { return Ok(Some(copy)) };
        let len = self.buffer_len(&self.tensors[i]);
        match pool.try_reserve(len) {
            Some(r) => Ok(Some(copy.holding(Arc::new(r)))),
            None if len > pool.budget() => Err(self.too_big(i, len, pool)),
            None => Ok(None),
        }
    }

    fn too_big(&self, i: usize, len: usize, pool: &Pool) -> OpError {
        OpError::new(format!(
            "tensor `{}` needs {len} bytes but the {} pool's budget is {} bytes",
            self.tensors[i].name,
            pool.name(),
            pool.budget()
        ))
    }

    /// Keeps a copy of held tensor `i`, just read, unless it has one.
    fn keep(&mut self, i: usize, w: &Tensor) -> Result<(), OpError> {
        if !self.held.get(i).copied().unwrap_or(false) || self.copied(i) {
            return Ok(());
        }
        let n = w.bytes().len();
        let mut buf = match &self.held_pool {
            Some(pool) => pool.try_alloc(n).ok_or_else(|| {
                OpError::new(format!(
                    "tensor `{}`: the {} pool ({} bytes) has no room to hold its {n} bytes in memory",
                    self.tensors[i].name,
                    pool.name(),
                    pool.budget()
                ))
            })?,
            None => HostBuffer::zeroed(n),
        };
        buf.as_bytes_mut().copy_from_slice(w.bytes());
        self.copies[i] = Some(Tensor::from_buffer(w.dtype, w.shape.clone(), buf));
        Ok(())
    }

    /// Also adds the bytes read to `counter` (shared by every loader of a program).
    pub fn count_into(&mut self, counter: Arc<std::sync::atomic::AtomicU64>) {
        self.counter = Some(counter);
    }

    fn done(&self) -> bool {
        self.next.i >= self.tensors.len()
    }

    /// Whether the next tensor's read has started (its buffer is taken).
    fn in_flight(&self) -> bool {
        self.stream.as_ref().is_some_and(|s| !s.flights.is_empty())
    }

    /// Bytes the buffer for tensor `i` takes (whole blocks around it for direct reads).
    fn buffer_len(&self, t: &TensorSource) -> usize {
        match self.mode {
            IoMode::Pread => t.nbytes() as usize,
            IoMode::Uring { .. } => {
                let a = t.offset / BLOCK * BLOCK;
                let e = (t.offset + t.nbytes()).div_ceil(BLOCK) * BLOCK;
                (e - a) as usize
            }
        }
    }

    fn ctx(t: &TensorSource, what: impl std::fmt::Display) -> OpError {
        OpError::new(format!("{}: tensor `{}`: {what}", t.path.display(), t.name))
    }

    /// A buffer for tensor `i`: `Ok(None)` when the pool has no room now.
    fn alloc(&self, i: usize) -> Result<Option<HostBuffer>, OpError> {
        let t = &self.tensors[i];
        let len = self.buffer_len(t);
        Ok(match &self.pool {
            Some(pool) => match pool.try_alloc(len) {
                Some(b) => Some(b),
                None if len > pool.budget() => return Err(self.too_big(i, len, pool)),
                None => None,
            },
            None => Some(HostBuffer::zeroed(len)),
        })
    }

    /// Opens tensor `i`'s file (once) and checks that it still holds the tensor; returns the
    /// file descriptor and the byte range to read for it (whole blocks for direct reads).
    fn prepare(&mut self, i: usize) -> Result<(i32, u64, u64), OpError> {
        let t = &self.tensors[i];
        if !self.files.contains_key(&t.path) {
            let (file, direct) = match self.mode {
                IoMode::Pread => (File::open(&t.path).map_err(|e| Self::ctx(t, format!("cannot open: {e}")))?, false),
                IoMode::Uring { .. } => {
                    match std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(&t.path) {
                        Ok(f) => (f, true),
                        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                            tracing::warn!(
                                "{}: the filesystem refuses O_DIRECT; reading through the page cache",
                                t.path.display()
                            );
                            (File::open(&t.path).map_err(|e| Self::ctx(t, format!("cannot open: {e}")))?, false)
                        }
                        Err(e) => return Err(Self::ctx(t, format!("cannot open: {e}"))),
                    }
                }
            };
            let len = file.metadata().map_err(|e| Self::ctx(t, format!("cannot stat: {e}")))?.len();
            self.files.insert(t.path.clone(), OpenFile { file, len, direct });
        }
        let f = &self.files[&t.path];
        let n = t.nbytes();
        // The file must still be as long as the header said (a file changed under the reader).
        let now = f.file.metadata().map_err(|e| Self::ctx(t, format!("cannot stat: {e}")))?.len();
        if now != f.len || t.offset + n > now {
            return Err(Self::ctx(
                t,
                format!(
                    "needs bytes {}..{} but the file has {now} bytes (truncated or changed since it was opened?)",
                    t.offset,
                    t.offset + n
                ),
            ));
        }
        let (start, want) = match (self.mode, f.direct) {
            (IoMode::Uring { .. }, true) => (t.offset / BLOCK * BLOCK, self.buffer_len(t) as u64),
            _ => (t.offset, n),
        };
        Ok((f.file.as_raw_fd(), start, want))
    }

    /// Checks a finished read of tensor `i` (`got` bytes from file offset `start`) and makes
    /// the tensor.
    fn finish(&mut self, i: usize, buf: HostBuffer, start: u64, got: u64) -> Result<Tensor, OpError> {
        let t = &self.tensors[i];
        let n = t.nbytes();
        // Test hooks: `WEIR_INJECT_READ_ERROR=TENSOR` and `WEIR_INJECT_SHORT_READ=TENSOR` make the
        // read of that tensor fail or come back short, as a failing disk would.
        if std::env::var("WEIR_INJECT_READ_ERROR").is_ok_and(|v| v == t.name) {
            return Err(Self::ctx(
                t,
                "read failed: Input/output error (os error 5) [injected by WEIR_INJECT_READ_ERROR]",
            ));
        }
        let got = if std::env::var("WEIR_INJECT_SHORT_READ").is_ok_and(|v| v == t.name) { got / 2 } else { got };
        // A direct read may stop at the end of the file, past the tensor; it must cover it.
        let needed = t.offset + n - start;
        if got < needed {
            return Err(Self::ctx(
                t,
                format!("short read: got {got} of {needed} bytes at offset {start} (file changed?)"),
            ));
        }
        self.count(got);
        let t = &self.tensors[i];
        let off = (t.offset - start) as usize;
        let mut w = match Tensor::from_buffer_at(t.dtype, t.shape.clone(), buf, off) {
            Ok(w) => w,
            // Misaligned for its element type inside the block: copy into a fresh buffer.
            Err(buf) => {
                let mut fresh = HostBuffer::zeroed(n as usize);
                fresh.as_bytes_mut().copy_from_slice(&buf.as_bytes()[off..off + n as usize]);
                Tensor::from_buffer(t.dtype, t.shape.clone(), fresh)
            }
        };
        if self.bf16_as_f16 && t.dtype == DType::BF16 && t.shape.len() == 2 && !self.streamed[i] {
            match weir_kernels::convert::bf16_to_f16_in_place(w.u16_mut()) {
                Ok(()) => w.dtype = DType::F16,
                Err(at) => tracing::warn!(
                    "--bf16-as-f16: tensor `{}` kept as bf16: its element {at} ({}) is past f16's range (±65504)",
                    t.name,
                    half::bf16::from_bits(w.u16()[at])
                ),
            }
        }
        Ok(w)
    }

    /// Holds resident bf16 matrices as f16 ([`weir_kernels::convert`]): rewritten in place
    /// once read; a matrix with a value past f16's range stays bf16, said in the log. Streamed
    /// tensors, read again every pass, stay as stored.
    pub fn hold_bf16_as_f16(&mut self, on: bool) {
        self.bf16_as_f16 = on;
    }

    /// Reads tensor `i` with `pread`: `Ok(None)` when the pool has no room yet.
    fn read_pread(&mut self, i: usize) -> Result<Option<Tensor>, OpError> {
        if self.copied(i) {
            return self.held_copy(i);
        }
        let Some(mut buf) = self.alloc(i)? else { return Ok(None) };
        let (_, start, want) = self.prepare(i)?;
        let t = &self.tensors[i];
        self.files[&t.path]
            .file
            .read_exact_at(&mut buf.as_bytes_mut()[..want as usize], start)
            .map_err(|e| Self::ctx(t, format!("read failed: {e}")))?;
        self.finish(i, buf, start, want).map(Some)
    }

    /// Queues the tensor at `ahead` for reading if the pool has room for it: `false` if not,
    /// or if none is left. A tensor that cannot be read is queued with its error, reported
    /// when it is next to send.
    fn start_ahead(&mut self) -> Result<bool, OpError> {
        let i = self.ahead.i;
        let queued = self.stream.as_ref().map_or(0, |s| s.flights.len());
        if i >= self.tensors.len() || queued >= MAX_AHEAD {
            return Ok(false);
        }
        // A held tensor read before: from its copy, in its turn.
        if self.copied(i) {
            let Some(t) = self.held_copy(i)? else { return Ok(false) };
            let stream = self.stream.as_mut().expect("stream made before reading");
            stream.flights.push_back(Flight::held(i, t));
            self.ahead.step(&self.streamed);
            return Ok(true);
        }
        let (buf, mut failed) = match self.alloc(i) {
            Ok(Some(b)) => (Some(b), None),
            Ok(None) => return Ok(false),
            Err(e) => (None, Some(e)),
        };
        let (mut fd, mut start, mut want) = (-1, 0, 0);
        if failed.is_none() {
            match self.prepare(i) {
                Ok(p) => (fd, start, want) = p,
                Err(e) => failed = Some(e),
            }
        }
        let stream = self.stream.as_mut().expect("stream made before reading");
        stream.flights.push_back(Flight::new(i, buf, fd, start, want, failed));
        self.ahead.step(&self.streamed);
        Ok(true)
    }

    /// Reads with io_uring until the next tensor is complete, keeping reads of the following
    /// tensors in flight meanwhile if `ahead`: `Ok(None)` when the pool has no room to start it
    /// yet.
    fn read_uring(&mut self, depth: usize, chunk: usize, ahead: bool) -> Result<Option<Tensor>, OpError> {
        self.open_stream(self.next.i, depth, chunk)?;
        loop {
            // Keep the queue full: chunks of the tensors started, then the next tensors as the
            // pool makes room for them.
            loop {
                let t = &self.tensors[self.next.i];
                let room = self.stream.as_mut().expect("made above").push().map_err(|e| Self::ctx(t, e))?;
                let alone = !ahead && self.in_flight();
                if !room || alone || !self.start_ahead()? {
                    break;
                }
            }
            let stream = self.stream.as_mut().expect("made above");
            let Some(head) = stream.flights.front() else { return Ok(None) };
            if head.complete() {
                break;
            }
            let t = &self.tensors[head.tensor];
            stream.reap(true).map_err(|e| Self::ctx(t, e))?;
        }
        let head = self.stream.as_mut().expect("made above").pop();
        debug_assert_eq!(head.tensor, self.next.i);
        self.land(head).map(Some)
    }

    /// The tensor of a complete flight, or the error its read met.
    fn land(&mut self, head: Flight) -> Result<Tensor, OpError> {
        if let Some(t) = head.ready {
            return Ok(t);
        }
        if let Some(e) = head.failed {
            return Err(e);
        }
        if let Some(e) = head.error {
            return Err(Self::ctx(&self.tensors[head.tensor], e));
        }
        let got = head.got.min(head.eof_at.unwrap_or(u64::MAX));
        let buf = head.buf.expect("a complete flight without an error has its buffer");
        self.finish(head.tensor, buf, head.start, got)
    }

    /// Counts `got` bytes read from storage (here and in the engine's total).
    fn count(&mut self, got: u64) {
        self.bytes_read += got;
        if let Some(c) = &self.counter {
            c.fetch_add(got, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// The io_uring reads' ring, made on first use (`i`: the tensor that needs it, for the
    /// error).
    fn open_stream(&mut self, i: usize, depth: usize, chunk: usize) -> Result<(), OpError> {
        if self.stream.is_none() {
            let t = &self.tensors[i];
            self.stream =
                Some(Stream::new(depth, chunk).map_err(|e| Self::ctx(t, format!("io_uring unavailable: {e}")))?);
        }
        Ok(())
    }

    /// Starts reading tensor `i` (io_uring only), behind the reads already started, for a
    /// reader that serves requests: false when the pool has no room for it.
    pub(crate) fn begin(&mut self, i: usize) -> Result<bool, OpError> {
        let IoMode::Uring { depth, chunk, .. } = self.mode else {
            return Err(Self::ctx(&self.tensors[i], "reads are started only with io_uring"));
        };
        self.open_stream(i, depth, chunk)?;
        let Some(buf) = self.alloc(i)? else { return Ok(false) };
        let (fd, start, want) = self.prepare(i)?;
        let stream = self.stream.as_mut().expect("made above");
        stream.flights.push_back(Flight::new(i, Some(buf), fd, start, want, None));
        let t = &self.tensors[i];
        stream.push().map_err(|e| Self::ctx(t, e))?;
        Ok(true)
    }

    /// Moves the started reads on: asks for more chunks and takes the completions, first
    /// waiting for one if any is in flight.
    pub(crate) fn advance(&mut self) -> Result<(), OpError> {
        let Some(stream) = self.stream.as_mut() else { return Ok(()) };
        let Some(first) = stream.flights.front() else { return Ok(()) };
        let t = &self.tensors[first.tensor];
        stream.push().map_err(|e| Self::ctx(t, e))?;
        stream.reap(true).map_err(|e| Self::ctx(t, e))?;
        stream.push().map_err(|e| Self::ctx(t, e))?;
        Ok(())
    }

    /// Whether the oldest started read is complete.
    pub(crate) fn first_done(&self) -> bool {
        self.stream.as_ref().and_then(|s| s.flights.front()).is_some_and(Flight::complete)
    }

    /// The oldest started read's tensor, once [`Loader::first_done`].
    pub(crate) fn take_first(&mut self) -> Result<Tensor, OpError> {
        let head = self.stream.as_mut().expect("a read was started").pop();
        self.land(head)
    }

    /// Gives up every started read: asks for nothing more, waits for the chunks in flight and
    /// frees the buffers. Returns the bytes they had read (counted as read).
    pub(crate) fn abandon(&mut self) -> Result<u64, OpError> {
        let Some(stream) = self.stream.as_mut() else { return Ok(0) };
        for f in stream.flights.iter_mut() {
            f.submitted = f.want;
            f.retry.clear();
        }
        while !stream.chunks.is_empty() {
            stream.reap(true).map_err(|e| OpError::new(format!("abandoning reads: {e}")))?;
        }
        let got: u64 = stream.flights.iter().map(|f| f.got).sum();
        while !stream.flights.is_empty() {
            stream.pop();
        }
        self.count(got);
        Ok(got)
    }

    /// Bytes the buffer for tensor `i` takes in the pool.
    pub(crate) fn held(&self, i: usize) -> usize {
        self.buffer_len(&self.tensors[i])
    }
}

impl Operator<Packet> for Loader {
    fn kind(&self) -> &str {
        "load"
    }
    fn span_kind(&self) -> SpanKind {
        SpanKind::Load
    }
    fn next_outputs(&self) -> Option<std::ops::Range<usize>> {
        (!self.done()).then_some(self.next.i..self.next.i + 1)
    }
    fn ready(&mut self, cx: &ReadyCx) -> bool {
        if self.done() || self.in_flight() {
            return true;
        }
        let Some(pool) = &self.pool else { return true };
        let need = self.buffer_len(&self.tensors[self.next.i]);
        if pool.has_room(need) {
            return true;
        }
        pool.notify_on_release(cx.lane);
        pool.has_room(need)
    }
    fn fire(&mut self, _ins: &mut Inputs<Packet>, out: &mut Emit<Packet>, _cx: &FireCx) -> Result<Step, OpError> {
        if self.done() {
            return Ok(Step::Finished);
        }
        let i = self.next.i;
        let w = match self.mode {
            IoMode::Pread => self.read_pread(i)?,
            IoMode::Uring { depth, chunk, ahead } => self.read_uring(depth, chunk, ahead)?,
        };
        // No room in the pool: another allocation won the race since `ready`; try again when woken.
        let Some(w) = w else { return Ok(Step::Continue) };
        self.keep(i, &w)?;
        out.send(i, Packet::Weight { name: Arc::from(self.tensors[i].name.as_str()), w });
        self.next.step(&self.streamed);
        if self.stream.as_ref().is_none_or(|s| s.flights.is_empty()) {
            self.ahead = self.next;
        }
        Ok(if self.done() { Step::Finished } else { Step::Continue })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::fire;

    fn file_with(name: &str, values: &[f32]) -> (PathBuf, PathBuf) {
        let dir = std::env::temp_dir().join(format!("weir-loader-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("w.bin");
        let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        std::fs::write(&path, &data).unwrap();
        (dir, path)
    }

    fn src(name: &str, path: &std::path::Path, offset: u64, n: usize) -> TensorSource {
        TensorSource { name: name.into(), path: path.to_path_buf(), offset, dtype: DType::F32, shape: vec![n] }
    }

    #[test]
    fn reads_tensors_in_order_and_names_a_truncated_file() {
        for mode in [IoMode::Pread, IoMode::Uring { depth: 4, chunk: 4096, ahead: true }] {
            let (dir, path) = file_with(&format!("{mode:?}").replace(['{', '}', ' ', ':', ','], ""), &[1.0, 2.0, 3.0]);
            let ts = vec![src("a", &path, 0, 1), src("b", &path, 4, 2), src("c", &path, 8, 2)];
            let mut l = Loader::new(ts, vec![false; 3], mode, None);
            let o = fire(&mut l, vec![], 3).unwrap();
            assert_eq!(o[0].as_ref().unwrap().weight("a").unwrap().1.f32(), &[1.0], "{mode:?}");
            let o = fire(&mut l, vec![], 3).unwrap();
            assert_eq!(o[1].as_ref().unwrap().weight("b").unwrap().1.f32(), &[2.0, 3.0], "{mode:?}");
            let e = fire(&mut l, vec![], 3).unwrap_err();
            assert!(e.0.contains("tensor `c`") && e.0.contains("truncated"), "{mode:?}: {e}");
            std::fs::remove_dir_all(&dir).unwrap();
        }
    }

    #[test]
    fn resident_bf16_matrices_are_held_as_f16_when_every_value_has_one() {
        // Three bf16 tensors: a [2, 3] matrix, the same numbers with one past f16's range, and a
        // [6] vector; a streamed copy of the first.
        let vals = [1.0f32, -0.5, 3.0e-6, 65280.0, 0.0, 0.0078125];
        let bf: Vec<u16> = vals.iter().map(|v| half::bf16::from_f32(*v).to_bits()).collect();
        let mut big = bf.clone();
        big[4] = half::bf16::from_f32(1.0e5).to_bits();
        let bytes: Vec<u8> = [&bf[..], &big[..], &bf[..]].concat().iter().flat_map(|b| b.to_le_bytes()).collect();
        let dir = std::env::temp_dir().join(format!("weir-loader-{}-f16", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("w.bin");
        std::fs::write(&path, &bytes).unwrap();
        let t = |name: &str, offset: u64, shape: Vec<usize>| TensorSource {
            name: name.into(),
            path: path.clone(),
            offset,
            dtype: DType::BF16,
            shape,
        };
        let ts = vec![t("m", 0, vec![2, 3]), t("big", 12, vec![2, 3]), t("v", 24, vec![6]), t("s", 0, vec![2, 3])];
        let pool = Pool::new("w", 1 << 20);
        for on in [true, false] {
            let mut l = Loader::new(ts.clone(), vec![false, false, false, true], IoMode::Pread, Some(pool.clone()));
            l.hold_bf16_as_f16(on);
            let mut got = Vec::new();
            for port in 0..4 {
                let o = fire(&mut l, vec![], 4).unwrap();
                got.push(o[port].as_ref().unwrap().weight(&ts[port].name).unwrap().1.clone());
            }
            let want = if on { DType::F16 } else { DType::BF16 };
            assert_eq!(got[0].dtype, want, "on={on}");
            for (g, b) in got[0].to_f32_vec().iter().zip(&bf) {
                // Exact, but for 3e-6 (below f16's normal range): the nearest subnormal.
                let w = half::bf16::from_bits(*b).to_f32();
                let tol = if w.abs() < 2f32.powi(-14) { 2f32.powi(-25) } else { 0.0 };
                assert!((g - w).abs() <= tol, "on={on}: {w} held as {g}");
            }
            // A value with no f16, a vector and a streamed tensor stay as stored.
            assert_eq!((got[1].dtype, got[1].u16()), (DType::BF16, &big[..]));
            assert_eq!((got[2].dtype, got[3].dtype), (DType::BF16, DType::BF16));
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn streamed_tensors_come_round_again_after_the_residents_and_return_their_bytes() {
        let values: Vec<f32> = (0..5000).map(|i| i as f32).collect();
        let (dir, path) = file_with("stream", &values);
        // a: resident; b, c: streamed; direct reads of unaligned tensors in 1-block chunks.
        let ts = vec![src("a", &path, 0, 10), src("b", &path, 40, 1500), src("c", &path, 6040, 2000)];
        let pool = Pool::new("test", 64 << 10);
        let mut l = Loader::new(
            ts,
            vec![false, true, true],
            IoMode::Uring { depth: 3, chunk: 4096, ahead: true },
            Some(pool.clone()),
        );
        let mut order = Vec::new();
        for _ in 0..7 {
            let o = fire(&mut l, vec![], 3).unwrap();
            let (port, p) = o.iter().enumerate().find_map(|(i, p)| p.as_ref().map(|p| (i, p))).unwrap();
            let (name, w) = p.weight("w").unwrap();
            let first = w.f32()[0] as usize;
            assert_eq!(first, [0, 10, 1510][port], "tensor {name} starts at the right element");
            assert_eq!(w.f32().len(), [10, 1500, 2000][port]);
            order.push(port);
        }
        assert_eq!(order, vec![0, 1, 2, 1, 2, 1, 2]);
        assert!(l.bytes_read >= (40 + 6000 + 3 * 8000) as u64);
        // Only the reads already started for the next tensors hold buffers; dropping the
        // loader waits for them and returns every byte.
        let queued: usize = l.stream.as_ref().unwrap().flights.iter().map(|f| f.buf.as_ref().unwrap().len()).sum();
        assert!(queued > 0 && pool.in_use() == queued, "{pool:?}");
        drop(l);
        assert_eq!(pool.in_use(), 0, "{pool:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn held_tensors_are_read_from_storage_once_then_sent_from_memory_taking_the_windows_room() {
        let values: Vec<f32> = (0..5000).map(|i| i as f32).collect();
        let (dir, path) = file_with("held", &values);
        // b is held, c streamed from storage every pass; both unaligned, so direct reads take
        // whole blocks around them and the copy must land where a read would.
        let ts = vec![src("b", &path, 40, 1500), src("c", &path, 6040, 2000)];
        for mode in [IoMode::Pread, IoMode::Uring { depth: 3, chunk: 4096, ahead: true }] {
            let pool = Pool::new("window", 64 << 10);
            let held_pool = Pool::new("held", 6000);
            let mut l = Loader::new(ts.clone(), vec![true, true], mode, Some(pool.clone()));
            l.hold(vec![true, false], Some(held_pool.clone()));
            let mut read_after = Vec::new();
            let mut sent_from = Vec::new();
            for pass in 0..12 {
                let o = fire(&mut l, vec![], 2).unwrap();
                let (port, p) = o.iter().enumerate().find_map(|(i, p)| p.as_ref().map(|p| (i, p))).unwrap();
                let (_, w) = p.weight("w").unwrap();
                let want: Vec<f32> = values[[10, 1510][port]..][..[1500, 2000][port]].to_vec();
                assert_eq!(w.f32(), &want[..], "{mode:?}: tensor {port}, as stored");
                read_after.push(l.bytes_read);
                if port == 0 && pass >= 6 {
                    // From b's fourth send on, b from its copy as it is (the held pool's
                    // buffer), not copied into the window; the window's room it would take is
                    // taken while it lives. (The window holds six tensors: reading ahead may
                    // start b's second and third sends from storage before its first read has
                    // landed and been kept; the fourth starts only once the first is sent.)
                    sent_from.push(w.buffer().0 as usize);
                    assert!(pool.in_use() >= 6000, "{mode:?}: the window holds b's room");
                }
            }
            assert!(sent_from.len() == 3 && sent_from.iter().all(|p| *p == sent_from[0]), "{mode:?}: {sent_from:?}");
            // b came from storage on its first send (and, reading ahead, maybe on its second and
            // third), c on every pass: from b's fourth send on, the bytes read grow only when c
            // is sent.
            assert_eq!(held_pool.in_use(), 6000, "b's copy is kept, from its pool");
            if mode == IoMode::Pread {
                assert_eq!(read_after[2], read_after[1], "b's second pass read nothing: {read_after:?}");
            }
            for pass in [6, 8, 10] {
                assert_eq!(
                    read_after[pass],
                    read_after[pass - 1],
                    "{mode:?}: b's send {pass} read nothing: {read_after:?}"
                );
                assert!(read_after[pass + 1] > read_after[pass], "{mode:?}: c is read every pass: {read_after:?}");
            }
            drop(l);
            assert_eq!((pool.in_use(), held_pool.in_use()), (0, 0));
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn reads_run_ahead_across_tensors_only_as_far_as_the_pool_has_room() {
        let values: Vec<f32> = (0..16384).map(|i| i as f32).collect();
        let (dir, path) = file_with("ahead", &values);
        // Eight streamed tensors of one 4 KiB block each; chunk reads of one block, 4 in flight.
        let ts: Vec<_> = (0..8).map(|k| src(&format!("t{k}"), &path, k * 8192, 1024)).collect();
        for budget in [64 << 10, 3 << 12, 2 << 12, 1 << 12] {
            // The tensor just sent holds one block; the rest of the pool is for reading ahead.
            let most_ahead = budget / 4096 - 1;
            let pool = Pool::new("test", budget);
            let mut l = Loader::new(
                ts.clone(),
                vec![true; 8],
                IoMode::Uring { depth: 4, chunk: 4096, ahead: true },
                Some(pool.clone()),
            );
            let mut held = Vec::new();
            for round in 0..16 {
                let o = fire(&mut l, vec![], 8).unwrap();
                let k = round % 8;
                let w = o[k].as_ref().unwrap().weight("w").unwrap().1.clone();
                assert_eq!(w.f32()[0] as usize, k * 2048, "budget {budget}: round {round}");
                let ahead = l.stream.as_ref().unwrap().flights.len();
                // The next tensors' reads have started, as far as the pool has room.
                assert!(ahead <= most_ahead && pool.in_use() <= budget, "budget {budget}: {ahead} ahead");
                assert!(ahead >= most_ahead.min(4), "budget {budget}: only {ahead} ahead");
                held.push(w);
                held.truncate(0);
            }
        }
        // A loader taking turns with compute (on a compute lane) leaves nothing in flight.
        let pool = Pool::new("test", 64 << 10);
        let mode = IoMode::Uring { depth: 4, chunk: 4096, ahead: false };
        let mut l = Loader::new(ts.clone(), vec![true; 8], mode, Some(pool.clone()));
        for round in 0..16 {
            let o = fire(&mut l, vec![], 8).unwrap();
            let w = o[round % 8].as_ref().unwrap().weight("w").unwrap().1.clone();
            assert_eq!(w.f32()[0] as usize, (round % 8) * 2048);
            assert!(!l.in_flight() && pool.in_use() == 4096, "round {round}: {pool:?}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_pool_too_small_for_a_tensor_is_an_error_naming_it() {
        let values: Vec<f32> = (0..2000).map(|i| i as f32).collect();
        let (dir, path) = file_with("small", &values);
        let pool = Pool::new("host", 1000);
        let mut l = Loader::new(vec![src("big", &path, 0, 2000)], vec![true], IoMode::Pread, Some(pool));
        let e = fire(&mut l, vec![], 1).unwrap_err();
        assert!(e.0.contains("tensor `big` needs 8000 bytes") && e.0.contains("budget is 1000"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
