//! The virtual GPU's shim itself: barriers and static shared memory, warp shuffles and block
//! reductions, ballots and dynamic shared memory, deadlock detection (kernels/selftest.cu).

use super::super::device::{Arg, Device, LaunchCfg};
use super::super::vgpu::{kernel_names, VirtualDevice};
use crate::testing::random_vec;

fn upload_f32(dev: &VirtualDevice, x: &[f32]) -> <VirtualDevice as Device>::Buffer {
    let mut b = dev.alloc(x.len() * 4).unwrap();
    dev.upload(&mut b, bytemuck::cast_slice(x)).unwrap();
    b
}

fn download<T: bytemuck::Pod>(
    dev: &VirtualDevice,
    b: &<VirtualDevice as Device>::Buffer,
    n: usize,
) -> Vec<T> {
    let mut bytes = vec![0u8; n * std::mem::size_of::<T>()];
    dev.download(b, &mut bytes).unwrap();
    bytemuck::pod_collect_to_vec(&bytes)
}

fn rand_f32(n: usize, seed: u64) -> Vec<f32> {
    random_vec(n, 1.0, seed)
        .into_iter()
        .map(|x| x as f32)
        .collect()
}

#[test]
fn selftest_reverse_needs_barrier_and_block_shared_memory() {
    let dev = VirtualDevice::new();
    let n = 600; // three blocks, the last one partial
    let x = rand_f32(n, 1);
    let inp = upload_f32(&dev, &x);
    let out = upload_f32(&dev, &vec![f32::NAN; n]);
    let args = [
        Arg::Ptr(dev.ptr(&out)),
        Arg::Ptr(dev.ptr(&inp)),
        Arg::I32(n as i32),
    ];
    dev.launch("selftest_reverse_f32", LaunchCfg::linear(3, 256), &args)
        .unwrap();
    let got: Vec<f32> = download(&dev, &out, n);
    let mut want: Vec<f32> = Vec::new();
    for chunk in x.chunks(256) {
        want.extend(chunk.iter().rev());
    }
    assert_eq!(got, want);
}

#[test]
fn selftest_reduce_block_and_warp_reductions() {
    let dev = VirtualDevice::new();
    let (n, block, blocks) = (300usize, 128u32, 3usize); // last block partly past n
    let x = rand_f32(n, 2);
    let inp = upload_f32(&dev, &x);
    let out = upload_f32(&dev, &vec![f32::NAN; 3 * blocks]);
    let args = [
        Arg::Ptr(dev.ptr(&out)),
        Arg::Ptr(dev.ptr(&inp)),
        Arg::I32(n as i32),
    ];
    dev.launch(
        "selftest_reduce_f32",
        LaunchCfg::linear(blocks as u32, block),
        &args,
    )
    .unwrap();
    let got: Vec<f32> = download(&dev, &out, 3 * blocks);
    for bi in 0..blocks {
        let part = &x[(bi * 128).min(n)..((bi + 1) * 128).min(n)];
        let sum: f32 = part.iter().sum();
        let max = part.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
        let warp0: f32 = part.iter().take(32).sum();
        assert!(
            (got[3 * bi] - sum).abs() < 1e-4,
            "block {bi}: sum {} vs {sum}",
            got[3 * bi]
        );
        assert_eq!(got[3 * bi + 1], max, "block {bi}: max");
        assert!(
            (got[3 * bi + 2] - warp0).abs() < 1e-4,
            "block {bi}: shfl_down sum"
        );
    }
}

#[test]
fn selftest_ballot_counts_lanes_through_dynamic_shared_memory() {
    let dev = VirtualDevice::new();
    let n = 100; // 4 warps in one block of 128, the last one partly past n
    let x = rand_f32(n, 3);
    let inp = upload_f32(&dev, &x);
    let out = dev.alloc(n * 4).unwrap();
    let args = [
        Arg::Ptr(dev.ptr(&out)),
        Arg::Ptr(dev.ptr(&inp)),
        Arg::I32(n as i32),
    ];
    let cfg = LaunchCfg {
        smem: super::super::dynamic_smem_bytes("selftest_ballot", 0) as u32,
        ..LaunchCfg::linear(1, 128)
    };
    dev.launch("selftest_ballot_f32", cfg, &args).unwrap();
    let got: Vec<i32> = download(&dev, &out, n);
    for (i, &g) in got.iter().enumerate() {
        let w = i / 32;
        let want = x[w * 32..((w + 1) * 32).min(n)]
            .iter()
            .filter(|&&v| v > 0.0)
            .count();
        assert_eq!(g as usize, want, "thread {i}");
    }
}

#[test]
fn selftest_deadlock_is_reported_not_hung() {
    let dev = VirtualDevice::new();
    let out = dev.alloc(4).unwrap();
    let args = [Arg::Ptr(dev.ptr(&out)), Arg::I32(1)];
    let err = dev
        .launch("selftest_deadlock_f32", LaunchCfg::linear(1, 64), &args)
        .unwrap_err()
        .to_string();
    assert!(err.contains("deadlock"), "{err}");
    // The device is usable afterwards.
    selftest_reverse_needs_barrier_and_block_shared_memory();
}

#[test]
fn unknown_kernel_and_bad_launch_are_errors() {
    let dev = VirtualDevice::new();
    let err = dev
        .launch("no_such_kernel_f32", LaunchCfg::linear(1, 32), &[])
        .unwrap_err();
    assert!(err.to_string().contains("no such kernel"), "{err}");
    let out = dev.alloc(4).unwrap();
    let args = [
        Arg::Ptr(dev.ptr(&out)),
        Arg::Ptr(dev.ptr(&out)),
        Arg::I32(1),
    ];
    let err = dev
        .launch("selftest_reverse_f32", LaunchCfg::linear(1, 2048), &args)
        .unwrap_err();
    assert!(err.to_string().contains("1024"), "{err}");
}

#[test]
fn launches_are_checked_against_the_kernels_declaration() {
    let dev = VirtualDevice::new();
    let out = dev.alloc(4 * 256).unwrap();
    let inp = dev.alloc(4 * 256).unwrap();
    let good = [
        Arg::Ptr(dev.ptr(&out)),
        Arg::Ptr(dev.ptr(&inp)),
        Arg::I32(256),
    ];
    let err = |name: &str, cfg: LaunchCfg, args: &[Arg]| {
        dev.launch(name, cfg, args).unwrap_err().to_string()
    };
    // Argument kinds: swapped, missing, a float for an int.
    let swapped = [good[0], good[2], good[1]];
    let e = err("selftest_reverse_f32", LaunchCfg::linear(1, 256), &swapped);
    assert!(e.contains("(pip)") && e.contains("(ppi)"), "{e}");
    let e = err(
        "selftest_reverse_f32",
        LaunchCfg::linear(1, 256),
        &good[..2],
    );
    assert!(e.contains("(pp)"), "{e}");
    let float = [good[0], good[1], Arg::F32(256.0)];
    let e = err("selftest_reverse_f32", LaunchCfg::linear(1, 256), &float);
    assert!(e.contains("(ppf)"), "{e}");
    // Block size other than the kernel's __launch_bounds__ (256).
    let e = err("selftest_reverse_f32", LaunchCfg::linear(1, 128), &good);
    assert!(e.contains("__launch_bounds__ is 256"), "{e}");
    // Shared memory: dynamic over the limit, and static (1 KiB) + dynamic over it.
    let big = LaunchCfg {
        smem: 100 << 10,
        ..LaunchCfg::linear(1, 256)
    };
    let e = err("selftest_reverse_f32", big, &good);
    assert!(
        e.contains("dynamic shared memory") && e.contains("99 KiB"),
        "{e}"
    );
    let sum = LaunchCfg {
        smem: (99 << 10) - 512,
        ..LaunchCfg::linear(1, 256)
    };
    let e = err("selftest_reverse_f32", sum, &good);
    assert!(e.contains("1024 static") && e.contains("99 KiB"), "{e}");
    // The same launch within the limits runs.
    dev.launch("selftest_reverse_f32", LaunchCfg::linear(1, 256), &good)
        .unwrap();
}

#[test]
fn selftest_static_poison_every_block_finds_nan() {
    let dev = VirtualDevice::new();
    let blocks = 4;
    let out = upload_f32(&dev, &vec![0.0; blocks]);
    let args = [Arg::Ptr(dev.ptr(&out)), Arg::I32(blocks as i32)];
    // Twice: the second launch must not see the first one's writes either.
    for _ in 0..2 {
        dev.launch(
            "selftest_static_poison_f32",
            LaunchCfg::linear(blocks as u32, 32),
            &args,
        )
        .unwrap();
        let got: Vec<f32> = download(&dev, &out, blocks);
        assert!(got.iter().all(|v| v.is_nan()), "{got:?}");
    }
}

/// Kernels that exist for bf16 only: tensor-core code multiplies bf16 operands.
const BF16_ONLY: &[&str] = &[
    "attention_forward_tc_d64_bf16",
    "attention_forward_tc_d128_bf16",
    "attention_stats_tc_d64_bf16",
    "attention_stats_tc_d128_bf16",
    "attention_backward_dkv_tc_d64_bf16",
    "attention_backward_dkv_tc_d128_bf16",
    "attention_backward_dq_tc_d64_bf16",
    "attention_backward_dq_tc_d128_bf16",
];

#[test]
fn every_kernel_has_both_dtypes() {
    let names = kernel_names();
    for name in BF16_ONLY {
        assert!(names.iter().any(|n| n == name), "{name} is missing");
    }
    assert!(
        names.iter().any(|n| n == "rmsnorm_forward_bf16"),
        "{names:?}"
    );
    for name in &names {
        if BF16_ONLY.contains(&name.as_str()) {
            continue;
        }
        let (base, dtype) = name.rsplit_once('_').expect("op_dtype");
        let other = if dtype == "f32" { "bf16" } else { "f32" };
        assert!(matches!(dtype, "f32" | "bf16"), "{name}: dtype suffix");
        assert!(
            names.contains(&format!("{base}_{other}")),
            "{name} has no {other} twin"
        );
    }
}

#[test]
fn selftest_mma_matches_a_plain_product() {
    let r = super::super::check::check_mma(&VirtualDevice::new(), 5);
    assert!(r.passed(), "{r:?}");
}
