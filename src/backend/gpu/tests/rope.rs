//! RoPE on the virtual GPU against the CPU reference: forward and input gradient on odd sizes
//! with unordered, repeated positions that reach the last table row; forward then backward gives
//! the input back (the rotation is orthogonal); a position outside the tables gives NaN rows.

use super::*;
use crate::backend::RopeDims;

/// cos and sin tables `(rows, D/2)` of made-up frequencies, rounded to the dtype.
fn tables(rows: usize, half: usize, dt: DType) -> (Vec<f32>, Vec<f32>) {
    let angle = |p: usize, i: usize| p as f64 * 0.9f64.powi(i as i32 * 3) + 0.1 * i as f64;
    let cos = (0..rows * half)
        .map(|k| round_to(angle(k / half, k % half).cos() as f32, dt))
        .collect();
    let sin = (0..rows * half)
        .map(|k| round_to(angle(k / half, k % half).sin() as f32, dt))
        .collect();
    (cos, sin)
}

/// (N, H, D, table rows, positions)
fn cases() -> Vec<(usize, usize, usize, usize, Vec<i32>)> {
    vec![
        (7, 3, 10, 9, vec![8, 0, 3, 3, 7, 1, 8]),
        (2, 1, 2, 1, vec![0, 0]),
        (5, 4, 64, 40, vec![39, 2, 17, 17, 0]),
    ]
}

#[test]
fn rope_forward_matches_cpu() {
    for (be, tol) in backends() {
        let dt = be.dtype();
        for (ci, (n, h, d, rows, positions)) in cases().into_iter().enumerate() {
            let (cos, sin) = tables(rows, d / 2, dt);
            let x = inputs(n * h * d, 1.0, 10 + ci as u64, dt);
            let mut want = vec![0.0; n * h * d];
            cpu().rope_forward(&mut want, &x, &positions, &cos, &sin, RopeDims { n, h, d });
            let mut got = poisoned(&be, n * h * d);
            let (cos_g, sin_g) = (be.upload_f32(cos), be.upload_f32(sin));
            let pos = be.upload_index(&positions);
            be.rope_forward(
                &mut got,
                &be.upload_f32(x),
                &pos,
                &cos_g,
                &sin_g,
                RopeDims { n, h, d },
            );
            assert_close(&format!("rope_forward {n}x{h}x{d}"), &be, &got, &want, tol);
        }
    }
}

#[test]
fn rope_backward_dinp_matches_cpu() {
    for (be, tol) in backends() {
        let dt = be.dtype();
        for (ci, (n, h, d, rows, positions)) in cases().into_iter().enumerate() {
            let (cos, sin) = tables(rows, d / 2, dt);
            let dout = inputs(n * h * d, 1.0, 20 + ci as u64, dt);
            let mut want = vec![0.0; n * h * d];
            cpu().rope_backward_dinp(
                &mut want,
                &dout,
                &positions,
                &cos,
                &sin,
                RopeDims { n, h, d },
            );
            let mut got = poisoned(&be, n * h * d);
            let (cos_g, sin_g) = (be.upload_f32(cos), be.upload_f32(sin));
            let pos = be.upload_index(&positions);
            be.rope_backward_dinp(
                &mut got,
                &be.upload_f32(dout),
                &pos,
                &cos_g,
                &sin_g,
                RopeDims { n, h, d },
            );
            assert_close(
                &format!("rope_backward_dinp {n}x{h}x{d}"),
                &be,
                &got,
                &want,
                tol,
            );
        }
    }
}

#[test]
fn rope_backward_undoes_the_forward() {
    // Exact tables (cos² + sin² = 1 in f32), so backward ∘ forward is the identity up to rounding.
    let be = GpuBackend::new(VirtualDevice::new(), DType::F32);
    let (n, h, d, rows) = (6, 2, 8, 5);
    let (cos, sin) = tables(rows, d / 2, DType::F32);
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
    let (cos, sin) = tables(rows, d / 2, DType::F32);
    let mut out = be.zeros(n * h * d);
    let x = be.upload_f32(inputs(n * h * d, 1.0, 31, DType::F32));
    let pos = be.upload_index(&[0, 2, -1]);
    let (cos, sin) = (be.upload_f32(cos), be.upload_f32(sin));
    be.rope_forward(&mut out, &x, &pos, &cos, &sin, RopeDims { n, h, d });
    let out = be.download_f32(&out);
    assert!(out[..h * d].iter().all(|v| v.is_finite()));
    assert!(out[h * d..].iter().all(|v| v.is_nan()));
}
