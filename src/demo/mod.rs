//! `learn-kern demo`: the embedded default job, on data it generates itself.

pub mod catalogue;
pub mod users;
