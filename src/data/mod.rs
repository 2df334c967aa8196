//! Data: tasks and their files, tokenising, the synthetic task, and batching into the
//! `HostBatch` (defined in model/batch.rs, with the backbones that read it) the engine runs.

pub mod batch_json;
pub mod batching;
pub mod columnar;
pub mod metric;
pub mod readers;
pub mod synthetic;
pub mod tasks;
pub mod tokenize;

pub use crate::model::batch::{BatchSpec, EncoderInput, HostBatch};

/// One text-to-text example as token ids (EOS included).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Example {
    pub input: Vec<i32>,
    pub target: Vec<i32>,
}
