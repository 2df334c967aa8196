//! Normalisation, row softmax and attention on the virtual GPU against the CPU reference.

use super::*;
use crate::backend::gpu::{AttentionKernel, GpuBackend};
use crate::backend::{AttnDims, AttnMask, LayerNormDims, RelBias, RmsNormDims};

#[test]
fn rmsnorm_forward_matches_cpu() {
    for (be, tol) in backends() {
        let dt = be.dtype();
        // Odd row lengths, one shorter and one longer than the block.
        for (n, c) in [(7, 45), (3, 301)] {
            let x = inputs(n * c, 2.0, 1, dt);
            let w = inputs(c, 1.5, 2, dt);
            let cpu = cpu();
            let (mut out_r, mut rstd_r) = (vec![0f32; n * c], vec![0f32; n]);
            cpu.rmsnorm_forward(&mut out_r, &mut rstd_r, &x, &w, 1e-6, RmsNormDims { n, c });
            let (mut out, mut rstd) = (poisoned(&be, n * c), poisoned(&be, n));
            let (xg, wg) = (be.upload_f32(x.clone()), be.upload_f32(w.clone()));
            be.rmsnorm_forward(&mut out, &mut rstd, &xg, &wg, 1e-6, RmsNormDims { n, c });
            assert_close("rmsnorm_forward out", &be, &out, &out_r, tol);
            assert_close("rmsnorm_forward rstd", &be, &rstd, &rstd_r, tol);
        }
    }
}

#[test]
fn rmsnorm_backward_dinp_matches_cpu() {
    for (be, tol) in backends() {
        let dt = be.dtype();
        for (n, c) in [(5, 77), (2, 259)] {
            let x = inputs(n * c, 2.0, 3, dt);
            let w = inputs(c, 1.5, 4, dt);
            let dy = inputs(n * c, 1.0, 5, dt);
            let acc = inputs(n * c, 1.0, 6, dt); // dinp accumulates (+=)
            let cpu = cpu();
            let (mut y, mut rstd) = (vec![0f32; n * c], vec![0f32; n]);
            cpu.rmsnorm_forward(&mut y, &mut rstd, &x, &w, 1e-6, RmsNormDims { n, c });
            let rstd: Vec<f32> = rstd.iter().map(|&r| round_to(r, dt)).collect();
            let mut dx_r = acc.clone();
            cpu.rmsnorm_backward_dinp(&mut dx_r, &dy, &x, &w, &rstd, RmsNormDims { n, c });
            let mut dx = be.upload_f32(acc);
            let (xg, wg, dyg, rg) = (
                be.upload_f32(x),
                be.upload_f32(w),
                be.upload_f32(dy),
                be.upload_f32(rstd),
            );
            be.rmsnorm_backward_dinp(&mut dx, &dyg, &xg, &wg, &rg, RmsNormDims { n, c });
            assert_close("rmsnorm_backward_dinp", &be, &dx, &dx_r, tol);
        }
    }
}

#[test]
fn layernorm_forward_matches_cpu() {
    for (be, tol) in backends() {
        let dt = be.dtype();
        for (n, c) in [(7, 45), (3, 301), (2, 1)] {
            // Off-centre rows, so that the mean matters.
            let x: Vec<f32> = inputs(n * c, 2.0, 11, dt)
                .into_iter()
                .map(|v| round_to(v + 0.75, dt))
                .collect();
            let w = inputs(c, 1.5, 12, dt);
            let bias = inputs(c, 1.0, 13, dt);
            let (mut out_r, mut mean_r, mut rstd_r) =
                (vec![0f32; n * c], vec![0f32; n], vec![0f32; n]);
            cpu().layernorm_forward(
                &mut out_r,
                &mut mean_r,
                &mut rstd_r,
                &x,
                &w,
                &bias,
                1e-5,
                LayerNormDims { n, c },
            );
            let (mut out, mut mean, mut rstd) =
                (poisoned(&be, n * c), poisoned(&be, n), poisoned(&be, n));
            let (xg, wg, bg) = (be.upload_f32(x), be.upload_f32(w), be.upload_f32(bias));
            be.layernorm_forward(
                &mut out,
                &mut mean,
                &mut rstd,
                &xg,
                &wg,
                &bg,
                1e-5,
                LayerNormDims { n, c },
            );
            assert_close("layernorm_forward out", &be, &out, &out_r, tol);
            assert_close("layernorm_forward mean", &be, &mean, &mean_r, tol);
            assert_close("layernorm_forward rstd", &be, &rstd, &rstd_r, tol);
        }
    }
}

#[test]
fn layernorm_backward_matches_cpu() {
    for (be, tol) in backends() {
        let dt = be.dtype();
        // c = 301: two blocks of columns for dweight, the second partly idle.
        for (n, c) in [(5, 77), (2, 259), (33, 301)] {
            let x: Vec<f32> = inputs(n * c, 2.0, 14, dt)
                .into_iter()
                .map(|v| round_to(v - 0.5, dt))
                .collect();
            let w = inputs(c, 1.5, 15, dt);
            let bias = inputs(c, 1.0, 16, dt);
            let dy = inputs(n * c, 1.0, 17, dt);
            let dw0 = inputs(c, 1.0, 18, dt); // dweight, dbias accumulate (+=)
            let db0 = inputs(c, 1.0, 19, dt);
            let cpu = cpu();
            let (mut y, mut mean, mut rstd) = (vec![0f32; n * c], vec![0f32; n], vec![0f32; n]);
            cpu.layernorm_forward(
                &mut y,
                &mut mean,
                &mut rstd,
                &x,
                &w,
                &bias,
                1e-5,
                LayerNormDims { n, c },
            );
            let mean: Vec<f32> = mean.iter().map(|&m| round_to(m, dt)).collect();
            let rstd: Vec<f32> = rstd.iter().map(|&r| round_to(r, dt)).collect();
            let (mut dx_r, mut dw_r, mut db_r) = (vec![0f32; n * c], dw0.clone(), db0.clone());
            cpu.layernorm_backward(
                &mut dx_r,
                &mut dw_r,
                &mut db_r,
                &dy,
                &x,
                &w,
                &mean,
                &rstd,
                LayerNormDims { n, c },
            );
            let mut dx = poisoned(&be, n * c);
            let (mut dw, mut db) = (be.upload_f32(dw0), be.upload_f32(db0));
            let (xg, wg, dyg, mg, rg) = (
                be.upload_f32(x),
                be.upload_f32(w),
                be.upload_f32(dy),
                be.upload_f32(mean),
                be.upload_f32(rstd),
            );
            be.layernorm_backward(
                &mut dx,
                &mut dw,
                &mut db,
                &dyg,
                &xg,
                &wg,
                &mg,
                &rg,
                LayerNormDims { n, c },
            );
            assert_close("layernorm_backward dinp", &be, &dx, &dx_r, tol);
            assert_close("layernorm_backward dweight", &be, &dw, &dw_r, tol);
            assert_close("layernorm_backward dbias", &be, &db, &db_r, tol);
        }
    }
}

#[test]
fn softmax_rows_forward_matches_cpu() {
    for (be, tol) in backends() {
        let dt = be.dtype();
        for (n, k) in [(7, 45), (3, 301), (4, 1)] {
            let x = inputs(n * k, 4.0, 21, dt);
            let mut want = vec![0f32; n * k];
            cpu().softmax_rows_forward(&mut want, &x, n, k);
            let mut got = poisoned(&be, n * k);
            be.softmax_rows_forward(&mut got, &be.upload_f32(x), n, k);
            assert_close("softmax_rows_forward", &be, &got, &want, tol);
        }
    }
}

#[test]
fn softmax_rows_backward_dinp_matches_cpu() {
    for (be, tol) in backends() {
        let dt = be.dtype();
        for (n, k) in [(7, 45), (3, 301)] {
            let x = inputs(n * k, 3.0, 22, dt);
            let dy = inputs(n * k, 1.0, 23, dt);
            let mut y = vec![0f32; n * k];
            cpu().softmax_rows_forward(&mut y, &x, n, k);
            let y: Vec<f32> = y.iter().map(|&v| round_to(v, dt)).collect();
            let mut want = vec![0f32; n * k];
            cpu().softmax_rows_backward_dinp(&mut want, &dy, &y, n, k);
            let mut got = poisoned(&be, n * k);
            be.softmax_rows_backward_dinp(&mut got, &be.upload_f32(dy), &be.upload_f32(y), n, k);
            assert_close("softmax_rows_backward_dinp", &be, &got, &want, tol);
        }
    }
}

/// One attention configuration: dims, masks, bias (`Some(bidirectional)`) and scale.
struct AttnCase {
    name: &'static str,
    dims: AttnDims,
    causal: bool,
    bias: Option<bool>,
    scale: f64,
    /// Valid (unpadded) keys of each batch entry; the rest of the row of `key_mask` is 0.
    valid: &'static [usize],
    /// Position of query 0 for the bias (a query attending to a KV cache).
    q_offset: usize,
}

fn attn_cases() -> Vec<AttnCase> {
    let dims = |b, t, s, h, h_kv, d| AttnDims {
        b,
        t,
        s,
        h,
        h_kv,
        d,
    };
    vec![
        AttnCase {
            name: "encoder self, padded, bidirectional bias",
            dims: dims(2, 11, 11, 3, 3, 5),
            causal: false,
            bias: Some(true),
            scale: 1.0,
            valid: &[11, 8],
            q_offset: 0,
        },
        AttnCase {
            name: "decoder self, causal, unidirectional bias",
            dims: dims(2, 11, 11, 3, 3, 5),
            causal: true,
            bias: Some(false),
            scale: 0.37,
            valid: &[11, 9],
            q_offset: 0,
        },
        AttnCase {
            name: "cross attention, T != S, no bias",
            dims: dims(2, 7, 13, 3, 3, 5),
            causal: false,
            bias: None,
            scale: 0.37,
            valid: &[10, 13],
            q_offset: 0,
        },
        AttnCase {
            name: "grouped-query, causal, no bias",
            dims: dims(2, 9, 9, 4, 2, 5),
            causal: true,
            bias: None,
            scale: 0.37,
            valid: &[9, 6],
            q_offset: 0,
        },
        AttnCase {
            name: "rows longer than the block, T != S, bidirectional bias",
            dims: dims(1, 3, 200, 2, 2, 4),
            causal: false,
            bias: Some(true),
            scale: 0.37,
            valid: &[171],
            q_offset: 0,
        },
        AttnCase {
            // Batch entry 1 sees no key: its rows have lse = -inf, output 0 and no gradient.
            name: "fully padded batch entry, bidirectional bias",
            dims: dims(2, 5, 7, 2, 2, 3),
            causal: false,
            bias: Some(true),
            scale: 1.0,
            valid: &[7, 0],
            q_offset: 0,
        },
        AttnCase {
            // Several query and key tiles of the flash kernels, a group of 3 query heads per KV
            // head, the widest head the flash kernels take.
            name: "wide heads, many tiles, grouped-query, causal",
            dims: dims(2, 37, 37, 6, 2, 128),
            causal: true,
            bias: None,
            scale: 0.09,
            valid: &[37, 30],
            q_offset: 0,
        },
        AttnCase {
            // T5-base's head width: the tensor-core forward, two 64-row query tiles.
            name: "T5 head width 64, two query tiles, padded, bidirectional bias",
            dims: dims(2, 70, 70, 2, 2, 64),
            causal: false,
            bias: Some(true),
            scale: 1.0,
            valid: &[70, 41],
            q_offset: 0,
        },
        AttnCase {
            name: "many tiles, padded, bidirectional bias, odd head",
            dims: dims(1, 21, 50, 2, 1, 33),
            causal: false,
            bias: Some(true),
            scale: 0.2,
            valid: &[44],
            q_offset: 0,
        },
        AttnCase {
            // One decoding step against a cache of 12 keys, 3 of them unwritten.
            name: "one query against a KV cache, unidirectional bias with q_offset",
            dims: dims(2, 1, 12, 3, 3, 8),
            causal: false,
            bias: Some(false),
            scale: 1.0,
            valid: &[9, 5],
            q_offset: 8,
        },
        AttnCase {
            // Heads wider than the flash kernels take: the flash setting falls back to GEMMs.
            name: "heads wider than FLASH_MAX_D",
            dims: dims(1, 5, 6, 2, 2, 130),
            causal: true,
            bias: None,
            scale: 0.1,
            valid: &[6],
            q_offset: 0,
        },
    ]
}

/// `(B, S)`: 1 for the first `valid[b]` keys of batch entry b, then 0.
fn key_mask_of(case: &AttnCase) -> Vec<i32> {
    let s = case.dims.s;
    case.valid
        .iter()
        .flat_map(|&v| (0..s).map(move |j| i32::from(j < v)))
        .collect()
}

/// As [`assert_close`], for a log-sum-exp: entries that are -inf in the reference (rows with no
/// visible key) must be -inf, the others close.
#[track_caller]
fn assert_lse_close(
    what: &str,
    be: &Vgpu,
    x: &<Vgpu as Backend>::Tensor,
    reference: &[f32],
    tol: f64,
) {
    let got = be.download_f32(x);
    let finite = |v: &[f32]| -> Vec<f32> {
        v.iter()
            .map(|&x| if x == f32::NEG_INFINITY { 0.0 } else { x })
            .collect()
    };
    for (i, (&g, &r)) in got.iter().zip(reference).enumerate() {
        if r == f32::NEG_INFINITY {
            assert_eq!(
                g,
                r,
                "{what} ({}): lse[{i}] of a fully masked row",
                be.dtype()
            );
        } else {
            assert!(
                g.is_finite(),
                "{what} ({}): lse[{i}] = {g}, expected {r}",
                be.dtype()
            );
        }
    }
    let err = rel_err_f32(&finite(&got), &finite(reference));
    assert!(
        err <= tol,
        "{what} ({}): relative error {err:.3e} > {tol:.0e}",
        be.dtype()
    );
}

/// Random inputs of one case: `(q, k, v, dout, bias table)`.
fn attn_inputs(case: &AttnCase, ci: u64, dt: DType) -> [Vec<f32>; 5] {
    let AttnDims {
        b,
        t,
        s,
        h,
        h_kv,
        d,
    } = case.dims;
    [
        inputs(b * t * h * d, 1.5, 100 + ci, dt),
        inputs(b * s * h_kv * d, 1.5, 110 + ci, dt),
        inputs(b * s * h_kv * d, 1.0, 120 + ci, dt),
        inputs(b * t * h * d, 1.0, 130 + ci, dt),
        inputs(8 * h, 2.0, 140 + ci, dt),
    ]
}

/// The case's relative bias over `table (8, H)`: 8 buckets, max distance 20.
fn rel_bias<'a, X>(case: &AttnCase, table: &'a X) -> Option<RelBias<'a, X>> {
    case.bias.map(|bidirectional| RelBias {
        table,
        bidirectional,
        num_buckets: 8,
        max_distance: 20,
        q_offset: case.q_offset,
    })
}

/// Both dtypes, each with every attention kernel.
fn attention_backends() -> Vec<(Vgpu, f64)> {
    backends()
        .into_iter()
        .flat_map(|(be, tol)| {
            [
                AttentionKernel::Flash,
                AttentionKernel::Gemm,
                AttentionKernel::FlashTc,
            ]
            .map(|k| (be.with_attention(k), tol))
        })
        .collect()
}

#[test]
fn attention_forward_matches_cpu() {
    for (be, tol) in attention_backends() {
        let dt = be.dtype();
        for (ci, case) in attn_cases().iter().enumerate() {
            let AttnDims { b, t, h, d, .. } = case.dims;
            let [q, k, v, _, table] = attn_inputs(case, ci as u64, dt);
            let key_mask = key_mask_of(case);
            let cpu = cpu();
            let (mut out_r, mut lse_r) = (vec![0f32; b * t * h * d], vec![0f32; b * h * t]);
            let mask = AttnMask {
                key_mask: &key_mask,
                causal: case.causal,
            };
            cpu.attention_forward(
                &mut out_r,
                &mut lse_r,
                &q,
                &k,
                &v,
                mask,
                rel_bias(case, &table),
                case.scale,
                case.dims,
            );

            let (mut out, mut lse) = (poisoned(&be, b * t * h * d), poisoned(&be, b * h * t));
            let (qg, kg, vg, tg) = (
                be.upload_f32(q),
                be.upload_f32(k),
                be.upload_f32(v),
                be.upload_f32(table),
            );
            let km = be.upload_index(&key_mask);
            let mask = AttnMask {
                key_mask: &km,
                causal: case.causal,
            };
            be.attention_forward(
                &mut out,
                &mut lse,
                &qg,
                &kg,
                &vg,
                mask,
                rel_bias(case, &tg),
                case.scale,
                case.dims,
            );
            assert_close(
                &format!(
                    "attention_forward out, {:?}, {}",
                    be.attention_kernel(),
                    case.name
                ),
                &be,
                &out,
                &out_r,
                tol,
            );
            assert_lse_close(
                &format!(
                    "attention_forward lse, {:?}, {}",
                    be.attention_kernel(),
                    case.name
                ),
                &be,
                &lse,
                &lse_r,
                tol,
            );
        }
    }
}

#[test]
fn attention_backward_dinp_matches_cpu() {
    for (be, tol) in attention_backends() {
        let dt = be.dtype();
        for (ci, case) in attn_cases().iter().enumerate() {
            let AttnDims { b, t, h, d, .. } = case.dims;
            let [q, k, v, dout, table] = attn_inputs(case, ci as u64, dt);
            let key_mask = key_mask_of(case);
            let cpu = cpu();
            // The forward's outputs: exact for the reference, rounded to the dtype (as the GPU's
            // forward would have stored them) for the GPU. The CPU rebuilds P from the saved lse,
            // so a bf16-rounded lse would scale each reference row by e^δ (about 1% here) and
            // blunt the check. The GPU's GEMM path recomputes P; its flash kernels read lse in
            // f32 (exact here) and recompute it in bf16.
            let (mut out, mut lse) = (vec![0f32; b * t * h * d], vec![0f32; b * h * t]);
            let mask = AttnMask {
                key_mask: &key_mask,
                causal: case.causal,
            };
            cpu.attention_forward(
                &mut out,
                &mut lse,
                &q,
                &k,
                &v,
                mask,
                rel_bias(case, &table),
                case.scale,
                case.dims,
            );
            let (mut dq_r, mut dk_r, mut dv_r) = (
                vec![0f32; q.len()],
                vec![0f32; k.len()],
                vec![0f32; v.len()],
            );
            cpu.attention_backward_dinp(
                &mut dq_r,
                &mut dk_r,
                &mut dv_r,
                &dout,
                &q,
                &k,
                &v,
                &out,
                &lse,
                mask,
                rel_bias(case, &table),
                case.scale,
                case.dims,
            );

            let (mut dq, mut dk, mut dv) = (
                poisoned(&be, q.len()),
                poisoned(&be, k.len()),
                poisoned(&be, v.len()),
            );
            let up = |x: &Vec<f32>| be.upload_f32(x.clone());
            let rounded =
                |x: &Vec<f32>| be.upload_f32(x.iter().map(|&v| round_to(v, dt)).collect());
            let (qg, kg, vg, dog, og, lg, tg) = (
                up(&q),
                up(&k),
                up(&v),
                up(&dout),
                rounded(&out),
                rounded(&lse),
                up(&table),
            );
            let km = be.upload_index(&key_mask);
            let mask = AttnMask {
                key_mask: &km,
                causal: case.causal,
            };
            be.attention_backward_dinp(
                &mut dq,
                &mut dk,
                &mut dv,
                &dog,
                &qg,
                &kg,
                &vg,
                &og,
                &lg,
                mask,
                rel_bias(case, &tg),
                case.scale,
                case.dims,
            );
            for (name, got, want) in [("dq", &dq, &dq_r), ("dk", &dk, &dk_r), ("dv", &dv, &dv_r)] {
                assert_close(
                    &format!(
                        "attention_backward_dinp {name}, {:?}, {}",
                        be.attention_kernel(),
                        case.name
                    ),
                    &be,
                    got,
                    want,
                    tol,
                );
            }
        }
    }
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
