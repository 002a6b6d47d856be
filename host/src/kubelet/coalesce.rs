//! One write per answer: a connection wrapper that holds what the HTTP/2 layer
//! writes until the data plane has run every task that is ready, then writes it
//! all at once.
//!
//! Why: kubelet's gRPC client (grpc-go) sends a PING with each request (its
//! flow-control window estimator). h2 answers a PING as soon as it has read it,
//! and flushes that answer before the request's handler has run, so every
//! Allocate cost two writes and woke kubelet's reader twice: once for the PING
//! acknowledgement, once for the response. Here a flush that finds bytes held is
//! put off until the data plane's run queue has had its turn (tokio's deferred
//! wake-up, as `yield_now` uses: it fires once the tasks that are ready have
//! run). The handler that the same read spawned runs in that turn, and the
//! acknowledgement and the response leave in one write. (A connection is polled
//! more than once per turn — h2 polls it again to accept the request it has just
//! read — so the wait is for the turn to end, not for one more poll.)
//!
//! Large writes (a ListAndWatch list of thousands of devices) are not copied:
//! once [`HOLD_MAX`] bytes are held they are written through.
//!
//! Owns only the byte buffer; it knows nothing of HTTP/2 or gRPC.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker, ready};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The most bytes held back before writing; larger writes go through at once.
pub const HOLD_MAX: usize = 64 * 1024;

/// A connection whose writes are held until the next flush, and whose first
/// flush after a write yields once to the other ready tasks.
#[derive(Debug)]
pub struct Coalesced<S> {
    inner: S,
    held: Vec<u8>,
    /// Written out of `held` already (the socket took part of it).
    sent: usize,
    /// The turn of the run queue that the held bytes wait for, once a flush
    /// has found them.
    turn: Option<Arc<Turn>>,
}

/// The end of one turn of the run queue: tokio wakes it (it is a deferred
/// waker) once the tasks that were ready have run; it then wakes the
/// connection's task.
#[derive(Debug)]
struct Turn {
    ended: AtomicBool,
    task: Waker,
}

impl Wake for Turn {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.ended.store(true, Ordering::Release);
        self.task.wake_by_ref();
    }
}

impl Turn {
    /// Waits for the end of this turn on behalf of the task polled with `cx`.
    fn start(cx: &Context<'_>) -> Arc<Self> {
        let turn = Arc::new(Self {
            ended: AtomicBool::new(false),
            task: cx.waker().clone(),
        });
        let waker = Waker::from(turn.clone());
        // `yield_now` hands its waker to the runtime's list of deferred
        // wake-ups on its first poll (and wakes it at once outside a runtime);
        // the future itself is not needed after that.
        let mut yielded = std::pin::pin!(tokio::task::yield_now());
        let _ = yielded.as_mut().poll(&mut Context::from_waker(&waker));
        turn
    }

    fn ended(&self) -> bool {
        self.ended.load(Ordering::Acquire)
    }
}

impl<S> Coalesced<S> {
    /// Wraps `inner`.
    pub fn new(inner: S) -> Self {
        Self {
            inner,
            held: Vec::new(),
            sent: 0,
            turn: None,
        }
    }

    /// The wrapped connection.
    pub fn get_ref(&self) -> &S {
        &self.inner
    }
}

impl<S: AsyncWrite + Unpin> Coalesced<S> {
    /// Writes out what is held; `Ready(Ok)` once all of it is written.
    fn poll_send_held(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.sent < self.held.len() {
            let n = ready!(Pin::new(&mut self.inner).poll_write(cx, &self.held[self.sent..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.sent += n;
        }
        self.held.clear();
        self.sent = 0;
        // Give back a buffer that a large answer grew, keeping a small one.
        if self.held.capacity() > HOLD_MAX {
            self.held = Vec::new();
        }
        Poll::Ready(Ok(()))
    }
}

impl<S: tonic::transport::server::Connected> tonic::transport::server::Connected for Coalesced<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Coalesced<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Coalesced<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = &mut *self;
        if this.held.len() + buf.len() > HOLD_MAX {
            ready!(this.poll_send_held(cx))?;
            if buf.len() > HOLD_MAX {
                return Pin::new(&mut this.inner).poll_write(cx, buf);
            }
        }
        this.held.extend_from_slice(buf);
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        let this = &mut *self;
        if this.held.len() + total > HOLD_MAX {
            ready!(this.poll_send_held(cx))?;
            if total > HOLD_MAX {
                return Pin::new(&mut this.inner).poll_write_vectored(cx, bufs);
            }
        }
        for buf in bufs {
            this.held.extend_from_slice(buf);
        }
        Poll::Ready(Ok(total))
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.held.is_empty() {
            return Pin::new(&mut this.inner).poll_flush(cx);
        }
        // Let the tasks this turn made ready (the request's handler) add their
        // frames first; the turn's end wakes this task again.
        match &this.turn {
            None => {
                this.turn = Some(Turn::start(cx));
                return Poll::Pending;
            }
            Some(turn) if !turn.ended() => return Poll::Pending,
            Some(_) => {}
        }
        ready!(this.poll_send_held(cx))?;
        this.turn = None;
        Pin::new(&mut this.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = &mut *self;
        ready!(this.poll_send_held(cx))?;
        this.turn = None;
        Pin::new(&mut this.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::rc::Rc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A connection that records each write it is given.
    #[derive(Default)]
    struct Recorder {
        writes: Vec<Vec<u8>>,
    }

    impl AsyncWrite for Recorder {
        fn poll_write(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &[u8],
        ) -> Poll<io::Result<usize>> {
            self.writes.push(buf.to_vec());
            Poll::Ready(Ok(buf.len()))
        }

        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }

        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
            Poll::Ready(Ok(()))
        }
    }

    /// As the data plane runs an Allocate: the connection task reads a PING and
    /// a request, queues the PING's answer and flushes (twice, as h2 does in one
    /// poll), and the request's handler, spawned after that flush, adds the
    /// response. One write carries both.
    #[tokio::test(flavor = "current_thread")]
    async fn an_answer_queued_by_a_task_spawned_after_the_flush_leaves_in_the_same_write() {
        let io = Rc::new(RefCell::new(Coalesced::new(Recorder::default())));
        let response: Rc<RefCell<Option<&[u8]>>> = Rc::default();
        let local = tokio::task::LocalSet::new();
        local
            .run_until(async {
                let conn = {
                    let (io, response) = (io.clone(), response.clone());
                    tokio::task::spawn_local(async move {
                        let mut spawned = false;
                        std::future::poll_fn(|cx| {
                            let mut io = io.borrow_mut();
                            if let Some(bytes) = response.borrow_mut().take() {
                                let _ = Pin::new(&mut *io).poll_write(cx, bytes);
                            }
                            if !spawned {
                                let _ = Pin::new(&mut *io).poll_write(cx, b"ping-ack");
                                let first = Pin::new(&mut *io).poll_flush(cx);
                                assert!(first.is_pending(), "the flush waits for the turn");
                                let handler = response.clone();
                                tokio::task::spawn_local(async move {
                                    *handler.borrow_mut() = Some(b"+response");
                                });
                                spawned = true;
                            }
                            Pin::new(&mut *io).poll_flush(cx)
                        })
                        .await
                    })
                };
                conn.await.expect("connection task").expect("flushed");
            })
            .await;
        let io = io.borrow();
        assert_eq!(io.get_ref().writes, vec![b"ping-ack+response".to_vec()]);
    }

    #[tokio::test]
    async fn a_flush_with_nothing_held_goes_straight_through() {
        let mut io = Coalesced::new(Recorder::default());
        io.flush().await.expect("flushed");
        assert!(io.get_ref().writes.is_empty());
    }

    #[tokio::test]
    async fn writes_larger_than_the_hold_go_through_whole_and_in_order() {
        let (a, mut b) = tokio::io::duplex(4 * HOLD_MAX);
        let mut io = Coalesced::new(a);
        let big: Vec<u8> = (0..2 * HOLD_MAX).map(|i| (i % 251) as u8).collect();
        io.write_all(b"head").await.expect("held");
        io.write_all(&big).await.expect("written");
        io.write_all(b"tail").await.expect("held");
        io.flush().await.expect("flushed");
        drop(io);
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.expect("read");
        let mut want = b"head".to_vec();
        want.extend_from_slice(&big);
        want.extend_from_slice(b"tail");
        assert_eq!(got.len(), want.len());
        assert!(got == want, "bytes arrive whole and in order");
    }

    #[tokio::test]
    async fn shutdown_writes_what_is_held() {
        let (a, mut b) = tokio::io::duplex(64);
        let mut io = Coalesced::new(a);
        io.write_all(b"last words").await.expect("held");
        io.shutdown().await.expect("shut down");
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.expect("read");
        assert_eq!(got, b"last words");
    }
}
