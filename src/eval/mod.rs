//! Evaluation (SPEC §5): the trained towers as embedding functions, top-K retrieval over a gallery, and the
//! H@K / R@K / N@K metrics beside a most-popular baseline.

pub mod gpu;
pub mod metrics;
pub mod run;
pub mod topk;
pub mod towers;
