//! The two queues between the audio thread and its worker: answer requests one way, answer
//! chunks the other. Both are fixed-capacity, lock-free queues that wake no one: the audio thread
//! only pushes and pops, never takes a lock and never makes a system call, and the worker finds
//! what arrived by polling (`LiveShared::is_phrase_open` tells it when to poll often).
//! Runs on: audio thread (`push_request`, `pop_chunk`), worker (`pop_request`, `push_chunk`,
//! `is_closed`), main thread (`new`, `close`).

use std::sync::atomic::{AtomicBool, Ordering};

use crossbeam::queue::ArrayQueue;

use crate::phrase::{AnswerChunk, AnswerRequest};

/// Requests the queue to the worker holds. The audio thread keeps one more in its outbox, and a
/// newer request replaces it, so a full queue never blocks.
pub const REQUEST_QUEUE_LEN: usize = 4;

/// Chunks the queue to the audio thread holds: many beats of answer.
pub const CHUNK_QUEUE_LEN: usize = 64;

/// The queues one plugin instance's audio thread and worker share (through an `Arc`, built and
/// finally dropped on the main thread).
#[derive(Debug)]
pub struct WorkerLink {
    requests: ArrayQueue<AnswerRequest>,
    chunks: ArrayQueue<AnswerChunk>,
    is_closed: AtomicBool,
}

impl WorkerLink {
    /// Empty queues of the standard sizes. Main thread: this allocates their slots.
    pub fn new() -> Self {
        Self::with_capacities(REQUEST_QUEUE_LEN, CHUNK_QUEUE_LEN)
    }

    /// Empty queues that hold `num_requests` requests and `num_chunks` chunks (at least one
    /// each).
    pub fn with_capacities(num_requests: usize, num_chunks: usize) -> Self {
        Self {
            requests: ArrayQueue::new(num_requests.max(1)),
            chunks: ArrayQueue::new(num_chunks.max(1)),
            is_closed: AtomicBool::new(false),
        }
    }

    /// Whether no request waits for the worker.
    pub fn has_no_requests(&self) -> bool {
        self.requests.is_empty()
    }

    /// Queues a request for the worker; hands it back when the queue is full. Audio thread.
    #[allow(clippy::result_large_err)] // By value on purpose: boxing it would allocate.
    pub fn push_request(&self, request: AnswerRequest) -> Result<(), AnswerRequest> {
        self.requests.push(request)
    }

    /// The oldest request not yet taken. Worker.
    pub fn pop_request(&self) -> Option<AnswerRequest> {
        self.requests.pop()
    }

    /// Queues a chunk for the audio thread; hands it back when the queue is full. Worker.
    #[allow(clippy::result_large_err)] // By value on purpose: the audio thread frees no box.
    pub fn push_chunk(&self, chunk: AnswerChunk) -> Result<(), AnswerChunk> {
        self.chunks.push(chunk)
    }

    /// The oldest chunk not yet taken. Audio thread.
    pub fn pop_chunk(&self) -> Option<AnswerChunk> {
        self.chunks.pop()
    }

    /// Tells the worker to stop. Main thread.
    pub fn close(&self) {
        self.is_closed.store(true, Ordering::Release);
    }

    /// Whether the worker should stop. Worker.
    pub fn is_closed(&self) -> bool {
        self.is_closed.load(Ordering::Acquire)
    }
}

impl Default for WorkerLink {
    fn default() -> Self {
        Self::new()
    }
}
