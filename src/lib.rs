//! fastpt: prompt tuning of frozen T5 and Llama models.
//!
//! The crate is organised as in docs/architecture.md: `backend` holds the ops (the CPU reference
//! first), `model` the backbones and their loading, and the binary `fastpt` (src/main.rs) the CLI.

pub mod backend;
pub mod bench;
pub mod config;
pub mod data;
pub mod doctor;
pub mod engine;
pub mod error;
pub mod eval;
pub mod fsutil;
pub mod model;
pub mod prompt;
#[doc(hidden)]
pub mod testing;
pub mod train;

pub use error::{Error, Result};
