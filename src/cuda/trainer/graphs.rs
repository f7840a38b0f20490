//! The CUDA graphs of the training step: one per shape bucket, captured on the bucket's first update and
//! replayed by every later one, so an update costs the host one launch instead of one per kernel.
//!
//! A replay reads everything that changes between updates from device memory (the staged tables and
//! content, the scalars), so one graph serves every batch of its bucket. Graphs are kept for the trainer's
//! life, at most [`MAX_GRAPHS`]: past that, an update of a new bucket runs the same padded launches from
//! the host, and stderr says so once. A capture that fails (a driver that cannot capture some call) is
//! said once too, and the trainer goes on without graphs: nothing ran during the capture.

use crate::cuda::bucket::BucketKey;
use anyhow::{Context, Result};
use cudarc::driver::{CudaGraph, CudaStream, sys};
use std::collections::HashMap;
use std::sync::Arc;

/// Most graphs one trainer keeps. The row counts of a run's batches spread over a few hundred rows each way
/// (sums over the batch's users), a handful of 64-row buckets per tower, so this is rarely met; each graph
/// holds its launches' parameters (about a thousand launches at pch-base).
pub const MAX_GRAPHS: usize = 128;

#[derive(Default)]
pub(super) struct Graphs {
    by_bucket: HashMap<BucketKey, CudaGraph>,
    said_full: bool,
}

impl Graphs {
    pub fn get(&self, key: &BucketKey) -> Option<&CudaGraph> {
        self.by_bucket.get(key)
    }

    /// Whether another graph may be captured; the first time not, says so on stderr.
    pub fn room(&mut self) -> bool {
        let room = self.by_bucket.len() < MAX_GRAPHS;
        if !room && !self.said_full {
            eprintln!(
                "warning: {MAX_GRAPHS} CUDA graphs captured for as many batch shapes; updates of further shapes \
                 launch their kernels one by one"
            );
            self.said_full = true;
        }
        room
    }

    pub fn insert(&mut self, key: BucketKey, graph: CudaGraph) {
        self.by_bucket.insert(key, graph);
    }

    pub fn len(&self) -> usize {
        self.by_bucket.len()
    }
}

/// Captures what `queue` puts on `stream` (nothing runs) into an instantiated graph. The capture is ended
/// whatever happens, so the stream stays usable after an error.
pub(super) fn capture(stream: &Arc<CudaStream>, queue: impl FnOnce() -> Result<()>) -> Result<CudaGraph> {
    // Thread-local: calls that may not be captured (a synchronisation, a pageable copy) fail when made from
    // this thread while it captures, instead of going unnoticed.
    stream.begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)?;
    let queued = queue();
    let graph = stream.end_capture(sys::CUgraphInstantiate_flags(0));
    queued.context("capturing the training step")?;
    graph?.context("the captured training step made no graph")
}
