//! Bounded edges between actors.
//!
//! Every edge is a bounded crossbeam channel with one producer and one consumer; its capacity
//! is both how far the producer may run ahead (prefetch depth) and a bound on the memory in
//! flight on that edge.
//!
//! * **Backpressure.** An actor fires only when every one of its output edges has room, so a
//!   producer that is ahead simply stops being ready: the lane it runs on moves on to other
//!   actors or sleeps. A lane never blocks on a full edge, so actors sharing a lane cannot
//!   deadlock each other.
//! * **Waking.** A send wakes the consumer's lane and a receive wakes the producer's lane (the
//!   lane thread is unparked; a lane that is already awake loses nothing, since `unpark` before
//!   `park` is remembered). External ends (the engine feeding a graph or reading its results)
//!   block in crossbeam itself.
//! * **Disconnection and shutdown.** When a lane stops, its actors and their channel ends are
//!   dropped, so a peer blocked on the other end returns `Err` instead of hanging: the program
//!   drains by disconnection, never by a timeout.
//! * **Memory.** A message on an edge is owned by the edge until received; large payloads are
//!   reference-counted, so fan-out to several consumers does not copy them.

use crossbeam_channel::{Receiver, Sender, TryRecvError, TrySendError};
use std::sync::{Arc, OnceLock};
use std::thread::Thread;

/// Records an edge's level in the trace after each send and receive.
pub(crate) struct Probe {
    pub(crate) edge: u32,
    pub(crate) sink: Arc<crate::trace::TraceSink>,
}

impl Probe {
    fn record(&self, level: usize) {
        if self.sink.on() {
            let t_ns = self.sink.now_ns();
            self.sink.push(crate::trace::Event::ChannelLevel { edge: self.edge, t_ns, level: level as u32 });
        }
    }
}

/// Wakes one lane's thread.
#[derive(Default, Debug)]
pub(crate) struct Waker {
    thread: OnceLock<Thread>,
}

impl Waker {
    pub(crate) fn set(&self, t: Thread) {
        let _ = self.thread.set(t);
    }
    pub(crate) fn wake(&self) {
        if let Some(t) = self.thread.get() {
            t.unpark();
        }
    }
}

/// The producing end of an edge inside a program.
pub(crate) struct EdgeTx<M> {
    pub(crate) tx: Sender<M>,
    pub(crate) consumer: Option<Arc<Waker>>,
    pub(crate) probe: Option<Arc<Probe>>,
}

impl<M> EdgeTx<M> {
    pub(crate) fn has_room(&self) -> bool {
        !self.tx.is_full()
    }
    /// Sends without blocking; the caller checked `has_room` (it is the only producer).
    /// A disconnected consumer (its lane stopped) drops the message.
    pub(crate) fn send_now(&self, m: M) -> Result<(), M> {
        match self.tx.try_send(m) {
            Ok(()) | Err(TrySendError::Disconnected(_)) => {
                if let Some(p) = &self.probe {
                    p.record(self.tx.len());
                }
                if let Some(w) = &self.consumer {
                    w.wake();
                }
                Ok(())
            }
            Err(TrySendError::Full(m)) => Err(m),
        }
    }
}

/// The consuming end of an edge inside a program.
pub(crate) struct EdgeRx<M> {
    pub(crate) rx: Receiver<M>,
    pub(crate) producer: Option<Arc<Waker>>,
    pub(crate) probe: Option<Arc<Probe>>,
}

impl<M> EdgeRx<M> {
    pub(crate) fn has_message(&self) -> bool {
        !self.rx.is_empty()
    }
    pub(crate) fn recv_now(&self) -> Option<M> {
        match self.rx.try_recv() {
            Ok(m) => {
                if let Some(p) = &self.probe {
                    p.record(self.rx.len());
                }
                if let Some(w) = &self.producer {
                    w.wake();
                }
                Some(m)
            }
            Err(TryRecvError::Empty) | Err(TryRecvError::Disconnected) => None,
        }
    }
}

/// Feeds a program from outside (the engine's scheduler, a test).
pub struct ExternalTx<M> {
    pub(crate) inner: EdgeTx<M>,
}

impl<M> ExternalTx<M> {
    /// Sends, blocking while the edge is full. Fails with the message when the program stopped.
    pub fn send(&self, m: M) -> Result<(), M> {
        match self.inner.tx.send(m) {
            Ok(()) => {
                if let Some(p) = &self.inner.probe {
                    p.record(self.inner.tx.len());
                }
                if let Some(w) = &self.inner.consumer {
                    w.wake();
                }
                Ok(())
            }
            Err(e) => Err(e.0),
        }
    }
}

/// Reads a program's results from outside.
pub struct ExternalRx<M> {
    pub(crate) inner: EdgeRx<M>,
}

impl<M> ExternalRx<M> {
    /// Receives, blocking until a message arrives; `None` once the program stopped and the edge
    /// is drained.
    pub fn recv(&self) -> Option<M> {
        match self.inner.rx.recv() {
            Ok(m) => {
                if let Some(p) = &self.inner.probe {
                    p.record(self.inner.rx.len());
                }
                if let Some(w) = &self.inner.producer {
                    w.wake();
                }
                Some(m)
            }
            Err(_) => None,
        }
    }
}

/// A new bounded edge between two lanes' wakers (`None` for an external end).
pub(crate) fn edge<M>(
    capacity: usize,
    producer: Option<Arc<Waker>>,
    consumer: Option<Arc<Waker>>,
    probe: Option<Arc<Probe>>,
) -> (EdgeTx<M>, EdgeRx<M>) {
    let (tx, rx) = crossbeam_channel::bounded(capacity);
    (EdgeTx { tx, consumer, probe: probe.clone() }, EdgeRx { rx, producer, probe })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_edge_refuses_and_a_dropped_consumer_disconnects() {
        let (tx, rx) = edge::<u32>(2, None, None, None);
        assert!(tx.has_room());
        tx.send_now(1).unwrap();
        tx.send_now(2).unwrap();
        assert!(!tx.has_room());
        assert_eq!(tx.send_now(3), Err(3));
        assert_eq!(rx.recv_now(), Some(1));
        assert!(tx.has_room());
        drop(rx);
        // Sending to a stopped consumer drops the message instead of blocking.
        assert!(tx.send_now(4).is_ok());
        let ext = ExternalTx { inner: tx };
        assert_eq!(ext.send(5), Err(5));
    }

    #[test]
    fn an_external_receiver_returns_none_when_the_producer_is_gone() {
        let (tx, rx) = edge::<u32>(1, None, None, None);
        let ext = ExternalRx { inner: rx };
        let h = std::thread::spawn(move || {
            tx.send_now(7).unwrap();
            drop(tx);
        });
        assert_eq!(ext.recv(), Some(7));
        assert_eq!(ext.recv(), None);
        h.join().unwrap();
    }
}
