//! weir-runtime: runs a placed graph of operator actors.
//!
//! The map:
//! * [`lane`] — a lane is where actors run: a CPU core set (a thread pinned to the first core
//!   plus a worker pool on the others), an I/O thread, an io_uring NVMe reader, or a CUDA
//!   stream ([`gpu`]).
//! * [`channel`] — the bounded edges between actors, and how they wake the lanes at their ends.
//! * [`actor`] — the [`Operator`] trait that operators implement, and the actor that wraps one
//!   with its ports.
//! * [`program`] — [`ProgramBuilder`] checks a placed graph and `build()` starts it as a
//!   [`Program`]: lanes running, edges connected, faults collected.
//! * [`tensor`] — dtypes, aligned host buffers, tensors.
//! * [`pool`] — host memory budgets that hold by construction.
//! * [`gpu`] — GPU lanes: devices, streams, device memory pools, uploads.
//! * [`trace`] — typed events, and what reads them: the Chrome trace, the summary, the HTML
//!   timeline.
//!
//! The runtime knows nothing of any model: the message type is the embedder's (any
//! [`Message`]), and operators are opaque [`Operator`]s.
//!
//! ```
//! use weir_runtime::{Emit, FireCx, Inputs, LaneSpec, Message, OpError, Operator, ProgramBuilder, Step};
//!
//! #[derive(Clone, Debug)]
//! struct N(u64);
//! impl Message for N { fn bytes(&self) -> usize { 8 } }
//!
//! struct Double;
//! impl Operator<N> for Double {
//!     fn fire(&mut self, ins: &mut Inputs<N>, out: &mut Emit<N>, _cx: &FireCx) -> Result<Step, OpError> {
//!         let v = ins.take(0).0;
//!         out.send(0, N(v * 2));
//!         Ok(Step::Continue)
//!     }
//! }
//!
//! let mut b = ProgramBuilder::<N>::new();
//! let lane = b.lane(LaneSpec::cpu("cpu0", vec![weir_runtime::lane::allowed_cpus()[0]]));
//! let a = b.actor("double", lane, None, Box::new(Double), 1, 1);
//! let input = b.input(a, 0, 2);
//! let output = b.output(a, 0, 2);
//! let program = b.build().unwrap();
//! input.send(N(21)).unwrap();
//! assert_eq!(output.recv().unwrap().0, 42);
//! program.shutdown().unwrap();
//! ```

pub mod actor;
pub mod channel;
pub mod error;
pub mod gpu;
pub mod lane;
pub mod pool;
pub mod program;
pub mod remote;
pub mod tensor;
pub mod trace;

pub use actor::{Emit, FireCx, Inputs, Needs, Operator, ReadyCx, Step};
pub use channel::{ExternalRx, ExternalTx};
pub use error::{Error, OpError};
pub use lane::{LaneId, LaneKind, LaneSpec, WorkerPool};
pub use pool::{LaneWaker, Pool, Reservation, TierMeter};
pub use program::{ActorId, Program, ProgramBuilder};
pub use tensor::{DType, HostBuffer, Tensor};
pub use trace::{summary::Summary, Event, SpanKind, Trace};

/// What travels on an edge. Clones must be cheap (fan-out clones a message per consumer):
/// put large data behind an `Arc`.
pub trait Message: Clone + Send + 'static {
    /// Bytes this message carries, for tracing.
    fn bytes(&self) -> usize;
}
