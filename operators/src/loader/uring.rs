//! The loader's io_uring machinery: chunk reads of several tensors in flight at once, into
//! their buffers, short reads asked for again, errors kept for the tensor they belong to.

use io_uring::{opcode, types, IoUring};
use std::collections::HashMap;
use weir_runtime::{HostBuffer, OpError, Tensor};

/// Direct I/O works in whole blocks.
pub(crate) const BLOCK: u64 = 4096;

/// One tensor being read with io_uring: its buffer and how far its chunk reads have got.
pub(crate) struct Flight {
    pub(crate) tensor: usize,
    pub(crate) buf: Option<HostBuffer>,
    pub(crate) fd: i32,
    /// File offset of the buffer's first byte, and bytes to read into it.
    pub(crate) start: u64,
    pub(crate) want: u64,
    /// Next byte (from `start`) not yet asked for; bytes read; chunk reads in flight.
    pub(crate) submitted: u64,
    pub(crate) got: u64,
    pub(crate) in_flight: usize,
    pub(crate) eof_at: Option<u64>,
    pub(crate) retry: Vec<(u64, u64)>,
    /// A read failed (the I/O error), or the tensor could not be started at all (the whole
    /// error): reported when the tensor is next to send.
    pub(crate) error: Option<String>,
    pub(crate) failed: Option<OpError>,
    /// A held tensor sent from its copy: complete from the start, read from nothing.
    pub(crate) ready: Option<Tensor>,
}

impl Flight {
    /// Tensor `tensor`'s read of `want` bytes from file offset `start` into `buf`, not begun.
    pub(crate) fn new(
        tensor: usize,
        buf: Option<HostBuffer>,
        fd: i32,
        start: u64,
        want: u64,
        failed: Option<OpError>,
    ) -> Flight {
        let (submitted, got, in_flight, eof_at, retry, error) = (0, 0, 0, None, Vec::new(), None);
        Flight { tensor, buf, fd, start, want, submitted, got, in_flight, eof_at, retry, error, failed, ready: None }
    }
    /// Held tensor `tensor`, sent from its copy (`t`).
    pub(crate) fn held(tensor: usize, t: Tensor) -> Flight {
        let mut f = Flight::new(tensor, None, -1, 0, 0, None);
        f.ready = Some(t);
        f
    }
    pub(crate) fn has_work(&self) -> bool {
        self.error.is_none()
            && self.failed.is_none()
            && self.eof_at.is_none()
            && (self.submitted < self.want || !self.retry.is_empty())
    }
    pub(crate) fn complete(&self) -> bool {
        self.in_flight == 0 && !self.has_work()
    }
}

/// Keeps up to `depth` chunk reads in flight across tensor boundaries: the next tensors' reads
/// start while the earlier ones finish, so the disk's queue never drains between tensors.
pub(crate) struct Stream {
    pub(crate) ring: IoUring,
    pub(crate) depth: usize,
    pub(crate) chunk: u64,
    /// Tensors in reading order; the front one is sent next.
    pub(crate) flights: std::collections::VecDeque<Flight>,
    /// Sequence number of `flights[0]` (chunks name their flight by sequence number).
    pub(crate) front_seq: u64,
    /// The chunk reads in flight: user_data → (flight sequence number, offset in its buffer,
    /// length).
    pub(crate) chunks: HashMap<u64, (u64, u64, u64)>,
    pub(crate) next_ud: u64,
}

impl Stream {
    pub(crate) fn new(depth: usize, chunk: usize) -> std::io::Result<Stream> {
        let depth = depth.max(1);
        Ok(Stream {
            ring: IoUring::new((depth as u32 * 2).next_power_of_two())?,
            depth,
            chunk: (chunk as u64).max(BLOCK),
            flights: Default::default(),
            front_seq: 0,
            chunks: HashMap::new(),
            next_ud: 0,
        })
    }

    /// Asks for chunks of the queued tensors, in order, until `depth` are in flight. Returns
    /// whether there is room for another tensor (every queued one has all its reads asked for).
    pub(crate) fn push(&mut self) -> Result<bool, String> {
        let mut pushed = false;
        let mut k = 0;
        while self.chunks.len() < self.depth && k < self.flights.len() {
            let f = &mut self.flights[k];
            if !f.has_work() {
                k += 1;
                continue;
            }
            let (s, l) = match f.retry.pop() {
                Some(r) => r,
                None => {
                    let l = (f.want - f.submitted).min(self.chunk);
                    f.submitted += l;
                    (f.submitted - l, l)
                }
            };
            let buf = f.buf.as_mut().expect("a flight with work has a buffer");
            // SAFETY: buf[s .. s + l] lies inside the flight's buffer (`want` ≤ its length),
            // which stays in `flights` until every read into it has completed (see `reap` and
            // `Drop`); each range is asked for by one read at a time.
            let e = opcode::Read::new(types::Fd(f.fd), unsafe { buf.as_mut_ptr().add(s as usize) }, l as u32)
                .offset(f.start + s)
                .build()
                .user_data(self.next_ud);
            // SAFETY: as above, the memory stays valid until the completion is reaped.
            unsafe { self.ring.submission().push(&e).map_err(|_| "io_uring submission queue full".to_string())? };
            f.in_flight += 1;
            self.chunks.insert(self.next_ud, (self.front_seq + k as u64, s, l));
            self.next_ud += 1;
            pushed = true;
        }
        if pushed {
            self.ring.submit().map_err(|e| format!("io_uring submit: {e}"))?;
        }
        Ok(self.chunks.len() < self.depth && self.flights.iter().all(|f| !f.has_work()))
    }

    /// Takes the completions there are, first waiting for at least one if `wait`.
    pub(crate) fn reap(&mut self, wait: bool) -> Result<(), String> {
        if wait && !self.chunks.is_empty() {
            self.ring.submit_and_wait(1).map_err(|e| format!("io_uring submit: {e}"))?;
        }
        let done: Vec<(u64, i32)> = self.ring.completion().map(|c| (c.user_data(), c.result())).collect();
        for (ud, res) in done {
            let Some((seq, s, l)) = self.chunks.remove(&ud) else { continue };
            let f = &mut self.flights[(seq - self.front_seq) as usize];
            f.in_flight -= 1;
            if res < 0 {
                f.error.get_or_insert_with(|| format!("read failed: {}", std::io::Error::from_raw_os_error(-res)));
                continue;
            }
            let got = res as u64;
            f.got += got;
            if got == 0 {
                f.eof_at = Some(f.eof_at.map_or(s, |e| e.min(s)));
            } else if got < l {
                // A short read: ask again for the rest (the end of the file answers 0 next time).
                f.retry.push((s + got, l - got));
            }
        }
        Ok(())
    }

    pub(crate) fn pop(&mut self) -> Flight {
        self.front_seq += 1;
        self.flights.pop_front().expect("a flight to pop")
    }
}

impl Drop for Stream {
    /// The kernel may still be writing into queued buffers: wait for every read before they go.
    fn drop(&mut self) {
        while !self.chunks.is_empty() {
            if self.reap(true).is_err() {
                // The ring itself failed: leak the buffers rather than free memory the kernel
                // may still write into.
                for f in self.flights.drain(..) {
                    std::mem::forget(f.buf);
                }
                return;
            }
        }
    }
}
