//! The device side of the embed job: something that turns batches of token ids into content embeddings.
//! The CPU reference and the CUDA engine both implement it, so the job itself knows nothing of devices.

use anyhow::Result;

pub trait ContentEncoder {
    /// Width of the embeddings (the model's hidden size).
    fn dim(&self) -> usize;

    /// Mean-pooled, L2-normalised embeddings of a batch of sequences, row-major `[seqs.len(), dim]`.
    fn encode(&mut self, seqs: &[&[u32]]) -> Result<Vec<f32>>;

    /// One line for logs and `meta.json`: which device and how it runs.
    fn describe(&self) -> String;

    /// Queues a batch. When an earlier batch has finished meanwhile, its embeddings replace the contents of
    /// `done` and the result is true; batches come back in the order they were queued. An encoder that works
    /// asynchronously (the GPU) returns the previous batch here, so the caller's work on it (writing the
    /// store, receiving the next batch) overlaps the device's work on this one. The default encodes at once
    /// and returns this batch.
    fn submit(&mut self, seqs: &[&[u32]], done: &mut Vec<f32>) -> Result<bool> {
        *done = self.encode(seqs)?;
        Ok(true)
    }

    /// Waits for the oldest batch still queued and puts its embeddings in `done` (true), or returns false
    /// when none is queued.
    fn flush(&mut self, done: &mut Vec<f32>) -> Result<bool> {
        let _ = done;
        Ok(false)
    }
}

/// The CPU reference forward pass as an encoder.
pub struct CpuEncoder<'a> {
    pub llm: &'a crate::llm::model::Llm,
}

impl ContentEncoder for CpuEncoder<'_> {
    fn dim(&self) -> usize {
        self.llm.config().hidden_size
    }

    fn encode(&mut self, seqs: &[&[u32]]) -> Result<Vec<f32>> {
        Ok(self.llm.embed(seqs)?.concat())
    }

    fn describe(&self) -> String {
        format!("cpu ({} threads)", rayon::current_num_threads())
    }
}
