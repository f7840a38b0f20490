//! The frozen content-embedding LLM (Baichuan2 layout, SPEC §2): its config, its memory-mapped weights and the
//! f32 CPU reference forward pass with mean pooling.

pub mod config;
pub mod model;
pub mod weights;

pub use config::LlmConfig;
pub use model::Llm;
pub use weights::{LlmWeights, WeightDtype};
