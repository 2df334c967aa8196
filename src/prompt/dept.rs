//! DePT, decomposed prompt tuning (Shi & Lipani 2024): a short prompt plus a low-rank update of
//! the text embeddings.
//!
//! Parameters `Ps (s, d)`, `A (m, r)`, `B (r, d)` with m the maximum input length:
//!
//! - prompt rows = Ps;
//! - update of the text embeddings `U (m, d) = scale·A·B`, `scale = α/√r` (α default 8), of which
//!   rows `0..n` are added to the n text rows `E(x)` (the backend's `embed_prompt_forward`).
//!
//! Init: Ps as PT (`init_prompt`), A ~ U(−1/√r, 1/√r), B = 0, so the update starts at zero.
//! Two learning-rate groups: `prompt` ([`ParamGroup::Prompt`]); `lowrank.a`, `lowrank.b`
//! ([`ParamGroup::LowRank`]). Params s·d + (m + d)·r, all stored.
//!
//! Backward, with `dU (m, d)`: `dA += scale·dU·Bᵀ`, `dB += scale·Aᵀ·dU`, `dPs += d_rows`.
//! With r = 0 (validation allows it) A and B are empty and the update is zero (`scale` is taken
//! as 0 rather than α/√0).

use super::config::DeptConfig;
use super::init::{rng_for, uniform};
use super::pt::init_prompt;
use super::{MethodContext, Param, ParamGroup, PromptMethod};
use crate::backend::{Backend, Gemm};
use crate::error::Result;

/// Index of Ps in `params`.
const PROMPT: usize = 0;
/// Index of A in `params`.
const LOW_A: usize = 1;
/// Index of B in `params`.
const LOW_B: usize = 2;

/// `(&mut params[g].grad, &params[v].value)`: the gradient of one parameter next to the value
/// of another (or the same) one, for ops that read one and accumulate into the other.
pub(super) fn grad_and_value<B: Backend>(
    params: &mut [Param<B>],
    g: usize,
    v: usize,
) -> (&mut B::Tensor, &B::Tensor) {
    use std::cmp::Ordering;
    match g.cmp(&v) {
        Ordering::Equal => {
            let p = &mut params[g];
            (&mut p.grad, &p.value)
        }
        Ordering::Less => {
            let (lo, hi) = params.split_at_mut(v);
            (&mut lo[g].grad, &hi[0].value)
        }
        Ordering::Greater => {
            let (lo, hi) = params.split_at_mut(g);
            (&mut hi[0].grad, &lo[v].value)
        }
    }
}

/// DePT's / LoRA's init of A `(m, r)`: U(−1/√r, 1/√r) from the stream of `lowrank.a`
/// (empty for r = 0). B starts at zero.
pub(super) fn lora_init_a(m: usize, r: usize, seed: u64) -> Vec<f32> {
    if r == 0 {
        return Vec::new();
    }
    let bound = 1.0 / (r as f64).sqrt();
    uniform(m * r, -bound, bound, &mut rng_for(seed, "lowrank.a"))
}

/// `out (m, d) = alpha·A (m, r)·B (r, d)` (zero for r = 0).
pub(super) fn lowrank_forward<B: Backend>(
    be: &B,
    out: &mut B::Tensor,
    a: &B::Tensor,
    b: &B::Tensor,
    (m, r, d): (usize, usize, usize),
    alpha: f64,
) {
    if r == 0 {
        be.fill_zero(out);
    } else {
        be.matmul(out, a, b, Gemm::nn(m, d, r).alpha(alpha));
    }
}

/// Backward of [`lowrank_forward`] into `params[ia]`, `params[ib]` (`+=`): with `dout (m, d)`,
/// `dA (m, r) += alpha·dout·Bᵀ`, `dB (r, d) += alpha·Aᵀ·dout`.
pub(super) fn lowrank_backward<B: Backend>(
    be: &B,
    params: &mut [Param<B>],
    (ia, ib): (usize, usize),
    dout: &B::Tensor,
    (m, r, d): (usize, usize, usize),
    alpha: f64,
) {
    if r == 0 {
        return;
    }
    let (da, b) = grad_and_value(params, ia, ib);
    // B is stored (r, d): op(B) = Bᵀ (d, r).
    be.matmul(da, dout, b, Gemm::nt(m, r, d).alpha(alpha).accumulate(true));
    let (db, a) = grad_and_value(params, ib, ia);
    // A is stored (m, r): op(A) = Aᵀ (r, m).
    let t_a = Gemm {
        trans_a: true,
        ..Gemm::nn(r, d, m)
    };
    be.matmul(db, a, dout, t_a.alpha(alpha).accumulate(true));
}

pub struct Dept<B: Backend> {
    params: Vec<Param<B>>, // [prompt Ps (s, d), lowrank.a A (m, r), lowrank.b B (r, d)]
    s: usize,
    m: usize,
    r: usize,
    d: usize,
    /// α/√r (0 for r = 0).
    scale: f64,
    update: B::Tensor, // (m, d) scale·A·B of the last forward
}

impl<B: Backend> Dept<B> {
    pub fn new(be: &B, cfg: &DeptConfig, ctx: &MethodContext<'_>) -> Result<Self> {
        let (s, m, r, d) = (cfg.prompt_len, ctx.max_len, cfg.rank, ctx.d_model);
        let ps = init_prompt(s, cfg.init, &cfg.init_text, ctx, "prompt")?; // (s, d)
        let a = lora_init_a(m, r, ctx.seed); // (m, r)
        let b = vec![0.0f32; r * d]; // (r, d)
        let scale = if r == 0 {
            0.0
        } else {
            cfg.alpha / (r as f64).sqrt()
        };
        Ok(Dept {
            params: vec![
                Param::new(be, "prompt", &[s, d], ParamGroup::Prompt, ps),
                Param::new(be, "lowrank.a", &[m, r], ParamGroup::LowRank, a),
                Param::new(be, "lowrank.b", &[r, d], ParamGroup::LowRank, b),
            ],
            s,
            m,
            r,
            d,
            scale,
            update: be.zeros(m * d),
        })
    }

    /// The update's factor α/√r.
    pub fn scale(&self) -> f64 {
        self.scale
    }
}

impl<B: Backend> PromptMethod<B> for Dept<B> {
    fn name(&self) -> &'static str {
        "dept"
    }

    fn prompt_rows(&self) -> usize {
        self.s
    }

    fn update_rows(&self) -> Option<usize> {
        Some(self.m)
    }

    fn forward(&mut self, be: &B) {
        let dims = (self.m, self.r, self.d);
        let (a, b) = (&self.params[LOW_A].value, &self.params[LOW_B].value);
        lowrank_forward(be, &mut self.update, a, b, dims, self.scale);
    }

    fn rows(&self) -> &B::Tensor {
        &self.params[PROMPT].value
    }

    fn update(&self) -> Option<&B::Tensor> {
        Some(&self.update)
    }

    fn backward(&mut self, be: &B, d_rows: &B::Tensor, d_update: Option<&B::Tensor>) {
        be.add_assign(&mut self.params[PROMPT].grad, d_rows); // (s, d)
        if let Some(du) = d_update {
            // du (m, d)
            let dims = (self.m, self.r, self.d);
            lowrank_backward(be, &mut self.params, (LOW_A, LOW_B), du, dims, self.scale);
        }
    }

    fn params(&self) -> &[Param<B>] {
        &self.params
    }

    fn params_mut(&mut self) -> &mut [Param<B>] {
        &mut self.params
    }

    fn stored_params(&self) -> usize {
        self.params.iter().map(Param::numel).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prompt::config::PromptInit;
    use crate::prompt::testing::{check_method_gradients, with_context};
    use crate::prompt::{train_params, MethodConfig};
    use crate::testing::{random_vec, rel_err};

    fn cfg(s: usize, r: usize, init: PromptInit) -> DeptConfig {
        DeptConfig {
            prompt_len: s,
            rank: r,
            alpha: 8.0,
            init,
            init_text: "hello world".into(),
        }
    }

    #[test]
    fn dept_params_init_and_gradients_pass_fd() {
        let (d, m, s, r) = (6, 9, 4, 3);
        for init in [PromptInit::Vocab, PromptInit::Uniform, PromptInit::Text] {
            let c = cfg(s, r, init);
            with_context(d, m, |be, ctx| {
                let mut meth = Dept::new(be, &c, ctx).unwrap();
                let names: Vec<_> = meth.params().iter().map(|p| p.name.clone()).collect();
                assert_eq!(names, ["prompt", "lowrank.a", "lowrank.b"]);
                let shapes: Vec<_> = meth.params().iter().map(|p| p.shape.clone()).collect();
                assert_eq!(shapes, [vec![s, d], vec![m, r], vec![r, d]]);
                let groups: Vec<_> = meth.params().iter().map(|p| p.group).collect();
                assert_eq!(
                    groups,
                    [ParamGroup::Prompt, ParamGroup::LowRank, ParamGroup::LowRank]
                );
                assert_eq!(meth.update_rows(), Some(m));
                // Init: A within ±1/√r, B = 0, so the update starts at zero.
                let bound = 1.0 / (r as f64).sqrt();
                assert!(meth.params()[LOW_A].value.iter().all(|x| x.abs() <= bound));
                assert!(meth.params()[LOW_B].value.iter().all(|&x| x == 0.0));
                meth.forward(be);
                assert!(meth.update().unwrap().iter().all(|&x| x == 0.0));
                assert_eq!(meth.rows(), &meth.params()[PROMPT].value);
                // With B = 0 the FD of A is trivially zero: give B values first.
                meth.params_mut()[LOW_B].value = random_vec(r * d, 1.0, 77);
                check_method_gradients(be, &mut meth, &MethodConfig::Dept(c.clone()), ctx);
            });
        }
    }

    #[test]
    fn dept_update_is_scaled_product_by_hand() {
        let (d, m, s, r) = (6, 9, 4, 3);
        let mut c = cfg(s, r, PromptInit::Uniform);
        c.alpha = 5.0;
        with_context(d, m, |be, ctx| {
            let mut meth = Dept::new(be, &c, ctx).unwrap();
            meth.params_mut()[LOW_B].value = random_vec(r * d, 1.0, 78);
            meth.forward(be);
            let (a, b) = (&meth.params()[LOW_A].value, &meth.params()[LOW_B].value);
            let scale = 5.0 / 3f64.sqrt();
            assert!((meth.scale() - scale).abs() < 1e-15);
            let mut want = vec![0.0; m * d];
            for i in 0..m {
                for j in 0..d {
                    for k in 0..r {
                        want[i * d + j] += scale * a[i * r + k] * b[k * d + j];
                    }
                }
            }
            assert!(rel_err(meth.update().unwrap(), &want) < 1e-14);
        });
    }

    #[test]
    fn dept_rank_zero_has_a_zero_update() {
        let c = cfg(4, 0, PromptInit::Uniform);
        with_context(6, 9, |be, ctx| {
            let mut meth = Dept::new(be, &c, ctx).unwrap();
            meth.forward(be);
            assert!(meth.update().unwrap().iter().all(|&x| x == 0.0));
            check_method_gradients(be, &mut meth, &MethodConfig::Dept(c.clone()), ctx);
        });
    }

    #[test]
    fn dept_default_counts() {
        let mk = |s, r| {
            MethodConfig::Dept(DeptConfig {
                prompt_len: s,
                rank: r,
                ..DeptConfig::default()
            })
        };
        for (s, r) in [(60, 30), (40, 45)] {
            let counts = mk(s, r).param_counts(768, 256);
            assert_eq!(
                (counts.train, counts.stored),
                (76_800, 76_800),
                "s={s} r={r}"
            );
        }
        assert_eq!(
            MethodConfig::default_for("dept").unwrap(),
            mk(60, 30),
            "defaults are s = 60, r = 30"
        );
        // The tensors allocated at base size match.
        with_context(768, 256, |be, ctx| {
            let meth = Dept::new(be, &DeptConfig::default(), ctx).unwrap();
            assert_eq!(train_params(&meth), 76_800);
            assert_eq!(meth.stored_params(), 76_800);
        });
    }
}
