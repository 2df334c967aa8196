//! Initialisation helpers shared by the methods: seeded uniform and normal values, rows copied
//! from the vocabulary, and a truncated SVD (faer).

use faer::Mat;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

use super::MethodContext;
use crate::error::{Error, Result};

/// A seeded generator for one named parameter: every parameter draws from its own stream, so
/// adding a parameter to a method does not change the others' initial values.
pub fn rng_for(seed: u64, name: &str) -> ChaCha8Rng {
    let h = name.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3)
    });
    ChaCha8Rng::seed_from_u64(seed ^ h)
}

/// `n` values uniform in `[lo, hi)`.
pub fn uniform(n: usize, lo: f64, hi: f64, rng: &mut ChaCha8Rng) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(lo..hi) as f32).collect()
}

/// `n` values from N(0, std²).
pub fn normal(n: usize, std: f64, rng: &mut ChaCha8Rng) -> Vec<f32> {
    (0..n)
        .map(|_| {
            let z: f64 = StandardNormal.sample(rng);
            (z * std) as f32
        })
        .collect()
}

/// PyTorch's default `nn.Linear` init, U(−1/√fan_in, 1/√fan_in), for a weight or bias.
pub fn linear_default(n: usize, fan_in: usize, rng: &mut ChaCha8Rng) -> Vec<f32> {
    let bound = 1.0 / (fan_in as f64).sqrt();
    uniform(n, -bound, bound, rng)
}

/// How many of the lowest non-special ids the `vocab` init draws from (Lester et al.:
/// SentencePiece vocabularies are ordered by frequency, so these are common tokens).
pub const VOCAB_INIT_TOP: u32 = 5000;

/// `l` rows copied from the embeddings of ids drawn uniformly from the `VOCAB_INIT_TOP` lowest
/// ids after the special ones (`ctx.first_regular_id`). Returns `(l, C)` row-major.
pub fn vocab_rows(l: usize, ctx: &MethodContext<'_>, rng: &mut ChaCha8Rng) -> Result<Vec<f32>> {
    let first = ctx.first_regular_id;
    let end = (first + VOCAB_INIT_TOP).min(ctx.vocab_size as u32);
    if end <= first {
        return Err(Error::Input(format!(
            "vocab init: the vocabulary ({} ids) has no regular id after the first {first}",
            ctx.vocab_size
        )));
    }
    let ids: Vec<u32> = (0..l).map(|_| rng.random_range(first..end)).collect();
    (ctx.embed_rows)(&ids)
}

/// `l` rows of a tokenised text's embeddings, the text repeated (or cut) to length `l`.
pub fn text_rows(l: usize, text: &str, ctx: &MethodContext<'_>) -> Result<Vec<f32>> {
    let tokenize = ctx.tokenize.ok_or_else(|| {
        Error::Input("init = \"text\" needs a model folder with tokenizer.json".into())
    })?;
    let ids = tokenize(text)?;
    if ids.is_empty() {
        return Err(Error::Input(format!(
            "init text {text:?} tokenizes to nothing"
        )));
    }
    let ids: Vec<u32> = ids.iter().copied().cycle().take(l).collect();
    (ctx.embed_rows)(&ids)
}

/// The rank-`r` truncated SVD of `a (rows, cols)`: `u (rows, r)`, `s (r)` descending,
/// `v (cols, r)`, with `a ≈ u·diag(s)·vᵀ`. Computed in f64 by faer.
pub fn truncated_svd(
    a: &[f64],
    rows: usize,
    cols: usize,
    r: usize,
) -> Result<(Vec<f64>, Vec<f64>, Vec<f64>)> {
    assert_eq!(a.len(), rows * cols, "truncated_svd: a is not (rows, cols)");
    assert!(
        r <= rows.min(cols),
        "truncated_svd: rank {r} > min({rows}, {cols})"
    );
    let mat = Mat::<f64>::from_fn(rows, cols, |i, j| a[i * cols + j]);
    let svd = mat
        .thin_svd()
        .map_err(|e| Error::Input(format!("SVD did not converge: {e:?}")))?;
    let (u, s, v) = (svd.U(), svd.S().column_vector(), svd.V());
    // Order by singular value, largest first, whatever order the solver returns.
    let mut order: Vec<usize> = (0..rows.min(cols)).collect();
    order.sort_by(|&x, &y| s[y].total_cmp(&s[x]));
    let keep = &order[..r];
    let u_r = (0..rows)
        .flat_map(|i| keep.iter().map(move |&k| u[(i, k)]))
        .collect();
    let s_r = keep.iter().map(|&k| s[k]).collect();
    let v_r = (0..cols)
        .flat_map(|j| keep.iter().map(move |&k| v[(j, k)]))
        .collect();
    Ok((u_r, s_r, v_r))
}

/// `u·diag(s)·vᵀ (rows, cols)` for `u (rows, r)`, `s (r)`, `v (cols, r)`: the matrix a
/// truncated SVD stands for (tests compare the methods' inits against it).
pub fn svd_product(u: &[f64], s: &[f64], v: &[f64], rows: usize, cols: usize) -> Vec<f64> {
    let r = s.len();
    (0..rows)
        .flat_map(|i| {
            (0..cols).map(move |j| (0..r).map(|k| u[i * r + k] * s[k] * v[j * r + k]).sum())
        })
        .collect()
}

/// The rank-`r` truncation of `a (rows, cols)`.
pub fn truncation(a: &[f64], rows: usize, cols: usize, r: usize) -> Result<Vec<f64>> {
    let (u, s, v) = truncated_svd(a, rows, cols, r)?;
    Ok(svd_product(&u, &s, &v, rows, cols))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{random_vec, rel_err};

    #[test]
    fn full_rank_svd_reconstructs_and_truncation_is_best_rank_r() {
        let (rows, cols) = (7, 5);
        let a = random_vec(rows * cols, 1.0, 1);
        let (_, s, _) = truncated_svd(&a, rows, cols, 5).unwrap();
        assert!(s.windows(2).all(|w| w[0] >= w[1]));
        let rebuild = |r: usize| truncation(&a, rows, cols, r).unwrap();
        assert!(rel_err(&rebuild(5), &a) < 1e-12);
        // Eckart–Young: the rank-2 truncation leaves exactly the tail singular values.
        let err2: f64 = rebuild(2)
            .iter()
            .zip(&a)
            .map(|(x, y)| (x - y).powi(2))
            .sum();
        let tail: f64 = s[2..].iter().map(|x| x * x).sum();
        assert!((err2 - tail).abs() < 1e-10);
        let (u2, s2, v2) = truncated_svd(&a, rows, cols, 2).unwrap();
        assert_eq!((u2.len(), s2.len(), v2.len()), (rows * 2, 2, cols * 2));
    }
}
