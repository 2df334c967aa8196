//! Normalisation, row softmax and attention on the virtual GPU against the CPU reference.

use super::*;

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
            cpu.rmsnorm_forward(&mut out_r, &mut rstd_r, &x, &w, n, c, 1e-6);
            let (mut out, mut rstd) = (poisoned(&be, n * c), poisoned(&be, n));
            let (xg, wg) = (be.upload_f32(x.clone()), be.upload_f32(w.clone()));
            be.rmsnorm_forward(&mut out, &mut rstd, &xg, &wg, n, c, 1e-6);
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
            cpu.rmsnorm_forward(&mut y, &mut rstd, &x, &w, n, c, 1e-6);
            let rstd: Vec<f32> = rstd.iter().map(|&r| round_to(r, dt)).collect();
            let mut dx_r = acc.clone();
            cpu.rmsnorm_backward_dinp(&mut dx_r, &dy, &x, &w, &rstd, n, c);
            let mut dx = be.upload_f32(acc);
            let (xg, wg, dyg, rg) = (
                be.upload_f32(x),
                be.upload_f32(w),
                be.upload_f32(dy),
                be.upload_f32(rstd),
            );
            be.rmsnorm_backward_dinp(&mut dx, &dyg, &xg, &wg, &rg, n, c);
            assert_close("rmsnorm_backward_dinp", &be, &dx, &dx_r, tol);
        }
    }
}
