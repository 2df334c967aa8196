//! P-Tuning (Liu et al. 2021) with PEFT's `PromptEncoder` MLP head:
//!
//! rows (l, d) = L3(ReLU(L2(ReLU(L1(P))))),   P (l, d),
//!
//! each Lk a d→d `nn.Linear` with bias: weight (d, d) in PyTorch's (out, in) layout, bias (d).
//! Train-time parameters l·d + 3(d² + d); stored l·d, because the MLP depends on P alone: once
//! trained, the rows are computed once and saved as a plain prompt.
//! PEFT names the layers `mlp_head.{0,2,4}` (its `Sequential` counts the ReLUs); here they are
//! `mlp.{0,1,2}`.

use super::config::PTuningConfig;
use super::init::{linear_default, rng_for};
use super::pt::init_prompt;
use super::{MethodContext, Param, ParamGroup, PromptMethod};
use crate::backend::{Activation, Backend, LinearDims};
use crate::error::Result;

/// Index of P in `params`; layer k (0, 1, 2) has its weight at `1 + 2k` and bias at `2 + 2k`.
const PROMPT: usize = 0;

pub struct PTuning<B: Backend> {
    l: usize,
    d: usize,
    /// [prompt (l, d), mlp.0.weight (d, d), mlp.0.bias (d), mlp.1.weight (d, d), mlp.1.bias (d),
    /// mlp.2.weight (d, d), mlp.2.bias (d)]
    params: Vec<Param<B>>,
    pre: [B::Tensor; 2], // (l, d) each: L1(P) and L2(act[0]), before the ReLU (for its backward)
    act: [B::Tensor; 2], // (l, d) each: ReLU(pre[k]), the input of the next layer
    rows: B::Tensor,     // (l, d): L3(act[1])
    d_act: B::Tensor,    // (l, d) scratch: gradient of a layer's output after the ReLU
    d_pre: B::Tensor,    // (l, d) scratch: gradient before the ReLU
}

impl<B: Backend> PTuning<B> {
    pub fn new(be: &B, cfg: &PTuningConfig, ctx: &MethodContext<'_>) -> Result<Self> {
        let (l, d) = (cfg.prompt_len, ctx.d_model);
        let prompt = init_prompt(l, cfg.init, &cfg.init_text, ctx, "prompt")?;
        let mut params = vec![Param::new(
            be,
            "prompt",
            &[l, d],
            ParamGroup::Prompt,
            prompt,
        )];
        for k in 0..3 {
            // PyTorch's nn.Linear default for both weight and bias, fan_in = d; one stream each.
            for (name, shape) in [
                (format!("mlp.{k}.weight"), vec![d, d]),
                (format!("mlp.{k}.bias"), vec![d]),
            ] {
                let n = shape.iter().product();
                let data = linear_default(n, d, &mut rng_for(ctx.seed, &name));
                params.push(Param::new(be, &name, &shape, ParamGroup::Prompt, data));
            }
        }
        Ok(PTuning {
            l,
            d,
            params,
            pre: [be.zeros(l * d), be.zeros(l * d)],
            act: [be.zeros(l * d), be.zeros(l * d)],
            rows: be.zeros(l * d),
            d_act: be.zeros(l * d),
            d_pre: be.zeros(l * d),
        })
    }
}

/// `out (n, oc) = inp (n, ic) · wᵀ + b`, `w (oc, ic)`, `b (oc)`.
fn linear_bias<B: Backend>(
    be: &B,
    out: &mut B::Tensor,
    inp: &B::Tensor,
    w: &B::Tensor,
    b: &B::Tensor,
    dims: LinearDims,
) {
    be.linear_forward(out, inp, w, dims);
    be.add_bias(out, b, dims.n, dims.oc);
}

impl<B: Backend> PromptMethod<B> for PTuning<B> {
    fn name(&self) -> &'static str {
        "ptuning"
    }

    fn prompt_rows(&self) -> usize {
        self.l
    }

    fn forward(&mut self, be: &B) {
        let (l, d) = (self.l, self.d);
        let p = &self.params;
        let [pre0, pre1] = &mut self.pre;
        let [act0, act1] = &mut self.act;
        linear_bias(
            be,
            pre0,
            &p[PROMPT].value,
            &p[1].value,
            &p[2].value,
            LinearDims::new(l, d, d),
        );
        be.gated_act_forward(act0, pre0, None, Activation::Relu, l * d);
        linear_bias(
            be,
            pre1,
            act0,
            &p[3].value,
            &p[4].value,
            LinearDims::new(l, d, d),
        );
        be.gated_act_forward(act1, pre1, None, Activation::Relu, l * d);
        linear_bias(
            be,
            &mut self.rows,
            act1,
            &p[5].value,
            &p[6].value,
            LinearDims::new(l, d, d),
        );
    }

    fn rows(&self) -> &B::Tensor {
        &self.rows
    }

    fn backward(&mut self, be: &B, d_rows: &B::Tensor, _d_update: Option<&B::Tensor>) {
        let (l, d) = (self.l, self.d);
        // Split so that P's value (layer 1's input) and the layers' grads can be borrowed together.
        let (prompt, mlp) = self.params.split_at_mut(1);
        let prompt = &mut prompt[0];
        let relu = Activation::Relu;

        // Layer 3: rows = act[1]·W3ᵀ + b3.
        be.linear_backward_dweight(
            &mut mlp[4].grad,
            d_rows,
            &self.act[1],
            LinearDims::new(l, d, d),
        );
        be.bias_backward(&mut mlp[5].grad, d_rows, l, d);
        be.linear_backward_dinp(
            &mut self.d_act,
            d_rows,
            &mlp[4].value,
            false,
            LinearDims::new(l, d, d),
        );
        be.gated_act_backward_dinp(
            &mut self.d_pre,
            None,
            &self.d_act,
            &self.pre[1],
            None,
            relu,
            l * d,
        );

        // Layer 2: pre[1] = act[0]·W2ᵀ + b2.
        be.linear_backward_dweight(
            &mut mlp[2].grad,
            &self.d_pre,
            &self.act[0],
            LinearDims::new(l, d, d),
        );
        be.bias_backward(&mut mlp[3].grad, &self.d_pre, l, d);
        be.linear_backward_dinp(
            &mut self.d_act,
            &self.d_pre,
            &mlp[2].value,
            false,
            LinearDims::new(l, d, d),
        );
        be.gated_act_backward_dinp(
            &mut self.d_pre,
            None,
            &self.d_act,
            &self.pre[0],
            None,
            relu,
            l * d,
        );

        // Layer 1: pre[0] = P·W1ᵀ + b1; P's gradient accumulates straight into its grad.
        be.linear_backward_dweight(
            &mut mlp[0].grad,
            &self.d_pre,
            &prompt.value,
            LinearDims::new(l, d, d),
        );
        be.bias_backward(&mut mlp[1].grad, &self.d_pre, l, d);
        be.linear_backward_dinp(
            &mut prompt.grad,
            &self.d_pre,
            &mlp[0].value,
            true,
            LinearDims::new(l, d, d),
        );
    }

    fn params(&self) -> &[Param<B>] {
        &self.params
    }

    fn params_mut(&mut self) -> &mut [Param<B>] {
        &mut self.params
    }

    fn stored_params(&self) -> usize {
        // The MLP is folded away: inference keeps the l rows only.
        self.l * self.d
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prompt::config::PromptInit;
    use crate::prompt::testing::{check_method_gradients, with_context};
    use crate::prompt::MethodConfig;
    use crate::testing::rel_err;

    /// `x (n, d) · wᵀ + b` with `w (d, d)`, then ReLU when asked, on host vectors.
    fn host_linear(x: &[f64], w: &[f64], b: &[f64], n: usize, d: usize, relu: bool) -> Vec<f64> {
        let mut y = vec![0.0; n * d];
        for i in 0..n {
            for o in 0..d {
                let mut s = b[o];
                for k in 0..d {
                    s += x[i * d + k] * w[o * d + k];
                }
                y[i * d + o] = if relu { s.max(0.0) } else { s };
            }
        }
        y
    }

    #[test]
    fn ptuning_matches_the_mlp_and_gradients_pass_fd() {
        for init in [PromptInit::Vocab, PromptInit::Uniform, PromptInit::Text] {
            let cfg = PTuningConfig {
                prompt_len: 5,
                init,
                init_text: "hello world".into(),
            };
            with_context(7, 16, |be, ctx| {
                let mut m = PTuning::new(be, &cfg, ctx).unwrap();
                let names: Vec<&str> = m.params.iter().map(|p| p.name.as_str()).collect();
                assert_eq!(
                    names,
                    [
                        "prompt",
                        "mlp.0.weight",
                        "mlp.0.bias",
                        "mlp.1.weight",
                        "mlp.1.bias",
                        "mlp.2.weight",
                        "mlp.2.bias"
                    ]
                );
                m.forward(be);
                let (l, d) = (5, 7);
                let v = |i: usize| &m.params[i].value;
                let h1 = host_linear(v(0), v(1), v(2), l, d, true);
                let h2 = host_linear(&h1, v(3), v(4), l, d, true);
                let want = host_linear(&h2, v(5), v(6), l, d, false);
                assert!(rel_err(m.rows(), &want) < 1e-12);
                check_method_gradients(be, &mut m, &MethodConfig::PTuning(cfg.clone()), ctx);
            });
        }
    }

    #[test]
    fn ptuning_counts_match_methods_md() {
        let cfg = MethodConfig::PTuning(PTuningConfig::default());
        let train: Vec<usize> = [512, 768, 1024]
            .iter()
            .map(|&d| cfg.param_counts(d, 256).train)
            .collect();
        assert_eq!(train, [793_088, 1_779_456, 3_159_040]);
        assert_eq!(cfg.param_counts(768, 256).stored, 10 * 768);
    }
}
