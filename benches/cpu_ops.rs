//! Criterion benches of single CPU reference ops at t5-base-like sizes (batch 2 × 128 tokens,
//! width 768, 12 heads of 64): the GEMM of a linear layer (reported in FLOP), attention forward
//! and input-gradient backward with the T5 bias, RMSNorm, the label-row cross-entropy and the
//! prompt embedding (reported in bytes). The reference is the oracle, not the fast path; these
//! numbers show where its time goes. Run: `cargo bench --bench cpu_ops`.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};

use fastpt::backend::cpu::CpuBackend;
use fastpt::backend::{
    AttnDims, AttnMask, Backend, CrossEntropyDims, EmbedPromptDims, LinearDims, RelBias,
    RmsNormDims,
};
use fastpt::testing::random_vec;

fn rand(n: usize, seed: u64) -> Vec<f32> {
    random_vec(n, 1.0, seed)
        .into_iter()
        .map(|x| x as f32)
        .collect()
}

fn benches(c: &mut Criterion) {
    let be = CpuBackend::<f32>::new();
    let (b, t, ch, h, d, f) = (2, 128, 768, 12, 64, 3072);
    let n = b * t;
    let mut group = c.benchmark_group("cpu_ops");
    group.sample_size(10);

    // A feed-forward projection: (N, C) · (F, C)ᵀ.
    let (x, w) = (rand(n * ch, 1), rand(f * ch, 2));
    let mut y = vec![0f32; n * f];
    group.throughput(Throughput::Elements((2 * n * ch * f) as u64));
    group.bench_function(format!("linear_forward/{n}x{ch}->{f} (FLOP)"), |bch| {
        bch.iter(|| be.linear_forward(&mut y, &x, &w, LinearDims::new(n, ch, f)))
    });

    // Self-attention with the bidirectional T5 bias and padding.
    let dims = AttnDims {
        b,
        t,
        s: t,
        h,
        h_kv: h,
        d,
    };
    let (q, k, v, dout) = (
        rand(n * h * d, 3),
        rand(n * h * d, 4),
        rand(n * h * d, 5),
        rand(n * h * d, 6),
    );
    let table = rand(32 * h, 7);
    let key_mask: Vec<i32> = (0..n).map(|i| i32::from(i % t < t - 9)).collect();
    let mask = AttnMask {
        key_mask: &key_mask,
        causal: false,
    };
    let bias = Some(RelBias {
        table: &table,
        bidirectional: true,
        num_buckets: 32,
        max_distance: 128,
        q_offset: 0,
    });
    let (mut out, mut lse) = (vec![0f32; n * h * d], vec![0f32; b * h * t]);
    group.throughput(Throughput::Elements((4 * b * h * t * t * d) as u64));
    group.bench_function(
        format!("attention_forward/b{b}xT{t}xH{h}xD{d} (FLOP)"),
        |bch| {
            bch.iter(|| be.attention_forward(&mut out, &mut lse, &q, &k, &v, mask, bias, 1.0, dims))
        },
    );
    let (mut dq, mut dk, mut dv) = (
        vec![0f32; q.len()],
        vec![0f32; k.len()],
        vec![0f32; v.len()],
    );
    group.throughput(Throughput::Elements((8 * b * h * t * t * d) as u64));
    group.bench_function(
        format!("attention_backward_dinp/b{b}xT{t}xH{h}xD{d} (FLOP)"),
        |bch| {
            bch.iter(|| {
                be.attention_backward_dinp(
                    &mut dq, &mut dk, &mut dv, &dout, &q, &k, &v, &out, &lse, mask, bias, 1.0, dims,
                )
            })
        },
    );

    // RMSNorm over the residual stream.
    let weight = rand(ch, 8);
    let (mut normed, mut rstd) = (vec![0f32; n * ch], vec![0f32; n]);
    group.throughput(Throughput::Bytes((2 * 4 * n * ch) as u64));
    group.bench_function(format!("rmsnorm_forward/{n}x{ch} (bytes)"), |bch| {
        bch.iter(|| {
            be.rmsnorm_forward(
                &mut normed,
                &mut rstd,
                &x,
                &weight,
                1e-6,
                RmsNormDims { n, c: ch },
            )
        })
    });

    // Cross-entropy of 32 label rows over a 32128-token vocabulary.
    let (m, vocab) = (32, 32128);
    let logits = rand(m * vocab, 9);
    let targets: Vec<i32> = (0..m as i32).map(|i| i * 997 % vocab as i32).collect();
    let (mut losses, mut dlogits) = (vec![0f32; m], vec![0f32; m * vocab]);
    group.throughput(Throughput::Bytes((2 * 4 * m * vocab) as u64));
    group.bench_function(
        format!("cross_entropy_forward_backward/{m}x{vocab} (bytes)"),
        |bch| {
            bch.iter(|| {
                be.cross_entropy_forward_backward(
                    &mut losses,
                    &mut dlogits,
                    &logits,
                    &targets,
                    1.0,
                    CrossEntropyDims { m, v: vocab },
                )
            })
        },
    );

    // The prompt-tuned encoder input: 100 prompt rows in front of each row, with an update.
    let (p, rows) = (100, 1000);
    let (emb, prompt, update) = (rand(rows * ch, 10), rand(p * ch, 11), rand(t * ch, 12));
    let ids: Vec<i32> = (0..n as i32).map(|i| i * 7 % rows as i32).collect();
    let mut inputs = vec![0f32; b * (p + t) * ch];
    group.throughput(Throughput::Bytes((4 * (b * (p + t) + n + t) * ch) as u64));
    group.bench_function(
        format!("embed_prompt_forward/b{b}xP{p}xT{t}xC{ch} (bytes)"),
        |bch| {
            bch.iter(|| {
                be.embed_prompt_forward(
                    &mut inputs,
                    &emb,
                    &ids,
                    &prompt,
                    Some(&update),
                    EmbedPromptDims { b, t, p, c: ch },
                )
            })
        },
    );
    group.finish();
}

criterion_group!(cpu_ops, benches);
criterion_main!(cpu_ops);
