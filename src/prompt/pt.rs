//! PT, prompt tuning (Lester et al. 2021): the prompt rows are the parameter P (l, d) itself.

use super::config::{PromptInit, PtConfig};
use super::init::{rng_for, text_rows, uniform, vocab_rows};
use super::{MethodContext, Param, ParamGroup, PromptMethod};
use crate::backend::Backend;
use crate::error::Result;

/// `l` prompt rows `(l, d)` initialised as `init` says; shared by the methods that start from a
/// prompt matrix (PT, P-Tuning, Residual, DePT, EPT-MS, LAMP).
pub fn init_prompt(
    l: usize,
    init: PromptInit,
    init_text: &str,
    ctx: &MethodContext<'_>,
    name: &str,
) -> Result<Vec<f32>> {
    let mut rng = rng_for(ctx.seed, name);
    match init {
        PromptInit::Vocab => vocab_rows(l, ctx, &mut rng),
        PromptInit::Uniform => Ok(uniform(l * ctx.d_model, -0.5, 0.5, &mut rng)),
        PromptInit::Text => text_rows(l, init_text, ctx),
    }
}

pub struct Pt<B: Backend> {
    params: Vec<Param<B>>, // [P (l, d)]
}

impl<B: Backend> Pt<B> {
    pub fn new(be: &B, cfg: &PtConfig, ctx: &MethodContext<'_>) -> Result<Self> {
        let (l, d) = (cfg.prompt_len, ctx.d_model);
        let data = init_prompt(l, cfg.init, &cfg.init_text, ctx, "prompt")?;
        Ok(Pt {
            params: vec![Param::new(be, "prompt", &[l, d], ParamGroup::Prompt, data)],
        })
    }
}

impl<B: Backend> PromptMethod<B> for Pt<B> {
    fn name(&self) -> &'static str {
        "pt"
    }

    fn prompt_rows(&self) -> usize {
        self.params[0].shape[0]
    }

    fn forward(&mut self, _be: &B) {}

    fn rows(&self) -> &B::Tensor {
        &self.params[0].value
    }

    fn backward(&mut self, be: &B, d_rows: &B::Tensor, _d_update: Option<&B::Tensor>) {
        be.add_assign(&mut self.params[0].grad, d_rows);
    }

    fn params(&self) -> &[Param<B>] {
        &self.params
    }

    fn params_mut(&mut self) -> &mut [Param<B>] {
        &mut self.params
    }

    fn stored_params(&self) -> usize {
        self.params[0].numel()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prompt::testing::{check_method_gradients, with_context};
    use crate::prompt::MethodConfig;

    #[test]
    fn pt_rows_are_the_prompt_and_gradients_pass_fd() {
        for init in [PromptInit::Vocab, PromptInit::Uniform, PromptInit::Text] {
            let cfg = PtConfig {
                prompt_len: 5,
                init,
                init_text: "hello world".into(),
            };
            with_context(7, 16, |be, ctx| {
                let mut m = Pt::new(be, &cfg, ctx).unwrap();
                m.forward(be);
                assert_eq!(m.rows(), &m.params[0].value);
                check_method_gradients(be, &mut m, &MethodConfig::Pt(cfg.clone()), ctx);
            });
        }
    }
}
