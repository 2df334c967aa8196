//! The checks behind `fastpt doctor`: every GPU op and whole training steps against the CPU
//! reference on random data, on any [`Device`]. `cargo test` runs them on the virtual GPU; on a
//! GPU machine `fastpt doctor` runs them on the real one.
//!
//! Inputs are rounded to the backend's dtype before the CPU sees them, so both backends start
//! from the same numbers; errors are ‖gpu − cpu‖ / ‖cpu‖. Sizes are odd so that swapped
//! dimensions show. (The detailed per-op unit tests are in `gpu/tests/`.)

use half::bf16;

use super::device::{Arg, DType, Device, LaunchCfg};
use super::{AttentionKernel, GpuBackend};
use crate::backend::cpu::CpuBackend;
use crate::backend::nf4::{dequantize_nf4, quantize_nf4};
use crate::backend::{
    Activation, AdamW, AttnDims, AttnMask, Backend, CrossEntropyDims, EmbedPromptDims,
    FusionAttentionDims, FusionMode, GatedExpertsDims, Gemm, LampPoolDims, LayerNormDims, RelBias,
    RmsNormDims, RopeDims,
};
use crate::engine::{build_backbone_method, forward_backward};
use crate::model::generate::{GenerateConfig, Generated};
use crate::model::linear::Quant;
use crate::model::{random_model_rounded, Backbone};
use crate::prompt::MethodConfig;
use crate::testing::{random_vec, rel_err_f32};

/// One row of the doctor's table.
#[derive(Debug, Clone)]
pub struct CheckResult {
    pub op: String,
    pub dtype: DType,
    /// ‖gpu − cpu‖ / ‖cpu‖ (NaN when the GPU produced a non-finite value).
    pub rel_err: f64,
    pub tol: f64,
}

impl CheckResult {
    pub fn passed(&self) -> bool {
        self.rel_err <= self.tol
    }
}

/// The tolerance of one op: f32 1e-5, bf16 2e-2.
pub fn op_tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-5,
        DType::Bf16 => 2e-2,
    }
}

/// The tolerance of a whole step's outputs (loss, logits): f32 1e-4 (errors compound over
/// layers), bf16 2e-2.
pub fn step_tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-4,
        DType::Bf16 => 2e-2,
    }
}

/// The tolerance of a whole step's gradients. In bf16 every activation of the forward and every
/// gradient of the backward is stored rounded to 8 bits of mantissa; over the dozens of ops
/// between the loss and the input embeddings these roundings add up to 3–5e-2 (measured on
/// t5-tiny against the f32 CPU with the same bf16 weights), so bf16 gets 1e-1. A real bug (a
/// wrong sign, a skipped head or row) gives errors of order 1; the f32 row is the tight check.
pub fn step_grad_tolerance(dtype: DType) -> f64 {
    match dtype {
        DType::F32 => 1e-4,
        DType::Bf16 => 1e-1,
    }
}

/// Markdown table of results, failures marked.
pub fn results_table(results: &[CheckResult]) -> String {
    let mut s = String::from("| op | dtype | rel err | tol | result |\n|---|---|---:|---:|---|\n");
    for r in results {
        s.push_str(&format!(
            "| {} | {} | {:.2e} | {:.0e} | {} |\n",
            r.op,
            r.dtype,
            r.rel_err,
            r.tol,
            if r.passed() { "pass" } else { "FAIL" }
        ));
    }
    s
}

struct Checker<'a, D: Device> {
    gpu: &'a GpuBackend<D>,
    cpu: CpuBackend<f32>,
    seed: u64,
    results: Vec<CheckResult>,
}

impl<D: Device> Checker<'_, D> {
    fn dtype(&self) -> DType {
        self.gpu.dtype()
    }

    /// Fresh random values in (-scale, scale), rounded to the dtype.
    fn rand(&mut self, n: usize, scale: f64) -> Vec<f32> {
        self.seed += 1;
        let dt = self.dtype();
        random_vec(n, scale, self.seed)
            .into_iter()
            .map(|x| round(x as f32, dt))
            .collect()
    }

    fn up(&self, x: &[f32]) -> super::GpuTensor<D> {
        self.gpu.upload_f32(x.to_vec())
    }

    fn nan(&self, n: usize) -> super::GpuTensor<D> {
        self.gpu.upload_f32(vec![f32::NAN; n])
    }

    fn record(&mut self, op: &str, got: &super::GpuTensor<D>, want: &[f32], tol: f64) {
        let got = self.gpu.download_f32(got);
        let rel_err = if got.iter().all(|x| x.is_finite()) {
            rel_err_f32(&got, want)
        } else {
            f64::NAN
        };
        self.results.push(CheckResult {
            op: op.to_string(),
            dtype: self.dtype(),
            rel_err,
            tol,
        });
    }

    fn matmul(&mut self) {
        let tol = op_tolerance(self.dtype());
        for (name, ta, tb, acc) in [
            ("matmul nn", false, false, false),
            ("matmul nt", false, true, false),
            ("matmul tn +=", true, false, true),
        ] {
            let (m, n, k) = (37, 29, 53);
            let g = Gemm {
                trans_a: ta,
                trans_b: tb,
                ..Gemm::nn(m, n, k)
            }
            .alpha(0.7)
            .accumulate(acc);
            let (a, b, c0) = (
                self.rand(m * k, 1.0),
                self.rand(k * n, 1.0),
                self.rand(m * n, 1.0),
            );
            let mut want = c0.clone();
            self.cpu.matmul(&mut want, &a, &b, g);
            let mut out = if acc { self.up(&c0) } else { self.nan(m * n) };
            self.gpu.matmul(&mut out, &self.up(&a), &self.up(&b), g);
            self.record(name, &out, &want, tol);
        }
    }

    fn rows(&mut self) {
        let tol = op_tolerance(self.dtype());
        let (b, t, p, c, v) = (3, 7, 5, 33, 41);
        let table = self.rand(v * c, 1.0);
        let ids: Vec<i32> = (0..b * t).map(|i| ((i * 17 + 3) % v) as i32).collect();
        let prompt = self.rand(p * c, 1.0);
        let update = self.rand((t + 2) * c, 0.5);
        let mut want = vec![0f32; b * (p + t) * c];
        self.cpu.embed_prompt_forward(
            &mut want,
            &table,
            &ids,
            &prompt,
            Some(&update),
            EmbedPromptDims { b, t, p, c },
        );
        let mut out = self.nan(b * (p + t) * c);
        let gids = self.gpu.upload_index(&ids);
        let (gu, gp, gt) = (self.up(&update), self.up(&prompt), self.up(&table));
        self.gpu.embed_prompt_forward(
            &mut out,
            &gt,
            &gids,
            &gp,
            Some(&gu),
            EmbedPromptDims { b, t, p, c },
        );
        self.record("embed_prompt_forward", &out, &want, tol);

        let dout = self.rand(b * (p + t) * c, 1.0);
        let (mut dp_r, mut du_r) = (vec![0f32; p * c], vec![0f32; (t + 2) * c]);
        self.cpu.embed_prompt_backward(
            &mut dp_r,
            Some(&mut du_r),
            &dout,
            EmbedPromptDims { b, t, p, c },
        );
        let (mut dp, mut du) = (self.nan(p * c), self.nan((t + 2) * c));
        self.gpu.embed_prompt_backward(
            &mut dp,
            Some(&mut du),
            &self.up(&dout),
            EmbedPromptDims { b, t, p, c },
        );
        self.record("embed_prompt_backward d_prompt", &dp, &dp_r, tol);
        self.record("embed_prompt_backward d_update", &du, &du_r, tol);

        let rows: Vec<i32> = vec![4, 0, 9, 2, 11];
        let mut want = vec![0f32; rows.len() * c];
        self.cpu
            .gather_rows(&mut want, &table, &rows, rows.len(), c);
        let mut out = self.nan(rows.len() * c);
        self.gpu
            .gather_rows(&mut out, &gt, &self.gpu.upload_index(&rows), rows.len(), c);
        self.record("gather_rows", &out, &want, tol);

        let (d0, src) = (self.rand(v * c, 1.0), self.rand(rows.len() * c, 1.0));
        let mut want = d0.clone();
        self.cpu
            .scatter_rows_add(&mut want, &src, &rows, rows.len(), c);
        let mut out = self.up(&d0);
        let src_g = self.up(&src);
        self.gpu.scatter_rows_add(
            &mut out,
            &src_g,
            &self.gpu.upload_index(&rows),
            rows.len(),
            c,
        );
        self.record("scatter_rows_add", &out, &want, tol);
    }

    fn elementwise(&mut self) {
        let tol = op_tolerance(self.dtype());
        let (n, f) = (13, 67);
        let (x0, y) = (self.rand(n * f, 1.0), self.rand(n * f, 1.0));
        let mut want = x0.clone();
        self.cpu.add_assign(&mut want, &y);
        let mut out = self.up(&x0);
        self.gpu.add_assign(&mut out, &self.up(&y));
        self.record("add_assign", &out, &want, tol);

        let bias = self.rand(f, 1.0);
        let mut want = x0.clone();
        self.cpu.add_bias(&mut want, &bias, n, f);
        let mut out = self.up(&x0);
        self.gpu.add_bias(&mut out, &self.up(&bias), n, f);
        self.record("add_bias", &out, &want, tol);

        let mut want = bias.clone();
        self.cpu.bias_backward(&mut want, &y, n, f);
        let mut out = self.up(&bias);
        self.gpu.bias_backward(&mut out, &self.up(&y), n, f);
        self.record("bias_backward", &out, &want, tol);

        let len = n * f;
        for (name, act, gated) in [
            ("relu", Activation::Relu, false),
            ("gelu_tanh·gate", Activation::GeluTanh, true),
            ("silu·gate", Activation::Silu, true),
        ] {
            let (a, gate, dout) = (
                self.rand(len, 3.0),
                self.rand(len, 1.0),
                self.rand(len, 1.0),
            );
            let gate_c = gated.then_some(&gate);
            let mut want = vec![0f32; len];
            self.cpu.gated_act_forward(&mut want, &a, gate_c, act, len);
            let (ga, gg, gd) = (self.up(&a), self.up(&gate), self.up(&dout));
            let mut out = self.nan(len);
            self.gpu
                .gated_act_forward(&mut out, &ga, gated.then_some(&gg), act, len);
            self.record(&format!("gated_act_forward {name}"), &out, &want, tol);

            let (mut da_r, mut dg_r) = (vec![0f32; len], vec![0f32; len]);
            self.cpu.gated_act_backward_dinp(
                &mut da_r,
                gated.then_some(&mut dg_r),
                &dout,
                &a,
                gate_c,
                act,
                len,
            );
            let (mut da, mut dg) = (self.nan(len), self.nan(len));
            self.gpu.gated_act_backward_dinp(
                &mut da,
                gated.then_some(&mut dg),
                &gd,
                &ga,
                gated.then_some(&gg),
                act,
                len,
            );
            self.record(&format!("gated_act_backward_dinp {name}"), &da, &da_r, tol);
            if gated {
                self.record(
                    &format!("gated_act_backward_dinp {name} dgate"),
                    &dg,
                    &dg_r,
                    tol,
                );
            }
        }
    }

    /// NF4 dequantisation of an odd-length tensor (a partial last block, an odd last byte).
    fn nf4(&mut self) {
        let n = 64 * 300 + 37;
        let x = self.rand(n, 2.0);
        let q = quantize_nf4(&x);
        let mut want = vec![0f32; n];
        dequantize_nf4(&mut want, &q);
        let gq = self.gpu.upload_nf4(q);
        let mut out = self.nan(n);
        self.gpu.nf4_dequantize(&mut out, &gq);
        // The f32 kernel is bit-identical to the CPU; bf16 rounds once.
        let tol = match self.dtype() {
            DType::F32 => 1e-7,
            DType::Bf16 => op_tolerance(DType::Bf16),
        };
        self.record("nf4_dequantize", &out, &want, tol);
    }

    /// EPT-MS fusion (both readings) and gated experts, LAMP pooling: forward and backward.
    fn method_ops(&mut self, dims: MethodDims) {
        let tol = op_tolerance(self.dtype());
        let dt = self.dtype();
        let MethodDims {
            s,
            m,
            c,
            e,
            l,
            r,
            p,
        } = dims;
        let tag = format!("s{s} m{m} c{c}");
        let (ps, lr, dout) = (
            self.rand(s * c, 1.0),
            self.rand(m * c, 1.0),
            self.rand(s * c, 1.0),
        );
        let (gps, glr, gdout) = (self.up(&ps), self.up(&lr), self.up(&dout));
        for (name, mode) in [("attend", FusionMode::Attend), ("paper", FusionMode::Paper)] {
            let (mut out_r, mut probs_r) = (vec![0f32; s * c], vec![0f32; s * m]);
            self.cpu.fusion_attention_forward(
                &mut out_r,
                &mut probs_r,
                &ps,
                &lr,
                mode,
                FusionAttentionDims { s, m, c },
            );
            let (mut out, mut probs) = (self.nan(s * c), self.nan(s * m));
            self.gpu.fusion_attention_forward(
                &mut out,
                &mut probs,
                &gps,
                &glr,
                mode,
                FusionAttentionDims { s, m, c },
            );
            self.record(
                &format!("fusion_attention_forward {name} {tag}"),
                &out,
                &out_r,
                tol,
            );
            self.record(
                &format!("fusion_attention_forward {name} probs {tag}"),
                &probs,
                &probs_r,
                tol,
            );
            // The backward from the same saved probabilities on both sides.
            let probs_r: Vec<f32> = probs_r.iter().map(|&x| round(x, dt)).collect();
            let (mut dps_r, mut dlr_r) = (vec![0f32; s * c], vec![0f32; m * c]);
            self.cpu.fusion_attention_backward(
                &mut dps_r,
                &mut dlr_r,
                &dout,
                &ps,
                &lr,
                &probs_r,
                mode,
                FusionAttentionDims { s, m, c },
            );
            let (mut dps, mut dlr) = (self.nan(s * c), self.nan(m * c));
            self.gpu.fusion_attention_backward(
                &mut dps,
                &mut dlr,
                &gdout,
                &gps,
                &glr,
                &self.up(&probs_r),
                mode,
                FusionAttentionDims { s, m, c },
            );
            self.record(
                &format!("fusion_attention_backward {name} d_ps {tag}"),
                &dps,
                &dps_r,
                tol,
            );
            self.record(
                &format!("fusion_attention_backward {name} d_lr {tag}"),
                &dlr,
                &dlr_r,
                tol,
            );
        }

        let tag = format!("n{s} c{c} e{e}");
        let logits = self.rand(s * e, 2.0);
        let mut gate = vec![0f32; s * e];
        self.cpu.softmax_rows_forward(&mut gate, &logits, s, e);
        let gate: Vec<f32> = gate.iter().map(|&x| round(x, dt)).collect();
        let experts: Vec<Vec<f32>> = (0..e).map(|_| self.rand(s * c, 1.0)).collect();
        let refs: Vec<&Vec<f32>> = experts.iter().collect();
        let mut want = vec![0f32; s * c];
        self.cpu
            .gated_experts_forward(&mut want, &gate, &refs, GatedExpertsDims { n: s, c });
        let ggate = self.up(&gate);
        let gexperts: Vec<_> = experts.iter().map(|x| self.up(x)).collect();
        let grefs: Vec<_> = gexperts.iter().collect();
        let mut out = self.nan(s * c);
        self.gpu
            .gated_experts_forward(&mut out, &ggate, &grefs, GatedExpertsDims { n: s, c });
        self.record(&format!("gated_experts_forward {tag}"), &out, &want, tol);
        let mut dg_r = vec![0f32; s * e];
        let mut dx_r: Vec<Vec<f32>> = (0..e).map(|_| vec![0f32; s * c]).collect();
        self.cpu.gated_experts_backward(
            &mut dg_r,
            &mut dx_r,
            &dout,
            &gate,
            &refs,
            GatedExpertsDims { n: s, c },
        );
        let mut dg = self.nan(s * e);
        let mut dx: Vec<_> = (0..e).map(|_| self.nan(s * c)).collect();
        self.gpu.gated_experts_backward(
            &mut dg,
            &mut dx,
            &gdout,
            &ggate,
            &grefs,
            GatedExpertsDims { n: s, c },
        );
        self.record(
            &format!("gated_experts_backward d_gate {tag}"),
            &dg,
            &dg_r,
            tol,
        );
        for (i, (got, want)) in dx.iter().zip(&dx_r).enumerate() {
            self.record(
                &format!("gated_experts_backward d_expert{i} {tag}"),
                got,
                want,
                tol,
            );
        }

        let tag = format!("l{l} r{r} c{c} p{p}");
        let (u, q, v) = (
            self.rand(l * r, 1.0),
            self.rand(r, 1.5),
            self.rand(c * r, 1.0),
        );
        let (gu, gq, gv) = (self.up(&u), self.up(&q), self.up(&v));
        let mut want = vec![0f32; l / p * c];
        self.cpu
            .lamp_pool_forward(&mut want, &u, &q, &v, LampPoolDims { l, r, c, p });
        let mut out = self.nan(l / p * c);
        self.gpu
            .lamp_pool_forward(&mut out, &gu, &gq, &gv, LampPoolDims { l, r, c, p });
        self.record(&format!("lamp_pool_forward {tag}"), &out, &want, tol);
        // The backward accumulates: start from random gradients.
        let (du0, dq0, dv0, dy) = (
            self.rand(l * r, 1.0),
            self.rand(r, 1.0),
            self.rand(c * r, 1.0),
            self.rand(l / p * c, 1.0),
        );
        let (mut du_r, mut dq_r, mut dv_r) = (du0.clone(), dq0.clone(), dv0.clone());
        self.cpu.lamp_pool_backward(
            &mut du_r,
            &mut dq_r,
            &mut dv_r,
            &dy,
            &u,
            &q,
            &v,
            LampPoolDims { l, r, c, p },
        );
        let (mut du, mut dq, mut dv) = (self.up(&du0), self.up(&dq0), self.up(&dv0));
        self.gpu.lamp_pool_backward(
            &mut du,
            &mut dq,
            &mut dv,
            &self.up(&dy),
            &gu,
            &gq,
            &gv,
            LampPoolDims { l, r, c, p },
        );
        self.record(&format!("lamp_pool_backward du {tag}"), &du, &du_r, tol);
        self.record(&format!("lamp_pool_backward dq {tag}"), &dq, &dq_r, tol);
        self.record(&format!("lamp_pool_backward dv {tag}"), &dv, &dv_r, tol);
    }

    /// RoPE forward and input gradient on a GQA-like key layout: positions unordered and
    /// repeated, the tables' last row included.
    fn rope(&mut self) {
        let tol = op_tolerance(self.dtype());
        let dt = self.dtype();
        let (n, h, d, rows) = (11, 3, 18, 13);
        let half = d / 2;
        let angles = self.rand(rows * half, 3.0);
        let cos: Vec<f32> = angles.iter().map(|a| round(a.cos(), dt)).collect();
        let sin: Vec<f32> = angles.iter().map(|a| round(a.sin(), dt)).collect();
        let positions: Vec<i32> = (0..n).map(|i| ((i * 5 + 2) % rows) as i32).collect();
        let (x, dy) = (self.rand(n * h * d, 1.0), self.rand(n * h * d, 1.0));
        let (gcos, gsin, gx, gdy) = (self.up(&cos), self.up(&sin), self.up(&x), self.up(&dy));
        let gpos = self.gpu.upload_index(&positions);
        let mut want = vec![0f32; n * h * d];
        self.cpu
            .rope_forward(&mut want, &x, &positions, &cos, &sin, RopeDims { n, h, d });
        let mut y = self.nan(n * h * d);
        self.gpu
            .rope_forward(&mut y, &gx, &gpos, &gcos, &gsin, RopeDims { n, h, d });
        self.record("rope_forward", &y, &want, tol);
        self.cpu
            .rope_backward_dinp(&mut want, &dy, &positions, &cos, &sin, RopeDims { n, h, d });
        let mut dx = self.nan(n * h * d);
        self.gpu
            .rope_backward_dinp(&mut dx, &gdy, &gpos, &gcos, &gsin, RopeDims { n, h, d });
        self.record("rope_backward_dinp", &dx, &want, tol);
    }

    fn norms(&mut self) {
        let tol = op_tolerance(self.dtype());
        let dt = self.dtype();
        let (n, c) = (9, 301);
        let (x, w, bias, dy) = (
            self.rand(n * c, 2.0),
            self.rand(c, 1.5),
            self.rand(c, 0.5),
            self.rand(n * c, 1.0),
        );
        let (mut y_r, mut r_r) = (vec![0f32; n * c], vec![0f32; n]);
        self.cpu
            .rmsnorm_forward(&mut y_r, &mut r_r, &x, &w, 1e-6, RmsNormDims { n, c });
        let (gx, gw, gdy) = (self.up(&x), self.up(&w), self.up(&dy));
        let (mut y, mut r) = (self.nan(n * c), self.nan(n));
        self.gpu
            .rmsnorm_forward(&mut y, &mut r, &gx, &gw, 1e-6, RmsNormDims { n, c });
        self.record("rmsnorm_forward", &y, &y_r, tol);
        let r_round: Vec<f32> = r_r.iter().map(|&v| round(v, dt)).collect();
        let acc = self.rand(n * c, 1.0);
        let mut want = acc.clone();
        self.cpu
            .rmsnorm_backward_dinp(&mut want, &dy, &x, &w, &r_round, RmsNormDims { n, c });
        let mut dx = self.up(&acc);
        self.gpu.rmsnorm_backward_dinp(
            &mut dx,
            &gdy,
            &gx,
            &gw,
            &self.up(&r_round),
            RmsNormDims { n, c },
        );
        self.record("rmsnorm_backward_dinp", &dx, &want, tol);

        let (mut y_r, mut m_r, mut r_r) = (vec![0f32; n * c], vec![0f32; n], vec![0f32; n]);
        self.cpu.layernorm_forward(
            &mut y_r,
            &mut m_r,
            &mut r_r,
            &x,
            &w,
            &bias,
            1e-5,
            LayerNormDims { n, c },
        );
        let (mut y, mut m, mut r) = (self.nan(n * c), self.nan(n), self.nan(n));
        self.gpu.layernorm_forward(
            &mut y,
            &mut m,
            &mut r,
            &gx,
            &gw,
            &self.up(&bias),
            1e-5,
            LayerNormDims { n, c },
        );
        self.record("layernorm_forward", &y, &y_r, tol);
        let m_round: Vec<f32> = m_r.iter().map(|&v| round(v, dt)).collect();
        let r_round: Vec<f32> = r_r.iter().map(|&v| round(v, dt)).collect();
        let (dw0, db0) = (self.rand(c, 1.0), self.rand(c, 1.0));
        let (mut dx_r, mut dw_r, mut db_r) = (vec![0f32; n * c], dw0.clone(), db0.clone());
        self.cpu.layernorm_backward(
            &mut dx_r,
            &mut dw_r,
            &mut db_r,
            &dy,
            &x,
            &w,
            &m_round,
            &r_round,
            LayerNormDims { n, c },
        );
        let (mut dx, mut dw, mut db) = (self.nan(n * c), self.up(&dw0), self.up(&db0));
        self.gpu.layernorm_backward(
            &mut dx,
            &mut dw,
            &mut db,
            &gdy,
            &gx,
            &gw,
            &self.up(&m_round),
            &self.up(&r_round),
            LayerNormDims { n, c },
        );
        self.record("layernorm_backward dinp", &dx, &dx_r, tol);
        self.record("layernorm_backward dweight", &dw, &dw_r, tol);
        self.record("layernorm_backward dbias", &db, &db_r, tol);

        let k = 45;
        let (s, ds) = (self.rand(n * k, 3.0), self.rand(n * k, 1.0));
        let mut p_r = vec![0f32; n * k];
        self.cpu.softmax_rows_forward(&mut p_r, &s, n, k);
        let mut p = self.nan(n * k);
        self.gpu.softmax_rows_forward(&mut p, &self.up(&s), n, k);
        self.record("softmax_rows_forward", &p, &p_r, tol);
        let p_round: Vec<f32> = p_r.iter().map(|&v| round(v, dt)).collect();
        let mut dx_r = vec![0f32; n * k];
        self.cpu
            .softmax_rows_backward_dinp(&mut dx_r, &ds, &p_round, n, k);
        let mut dx = self.nan(n * k);
        self.gpu
            .softmax_rows_backward_dinp(&mut dx, &self.up(&ds), &self.up(&p_round), n, k);
        self.record("softmax_rows_backward_dinp", &dx, &dx_r, tol);
    }

    fn attention(&mut self) {
        let tol = op_tolerance(self.dtype());
        let dt = self.dtype();
        // (name, dims, causal, bias: Some(bidirectional), padded keys)
        let cases = [
            (
                "encoder (bias, padding)",
                AttnDims {
                    b: 2,
                    t: 11,
                    s: 11,
                    h: 3,
                    h_kv: 3,
                    d: 5,
                },
                false,
                Some(true),
                true,
            ),
            (
                "decoder (causal, bias)",
                AttnDims {
                    b: 2,
                    t: 9,
                    s: 9,
                    h: 3,
                    h_kv: 3,
                    d: 7,
                },
                true,
                Some(false),
                false,
            ),
            (
                "cross (T≠S, padding)",
                AttnDims {
                    b: 2,
                    t: 7,
                    s: 13,
                    h: 2,
                    h_kv: 2,
                    d: 6,
                },
                false,
                None,
                true,
            ),
            (
                "gqa (causal)",
                AttnDims {
                    b: 1,
                    t: 10,
                    s: 10,
                    h: 4,
                    h_kv: 2,
                    d: 8,
                },
                true,
                None,
                false,
            ),
            (
                // T5's head width (tensor cores), more than one 64-row query tile.
                "encoder d64 (bias, padding)",
                AttnDims {
                    b: 1,
                    t: 67,
                    s: 67,
                    h: 2,
                    h_kv: 2,
                    d: 64,
                },
                false,
                Some(true),
                true,
            ),
            (
                // Llama's head width (tensor cores), grouped-query.
                "gqa d128 (causal)",
                AttnDims {
                    b: 1,
                    t: 40,
                    s: 40,
                    h: 2,
                    h_kv: 1,
                    d: 128,
                },
                true,
                None,
                false,
            ),
        ];
        let kernel = self.gpu.attention_kernel();
        for (name, dims, causal, bias_dir, padded) in cases {
            let name = format!("{kernel:?} {name}");
            let AttnDims {
                b,
                t,
                s,
                h,
                h_kv,
                d,
            } = dims;
            let q = self.rand(b * t * h * d, 1.0);
            let k = self.rand(b * s * h_kv * d, 1.0);
            let v = self.rand(b * s * h_kv * d, 1.0);
            let dout = self.rand(b * t * h * d, 1.0);
            let table = self.rand(8 * h, 1.0);
            let mask: Vec<i32> = (0..b * s)
                .map(|i| i32::from(!(padded && i / s == b - 1 && i % s >= s - 3)))
                .collect();
            let scale = 0.37;
            let cpu_mask = AttnMask {
                key_mask: &mask,
                causal,
            };
            let cpu_bias = bias_dir.map(|bidirectional| RelBias {
                table: &table,
                bidirectional,
                num_buckets: 8,
                max_distance: 20,
                q_offset: 0,
            });
            let (mut o_r, mut lse_r) = (vec![0f32; q.len()], vec![0f32; b * h * t]);
            self.cpu.attention_forward(
                &mut o_r, &mut lse_r, &q, &k, &v, cpu_mask, cpu_bias, scale, dims,
            );
            let gmask = self.gpu.upload_index(&mask);
            let gtable = self.up(&table);
            let g_mask = AttnMask {
                key_mask: &gmask,
                causal,
            };
            let g_bias = bias_dir.map(|bidirectional| RelBias {
                table: &gtable,
                bidirectional,
                num_buckets: 8,
                max_distance: 20,
                q_offset: 0,
            });
            let (gq, gk, gv) = (self.up(&q), self.up(&k), self.up(&v));
            let (mut o, mut lse) = (self.nan(q.len()), self.nan(b * h * t));
            self.gpu
                .attention_forward(&mut o, &mut lse, &gq, &gk, &gv, g_mask, g_bias, scale, dims);
            self.record(&format!("attention_forward {name}"), &o, &o_r, tol);
            self.record(&format!("attention_forward {name} lse"), &lse, &lse_r, tol);

            let o_round: Vec<f32> = o_r.iter().map(|&x| round(x, dt)).collect();
            let lse_round: Vec<f32> = lse_r.iter().map(|&x| round(x, dt)).collect();
            let (mut dq_r, mut dk_r, mut dv_r) = (
                vec![0f32; q.len()],
                vec![0f32; k.len()],
                vec![0f32; v.len()],
            );
            self.cpu.attention_backward_dinp(
                &mut dq_r, &mut dk_r, &mut dv_r, &dout, &q, &k, &v, &o_round, &lse_round, cpu_mask,
                cpu_bias, scale, dims,
            );
            let (mut dq, mut dk, mut dv) =
                (self.nan(q.len()), self.nan(k.len()), self.nan(v.len()));
            self.gpu.attention_backward_dinp(
                &mut dq,
                &mut dk,
                &mut dv,
                &self.up(&dout),
                &gq,
                &gk,
                &gv,
                &self.up(&o_round),
                &self.up(&lse_round),
                g_mask,
                g_bias,
                scale,
                dims,
            );
            self.record(
                &format!("attention_backward_dinp {name} dq"),
                &dq,
                &dq_r,
                tol,
            );
            self.record(
                &format!("attention_backward_dinp {name} dk"),
                &dk,
                &dk_r,
                tol,
            );
            self.record(
                &format!("attention_backward_dinp {name} dv"),
                &dv,
                &dv_r,
                tol,
            );
        }
    }

    fn loss_and_optimiser(&mut self) {
        let tol = op_tolerance(self.dtype());
        let (m, v) = (7, 1001);
        let logits = self.rand(m * v, 4.0);
        let targets: Vec<i32> = (0..m).map(|i| ((i * 389 + 5) % v) as i32).collect();
        let (mut l_r, mut d_r) = (vec![0f32; m], vec![0f32; m * v]);
        self.cpu.cross_entropy_forward_backward(
            &mut l_r,
            &mut d_r,
            &logits,
            &targets,
            0.25,
            CrossEntropyDims { m, v },
        );
        let (mut l, mut d) = (self.nan(m), self.nan(m * v));
        self.gpu.cross_entropy_forward_backward(
            &mut l,
            &mut d,
            &self.up(&logits),
            &self.gpu.upload_index(&targets),
            0.25,
            CrossEntropyDims { m, v },
        );
        self.record("cross_entropy losses", &l, &l_r, tol);
        self.record("cross_entropy dlogits", &d, &d_r, tol);

        let n = 1037;
        let x = self.rand(n, 1.0);
        let want: f64 = x.iter().map(|&v| (v as f64) * (v as f64)).sum();
        let got = self.gpu.sum_squares(&self.up(&x));
        self.results.push(CheckResult {
            op: "sum_squares".into(),
            dtype: self.dtype(),
            rel_err: ((got - want) / want).abs(),
            tol,
        });

        let (p0, g1, g2) = (self.rand(n, 1.0), self.rand(n, 1.0), self.rand(n, 1.0));
        let (mut p_r, mut m_r, mut v_r) = (p0.clone(), vec![0f32; n], vec![0f32; n]);
        let mut master_r = p0.clone();
        let p0_f64: Vec<f64> = p0.iter().map(|&x| x as f64).collect();
        let zeros = vec![0.0; n];
        let mut p = self.up(&p0);
        let mut master = self.gpu.state_upload(&p0_f64);
        let (mut mm, mut vv) = (self.gpu.state_upload(&zeros), self.gpu.state_upload(&zeros));
        for (step, g) in [(1u64, &g1), (2, &g2)] {
            let h = AdamW {
                lr: 0.01,
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.01,
                step,
                grad_scale: 0.5,
            };
            self.cpu
                .adamw_step(&mut p_r, &mut master_r, &mut m_r, &mut v_r, g, h);
            self.gpu
                .adamw_step(&mut p, &mut master, &mut mm, &mut vv, &self.up(g), h);
        }
        self.record("adamw_step (2 steps)", &p, &p_r, tol);
    }
}

fn round(x: f32, dtype: DType) -> f32 {
    match dtype {
        DType::F32 => x,
        DType::Bf16 => bf16::from_f32(x).to_f32(),
    }
}

/// Every op of the backend against the CPU reference (see the module docs).
pub fn check_ops<D: Device>(gpu: &GpuBackend<D>, seed: u64) -> Vec<CheckResult> {
    let mut c = Checker {
        gpu,
        cpu: CpuBackend::new(),
        seed,
        results: Vec::new(),
    };
    c.matmul();
    c.rows();
    c.elementwise();
    c.norms();
    c.rope();
    c.attention();
    // The other attention implementations too: a fallback must be as right as the default.
    for kind in [
        AttentionKernel::Flash,
        AttentionKernel::Gemm,
        AttentionKernel::FlashTc,
    ] {
        if kind == gpu.attention_kernel() {
            continue;
        }
        let gpu_other = gpu.with_attention(kind);
        let mut c_other = Checker {
            gpu: &gpu_other,
            cpu: CpuBackend::new(),
            seed: c.seed,
            results: Vec::new(),
        };
        c_other.attention();
        c.results.extend(c_other.results);
    }
    c.loss_and_optimiser();
    c.method_ops(MethodDims::DOCTOR);
    c.nf4();
    c.results.push(check_mma(gpu.device(), seed));
    c.results
}

/// One tensor-core step (`selftest_mma` in kernels/selftest.cu): `d = a·b + c` for a 16×16 by
/// 16×8 product with bf16 operands, against the same product on the host. A wrong fragment
/// layout gives errors of order 1.
pub fn check_mma<D: Device>(dev: &D, seed: u64) -> CheckResult {
    let bf = |x: f64| bf16::from_f32(x as f32).to_f32();
    let a: Vec<f32> = random_vec(16 * 16, 1.0, seed).into_iter().map(bf).collect();
    let b: Vec<f32> = random_vec(16 * 8, 1.0, seed + 1)
        .into_iter()
        .map(bf)
        .collect();
    let c: Vec<f32> = random_vec(16 * 8, 1.0, seed + 2)
        .into_iter()
        .map(|x| x as f32)
        .collect();
    let mut want = vec![0f32; 16 * 8];
    for i in 0..16 {
        for j in 0..8 {
            let dot: f64 = (0..16)
                .map(|k| a[i * 16 + k] as f64 * b[k * 8 + j] as f64)
                .sum();
            want[i * 8 + j] = (dot + c[i * 8 + j] as f64) as f32;
        }
    }
    let run = || -> Result<Vec<f32>, super::device::GpuError> {
        let up = |x: &[f32]| -> Result<D::Buffer, super::device::GpuError> {
            let mut buf = dev.alloc(x.len() * 4)?;
            dev.upload(&mut buf, bytemuck::cast_slice(x))?;
            Ok(buf)
        };
        let (ga, gb, gc, gd) = (up(&a)?, up(&b)?, up(&c)?, up(&[f32::NAN; 16 * 8])?);
        let args = [&gd, &ga, &gb, &gc].map(|x| Arg::Ptr(dev.ptr(x)));
        dev.launch("selftest_mma_f32", LaunchCfg::linear(1, 32), &args)?;
        let mut bytes = vec![0u8; 16 * 8 * 4];
        dev.download(&gd, &mut bytes)?;
        Ok(bytemuck::pod_collect_to_vec(&bytes))
    };
    let rel_err = match run() {
        Ok(got) if got.iter().all(|x| x.is_finite()) => rel_err_f32(&got, &want),
        _ => f64::NAN,
    };
    CheckResult {
        op: "mma_m16n8k16_bf16 (tensor-core fragment layout)".into(),
        dtype: DType::Bf16,
        rel_err,
        tol: 1e-5,
    }
}

/// Sizes of the method-op checks: fusion `ps (S, C)`, `lr (M, C)`; gated experts `(S, C)` × E;
/// LAMP `u (L, R)`, `v (C, R)`, pooling block P.
#[derive(Debug, Clone, Copy)]
pub struct MethodDims {
    pub s: usize,
    pub m: usize,
    pub c: usize,
    pub e: usize,
    pub l: usize,
    pub r: usize,
    pub p: usize,
}

impl MethodDims {
    /// Odd sizes, so that swapped dimensions show.
    pub const DOCTOR: MethodDims = MethodDims {
        s: 7,
        m: 13,
        c: 45,
        e: 3,
        l: 12,
        r: 5,
        p: 3,
    };
}

/// The method-op checks alone, at the given sizes (the unit tests sweep several).
pub fn check_method_ops<D: Device>(
    gpu: &GpuBackend<D>,
    seed: u64,
    dims: MethodDims,
) -> Vec<CheckResult> {
    let mut c = Checker {
        gpu,
        cpu: CpuBackend::new(),
        seed,
        results: Vec::new(),
    };
    c.method_ops(dims);
    c.results
}

/// A model of a built-in shape (T5 or Llama) with random weights rounded to `dtype`, on any
/// backend: the GPU and the CPU reference get identical weights.
fn model_with_weights<B: Backend + 'static>(
    be: &B,
    shape: &str,
    seed: u64,
    dtype: DType,
    quant: Quant,
) -> crate::Result<Backbone<B>> {
    random_model_rounded(be, shape, seed, quant, &|x| round(x, dtype))
}

/// Whole forward + backward steps of a built-in shape (T5 or Llama) on a padded random batch,
/// without and with a prompt method (PT: embed + prompt rows; EPT-MS: the low-rank update and
/// the method ops), against the CPU: loss, label-row logits, d inputs_embeds and the method's
/// gradients.
pub fn check_steps<D: Device>(
    gpu: &GpuBackend<D>,
    shape: &str,
    seed: u64,
) -> crate::Result<Vec<CheckResult>> {
    let dt = gpu.dtype();
    let cpu = CpuBackend::<f32>::new();
    let model_g = model_with_weights(gpu, shape, seed, dt, Quant::None)?;
    let model_c = model_with_weights(&cpu, shape, seed, dt, Quant::None)?;
    let (inputs, targets) = ([9, 6, 11], [4, 2, 5]);
    let batch = model_c.random_batch(&inputs, &targets, seed + 1);
    let mut results = Vec::new();
    let mut push = |op: String, got: &[f32], want: &[f32], tol: f64| {
        let rel_err = if got.iter().all(|x| x.is_finite()) {
            rel_err_f32(got, want)
        } else {
            f64::NAN
        };
        results.push(CheckResult {
            op,
            dtype: dt,
            rel_err,
            tol,
        });
    };

    // Dense weights, then NF4 weights (dequantised before each GEMM, bit-identically on both
    // backends in f32).
    let nf4_g = model_with_weights(gpu, shape, seed, dt, Quant::Nf4)?;
    let nf4_c = model_with_weights(&cpu, shape, seed, dt, Quant::Nf4)?;
    for (tag, mg, mc) in [("", &model_g, &model_c), (" nf4", &nf4_g, &nf4_c)] {
        let g = forward_backward(gpu, mg, None, &batch)?;
        let c = forward_backward(&cpu, mc, None, &batch)?;
        push(
            format!("{shape} step{tag}: loss"),
            &[g.loss as f32],
            &[c.loss as f32],
            step_tolerance(dt),
        );
        push(
            format!("{shape} step{tag}: logits"),
            &g.logits,
            &c.logits,
            step_tolerance(dt),
        );
        push(
            format!("{shape} step{tag}: d inputs_embeds"),
            &g.d_inputs_embeds,
            &c.d_inputs_embeds,
            step_grad_tolerance(dt),
        );
    }

    for (label, method, options) in [
        ("pt", "pt", "prompt_len = 5"),
        ("ept", "ept", "prompt_len = 4\nrank = 3"),
        // No prompt rows: the update alone (the end of the claims' sweep over s).
        ("ept s=0", "ept", "prompt_len = 0\nrank = 3"),
    ] {
        let cfg = MethodConfig::from_toml(method, options)?;
        let mut mg = build_backbone_method(gpu, &model_g, &cfg, 100, seed, None)?;
        let mut mc = build_backbone_method(&cpu, &model_c, &cfg, 100, seed, None)?;
        // Same starting values on both: the GPU's (rounded) parameters copied to the CPU.
        for (pg, pc) in mg.params().iter().zip(mc.params_mut()) {
            pc.value = gpu.download_f32(&pg.value);
        }
        let g = forward_backward(gpu, &model_g, Some(mg.as_mut()), &batch)?;
        let c = forward_backward(&cpu, &model_c, Some(mc.as_mut()), &batch)?;
        push(
            format!("{shape} step + {label}: loss"),
            &[g.loss as f32],
            &[c.loss as f32],
            step_tolerance(dt),
        );
        // An empty parameter (EPT-MS's prompt at s = 0) has nothing to compare.
        for (pg, pc) in mg
            .params()
            .iter()
            .zip(mc.params())
            .filter(|(p, _)| p.numel() > 0)
        {
            push(
                format!("{shape} step + {label}: d {}", pg.name),
                &gpu.download_f32(&pg.grad),
                &pc.grad,
                step_grad_tolerance(dt),
            );
        }
    }

    // Greedy generation with the KV cache (left-padded for Llama): the logits of the first step
    // (prefill) and, in f32, of every step, where both backends pick the same tokens.
    let (b, t) = (2, 7);
    let mask: Vec<i32> = match model_c.is_decoder_only() {
        false => vec![1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0],
        true => vec![1, 1, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1, 1],
    };
    let width = model_c.width();
    let embeds: Vec<f32> = random_vec(b * t * width, 1.0, seed + 2)
        .into_iter()
        .map(|x| round(x as f32, dt))
        .collect();
    let gen = GenerateConfig {
        max_new_tokens: 4,
        eos_token_ids: Vec::new(),
        keep_logits: true,
    };
    let generate = |be_g: Option<&GpuBackend<D>>| -> crate::Result<Generated> {
        match be_g {
            Some(g) => model_g.generate(g, &g.upload_f32(embeds.clone()), &mask, b, t, &gen),
            None => model_c.generate(&cpu, &cpu.upload_f32(embeds.clone()), &mask, b, t, &gen),
        }
    };
    let (g, c) = (generate(Some(gpu))?, generate(None)?);
    let first =
        |x: &Generated| -> Vec<f32> { x.step_logits.iter().flat_map(|r| r[0].clone()).collect() };
    push(
        format!("{shape} generate: first-step logits"),
        &first(&g),
        &first(&c),
        step_tolerance(dt),
    );
    if dt == DType::F32 && g.tokens != c.tokens {
        // Recorded as a failure (NaN), not a panic: doctor reports every check.
        push(
            format!("{shape} generate: tokens differ"),
            &[f32::NAN],
            &[0.0],
            0.0,
        );
    } else if dt == DType::F32 {
        let all = |x: &Generated| -> Vec<f32> {
            x.step_logits.iter().flatten().flatten().copied().collect()
        };
        push(
            format!("{shape} generate: all step logits"),
            &all(&g),
            &all(&c),
            step_tolerance(dt),
        );
    }
    Ok(results)
}
