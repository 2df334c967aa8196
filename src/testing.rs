//! Helpers shared by the unit tests, the integration tests and the benches: seeded random data,
//! relative errors, a finite-difference gradient check in f64, and the golden fixtures.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// `n` values uniform in (-scale, scale), reproducible from `seed`.
pub fn random_vec(n: usize, scale: f64, seed: u64) -> Vec<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

/// `‖out − reference‖ / ‖reference‖` (plain `‖out‖` when the reference is zero).
pub fn rel_err(out: &[f64], reference: &[f64]) -> f64 {
    assert_eq!(out.len(), reference.len(), "rel_err: lengths differ");
    let diff: f64 = out
        .iter()
        .zip(reference)
        .map(|(a, b)| (a - b) * (a - b))
        .sum();
    let norm: f64 = reference.iter().map(|b| b * b).sum();
    if norm == 0.0 {
        diff.sqrt()
    } else {
        (diff / norm).sqrt()
    }
}

/// Same as [`rel_err`] for f32 data.
pub fn rel_err_f32(out: &[f32], reference: &[f32]) -> f64 {
    let a: Vec<f64> = out.iter().map(|&x| x as f64).collect();
    let b: Vec<f64> = reference.iter().map(|&x| x as f64).collect();
    rel_err(&a, &b)
}

/// Central finite differences of the scalar `f` at `x`, for the coordinates in `coords`
/// (all of them when `None`): returns the numerical gradient at those coordinates.
pub fn finite_diff(
    f: &mut dyn FnMut(&[f64]) -> f64,
    x: &[f64],
    coords: Option<&[usize]>,
    eps: f64,
) -> Vec<f64> {
    let all: Vec<usize> = (0..x.len()).collect();
    let coords = coords.unwrap_or(&all);
    let mut x = x.to_vec();
    coords
        .iter()
        .map(|&i| {
            let orig = x[i];
            x[i] = orig + eps;
            let plus = f(&x);
            x[i] = orig - eps;
            let minus = f(&x);
            x[i] = orig;
            (plus - minus) / (2.0 * eps)
        })
        .collect()
}

/// `Σ a ⊙ b`: the scalar whose gradient with respect to `a` is `b`, used to turn an op with a
/// tensor output into a scalar for finite differences.
pub fn dot(a: &[f64], b: &[f64]) -> f64 {
    assert_eq!(a.len(), b.len(), "dot: lengths differ");
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// The folder of a committed test fixture (`tests/fixtures/NAME`).
pub fn fixture(name: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name)
}

/// Golden tensors by name, (shape, values): what `model::hf::read_all_f64` returns.
pub type Goldens = std::collections::BTreeMap<String, (Vec<usize>, Vec<f64>)>;

/// Golden tensor `name` (shape, values), panicking with its name when missing.
pub fn golden(g: &Goldens, name: &str) -> (Vec<usize>, Vec<f64>) {
    g.get(name)
        .unwrap_or_else(|| panic!("golden tensor {name} missing"))
        .clone()
}

/// Golden id tensor `name` as i32.
pub fn golden_ids(g: &Goldens, name: &str) -> Vec<i32> {
    golden(g, name).1.iter().map(|&x| x as i32).collect()
}
