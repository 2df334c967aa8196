//! Placeholder: being implemented.

use super::config::XptConfig;
use super::{MethodContext, Param, PromptMethod};
use crate::backend::Backend;
use crate::error::{Error, Result};

pub struct Xpt<B: Backend> {
    params: Vec<Param<B>>,
}

impl<B: Backend> Xpt<B> {
    pub fn new(_be: &B, _cfg: &XptConfig, _ctx: &MethodContext<'_>) -> Result<Self> {
        Err(Error::Input("method xpt is not implemented yet".into()))
    }
}

impl<B: Backend> PromptMethod<B> for Xpt<B> {
    fn name(&self) -> &'static str {
        "xpt"
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
