//! DPT, decomposed prompt tuning (Xiao et al. 2023): the prompt is a low-rank product
//!
//! rows (l, d) = A (l, b) · B (b, d).
//!
//! A and B start U(−0.5, 0.5) as in the official code (`init = "gaussian"`: N(0, 1)), each from its
//! own seeded stream. Train-time parameters l·b + b·d; inference may keep the factors or the
//! product, whichever is smaller: min(l·b + b·d, l·d).

use super::config::{DptConfig, DptInit};
use super::init::{normal, rng_for, uniform};
use super::{MethodContext, Param, ParamGroup, PromptMethod};
use crate::backend::{Backend, Gemm};
use crate::error::Result;

pub struct Dpt<B: Backend> {
    l: usize,
    d: usize,
    b: usize,
    params: Vec<Param<B>>, // [a (l, b), b (b, d)]
    rows: B::Tensor,       // (l, d)
}

impl<B: Backend> Dpt<B> {
    pub fn new(be: &B, cfg: &DptConfig, ctx: &MethodContext<'_>) -> Result<Self> {
        let (l, d, b) = (cfg.prompt_len, ctx.d_model, cfg.rank);
        let factor = |name: &str, shape: &[usize]| {
            let n = shape.iter().product();
            let mut rng = rng_for(ctx.seed, name);
            let data = match cfg.init {
                DptInit::Uniform => uniform(n, -0.5, 0.5, &mut rng),
                DptInit::Gaussian => normal(n, 1.0, &mut rng),
            };
            Param::new(be, name, shape, ParamGroup::Prompt, data)
        };
        Ok(Dpt {
            l,
            d,
            b,
            params: vec![factor("a", &[l, b]), factor("b", &[b, d])],
            rows: be.zeros(l * d),
        })
    }
}

impl<B: Backend> PromptMethod<B> for Dpt<B> {
    fn name(&self) -> &'static str {
        "dpt"
    }

    fn prompt_rows(&self) -> usize {
        self.l
    }

    fn forward(&mut self, be: &B) {
        let (a, b) = (&self.params[0].value, &self.params[1].value);
        be.matmul(&mut self.rows, a, b, Gemm::nn(self.l, self.d, self.b));
    }

    fn rows(&self) -> &B::Tensor {
        &self.rows
    }

    fn backward(&mut self, be: &B, d_rows: &B::Tensor, _d_update: Option<&B::Tensor>) {
        let (l, d, r) = (self.l, self.d, self.b);
        let (a, b) = self.params.split_at_mut(1);
        let (a, b) = (&mut a[0], &mut b[0]);
        // dA (l, b) += d_rows (l, d) · Bᵀ, B stored (b, d).
        be.matmul(
            &mut a.grad,
            d_rows,
            &b.value,
            Gemm::nt(l, r, d).accumulate(true),
        );
        // dB (b, d) += Aᵀ · d_rows, A stored (l, b).
        let g = Gemm {
            trans_a: true,
            ..Gemm::nn(r, d, l)
        };
        be.matmul(&mut b.grad, &a.value, d_rows, g.accumulate(true));
    }

    fn params(&self) -> &[Param<B>] {
        &self.params
    }

    fn params_mut(&mut self) -> &mut [Param<B>] {
        &mut self.params
    }

    fn stored_params(&self) -> usize {
        let (l, d, b) = (self.l, self.d, self.b);
        (l * b + b * d).min(l * d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prompt::testing::{check_method_gradients, with_context};
    use crate::prompt::MethodConfig;
    use crate::testing::rel_err;

    #[test]
    fn dpt_rows_are_a_times_b_and_gradients_pass_fd() {
        let (d, l, b) = (7, 5, 3);
        for init in [DptInit::Uniform, DptInit::Gaussian] {
            let cfg = DptConfig {
                prompt_len: l,
                rank: b,
                init,
            };
            with_context(d, 16, |be, ctx| {
                let mut m = Dpt::new(be, &cfg, ctx).unwrap();
                assert_eq!(m.params[0].name, "a");
                assert_eq!(m.params[1].name, "b");
                assert_eq!(
                    (&m.params[0].shape[..], &m.params[1].shape[..]),
                    (&[l, b][..], &[b, d][..])
                );
                if init == DptInit::Uniform {
                    assert!(m
                        .params
                        .iter()
                        .all(|p| p.value.iter().all(|x| x.abs() <= 0.5)));
                }
                // Different streams: A and B do not start from the same numbers.
                assert_ne!(m.params[0].value[..l * b], m.params[1].value[..l * b]);
                m.forward(be);
                let (av, bv) = (&m.params[0].value, &m.params[1].value);
                let mut want = vec![0.0; l * d];
                for i in 0..l {
                    for j in 0..d {
                        for k in 0..b {
                            want[i * d + j] += av[i * b + k] * bv[k * d + j];
                        }
                    }
                }
                assert!(rel_err(m.rows(), &want) < 1e-12);
                check_method_gradients(be, &mut m, &MethodConfig::Dpt(cfg.clone()), ctx);
            });
        }
    }

    #[test]
    fn dpt_stored_count_is_the_smaller_form() {
        // l·d = 4·7 = 28 < l·b + b·d = 4·3 + 3·7 = 33: the folded rows are smaller.
        let cfg = DptConfig {
            prompt_len: 4,
            rank: 3,
            init: DptInit::Uniform,
        };
        with_context(7, 16, |be, ctx| {
            let mut m = Dpt::new(be, &cfg, ctx).unwrap();
            assert_eq!(m.stored_params(), 28);
            check_method_gradients(be, &mut m, &MethodConfig::Dpt(cfg.clone()), ctx);
        });
    }

    #[test]
    fn dpt_counts_match_methods_md() {
        let cfg = MethodConfig::Dpt(DptConfig::default());
        let train: Vec<usize> = [512, 768, 1024]
            .iter()
            .map(|&d| cfg.param_counts(d, 256).train)
            .collect();
        assert_eq!(train, [6_120, 8_680, 11_240]);
        assert_eq!(cfg.param_counts(512, 256).stored, 6_120);
    }
}
