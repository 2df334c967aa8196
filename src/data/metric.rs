//! The names of the papers' metrics: what a task declares (data/) and what eval/ computes.
//! Defined here, below both, so that data/ does not import eval/.

use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// A task's metric; one metric may report several numbers (Pearson and Spearman, F1a and EM).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Metric {
    /// Exact match after [`normalize`].
    Accuracy,
    /// Binary F1 of the positive class (the task's second label, index 1).
    F1,
    /// F1 averaged over the task's labels (CB).
    F1Macro,
    /// Matthews correlation (CoLA).
    Matthews,
    /// Pearson and Spearman correlation of predicted and gold numbers (STS-B).
    PearsonSpearman,
    /// MultiRC: F1 over all answer options (F1a) and exact match per question.
    MultiRc,
    /// ReCoRD: token F1 and exact match, each the best over the gold answers.
    Record,
}

impl Metric {
    pub const ALL: [Metric; 7] = [
        Metric::Accuracy,
        Metric::F1,
        Metric::F1Macro,
        Metric::Matthews,
        Metric::PearsonSpearman,
        Metric::MultiRc,
        Metric::Record,
    ];

    /// The name in configs and reports.
    pub fn name(self) -> &'static str {
        match self {
            Metric::Accuracy => "accuracy",
            Metric::F1 => "f1",
            Metric::F1Macro => "f1_macro",
            Metric::Matthews => "matthews",
            Metric::PearsonSpearman => "pearson_spearman",
            Metric::MultiRc => "multirc",
            Metric::Record => "record",
        }
    }
}

impl FromStr for Metric {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        Metric::ALL
            .into_iter()
            .find(|m| m.name() == s)
            .ok_or_else(|| {
                let names: Vec<&str> = Metric::ALL.iter().map(|m| m.name()).collect();
                Error::Input(format!(
                    "unknown metric {s:?}; the metrics are {}",
                    names.join(", ")
                ))
            })
    }
}
