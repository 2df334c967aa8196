//! `mpirun -np N fastpt bench`: what data parallelism buys. For each shape and setting, in
//! interleaved rounds (order swapped every round), two steps on the same global batch:
//! - one rank's step on the whole batch (forward, backward, AdamW), the other ranks waiting;
//! - the N ranks' step on their shares (rows r, r + N, ...) with the gradient all-reduce the
//!   trainer makes (engine::all_reduce_grads) and AdamW; the time of the slowest rank.
//!
//! Speedup = one rank's time / N ranks' time, per round (median and interval over rounds);
//! scaling efficiency = speedup / N. The all-reduce's own time and bytes are reported next to
//! it (docs/data-parallel.md has the cost model).

use serde::Serialize;

use super::stats::Stats;
use super::{build_setting, BenchClock, BenchConfig};
use crate::backend::collective::Collective;
use crate::engine::{all_reduce_grads, train_step, train_step_share};
use crate::error::Result;
use crate::model::random_model;
use crate::prompt::{train_params, zero_grads, PromptMethod};
use crate::train::optim::Optimizer;

/// One shape × setting on N ranks.
#[derive(Debug, Clone, Serialize)]
pub struct ScalingRow {
    pub shape: String,
    pub setting: String,
    pub ranks: usize,
    /// The global batch (rows); each rank takes ⌊B/N⌋ or ⌈B/N⌉ of them.
    pub batch: usize,
    /// Trainable parameters of the method (what the all-reduce carries, plus 4 scalars).
    pub params: usize,
    /// Bytes each rank puts into the step's all-reduce (f64 on the host).
    pub reduce_bytes: usize,
    /// One rank's step on the whole batch, ms.
    pub one_ms: Stats,
    /// The N ranks' step on their shares with the all-reduce, ms (the slowest rank's).
    pub parallel_ms: Stats,
    /// The all-reduce alone inside the parallel step, ms (the slowest rank's; after a barrier,
    /// so waiting for a slower rank is not counted here but in `parallel_ms`).
    pub reduce_ms: Stats,
    /// one_ms / parallel_ms per round.
    pub speedup: Stats,
    /// speedup / N (median).
    pub efficiency: f64,
}

/// A method and its optimizer (None: the backbone alone).
struct Trained<B: crate::backend::Backend> {
    method: Option<Box<dyn PromptMethod<B>>>,
    optim: Option<Optimizer<B>>,
}

impl<B: crate::backend::Backend> Trained<B> {
    fn apply(&mut self, be: &B) {
        if let (Some(m), Some(opt)) = (self.method.as_deref_mut(), self.optim.as_mut()) {
            opt.step(be, m, 1.0, 1.0);
            zero_grads(be, m);
        }
    }
}

/// The slowest rank's values, element-wise.
fn slowest(ranks: &dyn Collective, mine: &[f64]) -> Result<Vec<f64>> {
    let all = ranks.all_gather(bytemuck::cast_slice(mine))?;
    let mut out = vec![f64::NEG_INFINITY; mine.len()];
    for bytes in all {
        let vals: Vec<f64> = bytemuck::pod_collect_to_vec(&bytes);
        for (o, v) in out.iter_mut().zip(vals) {
            *o = o.max(v);
        }
    }
    Ok(out)
}

/// Measures every shape × setting of `cfg` (its batch, lengths, warmup and rounds) on the ranks
/// of `ranks`; every rank returns the same rows. `progress` is called on rank 0.
pub fn run_scaling<B: BenchClock + 'static>(
    be: &B,
    cfg: &BenchConfig,
    ranks: &dyn Collective,
    progress: &mut dyn FnMut(&str),
) -> Result<Vec<ScalingRow>> {
    cfg.check_sizes()?;
    for shape in &cfg.shapes {
        cfg.check_memory(be, shape)?;
    }
    let (rank, n) = (ranks.rank(), ranks.size());
    let mut rows = Vec::new();
    for shape in &cfg.shapes {
        let model = random_model(be, shape, cfg.seed, cfg.quant)?;
        let inputs = vec![cfg.input_len; cfg.batch];
        let targets = vec![cfg.target_len; cfg.batch];
        let batch = model.random_batch(&inputs, &targets, cfg.seed + 1);
        let mine: Vec<usize> = (rank..batch.batch).step_by(n).collect();
        let share = batch.select_rows(&mine);
        for setting in &cfg.settings {
            if rank == 0 {
                progress(&format!("{shape} × {}: build and warm up", setting.name));
            }
            let build = || -> Result<Trained<B>> {
                let (method, optim) = build_setting(be, &model, setting, cfg)?;
                Ok(Trained { method, optim })
            };
            // Separate copies, so the two kinds of step do not share an optimizer's state.
            let mut one = build()?;
            let mut par = build()?;
            let p = par.method.as_deref().map_or(0, |m| m.prompt_rows());
            let params = par.method.as_deref().map_or(0, |m| train_params(m));
            let label_tokens = model.label_count(&batch, p);
            let one_step = |t: &mut Trained<B>| -> Result<()> {
                train_step(be, &model, t.method.as_deref_mut(), &batch)?;
                t.apply(be);
                Ok(())
            };
            // Returns the all-reduce's own milliseconds.
            let par_step = |t: &mut Trained<B>| -> Result<f64> {
                if !mine.is_empty() {
                    let m = t.method.as_deref_mut();
                    train_step_share(be, &model, m, &share, label_tokens)?;
                }
                let mut extra = [0.0; 4];
                // The wait for the slowest rank stays in the step's time, out of the
                // all-reduce's.
                ranks.barrier()?;
                let mut out = Ok(());
                let ms = match t.method.as_deref_mut() {
                    Some(m) => be.time_ms(&mut || out = all_reduce_grads(be, m, ranks, &mut extra)),
                    None => be.time_ms(&mut || out = ranks.all_reduce_sum_f64(&mut extra)),
                };
                out?;
                t.apply(be);
                Ok(ms)
            };
            for _ in 0..cfg.warmup {
                if rank == 0 {
                    one_step(&mut one)?;
                }
                ranks.barrier()?;
                par_step(&mut par)?;
            }
            let (mut one_ms, mut par_ms, mut red_ms) = (Vec::new(), Vec::new(), Vec::new());
            for round in 0..cfg.rounds {
                if rank == 0 {
                    progress(&format!(
                        "{shape} × {}: round {} of {}",
                        setting.name,
                        round + 1,
                        cfg.rounds
                    ));
                }
                let mut t_one = 0.0;
                let mut timed_one = |t_one: &mut f64| -> Result<()> {
                    ranks.barrier()?;
                    if rank == 0 {
                        let mut out = Ok(());
                        *t_one = be.time_ms(&mut || out = one_step(&mut one));
                        out?;
                    }
                    ranks.barrier()
                };
                let mut timed_par = || -> Result<(f64, f64)> {
                    ranks.barrier()?;
                    let mut out = Ok(0.0);
                    let ms = be.time_ms(&mut || out = par_step(&mut par));
                    let reduce = out?;
                    Ok((ms, reduce))
                };
                // The order swaps every round (drift in the machine's speed cancels).
                let (t_par, t_red) = match round % 2 {
                    0 => {
                        timed_one(&mut t_one)?;
                        timed_par()?
                    }
                    _ => {
                        let t = timed_par()?;
                        timed_one(&mut t_one)?;
                        t
                    }
                };
                let worst = slowest(ranks, &[t_one, t_par, t_red])?;
                one_ms.push(worst[0]);
                par_ms.push(worst[1]);
                red_ms.push(worst[2]);
            }
            let ratios: Vec<f64> = one_ms.iter().zip(&par_ms).map(|(a, b)| a / b).collect();
            let speedup = Stats::of(ratios);
            rows.push(ScalingRow {
                shape: shape.clone(),
                setting: setting.name.clone(),
                ranks: n,
                batch: batch.batch,
                params,
                reduce_bytes: 8 * (params + 4),
                one_ms: Stats::of(one_ms),
                parallel_ms: Stats::of(par_ms),
                reduce_ms: Stats::of(red_ms),
                efficiency: speedup.median / n as f64,
                speedup,
            });
        }
    }
    Ok(rows)
}

/// The markdown table of [`run_scaling`]'s rows.
pub fn scaling_table(rows: &[ScalingRow]) -> String {
    let mut t = String::from(
        "| shape | setting | ranks | batch (rows/rank) | params | all-reduce bytes | 1 rank, whole \
         batch (ms) | N ranks (ms) | all-reduce (ms) | speedup | efficiency |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for r in rows {
        t.push_str(&format!(
            "| {} | {} | {} | {} ({}–{}) | {} | {} | {} | {} | {} | {:.2}× ({:.2}–{:.2}) | {:.0}% |\n",
            r.shape,
            r.setting,
            r.ranks,
            r.batch,
            r.batch / r.ranks.max(1),
            r.batch.div_ceil(r.ranks.max(1)),
            r.params,
            r.reduce_bytes,
            r.one_ms.label(),
            r.parallel_ms.label(),
            r.reduce_ms.label(),
            r.speedup.median,
            r.speedup.low,
            r.speedup.high,
            r.efficiency * 100.0
        ));
    }
    t
}
