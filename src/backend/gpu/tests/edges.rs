//! What the op table's checks do not cover: invalid ids and positions (NaN rows, skipped rows),
//! many small AdamW updates in the f32 master, rope's backward undoing its forward, and the host
//! refusing empty attention before any launch.

use super::*;
use crate::backend::gpu::GpuBackend;
use crate::backend::{AdamW, AttnDims, AttnMask, CrossEntropyDims, EmbedPromptDims, RopeDims};

/// Row `row` of a downloaded `(_, c)` tensor.
fn row_of(x: &[f32], row: usize, c: usize) -> &[f32] {
    &x[row * c..(row + 1) * c]
}

/// cos and sin tables `(rows, D/2)` of made-up frequencies.
fn tables(rows: usize, half: usize) -> (Vec<f32>, Vec<f32>) {
    let angle = |p: usize, i: usize| p as f64 * 0.9f64.powi(i as i32 * 3) + 0.1 * i as f64;
    let cos = (0..rows * half)
        .map(|k| angle(k / half, k % half).cos() as f32)
        .collect();
    let sin = (0..rows * half)
        .map(|k| angle(k / half, k % half).sin() as f32)
        .collect();
    (cos, sin)
}

#[test]
fn gather_rows_invalid_row_is_nan() {
    for (be, _) in backends() {
        let (r, c) = (4, 37);
        let table = inputs(r * c, 1.0, 14, be.dtype());
        let rows = [2, -1, 4];
        let mut out = poisoned(&be, rows.len() * c);
        let tg = be.upload_f32(table.clone());
        be.gather_rows(&mut out, &tg, &be.upload_index(&rows), rows.len(), c);
        let got = be.download_f32(&out);
        assert_eq!(row_of(&got, 0, c), row_of(&table, 2, c));
        assert!(got[c..].iter().all(|x| x.is_nan()));
    }
}

#[test]
fn scatter_rows_add_skips_invalid_rows() {
    for (be, tol) in backends() {
        let dt = be.dtype();
        let (r, c) = (5, 37);
        let dtable = inputs(r * c, 1.0, 17, dt);
        let dout = inputs(3 * c, 1.0, 18, dt);
        let mut want = dtable.clone();
        cpu().scatter_rows_add(&mut want, &dout[c..2 * c].to_vec(), &vec![3], 1, c);
        let mut got = be.upload_f32(dtable);
        let dg = be.upload_f32(dout);
        be.scatter_rows_add(&mut got, &dg, &be.upload_index(&[-1, 3, 5]), 3, c);
        assert_close("scatter_rows_add (invalid rows)", &be, &got, &want, tol);
    }
}

#[test]
fn embed_prompt_forward_invalid_id_is_nan() {
    for (be, _) in backends() {
        let dt = be.dtype();
        let (b, t, p, c, r) = (1, 3, 2, 37, 4);
        let table = inputs(r * c, 1.0, 23, dt);
        let prompt = inputs(p * c, 1.0, 24, dt);
        let ids = [1, 4, -2];
        let mut out = poisoned(&be, b * (p + t) * c);
        let (tg, pg) = (be.upload_f32(table.clone()), be.upload_f32(prompt.clone()));
        be.embed_prompt_forward(
            &mut out,
            &tg,
            &be.upload_index(&ids),
            &pg,
            None,
            EmbedPromptDims { b, t, p, c },
        );
        let got = be.download_f32(&out);
        assert_eq!(&got[..p * c], &prompt[..]);
        assert_eq!(row_of(&got, p, c), row_of(&table, 1, c));
        assert!(got[(p + 1) * c..].iter().all(|x| x.is_nan()));
    }
}

/// Updates far below bf16's resolution (lr 1e-4 on values near 1, whose bf16 spacing is 2^-7)
/// accumulate in the f32 master: after 400 steps a bf16 parameter has moved as the f32
/// reference has (a parameter updated in bf16 itself would not move at all).
#[test]
fn adamw_step_accumulates_small_updates_in_the_f32_master() {
    let be = GpuBackend::new(VirtualDevice::new(), DType::Bf16);
    let n = 37;
    let p0: Vec<f32> = (0..n).map(|i| 1.0 + i as f32 / 64.0).collect();
    let f64s = |x: &[f32]| x.iter().map(|&v| v as f64).collect::<Vec<f64>>();
    let (mut p_r, mut master_r) = (p0.clone(), p0.clone());
    let (mut m_r, mut v_r) = (vec![0f32; n], vec![0f32; n]);
    let mut p = be.upload_f32(p0.clone());
    let mut master = be.state_upload(&f64s(&p0));
    let zeros = vec![0.0; n];
    let (mut m, mut v) = (be.state_upload(&zeros), be.state_upload(&zeros));
    let grad = vec![1.0f32; n];
    let g = be.upload_f32(grad.clone());
    for step in 1..=400 {
        let h = AdamW {
            lr: 1e-4,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
            step,
            grad_scale: 1.0,
        };
        cpu().adamw_step(&mut p_r, &mut master_r, &mut m_r, &mut v_r, &grad, h);
        be.adamw_step(&mut p, &mut master, &mut m, &mut v, &g, h);
    }
    let got = be.download_f32(&p);
    for i in 0..n {
        let (moved, want) = (p0[i] - got[i], p0[i] - p_r[i]);
        // Each step moves by ~lr (m̂/√v̂ = 1): 0.04 in all; bf16 rounds to within 2^-8.
        assert!((want - 0.04).abs() < 1e-3, "reference moved {want}");
        assert!(
            (moved - want).abs() <= 2f32.powi(-7),
            "{i}: moved {moved}, want {want}"
        );
    }
}

#[test]
fn cross_entropy_invalid_target_is_nan() {
    for (be, _) in backends() {
        let (m, v) = (3, 37);
        let logits = inputs(m * v, 5.0, 38, be.dtype());
        let mut loss = poisoned(&be, m);
        let mut dl = be.upload_f32(vec![0.0; m * v]);
        let (lg, tg) = (be.upload_f32(logits), be.upload_index(&[0, 37, -1]));
        be.cross_entropy_forward_backward(
            &mut loss,
            &mut dl,
            &lg,
            &tg,
            1.0,
            CrossEntropyDims { m, v },
        );
        let (loss, dl) = (be.download_f32(&loss), be.download_f32(&dl));
        assert!(loss[0].is_finite() && loss[1].is_nan() && loss[2].is_nan());
        assert!(dl[..v].iter().all(|x| x.is_finite()));
        assert!(dl[v..].iter().all(|x| x.is_nan()));
    }
}

#[test]
fn rope_backward_undoes_the_forward() {
    // Exact tables (cos² + sin² = 1 in f32), so backward ∘ forward is the identity up to rounding.
    let be = GpuBackend::new(VirtualDevice::new(), DType::F32);
    let (n, h, d, rows) = (6, 2, 8, 5);
    let (cos, sin) = tables(rows, d / 2);
    let positions = vec![4, 1, 0, 2, 3, 4];
    let x = inputs(n * h * d, 1.0, 30, DType::F32);
    let (cos, sin) = (be.upload_f32(cos), be.upload_f32(sin));
    let pos = be.upload_index(&positions);
    let mut y = poisoned(&be, n * h * d);
    be.rope_forward(
        &mut y,
        &be.upload_f32(x.clone()),
        &pos,
        &cos,
        &sin,
        RopeDims { n, h, d },
    );
    let mut back = poisoned(&be, n * h * d);
    be.rope_backward_dinp(&mut back, &y, &pos, &cos, &sin, RopeDims { n, h, d });
    assert_close("rope backward ∘ forward", &be, &back, &x, 1e-6);
}

#[test]
fn rope_position_outside_the_tables_gives_nan_rows() {
    let be = GpuBackend::new(VirtualDevice::new(), DType::F32);
    let (n, h, d, rows) = (3, 2, 4, 2);
    let (cos, sin) = tables(rows, d / 2);
    let mut out = be.zeros(n * h * d);
    let x = be.upload_f32(inputs(n * h * d, 1.0, 31, DType::F32));
    let pos = be.upload_index(&[0, 2, -1]);
    let (cos, sin) = (be.upload_f32(cos), be.upload_f32(sin));
    be.rope_forward(&mut out, &x, &pos, &cos, &sin, RopeDims { n, h, d });
    let out = be.download_f32(&out);
    assert!(out[..h * d].iter().all(|v| v.is_finite()));
    assert!(out[h * d..].iter().all(|v| v.is_nan()));
}

/// An empty sequence (T = 0 or S = 0) is refused on the host, naming the lengths, before any
/// launch: the kernels' tile arithmetic divides by them.
#[test]
fn attention_refuses_empty_sequences_before_launching() {
    for (t, s) in [(0, 4), (4, 0), (0, 0)] {
        let be = GpuBackend::new(VirtualDevice::new(), DType::F32);
        let dims = AttnDims {
            b: 1,
            t,
            s,
            h: 2,
            h_kv: 2,
            d: 8,
        };
        let (q, k, v) = (
            be.upload_f32(vec![0.0; t * 16]),
            be.upload_f32(vec![0.0; s * 16]),
            be.upload_f32(vec![0.0; s * 16]),
        );
        let (mut out, mut lse) = (
            be.upload_f32(vec![0.0; t * 16]),
            be.upload_f32(vec![0.0; 2 * t]),
        );
        let km = be.upload_index(&vec![1; s]);
        let mask = AttnMask {
            key_mask: &km,
            causal: false,
        };
        let run = std::panic::AssertUnwindSafe(|| {
            be.attention_forward(&mut out, &mut lse, &q, &k, &v, mask, None, 1.0, dims)
        });
        let err = std::panic::catch_unwind(run).expect_err("an empty sequence is refused");
        let msg = err.downcast_ref::<String>().cloned().unwrap_or_default();
        assert!(
            msg.contains(&format!("T = {t}, S = {s}")) && msg.contains("empty input"),
            "{msg}"
        );
        assert!(
            be.device().launched().is_empty(),
            "launched {:?}",
            be.device().launched()
        );
    }
}

/// Non-finite values (issue 19, rule 3) through every attention kernel (flash, GEMM, tensor
/// cores at T5's head width) in f32 and bf16, forward and backward: the same NaN pattern as the
/// CPU reference (`cpu/nonfinite.rs`: a NaN query row is NaN in that row and in the gradients of
/// the keys it sees, a NaN key in every row that sees it, a NaN padded key in no output), a batch
/// entry that sees no key keeps output 0, lse −inf and zero gradients, and the finite elements
/// agree with the CPU's.
#[test]
fn attention_nan_rows_stay_nan_and_empty_rows_stay_zero() {
    use crate::backend::cpu::nonfinite::NanAttention;
    use crate::backend::gpu::AttentionKernel;
    for (be, tol) in backends() {
        let dt = be.dtype();
        let round = match dt {
            DType::F32 => |x: f32| x,
            DType::Bf16 => |x: f32| bf16::from_f32(x).to_f32(),
        };
        let kernels = [
            AttentionKernel::Flash,
            AttentionKernel::Gemm,
            AttentionKernel::FlashTc,
        ];
        for kernel in kernels {
            let be = be.with_attention(kernel);
            for (causal, bias, poison) in NanAttention::settings() {
                let x = NanAttention::new(64, causal, bias, poison, round);
                let got = x.run(&be);
                x.check(&got, &format!("vgpu {dt} {kernel:?}"));
                let want = x.run(&cpu());
                let pairs = [
                    ("out", &got.out, &want.out),
                    ("dq", &got.dq, &want.dq),
                    ("dk", &got.dk, &want.dk),
                    ("dv", &got.dv, &want.dv),
                ];
                for (name, g, w) in pairs {
                    let (g, w): (Vec<f32>, Vec<f32>) = g
                        .iter()
                        .zip(w.iter())
                        .filter(|(a, b)| a.is_finite() && b.is_finite())
                        .map(|(a, b)| (*a, *b))
                        .unzip();
                    let err = rel_err_f32(&g, &w);
                    // The tensor-core kernels round P to bf16 (FlashAttention's choice).
                    let tol = if kernel == AttentionKernel::FlashTc {
                        3.0 * tol
                    } else {
                        tol
                    };
                    assert!(
                        err <= tol,
                        "{dt} {kernel:?} {poison:?} causal {causal}: {name} rel err {err:.2e}"
                    );
                }
            }
        }
    }
}

/// The row ops where a max or a threshold could drop a NaN: the row softmax (all-NaN and
/// one-NaN rows are NaN, forward and backward), cross-entropy (a NaN logit row has a NaN loss
/// and gradient), ReLU (NaN stays NaN, its derivative NaN) and RMSNorm (one NaN makes the row
/// NaN); the other rows stay finite.
#[test]
fn row_ops_propagate_nan() {
    use crate::backend::{Activation, RmsNormDims};
    for (be, _) in backends() {
        let (n, k) = (3, 37);
        let mut x = inputs(n * k, 2.0, 40, be.dtype());
        x[k..2 * k].fill(f32::NAN);
        x[2 * k + 5] = f32::NAN;
        let xg = be.upload_f32(x.clone());
        let finite_then_nan = |what: &str, got: &[f32], c: usize| {
            assert!(got[..c].iter().all(|v| v.is_finite()), "{what}: {got:?}");
            assert!(got[c..].iter().all(|v| v.is_nan()), "{what}: {got:?}");
        };

        let mut probs = poisoned(&be, n * k);
        be.softmax_rows_forward(&mut probs, &xg, n, k);
        finite_then_nan("softmax_rows_forward", &be.download_f32(&probs), k);
        let mut dinp = poisoned(&be, n * k);
        let ones = be.upload_f32(vec![1.0; n * k]);
        be.softmax_rows_backward_dinp(&mut dinp, &ones, &probs, n, k);
        finite_then_nan("softmax_rows_backward_dinp", &be.download_f32(&dinp), k);

        let mut loss = poisoned(&be, n);
        let mut dl = poisoned(&be, n * k);
        let targets = be.upload_index(&[1, 2, 3]);
        be.cross_entropy_forward_backward(
            &mut loss,
            &mut dl,
            &xg,
            &targets,
            1.0,
            CrossEntropyDims { m: n, v: k },
        );
        finite_then_nan("cross-entropy loss", &be.download_f32(&loss), 1);
        finite_then_nan("cross-entropy dlogits", &be.download_f32(&dl), k);

        let (mut out, mut rstd) = (poisoned(&be, n * k), poisoned(&be, n));
        let w = be.upload_f32(inputs(k, 1.0, 41, be.dtype()));
        be.rmsnorm_forward(&mut out, &mut rstd, &xg, &w, 1e-6, RmsNormDims { n, c: k });
        finite_then_nan("rmsnorm_forward", &be.download_f32(&out), k);

        let mut act = poisoned(&be, n * k);
        be.gated_act_forward(&mut act, &xg, None, Activation::Relu, n * k);
        let got = be.download_f32(&act);
        for (i, (&a, &xi)) in got.iter().zip(&x).enumerate() {
            assert_eq!(a.is_nan(), xi.is_nan(), "relu[{i}] of {xi} = {a}");
        }
        let mut da = poisoned(&be, n * k);
        be.gated_act_backward_dinp(&mut da, None, &ones, &xg, None, Activation::Relu, n * k);
        let got = be.download_f32(&da);
        for (i, (&g, &xi)) in got.iter().zip(&x).enumerate() {
            assert_eq!(g.is_nan(), xi.is_nan(), "relu'[{i}] at {xi} = {g}");
        }
    }
}
