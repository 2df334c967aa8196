//! Criterion micro-benches of the GPU backend's ops: attention forward (flash vs GEMM path) and
//! backward, RMSNorm forward, embed_prompt_forward, NF4 dequantisation, the prompt-method ops and
//! the fused cross-entropy. Run: `cargo bench --bench gpu_ops` (`-- --test` runs each once).
//!
//! On a machine where a CUDA device opens, the groups are `cuda/<op>` at real shapes (T5-large,
//! Llama-7B/8B-like); elsewhere they are `vgpu/<op>` at tiny shapes on the virtual GPU, whose
//! timings mean nothing (the kernels run as C++ on the CPU): that run only shows the benches work.
//! `FASTPT_BENCH_DEVICE=vgpu` forces the virtual GPU, `FASTPT_BENCH_DTYPE=f32` the f32 kernels
//! (default bf16).
//!
//! Every timed call ends with `device.synchronize()`, so the asynchronous work is counted (and
//! the launch latency with it: compare with `examples/kernel_lab.rs`, which amortises it over
//! rounds of calls). Throughput is the least number of bytes each op must move (inputs read
//! once, outputs written once; the kernel lab's formulas), in decimal units: criterion reports
//! GB/s, as the lab.
//! Correctness is `fastpt doctor`'s and the kernel lab's job, not this file's.

use std::time::Duration;

use criterion::measurement::WallTime;
use criterion::{
    criterion_group, criterion_main, BenchmarkGroup, BenchmarkId, Criterion, SamplingMode,
    Throughput,
};

use fastpt::backend::gpu::cuda::CudaDevice;
use fastpt::backend::gpu::device::{DType, Device};
use fastpt::backend::gpu::vgpu::VirtualDevice;
use fastpt::backend::gpu::{AttentionKernel, GpuBackend, GpuTensor};
use fastpt::backend::nf4::quantize_nf4;
use fastpt::backend::{
    AttnDims, AttnMask, Backend, CrossEntropyDims, EmbedPromptDims, FusionAttentionDims,
    FusionMode, GatedExpertsDims, LampPoolDims, RelBias, RmsNormDims,
};
use fastpt::testing::random_vec;

/// One attention problem: dims, causal, T5 relative bias, padded keys.
struct AttnCase {
    name: &'static str,
    dims: AttnDims,
    causal: bool,
    bias: bool,
    pad: bool,
}

const fn attn(
    name: &'static str,
    [b, t, s, h, h_kv, d]: [usize; 6],
    causal: bool,
    bias: bool,
    pad: bool,
) -> AttnCase {
    AttnCase {
        name,
        dims: AttnDims {
            b,
            t,
            s,
            h,
            h_kv,
            d,
        },
        causal,
        bias,
        pad,
    }
}

/// The shapes of one run (see the kernel lab's defaults, which these follow).
struct Sizes {
    attention: &'static [AttnCase],
    /// (name, N rows, C).
    rmsnorm: &'static [(&'static str, usize, usize)],
    /// (name, B, T, P, C, V), with the (T, C) update.
    embed: &'static [(&'static str, usize, usize, usize, usize, usize)],
    /// (name, rows, cols).
    nf4: &'static [(&'static str, usize, usize)],
    /// EPT-MS fusion (S, M, C), gated experts (N, C, E), LAMP (L, R, C, p).
    fusion: (usize, usize, usize),
    experts: (usize, usize, usize),
    lamp: (usize, usize, usize, usize),
    /// Cross-entropy label rows (name, M, V).
    loss: &'static [(&'static str, usize, usize)],
}

const REAL: Sizes = Sizes {
    attention: &[
        attn("t5-large", [8, 512, 512, 16, 16, 64], false, true, true),
        attn("llama", [4, 1024, 1024, 32, 8, 128], true, false, false),
    ],
    rmsnorm: &[("t5-large", 4096, 1024), ("llama", 4096, 4096)],
    embed: &[
        ("t5-large", 8, 412, 100, 1024, 32128),
        ("llama", 4, 924, 100, 4096, 32000),
    ],
    nf4: &[("llama-attn", 4096, 4096), ("llama-ffn", 11008, 4096)],
    fusion: (60, 256, 1024),
    experts: (60, 1024, 4),
    lamp: (100, 8, 1024, 1),
    loss: &[("t5-large", 1024, 32128), ("llama3", 512, 128256)],
};

const TINY: Sizes = Sizes {
    attention: &[
        attn("t5-tiny", [2, 16, 16, 2, 2, 32], false, true, true),
        attn("llama-tiny", [1, 16, 16, 4, 2, 64], true, false, false),
    ],
    rmsnorm: &[("tiny", 16, 257)],
    embed: &[("tiny", 2, 12, 4, 65, 300)],
    nf4: &[("tiny", 37, 129)],
    fusion: (7, 24, 65),
    experts: (7, 65, 4),
    lamp: (12, 5, 65, 3),
    loss: &[("tiny", 5, 1001)],
};

fn rand(n: usize, scale: f64, seed: u64) -> Vec<f32> {
    random_vec(n, scale, seed)
        .into_iter()
        .map(|x| x as f32)
        .collect()
}

struct Bench<'a, D: Device> {
    gpu: &'a GpuBackend<D>,
    /// "cuda" or "vgpu": the prefix of every group name.
    tag: &'static str,
    el: u64,
}

impl<D: Device> Bench<'_, D> {
    fn up(&self, x: Vec<f32>) -> GpuTensor<D> {
        self.gpu.upload_f32(x)
    }

    fn sync(&self) {
        self.gpu.device().synchronize().expect("synchronize");
    }

    fn group<'c>(&self, c: &'c mut Criterion, op: &str) -> BenchmarkGroup<'c, WallTime> {
        let mut g = c.benchmark_group(format!("{}/{op}", self.tag));
        if self.tag == "vgpu" {
            // Seconds per call on the virtual GPU: the fewest samples criterion takes.
            g.sampling_mode(SamplingMode::Flat)
                .sample_size(10)
                .warm_up_time(Duration::from_millis(100))
                .measurement_time(Duration::from_secs(1));
        }
        g
    }

    fn attention(&self, c: &mut Criterion, cases: &[AttnCase]) {
        for backward in [false, true] {
            let op = if backward {
                "attention_backward_dinp"
            } else {
                "attention_forward"
            };
            let mut g = self.group(c, op);
            for case in cases {
                let AttnDims {
                    b,
                    t,
                    s,
                    h,
                    h_kv,
                    d,
                } = case.dims;
                let (nq, nk) = (b * t * h * d, b * s * h_kv * d);
                let (q, k, v) = (
                    self.up(rand(nq, 1.0, 1)),
                    self.up(rand(nk, 1.0, 2)),
                    self.up(rand(nk, 1.0, 3)),
                );
                let dout = self.up(rand(nq, 1.0, 4));
                let table = self.up(rand(32 * h, 1.0, 5));
                let mask: Vec<i32> = (0..b * s)
                    .map(|i| i32::from(!(case.pad && i / s == b - 1 && i % s >= s - s / 8)))
                    .collect();
                let mask = self.gpu.upload_index(&mask);
                let amask = AttnMask {
                    key_mask: &mask,
                    causal: case.causal,
                };
                let bias = case.bias.then_some(RelBias {
                    table: &table,
                    bidirectional: !case.causal,
                    num_buckets: 32,
                    max_distance: 128,
                    q_offset: 0,
                });
                let scale = 1.0 / (d as f64).sqrt();
                let (mut out, mut lse) = (self.gpu.zeros(nq), self.gpu.zeros(b * h * t));
                self.gpu.attention_forward(
                    &mut out, &mut lse, &q, &k, &v, amask, bias, scale, case.dims,
                );
                // Bytes: q, k, v (+ dout, out, lse) read, out + lse (dq, dk, dv) written, the
                // i32 mask read (kernel lab: `attention`).
                let (nq, nk, nlse) = (nq as u64, nk as u64, (b * h * t) as u64);
                let bytes = if backward {
                    self.el * (4 * nq + 4 * nk + nlse)
                } else {
                    self.el * (2 * nq + 2 * nk + nlse)
                } + 4 * (b * s) as u64;
                g.throughput(Throughput::BytesDecimal(bytes));
                for (name, kernel) in [
                    ("flash", AttentionKernel::Flash),
                    ("gemm", AttentionKernel::Gemm),
                    ("flash_tc", AttentionKernel::FlashTc),
                ] {
                    let gpu = self.gpu.with_attention(kernel);
                    let id = BenchmarkId::new(name, case.name);
                    if backward {
                        let (mut dq, mut dk, mut dv) = (
                            gpu.zeros(nq as usize),
                            gpu.zeros(nk as usize),
                            gpu.zeros(nk as usize),
                        );
                        g.bench_function(id, |bch| {
                            bch.iter(|| {
                                gpu.attention_backward_dinp(
                                    &mut dq, &mut dk, &mut dv, &dout, &q, &k, &v, &out, &lse,
                                    amask, bias, scale, case.dims,
                                );
                                self.sync();
                            })
                        });
                    } else {
                        let (mut o, mut l) = (gpu.zeros(nq as usize), gpu.zeros(nlse as usize));
                        g.bench_function(id, |bch| {
                            bch.iter(|| {
                                gpu.attention_forward(
                                    &mut o, &mut l, &q, &k, &v, amask, bias, scale, case.dims,
                                );
                                self.sync();
                            })
                        });
                    }
                }
            }
            g.finish();
        }
    }

    fn rmsnorm(&self, c: &mut Criterion, shapes: &[(&str, usize, usize)]) {
        let mut g = self.group(c, "rmsnorm_forward");
        for &(name, n, ch) in shapes {
            let (x, w) = (self.up(rand(n * ch, 2.0, 1)), self.up(rand(ch, 1.5, 2)));
            let (mut y, mut r) = (self.gpu.zeros(n * ch), self.gpu.zeros(n));
            // Reads inp (N, C), weight (C); writes out (N, C), rstd (N).
            g.throughput(Throughput::BytesDecimal(
                self.el * (2 * n * ch + ch + n) as u64,
            ));
            g.bench_function(BenchmarkId::from_parameter(name), |b| {
                b.iter(|| {
                    self.gpu.rmsnorm_forward(
                        &mut y,
                        &mut r,
                        &x,
                        &w,
                        1e-6,
                        RmsNormDims { n, c: ch },
                    );
                    self.sync();
                })
            });
        }
        g.finish();
    }

    fn embed(&self, c: &mut Criterion, shapes: &[(&str, usize, usize, usize, usize, usize)]) {
        let mut g = self.group(c, "embed_prompt_forward");
        for &(name, b, t, p, ch, v) in shapes {
            let table = self.up(rand(v * ch, 1.0, 1));
            let prompt = self.up(rand(p * ch, 1.0, 2));
            let update = self.up(rand(t * ch, 0.5, 3));
            let ids: Vec<i32> = (0..b * t).map(|i| ((i * 7919 + 3) % v) as i32).collect();
            let ids = self.gpu.upload_index(&ids);
            let mut out = self.gpu.zeros(b * (p + t) * ch);
            // Writes out (B, P+T, C); reads B·T table rows, prompt (P, C), update (T, C), ids.
            let bytes = self.el * (b * (p + t) * ch + b * t * ch + p * ch + t * ch) as u64
                + 4 * (b * t) as u64;
            g.throughput(Throughput::BytesDecimal(bytes));
            g.bench_function(BenchmarkId::from_parameter(name), |bch| {
                bch.iter(|| {
                    self.gpu.embed_prompt_forward(
                        &mut out,
                        &table,
                        &ids,
                        &prompt,
                        Some(&update),
                        EmbedPromptDims { b, t, p, c: ch },
                    );
                    self.sync();
                })
            });
        }
        g.finish();
    }

    fn nf4(&self, c: &mut Criterion, shapes: &[(&str, usize, usize)]) {
        let mut g = self.group(c, "nf4_dequantize");
        for &(name, rows, cols) in shapes {
            let n = rows * cols;
            let q = self.gpu.upload_nf4(quantize_nf4(&rand(n, 0.05, 1)));
            let mut out = self.gpu.zeros(n);
            // Reads N/2 bytes of codes, NB = N/64 absmax codes, NB/256 f32 scales; writes N.
            let nb = n.div_ceil(64);
            let bytes = (n.div_ceil(2) + nb + 4 * nb.div_ceil(256)) as u64 + self.el * n as u64;
            g.throughput(Throughput::BytesDecimal(bytes));
            g.bench_function(BenchmarkId::from_parameter(name), |b| {
                b.iter(|| {
                    self.gpu.nf4_dequantize(&mut out, &q);
                    self.sync();
                })
            });
        }
        g.finish();
    }

    /// EPT-MS fusion (forward and backward), gated experts, LAMP pooling (forward, backward).
    fn method_ops(&self, c: &mut Criterion, sizes: &Sizes) {
        let el = self.el;
        let mut g = self.group(c, "method_ops");

        let (s, m, ch) = sizes.fusion;
        let (ps, lr, dout) = (
            self.up(rand(s * ch, 1.0, 1)),
            self.up(rand(m * ch, 1.0, 2)),
            self.up(rand(s * ch, 1.0, 3)),
        );
        let (mut out, mut probs) = (self.gpu.zeros(s * ch), self.gpu.zeros(s * m));
        let (mut dps, mut dlr) = (self.gpu.zeros(s * ch), self.gpu.zeros(m * ch));
        let shape = format!("s{s}-m{m}-c{ch}");
        // Reads ps (S, C), lr (M, C); writes out (S, C), probs (S, M).
        g.throughput(Throughput::BytesDecimal(
            el * (2 * s * ch + m * ch + s * m) as u64,
        ));
        g.bench_function(BenchmarkId::new("fusion_attention_forward", &shape), |b| {
            b.iter(|| {
                self.gpu.fusion_attention_forward(
                    &mut out,
                    &mut probs,
                    &ps,
                    &lr,
                    FusionMode::Attend,
                    FusionAttentionDims { s, m, c: ch },
                );
                self.sync();
            })
        });
        // Reads dout, ps (S, C), lr (M, C), probs (S, M); writes d_ps (S, C), d_lr (M, C).
        g.throughput(Throughput::BytesDecimal(
            el * (3 * s * ch + 2 * m * ch + s * m) as u64,
        ));
        g.bench_function(BenchmarkId::new("fusion_attention_backward", &shape), |b| {
            b.iter(|| {
                self.gpu.fusion_attention_backward(
                    &mut dps,
                    &mut dlr,
                    &dout,
                    &ps,
                    &lr,
                    &probs,
                    FusionMode::Attend,
                    FusionAttentionDims { s, m, c: ch },
                );
                self.sync();
            })
        });

        let (n, ch, e) = sizes.experts;
        let mut gate = self.gpu.zeros(n * e);
        self.gpu
            .softmax_rows_forward(&mut gate, &self.up(rand(n * e, 2.0, 4)), n, e);
        let experts: Vec<_> = (0..e)
            .map(|i| self.up(rand(n * ch, 1.0, 10 + i as u64)))
            .collect();
        let refs: Vec<_> = experts.iter().collect();
        let mut out = self.gpu.zeros(n * ch);
        // Reads gate (N, E), E experts (N, C); writes out (N, C).
        g.throughput(Throughput::BytesDecimal(
            el * (n * e + e * n * ch + n * ch) as u64,
        ));
        g.bench_function(
            BenchmarkId::new("gated_experts_forward", format!("n{n}-c{ch}-e{e}")),
            |b| {
                b.iter(|| {
                    self.gpu.gated_experts_forward(
                        &mut out,
                        &gate,
                        &refs,
                        GatedExpertsDims { n, c: ch },
                    );
                    self.sync();
                })
            },
        );

        let (l, r, ch, p) = sizes.lamp;
        let (u, q, v) = (
            self.up(rand(l * r, 1.0, 5)),
            self.up(rand(r, 1.5, 6)),
            self.up(rand(ch * r, 1.0, 7)),
        );
        let dy = self.up(rand(l / p * ch, 1.0, 8));
        let mut out = self.gpu.zeros(l / p * ch);
        let (mut du, mut dq, mut dv) = (
            self.gpu.zeros(l * r),
            self.gpu.zeros(r),
            self.gpu.zeros(ch * r),
        );
        let shape = format!("l{l}-r{r}-c{ch}-p{p}");
        // Reads u (L, R), q (R), v (C, R); writes out (L/p, C).
        g.throughput(Throughput::BytesDecimal(
            el * (l * r + r + ch * r + l / p * ch) as u64,
        ));
        g.bench_function(BenchmarkId::new("lamp_pool_forward", &shape), |b| {
            b.iter(|| {
                self.gpu
                    .lamp_pool_forward(&mut out, &u, &q, &v, LampPoolDims { l, r, c: ch, p });
                self.sync();
            })
        });
        // Reads dout (L/p, C), u, q, v and the gradients it adds to; writes du, dq, dv.
        g.throughput(Throughput::BytesDecimal(
            el * (l / p * ch + 3 * (l * r + r + ch * r)) as u64,
        ));
        g.bench_function(BenchmarkId::new("lamp_pool_backward", &shape), |b| {
            b.iter(|| {
                self.gpu.lamp_pool_backward(
                    &mut du,
                    &mut dq,
                    &mut dv,
                    &dy,
                    &u,
                    &q,
                    &v,
                    LampPoolDims { l, r, c: ch, p },
                );
                self.sync();
            })
        });
        g.finish();
    }

    fn loss(&self, c: &mut Criterion, shapes: &[(&str, usize, usize)]) {
        let mut g = self.group(c, "cross_entropy_forward_backward");
        for &(name, m, v) in shapes {
            let logits = self.up(rand(m * v, 4.0, 1));
            let targets: Vec<i32> = (0..m).map(|i| ((i * 389 + 5) % v) as i32).collect();
            let targets = self.gpu.upload_index(&targets);
            let (mut l, mut d) = (self.gpu.zeros(m), self.gpu.zeros(m * v));
            // Reads logits (M, V), targets; writes dlogits (M, V), losses (M).
            g.throughput(Throughput::BytesDecimal(
                self.el * (2 * m * v + m) as u64 + 4 * m as u64,
            ));
            g.bench_function(BenchmarkId::from_parameter(name), |b| {
                b.iter(|| {
                    self.gpu.cross_entropy_forward_backward(
                        &mut l,
                        &mut d,
                        &logits,
                        &targets,
                        1.0 / m as f64,
                        CrossEntropyDims { m, v },
                    );
                    self.sync();
                })
            });
        }
        g.finish();
    }

    fn all(&self, c: &mut Criterion, sizes: &Sizes) {
        self.attention(c, sizes.attention);
        self.rmsnorm(c, sizes.rmsnorm);
        self.embed(c, sizes.embed);
        self.nf4(c, sizes.nf4);
        self.method_ops(c, sizes);
        self.loss(c, sizes.loss);
    }
}

fn run_on<D: Device>(c: &mut Criterion, dev: D, tag: &'static str, sizes: &Sizes) {
    let dtype = match std::env::var("FASTPT_BENCH_DTYPE").as_deref() {
        Ok("f32") => DType::F32,
        _ => DType::Bf16,
    };
    eprintln!("gpu_ops: {} ({dtype})", dev.name());
    let gpu = GpuBackend::new(dev, dtype);
    let bench = Bench {
        gpu: &gpu,
        tag,
        el: dtype.size() as u64,
    };
    bench.all(c, sizes);
}

fn benches(c: &mut Criterion) {
    let force_vgpu = std::env::var("FASTPT_BENCH_DEVICE").as_deref() == Ok("vgpu");
    let cuda = if force_vgpu {
        Err("FASTPT_BENCH_DEVICE=vgpu".to_string())
    } else {
        CudaDevice::new(0).map_err(|e| e.to_string())
    };
    match cuda {
        Ok(dev) => run_on(c, dev, "cuda", &REAL),
        Err(e) => {
            eprintln!(
                "gpu_ops: no CUDA device ({e}): the virtual GPU at tiny shapes; its timings mean \
                 nothing"
            );
            run_on(c, VirtualDevice::new(), "vgpu", &TINY);
        }
    }
}

criterion_group!(gpu_ops, benches);
criterion_main!(gpu_ops);
