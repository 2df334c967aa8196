//! Criterion bench of one CPU reference forward + backward (input gradient only): T5 at the
//! t5-small shape with random weights, batch 8 × 128 encoder tokens, 16 decoder tokens, and the
//! t5-tiny shape of the embedded default; Llama at the llama-tiny shape, batch 4 × (48 input +
//! 8 label tokens). Run: `cargo bench --bench cpu_step`.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};

use fastpt::backend::cpu::CpuBackend;
use fastpt::data::HostBatch;
use fastpt::engine::{llama_forward_backward, t5_forward_backward};
use fastpt::model::linear::Quant;
use fastpt::model::{random_llama, random_t5};

fn bench_shape(
    c: &mut Criterion,
    shape: &str,
    batch: usize,
    enc: usize,
    dec: usize,
    samples: usize,
) {
    let be = CpuBackend::<f32>::new();
    let model = random_t5(&be, shape, 0, Quant::None).expect("built-in shape");
    let batch = HostBatch::random(&model.cfg, &vec![enc; batch], &vec![dec; batch], 0);
    let mut group = c.benchmark_group("cpu_t5_forward_backward");
    group.sample_size(samples);
    group.throughput(Throughput::Elements((batch.batch * (enc + dec)) as u64));
    group.bench_function(format!("{shape}/b{}xT{enc}xTd{dec}", batch.batch), |b| {
        b.iter(|| t5_forward_backward(&be, &model, None, &batch).expect("step"))
    });
    group.finish();
}

/// A decoder-only step: `batch` rows of `input` tokens followed by `target` label tokens.
fn bench_llama(c: &mut Criterion, shape: &str, batch: usize, input: usize, target: usize) {
    let be = CpuBackend::<f32>::new();
    let model = random_llama(&be, shape, 0, Quant::None).expect("built-in shape");
    let batch = HostBatch::random_causal(&model.cfg, &vec![input; batch], &vec![target; batch], 0);
    let mut group = c.benchmark_group("cpu_llama_forward_backward");
    group.sample_size(30);
    group.throughput(Throughput::Elements((batch.batch * batch.enc_len) as u64));
    let name = format!("{shape}/b{}xT{}", batch.batch, batch.enc_len);
    group.bench_function(name, |b| {
        b.iter(|| llama_forward_backward(&be, &model, None, &batch).expect("step"))
    });
    group.finish();
}

fn benches(c: &mut Criterion) {
    bench_shape(c, "t5-tiny", 4, 32, 8, 50);
    bench_shape(c, "t5-small", 8, 128, 16, 10);
    bench_llama(c, "llama-tiny", 4, 48, 8);
}

criterion_group!(cpu_step, benches);
criterion_main!(cpu_step);
