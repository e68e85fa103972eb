//! LM head: the output projection, computed only on the rows whose logits are needed (the
//! last token of each sequence, or all of a sequence's tokens when it asked for them).
//!
//! Ports: `x` `[tokens, hidden]` f32, `weight` `[vocab, hidden]`.
//! Output: `y` `[rows, vocab]` f32, rows as given by [`crate::Batch::logit_rows`].

use crate::spec::{int, OpEnv, OpSpec, ParamValue, Params, Port};
use crate::{check_act, weight_view, Batch, LogitsWanted, Packet};
use weir_runtime::{Emit, FireCx, Inputs, OpError, Operator, Step};

/// An LM head node: `lm_head hidden=… vocab=…`.
#[derive(Debug, Clone, PartialEq)]
pub struct Spec {
    pub hidden: usize,
    pub vocab: usize,
}

impl OpSpec for Spec {
    const KIND: &'static str = "lm_head";
    const GPU: bool = true;
    fn from_params(p: &mut Params) -> Spec {
        Spec { hidden: p.usize("hidden"), vocab: p.usize("vocab") }
    }
    fn params(&self) -> Vec<(&'static str, ParamValue)> {
        vec![("hidden", int(self.hidden)), ("vocab", int(self.vocab))]
    }
    fn inputs(&self) -> Vec<Port> {
        vec![Port::act("x", self.hidden), Port::weight("weight", vec![self.vocab, self.hidden])]
    }
    fn outputs(&self) -> Vec<Port> {
        vec![Port::act("y", self.vocab)]
    }
    /// The logits and the gathered rows: one row per token at most.
    fn activation_floats(&self, tokens: usize) -> usize {
        tokens * (self.hidden + self.vocab)
    }
    fn instantiate(&self, _: &OpEnv, _: Option<u32>) -> Box<dyn Operator<Packet>> {
        Box::new(LmHead { hidden: self.hidden, vocab: self.vocab })
    }
    fn instantiate_gpu(&self, _: &OpEnv, _: Option<u32>) -> Option<Box<dyn Operator<Packet>>> {
        Some(Box::new(GpuLmHead { hidden: self.hidden, vocab: self.vocab }))
    }
}

/// See the module doc.
pub struct LmHead {
    pub hidden: usize,
    pub vocab: usize,
}

impl Operator<Packet> for LmHead {
    fn kind(&self) -> &str {
        "lm_head"
    }
    fn fire(&mut self, ins: &mut Inputs<Packet>, out: &mut Emit<Packet>, cx: &FireCx) -> Result<Step, OpError> {
        let (name, w) = ins.get(1).weight("weight")?;
        let w = weight_view(name, w, &[self.vocab, self.hidden])?;
        let (batch, x) = ins.get(0).act("x")?;
        check_act("x", batch, x, self.hidden)?;
        let h = self.hidden;
        let rows: usize = batch.seqs.iter().map(Batch::logit_rows).sum();
        let mut sel = cx.zeros_f32(vec![rows, h])?; // [rows, hidden]
        let (mut row, mut at) = (0, 0);
        for s in &batch.seqs {
            let rows = match s.logits {
                LogitsWanted::All => row..row + s.len,
                LogitsWanted::Skip => row..row,
                _ => (row + s.len).saturating_sub(1).max(row)..row + s.len,
            };
            debug_assert_eq!(rows.len(), Batch::logit_rows(s));
            sel.f32_mut()[at * h..(at + rows.len()) * h].copy_from_slice(&x.f32()[rows.start * h..rows.end * h]);
            at += rows.len();
            row += s.len;
        }
        let mut y = cx.zeros_f32(vec![rows, self.vocab])?; // [rows, vocab]
        weir_kernels::matmul::matmul(sel.f32(), rows, w, self.vocab, None, y.f32_mut(), cx.par);
        out.send(0, Packet::Act { batch: batch.clone(), x: y });
        Ok(Step::Continue)
    }
}

/// [`LmHead`] on a GPU lane: the rows whose logits are needed gathered on the device, then
/// one GEMM.
pub struct GpuLmHead {
    pub hidden: usize,
    pub vocab: usize,
}

impl Operator<Packet> for GpuLmHead {
    fn kind(&self) -> &str {
        "lm_head"
    }
    fn fire(&mut self, ins: &mut Inputs<Packet>, out: &mut Emit<Packet>, cx: &FireCx) -> Result<Step, OpError> {
        let g = cx.gpu()?;
        let (w, e) = crate::gpu::weight("weight", ins.get(1), &[self.vocab, self.hidden])?;
        let (batch, x) = crate::gpu::act("x", ins.get(0), self.hidden)?;
        let row_bytes = self.hidden * 4;
        let rows: usize = batch.seqs.iter().map(Batch::logit_rows).sum();
        if rows == 0 {
            let y = g.alloc(weir_runtime::DType::F32, vec![0, self.vocab])?;
            out.send(0, Packet::DevAct { batch: batch.clone(), x: y.freeze() });
            return Ok(Step::Continue);
        }
        let mut sel = g.alloc(weir_runtime::DType::F32, vec![rows, self.hidden])?;
        {
            let (xb, mut sb) = (x.bytes(), sel.bytes_mut());
            let (mut row, mut at) = (0, 0);
            let stream = g.stream().clone();
            for s in &batch.seqs {
                let n = Batch::logit_rows(s);
                // The last `n` of the sequence's rows (all of them for `All`).
                let from = row + s.len - n;
                if n > 0 {
                    let src = xb.slice(from * row_bytes..(from + n) * row_bytes);
                    let mut dst = sb.slice_mut(at * row_bytes..(at + n) * row_bytes);
                    weir_kernels::cuda::call("gathering rows on the GPU", || stream.memcpy_dtod(&src, &mut dst))
                        .map_err(crate::gpu::err)?;
                }
                at += n;
                row += s.len;
            }
        }
        let y = crate::gpu::linear(g, &sel.f32(), rows, w, e, self.vocab, None)?;
        out.send(0, Packet::DevAct { batch: batch.clone(), x: y.freeze() });
        Ok(Step::Continue)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::*;

    #[test]
    fn projects_only_the_last_row_of_each_sequence() {
        let b = batch(&[(0, 2), (3, 1)]);
        let mut op = LmHead { hidden: 1, vocab: 2 };
        let out = fire(&mut op, vec![act(&b, 1, &[1., 2., 3.]), weight(vec![2, 1], &[1., -1.])], 1).unwrap();
        let y = out[0].as_ref().unwrap().act("y").unwrap().1;
        assert_eq!(y.shape, vec![2, 2]);
        assert_eq!(y.f32(), &[2., -2., 3., -3.]);
    }
}
