//! Embedding: token ids → rows of the embedding table.
//!
//! Ports: `ids` (`Tokens`, `[tokens]`), `weight` (`[vocab, hidden]`, any float dtype).
//! Output: `y` `[tokens, hidden]` f32.

use crate::spec::{int, Carries, OpEnv, OpSpec, ParamValue, Params, Port};
use crate::{weight_view, Packet};
use weir_runtime::{Emit, FireCx, Inputs, OpError, Operator, Step};

/// An embedding node: `embedding vocab=… hidden=…`.
#[derive(Debug, Clone, PartialEq)]
pub struct Spec {
    pub vocab: usize,
    pub hidden: usize,
}

impl OpSpec for Spec {
    const KIND: &'static str = "embedding";
    const GPU: bool = true;
    fn from_params(p: &mut Params) -> Spec {
        Spec { vocab: p.usize("vocab"), hidden: p.usize("hidden") }
    }
    fn params(&self) -> Vec<(&'static str, ParamValue)> {
        vec![("vocab", int(self.vocab)), ("hidden", int(self.hidden))]
    }
    fn inputs(&self) -> Vec<Port> {
        vec![Port::of("ids", Carries::Ids), Port::weight("weight", vec![self.vocab, self.hidden])]
    }
    fn outputs(&self) -> Vec<Port> {
        vec![Port::act("y", self.hidden)]
    }
    fn instantiate(&self, _: &OpEnv, _: Option<u32>) -> Box<dyn Operator<Packet>> {
        Box::new(Embedding { vocab: self.vocab, hidden: self.hidden })
    }
    fn instantiate_gpu(&self, _: &OpEnv, _: Option<u32>) -> Option<Box<dyn Operator<Packet>>> {
        Some(Box::new(GpuEmbedding { vocab: self.vocab, hidden: self.hidden }))
    }
}

/// See the module doc.
pub struct Embedding {
    pub vocab: usize,
    pub hidden: usize,
}

impl Operator<Packet> for Embedding {
    fn kind(&self) -> &str {
        "embedding"
    }
    fn fire(&mut self, ins: &mut Inputs<Packet>, out: &mut Emit<Packet>, cx: &FireCx) -> Result<Step, OpError> {
        let (name, w) = ins.get(1).weight("weight")?;
        let table = weight_view(name, w, &[self.vocab, self.hidden])?;
        let Packet::Tokens { batch, ids } = ins.get(0) else {
            return Err(OpError::new("port `ids` expected token ids"));
        };
        let mut y = cx.zeros_f32(vec![ids.len(), self.hidden])?; // [tokens, hidden]
        let yd = y.f32_mut();
        for (row, &id) in ids.iter().enumerate() {
            let id = id as usize;
            if id >= self.vocab {
                return Err(OpError::new(format!("token id {id} is outside the vocabulary (size {})", self.vocab)));
            }
            table.row_to_f32(id, self.hidden, &mut yd[row * self.hidden..(row + 1) * self.hidden]);
        }
        out.send(0, Packet::Act { batch: batch.clone(), x: y });
        Ok(Step::Continue)
    }
}

/// [`Embedding`] on a GPU lane: the ids come from the host (checked there), the table is in
/// GPU memory.
pub struct GpuEmbedding {
    pub vocab: usize,
    pub hidden: usize,
}

impl Operator<Packet> for GpuEmbedding {
    fn kind(&self) -> &str {
        "embedding"
    }
    fn fire(&mut self, ins: &mut Inputs<Packet>, out: &mut Emit<Packet>, cx: &FireCx) -> Result<Step, OpError> {
        let g = cx.gpu()?;
        let (table, e) = crate::gpu::weight("weight", ins.get(1), &[self.vocab, self.hidden])?;
        let Packet::Tokens { batch, ids } = ins.get(0) else {
            return Err(OpError::new("port `ids` expected token ids"));
        };
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= self.vocab) {
            return Err(OpError::new(format!("token id {id} is outside the vocabulary (size {})", self.vocab)));
        }
        let mut y = g.alloc(weir_runtime::DType::F32, vec![ids.len(), self.hidden])?;
        if ids.is_empty() {
            // A pass with no tokens (only releases): nothing to copy or launch.
            out.send(0, Packet::DevAct { batch: batch.clone(), x: y.freeze() });
            return Ok(Step::Continue);
        }
        let ids_dev = g.upload_values(&ids.iter().map(|&i| i as i32).collect::<Vec<i32>>())?;
        g.kernels
            .embed(&ids_dev.as_view(), &table.bytes(), e, self.hidden, &mut y.f32_mut())
            .map_err(crate::gpu::err)?;
        out.send(0, Packet::DevAct { batch: batch.clone(), x: y.freeze() });
        Ok(Step::Continue)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::*;
    use std::sync::Arc;

    #[test]
    fn picks_rows_and_rejects_ids_outside_the_vocabulary() {
        let b = batch(&[(0, 2)]);
        let mut op = Embedding { vocab: 3, hidden: 2 };
        let w = weight(vec![3, 2], &[0., 1., 2., 3., 4., 5.]);
        let ids = Packet::Tokens { batch: b.clone(), ids: Arc::new(vec![2, 0]) };
        let out = fire(&mut op, vec![ids, w.clone()], 1).unwrap();
        let (_, y) = out[0].as_ref().unwrap().act("y").unwrap();
        assert_eq!(y.f32(), &[4., 5., 0., 1.]);
        let bad = Packet::Tokens { batch: b, ids: Arc::new(vec![3, 0]) };
        let e = fire(&mut op, vec![bad, w], 1).unwrap_err();
        assert!(e.0.contains("token id 3"), "{e}");
    }
}
