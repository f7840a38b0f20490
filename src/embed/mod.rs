//! Content-embedding generation (CEG, SPEC §2): item catalogue → LLM → mean-pooled, L2-normalised
//! embeddings in a resumable store.

pub mod batching;
pub mod encoder;
pub mod items;
pub mod job;
pub mod merge;
pub mod store;
pub mod text;
