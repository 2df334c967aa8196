//! Placeholder: being implemented.

use super::config::ResidualConfig;
use super::{MethodContext, Param, PromptMethod};
use crate::backend::Backend;
use crate::error::{Error, Result};

pub struct Residual<B: Backend> {
    params: Vec<Param<B>>,
}

impl<B: Backend> Residual<B> {
    pub fn new(_be: &B, _cfg: &ResidualConfig, _ctx: &MethodContext<'_>) -> Result<Self> {
        Err(Error::Input(
            "method residual is not implemented yet".into(),
        ))
    }
}

impl<B: Backend> PromptMethod<B> for Residual<B> {
    fn name(&self) -> &'static str {
        "residual"
    }
    fn prompt_rows(&self) -> usize {
        0
    }
    fn forward(&mut self, _be: &B) {}
    fn rows(&self) -> &B::Tensor {
        &self.params[0].value
    }
    fn backward(&mut self, _be: &B, _d_rows: &B::Tensor, _d_update: Option<&B::Tensor>) {}
    fn params(&self) -> &[Param<B>] {
        &self.params
    }
    fn params_mut(&mut self) -> &mut [Param<B>] {
        &mut self.params
    }
    fn stored_params(&self) -> usize {
        0
    }
}
