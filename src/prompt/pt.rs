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

#[cfg(test)]
mod save_load_tests {
    use crate::prompt::testing::with_context;
    use crate::prompt::{build_method, load_params, save_params, MethodConfig};

    #[test]
    fn saved_parameters_load_back_into_a_fresh_method_and_mismatches_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("method.safetensors");
        with_context(7, 16, |be, ctx| {
            let cfg = MethodConfig::from_toml("dpt", "prompt_len = 5\nrank = 2").unwrap();
            let mut a = build_method(be, &cfg, ctx).unwrap();
            a.params_mut()[0].value[0] = 42.0; // differs from any fresh init
            save_params(be, a.as_ref(), &path).unwrap();
            let mut b = build_method(be, &cfg, ctx).unwrap();
            assert_ne!(b.params()[0].value, a.params()[0].value);
            load_params(be, b.as_mut(), &path).unwrap();
            for (pa, pb) in a.params().iter().zip(b.params()) {
                // f32 on disk: equal to f32 precision.
                let err = crate::testing::rel_err(&pa.value, &pb.value);
                assert!(err < 1e-7, "{}: {err}", pa.name);
            }
            // Another shape: the error names the file, tensor and both shapes.
            let other = MethodConfig::from_toml("dpt", "prompt_len = 5\nrank = 3").unwrap();
            let mut c = build_method(be, &other, ctx).unwrap();
            let err = load_params(be, c.as_mut(), &path).unwrap_err().to_string();
            assert!(
                err.contains("method.safetensors")
                    && err.contains("[5, 3]")
                    && err.contains("[5, 2]"),
                "{err}"
            );
            // Another method: its parameters are missing.
            let mut d = build_method(
                be,
                &MethodConfig::from_toml("pt", "prompt_len = 5").unwrap(),
                ctx,
            )
            .unwrap();
            let err = load_params(be, d.as_mut(), &path).unwrap_err().to_string();
            assert!(
                err.contains("missing tensors") && err.contains("prompt"),
                "{err}"
            );
        });
    }
}
