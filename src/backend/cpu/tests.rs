//! Tests of the CPU reference ops: forwards against naive loops, and every `*_backward_dinp`
//! against central finite differences in f64. Sizes are odd on purpose so that a swapped pair
//! of dimensions or a transposed index changes the result.

use super::*;
use crate::backend::LinearDims;
use crate::testing::{dot, finite_diff, random_vec, rel_err};

type B64 = CpuBackend<f64>;

const FD_EPS: f64 = 1e-6;
/// f64 finite differences with eps 1e-6 agree with an exact gradient to about 1e-8.
const FD_TOL: f64 = 1e-7;

fn be() -> B64 {
    CpuBackend::new()
}

/// Naive `op(a)·op(b)` for checking `matmul`.
fn naive_gemm(a: &[f64], b: &[f64], g: Gemm) -> Vec<f64> {
    let Gemm {
        m,
        n,
        k,
        trans_a,
        trans_b,
        alpha,
        ..
    } = g;
    let mut out = vec![0.0; m * n];
    for i in 0..m {
        for j in 0..n {
            let mut acc = 0.0;
            for kk in 0..k {
                let x = if trans_a {
                    a[kk * m + i]
                } else {
                    a[i * k + kk]
                };
                let y = if trans_b {
                    b[j * k + kk]
                } else {
                    b[kk * n + j]
                };
                acc += x * y;
            }
            out[i * n + j] = alpha * acc;
        }
    }
    out
}

#[test]
fn matmul_matches_naive_for_every_transpose() {
    let (m, n, k) = (5, 7, 3);
    for (seed, (trans_a, trans_b)) in [(false, false), (false, true), (true, false), (true, true)]
        .into_iter()
        .enumerate()
    {
        let a = random_vec(m * k, 1.0, seed as u64);
        let b = random_vec(k * n, 1.0, 100 + seed as u64);
        let g = Gemm {
            m,
            n,
            k,
            trans_a,
            trans_b,
            alpha: 0.5,
            accumulate: false,
        };
        let mut out = vec![f64::NAN; m * n]; // poisoned: overwrite must not read it
        be().matmul(&mut out, &a, &b, g);
        let expected = naive_gemm(&a, &b, g);
        assert!(
            rel_err(&out, &expected) < 1e-14,
            "trans_a={trans_a} trans_b={trans_b}"
        );

        // accumulate adds to what is there
        let init = random_vec(m * n, 1.0, 200 + seed as u64);
        let mut out = init.clone();
        be().matmul(&mut out, &a, &b, g.accumulate(true));
        let expected: Vec<f64> = init.iter().zip(&expected).map(|(x, y)| x + y).collect();
        assert!(rel_err(&out, &expected) < 1e-14);
    }
}

#[test]
fn linear_backward_dinp_matches_finite_differences() {
    let (n, ic, oc) = (3, 5, 4);
    let inp = random_vec(n * ic, 1.0, 1);
    let w = random_vec(oc * ic, 1.0, 2);
    let dout = random_vec(n * oc, 1.0, 3);
    let mut f = |x: &[f64]| {
        let mut out = vec![0.0; n * oc];
        be().linear_forward(&mut out, &x.to_vec(), &w, LinearDims::new(n, ic, oc));
        dot(&out, &dout)
    };
    let numeric = finite_diff(&mut f, &inp, None, FD_EPS);
    let mut dinp = vec![f64::NAN; n * ic];
    be().linear_backward_dinp(&mut dinp, &dout, &w, false, LinearDims::new(n, ic, oc));
    assert!(rel_err(&dinp, &numeric) < FD_TOL);
}

#[test]
fn gather_and_scatter_rows_are_adjoint() {
    let (r, c, m) = (6, 3, 4);
    let table = random_vec(r * c, 1.0, 4);
    let rows = vec![5, 0, 3, 2];
    let mut out = vec![f64::NAN; m * c];
    be().gather_rows(&mut out, &table, &rows, m, c);
    for (i, &row) in rows.iter().enumerate() {
        assert_eq!(
            &out[i * c..(i + 1) * c],
            &table[row as usize * c..(row as usize + 1) * c]
        );
    }
    // ⟨gather(x), y⟩ = ⟨x, scatter(y)⟩
    let y = random_vec(m * c, 1.0, 5);
    let mut dtable = vec![0.0; r * c];
    be().scatter_rows_add(&mut dtable, &y, &rows, m, c);
    assert!((dot(&out, &y) - dot(&table, &dtable)).abs() < 1e-12);
    // untouched rows stay zero
    assert!(dtable[c..2 * c].iter().all(|&x| x == 0.0));
}

#[test]
fn rmsnorm_forward_matches_definition() {
    let (n, c) = (3, 7);
    let inp = random_vec(n * c, 2.0, 6);
    let w = random_vec(c, 1.0, 7);
    let mut out = vec![f64::NAN; n * c];
    let mut rstd = vec![f64::NAN; n];
    be().rmsnorm_forward(&mut out, &mut rstd, &inp, &w, 1e-6, RmsNormDims { n, c });
    for i in 0..n {
        let row = &inp[i * c..(i + 1) * c];
        let ms = row.iter().map(|x| x * x).sum::<f64>() / c as f64;
        let r = 1.0 / (ms + 1e-6).sqrt();
        assert!((rstd[i] - r).abs() < 1e-14);
        for j in 0..c {
            assert!((out[i * c + j] - w[j] * row[j] * r).abs() < 1e-14);
        }
    }
}

#[test]
fn rmsnorm_backward_dinp_matches_finite_differences_and_accumulates() {
    let (n, c) = (4, 7);
    let inp = random_vec(n * c, 2.0, 8);
    let w = random_vec(c, 1.0, 9);
    let dout = random_vec(n * c, 1.0, 10);
    let eps = 1e-3; // large enough to matter in the derivative
    let mut f = |x: &[f64]| {
        let mut out = vec![0.0; n * c];
        let mut rstd = vec![0.0; n];
        be().rmsnorm_forward(
            &mut out,
            &mut rstd,
            &x.to_vec(),
            &w,
            eps,
            RmsNormDims { n, c },
        );
        dot(&out, &dout)
    };
    let numeric = finite_diff(&mut f, &inp, None, FD_EPS);
    let mut out = vec![0.0; n * c];
    let mut rstd = vec![0.0; n];
    be().rmsnorm_forward(&mut out, &mut rstd, &inp, &w, eps, RmsNormDims { n, c });
    let prior = random_vec(n * c, 1.0, 11);
    let mut dinp = prior.clone();
    be().rmsnorm_backward_dinp(&mut dinp, &dout, &inp, &w, &rstd, RmsNormDims { n, c });
    let added: Vec<f64> = dinp.iter().zip(&prior).map(|(a, b)| a - b).collect();
    assert!(rel_err(&added, &numeric) < FD_TOL);
}

/// The straightforward definition of attention, with an explicit bias tensor, to check the op.
fn naive_attention(
    q: &[f64],
    k: &[f64],
    v: &[f64],
    mask: AttnMask<'_, Vec<i32>>,
    bias: Option<&RelBias<'_, Vec<f64>>>,
    scale: f64,
    dims: AttnDims,
) -> Vec<f64> {
    let AttnMask { key_mask, causal } = mask;
    let AttnDims {
        b,
        t,
        s,
        h,
        h_kv,
        d,
    } = dims;
    let mut out = vec![0.0; b * t * h * d];
    for bi in 0..b {
        for hh in 0..h {
            let kvh = hh / (h / h_kv);
            for i in 0..t {
                let mut scores = vec![f64::NEG_INFINITY; s];
                for (j, score) in scores.iter_mut().enumerate() {
                    if key_mask[bi * s + j] == 0 || (causal && j > i) {
                        continue;
                    }
                    let mut acc = 0.0;
                    for dd in 0..d {
                        acc += q[((bi * t + i) * h + hh) * d + dd]
                            * k[((bi * s + j) * h_kv + kvh) * d + dd];
                    }
                    *score = scale * acc;
                    if let Some(bias) = bias {
                        let bucket = relative_position_bucket(
                            j as i64 - i as i64 - bias.q_offset as i64,
                            bias.bidirectional,
                            bias.num_buckets,
                            bias.max_distance,
                        );
                        *score += bias.table[bucket * h + hh];
                    }
                }
                let max = scores.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let z: f64 = scores.iter().map(|x| (x - max).exp()).sum();
                for j in 0..s {
                    let p = (scores[j] - max).exp() / z;
                    for dd in 0..d {
                        out[((bi * t + i) * h + hh) * d + dd] +=
                            p * v[((bi * s + j) * h_kv + kvh) * d + dd];
                    }
                }
            }
        }
    }
    out
}

/// Attention settings covering T5 encoder (bidirectional bias, padding), T5 decoder (causal,
/// unidirectional bias), cross-attention (T ≠ S, no bias), and Llama (GQA, causal, scaled).
struct AttnCase {
    name: &'static str,
    dims: AttnDims,
    causal: bool,
    bias: Option<bool>, // Some(bidirectional)
    scale: f64,
}

fn attn_cases() -> Vec<AttnCase> {
    vec![
        AttnCase {
            name: "encoder self, padded, bidirectional bias",
            dims: AttnDims {
                b: 2,
                t: 7,
                s: 7,
                h: 3,
                h_kv: 3,
                d: 5,
            },
            causal: false,
            bias: Some(true),
            scale: 1.0,
        },
        AttnCase {
            name: "decoder self, causal, unidirectional bias",
            dims: AttnDims {
                b: 2,
                t: 6,
                s: 6,
                h: 2,
                h_kv: 2,
                d: 3,
            },
            causal: true,
            bias: Some(false),
            scale: 1.0,
        },
        AttnCase {
            name: "cross attention, T != S",
            dims: AttnDims {
                b: 3,
                t: 4,
                s: 9,
                h: 3,
                h_kv: 3,
                d: 2,
            },
            causal: false,
            bias: None,
            scale: 1.0,
        },
        AttnCase {
            name: "grouped-query, causal, scaled",
            dims: AttnDims {
                b: 2,
                t: 5,
                s: 5,
                h: 4,
                h_kv: 2,
                d: 3,
            },
            causal: true,
            bias: None,
            scale: 1.0 / 3f64.sqrt(),
        },
    ]
}

/// A key mask with a different number of valid keys per batch entry (at least one).
fn key_mask(b: usize, s: usize) -> Vec<i32> {
    (0..b)
        .flat_map(|bi| (0..s).map(move |j| i32::from(j < s - (bi % s.min(3)))))
        .collect()
}

#[test]
fn attention_forward_matches_naive_definition() {
    for (ci, case) in attn_cases().into_iter().enumerate() {
        let AttnDims {
            b,
            t,
            s,
            h,
            h_kv,
            d,
        } = case.dims;
        let q = random_vec(b * t * h * d, 1.0, 20 + ci as u64);
        let k = random_vec(b * s * h_kv * d, 1.0, 30 + ci as u64);
        let v = random_vec(b * s * h_kv * d, 1.0, 40 + ci as u64);
        let mask = key_mask(b, s);
        let table = random_vec(8 * h, 1.0, 50 + ci as u64);
        let bias = case.bias.map(|bidirectional| RelBias {
            table: &table,
            bidirectional,
            num_buckets: 8,
            max_distance: 10,
            q_offset: ci, // a different query offset per case (0 for the first)
        });
        let mut out = vec![f64::NAN; b * t * h * d];
        let mut lse = vec![f64::NAN; b * h * t];
        let am = AttnMask {
            key_mask: &mask,
            causal: case.causal,
        };
        be().attention_forward(
            &mut out, &mut lse, &q, &k, &v, am, bias, case.scale, case.dims,
        );
        let expected = naive_attention(&q, &k, &v, am, bias.as_ref(), case.scale, case.dims);
        let err = rel_err(&out, &expected);
        assert!(err < 1e-13, "{}: rel err {err}", case.name);
    }
}

#[test]
fn attention_backward_dinp_matches_finite_differences() {
    for (ci, case) in attn_cases().into_iter().enumerate() {
        let AttnDims {
            b,
            t,
            s,
            h,
            h_kv,
            d,
        } = case.dims;
        let q = random_vec(b * t * h * d, 1.0, 60 + ci as u64);
        let k = random_vec(b * s * h_kv * d, 1.0, 70 + ci as u64);
        let v = random_vec(b * s * h_kv * d, 1.0, 80 + ci as u64);
        let dout = random_vec(b * t * h * d, 1.0, 90 + ci as u64);
        let mask = key_mask(b, s);
        let table = random_vec(8 * h, 1.0, 95 + ci as u64);
        let bias = case.bias.map(|bidirectional| RelBias {
            table: &table,
            bidirectional,
            num_buckets: 8,
            max_distance: 10,
            q_offset: 0,
        });
        let am = AttnMask {
            key_mask: &mask,
            causal: case.causal,
        };
        let scale = case.scale;
        let forward = |q: &Vec<f64>, k: &Vec<f64>, v: &Vec<f64>| {
            let mut out = vec![0.0; b * t * h * d];
            let mut lse = vec![0.0; b * h * t];
            be().attention_forward(&mut out, &mut lse, q, k, v, am, bias, scale, case.dims);
            (out, lse)
        };
        let (out, lse) = forward(&q, &k, &v);
        let mut dq = vec![f64::NAN; q.len()];
        let mut dk = vec![f64::NAN; k.len()];
        let mut dv = vec![f64::NAN; v.len()];
        be().attention_backward_dinp(
            &mut dq, &mut dk, &mut dv, &dout, &q, &k, &v, &out, &lse, am, bias, scale, case.dims,
        );

        let num_q = finite_diff(
            &mut |x| dot(&forward(&x.to_vec(), &k, &v).0, &dout),
            &q,
            None,
            FD_EPS,
        );
        let num_k = finite_diff(
            &mut |x| dot(&forward(&q, &x.to_vec(), &v).0, &dout),
            &k,
            None,
            FD_EPS,
        );
        let num_v = finite_diff(
            &mut |x| dot(&forward(&q, &k, &x.to_vec()).0, &dout),
            &v,
            None,
            FD_EPS,
        );
        for (name, analytic, numeric) in [
            ("dq", &dq, &num_q),
            ("dk", &dk, &num_k),
            ("dv", &dv, &num_v),
        ] {
            let err = rel_err(analytic, numeric);
            assert!(err < FD_TOL, "{}: {name} rel err {err}", case.name);
        }
        // Masked keys get no gradient.
        for bi in 0..b {
            for j in 0..s {
                if mask[bi * s + j] == 0 {
                    let row = &dk[(bi * s + j) * h_kv * d..][..h_kv * d];
                    assert!(
                        row.iter().all(|&x| x == 0.0),
                        "{}: masked key has a gradient",
                        case.name
                    );
                }
            }
        }
    }
}

#[test]
fn gated_act_backward_dinp_matches_finite_differences() {
    let len = 11;
    // Stay away from 0 so that ReLU's kink is not inside the finite-difference step.
    let a: Vec<f64> = random_vec(len, 3.0, 12)
        .into_iter()
        .map(|x| if x.abs() < 0.1 { x + 0.3 } else { x })
        .collect();
    let gate = random_vec(len, 1.0, 13);
    let dout = random_vec(len, 1.0, 14);
    for act in [Activation::Relu, Activation::GeluTanh, Activation::Silu] {
        for gated in [false, true] {
            let g = gated.then_some(&gate);
            let run = |a: &Vec<f64>, gate: Option<&Vec<f64>>| {
                let mut out = vec![0.0; len];
                be().gated_act_forward(&mut out, a, gate, act, len);
                dot(&out, &dout)
            };
            let num_a = finite_diff(&mut |x| run(&x.to_vec(), g), &a, None, FD_EPS);
            let mut da = vec![f64::NAN; len];
            let mut dgate = vec![f64::NAN; len];
            be().gated_act_backward_dinp(
                &mut da,
                gated.then_some(&mut dgate),
                &dout,
                &a,
                g,
                act,
                len,
            );
            assert!(rel_err(&da, &num_a) < FD_TOL, "{act:?} gated={gated}: da");
            if gated {
                let num_g = finite_diff(&mut |x| run(&a, Some(&x.to_vec())), &gate, None, FD_EPS);
                assert!(rel_err(&dgate, &num_g) < FD_TOL, "{act:?}: dgate");
            }
        }
    }
}

#[test]
fn activations_match_their_definitions() {
    let x = 0.7f64;
    let gelu =
        0.5 * x * (1.0 + ((2.0 / std::f64::consts::PI).sqrt() * (x + 0.044715 * x.powi(3))).tanh());
    assert!((activation(Activation::GeluTanh, x) - gelu).abs() < 1e-15);
    assert!((activation(Activation::Silu, x) - x / (1.0 + (-x).exp())).abs() < 1e-15);
    assert_eq!(activation(Activation::Relu, -x), 0.0);
    assert_eq!(activation(Activation::Relu, x), x);
}

#[test]
fn cross_entropy_matches_definition_and_finite_differences() {
    let (m, v) = (3, 7);
    let logits = random_vec(m * v, 3.0, 15);
    let targets = vec![6, 0, 3];
    let dloss = 1.0 / m as f64;
    let run = |l: &Vec<f64>| {
        let mut losses = vec![0.0; m];
        let mut dl = vec![0.0; m * v];
        be().cross_entropy_forward_backward(
            &mut losses,
            &mut dl,
            l,
            &targets,
            dloss,
            CrossEntropyDims { m, v },
        );
        (losses, dl)
    };
    let (losses, dlogits) = run(&logits);
    for i in 0..m {
        let row = &logits[i * v..(i + 1) * v];
        let z: f64 = row.iter().map(|x| x.exp()).sum();
        let expected = -(row[targets[i] as usize].exp() / z).ln();
        assert!((losses[i] - expected).abs() < 1e-12);
    }
    let mean_loss = |l: &[f64]| run(&l.to_vec()).0.iter().sum::<f64>() * dloss;
    let numeric = finite_diff(&mut |x| mean_loss(x), &logits, None, FD_EPS);
    assert!(rel_err(&dlogits, &numeric) < FD_TOL);
}

#[test]
fn f32_backend_agrees_with_f64() {
    // The f32 path must compute the same thing as the f64 one (to f32 precision).
    let (n, c) = (5, 9);
    let inp = random_vec(n * c, 1.0, 16);
    let w = random_vec(c, 1.0, 17);
    let b32: CpuBackend<f32> = CpuBackend::new();
    let inp32 = b32.upload_f64(&inp);
    let w32 = b32.upload_f64(&w);
    let mut out32 = b32.zeros(n * c);
    let mut rstd32 = b32.zeros(n);
    b32.rmsnorm_forward(
        &mut out32,
        &mut rstd32,
        &inp32,
        &w32,
        1e-6,
        RmsNormDims { n, c },
    );
    let mut out = vec![0.0; n * c];
    let mut rstd = vec![0.0; n];
    be().rmsnorm_forward(&mut out, &mut rstd, &inp, &w, 1e-6, RmsNormDims { n, c });
    assert!(rel_err(&b32.download_f64(&out32), &out) < 1e-6);
    assert_eq!(b32.name(), "cpu-f32");
    // from_f32 on the f32 backend is a move, on f64 a conversion
    assert_eq!(b32.upload_f32(vec![1.5, 2.0]), vec![1.5f32, 2.0]);
    assert_eq!(be().upload_f32(vec![1.5, 2.0]), vec![1.5f64, 2.0]);
}

// ---- prompt-method ops ---------------------------------------------------------------------

/// Checks `analytic` against the finite-difference gradient of `x ↦ ⟨f(x), dout⟩` at `x`.
fn check_fd(
    name: &str,
    f: &mut dyn FnMut(&[f64]) -> Vec<f64>,
    x: &[f64],
    dout: &[f64],
    analytic: &[f64],
) {
    let numeric = finite_diff(&mut |y| dot(&f(y), dout), x, None, FD_EPS);
    let err = rel_err(analytic, &numeric);
    assert!(err < FD_TOL, "{name}: rel err {err}");
}

#[test]
fn embed_prompt_forward_lays_out_rows_and_backward_is_its_adjoint() {
    let (b, t, p, c, v, m) = (2, 3, 2, 4, 7, 5);
    let table = random_vec(v * c, 1.0, 200);
    let ids = vec![6, 0, 3, 2, 2, 5];
    let prompt = random_vec(p * c, 1.0, 201);
    let update = random_vec(m * c, 1.0, 202);
    let mut out = vec![f64::NAN; b * (p + t) * c];
    be().embed_prompt_forward(
        &mut out,
        &table,
        &ids,
        &prompt,
        Some(&update),
        EmbedPromptDims { b, t, p, c },
    );
    for bi in 0..b {
        let row = |j: usize| &out[(bi * (p + t) + j) * c..][..c];
        assert_eq!(row(0), &prompt[..c]);
        assert_eq!(row(1), &prompt[c..2 * c]);
        for ti in 0..t {
            let id = ids[bi * t + ti] as usize;
            let want: Vec<f64> = (0..c)
                .map(|k| table[id * c + k] + update[ti * c + k])
                .collect();
            assert_eq!(row(p + ti), want.as_slice());
        }
    }
    // Linear in (prompt, update): the backward must be the adjoint.
    let dout = random_vec(out.len(), 1.0, 203);
    let mut d_prompt = vec![f64::NAN; p * c];
    let mut d_update = vec![f64::NAN; m * c];
    be().embed_prompt_backward(
        &mut d_prompt,
        Some(&mut d_update),
        &dout,
        EmbedPromptDims { b, t, p, c },
    );
    let mut f_prompt = |x: &[f64]| {
        let mut o = vec![0.0; b * (p + t) * c];
        be().embed_prompt_forward(
            &mut o,
            &table,
            &ids,
            &x.to_vec(),
            Some(&update),
            EmbedPromptDims { b, t, p, c },
        );
        o
    };
    check_fd("d_prompt", &mut f_prompt, &prompt, &dout, &d_prompt);
    let mut f_update = |x: &[f64]| {
        let mut o = vec![0.0; b * (p + t) * c];
        be().embed_prompt_forward(
            &mut o,
            &table,
            &ids,
            &prompt,
            Some(&x.to_vec()),
            EmbedPromptDims { b, t, p, c },
        );
        o
    };
    check_fd("d_update", &mut f_update, &update, &dout, &d_update);
    assert!(
        d_update[t * c..].iter().all(|&x| x == 0.0),
        "rows past T get no gradient"
    );
}

#[test]
fn linear_backward_dweight_and_bias_backward_match_finite_differences() {
    let (n, ic, oc) = (4, 3, 5);
    let inp = random_vec(n * ic, 1.0, 210);
    let w = random_vec(oc * ic, 1.0, 211);
    let bias = random_vec(oc, 1.0, 212);
    let dout = random_vec(n * oc, 1.0, 213);
    let run = |w: &[f64], bias: &[f64]| {
        let mut out = vec![0.0; n * oc];
        be().linear_forward(&mut out, &inp, &w.to_vec(), LinearDims::new(n, ic, oc));
        be().add_bias(&mut out, &bias.to_vec(), n, oc);
        out
    };
    let prior = random_vec(oc * ic, 1.0, 214);
    let mut dw = prior.clone();
    be().linear_backward_dweight(&mut dw, &dout, &inp, LinearDims::new(n, ic, oc));
    let added: Vec<f64> = dw.iter().zip(&prior).map(|(a, b)| a - b).collect();
    check_fd("dweight", &mut |x| run(x, &bias), &w, &dout, &added);
    let mut db = vec![0.0; oc];
    be().bias_backward(&mut db, &dout, n, oc);
    check_fd("dbias", &mut |x| run(&w, x), &bias, &dout, &db);
}

#[test]
fn layernorm_backward_matches_finite_differences() {
    let (n, c) = (3, 7);
    let inp = random_vec(n * c, 2.0, 220);
    let w = random_vec(c, 1.0, 221);
    let bias = random_vec(c, 1.0, 222);
    let dout = random_vec(n * c, 1.0, 223);
    let eps = 1e-3;
    let run = |x: &[f64], w: &[f64], bias: &[f64]| {
        let (mut out, mut mean, mut rstd) = (vec![0.0; n * c], vec![0.0; n], vec![0.0; n]);
        be().layernorm_forward(
            &mut out,
            &mut mean,
            &mut rstd,
            &x.to_vec(),
            &w.to_vec(),
            &bias.to_vec(),
            eps,
            LayerNormDims { n, c },
        );
        (out, mean, rstd)
    };
    let (out, mean, rstd) = run(&inp, &w, &bias);
    // the definition: zero mean, unit variance per row before the affine map
    for i in 0..n {
        let xhat: Vec<f64> = (0..c).map(|j| (out[i * c + j] - bias[j]) / w[j]).collect();
        assert!(xhat.iter().sum::<f64>().abs() < 1e-10);
    }
    let mut dinp = vec![f64::NAN; n * c];
    let (mut dw, mut db) = (vec![0.0; c], vec![0.0; c]);
    be().layernorm_backward(
        &mut dinp,
        &mut dw,
        &mut db,
        &dout,
        &inp,
        &w,
        &mean,
        &rstd,
        LayerNormDims { n, c },
    );
    check_fd("dinp", &mut |x| run(x, &w, &bias).0, &inp, &dout, &dinp);
    check_fd("dweight", &mut |x| run(&inp, x, &bias).0, &w, &dout, &dw);
    check_fd("dbias", &mut |x| run(&inp, &w, x).0, &bias, &dout, &db);
}

#[test]
fn softmax_rows_backward_dinp_matches_finite_differences() {
    let (n, k) = (3, 5);
    let inp = random_vec(n * k, 3.0, 230);
    let dout = random_vec(n * k, 1.0, 231);
    let run = |x: &[f64]| {
        let mut out = vec![0.0; n * k];
        be().softmax_rows_forward(&mut out, &x.to_vec(), n, k);
        out
    };
    let out = run(&inp);
    for row in out.chunks(k) {
        assert!((row.iter().sum::<f64>() - 1.0).abs() < 1e-14);
    }
    let mut dinp = vec![f64::NAN; n * k];
    be().softmax_rows_backward_dinp(&mut dinp, &dout, &out, n, k);
    check_fd("dinp", &mut |x| run(x), &inp, &dout, &dinp);
}

#[test]
fn fusion_attention_matches_definition_and_finite_differences() {
    let (s, m, c) = (3, 5, 4);
    let ps = random_vec(s * c, 1.0, 240);
    let lr = random_vec(m * c, 1.0, 241);
    let dout = random_vec(s * c, 1.0, 242);
    for mode in [FusionMode::Attend, FusionMode::Paper] {
        let run = |ps: &[f64], lr: &[f64]| {
            let (mut out, mut probs) = (vec![0.0; s * c], vec![0.0; s * m]);
            be().fusion_attention_forward(
                &mut out,
                &mut probs,
                &ps.to_vec(),
                &lr.to_vec(),
                mode,
                FusionAttentionDims { s, m, c },
            );
            (out, probs)
        };
        let (out, probs) = run(&ps, &lr);
        // Definition, written out directly.
        let score = |p: usize, j: usize| {
            (0..c).map(|k| ps[p * c + k] * lr[j * c + k]).sum::<f64>() / (c as f64).sqrt()
        };
        for p in 0..s {
            for k in 0..c {
                let want = match mode {
                    FusionMode::Attend => {
                        let z: f64 = (0..m).map(|j| score(p, j).exp()).sum();
                        ps[p * c + k]
                            + (0..m)
                                .map(|j| score(p, j).exp() / z * lr[j * c + k])
                                .sum::<f64>()
                    }
                    FusionMode::Paper => {
                        let g: f64 = (0..m)
                            .map(|j| {
                                score(p, j).exp() / (0..s).map(|q| score(q, j).exp()).sum::<f64>()
                            })
                            .sum();
                        (1.0 + g) * ps[p * c + k]
                    }
                };
                assert!((out[p * c + k] - want).abs() < 1e-12, "{mode:?} ({p}, {k})");
            }
        }
        let (mut d_ps, mut d_lr) = (vec![f64::NAN; s * c], vec![f64::NAN; m * c]);
        be().fusion_attention_backward(
            &mut d_ps,
            &mut d_lr,
            &dout,
            &ps,
            &lr,
            &probs,
            mode,
            FusionAttentionDims { s, m, c },
        );
        check_fd(
            &format!("{mode:?} d_ps"),
            &mut |x| run(x, &lr).0,
            &ps,
            &dout,
            &d_ps,
        );
        check_fd(
            &format!("{mode:?} d_lr"),
            &mut |x| run(&ps, x).0,
            &lr,
            &dout,
            &d_lr,
        );
    }
}

#[test]
fn gated_experts_backward_matches_finite_differences() {
    let (n, c, e) = (3, 4, 3);
    let gate = random_vec(n * e, 1.0, 250);
    let experts: Vec<Vec<f64>> = (0..e)
        .map(|i| random_vec(n * c, 1.0, 251 + i as u64))
        .collect();
    let dout = random_vec(n * c, 1.0, 255);
    let run = |gate: &[f64], experts: &[Vec<f64>]| {
        let mut out = vec![0.0; n * c];
        let refs: Vec<&Vec<f64>> = experts.iter().collect();
        be().gated_experts_forward(&mut out, &gate.to_vec(), &refs, GatedExpertsDims { n, c });
        out
    };
    let mut d_gate = vec![f64::NAN; n * e];
    let mut d_experts = vec![vec![f64::NAN; n * c]; e];
    let refs: Vec<&Vec<f64>> = experts.iter().collect();
    be().gated_experts_backward(
        &mut d_gate,
        &mut d_experts,
        &dout,
        &gate,
        &refs,
        GatedExpertsDims { n, c },
    );
    check_fd("d_gate", &mut |x| run(x, &experts), &gate, &dout, &d_gate);
    for i in 0..e {
        let mut f = |x: &[f64]| {
            let mut ex = experts.clone();
            ex[i] = x.to_vec();
            run(&gate, &ex)
        };
        check_fd(
            &format!("d_expert {i}"),
            &mut f,
            &experts[i],
            &dout,
            &d_experts[i],
        );
    }
}

#[test]
fn lamp_pool_matches_pooling_the_full_product_and_finite_differences() {
    let (l, r, c, p) = (6, 2, 5, 3);
    let u = random_vec(l * r, 1.0, 260);
    let q = random_vec(r, 1.0, 261);
    let v = random_vec(c * r, 1.0, 262);
    let dout = random_vec(l / p * c, 1.0, 263);
    let run = |u: &[f64], q: &[f64], v: &[f64]| {
        let mut out = vec![0.0; l / p * c];
        be().lamp_pool_forward(
            &mut out,
            &u.to_vec(),
            &q.to_vec(),
            &v.to_vec(),
            LampPoolDims { l, r, c, p },
        );
        out
    };
    let out = run(&u, &q, &v);
    // Pool(U·diag(q²)·Vᵀ) computed the long way.
    for i in 0..l / p {
        for k in 0..c {
            let want: f64 = (0..p)
                .map(|a| {
                    (0..r)
                        .map(|j| u[(i * p + a) * r + j] * q[j] * q[j] * v[k * r + j])
                        .sum::<f64>()
                })
                .sum::<f64>()
                / p as f64;
            assert!((out[i * c + k] - want).abs() < 1e-12);
        }
    }
    let (mut du, mut dq, mut dv) = (vec![0.0; l * r], vec![0.0; r], vec![0.0; c * r]);
    be().lamp_pool_backward(
        &mut du,
        &mut dq,
        &mut dv,
        &dout,
        &u,
        &q,
        &v,
        LampPoolDims { l, r, c, p },
    );
    check_fd("du", &mut |x| run(x, &q, &v), &u, &dout, &du);
    check_fd("dq", &mut |x| run(&u, x, &v), &q, &dout, &dq);
    check_fd("dv", &mut |x| run(&u, &q, x), &v, &dout, &dv);
}

#[test]
fn adamw_step_matches_a_hand_computed_step() {
    // Two steps of PyTorch's AdamW on a 2-vector, computed by hand:
    // lr 0.1, β = (0.9, 0.999), eps 1e-8, weight decay 0.01, grad_scale 0.5.
    let h = |step| AdamW {
        lr: 0.1,
        beta1: 0.9,
        beta2: 0.999,
        eps: 1e-8,
        weight_decay: 0.01,
        step,
        grad_scale: 0.5,
    };
    let mut p = vec![f64::NAN; 2]; // written from the master
    let mut master = vec![1.0, -2.0];
    let (mut m, mut v) = (vec![0.0; 2], vec![0.0; 2]);
    let grad = vec![0.4, -0.2];
    be().adamw_step(&mut p, &mut master, &mut m, &mut v, &grad, h(1));
    // step 1: g = (0.2, -0.1); m̂ = g, v̂ = g², so the Adam part is sign(g)·|g|/(|g| + eps) ≈ ±1.
    let want1 = [
        1.0 - 0.1 * (0.2 / (0.2 + 1e-8) + 0.01 * 1.0),
        -2.0 - 0.1 * (-0.1 / (0.1 + 1e-8) + 0.01 * -2.0),
    ];
    assert!(
        (p[0] - want1[0]).abs() < 1e-15 && (p[1] - want1[1]).abs() < 1e-15,
        "{p:?}"
    );
    assert_eq!(p, master);
    assert!((m[0] - 0.02).abs() < 1e-15 && (v[0] - 0.001 * 0.04).abs() < 1e-18);
    be().adamw_step(&mut p, &mut master, &mut m, &mut v, &grad, h(2));
    // step 2, same g: m = 0.19·g, v = 0.001999·g²; m̂ = g, v̂ = g² again.
    let want2 = want1[0] - 0.1 * (0.2 / (0.2 + 1e-8) + 0.01 * want1[0]);
    assert!((p[0] - want2).abs() < 1e-14, "{} vs {want2}", p[0]);
    assert!((m[0] - 0.19 * 0.2).abs() < 1e-15);
    assert_eq!(be().sum_squares(&vec![3.0, 4.0]), 25.0);
}

/// RoPE against the complex-number definition: pair (x[i], x[i + D/2]) as `x[i] + i·x[i+D/2]`,
/// multiplied by `e^{iθ}` with θ = pos·freq[i].
#[test]
fn rope_forward_matches_complex_rotation() {
    let (n, h, d, rows) = (5, 3, 6, 7);
    let half = d / 2;
    let freqs = [1.0, 0.3, 0.05];
    let cos: Vec<f64> = (0..rows)
        .flat_map(|p| freqs.iter().map(move |f| (p as f64 * f).cos()))
        .collect();
    let sin: Vec<f64> = (0..rows)
        .flat_map(|p| freqs.iter().map(move |f| (p as f64 * f).sin()))
        .collect();
    let positions = vec![0, 6, 2, 2, 5]; // unordered, repeated, the last table row
    let x = random_vec(n * h * d, 1.0, 1);
    let mut out = vec![f64::NAN; x.len()];
    be().rope_forward(&mut out, &x, &positions, &cos, &sin, RopeDims { n, h, d });
    let mut expected = vec![0.0; x.len()];
    for (r, &pos) in positions.iter().enumerate() {
        for hh in 0..h {
            let base = (r * h + hh) * d;
            for (i, &freq) in freqs.iter().enumerate() {
                let theta = pos as f64 * freq;
                let (re, im) = (x[base + i], x[base + i + half]);
                expected[base + i] = re * theta.cos() - im * theta.sin();
                expected[base + i + half] = re * theta.sin() + im * theta.cos();
            }
        }
    }
    let err = rel_err(&out, &expected);
    assert!(err < 1e-14, "rel err {err}");
}

#[test]
fn rope_backward_dinp_matches_finite_differences() {
    let (n, h, d, rows) = (4, 2, 4, 5);
    let angles: Vec<f64> = (0..rows * d / 2).map(|i| 0.37 * i as f64).collect();
    let cos: Vec<f64> = angles.iter().map(|a| a.cos()).collect();
    let sin: Vec<f64> = angles.iter().map(|a| a.sin()).collect();
    let positions = vec![3, 0, 4, 1];
    let x = random_vec(n * h * d, 1.0, 2);
    let dout = random_vec(n * h * d, 1.0, 3);
    let mut dinp = vec![f64::NAN; x.len()];
    be().rope_backward_dinp(
        &mut dinp,
        &dout,
        &positions,
        &cos,
        &sin,
        RopeDims { n, h, d },
    );
    let numeric = finite_diff(
        &mut |x| {
            let mut out = vec![0.0; x.len()];
            be().rope_forward(
                &mut out,
                &x.to_vec(),
                &positions,
                &cos,
                &sin,
                RopeDims { n, h, d },
            );
            dot(&out, &dout)
        },
        &x,
        None,
        FD_EPS,
    );
    let err = rel_err(&dinp, &numeric);
    assert!(err < FD_TOL, "rel err {err}");
}
