//! The library's error type. Every error that comes from user input names the file, the field
//! or tensor, and the bad value, so a user can fix the input without reading the code.

use std::path::PathBuf;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be opened or read.
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        // Not a `#[source]`: the message already includes it, and a chain would print it twice.
        error: std::io::Error,
    },

    /// A file was read but its content is malformed (corrupt JSON, truncated safetensors, ...).
    #[error("{path}: {msg}")]
    Format { path: PathBuf, msg: String },

    /// A config field is missing, has the wrong type, or is out of range.
    #[error("{path}: field `{field}`: {msg}")]
    Config {
        path: PathBuf,
        field: String,
        msg: String,
    },

    /// Tensors the model needs are absent from the checkpoint.
    #[error("{path}: missing tensors ({count}): {}", names.join(", "))]
    MissingTensors {
        path: PathBuf,
        count: usize,
        names: Vec<String>,
    },

    /// A tensor exists but has the wrong shape.
    #[error("{path}: tensor `{name}`: expected shape {expected:?}, found {found:?}")]
    Shape {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },

    /// A tensor is stored in a dtype fastpt cannot convert.
    #[error(
        "{path}: tensor `{name}`: unsupported dtype {dtype} (fastpt reads F32, F64, BF16 and F16)"
    )]
    Dtype {
        path: PathBuf,
        name: String,
        dtype: String,
    },

    /// Bad input that is not a file (a batch with inconsistent lengths, an unknown shape name, ...).
    #[error("{0}")]
    Input(String),

    // Run folders and checkpoints (issue 19, trainer).
    /// A checkpoint field outside what the run allows (step past train.steps, cursor past the
    /// data, a non-finite value, ...).
    #[error("{path}: checkpoint field `{field}` = {value}: {limit}")]
    Checkpoint {
        path: PathBuf,
        field: String,
        value: String,
        limit: String,
    },

    /// A run folder a command cannot use: files fastpt did not write, another run's results,
    /// a folder in use by another process.
    #[error("{path}: {msg}")]
    RunFolder { path: PathBuf, msg: String },

    // Memory (issue 19, sizes).
    /// The memory estimate of a model, step or run (model/memory.rs) exceeds what the machine
    /// has available: refused before anything is loaded.
    #[error("{what}: {msg}")]
    Memory { what: String, msg: String },

    // Non-finite results (issue 19, numerics).
    /// A step's result is NaN or infinite (`fastpt forward`, `fastpt step`): `what` names the
    /// quantity and where it came from, `value` is what it was.
    #[error("{what} is {value} (not finite): {hint}")]
    NonFinite {
        what: String,
        value: f64,
        hint: String,
    },

    // Data-parallel runs (issue 22).
    /// A collective across ranks failed or the ranks disagree: another rank stopped, the
    /// parameters diverged, a launch of several ranks without MPI.
    #[error("{0}")]
    Ranks(String),
}

impl Error {
    pub fn io(path: impl Into<PathBuf>, error: std::io::Error) -> Self {
        Error::Io {
            path: path.into(),
            error,
        }
    }

    pub fn format(path: impl Into<PathBuf>, msg: impl Into<String>) -> Self {
        Error::Format {
            path: path.into(),
            msg: msg.into(),
        }
    }

    pub fn config(
        path: impl Into<PathBuf>,
        field: impl Into<String>,
        msg: impl Into<String>,
    ) -> Self {
        Error::Config {
            path: path.into(),
            field: field.into(),
            msg: msg.into(),
        }
    }
}
