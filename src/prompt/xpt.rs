//! Explosive prompt tuning (`xpt`; EMNLP submission "Explosive Prompt Tuning"): one prompt vector
//! through a purely linear, under-parameterised bottleneck, its single output row repeated,
//!
//! φ(p1) (d) = W_up (d, h) · (W_down (h, d) · p1 (d)),   rows (n, d) = [φ(p1); …; φ(p1)],
//!
//! with h = `hidden` (default 1) and n = `repeats` (1: EPT, 10: EPT*). p1 starts U(−0.5, 0.5), the
//! weights U(−1/√fan_in, 1/√fan_in). Train-time parameters d + 2dh; stored d (the one folded row).
//!
//! Why so bare: the method relies on the norm of φ(p1) growing during training (the product of
//! the two factors can scale up freely). A bias, a normalisation or a saturating nonlinearity each
//! damp or cap that growth, and a residual path would let p1 bypass the bottleneck; so there are
//! none.

use super::config::XptConfig;
use super::init::{linear_default, rng_for, uniform};
use super::{MethodContext, Param, ParamGroup, PromptMethod};
use crate::backend::{Backend, LinearDims};
use crate::error::Result;

// Indices into `params`.
const PROMPT: usize = 0;
const DOWN: usize = 1;
const UP: usize = 2;

pub struct Xpt<B: Backend> {
    d: usize,
    h: usize,
    n: usize,
    /// [prompt (d) — stored as shape [d], one vector, not [1, d] —, down.weight (h, d),
    /// up.weight (d, h)]
    params: Vec<Param<B>>,
    z: B::Tensor,     // (1, h): W_down·p1, the up projection's input
    phi: B::Tensor,   // (1, d): φ(p1)
    rows: B::Tensor,  // (n, d): φ(p1) broadcast to n rows
    d_phi: B::Tensor, // (1, d) scratch
    d_z: B::Tensor,   // (1, h) scratch
}

impl<B: Backend> Xpt<B> {
    pub fn new(be: &B, cfg: &XptConfig, ctx: &MethodContext<'_>) -> Result<Self> {
        let (d, h, n) = (ctx.d_model, cfg.hidden, cfg.repeats);
        let prompt = uniform(d, -0.5, 0.5, &mut rng_for(ctx.seed, "prompt"));
        let linear = |name: &str, shape: &[usize], fan_in: usize| {
            let data = linear_default(shape[0] * shape[1], fan_in, &mut rng_for(ctx.seed, name));
            Param::new(be, name, shape, ParamGroup::Prompt, data)
        };
        Ok(Xpt {
            d,
            h,
            n,
            params: vec![
                Param::new(be, "prompt", &[d], ParamGroup::Prompt, prompt),
                linear("down.weight", &[h, d], d),
                linear("up.weight", &[d, h], h),
            ],
            z: be.zeros(h),
            phi: be.zeros(d),
            rows: be.zeros(n * d),
            d_phi: be.zeros(d),
            d_z: be.zeros(h),
        })
    }
}

impl<B: Backend> PromptMethod<B> for Xpt<B> {
    fn name(&self) -> &'static str {
        "xpt"
    }

    fn prompt_rows(&self) -> usize {
        self.n
    }

    fn forward(&mut self, be: &B) {
        let (d, h, n) = (self.d, self.h, self.n);
        let p = &self.params;
        // p1 as a one-row batch through two bias-free linear layers.
        be.linear_forward(
            &mut self.z,
            &p[PROMPT].value,
            &p[DOWN].value,
            LinearDims::new(1, d, h),
        );
        be.linear_forward(
            &mut self.phi,
            &self.z,
            &p[UP].value,
            LinearDims::new(1, h, d),
        );
        // Repeat: adding φ as a "bias" to n zero rows broadcasts it.
        be.fill_zero(&mut self.rows);
        be.add_bias(&mut self.rows, &self.phi, n, d);
    }

    fn rows(&self) -> &B::Tensor {
        &self.rows
    }

    fn backward(&mut self, be: &B, d_rows: &B::Tensor, _d_update: Option<&B::Tensor>) {
        let (d, h, n) = (self.d, self.h, self.n);
        // The backward of the broadcast sums the n row gradients (bias_backward adds: clear first).
        be.fill_zero(&mut self.d_phi);
        be.bias_backward(&mut self.d_phi, d_rows, n, d);
        let (prompt, weights) = self.params.split_at_mut(DOWN);
        let prompt = &mut prompt[PROMPT];
        let (down, up) = weights.split_at_mut(1);
        let (down, up) = (&mut down[0], &mut up[0]);
        // φ = z·W_upᵀ.
        be.linear_backward_dweight(&mut up.grad, &self.d_phi, &self.z, LinearDims::new(1, h, d));
        be.linear_backward_dinp(
            &mut self.d_z,
            &self.d_phi,
            &up.value,
            false,
            LinearDims::new(1, h, d),
        );
        // z = p1·W_downᵀ.
        be.linear_backward_dweight(
            &mut down.grad,
            &self.d_z,
            &prompt.value,
            LinearDims::new(1, d, h),
        );
        be.linear_backward_dinp(
            &mut prompt.grad,
            &self.d_z,
            &down.value,
            true,
            LinearDims::new(1, d, h),
        );
    }

    fn params(&self) -> &[Param<B>] {
        &self.params
    }

    fn params_mut(&mut self) -> &mut [Param<B>] {
        &mut self.params
    }

    fn stored_params(&self) -> usize {
        // Every row is φ(p1): inference keeps that one row.
        self.d
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prompt::testing::{check_method_gradients, with_context};
    use crate::prompt::MethodConfig;
    use crate::testing::rel_err;

    #[test]
    fn xpt_rows_are_one_repeated_linear_image_and_gradients_pass_fd() {
        let d = 7;
        for (repeats, hidden) in [(1, 1), (10, 1), (1, 3), (10, 3)] {
            let cfg = XptConfig { repeats, hidden };
            with_context(d, 16, |be, ctx| {
                let mut m = Xpt::new(be, &cfg, ctx).unwrap();
                let names: Vec<&str> = m.params.iter().map(|p| p.name.as_str()).collect();
                assert_eq!(names, ["prompt", "down.weight", "up.weight"]);
                assert!(m.params[PROMPT].value.iter().all(|x| x.abs() <= 0.5));
                let bound = |fan_in: usize| 1.0 / (fan_in as f64).sqrt();
                assert!(m.params[DOWN].value.iter().all(|x| x.abs() <= bound(d)));
                assert!(m.params[UP].value.iter().all(|x| x.abs() <= bound(hidden)));
                m.forward(be);
                let (p, wd, wu) = (
                    &m.params[PROMPT].value,
                    &m.params[DOWN].value,
                    &m.params[UP].value,
                );
                let z: Vec<f64> = (0..hidden)
                    .map(|j| (0..d).map(|k| wd[j * d + k] * p[k]).sum())
                    .collect();
                let phi: Vec<f64> = (0..d)
                    .map(|o| (0..hidden).map(|j| wu[o * hidden + j] * z[j]).sum())
                    .collect();
                assert_eq!(m.rows().len(), repeats * d);
                for row in m.rows().chunks_exact(d) {
                    assert_eq!(row, &m.rows()[..d], "rows are not identical");
                    assert!(rel_err(row, &phi) < 1e-12);
                }
                check_method_gradients(be, &mut m, &MethodConfig::Xpt(cfg.clone()), ctx);
            });
        }
    }

    #[test]
    fn xpt_counts_match_methods_md() {
        let cfg = MethodConfig::Xpt(XptConfig::default());
        let counts: Vec<(usize, usize)> = [512, 768, 1024]
            .iter()
            .map(|&d| {
                let c = cfg.param_counts(d, 256);
                (c.train, c.stored)
            })
            .collect();
        assert_eq!(counts, [(1_536, 512), (2_304, 768), (3_072, 1024)]);
    }
}
