//! A `lane` statement's kind and attributes → a [`LaneSpec`].

use super::expand::{LaneDecl, Value};
use super::syntax::Span;
use weir_runtime::{LaneKind, LaneSpec};

/// The lane `l` declares, or `None` (its problems reported through `err`). `cpus`: the CPUs
/// this process may use.
pub(super) fn lane(l: &LaneDecl, cpus: &[usize], err: &mut dyn FnMut(Span, String)) -> Option<LaneSpec> {
    let known: &[&str] = match l.kind.0.as_str() {
        "cpu" => &["cores", "threads"],
        "io" => &["core"],
        "nvme" => &["core", "depth", "chunk"],
        "gpu" => &["device", "stream"],
        _ => &[],
    };
    for (k, _, sp) in &l.attrs {
        if k != "process" && !known.contains(&k.as_str()) && !known.is_empty() {
            err(*sp, format!("a `{}` lane has no attribute `{k}` (known: {}, process)", l.kind.0, known.join(", ")));
        }
    }
    let kind = match l.kind.0.as_str() {
        "cpu" => LaneKind::Cpu { cores: cpu_cores(l, cpus, err) },
        "io" => LaneKind::Io { core: reader_core(l, cpus, err) },
        "nvme" => {
            let core = reader_core(l, cpus, err);
            let (depth, chunk) = (positive(l, "depth", 8, err), positive(l, "chunk", 1 << 20, err));
            if chunk % 4096 != 0 {
                if let Some((_, sp)) = get(l, "chunk") {
                    let m = format!("`chunk` must be a multiple of 4096 (direct I/O works in blocks), found {chunk}");
                    err(sp, m);
                }
            }
            LaneKind::Nvme { core, depth, chunk }
        }
        "gpu" => LaneKind::GpuStream {
            device: get(l, "device").and_then(|(v, _)| int(&v)).unwrap_or(0),
            stream: get(l, "stream").and_then(|(v, _)| int(&v)).unwrap_or(0),
        },
        other => {
            err(l.kind.1, format!("unknown lane kind `{other}` (known: cpu, io, gpu, nvme)"));
            return None;
        }
    };
    Some(LaneSpec { name: l.name.clone(), kind })
}

fn get(l: &LaneDecl, k: &str) -> Option<(Value, Span)> {
    l.attrs.iter().find(|(key, _, _)| key == k).map(|(_, v, s)| (v.clone(), *s))
}

fn int(v: &Value) -> Option<usize> {
    if let Value::Int(i) = v {
        (*i >= 0).then_some(*i as usize)
    } else {
        None
    }
}

/// A cpu lane's cores: `cores=all|N|list|range` or `threads=N` (the first N CPUs), all by default.
fn cpu_cores(l: &LaneDecl, cpus: &[usize], err: &mut dyn FnMut(Span, String)) -> Vec<usize> {
    let cores: Option<Vec<usize>> = match (get(l, "cores"), get(l, "threads")) {
        (Some(_), Some((_, sp))) => {
            err(sp, "give `cores` or `threads`, not both".into());
            None
        }
        (Some((Value::Str(s), _)), None) if s == "all" => Some(cpus.to_vec()),
        (Some((Value::Int(c), _)), None) if c >= 0 => Some(vec![c as usize]),
        (Some((Value::List(v), sp)), None) => {
            let c: Option<Vec<usize>> = v.iter().map(int).collect();
            if c.is_none() {
                err(sp, "`cores` must list CPU numbers".into());
            }
            c
        }
        (Some((Value::Range(a, b), sp)), None) => {
            if a < 0 || b <= a {
                err(sp, format!("`cores` range {a}..{b} is empty"));
                None
            } else {
                Some((a as usize..b as usize).collect())
            }
        }
        (Some((v, sp)), None) => {
            err(sp, format!("`cores` must be all, a CPU number, a list or a range, found {v}"));
            None
        }
        (None, Some((Value::Int(n), sp))) => {
            if n < 1 || n as usize > cpus.len() {
                err(sp, format!("threads={n}, but this process may use {} CPUs", cpus.len()));
                None
            } else {
                Some(cpus[..n as usize].to_vec())
            }
        }
        (None, Some((v, sp))) => {
            err(sp, format!("`threads` must be a positive integer, found {v}"));
            None
        }
        (None, None) => Some(cpus.to_vec()),
    };
    let cores = cores.unwrap_or_default();
    if let Some((_, sp)) = get(l, "cores") {
        if let Some(c) = cores.iter().find(|c| !cpus.contains(c)) {
            err(sp, format!("core {c} is not available to this process (available: {cpus:?})"));
        }
    }
    cores
}

/// An io or nvme lane's `core=N` pinning, if given.
fn reader_core(l: &LaneDecl, cpus: &[usize], err: &mut dyn FnMut(Span, String)) -> Option<usize> {
    let (v, sp) = get(l, "core")?;
    match int(&v) {
        Some(c) if cpus.contains(&c) => Some(c),
        _ => {
            err(sp, format!("core {v} is not available to this process (available: {cpus:?})"));
            None
        }
    }
}

/// Attribute `k` as a positive integer, `default` when left out (or wrong: reported).
fn positive(l: &LaneDecl, k: &str, default: usize, err: &mut dyn FnMut(Span, String)) -> usize {
    match get(l, k) {
        None => default,
        Some((v, sp)) => match int(&v) {
            Some(n) if n > 0 => n,
            _ => {
                err(sp, format!("`{k}` must be a positive integer, found {v}"));
                default
            }
        },
    }
}
