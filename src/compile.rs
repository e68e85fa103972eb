//! Compiles a placed graph into a running program: every node becomes an actor on its lane,
//! every edge a bounded channel.

use crate::error::Result;
use weir_graphs::Graph;
use weir_operators::Packet;
use weir_runtime::{ExternalRx, ExternalTx, LaneId, Program, ProgramBuilder};

/// A started program with its entry (token ids in) and exit (sampled tokens out).
pub struct Compiled {
    pub program: Program,
    pub entry: ExternalTx<Packet>,
    pub exit: ExternalRx<Packet>,
}

/// Starts `g` on its lanes.
/// `in_flight`: passes the driver sends before it reads a result (the exit edge holds them).
pub fn compile(g: &Graph, trace: bool, env: &weir_operators::OpEnv, in_flight: usize) -> Result<Compiled> {
    let mut b = ProgramBuilder::<Packet>::new();
    b.trace(trace);
    b.activations(env.activations.clone());
    let lanes: Vec<LaneId> = g.lanes.iter().map(|l| b.lane(l.clone())).collect();
    let actors: Vec<_> = g
        .nodes
        .iter()
        .map(|n| {
            b.actor(
                &n.name,
                lanes[n.lane],
                n.layer,
                n.op.instantiate(env, n.layer),
                n.op.inputs().len(),
                n.op.outputs().len(),
            )
        })
        .collect();
    for e in &g.edges {
        b.connect((actors[e.from.node], e.from.port), (actors[e.to.node], e.to.port), e.capacity);
        if e.sticky {
            b.sticky(actors[e.to.node], e.to.port);
        } else if e.uses > 1 {
            b.keep(actors[e.to.node], e.to.port, e.uses);
        }
    }
    let entry = b.input(actors[g.entry.node], g.entry.port, 1);
    let exit = b.output(actors[g.exit.node], g.exit.port, in_flight.max(1));
    let program = b.build()?;
    Ok(Compiled { program, entry, exit })
}
