//! The preference-comprehension (PCH) model of LEARN (SPEC §3): an adaptor linear layer, a post-LN BERT
//! encoder under a causal (or diagonal) mask, a linear head and L2 normalisation — the same module for the
//! user tower and the item tower. This is the CPU reference, forward and hand-written backward, generic over
//! f32 (real work) and f64 (gradient checks).

mod backward;
pub mod config;
mod layer;
mod model;
pub mod params;

pub use crate::cpu::masked_attention::MaskKind;
pub use backward::{backward, backward_to_content};
pub use config::{InputKind, ItemTower, PchConfig, Positions};
pub use model::{NORMALIZE_EPS, PchBatchShape, PchCache, PchInput, forward, forward_reusing};
pub use params::{PchParams, names_and_shapes, parameter_count};
