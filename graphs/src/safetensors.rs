//! The weights of a model folder: `model.safetensors`, or shards listed in
//! `model.safetensors.index.json`. Only headers are read here; the data stays in the files
//! until a loader reads each tensor.

use crate::config::read_json;
use crate::error::{Error, Result};
use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};
use weir_operators::loader::TensorSource;
use weir_runtime::DType;

/// Every tensor of a model, by name.
#[derive(Debug, Clone, Default)]
pub struct WeightIndex {
    pub tensors: BTreeMap<String, TensorSource>,
}

impl WeightIndex {
    /// Reads the headers of a folder's safetensors file(s).
    pub fn from_dir(dir: &Path) -> Result<WeightIndex> {
        let index = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let mut out = WeightIndex::default();
        if index.exists() {
            let v = read_json(&index)?;
            let map = v.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| Error::Config {
                path: index.clone(),
                key: "weight_map".into(),
                problem: "missing or not an object".into(),
            })?;
            let mut files: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for (name, f) in map {
                let f = f.as_str().ok_or_else(|| Error::Config {
                    path: index.clone(),
                    key: format!("weight_map.{name}"),
                    problem: "expected a file name".into(),
                })?;
                if f.contains('/') || f.contains("..") {
                    return Err(Error::Config {
                        path: index.clone(),
                        key: format!("weight_map.{name}"),
                        problem: format!("`{f}` is not a file in the model folder"),
                    });
                }
                files.entry(f.to_string()).or_default().push(name.clone());
            }
            for (f, names) in files {
                let path = dir.join(&f);
                let header = read_header(&path)?;
                for n in names {
                    let t = header.get(&n).cloned().ok_or_else(|| Error::Safetensors {
                        path: path.clone(),
                        problem: format!("tensor `{n}` is listed in {} but not in this file", index.display()),
                    })?;
                    out.tensors.insert(n, t);
                }
            }
        } else if single.exists() {
            out.tensors = read_header(&single)?;
        } else {
            return Err(Error::Io {
                path: single,
                error: std::io::Error::new(
                    std::io::ErrorKind::NotFound,
                    "no model.safetensors or model.safetensors.index.json in the model folder",
                ),
            });
        }
        Ok(out)
    }

    /// Total bytes of all tensors.
    pub fn total_bytes(&self) -> u64 {
        self.tensors.values().map(|t| t.nbytes()).sum()
    }
}

fn parse_dtype(s: &str) -> Option<DType> {
    match s {
        "F32" => Some(DType::F32),
        "BF16" => Some(DType::BF16),
        "F16" => Some(DType::F16),
        _ => None,
    }
}

/// Reads and checks one file's header: every tensor lies inside the file, its byte length
/// matches its shape and dtype, and tensors do not overlap.
pub fn read_header(path: &Path) -> Result<BTreeMap<String, TensorSource>> {
    let bad = |problem: String| Error::Safetensors { path: path.to_path_buf(), problem };
    let io = |error| Error::Io { path: path.to_path_buf(), error };
    let mut f = std::fs::File::open(path).map_err(io)?;
    let file_len = f.metadata().map_err(io)?.len();
    let mut len8 = [0u8; 8];
    f.read_exact(&mut len8)
        .map_err(|_| bad(format!("file is {file_len} bytes, too short for a safetensors header")))?;
    let hlen = u64::from_le_bytes(len8);
    if hlen > 100 << 20 || 8 + hlen > file_len {
        return Err(bad(format!("header length {hlen} does not fit in the file ({file_len} bytes)")));
    }
    let mut hbuf = vec![0u8; hlen as usize];
    f.read_exact(&mut hbuf).map_err(io)?;
    let header: serde_json::Value =
        serde_json::from_slice(&hbuf).map_err(|e| bad(format!("header is not valid JSON: {e}")))?;
    let obj = header.as_object().ok_or_else(|| bad("header is not a JSON object".into()))?;
    let data_start = 8 + hlen;
    let mut out = BTreeMap::new();
    let mut spans = Vec::new();
    for (name, v) in obj {
        if name == "__metadata__" {
            continue;
        }
        let dtype_s =
            v.get("dtype").and_then(|d| d.as_str()).ok_or_else(|| bad(format!("tensor `{name}`: no dtype")))?;
        let dtype = parse_dtype(dtype_s)
            .ok_or_else(|| bad(format!("tensor `{name}`: dtype {dtype_s} is not supported (F32, BF16, F16)")))?;
        let shape: Vec<usize> = v
            .get("shape")
            .and_then(|s| s.as_array())
            .and_then(|a| a.iter().map(|x| x.as_u64().map(|n| n as usize)).collect::<Option<Vec<_>>>())
            .ok_or_else(|| bad(format!("tensor `{name}`: shape missing or not a list of integers")))?;
        let offs: Vec<u64> = v
            .get("data_offsets")
            .and_then(|s| s.as_array())
            .and_then(|a| a.iter().map(|x| x.as_u64()).collect::<Option<Vec<_>>>())
            .filter(|o| o.len() == 2)
            .ok_or_else(|| bad(format!("tensor `{name}`: data_offsets missing or malformed")))?;
        let (b, e) = (offs[0], offs[1]);
        let want = shape
            .iter()
            .try_fold(dtype.size() as u64, |acc, &d| acc.checked_mul(d as u64))
            .ok_or_else(|| bad(format!("tensor `{name}`: shape {shape:?} overflows")))?;
        if e < b || e - b != want {
            return Err(bad(format!(
                "tensor `{name}`: data_offsets [{b}, {e}] hold {} bytes, but shape {shape:?} of {dtype_s} needs {want}",
                e.saturating_sub(b)
            )));
        }
        if data_start + e > file_len {
            return Err(bad(format!(
                "tensor `{name}` needs bytes up to {} but the file has {file_len} bytes (truncated?)",
                data_start + e
            )));
        }
        spans.push((b, e, name.clone()));
        out.insert(
            name.clone(),
            TensorSource { name: name.clone(), path: PathBuf::from(path), offset: data_start + b, dtype, shape },
        );
    }
    spans.sort();
    for w in spans.windows(2) {
        if w[1].0 < w[0].1 {
            return Err(bad(format!("tensors `{}` and `{}` overlap", w[0].2, w[1].2)));
        }
    }
    Ok(out)
}

/// Writes a safetensors file: tensors in the order given, 8-byte aligned header.
/// Used by the model generator and by tests that need a model on disk.
pub fn write_file(
    path: &Path,
    tensors: &[(String, DType, Vec<usize>)],
    mut fill: impl FnMut(usize, &mut dyn std::io::Write) -> std::io::Result<()>,
) -> std::io::Result<()> {
    use std::io::Write;
    let mut header = serde_json::Map::new();
    let mut off = 0u64;
    for (name, dtype, shape) in tensors {
        let n = shape.iter().product::<usize>() as u64 * dtype.size() as u64;
        let ds = match dtype {
            DType::F32 => "F32",
            DType::BF16 => "BF16",
            DType::F16 => "F16",
            DType::U32 => "U32",
        };
        header.insert(name.clone(), serde_json::json!({"dtype": ds, "shape": shape, "data_offsets": [off, off + n]}));
        off += n;
    }
    let mut h = serde_json::to_vec(&serde_json::Value::Object(header))?;
    while h.len() % 8 != 0 {
        h.push(b' ');
    }
    let mut w = std::io::BufWriter::with_capacity(8 << 20, std::fs::File::create(path)?);
    w.write_all(&(h.len() as u64).to_le_bytes())?;
    w.write_all(&h)?;
    for i in 0..tensors.len() {
        fill(i, &mut w)?;
    }
    w.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("weir-st-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn round_trips_and_rejects_truncation_and_bad_offsets() {
        let d = tmp("rt");
        let p = d.join("model.safetensors");
        let ts = vec![("a".to_string(), DType::F32, vec![2, 3]), ("b".to_string(), DType::BF16, vec![5])];
        write_file(&p, &ts, |i, w| w.write_all(&vec![i as u8; if i == 0 { 24 } else { 10 }])).unwrap();
        let idx = WeightIndex::from_dir(&d).unwrap();
        assert_eq!(idx.tensors["a"].shape, vec![2, 3]);
        assert_eq!(idx.tensors["b"].dtype, DType::BF16);
        assert_eq!(idx.tensors["b"].offset, idx.tensors["a"].offset + 24);
        // Truncate the file: the header names the tensor that no longer fits.
        let len = std::fs::metadata(&p).unwrap().len();
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        f.set_len(len - 4).unwrap();
        let e = WeightIndex::from_dir(&d).unwrap_err().to_string();
        assert!(e.contains("tensor `b`") && e.contains("truncated"), "{e}");
        std::fs::write(&p, [1u8, 2, 3]).unwrap();
        assert!(WeightIndex::from_dir(&d).unwrap_err().to_string().contains("too short"));
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn sharded_folders_are_read_through_the_index() {
        let d = tmp("shard");
        write_file(&d.join("s1.safetensors"), &[("x".into(), DType::F32, vec![1])], |_, w| w.write_all(&[0; 4]))
            .unwrap();
        write_file(&d.join("s2.safetensors"), &[("y".into(), DType::F16, vec![2])], |_, w| w.write_all(&[0; 4]))
            .unwrap();
        std::fs::write(
            d.join("model.safetensors.index.json"),
            r#"{"metadata": {}, "weight_map": {"x": "s1.safetensors", "y": "s2.safetensors"}}"#,
        )
        .unwrap();
        let idx = WeightIndex::from_dir(&d).unwrap();
        assert_eq!(idx.tensors.len(), 2);
        assert!(idx.tensors["y"].path.ends_with("s2.safetensors"));
        std::fs::write(d.join("model.safetensors.index.json"), r#"{"weight_map": {"z": "s1.safetensors"}}"#).unwrap();
        assert!(WeightIndex::from_dir(&d).unwrap_err().to_string().contains("tensor `z`"));
        std::fs::remove_dir_all(&d).unwrap();
    }
}
