//! User behaviour data: the sequences files of SPEC §4.1 and the interactions tables they are built from.

pub mod interactions;
pub mod sequences;
