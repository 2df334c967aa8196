//! AdamW over a prompt method's parameters, with one learning rate per parameter group and
//! global gradient-norm clipping. The moments and a master copy of each parameter live on the
//! backend next to the parameters, in f32 on a GPU (`Backend::State`) whatever the storage
//! dtype; the parameter the model reads is the master rounded after every step.

use crate::backend::profiling::nvtx_range;
use crate::backend::{AdamW, Backend};
use crate::config::TrainConfig;
use crate::prompt::{ParamGroup, PromptMethod};

/// What one optimiser step did.
#[derive(Debug, Clone, Copy)]
pub struct StepInfo {
    /// ‖gradient‖ (after the 1/accumulation scaling, before clipping).
    pub grad_norm: f64,
    /// The prompt group's learning rate this step.
    pub lr: f64,
}

pub struct Optimizer<B: Backend> {
    master: Vec<B::State>, // one per method parameter, same shape
    m: Vec<B::State>,      // one per method parameter, same shape
    v: Vec<B::State>,      // one per method parameter, same shape
    /// Optimiser steps taken so far.
    pub step: u64,
    lr: f64,
    lr_lowrank: f64,
    beta1: f64,
    beta2: f64,
    eps: f64,
    weight_decay: f64,
    max_grad_norm: f64,
}

impl<B: Backend> Optimizer<B> {
    /// The masters start from the method's current parameter values.
    pub fn new(be: &B, method: &dyn PromptMethod<B>, cfg: &TrainConfig) -> Self {
        let zeros = || -> Vec<B::State> {
            method
                .params()
                .iter()
                .map(|p| be.state_upload(&vec![0.0; p.numel()]))
                .collect()
        };
        Optimizer {
            master: method
                .params()
                .iter()
                .map(|p| be.state_upload(&be.download_f64(&p.value)))
                .collect(),
            m: zeros(),
            v: zeros(),
            step: 0,
            lr: cfg.lr,
            lr_lowrank: cfg.lr_lowrank,
            beta1: cfg.adam_beta1,
            beta2: cfg.adam_beta2,
            eps: cfg.adam_eps,
            weight_decay: cfg.weight_decay,
            max_grad_norm: cfg.max_grad_norm,
        }
    }

    /// One AdamW step on every parameter of `method`: gradients are scaled by `grad_scale`
    /// (1 / micro-batches), clipped to `max_grad_norm` over all parameters together, and each
    /// group uses its base learning rate times `lr_factor` (the schedule).
    pub fn step(
        &mut self,
        be: &B,
        method: &mut dyn PromptMethod<B>,
        lr_factor: f64,
        grad_scale: f64,
    ) -> StepInfo {
        let grad_norm = Self::grad_norm(be, method, grad_scale);
        self.apply(be, method, lr_factor, grad_scale, grad_norm)
    }

    /// ‖gradient‖ of every parameter of `method` together, times `grad_scale`: NaN or infinite
    /// when any gradient entry is (the trainer checks it before [`Self::apply`]).
    pub fn grad_norm(be: &B, method: &dyn PromptMethod<B>, grad_scale: f64) -> f64 {
        let sum_sq: f64 = method
            .params()
            .iter()
            .map(|p| be.sum_squares(&p.grad))
            .sum();
        sum_sq.sqrt() * grad_scale
    }

    /// [`Self::step`] with the gradient norm already computed by [`Self::grad_norm`].
    pub fn apply(
        &mut self,
        be: &B,
        method: &mut dyn PromptMethod<B>,
        lr_factor: f64,
        grad_scale: f64,
        grad_norm: f64,
    ) -> StepInfo {
        let _range = nvtx_range("optimizer (AdamW)");
        // As torch.nn.utils.clip_grad_norm_: scale by max_norm / (norm + 1e-6) when above.
        let clip = if self.max_grad_norm > 0.0 && grad_norm > self.max_grad_norm {
            self.max_grad_norm / (grad_norm + 1e-6)
        } else {
            1.0
        };
        self.step += 1;
        for (((p, master), m), v) in method
            .params_mut()
            .iter_mut()
            .zip(&mut self.master)
            .zip(&mut self.m)
            .zip(&mut self.v)
        {
            let base = match p.group {
                ParamGroup::Prompt => self.lr,
                ParamGroup::LowRank => self.lr_lowrank,
            };
            let h = AdamW {
                lr: base * lr_factor,
                beta1: self.beta1,
                beta2: self.beta2,
                eps: self.eps,
                weight_decay: self.weight_decay,
                step: self.step,
                grad_scale: grad_scale * clip,
            };
            be.adamw_step(&mut p.value, master, m, v, &p.grad, h);
        }
        StepInfo {
            grad_norm,
            lr: self.lr * lr_factor,
        }
    }

    /// The prompt group's base learning rate (before the schedule).
    pub fn lr(&self) -> f64 {
        self.lr
    }

    /// The moments `(m, v)` of each parameter, for checkpoints.
    pub fn moments(&self, be: &B) -> Vec<(Vec<f64>, Vec<f64>)> {
        self.m
            .iter()
            .zip(&self.v)
            .map(|(m, v)| (be.state_download(m), be.state_download(v)))
            .collect()
    }

    /// The master copy of each parameter: what a checkpoint saves (more precise than a bf16
    /// parameter).
    pub fn masters(&self, be: &B) -> Vec<Vec<f64>> {
        self.master.iter().map(|x| be.state_download(x)).collect()
    }

    /// Restores a checkpoint: the master `values` and moments `(m, v)` of each parameter (in
    /// [`Self::moments`]' order) and the step count. The method's parameters must already hold
    /// the same values.
    pub fn restore(
        &mut self,
        be: &B,
        values: &[Vec<f64>],
        moments: &[(Vec<f64>, Vec<f64>)],
        step: u64,
    ) {
        assert!(
            values.len() == self.m.len() && moments.len() == self.m.len(),
            "restore: one value and (m, v) per parameter"
        );
        for (i, (value, (sm, sv))) in values.iter().zip(moments).enumerate() {
            self.master[i] = be.state_upload(value);
            self.m[i] = be.state_upload(sm);
            self.v[i] = be.state_upload(sv);
        }
        self.step = step;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::cpu::CpuBackend;
    use crate::prompt::testing::with_context;
    use crate::prompt::{build_method, MethodConfig};

    fn cfg(max_grad_norm: f64) -> TrainConfig {
        TrainConfig {
            lr: 0.1,
            lr_lowrank: 0.01,
            weight_decay: 0.0,
            max_grad_norm,
            ..TrainConfig::default()
        }
    }

    /// Builds DePT (a prompt group and a low-rank group), sets every gradient to `g`, takes one
    /// step, and returns (step info, first moment of each parameter, parameter change).
    fn one_step(
        max_grad_norm: f64,
        g: f64,
        grad_scale: f64,
    ) -> (StepInfo, Vec<Vec<f64>>, Vec<Vec<f64>>) {
        let mut result = None;
        with_context(4, 6, |be: &CpuBackend<f64>, ctx| {
            let mc = MethodConfig::from_toml("dept", "prompt_len = 2\nrank = 2").unwrap();
            let mut method = build_method(be, &mc, ctx).unwrap();
            let mut opt = Optimizer::new(be, method.as_ref(), &cfg(max_grad_norm));
            let before: Vec<Vec<f64>> = method.params().iter().map(|p| p.value.clone()).collect();
            for p in method.params_mut() {
                p.grad.iter_mut().for_each(|x| *x = g);
            }
            let info = opt.step(be, method.as_mut(), 0.5, grad_scale);
            let m: Vec<Vec<f64>> = opt.moments(be).into_iter().map(|(m, _)| m).collect();
            let delta = method
                .params()
                .iter()
                .zip(&before)
                .map(|(p, b)| p.value.iter().zip(b).map(|(x, y)| x - y).collect())
                .collect();
            result = Some((info, m, delta));
        });
        result.unwrap()
    }

    #[test]
    fn gradients_are_scaled_then_clipped_to_the_global_norm() {
        // DePT with d = 4, m = 6, s = 2, r = 2: 8 + 12 + 8 = 28 gradient entries of 3, scaled by ½.
        let n = 28.0f64;
        let (info, m, _) = one_step(1.0, 3.0, 0.5);
        assert!((info.grad_norm - 1.5 * n.sqrt()).abs() < 1e-12);
        // m = (1 − β1)·g·scale·clip with clip = 1 / (norm + 1e-6)
        let want = 0.1 * 1.5 / (info.grad_norm + 1e-6);
        assert!(
            m.iter().flatten().all(|&x| (x - want).abs() < 1e-15),
            "{m:?}"
        );
        // No clipping when disabled or below the limit.
        let (_, m, _) = one_step(0.0, 3.0, 0.5);
        assert!(m.iter().flatten().all(|&x| (x - 0.1 * 1.5).abs() < 1e-15));
        let (_, m, _) = one_step(100.0, 3.0, 0.5);
        assert!(m.iter().flatten().all(|&x| (x - 0.1 * 1.5).abs() < 1e-15));
    }

    #[test]
    fn each_group_uses_its_learning_rate_times_the_schedule() {
        // First Adam step moves every entry by lr·sign(g) (m̂/√v̂ = ±1, up to eps).
        let (info, _, delta) = one_step(0.0, 2.0, 1.0);
        assert_eq!(info.lr, 0.05);
        let expect = [0.1 * 0.5, 0.01 * 0.5, 0.01 * 0.5]; // prompt, lowrank.a, lowrank.b
        for (d, e) in delta.iter().zip(expect) {
            assert!(d.iter().all(|&x| (x + e).abs() < 1e-9), "{d:?} vs −{e}");
        }
    }
}
