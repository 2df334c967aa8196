//! Test harness shared by the method files: a context with a random vocabulary, and the f64
//! finite-difference check of a method's backward.

use super::{train_params, MethodConfig, MethodContext, PromptMethod};
use crate::backend::cpu::CpuBackend;
use crate::backend::Backend;
use crate::testing::{dot, finite_diff, random_vec, rel_err};

pub type B64 = CpuBackend<f64>;

/// Runs `f` with an f64 backend and a context of width `d`, maximum length `m`, a random
/// 50-token vocabulary and a toy tokenizer (one id per byte).
pub fn with_context(d: usize, m: usize, f: impl FnOnce(&B64, &MethodContext<'_>)) {
    let vocab = 50;
    let table = random_vec(vocab * d, 1.0, 99);
    let embed_rows = |ids: &[u32]| -> crate::Result<Vec<f32>> {
        Ok(ids
            .iter()
            .flat_map(|&id| {
                table[id as usize * d..(id as usize + 1) * d]
                    .iter()
                    .map(|&x| x as f32)
            })
            .collect())
    };
    let tokenize = |text: &str| -> crate::Result<Vec<u32>> {
        Ok(text.bytes().map(|b| 3 + (b as u32) % 47).collect())
    };
    let ctx = MethodContext {
        d_model: d,
        max_len: m,
        vocab_size: vocab,
        first_regular_id: 3,
        seed: 5,
        embed_rows: &embed_rows,
        tokenize: Some(&tokenize),
    };
    f(&CpuBackend::new(), &ctx);
}

/// Checks, in f64, that `backward` adds the exact gradient of `⟨rows, R⟩ + ⟨update, U⟩` (R, U
/// random) to every parameter, by central finite differences on every parameter entry; and that
/// the method allocates exactly the train-time count of `cfg` and reports its stored count.
pub fn check_method_gradients(
    be: &B64,
    method: &mut dyn PromptMethod<B64>,
    cfg: &MethodConfig,
    ctx: &MethodContext<'_>,
) {
    let d = ctx.d_model;
    let counts = cfg.param_counts(d, ctx.max_len);
    assert_eq!(
        train_params(method),
        counts.train,
        "{}: train-time count",
        method.name()
    );
    assert_eq!(
        method.stored_params(),
        counts.stored,
        "{}: stored count",
        method.name()
    );

    method.forward(be);
    let p = method.prompt_rows();
    assert_eq!(
        be.len(method.rows()),
        p * d,
        "{}: rows are not (P, d)",
        method.name()
    );
    assert_eq!(p, cfg.prompt_rows(), "{}: prompt rows", method.name());
    let d_rows = random_vec(p * d, 1.0, 1234);
    let m_rows = method.update_rows();
    let d_update = m_rows.map(|m| random_vec(m * d, 1.0, 4321));
    if let (Some(m), Some(u)) = (m_rows, method.update()) {
        assert_eq!(be.len(u), m * d, "{}: update is not (M, d)", method.name());
    }
    let objective = |method: &mut dyn PromptMethod<B64>| -> f64 {
        method.forward(be);
        let mut total = dot(method.rows(), &d_rows);
        if let (Some(u), Some(du)) = (method.update(), &d_update) {
            total += dot(u, du);
        }
        total
    };

    for p in method.params_mut() {
        be.fill_zero(&mut p.grad);
    }
    method.forward(be);
    method.backward(be, &d_rows, d_update.as_ref());
    let n_params = method.params().len();
    for i in 0..n_params {
        let analytic = method.params()[i].grad.clone();
        let x0 = method.params()[i].value.clone();
        let name = method.params()[i].name.clone();
        let numeric = finite_diff(
            &mut |x| {
                method.params_mut()[i].value = x.to_vec();
                objective(method)
            },
            &x0,
            None,
            1e-6,
        );
        method.params_mut()[i].value = x0;
        let err = rel_err(&analytic, &numeric);
        assert!(err < 1e-6, "{}: d {name}: rel err {err}", method.name());
    }
    // Gradients accumulate: a second backward doubles them.
    let first: Vec<Vec<f64>> = method.params().iter().map(|p| p.grad.clone()).collect();
    method.forward(be);
    method.backward(be, &d_rows, d_update.as_ref());
    for (p, g) in method.params().iter().zip(first) {
        let doubled: Vec<f64> = g.iter().map(|x| 2.0 * x).collect();
        assert!(
            rel_err(&p.grad, &doubled) < 1e-12,
            "{}: {} does not accumulate",
            method.name(),
            p.name
        );
    }
}
