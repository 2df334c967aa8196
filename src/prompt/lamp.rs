//! LAMP (Lan et al. 2025, arXiv 2502.12200): a truncated SVD of the prompt, its compressed outer
//! product, and pooling.
//!
//! A prompt `P (l, d)` is initialised as PT's (`init`), decomposed `P = U·diag(s)·Vᵀ`, and the
//! top `r` factors are kept and trained: `U (l, r)`, `Q (r)`, `V (d, r)` (V stored `(d, r)`, as
//! [`Backend::lamp_pool_forward`] takes it). With `M = U·diag(Q) (l, r)` and
//! `I = diag(Q)·Vᵀ (r, d)`, the compressed outer product is
//!
//! ```text
//! C = Σ_k M[:, k] ⊗ I[k, :] = M·I = U·diag(Q²)·Vᵀ      (l, d)
//! ```
//!
//! Q enters squared: with `q_init = plain` (Q = s, the paper read literally) C at init is
//! `U·diag(s²)·Vᵀ`, not P; with `q_init = sqrt` (Q = √s) C at init is exactly the rank-r
//! truncation of P.
//!
//! Pooling with block `p` (`l % p == 0`) gives the `l/p` prompt rows `P' (l/p, d)`:
//!
//! - `average`: `P'[i] = (1/p)·Σ_{k<p} C[i·p + k]`. Averaging blocks of rows is a left
//!   multiplication by a fixed `(l/p, l)` matrix Π, so by associativity
//!   `Π·(U·diag(Q²)·Vᵀ) = (Π·U)·diag(Q²)·Vᵀ`: pooling U first gives the same rows with `l/p × r`
//!   work instead of `l × d`, and C is never formed. One op, [`Backend::lamp_pool_forward`].
//! - `attention` (appendix A.1): `A = softmax(C·W_sa)` over the l axis, `W_sa (d, l/p)`,
//!   `P' = Aᵀ·C`. Written with row softmaxes: `S = W_saᵀ·Cᵀ (l/p, l)`, `A' = Aᵀ = softmax_rows(S)`,
//!   `P' = A'·C`. Here C is formed (`lamp_pool_forward` with p = 1), and `S`, `A'` are
//!   `(l/p, l)`.
//!
//! Parameters `l·r + r + r·d`, plus `d·l/p` for attention pooling; once folded, inference needs
//! the smaller of those and the `l/p·d` rows.

use super::config::{LampConfig, LampPool, QInit};
use super::init::{normal, rng_for, truncated_svd};
use super::pt::init_prompt;
use super::{MethodConfig, MethodContext, Param, ParamGroup, PromptMethod};
use crate::backend::{Backend, Gemm, LampPoolDims};
use crate::error::Result;

/// Indices into `Lamp::params`.
const U: usize = 0;
const Q: usize = 1;
const V: usize = 2;
const W_SA: usize = 3;

/// The buffers of attention pooling.
struct Attention<B: Backend> {
    c: B::Tensor, // (l, d): the compressed outer product C
    /// Forward: the scores S; backward: their probabilities' gradient dA'.
    scores: B::Tensor, // (l/p, l)
    probs: B::Tensor, // (l/p, l): A' = softmax_rows(S)
    d_scores: B::Tensor, // (l/p, l): dS
    d_c: B::Tensor, // (l, d): dC
}

pub struct Lamp<B: Backend> {
    params: Vec<Param<B>>, // [u (l, r), q (r), v (d, r), w_sa (d, l/p) with attention pooling]
    l: usize,
    r: usize,
    d: usize,
    /// Pooling block p.
    p: usize,
    rows: B::Tensor, // (l/p, d)
    /// Present with attention pooling.
    attention: Option<Attention<B>>,
}

impl<B: Backend> Lamp<B> {
    pub fn new(be: &B, cfg: &LampConfig, ctx: &MethodContext<'_>) -> Result<Self> {
        // `build_method` validates too; a direct call must not reach the ops' asserts.
        MethodConfig::Lamp(cfg.clone()).validate(ctx.d_model, ctx.max_len)?;
        let (l, r, p, d) = (cfg.prompt_len, cfg.rank, cfg.pool, ctx.d_model);
        let lp = l / p;
        let prompt: Vec<f64> = init_prompt(l, cfg.init, &cfg.init_text, ctx, "prompt")?
            .into_iter()
            .map(f64::from)
            .collect(); // (l, d)
        let (u, s, v) = truncated_svd(&prompt, l, d, r)?; // (l, r), (r), (d, r)
        let q: Vec<f64> = match cfg.q_init {
            QInit::Plain => s,
            QInit::Sqrt => s.iter().map(|x| x.sqrt()).collect(),
        }; // (r)
        let mut params = vec![
            Param::from_f64(be, "u", &[l, r], ParamGroup::Prompt, &u),
            Param::from_f64(be, "q", &[r], ParamGroup::Prompt, &q),
            Param::from_f64(be, "v", &[d, r], ParamGroup::Prompt, &v),
        ];
        let attention = match cfg.pool_mode {
            LampPool::Average => None,
            LampPool::Attention => {
                // N(0, 1/d): each score (C·W_sa)[i, j] then has variance mean_k C[i, k]², the
                // scale of one entry of the prompt squared, whatever d is (the Gaussian analogue
                // of nn.Linear's default U(−1/√d, 1/√d)); zero would start every row at the same
                // mean of C.
                let std = 1.0 / (d as f64).sqrt();
                let w = normal(d * lp, std, &mut rng_for(ctx.seed, "w_sa"));
                params.push(Param::new(be, "w_sa", &[d, lp], ParamGroup::Prompt, w));
                Some(Attention {
                    c: be.zeros(l * d),
                    scores: be.zeros(lp * l),
                    probs: be.zeros(lp * l),
                    d_scores: be.zeros(lp * l),
                    d_c: be.zeros(l * d),
                })
            }
        };
        Ok(Lamp {
            params,
            l,
            r,
            d,
            p,
            rows: be.zeros(lp * d),
            attention,
        })
    }
}

impl<B: Backend> PromptMethod<B> for Lamp<B> {
    fn name(&self) -> &'static str {
        "lamp"
    }

    fn prompt_rows(&self) -> usize {
        self.l / self.p
    }

    fn forward(&mut self, be: &B) {
        let (l, r, d, p) = (self.l, self.r, self.d, self.p);
        let lp = l / p;
        let (u, q, v) = (
            &self.params[U].value,
            &self.params[Q].value,
            &self.params[V].value,
        );
        match &mut self.attention {
            None => be.lamp_pool_forward(&mut self.rows, u, q, v, LampPoolDims { l, r, c: d, p }),
            Some(a) => {
                let w_sa = &self.params[W_SA].value; // (d, l/p)
                                                     // C (l, d) = U·diag(Q²)·Vᵀ.
                be.lamp_pool_forward(&mut a.c, u, q, v, LampPoolDims { l, r, c: d, p: 1 });
                // S (l/p, l) = W_saᵀ·Cᵀ.
                let g = Gemm {
                    trans_a: true,
                    trans_b: true,
                    ..Gemm::nn(lp, l, d)
                };
                be.matmul(&mut a.scores, w_sa, &a.c, g);
                // A' (l/p, l): the softmax over the l axis of C·W_sa, transposed.
                be.softmax_rows_forward(&mut a.probs, &a.scores, lp, l);
                // P' (l/p, d) = A'·C.
                be.matmul(&mut self.rows, &a.probs, &a.c, Gemm::nn(lp, d, l));
            }
        }
    }

    fn rows(&self) -> &B::Tensor {
        &self.rows
    }

    fn backward(&mut self, be: &B, d_rows: &B::Tensor, _d_update: Option<&B::Tensor>) {
        let (l, r, d, p) = (self.l, self.r, self.d, self.p);
        let lp = l / p;
        let [u, q, v, rest @ ..] = self.params.as_mut_slice() else {
            unreachable!("lamp has u, q, v");
        };
        match &mut self.attention {
            None => be.lamp_pool_backward(
                &mut u.grad,
                &mut q.grad,
                &mut v.grad,
                d_rows,
                &u.value,
                &q.value,
                &v.value,
                LampPoolDims { l, r, c: d, p },
            ),
            Some(a) => {
                let w_sa = &mut rest[0]; // (d, l/p)
                                         // P' = A'·C: dA' (l/p, l) = dP'·Cᵀ (into `scores`), dC (l, d) = A'ᵀ·dP'.
                be.matmul(&mut a.scores, d_rows, &a.c, Gemm::nt(lp, l, d));
                let g = Gemm {
                    trans_a: true,
                    ..Gemm::nn(l, d, lp)
                };
                be.matmul(&mut a.d_c, &a.probs, d_rows, g);
                // dS (l/p, l).
                be.softmax_rows_backward_dinp(&mut a.d_scores, &a.scores, &a.probs, lp, l);
                // S = W_saᵀ·Cᵀ: dW_sa (d, l/p) += Cᵀ·dSᵀ, dC (l, d) += dSᵀ·W_saᵀ.
                let g = Gemm {
                    trans_a: true,
                    trans_b: true,
                    accumulate: true,
                    ..Gemm::nn(d, lp, l)
                };
                be.matmul(&mut w_sa.grad, &a.c, &a.d_scores, g);
                let g = Gemm {
                    trans_a: true,
                    trans_b: true,
                    accumulate: true,
                    ..Gemm::nn(l, d, lp)
                };
                be.matmul(&mut a.d_c, &a.d_scores, &w_sa.value, g);
                // C = U·diag(Q²)·Vᵀ (p = 1).
                be.lamp_pool_backward(
                    &mut u.grad,
                    &mut q.grad,
                    &mut v.grad,
                    &a.d_c,
                    &u.value,
                    &q.value,
                    &v.value,
                    LampPoolDims { l, r, c: d, p: 1 },
                );
            }
        }
    }

    fn params(&self) -> &[Param<B>] {
        &self.params
    }

    fn params_mut(&mut self) -> &mut [Param<B>] {
        &mut self.params
    }

    fn stored_params(&self) -> usize {
        let trained: usize = self.params.iter().map(Param::numel).sum();
        trained.min(self.l / self.p * self.d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prompt::config::PromptInit;
    use crate::prompt::testing::{check_method_gradients, with_context, B64};
    use crate::testing::rel_err;

    fn cfg(l: usize, r: usize, pool: usize, pool_mode: LampPool, q_init: QInit) -> LampConfig {
        LampConfig {
            prompt_len: l,
            rank: r,
            pool,
            pool_mode,
            q_init,
            ..LampConfig::default()
        }
    }

    /// The full `C (l, d) = U·diag(Q²)·Vᵀ` from the parameters, by hand.
    fn full_c(m: &Lamp<B64>) -> Vec<f64> {
        let (l, r, d) = (m.l, m.r, m.d);
        let (u, q, v) = (&m.params[U].value, &m.params[Q].value, &m.params[V].value);
        let mut c = vec![0.0; l * d];
        for i in 0..l {
            for j in 0..d {
                c[i * d + j] = (0..r)
                    .map(|k| u[i * r + k] * q[k] * q[k] * v[j * r + k])
                    .sum();
            }
        }
        c
    }

    #[test]
    fn lamp_gradients_pass_fd_for_every_pool_mode_and_q_init() {
        let (d, l, r) = (7, 6, 3);
        for pool in [1, 2, 3] {
            for mode in [LampPool::Average, LampPool::Attention] {
                for q_init in [QInit::Plain, QInit::Sqrt] {
                    let c = cfg(l, r, pool, mode, q_init);
                    with_context(d, 16, |be, ctx| {
                        let mut m = Lamp::new(be, &c, ctx).unwrap();
                        assert_eq!(m.prompt_rows(), l / pool);
                        let names: Vec<&str> = m.params.iter().map(|p| p.name.as_str()).collect();
                        match mode {
                            LampPool::Average => assert_eq!(names, ["u", "q", "v"]),
                            LampPool::Attention => assert_eq!(names, ["u", "q", "v", "w_sa"]),
                        }
                        assert!(m.params.iter().all(|p| p.group == ParamGroup::Prompt));
                        check_method_gradients(be, &mut m, &MethodConfig::Lamp(c.clone()), ctx);
                    });
                }
            }
        }
    }

    #[test]
    fn sqrt_q_init_starts_at_the_rank_r_truncation_of_p() {
        let (d, l) = (7, 6);
        for init in [PromptInit::Vocab, PromptInit::Uniform] {
            with_context(d, 16, |be, ctx| {
                let p: Vec<f64> = init_prompt(l, init, "", ctx, "prompt")
                    .unwrap()
                    .into_iter()
                    .map(f64::from)
                    .collect();
                for r in [1, 3, 6] {
                    let c = LampConfig {
                        init,
                        ..cfg(l, r, 1, LampPool::Average, QInit::Sqrt)
                    };
                    let mut m = Lamp::new(be, &c, ctx).unwrap();
                    m.forward(be);
                    let err = rel_err(
                        m.rows(),
                        &crate::prompt::init::truncation(&p, l, d, r).unwrap(),
                    );
                    assert!(err < 1e-10, "r = {r}: rel err {err}");
                    if r == l.min(d) {
                        let err = rel_err(m.rows(), &p);
                        assert!(err < 1e-10, "full rank: rel err {err}");
                    }
                }
                // Plain: Q = s, so C = U·diag(s²)·Vᵀ, which is not P.
                let c = LampConfig {
                    init,
                    ..cfg(l, 6, 1, LampPool::Average, QInit::Plain)
                };
                let mut m = Lamp::new(be, &c, ctx).unwrap();
                m.forward(be);
                assert!(rel_err(m.rows(), &p) > 1e-3);
            });
        }
    }

    #[test]
    fn average_pooling_is_the_mean_of_p_consecutive_rows_of_c() {
        let (d, l, r) = (7, 6, 3);
        for pool in [1, 2, 3, 6] {
            for q_init in [QInit::Plain, QInit::Sqrt] {
                with_context(d, 16, |be, ctx| {
                    let c = cfg(l, r, pool, LampPool::Average, q_init);
                    let mut m = Lamp::new(be, &c, ctx).unwrap();
                    m.forward(be);
                    let full = full_c(&m);
                    let mut expect = vec![0.0; l / pool * d];
                    for i in 0..l / pool {
                        for j in 0..d {
                            let s: f64 = (0..pool).map(|k| full[(i * pool + k) * d + j]).sum();
                            expect[i * d + j] = s / pool as f64;
                        }
                    }
                    let err = rel_err(m.rows(), &expect);
                    assert!(err < 1e-12, "p = {pool}: rel err {err}");
                });
            }
        }
    }

    #[test]
    fn attention_pooling_matches_a_host_definition() {
        let (d, l, r) = (7, 6, 3);
        for pool in [1, 2, 3] {
            for q_init in [QInit::Plain, QInit::Sqrt] {
                with_context(d, 16, |be, ctx| {
                    let c = cfg(l, r, pool, LampPool::Attention, q_init);
                    let mut m = Lamp::new(be, &c, ctx).unwrap();
                    m.forward(be);
                    let lp = l / pool;
                    let full = full_c(&m); // (l, d)
                    let w = &m.params[W_SA].value; // (d, l/p)
                    assert_eq!(m.params[W_SA].shape, [d, lp]);
                    // T = C·W_sa (l, l/p); A = softmax over the l axis (each column j).
                    let mut t = vec![0.0; l * lp];
                    for i in 0..l {
                        for j in 0..lp {
                            t[i * lp + j] = (0..d).map(|k| full[i * d + k] * w[k * lp + j]).sum();
                        }
                    }
                    let mut a = vec![0.0; l * lp];
                    for j in 0..lp {
                        let max = (0..l).map(|i| t[i * lp + j]).fold(f64::MIN, f64::max);
                        let z: f64 = (0..l).map(|i| (t[i * lp + j] - max).exp()).sum();
                        for i in 0..l {
                            a[i * lp + j] = (t[i * lp + j] - max).exp() / z;
                        }
                    }
                    // P' = Aᵀ·C (l/p, d).
                    let mut expect = vec![0.0; lp * d];
                    for j in 0..lp {
                        for k in 0..d {
                            expect[j * d + k] =
                                (0..l).map(|i| a[i * lp + j] * full[i * d + k]).sum();
                        }
                    }
                    let err = rel_err(m.rows(), &expect);
                    assert!(err < 1e-12, "p = {pool}: rel err {err}");
                });
            }
        }
    }

    #[test]
    fn counts_match_the_paper() {
        let train = |l: usize, d: usize| {
            MethodConfig::Lamp(cfg(l, 8, 1, LampPool::Average, QInit::Plain))
                .param_counts(d, 256)
                .train
        };
        assert_eq!(train(100, 512), 4_904);
        assert_eq!(train(100, 768), 6_952);
        assert_eq!(train(100, 1024), 9_000);
        let ls = [20, 100, 1000, 5000, 10000];
        let large: Vec<usize> = ls.iter().map(|&l| train(l, 1024)).collect();
        assert_eq!(large, [8_360, 9_000, 16_200, 48_200, 88_200]);
        let llama: Vec<usize> = ls.iter().map(|&l| train(l, 4096)).collect();
        assert_eq!(llama, [32_936, 33_576, 40_776, 72_776, 112_776]);
        let pt = MethodConfig::Pt(crate::prompt::config::PtConfig {
            prompt_len: 10000,
            ..Default::default()
        })
        .param_counts(4096, 256)
        .train;
        assert_eq!(pt, 40_960_000);
        assert_eq!(
            format!("{:.1}", pt as f64 / train(10000, 4096) as f64),
            "363.2"
        );
        // Attention pooling adds W_sa (d, l/p); stored is never more than the l/p·d rows.
        let att = MethodConfig::Lamp(cfg(100, 8, 4, LampPool::Attention, QInit::Plain))
            .param_counts(1024, 256);
        assert_eq!(att.train, 9_000 + 1024 * 25);
        assert_eq!(att.stored, 25 * 1024);
        let avg = MethodConfig::Lamp(cfg(100, 8, 4, LampPool::Average, QInit::Plain))
            .param_counts(1024, 256);
        assert_eq!((avg.train, avg.stored), (9_000, 9_000));
    }

    #[test]
    fn prompt_len_not_a_multiple_of_pool_is_an_error_naming_both() {
        let c = cfg(10, 3, 4, LampPool::Average, QInit::Plain);
        let msg = MethodConfig::Lamp(c.clone())
            .validate(7, 16)
            .unwrap_err()
            .to_string();
        assert!(msg.contains("10") && msg.contains('4'), "{msg}");
        with_context(7, 16, |be, ctx| {
            let msg = Lamp::new(be, &c, ctx).err().unwrap().to_string();
            assert!(msg.contains("10") && msg.contains('4'), "{msg}");
        });
        assert!(
            MethodConfig::Lamp(cfg(12, 3, 4, LampPool::Average, QInit::Plain))
                .validate(7, 16)
                .is_ok()
        );
    }
}
