//! Training: AdamW with learning-rate groups, schedules, checkpoints, reports, the trainer loop.

pub mod checkpoint;
pub mod export;
pub mod optim;
pub mod predict;
pub mod report;
pub mod run_dir;
pub mod schedule;
pub mod trainer;
