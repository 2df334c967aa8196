//! Residual prompt tuning (Razdaibiedina et al. 2023): a bottleneck MLP with LayerNorm and a skip
//! connection around the prompt,
//!
//! rows (l, d) = LayerNorm(W2·ReLU(W1·P + b1) + b2) + P,
//!
//! P (l, d), W1 (h, d), b1 (h), W2 (d, h), b2 (d) (PyTorch (out, in) layout), LayerNorm over d with
//! γ, β (d), eps 1e-5 (PyTorch's default). Train-time parameters l·d + (d·h + h) + (h·d + d) + 2d;
//! stored l·d, since the network depends on P alone and folds into the rows after training.

use super::config::ResidualConfig;
use super::init::{linear_default, rng_for};
use super::pt::init_prompt;
use super::{MethodContext, Param, ParamGroup, PromptMethod};
use crate::backend::{Activation, Backend, LayerNormDims, LinearDims};
use crate::error::Result;

/// PyTorch's `nn.LayerNorm` default.
const LN_EPS: f64 = 1e-5;

// Indices into `params`.
const PROMPT: usize = 0;
const DOWN_W: usize = 1;
const DOWN_B: usize = 2;
const UP_W: usize = 3;
const UP_B: usize = 4;
const NORM_W: usize = 5;
const NORM_B: usize = 6;

pub struct Residual<B: Backend> {
    l: usize,
    d: usize,
    h: usize,
    /// [prompt (l, d), down.weight (h, d), down.bias (h), up.weight (d, h), up.bias (d),
    /// norm.weight (d), norm.bias (d)]
    params: Vec<Param<B>>,
    z1: B::Tensor,   // (l, h): P·W1ᵀ + b1, kept for the ReLU backward
    a1: B::Tensor,   // (l, h): ReLU(z1), the up projection's input
    z2: B::Tensor,   // (l, d): a1·W2ᵀ + b2, the LayerNorm's input
    mean: B::Tensor, // (l): LayerNorm statistics saved for the backward
    rstd: B::Tensor, // (l)
    rows: B::Tensor, // (l, d)
    d_z2: B::Tensor, // (l, d) scratch
    d_a1: B::Tensor, // (l, h) scratch
    d_z1: B::Tensor, // (l, h) scratch
}

impl<B: Backend> Residual<B> {
    pub fn new(be: &B, cfg: &ResidualConfig, ctx: &MethodContext<'_>) -> Result<Self> {
        let (l, d, h) = (cfg.prompt_len, ctx.d_model, cfg.bottleneck);
        let prompt = init_prompt(l, cfg.init, &cfg.init_text, ctx, "prompt")?;
        // nn.Linear's default init, fan_in = that layer's input width; one stream per tensor.
        let linear = |name: &str, shape: &[usize], fan_in: usize| {
            let n = shape.iter().product();
            let data = linear_default(n, fan_in, &mut rng_for(ctx.seed, name));
            Param::new(be, name, shape, ParamGroup::Prompt, data)
        };
        let params = vec![
            Param::new(be, "prompt", &[l, d], ParamGroup::Prompt, prompt),
            linear("down.weight", &[h, d], d),
            linear("down.bias", &[h], d),
            linear("up.weight", &[d, h], h),
            linear("up.bias", &[d], h),
            // nn.LayerNorm: γ = 1, β = 0.
            Param::new(be, "norm.weight", &[d], ParamGroup::Prompt, vec![1.0; d]),
            Param::new(be, "norm.bias", &[d], ParamGroup::Prompt, vec![0.0; d]),
        ];
        Ok(Residual {
            l,
            d,
            h,
            params,
            z1: be.zeros(l * h),
            a1: be.zeros(l * h),
            z2: be.zeros(l * d),
            mean: be.zeros(l),
            rstd: be.zeros(l),
            rows: be.zeros(l * d),
            d_z2: be.zeros(l * d),
            d_a1: be.zeros(l * h),
            d_z1: be.zeros(l * h),
        })
    }
}

impl<B: Backend> PromptMethod<B> for Residual<B> {
    fn name(&self) -> &'static str {
        "residual"
    }

    fn prompt_rows(&self) -> usize {
        self.l
    }

    fn forward(&mut self, be: &B) {
        let (l, d, h) = (self.l, self.d, self.h);
        let p = &self.params;
        be.linear_forward(
            &mut self.z1,
            &p[PROMPT].value,
            &p[DOWN_W].value,
            LinearDims::new(l, d, h),
        );
        be.add_bias(&mut self.z1, &p[DOWN_B].value, l, h);
        be.gated_act_forward(&mut self.a1, &self.z1, None, Activation::Relu, l * h);
        be.linear_forward(
            &mut self.z2,
            &self.a1,
            &p[UP_W].value,
            LinearDims::new(l, h, d),
        );
        be.add_bias(&mut self.z2, &p[UP_B].value, l, d);
        be.layernorm_forward(
            &mut self.rows,
            &mut self.mean,
            &mut self.rstd,
            &self.z2,
            &p[NORM_W].value,
            &p[NORM_B].value,
            LN_EPS,
            LayerNormDims { n: l, c: d },
        );
        // The skip connection.
        be.add_assign(&mut self.rows, &p[PROMPT].value);
    }

    fn rows(&self) -> &B::Tensor {
        &self.rows
    }

    fn backward(&mut self, be: &B, d_rows: &B::Tensor, _d_update: Option<&B::Tensor>) {
        let (l, d, h) = (self.l, self.d, self.h);
        // Split at the LayerNorm so that γ's value and γ, β's grads can be borrowed together.
        let (net, norm) = self.params.split_at_mut(NORM_W);
        let (gamma, beta) = norm.split_at_mut(1);
        let (gamma, beta) = (&mut gamma[0], &mut beta[0]);
        be.layernorm_backward(
            &mut self.d_z2,
            &mut gamma.grad,
            &mut beta.grad,
            d_rows,
            &self.z2,
            &gamma.value,
            &self.mean,
            &self.rstd,
            LayerNormDims { n: l, c: d },
        );

        // Up projection: z2 = a1·W2ᵀ + b2.
        be.linear_backward_dweight(
            &mut net[UP_W].grad,
            &self.d_z2,
            &self.a1,
            LinearDims::new(l, h, d),
        );
        be.bias_backward(&mut net[UP_B].grad, &self.d_z2, l, d);
        be.linear_backward_dinp(
            &mut self.d_a1,
            &self.d_z2,
            &net[UP_W].value,
            false,
            LinearDims::new(l, h, d),
        );
        let relu = Activation::Relu;
        be.gated_act_backward_dinp(
            &mut self.d_z1,
            None,
            &self.d_a1,
            &self.z1,
            None,
            relu,
            l * h,
        );

        // Down projection: z1 = P·W1ᵀ + b1.
        let (prompt, net) = net.split_at_mut(DOWN_W);
        let prompt = &mut prompt[PROMPT];
        // net is now [down.weight, down.bias, up.weight, up.bias]: shift the indices by one.
        be.linear_backward_dweight(
            &mut net[DOWN_W - 1].grad,
            &self.d_z1,
            &prompt.value,
            LinearDims::new(l, d, h),
        );
        be.bias_backward(&mut net[DOWN_B - 1].grad, &self.d_z1, l, h);
        // P gets both the skip connection's gradient and the network's.
        be.add_assign(&mut prompt.grad, d_rows);
        be.linear_backward_dinp(
            &mut prompt.grad,
            &self.d_z1,
            &net[DOWN_W - 1].value,
            true,
            LinearDims::new(l, d, h),
        );
    }

    fn params(&self) -> &[Param<B>] {
        &self.params
    }

    fn params_mut(&mut self) -> &mut [Param<B>] {
        &mut self.params
    }

    fn stored_params(&self) -> usize {
        // The network is folded away: inference keeps the l rows only.
        self.l * self.d
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prompt::config::PromptInit;
    use crate::prompt::testing::{check_method_gradients, with_context};
    use crate::prompt::MethodConfig;
    use crate::testing::{random_vec, rel_err};

    /// The definition, with plain loops on host vectors.
    fn host_rows(p: &[Vec<f64>], l: usize, d: usize, h: usize) -> Vec<f64> {
        let (prompt, w1, b1, w2, b2, g, bt) = (&p[0], &p[1], &p[2], &p[3], &p[4], &p[5], &p[6]);
        let mut rows = vec![0.0; l * d];
        for i in 0..l {
            let a1: Vec<f64> = (0..h)
                .map(|j| {
                    let s: f64 = (0..d).map(|k| prompt[i * d + k] * w1[j * d + k]).sum();
                    (s + b1[j]).max(0.0)
                })
                .collect();
            let z2: Vec<f64> = (0..d)
                .map(|o| b2[o] + (0..h).map(|j| a1[j] * w2[o * h + j]).sum::<f64>())
                .collect();
            let mu = z2.iter().sum::<f64>() / d as f64;
            let var = z2.iter().map(|x| (x - mu).powi(2)).sum::<f64>() / d as f64;
            for o in 0..d {
                let ln = (z2[o] - mu) / (var + 1e-5).sqrt() * g[o] + bt[o];
                rows[i * d + o] = ln + prompt[i * d + o];
            }
        }
        rows
    }

    #[test]
    fn residual_matches_the_definition_and_gradients_pass_fd() {
        let (l, d, h) = (5, 7, 3);
        for init in [PromptInit::Vocab, PromptInit::Uniform, PromptInit::Text] {
            let cfg = ResidualConfig {
                prompt_len: l,
                bottleneck: h,
                init,
                init_text: "hello world".into(),
            };
            with_context(d, 16, |be, ctx| {
                let mut m = Residual::new(be, &cfg, ctx).unwrap();
                let names: Vec<&str> = m.params.iter().map(|p| p.name.as_str()).collect();
                assert_eq!(
                    names,
                    [
                        "prompt",
                        "down.weight",
                        "down.bias",
                        "up.weight",
                        "up.bias",
                        "norm.weight",
                        "norm.bias"
                    ]
                );
                assert!(m.params[NORM_W].value.iter().all(|&x| x == 1.0));
                assert!(m.params[NORM_B].value.iter().all(|&x| x == 0.0));
                m.forward(be);
                let values: Vec<Vec<f64>> = m.params.iter().map(|p| p.value.clone()).collect();
                assert!(rel_err(m.rows(), &host_rows(&values, l, d, h)) < 1e-12);
                check_method_gradients(be, &mut m, &MethodConfig::Residual(cfg.clone()), ctx);

                // γ ≠ 1, β ≠ 0: the forward still follows the definition, and the FD check
                // exercises LayerNorm's input gradient away from the identity affine.
                m.params[NORM_W].value = random_vec(d, 1.0, 11);
                m.params[NORM_B].value = random_vec(d, 1.0, 12);
                m.forward(be);
                let values: Vec<Vec<f64>> = m.params.iter().map(|p| p.value.clone()).collect();
                assert!(rel_err(m.rows(), &host_rows(&values, l, d, h)) < 1e-12);
                check_method_gradients(be, &mut m, &MethodConfig::Residual(cfg.clone()), ctx);
            });
        }
    }

    #[test]
    fn residual_counts_match_methods_md() {
        let counts = |l: usize| -> Vec<usize> {
            let cfg = MethodConfig::Residual(ResidualConfig {
                prompt_len: l,
                ..ResidualConfig::default()
            });
            [512, 768, 1024]
                .iter()
                .map(|&d| cfg.param_counts(d, 256).train)
                .collect()
        };
        let default = ResidualConfig::default();
        assert_eq!((default.prompt_len, default.bottleneck), (100, 400));
        assert_eq!(counts(100), [462_736, 693_904, 925_072]);
        assert_eq!(counts(10), [416_656, 624_784, 832_912]);
    }
}
