//! Loader: reads weight tensors from their files and sends each, as stored, to the operators
//! that use it. A source: it fires once per tensor and retires when all are sent.
//!
//! Reads go straight from the file into a fresh aligned buffer (`pread`), one tensor at a
//! time; the file is never copied into memory whole. A later lane kind reads through io_uring
//! with the same operator contract.

use crate::Packet;
use std::collections::HashMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use weir_runtime::{DType, Emit, FireCx, HostBuffer, Inputs, OpError, Operator, SpanKind, Step, Tensor};

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

/// See the module doc.
pub struct Loader {
    tensors: Vec<TensorSource>,
    next: usize,
    files: HashMap<PathBuf, (File, u64)>,
}

impl Loader {
    /// A loader that will send `tensors` on output ports `0..tensors.len()`, in order.
    pub fn new(tensors: Vec<TensorSource>) -> Loader {
        Loader { tensors, next: 0, files: HashMap::new() }
    }

    fn read(&mut self, t: &TensorSource) -> Result<Tensor, OpError> {
        let ctx = |what: String| OpError::new(format!("{}: tensor `{}`: {what}", t.path.display(), t.name));
        if !self.files.contains_key(&t.path) {
            let f = File::open(&t.path).map_err(|e| ctx(format!("cannot open: {e}")))?;
            let len = f.metadata().map_err(|e| ctx(format!("cannot stat: {e}")))?.len();
            self.files.insert(t.path.clone(), (f, len));
        }
        let (f, file_len) = &self.files[&t.path];
        let n = t.nbytes();
        if t.offset + n > *file_len {
            return Err(ctx(format!(
                "needs bytes {}..{} but the file has {file_len} bytes (truncated?)",
                t.offset,
                t.offset + n
            )));
        }
        let mut buf = HostBuffer::zeroed(n as usize);
        f.read_exact_at(buf.as_bytes_mut(), t.offset).map_err(|e| ctx(format!("read failed: {e}")))?;
        Ok(Tensor::from_buffer(t.dtype, t.shape.clone(), buf))
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
        Some(self.next.min(self.tensors.len().saturating_sub(1)))
    }
    fn fire(&mut self, _ins: &mut Inputs<Packet>, out: &mut Emit<Packet>, _cx: &FireCx) -> Result<Step, OpError> {
        if self.next >= self.tensors.len() {
            return Ok(Step::Finished);
        }
        let t = self.tensors[self.next].clone();
        let w = self.read(&t)?;
        out.send(self.next, Packet::Weight { name: Arc::from(t.name.as_str()), w });
        self.next += 1;
        Ok(if self.next == self.tensors.len() { Step::Finished } else { Step::Continue })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::fire;

    #[test]
    fn reads_tensors_in_order_and_names_a_truncated_file() {
        let dir = std::env::temp_dir().join(format!("weir-loader-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("w.bin");
        let data: Vec<u8> = [1.0f32, 2.0, 3.0].iter().flat_map(|v| v.to_le_bytes()).collect();
        std::fs::write(&path, &data).unwrap();
        let a = TensorSource { name: "a".into(), path: path.clone(), offset: 0, dtype: DType::F32, shape: vec![1] };
        let b = TensorSource { name: "b".into(), path: path.clone(), offset: 4, dtype: DType::F32, shape: vec![2] };
        let c = TensorSource { name: "c".into(), path: path.clone(), offset: 8, dtype: DType::F32, shape: vec![2] };
        let mut l = Loader::new(vec![a, b, c]);
        let o = fire(&mut l, vec![], 3).unwrap();
        assert_eq!(o[0].as_ref().unwrap().weight("a").unwrap().1.f32(), &[1.0]);
        let o = fire(&mut l, vec![], 3).unwrap();
        assert_eq!(o[1].as_ref().unwrap().weight("b").unwrap().1.f32(), &[2.0, 3.0]);
        let e = fire(&mut l, vec![], 3).unwrap_err();
        assert!(e.0.contains("tensor `c`") && e.0.contains("truncated"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
