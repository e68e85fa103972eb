//! How a kernel splits its work over the cores of a lane.
//!
//! Kernels never spawn threads: the runtime owns threads (a CPU lane's worker pool) and hands
//! kernels a `&dyn Parallel`. A kernel cuts its work into `tasks` independent pieces and asks
//! `run` to call `f(i)` once for every `i < tasks`, on whichever worker is free.

/// A fork–join executor for one kernel call.
pub trait Parallel: Sync {
    /// The number of workers that run tasks at the same time (at least 1).
    fn threads(&self) -> usize;
    /// Calls `f(i)` exactly once for every `i` in `0..tasks` and returns when all have returned.
    fn run(&self, tasks: usize, f: &(dyn Fn(usize) + Sync));
}

/// Runs every task on the calling thread.
#[derive(Debug, Clone, Copy, Default)]
pub struct Serial;

impl Parallel for Serial {
    fn threads(&self) -> usize {
        1
    }
    fn run(&self, tasks: usize, f: &(dyn Fn(usize) + Sync)) {
        for i in 0..tasks {
            f(i);
        }
    }
}

/// Splits `0..n` into `parts` contiguous ranges whose lengths are multiples of `align`
/// (except the last) and differ by at most `align`. Returns the range of part `i`.
pub fn split_range(n: usize, parts: usize, align: usize, i: usize) -> std::ops::Range<usize> {
    let align = align.max(1);
    let units = n.div_ceil(align);
    let parts = parts.max(1);
    let base = units / parts;
    let extra = units % parts;
    let start_u = i * base + i.min(extra);
    let len_u = base + usize::from(i < extra);
    let start = (start_u * align).min(n);
    let end = ((start_u + len_u) * align).min(n);
    start..end
}

/// A raw pointer that may be shared between the tasks of one kernel call, each of which writes
/// a disjoint part of the buffer behind it.
#[derive(Clone, Copy)]
pub struct SharedMut<T>(pub *mut T);
// SAFETY: used only to hand disjoint sub-slices of one `&mut [T]` to the tasks of one
// `Parallel::run`, which returns before the borrow ends.
unsafe impl<T> Send for SharedMut<T> {}
unsafe impl<T> Sync for SharedMut<T> {}

impl<T> SharedMut<T> {
    /// # Safety
    /// `start..start+len` must lie inside the original slice, and no two live sub-slices may
    /// overlap.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn slice(&self, start: usize, len: usize) -> &mut [T] {
        std::slice::from_raw_parts_mut(self.0.add(start), len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_range_covers_everything_once() {
        for n in [0usize, 1, 7, 16, 100, 1023] {
            for parts in 1..6 {
                for align in [1usize, 4, 16] {
                    let mut next = 0;
                    for i in 0..parts {
                        let r = split_range(n, parts, align, i);
                        assert_eq!(r.start, next, "n={n} parts={parts} align={align}");
                        if r.end < n {
                            assert_eq!(r.end % align, 0);
                        }
                        next = r.end;
                    }
                    assert_eq!(next, n);
                }
            }
        }
    }
}
