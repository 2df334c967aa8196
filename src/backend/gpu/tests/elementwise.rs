//! Elementwise ops, rows (gather/scatter, the prompt-tuned encoder input), GEMM, cross-entropy
//! and the optimiser on the virtual GPU against the CPU reference. Outputs that the op writes
//! (`=`) start as NaN; outputs it accumulates into (`+=`) start random.

use super::*;
use crate::backend::{Activation, AdamW, CrossEntropyDims, EmbedPromptDims, Gemm, LinearDims};

const ACTIVATIONS: [Activation; 3] = [Activation::Relu, Activation::GeluTanh, Activation::Silu];

/// `n` indices in `0..r`, random.
fn random_ids(n: usize, r: usize, seed: u64) -> Vec<i32> {
    random_vec(n, 1.0, seed)
        .into_iter()
        .map(|x| (((x + 1.0) / 2.0 * r as f64) as usize).min(r - 1) as i32)
        .collect()
}

/// `m ≤ r` distinct indices in `0..r` (r coprime to 7), not in order.
fn distinct_rows(m: usize, r: usize) -> Vec<i32> {
    assert!(m <= r && !r.is_multiple_of(7));
    (0..m).map(|i| ((i * 7 + 3) % r) as i32).collect()
}

/// Row `row` of a downloaded `(_, c)` tensor.
fn row_of(x: &[f32], row: usize, c: usize) -> &[f32] {
    &x[row * c..(row + 1) * c]
}

#[test]
fn add_assign_matches_cpu() {
    for (be, tol) in backends() {
        let dt = be.dtype();
        for n in [7, 1001] {
            let dst = inputs(n, 1.0, 1, dt);
            let src = inputs(n, 1.0, 2, dt);
            let mut want = dst.clone();
            cpu().add_assign(&mut want, &src);
            let mut got = be.upload_f32(dst);
            be.add_assign(&mut got, &be.upload_f32(src));
            assert_close("add_assign", &be, &got, &want, tol);
        }
    }
}

#[test]
fn add_bias_matches_cpu() {
    for (be, tol) in backends() {
        let dt = be.dtype();
        for (n, f) in [(7, 37), (3, 300)] {
            let x = inputs(n * f, 1.0, 3, dt);
            let bias = inputs(f, 1.0, 4, dt);
            let mut want = x.clone();
            cpu().add_bias(&mut want, &bias, n, f);
            let mut got = be.upload_f32(x);
            be.add_bias(&mut got, &be.upload_f32(bias), n, f);
            assert_close("add_bias", &be, &got, &want, tol);
        }
    }
}

#[test]
fn bias_backward_matches_cpu() {
    for (be, tol) in backends() {
        let dt = be.dtype();
        // f = 300: two blocks of columns, the second partly idle.
        for (n, f) in [(7, 37), (5, 300), (1, 3)] {
            let dbias = inputs(f, 1.0, 5, dt); // accumulates (+=)
            let dout = inputs(n * f, 1.0, 6, dt);
            let mut want = dbias.clone();
            cpu().bias_backward(&mut want, &dout, n, f);
            let mut got = be.upload_f32(dbias);
            be.bias_backward(&mut got, &be.upload_f32(dout), n, f);
            assert_close("bias_backward", &be, &got, &want, tol);
        }
    }
}

#[test]
fn gated_act_forward_matches_cpu() {
    for (be, tol) in backends() {
        let dt = be.dtype();
        let len = 1001;
        let mut a = inputs(len, 4.0, 7, dt);
        a[0] = 0.0;
        let gate = inputs(len, 2.0, 8, dt);
        for act in ACTIVATIONS {
            for gated in [false, true] {
                let what = format!("gated_act_forward {act:?} gated={gated}");
                let mut want = vec![0f32; len];
                cpu().gated_act_forward(&mut want, &a, gated.then_some(&gate), act, len);
                let mut out = poisoned(&be, len);
                let (ag, gg) = (be.upload_f32(a.clone()), be.upload_f32(gate.clone()));
                be.gated_act_forward(&mut out, &ag, gated.then_some(&gg), act, len);
                assert_close(&what, &be, &out, &want, tol);
            }
        }
    }
}

#[test]
fn gated_act_backward_dinp_matches_cpu() {
    for (be, tol) in backends() {
        let dt = be.dtype();
        let len = 1001;
        let mut a = inputs(len, 4.0, 9, dt);
        a[0] = 0.0; // ReLU' at 0 is 0
        let gate = inputs(len, 2.0, 10, dt);
        let dout = inputs(len, 1.0, 11, dt);
        for act in ACTIVATIONS {
            for gated in [false, true] {
                let what = format!("gated_act_backward_dinp {act:?} gated={gated}");
                let (mut da_r, mut dg_r) = (vec![0f32; len], vec![0f32; len]);
                cpu().gated_act_backward_dinp(
                    &mut da_r,
                    gated.then_some(&mut dg_r),
                    &dout,
                    &a,
                    gated.then_some(&gate),
                    act,
                    len,
                );
                let (mut da, mut dg) = (poisoned(&be, len), poisoned(&be, len));
                let (ag, gg, dyg) = (
                    be.upload_f32(a.clone()),
                    be.upload_f32(gate.clone()),
                    be.upload_f32(dout.clone()),
                );
                be.gated_act_backward_dinp(
                    &mut da,
                    gated.then_some(&mut dg),
                    &dyg,
                    &ag,
                    gated.then_some(&gg),
                    act,
                    len,
                );
                assert_close(&format!("{what} da"), &be, &da, &da_r, tol);
                if gated {
                    assert_close(&format!("{what} dgate"), &be, &dg, &dg_r, tol);
                }
            }
        }
    }
}

#[test]
fn gather_rows_matches_cpu() {
    for (be, tol) in backends() {
        let dt = be.dtype();
        // c = 300: more columns than threads in the block.
        for (m, r, c) in [(5, 11, 37), (9, 4, 300), (1, 1, 1)] {
            let table = inputs(r * c, 1.0, 12, dt);
            let rows = random_ids(m, r, 13);
            let mut want = vec![0f32; m * c];
            cpu().gather_rows(&mut want, &table, &rows, m, c);
            let mut out = poisoned(&be, m * c);
            let tg = be.upload_f32(table);
            be.gather_rows(&mut out, &tg, &be.upload_index(&rows), m, c);
            assert_close("gather_rows", &be, &out, &want, tol);
        }
    }
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
fn scatter_rows_add_matches_cpu() {
    for (be, tol) in backends() {
        let dt = be.dtype();
        for (m, r, c) in [(5, 11, 37), (4, 4, 300)] {
            let dtable = inputs(r * c, 1.0, 15, dt); // accumulates (+=)
            let dout = inputs(m * c, 1.0, 16, dt);
            let rows = distinct_rows(m, r);
            let mut want = dtable.clone();
            cpu().scatter_rows_add(&mut want, &dout, &rows, m, c);
            let mut got = be.upload_f32(dtable);
            let dg = be.upload_f32(dout);
            be.scatter_rows_add(&mut got, &dg, &be.upload_index(&rows), m, c);
            assert_close("scatter_rows_add", &be, &got, &want, tol);
        }
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
fn embed_prompt_forward_matches_cpu() {
    for (be, tol) in backends() {
        let dt = be.dtype();
        let (b, t, r, m) = (3, 5, 11, 7);
        for (p, c) in [(4, 37), (0, 37), (2, 130)] {
            let table = inputs(r * c, 1.0, 19, dt);
            let ids = random_ids(b * t, r, 20);
            let prompt = inputs(p * c, 1.0, 21, dt);
            let update = inputs(m * c, 0.5, 22, dt); // M > T rows; only the first T are used
            for with_update in [false, true] {
                let what = format!("embed_prompt_forward p={p} c={c} update={with_update}");
                let mut want = vec![0f32; b * (p + t) * c];
                cpu().embed_prompt_forward(
                    &mut want,
                    &table,
                    &ids,
                    &prompt,
                    with_update.then_some(&update),
                    EmbedPromptDims { b, t, p, c },
                );
                let mut out = poisoned(&be, b * (p + t) * c);
                let (tg, pg, ug) = (
                    be.upload_f32(table.clone()),
                    be.upload_f32(prompt.clone()),
                    be.upload_f32(update.clone()),
                );
                let ig = be.upload_index(&ids);
                let u = with_update.then_some(&ug);
                be.embed_prompt_forward(&mut out, &tg, &ig, &pg, u, EmbedPromptDims { b, t, p, c });
                assert_close(&what, &be, &out, &want, tol);
            }
        }
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

#[test]
fn embed_prompt_backward_matches_cpu() {
    for (be, tol) in backends() {
        let dt = be.dtype();
        let (b, t, m) = (3, 5, 7); // d_update has M > T rows: rows T.. must come out zero
        for (p, c) in [(4, 37), (0, 37), (2, 130)] {
            let dout = inputs(b * (p + t) * c, 1.0, 25, dt);
            for with_update in [false, true] {
                let what = format!("embed_prompt_backward p={p} c={c} d_update={with_update}");
                let (mut dp_r, mut du_r) = (vec![0f32; p * c], vec![0f32; m * c]);
                cpu().embed_prompt_backward(
                    &mut dp_r,
                    with_update.then_some(&mut du_r),
                    &dout,
                    EmbedPromptDims { b, t, p, c },
                );
                let (mut dp, mut du) = (poisoned(&be, p * c), poisoned(&be, m * c));
                let dg = be.upload_f32(dout.clone());
                be.embed_prompt_backward(
                    &mut dp,
                    with_update.then_some(&mut du),
                    &dg,
                    EmbedPromptDims { b, t, p, c },
                );
                assert_close(&format!("{what} d_prompt"), &be, &dp, &dp_r, tol);
                if with_update {
                    assert_close(&format!("{what} d_update"), &be, &du, &du_r, tol);
                }
            }
        }
    }
}

#[test]
fn matmul_matches_cpu() {
    for (be, tol) in backends() {
        let dt = be.dtype();
        let (m, n, k) = (7, 37, 13);
        let gemms = [
            Gemm::nn(m, n, k),
            Gemm::nt(m, n, k).alpha(0.5),
            Gemm {
                trans_a: true,
                ..Gemm::nn(m, n, k).alpha(-1.5)
            },
            Gemm {
                trans_a: true,
                ..Gemm::nt(m, n, k)
            },
        ];
        for g in gemms {
            for accumulate in [false, true] {
                let g = g.accumulate(accumulate);
                let a = inputs(m * k, 1.0, 26, dt);
                let b = inputs(k * n, 1.0, 27, dt);
                let c0 = inputs(m * n, 1.0, 28, dt);
                let mut want = c0.clone();
                cpu().matmul(&mut want, &a, &b, g);
                let mut out = if accumulate {
                    be.upload_f32(c0)
                } else {
                    poisoned(&be, m * n)
                };
                be.matmul(&mut out, &be.upload_f32(a), &be.upload_f32(b), g);
                assert_close(&format!("matmul {g:?}"), &be, &out, &want, tol);
            }
        }
    }
}

#[test]
fn linear_backward_dweight_matches_cpu() {
    for (be, tol) in backends() {
        let dt = be.dtype();
        let (n, ic, oc) = (9, 37, 13);
        let dw = inputs(oc * ic, 1.0, 29, dt); // accumulates (+=)
        let dout = inputs(n * oc, 1.0, 30, dt);
        let inp = inputs(n * ic, 1.0, 31, dt);
        let mut want = dw.clone();
        cpu().linear_backward_dweight(&mut want, &dout, &inp, LinearDims::new(n, ic, oc));
        let mut got = be.upload_f32(dw);
        let (dg, ig) = (be.upload_f32(dout), be.upload_f32(inp));
        be.linear_backward_dweight(&mut got, &dg, &ig, LinearDims::new(n, ic, oc));
        assert_close("linear_backward_dweight", &be, &got, &want, tol);
    }
}

#[test]
fn sum_squares_matches_cpu() {
    for (be, _) in backends() {
        let dt = be.dtype();
        // 300_001 elements need more than the 1024 blocks sum_squares launches: grid-stride.
        for n in [1, 7, 1001, 300_001] {
            let x = inputs(n, 2.0, 32, dt);
            let want: f64 = x.iter().map(|&v| v as f64 * v as f64).sum();
            let got = be.sum_squares(&be.upload_f32(x));
            // The squares of stored values are exact in f32 for both dtypes: only the f32
            // accumulation differs, so the tolerance is tight for bf16 too.
            let err = (got - want).abs() / want;
            assert!(
                err <= 1e-5,
                "sum_squares n={n} ({dt}): {got} vs {want}, rel {err:.3e}"
            );
        }
    }
}

#[test]
fn adamw_step_matches_cpu() {
    for (be, tol) in backends() {
        let dt = be.dtype();
        let n = 1001;
        let mut h = AdamW {
            lr: 0.05,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.1,
            step: 1,
            grad_scale: 0.5,
        };
        let p0 = inputs(n, 1.0, 33, dt);
        let (mut p_r, mut master_r) = (p0.clone(), p0.clone());
        let (mut m_r, mut v_r) = (vec![0f32; n], vec![0f32; n]);
        let f64s = |x: &[f32]| x.iter().map(|&v| v as f64).collect::<Vec<f64>>();
        let mut p = be.upload_f32(vec![f32::NAN; n]); // written by the step
        let mut master = be.state_upload(&f64s(&p0));
        let (mut m, mut v) = (be.state_upload(&f64s(&m_r)), be.state_upload(&f64s(&v_r)));
        let state_err = |x: &<Vgpu as Backend>::State, r: &[f32]| {
            let got: Vec<f32> = be.state_download(x).iter().map(|&v| v as f32).collect();
            rel_err_f32(&got, r)
        };
        for step in 1..=2 {
            h.step = step;
            let grad = inputs(n, 1.0, 33 + step, dt);
            cpu().adamw_step(&mut p_r, &mut master_r, &mut m_r, &mut v_r, &grad, h);
            be.adamw_step(&mut p, &mut master, &mut m, &mut v, &be.upload_f32(grad), h);
            // The parameter is the master rounded to the storage dtype.
            let rounded: Vec<f32> = p_r.iter().map(|&x| round_to(x, dt)).collect();
            assert_close(&format!("adamw_step {step} param"), &be, &p, &rounded, tol);
            // The state is f32 on every backend: as tight as f32 allows.
            assert!(state_err(&master, &master_r) < 1e-6, "master");
            assert!(state_err(&m, &m_r) < 1e-6, "m");
            // β2 reaches the kernel as f32: 1 − β2 = 1 − 0.999f is off by 1.3e-5 relative.
            assert!(state_err(&v, &v_r) < 3e-5, "v");
        }
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
fn cross_entropy_forward_backward_matches_cpu() {
    for (be, tol) in backends() {
        let dt = be.dtype();
        // v = 1001: more logits than threads in the block, and not a multiple of it.
        for (m, v) in [(5, 37), (3, 1001)] {
            let logits = inputs(m * v, 5.0, 36, dt);
            let targets = random_ids(m, v, 37);
            let dloss = 0.25;
            let (mut loss_r, mut dl_r) = (vec![0f32; m], vec![0f32; m * v]);
            cpu().cross_entropy_forward_backward(
                &mut loss_r,
                &mut dl_r,
                &logits,
                &targets,
                dloss,
                CrossEntropyDims { m, v },
            );
            let (mut loss, mut dl) = (poisoned(&be, m), poisoned(&be, m * v));
            let (lg, tg) = (be.upload_f32(logits), be.upload_index(&targets));
            be.cross_entropy_forward_backward(
                &mut loss,
                &mut dl,
                &lg,
                &tg,
                dloss,
                CrossEntropyDims { m, v },
            );
            assert_close(
                &format!("cross_entropy losses v={v}"),
                &be,
                &loss,
                &loss_r,
                tol,
            );
            assert_close(
                &format!("cross_entropy dlogits v={v}"),
                &be,
                &dl,
                &dl_r,
                tol,
            );
        }
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
