//! The storage's read bandwidth, read the way a streaming loader reads (for `weir bench`).

use super::uring::{Flight, Stream, BLOCK};
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use weir_runtime::HostBuffer;

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
    let len = std::fs::metadata(path).map_err(|e| format!("{}: {e}", path.display()))?.len();
    measure_read_ranges(&[(path.to_path_buf(), 0, len.min(max_bytes))], depth, chunk)
}

/// Reads the byte ranges `(file, offset, len)` in order, as a streaming loader reads tensors:
/// io_uring, `O_DIRECT` (whole blocks around each range), `depth` reads of `chunk` bytes in
/// flight all the time. Returns (bytes, seconds, direct) — the time the storage takes to give
/// exactly these bytes, with nothing else running.
pub fn measure_read_ranges(
    ranges: &[(PathBuf, u64, u64)],
    depth: usize,
    chunk: usize,
) -> Result<(u64, f64, bool), String> {
    let mut files: HashMap<PathBuf, (File, bool)> = HashMap::new();
    for (path, _, _) in ranges {
        if files.contains_key(path) {
            continue;
        }
        let f = match std::fs::OpenOptions::new().read(true).custom_flags(libc::O_DIRECT).open(path) {
            Ok(f) => (f, true),
            Err(_) => (File::open(path).map_err(|e| format!("{}: {e}", path.display()))?, false),
        };
        files.insert(path.clone(), f);
    }
    let direct = files.values().all(|(_, d)| *d);
    // Chunks of the ranges, in order, read into a few recycled buffers.
    let mut pieces = ranges.iter().flat_map(|(path, off, len)| {
        let (a, e) = (off / BLOCK * BLOCK, (off + len).div_ceil(BLOCK) * BLOCK);
        let fd = files[path].0.as_raw_fd();
        (a..e).step_by(chunk.max(BLOCK as usize)).map(move |s| (fd, s, (e - s).min(chunk.max(BLOCK as usize) as u64)))
    });
    let mut stream = Stream::new(depth, chunk).map_err(|e| format!("io_uring unavailable: {e}"))?;
    // Buffers of at least 2 MiB sit on huge pages, as the loader's do (direct reads into them
    // pin one page, not hundreds).
    let len = (stream.chunk as usize).max(2 << 20);
    let mut spare: Vec<HostBuffer> = (0..2 * stream.depth).map(|_| HostBuffer::zeroed(len)).collect();
    let t0 = std::time::Instant::now();
    let mut done = 0u64;
    loop {
        while !spare.is_empty() {
            let Some((fd, start, want)) = pieces.next() else { break };
            stream.flights.push_back(Flight::new(0, spare.pop(), fd, start, want, None));
        }
        stream.push()?;
        let Some(head) = stream.flights.front() else { break };
        if head.complete() {
            let f = stream.pop();
            if let Some(e) = f.error {
                return Err(e);
            }
            done += f.got;
            spare.extend(f.buf);
        } else {
            stream.reap(true)?;
        }
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
