//! Lanes: where actors run.
//!
//! A CPU lane is a thread pinned to the first core of its core set, plus a worker pool with one
//! thread pinned to each further core; an operator on the lane splits its kernel over all of
//! them through [`weir_kernels::Parallel`], without spawning a thread per call. An I/O lane is
//! one thread (optionally pinned) for loaders reading with `pread`; an NVMe lane the same, for
//! loaders and expert stores reading with io_uring. A GPU-stream lane is a thread driving one
//! CUDA stream of a device ([`crate::gpu`]); building a program that uses one where the device
//! is missing fails with [`Error::DeviceUnavailable`], saying why (no CUDA driver, no such
//! device).

use crate::error::Error;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{JoinHandle, Thread};
use weir_kernels::Parallel;

/// Index of a lane in a program.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct LaneId(pub usize);

/// What a lane is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LaneKind {
    /// Compute on a set of CPU cores (logical CPU ids); the first runs the actors.
    Cpu { cores: Vec<usize> },
    /// A thread for loading (reading weights with `pread`), pinned if `core` is set.
    Io { core: Option<usize> },
    /// An NVMe reader: a thread with an io_uring ring, `depth` reads of `chunk` bytes in flight.
    Nvme { core: Option<usize>, depth: usize, chunk: usize },
    /// A GPU stream.
    GpuStream { device: usize, stream: usize },
}

impl LaneKind {
    /// Whether it is a GPU stream.
    pub fn is_gpu(&self) -> bool {
        matches!(self, LaneKind::GpuStream { .. })
    }
}

/// A lane as the builder receives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaneSpec {
    pub name: String,
    pub kind: LaneKind,
}

impl LaneSpec {
    /// A CPU lane on these cores.
    pub fn cpu(name: &str, cores: Vec<usize>) -> LaneSpec {
        LaneSpec { name: name.to_string(), kind: LaneKind::Cpu { cores } }
    }
    /// An I/O lane.
    pub fn io(name: &str, core: Option<usize>) -> LaneSpec {
        LaneSpec { name: name.to_string(), kind: LaneKind::Io { core } }
    }
    /// A short description (`cpu[0,1]`, `io`, `gpu0:s1`).
    pub fn describe(&self) -> String {
        match &self.kind {
            LaneKind::Cpu { cores } => format!("cpu{cores:?}"),
            LaneKind::Io { core: Some(c) } => format!("io[{c}]"),
            LaneKind::Io { core: None } => "io".to_string(),
            LaneKind::Nvme { core, depth, chunk } => {
                format!("nvme{}:{depth}x{}KiB", core.map_or(String::new(), |c| format!("[{c}]")), chunk / 1024)
            }
            LaneKind::GpuStream { device, stream } => format!("gpu{device}:s{stream}"),
        }
    }
}

/// The CPUs this process may run on.
pub fn allowed_cpus() -> Vec<usize> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: a zeroed cpu_set_t is valid; sched_getaffinity fills it.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set) == 0 {
                return (0..libc::CPU_SETSIZE as usize).filter(|c| libc::CPU_ISSET(*c, &set)).collect();
            }
        }
    }
    (0..std::thread::available_parallelism().map_or(1, |n| n.get())).collect()
}

/// Pins the calling thread to one CPU. Failure is reported, not fatal: an unpinned lane is
/// slower, not wrong.
pub(crate) fn pin_current(core: usize) -> Result<(), String> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: a zeroed cpu_set_t is valid; CPU_SET writes inside it for core < CPU_SETSIZE.
        unsafe {
            if core >= libc::CPU_SETSIZE as usize {
                return Err(format!("core {core} is beyond CPU_SETSIZE"));
            }
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(core, &mut set);
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                return Err(std::io::Error::last_os_error().to_string());
            }
        }
        Ok(())
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = core;
        Ok(())
    }
}

/// Checks a lane's spec against this machine.
pub(crate) fn validate(spec: &LaneSpec, allowed: &[usize]) -> Result<(), Error> {
    let lane_err = |reason: String| Error::Lane { lane: spec.name.clone(), reason };
    match &spec.kind {
        LaneKind::Cpu { cores } => {
            if cores.is_empty() {
                return Err(lane_err("a CPU lane needs at least one core".into()));
            }
            for c in cores {
                if !allowed.contains(c) {
                    return Err(lane_err(format!(
                        "core {c} is not available to this process (available: {allowed:?})"
                    )));
                }
            }
            let mut sorted = cores.clone();
            sorted.sort_unstable();
            sorted.dedup();
            if sorted.len() != cores.len() {
                return Err(lane_err(format!("core set {cores:?} names a core twice")));
            }
            Ok(())
        }
        LaneKind::Io { core: Some(c) } | LaneKind::Nvme { core: Some(c), .. } if !allowed.contains(c) => {
            Err(lane_err(format!("core {c} is not available to this process (available: {allowed:?})")))
        }
        LaneKind::Io { .. } | LaneKind::Nvme { .. } => Ok(()),
        // The device must exist (its stream and kernels are made when the program is built).
        LaneKind::GpuStream { device, .. } => match crate::gpu::open(*device) {
            Err(e) => Err(Error::DeviceUnavailable { device: format!("gpu{device}"), reason: e.to_string() }),
            Ok(_) => Ok(()),
        },
    }
}

// Job state packed in one word so that claiming a task and checking that the job is still the
// current one are a single compare-and-swap: epoch (24 bits) | tasks (20) | next index (20).
const IDX_BITS: u64 = 20;
const IDX_MASK: u64 = (1 << IDX_BITS) - 1;
const MAX_TASKS: usize = IDX_MASK as usize;

struct PoolShared {
    state: AtomicU64,
    job: AtomicUsize, // *const &(dyn Fn(usize) + Sync), valid while its epoch is current
    done: AtomicUsize,
    quit: AtomicBool,
    panic: Mutex<Option<String>>,
}

/// A fork–join pool over the extra cores of a CPU lane; the lane's own thread works too.
/// Public so that tools outside a program (the bandwidth probe of `weir bench`) split work the
/// same way lanes do.
pub struct WorkerPool {
    shared: Arc<PoolShared>,
    threads: Vec<Thread>,
    handles: Vec<JoinHandle<()>>,
}

/// How long an idle worker spins before it sleeps (a kernel call follows another within
/// microseconds during a forward pass).
const SPIN_ROUNDS: u32 = 20_000;

impl WorkerPool {
    /// A pool with one worker pinned to each of `cores`; the caller of `run` is one more.
    pub fn new(lane: &str, cores: &[usize]) -> Result<WorkerPool, Error> {
        let shared = Arc::new(PoolShared {
            state: AtomicU64::new(0),
            job: AtomicUsize::new(0),
            done: AtomicUsize::new(0),
            quit: AtomicBool::new(false),
            panic: Mutex::new(None),
        });
        let mut handles = Vec::new();
        let mut threads = Vec::new();
        for (i, &core) in cores.iter().enumerate() {
            let sh = shared.clone();
            let h = std::thread::Builder::new()
                .name(format!("{lane}.w{}", i + 1))
                .spawn(move || {
                    if let Err(e) = pin_current(core) {
                        tracing::warn!("could not pin worker to core {core}: {e}");
                    }
                    weir_kernels::isa::flush_subnormals();
                    worker_loop(&sh)
                })
                .map_err(|e| Error::Spawn { lane: lane.to_string(), reason: e.to_string() })?;
            threads.push(h.thread().clone());
            handles.push(h);
        }
        Ok(WorkerPool { shared, threads, handles })
    }
}

fn claim(shared: &PoolShared) -> Option<usize> {
    let mut s = shared.state.load(Ordering::Acquire);
    loop {
        let tasks = ((s >> IDX_BITS) & IDX_MASK) as usize;
        let next = (s & IDX_MASK) as usize;
        if next >= tasks {
            return None;
        }
        match shared.state.compare_exchange_weak(s, s + 1, Ordering::AcqRel, Ordering::Acquire) {
            Ok(_) => return Some(next),
            Err(now) => s = now,
        }
    }
}

fn run_claimed(shared: &PoolShared, i: usize) {
    // SAFETY: a successful claim of index i < tasks in the current epoch means the job is not
    // complete (task i is not done), so the caller of `run` is still inside it and the closure
    // behind `job` is alive.
    let f: &&(dyn Fn(usize) + Sync) =
        unsafe { &*(shared.job.load(Ordering::Acquire) as *const &(dyn Fn(usize) + Sync)) };
    if let Err(p) = catch_unwind(AssertUnwindSafe(|| f(i))) {
        *shared.panic.lock().unwrap_or_else(|e| e.into_inner()) = Some(crate::error::panic_message(p.as_ref()));
    }
    shared.done.fetch_add(1, Ordering::AcqRel);
}

fn worker_loop(shared: &PoolShared) {
    let mut idle = 0u32;
    while !shared.quit.load(Ordering::Acquire) {
        if let Some(i) = claim(shared) {
            run_claimed(shared, i);
            idle = 0;
            continue;
        }
        idle += 1;
        if idle < SPIN_ROUNDS {
            std::hint::spin_loop();
        } else {
            std::thread::park_timeout(std::time::Duration::from_millis(50));
        }
    }
}

impl Parallel for WorkerPool {
    fn threads(&self) -> usize {
        self.threads.len() + 1
    }

    fn run(&self, tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        if tasks == 0 {
            return;
        }
        if self.threads.is_empty() || tasks == 1 || tasks > MAX_TASKS {
            for i in 0..tasks {
                f(i);
            }
            return;
        }
        let sh = &*self.shared;
        sh.done.store(0, Ordering::Release);
        sh.job.store(&f as *const &(dyn Fn(usize) + Sync) as usize, Ordering::Release);
        let epoch = (sh.state.load(Ordering::Acquire) >> (2 * IDX_BITS)) + 1;
        sh.state.store((epoch << (2 * IDX_BITS)) | ((tasks as u64) << IDX_BITS), Ordering::Release);
        for t in &self.threads {
            t.unpark();
        }
        while let Some(i) = claim(sh) {
            run_claimed(sh, i);
        }
        let mut spins = 0u32;
        while sh.done.load(Ordering::Acquire) < tasks {
            spins += 1;
            if spins < 1_000_000 {
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
        let p = sh.panic.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(msg) = p {
            std::panic::resume_unwind(Box::new(msg));
        }
    }
}

impl Drop for WorkerPool {
    fn drop(&mut self) {
        self.shared.quit.store(true, Ordering::Release);
        for t in &self.threads {
            t.unpark();
        }
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU32;

    #[test]
    fn pool_runs_every_task_once_across_many_jobs() {
        let pool = WorkerPool::new("t", &[0, 0]).unwrap();
        assert_eq!(pool.threads(), 3);
        for tasks in [1usize, 2, 3, 7, 64, 1000] {
            let hits: Vec<AtomicU32> = (0..tasks).map(|_| AtomicU32::new(0)).collect();
            pool.run(tasks, &|i| {
                hits[i].fetch_add(1, Ordering::Relaxed);
            });
            assert!(hits.iter().all(|h| h.load(Ordering::Relaxed) == 1), "tasks={tasks}");
        }
    }

    #[test]
    fn a_panicking_task_reaches_the_caller_and_the_pool_survives() {
        let pool = WorkerPool::new("t", &[0]).unwrap();
        let r = catch_unwind(AssertUnwindSafe(|| pool.run(8, &|i| assert!(i != 5, "task five"))));
        assert!(r.is_err());
        let n = AtomicU32::new(0);
        pool.run(4, &|_| {
            n.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(n.load(Ordering::Relaxed), 4);
    }

    #[test]
    fn lanes_on_missing_cores_and_gpus_are_refused() {
        let allowed = allowed_cpus();
        let bad = LaneSpec::cpu("c", vec![100_000]);
        assert!(matches!(validate(&bad, &allowed), Err(Error::Lane { .. })));
        let gpu = LaneSpec { name: "g".into(), kind: LaneKind::GpuStream { device: 0, stream: 0 } };
        match validate(&gpu, &allowed) {
            Err(Error::DeviceUnavailable { device, reason }) => {
                assert_eq!(device, "gpu0");
                assert!(!crate::gpu::driver_present() || crate::gpu::device_count().unwrap_or(0) == 0, "{reason}");
                assert!(reason.contains("no CUDA"), "{reason}");
            }
            Ok(()) => assert!(crate::gpu::device_count().unwrap_or(0) > 0, "a GPU lane accepted without a GPU"),
            other => panic!("{other:?}"),
        }
        // A device past the last one is named as such wherever a driver is.
        let far = LaneSpec { name: "g".into(), kind: LaneKind::GpuStream { device: 4096, stream: 0 } };
        let Err(Error::DeviceUnavailable { reason, .. }) = validate(&far, &allowed) else { panic!("refused") };
        assert!(reason.contains("no CUDA driver") || reason.contains("no CUDA device 4096"), "{reason}");
        assert!(validate(&LaneSpec::cpu("c", vec![allowed[0]]), &allowed).is_ok());
    }
}
