//! The frozen linear weights of a backbone: dense in the backend's dtype, or NF4 (`--quant nf4`),
//! dequantised into a scratch right before each GEMM that reads them (QLoRA's scheme: the weight
//! is stored at ~4.1 bits per value and only one layer's matrix is ever wide at a time).

use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::backend::nf4::{quantize_nf4, Nf4Tensor};
use crate::backend::{Backend, LinearDims};
use crate::error::{Error, Result};

/// How frozen linear weights are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Quant {
    /// The backend's dtype (f32 on the CPU, bf16 or f32 on a GPU).
    #[default]
    None,
    /// NF4 with double-quantised absmax, blocksize 64 (the bitsandbytes layout).
    Nf4,
}

impl FromStr for Quant {
    type Err = Error;

    fn from_str(s: &str) -> Result<Self> {
        match s {
            "none" => Ok(Quant::None),
            "nf4" => Ok(Quant::Nf4),
            other => Err(Error::Input(format!(
                "unknown quantisation {other:?}: expected none or nf4"
            ))),
        }
    }
}

/// A linear weight `(OC, IC)` as its source holds it: full precision, or already NF4 (a
/// bitsandbytes 4-bit checkpoint).
#[derive(Debug, Clone, PartialEq)]
pub enum LinearData {
    Dense(Vec<f32>), // (OC, IC)
    Nf4(Nf4Tensor),  // (OC, IC) quantised
}

/// A frozen linear weight `(OC, IC)` in PyTorch's layout.
pub enum Linear<B: Backend> {
    Dense(B::Tensor), // (OC, IC)
    Nf4(B::Nf4),      // (OC, IC) quantised
}

impl<B: Backend> Linear<B> {
    /// Uploads `data (OC, IC)`, quantising it first with [`Quant::Nf4`].
    pub fn load(be: &B, data: Vec<f32>, quant: Quant) -> Self {
        match quant {
            Quant::None => Linear::Dense(be.upload_f32(data)),
            Quant::Nf4 => Linear::Nf4(be.upload_nf4(quantize_nf4(&data))),
        }
    }

    /// Uploads `data`: a dense weight as [`Linear::load`] with `quant`, an NF4 one as it is
    /// (already quantised: `quant` cannot make it denser or quantise it again).
    pub fn from_data(be: &B, data: LinearData, quant: Quant) -> Self {
        match data {
            LinearData::Dense(w) => Self::load(be, w, quant),
            LinearData::Nf4(q) => Linear::Nf4(be.upload_nf4(q)),
        }
    }

    /// Bytes the weight occupies on its backend, given the bytes of one dense element.
    pub fn bytes(&self, be: &B, dense_element: usize) -> usize {
        match self {
            Linear::Dense(w) => be.len(w) * dense_element,
            Linear::Nf4(q) => be.nf4_bytes(q),
        }
    }

    /// Runs `f` on the dense weight: the stored tensor, or a scratch dequantised for this call.
    fn with_dense<R>(&self, be: &B, f: impl FnOnce(&B::Tensor) -> R) -> R {
        match self {
            Linear::Dense(w) => f(w),
            Linear::Nf4(q) => {
                let mut w = be.zeros(be.nf4_len(q)); // (OC, IC)
                be.nf4_dequantize(&mut w, q);
                f(&w)
            }
        }
    }

    /// `out (N, OC) = inp (N, IC) · wᵀ`.
    pub fn forward(&self, be: &B, out: &mut B::Tensor, inp: &B::Tensor, dims: LinearDims) {
        self.with_dense(be, |w| be.linear_forward(out, inp, w, dims));
    }

    /// `dinp (N, IC) (=, or += with accumulate) = dout (N, OC) · w`.
    pub fn backward_dinp(
        &self,
        be: &B,
        dinp: &mut B::Tensor,
        dout: &B::Tensor,
        accumulate: bool,
        dims: LinearDims,
    ) {
        self.with_dense(be, |w| {
            be.linear_backward_dinp(dinp, dout, w, accumulate, dims)
        });
    }
}
