//! EPT-MS, efficient prompt tuning with multi-space projection and prompt fusion (Lan et al.
//! 2024, arXiv 2405.11464). Equations as in ../shared/methods.md; d the model width, m the
//! maximum input length.
//!
//! 1. A source prompt `P (l, d)` (vocab init by default) gives the short trainable prompt
//!    `Ps = P[0..s] (s, d)`; P itself is not a parameter.
//! 2. Decomposition: P zero-padded to m rows, `P_m = U·Σ·Vᵀ` truncated to rank r:
//!    `A = U_r·Σ_r^{1/2} (m, r)`, `B = Σ_r^{1/2}·V_rᵀ (r, d)` (`lowrank_init = svd`, default; at
//!    init A·B is the best rank-r approximation of P_m), or DePT's init A ~ U(−1/√r, 1/√r),
//!    B = 0 (`lora`). The text embeddings get `E(x) += (A·B)[0..n]` (scale 1). r = 0 gives
//!    A·B = 0.
//! 3. Prompt fusion with the scores `Ps·(A·B)ᵀ/√d (s, m)`:
//!    - `fusion = attend` (default): `W = softmax` of the scores over the m axis,
//!      `P_f = Ps + W·(A·B)`: the prompt attends to the low-rank rows.
//!    - `fusion = paper`: the paper's einsum `'bpl,bpd->bpd'` read literally sums W over its
//!      last axis and scales each prompt row by that sum; with the softmax over that same axis
//!      the sum is 1 and fusion collapses to `2·Ps`. This mode therefore takes the softmax over
//!      the prompt axis instead (`W'`, each column sums to 1) and keeps the literal einsum:
//!      `P_f[p] = (1 + Σ_j W'[p, j])·Ps[p]`.
//!
//!    In both modes the einsum's batch index b is a broadcast: Ps and A·B are the same for
//!    every example, so P_f is computed once per step, not per batch row.
//! 4. Multi-space projection (`multi_space = true`), N_e experts
//!    `E_i(Ps) = L1_i(ReLU(L2_i(Ps)))`, `L2_i: d → h`, `L1_i: h → d` with biases (h = m by
//!    default), gate `G = softmax(Ps·Wg + bg) (s, N_e)` over the experts,
//!    `P_amend = Σ_i G[:, i] ⊙ E_i(Ps)`.
//! 5. Prompt rows `P_new = P_amend + P_f` (`P_f` alone without multi-space, an ablation).
//!
//! `s = 0` (the end point of the paper's sweep over s, its Fig. 4b) has no prompt rows: no
//! fusion and no experts, only the update `(A·B)[0..n]` of the text embeddings.
//!
//! Parameters: `prompt` Ps (s, d), experts and gate in [`ParamGroup::Prompt`]; `lowrank.a` A (m, r),
//! `lowrank.b` B (r, d) in [`ParamGroup::LowRank`]. Stored s·d + (m + d)·r; train time adds
//! N_e(2dh + h + d) + N_e(d + 1).
//!
//! Backward: `d_rows` flows into P_amend (gate and experts → Ps) and into P_f (→ Ps and A·B);
//! the fusion's gradient of A·B plus the update's gradient flow into A and B.

use super::config::{EptConfig, LowRankInit};
use super::dept::{grad_and_value, lora_init_a, lowrank_backward, lowrank_forward};
use super::init::{linear_default, rng_for, truncated_svd};
use super::pt::init_prompt;
use super::{MethodConfig, MethodContext, Param, ParamGroup, PromptMethod};
use crate::backend::{
    Activation, Backend, FusionAttentionDims, FusionMode, GatedExpertsDims, LinearDims,
};
use crate::error::Result;

/// Index of Ps in `params`.
const PROMPT: usize = 0;
/// Index of A in `params`.
const LOW_A: usize = 1;
/// Index of B in `params`.
const LOW_B: usize = 2;
/// Index of the first expert's first tensor; expert i holds the 4 tensors from
/// `EXPERT0 + 4i`: down.weight, down.bias, up.weight, up.bias. The gate follows the experts.
const EXPERT0: usize = 3;

/// Indices of expert `i`'s (down.weight, down.bias, up.weight, up.bias) in `params`.
fn expert_idx(i: usize) -> (usize, usize, usize, usize) {
    let base = EXPERT0 + 4 * i;
    (base, base + 1, base + 2, base + 3)
}

/// The gated multi-space projection's buffers.
struct MultiSpace<B: Backend> {
    /// Number of experts N_e.
    e: usize,
    /// Hidden width h of each expert.
    h: usize,
    pre: Vec<B::Tensor>, // N_e × (s, h) L2_i(Ps), before the ReLU
    hid: Vec<B::Tensor>, // N_e × (s, h) ReLU(L2_i(Ps))
    out: Vec<B::Tensor>, // N_e × (s, d) E_i(Ps)
    logits: B::Tensor,   // (s, N_e) Ps·Wg + bg
    gate: B::Tensor,     // (s, N_e) G
    amend: B::Tensor,    // (s, d) P_amend
    // Backward scratch.
    d_gate: B::Tensor,     // (s, N_e)
    d_logits: B::Tensor,   // (s, N_e)
    d_out: Vec<B::Tensor>, // N_e × (s, d)
    d_hid: B::Tensor,      // (s, h)
    d_pre: B::Tensor,      // (s, h)
}

pub struct Ept<B: Backend> {
    // [prompt Ps (s, d), lowrank.a A (m, r), lowrank.b B (r, d)], then with multi-space for
    // each expert i: expert.{i}.down.weight (h, d), .down.bias (h), .up.weight (d, h),
    // .up.bias (d); then gate.weight (N_e, d), gate.bias (N_e).
    params: Vec<Param<B>>,
    s: usize,
    m: usize,
    r: usize,
    d: usize,
    mode: FusionMode,
    lr: B::Tensor,    // (m, d) A·B: the update of E(x) and the fusion's keys and values
    probs: B::Tensor, // (s, m) the fusion weights W (attend) or W' (paper)
    rows: B::Tensor,  // (s, d) P_new = P_amend + P_f (P_f without multi-space)
    ms: Option<MultiSpace<B>>,
    d_ps: B::Tensor, // (s, d) backward scratch: the fusion's gradient of Ps
    d_lr: B::Tensor, // (m, d) backward scratch: the gradient of A·B
}

/// A linear-layer tensor with PyTorch's default init, U(−1/√fan_in, 1/√fan_in).
fn linear_param<B: Backend>(
    be: &B,
    name: &str,
    shape: &[usize],
    fan_in: usize,
    seed: u64,
) -> Param<B> {
    let n = shape.iter().product();
    let data = linear_default(n, fan_in, &mut rng_for(seed, name));
    Param::new(be, name, shape, ParamGroup::Prompt, data)
}

/// EPT's `svd` init: `A (m, r) = U_r·Σ_r^{1/2}`, `B (r, d) = Σ_r^{1/2}·V_rᵀ` from the truncated
/// SVD of `p (l, d)` zero-padded to m rows.
pub(crate) fn svd_factors(
    p: &[f64],
    l: usize,
    m: usize,
    d: usize,
    r: usize,
) -> Result<(Vec<f64>, Vec<f64>)> {
    if r == 0 {
        return Ok((Vec::new(), Vec::new()));
    }
    let mut pm = vec![0.0; m * d]; // (m, d)
    pm[..l * d].copy_from_slice(&p[..l * d]);
    let (u, sv, v) = truncated_svd(&pm, m, d, r)?; // (m, r), (r), (d, r)
    let root: Vec<f64> = sv.iter().map(|x| x.max(0.0).sqrt()).collect(); // (r)
    let a = (0..m * r).map(|ik| u[ik] * root[ik % r]).collect(); // (m, r)
    let b = (0..r * d)
        .map(|kj| {
            let (k, j) = (kj / d, kj % d);
            root[k] * v[j * r + k]
        })
        .collect(); // (r, d)
    Ok((a, b))
}

impl<B: Backend> Ept<B> {
    pub fn new(be: &B, cfg: &EptConfig, ctx: &MethodContext<'_>) -> Result<Self> {
        let (d, m) = (ctx.d_model, ctx.max_len);
        MethodConfig::Ept(cfg.clone()).validate(d, m)?;
        let (l, s, r) = (cfg.source_len, cfg.prompt_len, cfg.rank);
        let p = init_prompt(l, cfg.init, &cfg.init_text, ctx, "prompt")?; // (l, d)
        let ps = p[..s * d].to_vec(); // (s, d)
        let mut params = vec![Param::new(be, "prompt", &[s, d], ParamGroup::Prompt, ps)];
        match cfg.lowrank_init {
            LowRankInit::Svd => {
                let p64: Vec<f64> = p.iter().map(|&x| x as f64).collect(); // (l, d)
                let (a, b) = svd_factors(&p64, l, m, d, r)?;
                params.push(Param::from_f64(
                    be,
                    "lowrank.a",
                    &[m, r],
                    ParamGroup::LowRank,
                    &a,
                ));
                params.push(Param::from_f64(
                    be,
                    "lowrank.b",
                    &[r, d],
                    ParamGroup::LowRank,
                    &b,
                ));
            }
            LowRankInit::Lora => {
                let a = lora_init_a(m, r, ctx.seed); // (m, r)
                let b = vec![0.0f32; r * d]; // (r, d)
                params.push(Param::new(be, "lowrank.a", &[m, r], ParamGroup::LowRank, a));
                params.push(Param::new(be, "lowrank.b", &[r, d], ParamGroup::LowRank, b));
            }
        }
        // With s = 0 there are no prompt rows to project: the experts and gate would be dead
        // parameters, so the method is the low-rank update alone.
        let ms = if cfg.multi_space && s > 0 {
            let (e, h) = (cfg.experts, cfg.hidden(m));
            for i in 0..e {
                let name = |t: &str| format!("expert.{i}.{t}");
                params.push(linear_param(be, &name("down.weight"), &[h, d], d, ctx.seed));
                params.push(linear_param(be, &name("down.bias"), &[h], d, ctx.seed));
                params.push(linear_param(be, &name("up.weight"), &[d, h], h, ctx.seed));
                params.push(linear_param(be, &name("up.bias"), &[d], h, ctx.seed));
            }
            // The gate Wg ∈ R^{d×N_e} is stored as a PyTorch linear weight (N_e, d) = Wgᵀ.
            params.push(linear_param(be, "gate.weight", &[e, d], d, ctx.seed));
            params.push(linear_param(be, "gate.bias", &[e], d, ctx.seed));
            let bufs = |len: usize| (0..e).map(|_| be.zeros(len)).collect::<Vec<_>>();
            Some(MultiSpace {
                e,
                h,
                pre: bufs(s * h),
                hid: bufs(s * h),
                out: bufs(s * d),
                logits: be.zeros(s * e),
                gate: be.zeros(s * e),
                amend: be.zeros(s * d),
                d_gate: be.zeros(s * e),
                d_logits: be.zeros(s * e),
                d_out: bufs(s * d),
                d_hid: be.zeros(s * h),
                d_pre: be.zeros(s * h),
            })
        } else {
            None
        };
        Ok(Ept {
            params,
            s,
            m,
            r,
            d,
            mode: cfg.fusion.into(),
            lr: be.zeros(m * d),
            probs: be.zeros(s * m),
            rows: be.zeros(s * d),
            ms,
            d_ps: be.zeros(s * d),
            d_lr: be.zeros(m * d),
        })
    }
}

impl<B: Backend> PromptMethod<B> for Ept<B> {
    fn name(&self) -> &'static str {
        "ept"
    }

    fn prompt_rows(&self) -> usize {
        self.s
    }

    fn update_rows(&self) -> Option<usize> {
        Some(self.m)
    }

    fn forward(&mut self, be: &B) {
        let (s, m, r, d) = (self.s, self.m, self.r, self.d);
        let params = &self.params;
        let ps = &params[PROMPT].value; // (s, d)
        let (a, b) = (&params[LOW_A].value, &params[LOW_B].value);
        lowrank_forward(be, &mut self.lr, a, b, (m, r, d), 1.0);
        if s == 0 {
            return; // no prompt rows: the update alone
        }
        // P_f into rows.
        be.fusion_attention_forward(
            &mut self.rows,
            &mut self.probs,
            ps,
            &self.lr,
            self.mode,
            FusionAttentionDims { s, m, c: d },
        );
        let Some(ms) = self.ms.as_mut() else {
            return;
        };
        let (e, h) = (ms.e, ms.h);
        for i in 0..e {
            let (wd, bd, wu, bu) = expert_idx(i);
            be.linear_forward(
                &mut ms.pre[i],
                ps,
                &params[wd].value,
                LinearDims::new(s, d, h),
            );
            be.add_bias(&mut ms.pre[i], &params[bd].value, s, h);
            be.gated_act_forward(&mut ms.hid[i], &ms.pre[i], None, Activation::Relu, s * h);
            be.linear_forward(
                &mut ms.out[i],
                &ms.hid[i],
                &params[wu].value,
                LinearDims::new(s, h, d),
            );
            be.add_bias(&mut ms.out[i], &params[bu].value, s, d);
        }
        let (gw, gb) = (EXPERT0 + 4 * e, EXPERT0 + 4 * e + 1);
        be.linear_forward(
            &mut ms.logits,
            ps,
            &params[gw].value,
            LinearDims::new(s, d, e),
        );
        be.add_bias(&mut ms.logits, &params[gb].value, s, e);
        be.softmax_rows_forward(&mut ms.gate, &ms.logits, s, e);
        let experts: Vec<&B::Tensor> = ms.out.iter().collect();
        be.gated_experts_forward(
            &mut ms.amend,
            &ms.gate,
            &experts,
            GatedExpertsDims { n: s, c: d },
        );
        be.add_assign(&mut self.rows, &ms.amend);
    }

    fn rows(&self) -> &B::Tensor {
        &self.rows
    }

    fn update(&self) -> Option<&B::Tensor> {
        Some(&self.lr)
    }

    fn backward(&mut self, be: &B, d_rows: &B::Tensor, d_update: Option<&B::Tensor>) {
        let (s, m, r, d) = (self.s, self.m, self.r, self.d);
        let params = &mut self.params;
        if s == 0 {
            // No prompt rows: only the update's gradient reaches A and B.
            if let Some(du) = d_update {
                lowrank_backward(be, params, (LOW_A, LOW_B), du, (m, r, d), 1.0);
            }
            return;
        }
        // P_f = fusion(Ps, A·B).
        be.fusion_attention_backward(
            &mut self.d_ps,
            &mut self.d_lr,
            d_rows,
            &params[PROMPT].value,
            &self.lr,
            &self.probs,
            self.mode,
            FusionAttentionDims { s, m, c: d },
        );
        be.add_assign(&mut params[PROMPT].grad, &self.d_ps);
        if let Some(du) = d_update {
            be.add_assign(&mut self.d_lr, du); // (m, d)
        }
        lowrank_backward(be, params, (LOW_A, LOW_B), &self.d_lr, (m, r, d), 1.0);

        let Some(ms) = self.ms.as_mut() else {
            return;
        };
        let (e, h) = (ms.e, ms.h);
        // P_amend = Σ_i G[:, i] ⊙ E_i, G = softmax(logits).
        let experts: Vec<&B::Tensor> = ms.out.iter().collect();
        be.gated_experts_backward(
            &mut ms.d_gate,
            &mut ms.d_out,
            d_rows,
            &ms.gate,
            &experts,
            GatedExpertsDims { n: s, c: d },
        );
        be.softmax_rows_backward_dinp(&mut ms.d_logits, &ms.d_gate, &ms.gate, s, e);
        // logits = Ps·gate.weightᵀ + gate.bias.
        let (gw, gb) = (EXPERT0 + 4 * e, EXPERT0 + 4 * e + 1);
        let (dw, ps) = grad_and_value(params, gw, PROMPT);
        be.linear_backward_dweight(dw, &ms.d_logits, ps, LinearDims::new(s, d, e));
        be.bias_backward(&mut params[gb].grad, &ms.d_logits, s, e);
        let (dps, w) = grad_and_value(params, PROMPT, gw);
        be.linear_backward_dinp(dps, &ms.d_logits, w, true, LinearDims::new(s, d, e));
        for i in 0..e {
            let (wd, bd, wu, bu) = expert_idx(i);
            // E_i = ReLU(Ps·downᵀ + down.bias)·upᵀ + up.bias.
            let d_out = &ms.d_out[i]; // (s, d)
            be.linear_backward_dweight(
                &mut params[wu].grad,
                d_out,
                &ms.hid[i],
                LinearDims::new(s, h, d),
            );
            be.bias_backward(&mut params[bu].grad, d_out, s, d);
            be.linear_backward_dinp(
                &mut ms.d_hid,
                d_out,
                &params[wu].value,
                false,
                LinearDims::new(s, h, d),
            );
            be.gated_act_backward_dinp(
                &mut ms.d_pre,
                None,
                &ms.d_hid,
                &ms.pre[i],
                None,
                Activation::Relu,
                s * h,
            );
            let (dw, ps) = grad_and_value(params, wd, PROMPT);
            be.linear_backward_dweight(dw, &ms.d_pre, ps, LinearDims::new(s, d, h));
            be.bias_backward(&mut params[bd].grad, &ms.d_pre, s, h);
            let (dps, w) = grad_and_value(params, PROMPT, wd);
            be.linear_backward_dinp(dps, &ms.d_pre, w, true, LinearDims::new(s, d, h));
        }
    }

    fn params(&self) -> &[Param<B>] {
        &self.params
    }

    fn params_mut(&mut self) -> &mut [Param<B>] {
        &mut self.params
    }

    fn stored_params(&self) -> usize {
        self.s * self.d + (self.m + self.d) * self.r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prompt::config::{Fusion, PromptInit, PtConfig};
    use crate::prompt::pt::Pt;
    use crate::prompt::testing::{check_method_gradients, with_context, B64};
    use crate::prompt::{build_method, train_params};
    use crate::testing::{random_vec, rel_err};

    const D: usize = 6;
    const M: usize = 9;

    fn cfg(fusion: Fusion, lowrank_init: LowRankInit, multi_space: bool) -> EptConfig {
        EptConfig {
            source_len: 7,
            prompt_len: 4,
            rank: 3,
            lowrank_init,
            fusion,
            multi_space,
            experts: 2,
            expert_hidden: Some(5),
            init: PromptInit::Vocab,
            init_text: String::new(),
        }
    }

    /// The source prompt P (l, d) the method starts from, as f64.
    fn source(c: &EptConfig, ctx: &MethodContext<'_>) -> Vec<f64> {
        let p = init_prompt(c.source_len, c.init, &c.init_text, ctx, "prompt").unwrap();
        p.iter().map(|&x| x as f64).collect()
    }

    /// The rank-r truncation of `p (l, d)` padded to m rows.
    fn truncation(p: &[f64], l: usize, m: usize, d: usize, r: usize) -> Vec<f64> {
        let mut pm = vec![0.0; m * d];
        pm[..l * d].copy_from_slice(&p[..l * d]);
        crate::prompt::init::truncation(&pm, m, d, r).unwrap()
    }

    #[test]
    fn ept_gradients_pass_fd_in_every_mode() {
        for fusion in [Fusion::Attend, Fusion::Paper] {
            for init in [LowRankInit::Svd, LowRankInit::Lora] {
                for multi_space in [true, false] {
                    let c = cfg(fusion, init, multi_space);
                    with_context(D, M, |be, ctx| {
                        let mut meth = Ept::new(be, &c, ctx).unwrap();
                        if init == LowRankInit::Lora {
                            assert!(meth.params()[LOW_B].value.iter().all(|&x| x == 0.0));
                            // B = 0 would make A's FD trivially zero.
                            meth.params_mut()[LOW_B].value = random_vec(3 * D, 1.0, 77);
                        }
                        check_method_gradients(be, &mut meth, &MethodConfig::Ept(c.clone()), ctx);
                    });
                }
            }
        }
    }

    #[test]
    fn ept_params_names_shapes_groups() {
        let c = cfg(Fusion::Attend, LowRankInit::Svd, true);
        with_context(D, M, |be, ctx| {
            let meth = Ept::new(be, &c, ctx).unwrap();
            let got: Vec<(String, Vec<usize>, ParamGroup)> = meth
                .params()
                .iter()
                .map(|p| (p.name.clone(), p.shape.clone(), p.group))
                .collect();
            let pg = ParamGroup::Prompt;
            let mut want = vec![
                ("prompt".to_string(), vec![4, D], pg),
                ("lowrank.a".into(), vec![M, 3], ParamGroup::LowRank),
                ("lowrank.b".into(), vec![3, D], ParamGroup::LowRank),
            ];
            for i in 0..2 {
                want.push((format!("expert.{i}.down.weight"), vec![5, D], pg));
                want.push((format!("expert.{i}.down.bias"), vec![5], pg));
                want.push((format!("expert.{i}.up.weight"), vec![D, 5], pg));
                want.push((format!("expert.{i}.up.bias"), vec![D], pg));
            }
            want.push(("gate.weight".into(), vec![2, D], pg));
            want.push(("gate.bias".into(), vec![2], pg));
            assert_eq!(got, want);
            assert_eq!(meth.update_rows(), Some(M));
            assert_eq!(meth.prompt_rows(), 4);
            // Ps = P[0..s].
            let p = source(&c, ctx);
            assert_eq!(meth.params()[PROMPT].value, p[..4 * D]);
        });
    }

    #[test]
    fn ept_svd_init_is_the_truncation_of_padded_p() {
        for init in [PromptInit::Vocab, PromptInit::Uniform] {
            let mut c = cfg(Fusion::Attend, LowRankInit::Svd, false);
            c.init = init;
            with_context(D, M, |be, ctx| {
                let p = source(&c, ctx);
                let (l, r) = (c.source_len, c.rank);
                let mut meth = Ept::new(be, &c, ctx).unwrap();
                meth.forward(be);
                let want = truncation(&p, l, M, D, r);
                let err = rel_err(meth.update().unwrap(), &want);
                assert!(err < 1e-12, "rank-{r} truncation: rel err {err}");

                // Full rank r = min(l, d): A·B is padded P itself, zero past row l.
                c.rank = l.min(D);
                let mut meth = Ept::new(be, &c, ctx).unwrap();
                meth.forward(be);
                let ab = meth.update().unwrap();
                let mut padded = p.clone();
                padded.resize(M * D, 0.0);
                let err = rel_err(ab, &padded);
                assert!(err < 1e-12, "full rank: rel err {err}");
                assert!(ab[l * D..].iter().all(|x| x.abs() < 1e-12));
            });
        }
    }

    #[test]
    fn ept_rank_zero_behaves_as_pt_with_l_equal_s() {
        let mut c = cfg(Fusion::Attend, LowRankInit::Svd, false);
        c.rank = 0;
        with_context(D, M, |be, ctx| {
            MethodConfig::Ept(c.clone()).validate(D, M).unwrap();
            let mut meth = Ept::new(be, &c, ctx).unwrap();
            check_method_gradients(be, &mut meth, &MethodConfig::Ept(c.clone()), ctx);
            meth.forward(be);
            assert_eq!(meth.rows(), &meth.params()[PROMPT].value);
            assert!(meth.update().unwrap().iter().all(|&x| x == 0.0));
            // The same rows as PT with l = s (same init stream), and the same gradient.
            let pt_cfg = PtConfig {
                prompt_len: c.prompt_len,
                init: c.init,
                init_text: c.init_text.clone(),
            };
            let pt = Pt::new(be, &pt_cfg, ctx).unwrap();
            assert_eq!(meth.rows(), pt.rows());
            for p in meth.params_mut() {
                be.fill_zero(&mut p.grad);
            }
            let d_rows = random_vec(c.prompt_len * D, 1.0, 5);
            let d_update = random_vec(M * D, 1.0, 6);
            meth.backward(be, &d_rows, Some(&d_update));
            assert_eq!(meth.params()[PROMPT].grad, d_rows);
        });
    }

    fn softmax(x: &[f64]) -> Vec<f64> {
        let max = x.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = x.iter().map(|v| (v - max).exp()).collect();
        let sum: f64 = e.iter().sum();
        e.iter().map(|v| v / sum).collect()
    }

    /// EPT-MS's rows and update by loops on host vectors, from the method's parameters.
    fn reference(meth: &Ept<B64>, c: &EptConfig) -> (Vec<f64>, Vec<f64>) {
        let (s, r, d, m, e, h) = (c.prompt_len, c.rank, D, M, c.experts, c.hidden(M));
        let v = |i: usize| &meth.params()[i].value;
        let (ps, a, b) = (v(PROMPT), v(LOW_A), v(LOW_B));
        let mut ab = vec![0.0; m * d];
        for i in 0..m {
            for j in 0..d {
                ab[i * d + j] = (0..r).map(|k| a[i * r + k] * b[k * d + j]).sum();
            }
        }
        let mut scores = vec![0.0; s * m];
        for p in 0..s {
            for j in 0..m {
                let dot: f64 = (0..d).map(|k| ps[p * d + k] * ab[j * d + k]).sum();
                scores[p * m + j] = dot / (d as f64).sqrt();
            }
        }
        let mut rows = vec![0.0; s * d];
        match c.fusion {
            Fusion::Attend => {
                for p in 0..s {
                    let w = softmax(&scores[p * m..(p + 1) * m]);
                    for k in 0..d {
                        let att: f64 = (0..m).map(|j| w[j] * ab[j * d + k]).sum();
                        rows[p * d + k] = ps[p * d + k] + att;
                    }
                }
            }
            Fusion::Paper => {
                let mut wp = vec![0.0; s * m];
                for j in 0..m {
                    let col: Vec<f64> = (0..s).map(|p| scores[p * m + j]).collect();
                    for (p, x) in softmax(&col).into_iter().enumerate() {
                        wp[p * m + j] = x;
                    }
                }
                for p in 0..s {
                    let g = 1.0 + wp[p * m..(p + 1) * m].iter().sum::<f64>();
                    for k in 0..d {
                        rows[p * d + k] = g * ps[p * d + k];
                    }
                }
            }
        }
        if c.multi_space {
            let (gw, gb) = (v(EXPERT0 + 4 * e), v(EXPERT0 + 4 * e + 1));
            for p in 0..s {
                let x = &ps[p * d..(p + 1) * d];
                let logits: Vec<f64> = (0..e)
                    .map(|i| gb[i] + (0..d).map(|k| gw[i * d + k] * x[k]).sum::<f64>())
                    .collect();
                let g = softmax(&logits);
                for (i, gi) in g.iter().enumerate() {
                    let (wd, bd, wu, bu) = expert_idx(i);
                    let (wd, bd, wu, bu) = (v(wd), v(bd), v(wu), v(bu));
                    let hid: Vec<f64> = (0..h)
                        .map(|t| {
                            let z = bd[t] + (0..d).map(|k| wd[t * d + k] * x[k]).sum::<f64>();
                            z.max(0.0)
                        })
                        .collect();
                    for k in 0..d {
                        let y = bu[k] + (0..h).map(|t| wu[k * h + t] * hid[t]).sum::<f64>();
                        rows[p * d + k] += gi * y;
                    }
                }
            }
        }
        (rows, ab)
    }

    #[test]
    fn ept_forward_matches_host_loops() {
        for fusion in [Fusion::Attend, Fusion::Paper] {
            for multi_space in [true, false] {
                let c = cfg(fusion, LowRankInit::Svd, multi_space);
                with_context(D, M, |be, ctx| {
                    let mut meth = Ept::new(be, &c, ctx).unwrap();
                    meth.forward(be);
                    let (rows, ab) = reference(&meth, &c);
                    let err = rel_err(meth.rows(), &rows);
                    assert!(
                        err < 1e-13,
                        "{fusion:?} ms={multi_space}: rows rel err {err}"
                    );
                    assert!(rel_err(meth.update().unwrap(), &ab) < 1e-13);
                });
            }
        }
    }

    /// s = 0, the end point of the paper's sweep over s: no prompt rows, no experts, and the
    /// update alone carries the gradient into A and B.
    #[test]
    fn ept_without_prompt_rows_is_the_update_alone() {
        for init in [LowRankInit::Svd, LowRankInit::Lora] {
            let c = EptConfig {
                prompt_len: 0,
                ..cfg(Fusion::Attend, init, true)
            };
            with_context(D, M, |be, ctx| {
                let mut meth = Ept::new(be, &c, ctx).unwrap();
                assert_eq!(meth.prompt_rows(), 0);
                assert_eq!(meth.params().len(), 3, "no experts or gate at s = 0");
                if init == LowRankInit::Lora {
                    meth.params_mut()[LOW_B].value = random_vec(3 * D, 1.0, 77);
                }
                check_method_gradients(be, &mut meth, &MethodConfig::Ept(c.clone()), ctx);
            });
        }
        let none = MethodConfig::Ept(EptConfig {
            prompt_len: 0,
            rank: 0,
            ..EptConfig::default()
        });
        let err = none.validate(768, 256).unwrap_err().to_string();
        assert!(err.contains("nothing to train"), "{err}");
    }

    #[test]
    fn ept_default_counts() {
        let c = MethodConfig::default_for("ept").unwrap();
        let counts = c.param_counts(768, 256);
        assert_eq!((counts.train, counts.stored), (1_656_836, 76_800));
        // The tensors allocated at base size match.
        with_context(768, 256, |be, ctx| {
            let meth = build_method(be, &c, ctx).unwrap();
            assert_eq!(train_params(meth.as_ref()), 1_656_836);
            assert_eq!(meth.stored_params(), 76_800);
        });
    }
}
