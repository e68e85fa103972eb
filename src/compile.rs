//! Compiles a placed graph into a running program: every node becomes an actor on its lane,
//! every edge a bounded channel. The placement (`weir_graphs::place`) has decided everything,
//! transfers included; a node on a GPU lane becomes its operator's GPU version.

use crate::error::{Error, Result};
use weir_graphs::Graph;
use weir_operators::{OpConfig, Packet};
use weir_runtime::{ExternalRx, ExternalTx, LaneId, ProgramBuilder};

/// A started program with its entry (token ids in) and exit (sampled tokens out).
pub struct Compiled {
    pub program: weir_runtime::Program,
    pub entry: ExternalTx<Packet>,
    pub exit: ExternalRx<Packet>,
}

/// Starts `g` on its lanes.
/// `in_flight`: passes the driver sends before it reads a result (the exit edge holds them).
/// `gpu_memory`: the budget of each GPU's memory pool (`None`: the device's memory less 1 GiB).
pub fn compile(
    g: &Graph,
    trace: bool,
    env: &weir_operators::OpEnv,
    in_flight: usize,
    gpu_memory: Option<usize>,
) -> Result<Compiled> {
    if !g.drives() {
        let p = g.part.as_deref().unwrap_or_default();
        return Err(Error::Placement(format!("process `{p}`'s part has no entry: it runs under `weir worker`")));
    }
    let (mut b, actors) = wire(g, trace, env, gpu_memory)?;
    let entry = b.input(actors[g.entry.node], g.entry.port, 1);
    let exit = b.output(actors[g.exit.node], g.exit.port, in_flight.max(1));
    let program = b.build()?;
    Ok(Compiled { program, entry, exit })
}

/// Starts a part of a graph over several processes that is not `main`'s: no entry or exit,
/// its passes come and go through its `net_recv` and `net_send` nodes.
pub fn compile_part(
    g: &Graph,
    trace: bool,
    env: &weir_operators::OpEnv,
    gpu_memory: Option<usize>,
) -> Result<weir_runtime::Program> {
    Ok(wire(g, trace, env, gpu_memory)?.0.build()?)
}

/// One actor per node, on its lane, and one channel per edge.
fn wire(
    g: &Graph,
    trace: bool,
    env: &weir_operators::OpEnv,
    gpu_memory: Option<usize>,
) -> Result<(ProgramBuilder<Packet>, Vec<weir_runtime::ActorId>)> {
    let mut b = ProgramBuilder::<Packet>::new();
    b.trace(trace);
    b.activations(env.activations.clone());
    if let Some(bytes) = gpu_memory {
        b.gpu_memory(bytes);
    }
    let lanes: Vec<LaneId> = g.lanes.iter().map(|l| b.lane(l.clone())).collect();
    let mut actors = Vec::with_capacity(g.nodes.len());
    for n in &g.nodes {
        let gpu_lane = g.lanes[n.lane].kind.is_gpu();
        // A loader on a GPU lane (`--prefetch 0`) reads there, in turn with the lane's work,
        // which then waits for its stream after every firing: nothing overlaps.
        if gpu_lane && matches!(n.op, OpConfig::Load(_)) {
            b.serial(lanes[n.lane]);
        }
        let op = if gpu_lane {
            n.op.instantiate_gpu(env, n.layer).map_err(|e| Error::Placement(format!("node `{}`: {e}", n.name)))?
        } else {
            n.op.instantiate(env, n.layer)
        };
        actors.push(b.actor(&n.name, lanes[n.lane], n.layer, op, n.op.inputs().len(), n.op.outputs().len()));
    }
    for e in &g.edges {
        b.connect((actors[e.from.node], e.from.port), (actors[e.to.node], e.to.port), e.capacity);
        if e.sticky {
            b.sticky(actors[e.to.node], e.to.port);
        } else if e.uses > 1 {
            b.keep(actors[e.to.node], e.to.port, e.uses);
        }
    }
    Ok((b, actors))
}
