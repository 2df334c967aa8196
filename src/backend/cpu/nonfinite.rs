//! Non-finite values through the ops (issue 19, rule 3): a NaN in a score or input row gives NaN
//! in that row's output, and in the gradients it reaches, never a finite number; a row that sees
//! no key keeps its documented result (output 0, lse −inf, no gradient).
//!
//! Which elements must be NaN follows PyTorch's fused attention (FlashAttention / memory-efficient
//! SDPA): a masked key is never read, so a NaN there changes nothing, and a row that sees no key
//! outputs 0 (PyTorch's eager softmax of an all −inf row is NaN; fastpt's all-zero row is the
//! documented behaviour the T5 encoder relies on for fully padded entries). Elements whose value
//! is `0 · NaN` by accident of the arithmetic (the gradient of a key the NaN row does not see,
//! which the dense formula multiplies by a probability of 0) are left unspecified.
//!
//! [`NanAttention`] is shared with the GPU tests (`gpu/tests/edges.rs`), which run the same
//! inputs on the virtual GPU and check the same pattern.

use super::*;
use crate::testing::random_vec;

/// Where the one NaN of [`NanAttention`] goes: batch entry 0, head 0 (KV head 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Poison {
    /// `q[0, row, head 0, 3]`: only that query row reads it.
    QueryRow(usize),
    /// `k[0, key, kv head 0, 3]`: every query row that sees the key reads it.
    Key(usize),
    /// `k[0, key, kv head 0, 3]` of a padded key: no score reads it, so the forward and dk, dv
    /// stay finite (dq = dS·K multiplies it by 0: unspecified).
    MaskedKey(usize),
}

/// One attention call (forward and backward) with one NaN input: batch entry 0 has its last two
/// keys padded, batch entry 1 sees no key at all; heads 0 and 1 have their own KV heads.
pub(crate) struct NanAttention {
    pub dims: AttnDims,
    pub causal: bool,
    pub bias: bool,
    pub poison: Poison,
    pub q: Vec<f32>,        // (B, T, H·D)
    pub k: Vec<f32>,        // (B, S, Hkv·D)
    pub v: Vec<f32>,        // (B, S, Hkv·D)
    pub dout: Vec<f32>,     // (B, T, H·D)
    pub key_mask: Vec<i32>, // (B, S)
    pub table: Vec<f32>,    // (num_buckets = 8, H)
}

/// The outputs of [`NanAttention::run`], downloaded.
pub(crate) struct AttnResults {
    pub out: Vec<f32>, // (B, T, H·D)
    pub lse: Vec<f32>, // (B, H, T)
    pub dq: Vec<f32>,  // (B, T, H·D)
    pub dk: Vec<f32>,  // (B, S, Hkv·D)
    pub dv: Vec<f32>,  // (B, S, Hkv·D)
}

/// What an element must be.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Want {
    Nan,
    Finite,
    /// Exactly this value (0 for a row that sees no key, −inf for its lse).
    Exactly(f32),
    /// Either (see the module docs).
    Any,
}

impl NanAttention {
    /// Inputs of head width `d` (64: the tensor-core kernels' width), rounded with `round`.
    pub fn new(d: usize, causal: bool, bias: bool, poison: Poison, round: fn(f32) -> f32) -> Self {
        let dims = AttnDims {
            b: 2,
            t: 5,
            s: 7,
            h: 2,
            h_kv: 2,
            d,
        };
        let (b, t, s, h, h_kv) = (dims.b, dims.t, dims.s, dims.h, dims.h_kv);
        let rand = |n: usize, seed: u64| -> Vec<f32> {
            random_vec(n, 1.0, seed)
                .into_iter()
                .map(|x| round(x as f32))
                .collect()
        };
        let mut q = rand(b * t * h * d, 1);
        let mut k = rand(b * s * h_kv * d, 2);
        match poison {
            Poison::QueryRow(i) => q[i * h * d + 3] = f32::NAN,
            Poison::Key(j) | Poison::MaskedKey(j) => k[j * h_kv * d + 3] = f32::NAN,
        }
        // Entry 0: keys 0..5 visible, 5 and 6 padding; entry 1: no visible key.
        let key_mask = (0..b * s)
            .map(|x| i32::from(x < s && x < 5))
            .collect::<Vec<_>>();
        NanAttention {
            dims,
            causal,
            bias,
            poison,
            q,
            k,
            v: rand(b * s * h_kv * d, 3),
            dout: rand(b * t * h * d, 4),
            key_mask,
            table: rand(8 * h, 5),
        }
    }

    fn scale(&self) -> f64 {
        1.0 / (self.dims.d as f64).sqrt()
    }

    /// Forward, then backward (with `dout`), on `be`.
    pub fn run<B: Backend>(&self, be: &B) -> AttnResults {
        let AttnDims { b, t, h, d, .. } = self.dims;
        let (q, k, v) = (
            be.upload_f32(self.q.clone()),
            be.upload_f32(self.k.clone()),
            be.upload_f32(self.v.clone()),
        );
        let km = be.upload_index(&self.key_mask);
        let table = be.upload_f32(self.table.clone());
        let mask = AttnMask {
            key_mask: &km,
            causal: self.causal,
        };
        let bias = self.bias.then_some(RelBias {
            table: &table,
            bidirectional: !self.causal,
            num_buckets: 8,
            max_distance: 20,
            q_offset: 0,
        });
        let nan = |n: usize| be.upload_f32(vec![f32::NAN; n]);
        let (mut out, mut lse) = (nan(b * t * h * d), nan(b * h * t));
        be.attention_forward(
            &mut out,
            &mut lse,
            &q,
            &k,
            &v,
            mask,
            bias,
            self.scale(),
            self.dims,
        );
        let (mut dq, mut dk, mut dv) = (nan(self.q.len()), nan(self.k.len()), nan(self.v.len()));
        let dout = be.upload_f32(self.dout.clone());
        be.attention_backward_dinp(
            &mut dq,
            &mut dk,
            &mut dv,
            &dout,
            &q,
            &k,
            &v,
            &out,
            &lse,
            mask,
            bias,
            self.scale(),
            self.dims,
        );
        AttnResults {
            out: be.download_f32(&out),
            lse: be.download_f32(&lse),
            dq: be.download_f32(&dq),
            dk: be.download_f32(&dk),
            dv: be.download_f32(&dv),
        }
    }

    /// Whether query row `i` of entry 0 sees key `j`.
    fn sees(&self, i: usize, j: usize) -> bool {
        self.key_mask[j] != 0 && !(self.causal && j > i)
    }

    /// The query rows of entry 0, head 0 whose output is NaN.
    fn nan_rows(&self) -> Vec<usize> {
        (0..self.dims.t)
            .filter(|&i| match self.poison {
                Poison::QueryRow(r) => i == r,
                Poison::Key(j) => self.sees(i, j),
                Poison::MaskedKey(_) => false,
            })
            .collect()
    }

    /// What each element of `(out, lse, dq, dk, dv)` must be.
    pub fn wants(&self) -> [Vec<Want>; 5] {
        let AttnDims {
            b,
            t,
            s,
            h,
            h_kv,
            d,
        } = self.dims;
        let nan_rows = self.nan_rows();
        let is_nan_row =
            |bi: usize, hh: usize, i: usize| bi == 0 && hh == 0 && nan_rows.contains(&i);
        // A key of entry 0, KV head 0 is NaN in dk and dv when a NaN row sees it; the poisoned
        // (visible) key itself too. Other keys of that head: 0 · NaN, unspecified.
        let key_want = |bi: usize, kvh: usize, j: usize| match (bi, kvh) {
            (1, _) => Want::Exactly(0.0),
            (0, 0) if self.poison == Poison::Key(j) => Want::Nan,
            (0, 0) if nan_rows.iter().any(|&i| self.sees(i, j)) => Want::Nan,
            (0, 0) if nan_rows.is_empty() => Want::Finite,
            (0, 0) => Want::Any,
            _ => Want::Finite,
        };
        let mut out = Vec::with_capacity(b * t * h * d);
        let mut dq = Vec::with_capacity(b * t * h * d);
        for bi in 0..b {
            for i in 0..t {
                for hh in 0..h {
                    let (o, g) = if bi == 1 {
                        (Want::Exactly(0.0), Want::Exactly(0.0))
                    } else if is_nan_row(bi, hh, i) {
                        (Want::Nan, Want::Nan)
                    } else if hh == 0
                        && matches!(self.poison, Poison::Key(_) | Poison::MaskedKey(_))
                    {
                        // dq = dS·K reads the NaN key with a probability of 0: 0 · NaN.
                        (Want::Finite, Want::Any)
                    } else {
                        (Want::Finite, Want::Finite)
                    };
                    out.extend(std::iter::repeat_n(o, d));
                    dq.extend(std::iter::repeat_n(g, d));
                }
            }
        }
        let mut lse = Vec::with_capacity(b * h * t);
        for bi in 0..b {
            for hh in 0..h {
                for i in 0..t {
                    lse.push(if bi == 1 {
                        Want::Exactly(f32::NEG_INFINITY)
                    } else if is_nan_row(bi, hh, i) {
                        Want::Nan
                    } else {
                        Want::Finite
                    });
                }
            }
        }
        let mut dk = Vec::with_capacity(b * s * h_kv * d);
        for bi in 0..b {
            for j in 0..s {
                for kvh in 0..h_kv {
                    dk.extend(std::iter::repeat_n(key_want(bi, kvh, j), d));
                }
            }
        }
        let dv = dk.clone();
        [out, lse, dq, dk, dv]
    }

    /// Asserts that `got` has the pattern of [`NanAttention::wants`]; `what` names the backend.
    #[track_caller]
    pub fn check(&self, got: &AttnResults, what: &str) {
        let names = ["out", "lse", "dq", "dk", "dv"];
        let arrays = [&got.out, &got.lse, &got.dq, &got.dk, &got.dv];
        for ((name, xs), wants) in names.iter().zip(arrays).zip(self.wants()) {
            assert_eq!(xs.len(), wants.len(), "{what}: {name} length");
            for (e, (&x, want)) in xs.iter().zip(&wants).enumerate() {
                let ok = match want {
                    Want::Nan => x.is_nan(),
                    Want::Finite => x.is_finite(),
                    Want::Exactly(y) => x == *y,
                    Want::Any => true,
                };
                assert!(
                    ok,
                    "{what} ({:?}, causal {}, bias {}): {name}[{e}] = {x}, expected {want:?}",
                    self.poison, self.causal, self.bias
                );
            }
        }
    }

    /// Every (causal, bias, poison) setting of the tests.
    pub fn settings() -> Vec<(bool, bool, Poison)> {
        let mut all = Vec::new();
        for (causal, bias) in [(false, true), (true, true), (true, false)] {
            for poison in [Poison::QueryRow(2), Poison::Key(1), Poison::MaskedKey(6)] {
                all.push((causal, bias, poison));
            }
        }
        all
    }
}

/// The CPU reference in f32 and f64: a NaN query row is NaN in that row only (and in the
/// gradients of the keys it sees), a NaN key in every row that sees it, a NaN padded key nowhere;
/// the entry that sees no key keeps output 0, lse −inf, zero gradients.
#[test]
fn attention_nan_propagates_as_pytorch_and_empty_rows_stay_zero() {
    fn both<T: Float>() {
        for (causal, bias, poison) in NanAttention::settings() {
            let x = NanAttention::new(8, causal, bias, poison, |v| v);
            let got = x.run(&CpuBackend::<T>::new());
            x.check(&got, &format!("cpu {}", std::any::type_name::<T>()));
        }
    }
    both::<f32>();
    both::<f64>();
}

/// Row softmax: an all-NaN row (the scores of a NaN query) is NaN, not the all-zero row that
/// `f32::max` would leave (it drops NaN, so the max stays −inf); one NaN makes its row NaN; the
/// other rows are untouched. The backward of a NaN row is NaN.
#[test]
fn softmax_rows_nan_row_is_nan() {
    fn both<T: Float>() {
        let be = CpuBackend::<T>::new();
        let (n, k) = (3, 5);
        let mut x = random_vec(n * k, 2.0, 7);
        x[k..2 * k].fill(f64::NAN);
        x[2 * k + 3] = f64::NAN;
        let inp = be.upload_f64(&x);
        let mut out = be.zeros(n * k);
        be.softmax_rows_forward(&mut out, &inp, n, k);
        let y = be.download_f64(&out);
        assert!(y[..k].iter().all(|v| v.is_finite()));
        assert!(y[k..].iter().all(|v| v.is_nan()), "{y:?}");
        let mut dinp = be.zeros(n * k);
        be.softmax_rows_backward_dinp(&mut dinp, &be.upload_f64(&vec![1.0; n * k]), &out, n, k);
        let dx = be.download_f64(&dinp);
        assert!(dx[..k].iter().all(|v| v.is_finite()));
        assert!(dx[k..].iter().all(|v| v.is_nan()), "{dx:?}");
    }
    both::<f32>();
    both::<f64>();
}

/// Cross-entropy: a row of NaN logits has a NaN loss and NaN gradients; other rows are finite.
#[test]
fn cross_entropy_nan_logits_give_nan_loss() {
    let be = CpuBackend::<f64>::new();
    let (m, v) = (3, 6);
    let mut logits = random_vec(m * v, 3.0, 8);
    logits[v..2 * v].fill(f64::NAN);
    logits[2 * v + 1] = f64::NAN;
    let mut losses = be.zeros(m);
    let mut dl = be.zeros(m * v);
    be.cross_entropy_forward_backward(
        &mut losses,
        &mut dl,
        &logits,
        &vec![1, 2, 3],
        1.0,
        CrossEntropyDims { m, v },
    );
    assert!(losses[0].is_finite() && losses[1].is_nan() && losses[2].is_nan());
    assert!(dl[..v].iter().all(|x| x.is_finite()));
    assert!(dl[v..].iter().all(|x| x.is_nan()));
}

/// ReLU keeps a NaN (torch.relu does; `x.max(0)` returned 0) and its derivative there is NaN.
#[test]
fn relu_keeps_nan() {
    for x in [f64::NAN, -f64::NAN] {
        assert!(activation(Activation::Relu, x).is_nan());
        assert!(activation_grad(Activation::Relu, x).is_nan());
    }
    assert_eq!(activation(Activation::Relu, -2.0f32), 0.0);
    assert_eq!(activation(Activation::Relu, 2.0f32), 2.0);
    assert_eq!(activation_grad(Activation::Relu, 0.0f32), 0.0);
}
