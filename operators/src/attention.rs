//! Attention with a KV cache: causal grouped-query attention of the new tokens of every
//! sequence over that sequence's cache, which this operator owns.
//!
//! Ports: `q` `[tokens, heads*head_dim]`, `k`, `v` `[tokens, kv_heads*head_dim]` (q and k
//! already rotated). Output: `y` `[tokens, heads*head_dim]`.
//!
//! With `export=true` (a prefill worker's), a second output `kv` carries the keys and values
//! just stored for the sequences the pass exports (`Batch::export`), a layer's as soon as it
//! has run; and a pass's `Batch::imports` (a decode worker's) hand this operator the blocks a
//! prefill worker's rows were written into, as those sequences' caches (`kv_link`).
//!
//! State: one KV cache per sequence id (f32, bf16 or f16: the `kv` parameter; keys and values
//! are rounded to it as they are stored, all arithmetic is f32), created when a sequence arrives with `start == 0`,
//! grown by every pass, dropped when the batch lists the id in `release`. A cache is a list of
//! blocks of [`KV_BLOCK_TOKENS`] positions, each taken from the KV pool when the sequence
//! reaches it and returned to the pool (for the next sequence) when the sequence is released.
//! The pool's budget is the KV reserve the planner set aside; the scheduler admits a sequence
//! only while its whole length fits the reserve, so running out here means a broken promise
//! and is reported as a fault, naming the sequence.

use crate::kv_link::KvRows;
use crate::spec::{int, OpEnv, OpSpec, ParamValue, Params, Port};
use crate::{check_act, Batch, Packet};
use std::collections::HashMap;
use weir_kernels::attention::{attend_batch, store_row, AttnShape, KvBlocks, KvData, KvRowMut, KvType, SeqAttn};
use weir_runtime::gpu::{DeviceBlock, Leased};
use weir_runtime::{DType, Emit, FireCx, Inputs, OpError, Operator, Pool, Step, Tensor};

/// An attention node: `attention heads=… kv_heads=… head_dim=… max_positions=… [window=none]
/// [kv="f32"]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Spec {
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub max_positions: usize,
    pub window: Option<usize>,
    /// Element type of the KV cache.
    pub kv: KvType,
    /// Emit the keys and values stored for exported sequences on a second output, `kv`.
    pub export: bool,
}

impl OpSpec for Spec {
    const KIND: &'static str = "attention";
    const GPU: bool = true;
    fn from_params(p: &mut Params) -> Spec {
        let (heads, kv_heads) = (p.usize("heads"), p.usize("kv_heads"));
        if heads % kv_heads != 0 {
            p.error(Some("kv_heads"), format!("`kv_heads` ({kv_heads}) must divide `heads` ({heads})"));
        }
        Spec {
            heads,
            kv_heads,
            head_dim: p.usize("head_dim"),
            max_positions: p.usize("max_positions"),
            window: p.opt_usize("window"),
            kv: p.kv_type("kv"),
            export: p.bool("export", false),
        }
    }
    fn params(&self) -> Vec<(&'static str, ParamValue)> {
        vec![
            ("heads", int(self.heads)),
            ("kv_heads", int(self.kv_heads)),
            ("head_dim", int(self.head_dim)),
            ("max_positions", int(self.max_positions)),
            ("window", self.window.map_or(ParamValue::None, int)),
            ("kv", ParamValue::Str(self.kv.name().into())),
            ("export", ParamValue::Bool(self.export)),
        ]
    }
    fn inputs(&self) -> Vec<Port> {
        let kv = self.kv_heads * self.head_dim;
        vec![Port::act("q", self.heads * self.head_dim), Port::act("k", kv), Port::act("v", kv)]
    }
    fn outputs(&self) -> Vec<Port> {
        let y = Port::act("y", self.heads * self.head_dim);
        match self.export {
            true => vec![y, Port::of("kv", crate::spec::Carries::Kv)],
            false => vec![y],
        }
    }
    fn kv_block_bytes(&self) -> Option<usize> {
        Some(kv_block_bytes(self.kv_heads * self.head_dim, self.kv))
    }
    fn instantiate(&self, env: &OpEnv, _: Option<u32>) -> Box<dyn Operator<Packet>> {
        let s = self;
        let mut a =
            Attention::new(s.heads, s.kv_heads, s.head_dim, s.max_positions, s.window, s.kv, env.kv_pool.clone());
        a.export = s.export;
        Box::new(a)
    }
    fn instantiate_gpu(&self, _: &OpEnv, _: Option<u32>) -> Option<Box<dyn Operator<Packet>>> {
        let s = self;
        let mut a = GpuAttention::new(s.heads, s.kv_heads, s.head_dim, s.max_positions, s.window, s.kv);
        a.export = s.export;
        Some(Box::new(a))
    }
}

/// Positions per KV block.
pub const KV_BLOCK_TOKENS: usize = 16;

/// Bytes of one KV block of an attention operator with `kv_dim` = kv_heads·head_dim.
pub fn kv_block_bytes(kv_dim: usize, ty: KvType) -> usize {
    KvBlocks::block_len(KV_BLOCK_TOKENS, kv_dim) * ty.size()
}

fn dtype(ty: KvType) -> DType {
    match ty {
        KvType::F32 => DType::F32,
        KvType::Bf16 => DType::BF16,
        KvType::F16 => DType::F16,
    }
}

struct Kv {
    blocks: Vec<Tensor>, // each [2, KV_BLOCK_TOKENS, kv_heads*head_dim]: keys, then values
    len: usize,
}

/// The cache of `seq`, checked: its positions within `max_positions`; a fresh one (`fresh`)
/// where it starts at position 0 (with the one it replaces, if any), otherwise the one that
/// holds exactly its earlier positions (`len`).
fn cache_for<'a, K>(
    caches: &'a mut HashMap<u64, K>,
    seq: &crate::SeqSlice,
    max_positions: usize,
    fresh: impl FnOnce() -> K,
    len: impl Fn(&K) -> usize,
) -> Result<(&'a mut K, Option<K>), OpError> {
    if seq.start + seq.len > max_positions {
        return Err(OpError::new(format!(
            "sequence {}: positions up to {} exceed max_position_embeddings {max_positions}",
            seq.id,
            seq.start + seq.len,
        )));
    }
    let replaced = if seq.start == 0 { caches.insert(seq.id, fresh()) } else { None };
    let Some(kv) = caches.get_mut(&seq.id) else {
        return Err(OpError::new(format!(
            "sequence {} continues at position {} but has no KV cache",
            seq.id, seq.start
        )));
    };
    if len(kv) != seq.start {
        return Err(OpError::new(format!(
            "sequence {}: the KV cache holds {} tokens but the pass starts at {}",
            seq.id,
            len(kv),
            seq.start
        )));
    }
    Ok((kv, replaced))
}

/// See the module doc.
pub struct Attention {
    shape: AttnShape,
    max_positions: usize,
    window: Option<usize>,
    kv_type: KvType,
    caches: HashMap<u64, Kv>,
    pool: Pool,
    pub(crate) export: bool,
}

impl Attention {
    /// An attention operator with empty caches.
    /// `window`: a token at position p sees only positions after `p - window` (sliding-window
    /// attention, as Mistral); `None` sees everything before it. KV blocks of `kv_type` come
    /// from `pool`.
    pub fn new(
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        max_positions: usize,
        window: Option<usize>,
        kv_type: KvType,
        pool: Pool,
    ) -> Attention {
        Attention {
            shape: AttnShape { heads, kv_heads, head_dim },
            max_positions,
            window,
            kv_type,
            caches: HashMap::new(),
            pool,
            export: false,
        }
    }
    /// Sequences with a cache.
    pub fn cached_sequences(&self) -> usize {
        self.caches.len()
    }
}

impl Operator<Packet> for Attention {
    fn kind(&self) -> &str {
        "attention"
    }
    fn fire(&mut self, ins: &mut Inputs<Packet>, out: &mut Emit<Packet>, cx: &FireCx) -> Result<Step, OpError> {
        let s = self.shape;
        let (qd, kvd) = (s.heads * s.head_dim, s.kv_heads * s.head_dim);
        let (batch, q) = ins.get(0).act("q")?;
        let (_, k) = ins.get(1).act("k")?;
        let (_, v) = ins.get(2).act("v")?;
        check_act("q", batch, q, qd)?;
        check_act("k", batch, k, kvd)?;
        check_act("v", batch, v, kvd)?;
        for id in &batch.release {
            self.caches.remove(id);
        }
        for import in &batch.imports {
            if let Some((blocks, len)) = import.take_blocks(cx.actor) {
                self.caches.insert(import.seq(), Kv { blocks, len });
            }
        }
        let mut y = cx.zeros_f32(vec![batch.tokens(), qd])?; // [tokens, heads*head_dim]
        let bt = KV_BLOCK_TOKENS;
        // Store every sequence's new keys and values first, then attend for all at once.
        let mut row = 0;
        for seq in &batch.seqs {
            let (kv, _replaced) =
                cache_for(&mut self.caches, seq, self.max_positions, || Kv { blocks: Vec::new(), len: 0 }, |k| k.len)?;
            while kv.blocks.len() * bt < kv.len + seq.len {
                let Some(buf) = self.pool.try_alloc(kv_block_bytes(kvd, self.kv_type)) else {
                    return Err(OpError::new(format!(
                        "sequence {}: the KV cache pool `{}` has no room for position {} ({} of its {} bytes in use)",
                        seq.id,
                        self.pool.name(),
                        kv.blocks.len() * bt,
                        self.pool.in_use(),
                        self.pool.budget()
                    )));
                };
                kv.blocks.push(Tensor::from_buffer(dtype(self.kv_type), vec![2, bt, kvd], buf));
            }
            for r in row..row + seq.len {
                let p = kv.len + r - row;
                let blk = &mut kv.blocks[p / bt];
                for (src, at) in [(k, p % bt), (v, bt + p % bt)] {
                    let src = &src.f32()[r * kvd..][..kvd];
                    let dst = at * kvd..(at + 1) * kvd;
                    match self.kv_type {
                        KvType::F32 => store_row(src, KvRowMut::F32(&mut blk.f32_mut()[dst])),
                        KvType::Bf16 => store_row(src, KvRowMut::Bf16(&mut blk.u16_mut()[dst])),
                        KvType::F16 => store_row(src, KvRowMut::F16(&mut blk.u16_mut()[dst])),
                    }
                }
            }
            kv.len += seq.len;
            row += seq.len;
        }
        let caches: Vec<&Kv> = batch.seqs.iter().map(|seq| &self.caches[&seq.id]).collect();
        // Each sequence's blocks as slices of the cache's type (the other list stays empty).
        let wide = self.kv_type == KvType::F32;
        let f32s: Vec<Vec<&[f32]>> = match wide {
            true => caches.iter().map(|c| c.blocks.iter().map(|b| b.f32()).collect()).collect(),
            false => vec![],
        };
        let u16s: Vec<Vec<&[u16]>> = match wide {
            true => vec![],
            false => caches.iter().map(|c| c.blocks.iter().map(|b| b.u16()).collect()).collect(),
        };
        let mut row = 0;
        let seqs: Vec<SeqAttn> = batch
            .seqs
            .iter()
            .enumerate()
            .map(|(i, seq)| {
                let data = match self.kv_type {
                    KvType::F32 => KvData::F32(&f32s[i]),
                    KvType::Bf16 => KvData::Bf16(&u16s[i]),
                    KvType::F16 => KvData::F16(&u16s[i]),
                };
                let sq = SeqAttn { row, new: seq.len, past: seq.start, kv: KvBlocks { data, block_tokens: bt } };
                row += seq.len;
                sq
            })
            .collect();
        attend_batch(q.f32(), &seqs, self.window, s, y.f32_mut(), cx.par);
        out.send(0, Packet::Act { batch: batch.clone(), x: y });
        if self.export && !batch.export.is_empty() {
            out.send(1, Packet::Kv { batch: batch.clone(), node: cx.actor.into(), rows: self.exported(batch, kvd) });
        }
        Ok(Step::Continue)
    }
}

impl Attention {
    /// The keys and values this pass stored for the sequences the batch exports, as bytes of
    /// the cache's type (what the importing side writes into its blocks unchanged).
    fn exported(&self, batch: &Batch, kvd: usize) -> Vec<KvRows> {
        let (bt, row) = (KV_BLOCK_TOKENS, kvd * self.kv_type.size());
        let mut rows = Vec::new();
        for (id, route) in &batch.export {
            let (Some(seq), Some(kv)) = (batch.seqs.iter().find(|s| s.id == *id), self.caches.get(id)) else {
                continue;
            };
            let (mut keys, mut values) = (Vec::with_capacity(seq.len * row), Vec::with_capacity(seq.len * row));
            for p in seq.start..seq.start + seq.len {
                let blk = kv.blocks[p / bt].bytes();
                keys.extend_from_slice(&blk[(p % bt) * row..][..row]);
                values.extend_from_slice(&blk[(bt + p % bt) * row..][..row]);
            }
            rows.push(KvRows { route: route.clone(), start: seq.start, len: seq.len, keys, values });
        }
        rows
    }
}

struct GpuKv {
    /// Each block (from the GPU memory pool) with its device address.
    blocks: Vec<(Leased<DeviceBlock>, u64)>,
    len: usize,
}

/// [`Attention`] on a GPU lane: each sequence's cache in blocks of GPU memory taken from the
/// device's pool as it grows (so `--gpu-memory` bounds it), the same layout and rounding as
/// the CPU cache, one fused kernel for the whole batch.
pub struct GpuAttention {
    shape: AttnShape,
    max_positions: usize,
    window: Option<usize>,
    kv_type: KvType,
    caches: HashMap<u64, GpuKv>,
    pub(crate) export: bool,
}

impl GpuAttention {
    /// As [`Attention::new`], the blocks coming from the lane's GPU memory.
    pub fn new(
        heads: usize,
        kv_heads: usize,
        head_dim: usize,
        max_positions: usize,
        window: Option<usize>,
        kv_type: KvType,
    ) -> Self {
        GpuAttention {
            shape: AttnShape { heads, kv_heads, head_dim },
            max_positions,
            window,
            kv_type,
            caches: HashMap::new(),
            export: false,
        }
    }
}

/// Gives a block back after the work already on `stream` (a later user on another stream
/// waits for the event this records).
fn release_block(stream: &std::sync::Arc<cudarc::driver::CudaStream>, mut b: Leased<DeviceBlock>) {
    drop(cudarc::driver::DevicePtrMut::device_ptr_mut(&mut b.0, stream));
}

impl Operator<Packet> for GpuAttention {
    fn kind(&self) -> &str {
        "attention"
    }
    fn fire(&mut self, ins: &mut Inputs<Packet>, out: &mut Emit<Packet>, cx: &FireCx) -> Result<Step, OpError> {
        let g = cx.gpu()?;
        let s = self.shape;
        let (qd, kvd, bt) = (s.heads * s.head_dim, s.kv_heads * s.head_dim, KV_BLOCK_TOKENS);
        let (batch, q) = crate::gpu::act("q", ins.get(0), qd)?;
        let (_, k) = crate::gpu::act("k", ins.get(1), kvd)?;
        let (_, v) = crate::gpu::act("v", ins.get(2), kvd)?;
        if !batch.imports.is_empty() {
            return Err(OpError::new(
                "a KV cache from a prefill worker goes to attention on a CPU lane (a GPU lane's cache cannot take \
                 one yet)",
            ));
        }
        let stream = g.stream().clone();
        for id in &batch.release {
            if let Some(kv) = self.caches.remove(id) {
                kv.blocks.into_iter().for_each(|(b, _)| release_block(&stream, b));
            }
        }
        let (mut addr, mut offset) = (Vec::new(), Vec::new());
        for seq in &batch.seqs {
            let (kv, replaced) = cache_for(
                &mut self.caches,
                seq,
                self.max_positions,
                || GpuKv { blocks: Vec::new(), len: 0 },
                |k| k.len,
            )?;
            if let Some(old) = replaced {
                old.blocks.into_iter().for_each(|(b, _)| release_block(&stream, b));
            }
            while kv.blocks.len() * bt < kv.len + seq.len {
                let bytes = kv_block_bytes(kvd, self.kv_type);
                let Some(mut b) = g.memory.try_alloc(bytes).map_err(crate::gpu::err)? else {
                    return Err(OpError::new(format!(
                        "sequence {}: the GPU memory pool `{}` has no room for KV position {} ({} of its {} bytes in use; \
                         --gpu-memory sets it)",
                        seq.id,
                        g.memory.name(),
                        kv.blocks.len() * bt,
                        g.memory.in_use(),
                        g.memory.budget()
                    )));
                };
                // This stream waits for the block's earlier users before it writes it.
                let a = cudarc::driver::DevicePtrMut::device_ptr_mut(&mut b.0, &stream).0;
                kv.blocks.push((b, a));
            }
            for p in kv.len..kv.len + seq.len {
                addr.push(kv.blocks[p / bt].1);
                offset.push((p % bt) as i32);
            }
            kv.len += seq.len;
        }
        let elem = weir_kernels::cuda::Elem::from(self.kv_type);
        let (mut table, mut start, mut pos) = (Vec::new(), Vec::new(), Vec::new());
        for seq in &batch.seqs {
            let at = table.len() as i32;
            table.extend(self.caches[&seq.id].blocks.iter().map(|(_, a)| *a));
            for p in seq.start..seq.start + seq.len {
                start.push(at);
                pos.push(p as i32);
            }
        }
        let mut y = g.alloc(DType::F32, vec![batch.tokens(), qd])?;
        if !addr.is_empty() {
            let (addr, offset) = (g.upload_values(&addr)?, g.upload_values(&offset)?);
            let (table, start, pos) = (g.upload_values(&table)?, g.upload_values(&start)?, g.upload_values(&pos)?);
            // SAFETY: every address is a block this operator holds (taken above or in an
            // earlier pass, used on this lane's stream only, given back only through
            // `release_block`), of `kv_block_bytes` for this shape and type; every offset is
            // below `bt`; every row's blocks hold its sequence's positions up to its own,
            // stored by the `kv_store` just before.
            unsafe {
                g.kernels
                    .kv_store(&k.f32()?, &v.f32()?, elem, &addr.as_view(), &offset.as_view(), kvd, bt)
                    .map_err(crate::gpu::err)?;
                g.kernels
                    .attend(
                        &q.f32()?,
                        elem,
                        &table.as_view(),
                        &start.as_view(),
                        &pos.as_view(),
                        s,
                        bt,
                        self.window,
                        &mut y.f32_mut(),
                    )
                    .map_err(crate::gpu::err)?;
            }
        }
        out.send(0, Packet::DevAct { batch: batch.clone(), x: y.freeze() });
        if self.export && !batch.export.is_empty() {
            let rows = exported_from_gpu(g, batch, k, v, kvd, self.kv_type)?;
            out.send(1, Packet::Kv { batch: batch.clone(), node: cx.actor.into(), rows });
        }
        Ok(Step::Continue)
    }
}

/// The keys and values of the sequences `batch` exports, brought back from the GPU and rounded
/// to the cache's type as `kv_store` rounds them (GPU prefill, CPU decode: the decode side
/// takes the bytes unchanged). The one wait on the stream each exporting pass makes.
fn exported_from_gpu(
    g: &weir_runtime::gpu::GpuLane,
    batch: &Batch,
    k: &weir_runtime::gpu::DeviceTensor,
    v: &weir_runtime::gpu::DeviceTensor,
    kvd: usize,
    ty: KvType,
) -> Result<Vec<KvRows>, OpError> {
    let host = |t: &weir_runtime::gpu::DeviceTensor| -> Result<Vec<f32>, OpError> {
        let mut bytes = vec![0u8; t.nbytes()];
        g.download(t, &mut bytes)?;
        Ok(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
    };
    let (k, v) = (host(k)?, host(v)?);
    let round = |src: &[f32]| -> Vec<u8> {
        match ty {
            KvType::F32 => src.iter().flat_map(|x| x.to_le_bytes()).collect(),
            KvType::Bf16 | KvType::F16 => {
                let mut d = vec![0u16; src.len()];
                store_row(src, if ty == KvType::Bf16 { KvRowMut::Bf16(&mut d) } else { KvRowMut::F16(&mut d) });
                d.iter().flat_map(|x| x.to_le_bytes()).collect()
            }
        }
    };
    let mut rows = Vec::new();
    let mut row = 0;
    for seq in &batch.seqs {
        if let Some((_, route)) = batch.export.iter().find(|(id, _)| *id == seq.id) {
            let span = row * kvd..(row + seq.len) * kvd;
            let (keys, values) = (round(&k[span.clone()]), round(&v[span]));
            rows.push(KvRows { route: route.clone(), start: seq.start, len: seq.len, keys, values });
        }
        row += seq.len;
    }
    Ok(rows)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::*;
    use crate::{Batch, LogitsWanted, Sampling, SeqSlice};
    use std::sync::Arc;

    fn one(id: u64, start: usize, len: usize, release: Vec<u64>) -> Arc<Batch> {
        Arc::new(Batch {
            pass: 0,
            seqs: vec![SeqSlice { id, start, len, logits: LogitsWanted::None, sampling: Sampling::default() }],
            release,
            ..Default::default()
        })
    }

    #[test]
    fn cache_grows_per_sequence_and_is_released() {
        let pool = Pool::new("kv", 2 * kv_block_bytes(2, KvType::F32));
        let mut op = Attention::new(1, 1, 2, 64, None, KvType::F32, pool.clone());
        let b0 = one(7, 0, 1, vec![]);
        let out =
            fire(&mut op, vec![act(&b0, 2, &[1., 0.]), act(&b0, 2, &[1., 0.]), act(&b0, 2, &[5., 6.])], 1).unwrap();
        assert_eq!(out[0].as_ref().unwrap().act("y").unwrap().1.f32(), &[5., 6.]);
        // The second token sees both positions; equal scores average the values.
        let b1 = one(7, 1, 1, vec![]);
        let out =
            fire(&mut op, vec![act(&b1, 2, &[0., 0.]), act(&b1, 2, &[1., 0.]), act(&b1, 2, &[1., 2.])], 1).unwrap();
        assert_eq!(out[0].as_ref().unwrap().act("y").unwrap().1.f32(), &[3., 4.]);
        // A pass that skips a position is refused.
        let bad = one(7, 5, 1, vec![]);
        let e =
            fire(&mut op, vec![act(&bad, 2, &[0.; 2]), act(&bad, 2, &[0.; 2]), act(&bad, 2, &[0.; 2])], 1).unwrap_err();
        assert!(e.0.contains("holds 2 tokens"), "{e}");
        let rel = Arc::new(Batch { pass: 1, release: vec![7], ..Default::default() });
        fire(&mut op, vec![act(&rel, 2, &[]), act(&rel, 2, &[]), act(&rel, 2, &[])], 1).unwrap();
        assert_eq!(op.cached_sequences(), 0);
        assert_eq!(pool.in_use(), 0, "released blocks go back to the pool");
        // A sequence longer than the pool's blocks: a fault naming it.
        let long = one(9, 0, 2 * KV_BLOCK_TOKENS + 1, vec![]);
        let n = 2 * (2 * KV_BLOCK_TOKENS + 1);
        let e = fire(
            &mut op,
            vec![act(&long, 2, &vec![0.; n]), act(&long, 2, &vec![0.; n]), act(&long, 2, &vec![0.; n])],
            1,
        );
        let e = e.unwrap_err();
        assert!(e.0.contains("sequence 9") && e.0.contains("KV cache pool `kv`"), "{e}");
        let far = one(8, 0, 65, vec![]);
        let e = fire(&mut op, vec![act(&far, 2, &[0.; 130]), act(&far, 2, &[0.; 130]), act(&far, 2, &[0.; 130])], 1)
            .unwrap_err();
        assert!(e.0.contains("max_position_embeddings 64"), "{e}");
    }
}
