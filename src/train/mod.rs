//! PCH training (SPEC §4): samples, the dense all-action InfoNCE loss, Adam and the schedule, checkpoints.

pub mod batch;
pub mod checkpoint;
pub mod engine;
pub mod loss_scale;
pub mod optim;
pub mod run;
pub mod schedule;
