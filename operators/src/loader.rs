//! Loader: reads weight tensors from their files and sends each, as stored, to the operators
//! that use it. A source: it fires once per tensor.
//!
//! *Resident* tensors are read once and kept by their consumers (sticky edges). *Streamed*
//! tensors are read again for every pass, in the order the plan lists them (layer order), each
//! into a buffer from the loader's pool; the consumer drops it after one firing, which returns
//! the bytes. The loader is ready only when the pool has room for the next tensor, so the pool's
//! budget bounds how far reading runs ahead of compute: prefetch is backpressure.
//!
//! Two ways to read: `pread` into an aligned buffer (I/O lanes), or io_uring with `O_DIRECT`,
//! several chunk reads in flight (NVMe lanes), falling back to buffered reads, said once in the
//! log, where the filesystem refuses `O_DIRECT`. Every read is checked against the tensor's
//! place in the file; a short read or a changed file is an error naming the tensor and file.

use crate::Packet;
use io_uring::{opcode, types, IoUring};
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::sync::Arc;
use weir_runtime::{DType, Emit, FireCx, HostBuffer, Inputs, OpError, Operator, Pool, ReadyCx, SpanKind, Step, Tensor};

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
    Uring { depth: usize, chunk: usize },
}

/// Direct I/O works in whole blocks.
const BLOCK: u64 = 4096;

struct OpenFile {
    file: File,
    len: u64,
    direct: bool,
}

/// See the module doc.
pub struct Loader {
    tensors: Vec<TensorSource>,
    streamed: Vec<bool>,
    mode: IoMode,
    pool: Option<Pool>,
    /// Index of the next tensor to send; residents first, then streamed ones round and round.
    next: usize,
    residents_done: bool,
    files: HashMap<PathBuf, OpenFile>,
    ring: Option<IoUring>,
    /// Bytes read from storage so far.
    pub bytes_read: u64,
    counter: Option<Arc<std::sync::atomic::AtomicU64>>,
}

impl Loader {
    /// A loader sending `tensors[i]` on output port `i`; `streamed[i]` says whether tensor `i`
    /// is read for every pass. Streamed tensors need a pool.
    pub fn new(tensors: Vec<TensorSource>, streamed: Vec<bool>, mode: IoMode, pool: Option<Pool>) -> Loader {
        assert_eq!(tensors.len(), streamed.len());
        let mut l = Loader {
            tensors,
            streamed,
            mode,
            pool,
            next: 0,
            residents_done: false,
            files: HashMap::new(),
            ring: None,
            bytes_read: 0,
            counter: None,
        };
        l.skip_to_due();
        l
    }

    /// Also adds the bytes read to `counter` (shared by every loader of a program).
    pub fn count_into(&mut self, counter: Arc<std::sync::atomic::AtomicU64>) {
        self.counter = Some(counter);
    }

    /// Moves `next` to the next tensor due: the next resident during the first round, then the
    /// next streamed tensor, cyclically.
    fn skip_to_due(&mut self) {
        let n = self.tensors.len();
        if !self.residents_done {
            while self.next < n && self.streamed[self.next] {
                self.next += 1;
            }
            if self.next < n {
                return;
            }
            self.residents_done = true;
            self.next = 0;
        }
        if !self.streamed.iter().any(|s| *s) {
            self.next = n;
            return;
        }
        while !self.streamed[self.next % n] {
            self.next += 1;
        }
        self.next %= n;
    }

    fn done(&self) -> bool {
        self.next >= self.tensors.len()
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

    fn open(&mut self, t: &TensorSource) -> Result<(), OpError> {
        if self.files.contains_key(&t.path) {
            return Ok(());
        }
        let ctx = |what: String| OpError::new(format!("{}: tensor `{}`: {what}", t.path.display(), t.name));
        let (file, direct) = match self.mode {
            IoMode::Pread => (File::open(&t.path).map_err(|e| ctx(format!("cannot open: {e}")))?, false),
            IoMode::Uring { .. } => {
                match std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(&t.path) {
                    Ok(f) => (f, true),
                    Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                        tracing::warn!(
                            "{}: the filesystem refuses O_DIRECT; reading through the page cache",
                            t.path.display()
                        );
                        (File::open(&t.path).map_err(|e| ctx(format!("cannot open: {e}")))?, false)
                    }
                    Err(e) => return Err(ctx(format!("cannot open: {e}"))),
                }
            }
        };
        let len = file.metadata().map_err(|e| ctx(format!("cannot stat: {e}")))?.len();
        self.files.insert(t.path.clone(), OpenFile { file, len, direct });
        Ok(())
    }

    fn read(&mut self, t: &TensorSource, mut buf: HostBuffer) -> Result<Tensor, OpError> {
        let ctx = |what: String| OpError::new(format!("{}: tensor `{}`: {what}", t.path.display(), t.name));
        self.open(t)?;
        let f = &self.files[&t.path];
        let n = t.nbytes();
        // The file must still be as long as the header said (a file changed under the reader).
        let now = f.file.metadata().map_err(|e| ctx(format!("cannot stat: {e}")))?.len();
        if now != f.len || t.offset + n > now {
            return Err(ctx(format!(
                "needs bytes {}..{} but the file has {now} bytes (truncated or changed since it was opened?)",
                t.offset,
                t.offset + n
            )));
        }
        let (start, want) = match (self.mode, f.direct) {
            (IoMode::Uring { .. }, true) => (t.offset / BLOCK * BLOCK, buf.len() as u64),
            _ => (t.offset, n),
        };
        let got = match self.mode {
            IoMode::Pread => {
                f.file
                    .read_exact_at(&mut buf.as_bytes_mut()[..n as usize], t.offset)
                    .map_err(|e| ctx(format!("read failed: {e}")))?;
                n
            }
            IoMode::Uring { depth, chunk } => {
                if self.ring.is_none() {
                    self.ring = Some(
                        IoUring::new(depth.max(1) as u32 * 2).map_err(|e| ctx(format!("io_uring unavailable: {e}")))?,
                    );
                }
                let fd = f.file.as_raw_fd();
                let ring = self.ring.as_mut().expect("ring created above");
                uring_read(ring, fd, buf.as_mut_ptr(), start, want, depth.max(1), chunk.max(BLOCK as usize))
                    .map_err(&ctx)?
            }
        };
        // Test hooks: `WEIR_INJECT_READ_ERROR=TENSOR` and `WEIR_INJECT_SHORT_READ=TENSOR` make the
        // read of that tensor fail or come back short, as a failing disk would.
        if std::env::var("WEIR_INJECT_READ_ERROR").is_ok_and(|v| v == t.name) {
            return Err(
                ctx("read failed: Input/output error (os error 5) [injected by WEIR_INJECT_READ_ERROR]".into()),
            );
        }
        let got = if std::env::var("WEIR_INJECT_SHORT_READ").is_ok_and(|v| v == t.name) { got / 2 } else { got };
        // A direct read may stop at the end of the file, past the tensor; it must cover it.
        let needed = t.offset + n - start;
        if got < needed {
            return Err(ctx(format!("short read: got {got} of {needed} bytes at offset {start} (file changed?)")));
        }
        self.bytes_read += got;
        if let Some(c) = &self.counter {
            c.fetch_add(got, std::sync::atomic::Ordering::Relaxed);
        }
        let off = (t.offset - start) as usize;
        match Tensor::from_buffer_at(t.dtype, t.shape.clone(), buf, off) {
            Ok(t) => Ok(t),
            // Misaligned for its element type inside the block: copy into a fresh buffer.
            Err(buf) => {
                let mut fresh = HostBuffer::zeroed(n as usize);
                fresh.as_bytes_mut().copy_from_slice(&buf.as_bytes()[off..off + n as usize]);
                Ok(Tensor::from_buffer(t.dtype, t.shape.clone(), fresh))
            }
        }
    }
}

/// Reads `len` bytes at `offset` into `dst` with up to `depth` reads of `chunk` bytes in flight.
/// Returns the bytes read (less than `len` only at the end of the file).
fn uring_read(
    ring: &mut IoUring,
    fd: i32,
    dst: *mut u8,
    offset: u64,
    len: u64,
    depth: usize,
    chunk: usize,
) -> Result<u64, String> {
    let mut next = 0u64; // next byte to submit
    let mut in_flight = 0usize;
    let mut done = 0u64;
    let mut eof_at: Option<u64> = None;
    // Pending (start, len) of each submitted read, by user_data.
    let mut pending: HashMap<u64, (u64, u64)> = HashMap::new();
    let mut retry: Vec<(u64, u64)> = Vec::new();
    let mut id = 0u64;
    loop {
        while in_flight < depth && (next < len || !retry.is_empty()) && eof_at.is_none() {
            let (s, l) = match retry.pop() {
                Some(r) => r,
                None => {
                    let l = (len - next).min(chunk as u64);
                    let r = (next, l);
                    next += l;
                    r
                }
            };
            // SAFETY: dst + s .. dst + s + l lies inside the caller's buffer of `len` bytes,
            // which outlives this function; each range is submitted to one read at a time.
            let e = opcode::Read::new(types::Fd(fd), unsafe { dst.add(s as usize) }, l as u32)
                .offset(offset + s)
                .build()
                .user_data(id);
            // SAFETY: the entry points at memory that stays valid until its completion is reaped below.
            unsafe { ring.submission().push(&e).map_err(|_| "io_uring submission queue full".to_string())? };
            pending.insert(id, (s, l));
            id += 1;
            in_flight += 1;
        }
        if in_flight == 0 {
            return Ok(done.min(eof_at.unwrap_or(len)));
        }
        ring.submit_and_wait(1).map_err(|e| format!("io_uring submit: {e}"))?;
        let completions: Vec<(u64, i32)> = ring.completion().map(|c| (c.user_data(), c.result())).collect();
        for (ud, res) in completions {
            in_flight -= 1;
            let Some((s, l)) = pending.remove(&ud) else { continue };
            if res < 0 {
                return Err(format!("read failed: {}", std::io::Error::from_raw_os_error(-res)));
            }
            let got = res as u64;
            done += got;
            if got == 0 {
                eof_at = Some(eof_at.map_or(s, |e| e.min(s)));
            } else if got < l {
                // A short read: ask again for the rest (the end of the file answers 0 next time).
                retry.push((s + got, l - got));
            }
        }
    }
}

impl Operator<Packet> for Loader {
    fn kind(&self) -> &str {
        "load"
    }
    fn span_kind(&self) -> SpanKind {
        SpanKind::Load
    }
    fn next_output(&self) -> Option<usize> {
        (!self.done()).then_some(self.next)
    }
    fn ready(&mut self, cx: &ReadyCx) -> bool {
        if self.done() {
            return true;
        }
        let Some(pool) = &self.pool else { return true };
        let need = self.buffer_len(&self.tensors[self.next]);
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
        let i = self.next;
        let t = self.tensors[i].clone();
        let len = self.buffer_len(&t);
        let buf = match &self.pool {
            Some(pool) => match pool.try_alloc(len) {
                Some(b) => b,
                None if len > pool.budget() => {
                    return Err(OpError::new(format!(
                        "tensor `{}` needs {len} bytes but the {} pool's budget is {} bytes",
                        t.name,
                        pool.name(),
                        pool.budget()
                    )))
                }
                // Another allocation won the race since `ready`: try again when woken.
                None => return Ok(Step::Continue),
            },
            None => HostBuffer::zeroed(len),
        };
        let w = self.read(&t, buf)?;
        out.send(i, Packet::Weight { name: Arc::from(t.name.as_str()), w });
        self.next += 1;
        self.skip_to_due();
        Ok(if self.done() { Step::Finished } else { Step::Continue })
    }
}

/// Reads up to `max_bytes` of `path` from its start with io_uring and `O_DIRECT` (`depth` reads
/// of `chunk` bytes in flight), as a streaming loader does, and returns (bytes, seconds): the
/// storage's read bandwidth, not flattered by the page cache. Falls back to buffered reads
/// where the filesystem refuses `O_DIRECT` (the third value says whether it was direct).
pub fn measure_read(
    path: &std::path::Path,
    max_bytes: u64,
    depth: usize,
    chunk: usize,
) -> Result<(u64, f64, bool), String> {
    let (file, direct) = match std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(path) {
        Ok(f) => (f, true),
        Err(_) => (File::open(path).map_err(|e| format!("{}: {e}", path.display()))?, false),
    };
    let len = file.metadata().map_err(|e| format!("{}: {e}", path.display()))?.len().min(max_bytes) / BLOCK * BLOCK;
    let mut ring = IoUring::new(depth as u32 * 2).map_err(|e| format!("io_uring unavailable: {e}"))?;
    let mut buf = HostBuffer::zeroed(chunk * depth);
    let t0 = std::time::Instant::now();
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min((chunk * depth) as u64);
        let got = uring_read(&mut ring, file.as_raw_fd(), buf.as_mut_ptr(), done, n, depth, chunk)?;
        if got == 0 {
            break;
        }
        done += got;
    }
    Ok((done, t0.elapsed().as_secs_f64(), direct))
}

/// Drops a file's pages from the page cache (`posix_fadvise(DONTNEED)`), for measurements
/// where direct I/O is refused.
pub fn evict_page_cache(path: &std::path::Path) -> Result<(), String> {
    let f = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    // SAFETY: a plain advisory call on a file descriptor we own.
    let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if r != 0 {
        return Err(format!("{}: posix_fadvise: {}", path.display(), std::io::Error::from_raw_os_error(r)));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::fire;
    use weir_runtime::Tier;

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
        for mode in [IoMode::Pread, IoMode::Uring { depth: 4, chunk: 4096 }] {
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
    fn streamed_tensors_come_round_again_after_the_residents_and_return_their_bytes() {
        let values: Vec<f32> = (0..5000).map(|i| i as f32).collect();
        let (dir, path) = file_with("stream", &values);
        // a: resident; b, c: streamed; direct reads of unaligned tensors in 1-block chunks.
        let ts = vec![src("a", &path, 0, 10), src("b", &path, 40, 1500), src("c", &path, 6040, 2000)];
        let pool = Pool::new("test", Tier::Host, 64 << 10);
        let mut l =
            Loader::new(ts, vec![false, true, true], IoMode::Uring { depth: 3, chunk: 4096 }, Some(pool.clone()));
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
        // Every streamed buffer was dropped after its firing: only the resident one is held.
        assert!(pool.in_use() <= 8192, "{pool:?}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_pool_too_small_for_a_tensor_is_an_error_naming_it() {
        let values: Vec<f32> = (0..2000).map(|i| i as f32).collect();
        let (dir, path) = file_with("small", &values);
        let pool = Pool::new("host", Tier::Host, 1000);
        let mut l = Loader::new(vec![src("big", &path, 0, 2000)], vec![true], IoMode::Pread, Some(pool));
        let e = fire(&mut l, vec![], 1).unwrap_err();
        assert!(e.0.contains("tensor `big` needs 8000 bytes") && e.0.contains("budget is 1000"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
