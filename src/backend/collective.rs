//! Collectives across the ranks of a data-parallel run: every rank holds the same frozen
//! backbone and the same method parameters, computes the gradient of its share of each batch,
//! and the ranks sum those gradients before every optimizer step.
//!
//! [`Collective`] is what the trainer needs and nothing more: all-reduce (sum) of a host buffer,
//! broadcast, all-gather of bytes, barrier, abort. Implementations:
//! - [`SingleProcess`]: one rank; every call is the identity (the default, and every command
//!   that is not `fastpt run`).
//! - [`ThreadGroup`]: N ranks as threads of one process, for tests of the data-parallel logic
//!   in builds without MPI (sums in rank order, so every rank gets bit-identical results).
//! - `Mpi` (cargo feature `mpi`): the system MPI through rsmpi; the launcher (`mpirun`, `srun`)
//!   starts the ranks. GPU gradients are staged through the host.
//!
//! NCCL (GPU buffers, no host staging) lives with the CUDA device: `backend::gpu::nccl`.

use std::sync::{Arc, Condvar, Mutex};

use crate::error::{Error, Result};

/// What a rank of a data-parallel run can ask of the others. Every rank must make the same
/// calls in the same order (a collective is a meeting point).
pub trait Collective {
    /// This rank, `0..size`.
    fn rank(&self) -> usize;
    /// The number of ranks.
    fn size(&self) -> usize;
    /// This rank's index among the ranks on its machine: the GPU it binds to.
    fn local_rank(&self) -> usize;
    /// What runs the ranks (`single process`, `MPI: Open MPI v4.1.4, ...`).
    fn describe(&self) -> String;
    /// Every rank's `mine`, in rank order, on every rank.
    fn all_gather(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>>;
    /// `buf` becomes the element-wise sum over ranks, on every rank. The sum is formed in
    /// rank order by [`ThreadGroup`]; MPI may order it otherwise (identically on every rank).
    fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
        let all = self.all_gather(bytemuck::cast_slice(buf))?;
        sum_in_rank_order(buf, &all)
    }
    /// [`Self::all_reduce_sum_f64`] for f32.
    fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()> {
        let all = self.all_gather(bytemuck::cast_slice(buf))?;
        sum_in_rank_order(buf, &all)
    }
    /// `buf` becomes rank `root`'s bytes on every rank.
    fn broadcast(&self, buf: &mut Vec<u8>, root: usize) -> Result<()> {
        let mut all = self.all_gather(buf)?;
        if root >= all.len() {
            return Err(Error::Ranks(format!(
                "broadcast from rank {root}: there are {} ranks",
                all.len()
            )));
        }
        *buf = std::mem::take(&mut all[root]);
        Ok(())
    }
    /// Returns when every rank has called it.
    fn barrier(&self) -> Result<()> {
        self.all_gather(&[]).map(|_| ())
    }
    /// Stops every rank of the run, after this rank failed (its error already printed): MPI's
    /// abort, which the launcher turns into the others' exit. `code` is the exit status.
    fn abort(&self, code: i32) -> !;
}

/// `buf += Σ other ranks' buffers`, as `buf = Σ_r all[r]` in rank order (every rank the same).
fn sum_in_rank_order<T>(buf: &mut [T], all: &[Vec<u8>]) -> Result<()>
where
    T: bytemuck::Pod + Default + std::ops::AddAssign,
{
    let bytes = std::mem::size_of_val(buf);
    if let Some((r, b)) = all.iter().enumerate().find(|(_, b)| b.len() != bytes) {
        return Err(Error::Ranks(format!(
            "all-reduce: rank {r} sent {} bytes, this rank {bytes}: the ranks run different \
             configs or models",
            b.len()
        )));
    }
    buf.iter_mut().for_each(|x| *x = T::default());
    for b in all {
        // Copied out: the gathered bytes need not be aligned for T.
        let vals: Vec<T> = bytemuck::pod_collect_to_vec(b);
        for (x, v) in buf.iter_mut().zip(vals) {
            *x += v;
        }
    }
    Ok(())
}

/// One process, one rank: every collective is the identity.
#[derive(Debug, Default, Clone, Copy)]
pub struct SingleProcess;

impl Collective for SingleProcess {
    fn rank(&self) -> usize {
        0
    }
    fn size(&self) -> usize {
        1
    }
    fn local_rank(&self) -> usize {
        0
    }
    fn describe(&self) -> String {
        "single process".into()
    }
    fn all_gather(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        Ok(vec![mine.to_vec()])
    }
    fn all_reduce_sum_f64(&self, _buf: &mut [f64]) -> Result<()> {
        Ok(())
    }
    fn all_reduce_sum_f32(&self, _buf: &mut [f32]) -> Result<()> {
        Ok(())
    }
    fn broadcast(&self, _buf: &mut Vec<u8>, _root: usize) -> Result<()> {
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}

/// The meeting point of a [`ThreadGroup`]: each round, every rank deposits its bytes; the last
/// one to arrive publishes the round; a rank that aborts wakes everyone with an error.
#[derive(Default)]
struct Meeting {
    state: Mutex<MeetingState>,
    changed: Condvar,
}

#[derive(Default)]
struct MeetingState {
    /// Rounds completed so far.
    round: u64,
    deposits: Vec<Option<Vec<u8>>>, // (ranks)
    /// The last completed round's bytes, in rank order.
    published: Arc<Vec<Vec<u8>>>,
    /// The rank that aborted the group, if one did.
    aborted: Option<usize>,
}

/// N ranks as N threads of one process (tests without MPI). Build the group with
/// [`ThreadGroup::new`] and hand one member to each thread.
#[derive(Clone)]
pub struct ThreadGroup {
    rank: usize,
    size: usize,
    meeting: Arc<Meeting>,
}

impl ThreadGroup {
    /// The `size` members of a new group, rank 0 first.
    pub fn new(size: usize) -> Vec<ThreadGroup> {
        let meeting = Arc::new(Meeting::default());
        if let Ok(mut s) = meeting.state.lock() {
            s.deposits = vec![None; size];
        }
        (0..size)
            .map(|rank| ThreadGroup {
                rank,
                size,
                meeting: meeting.clone(),
            })
            .collect()
    }

    /// Marks the group aborted by this rank: every rank waiting (or arriving later) at a
    /// collective gets an error naming it. What [`Collective::abort`] does before it ends this
    /// thread; tests call it directly.
    pub fn fail(&self) {
        if let Ok(mut s) = self.meeting.state.lock() {
            s.aborted.get_or_insert(self.rank);
        }
        self.meeting.changed.notify_all();
    }
}

impl Collective for ThreadGroup {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    fn local_rank(&self) -> usize {
        self.rank
    }
    fn describe(&self) -> String {
        format!("{} threads of one process", self.size)
    }
    fn all_gather(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
        let poisoned = || Error::Ranks("a rank panicked inside a collective".into());
        let stopped = |r: usize| {
            Error::Ranks(format!(
                "rank {r} of {} failed; this rank ({}) stops too",
                self.size, self.rank
            ))
        };
        let m = &self.meeting;
        let mut s = m.state.lock().map_err(|_| poisoned())?;
        if let Some(r) = s.aborted {
            return Err(stopped(r));
        }
        let round = s.round;
        s.deposits[self.rank] = Some(mine.to_vec());
        if s.deposits.iter().all(Option::is_some) {
            let all: Vec<Vec<u8>> = s.deposits.iter_mut().filter_map(Option::take).collect();
            s.published = Arc::new(all);
            s.round += 1;
            m.changed.notify_all();
            return Ok(s.published.to_vec());
        }
        while s.round == round {
            if let Some(r) = s.aborted {
                return Err(stopped(r));
            }
            s = m.changed.wait(s).map_err(|_| poisoned())?;
        }
        Ok(s.published.to_vec())
    }
    fn abort(&self, _code: i32) -> ! {
        self.fail();
        // Only this thread ends; the others see the abort at their next collective.
        panic!("rank {} of a thread group aborted", self.rank)
    }
}

/// What the environment says about the launcher that started this process: `(rank, size)`
/// when it is one rank of several (`mpirun`/`mpiexec` of Open MPI, MPICH or Intel MPI, or
/// `srun`), `None` for a plain process.
pub fn launched_rank() -> Option<(usize, usize)> {
    let num = |k: &str| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
    };
    let pairs = [
        ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"), // Open MPI's mpirun
        ("PMI_RANK", "PMI_SIZE"),                         // MPICH / Intel MPI (Hydra)
        ("PMIX_RANK", "PMIX_SIZE"),                       // PMIx launchers
        ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS"),         // srun (not the batch script)
    ];
    for (rank, size) in pairs {
        if let (Some(r), Some(n)) = (num(rank), num(size)) {
            if n > 1 && r < n {
                return Some((r, n));
            }
        }
    }
    None
}

/// The collective of this process: MPI when a launcher started several ranks (and this build
/// has the `mpi` feature), else a single process. A launch of several ranks in a build without
/// MPI is an error: N independent runs would each train alone and write the same folder.
pub fn from_launcher() -> Result<Box<dyn Collective>> {
    match launched_rank() {
        None => Ok(Box::new(SingleProcess)),
        Some((rank, size)) => launched(rank, size),
    }
}

#[cfg(not(feature = "mpi"))]
fn launched(rank: usize, size: usize) -> Result<Box<dyn Collective>> {
    Err(Error::Ranks(format!(
        "this process was started as rank {rank} of {size} (by mpirun, mpiexec or srun), but \
         this fastpt was built without MPI: build it with `cargo build --release --features \
         mpi` (needs an MPI library: apt-get install libopenmpi-dev openmpi-bin libclang-dev), \
         or run one process"
    )))
}

#[cfg(feature = "mpi")]
fn launched(_rank: usize, _size: usize) -> Result<Box<dyn Collective>> {
    Ok(Box::new(mpi_impl::Mpi::init()?))
}

#[cfg(feature = "mpi")]
mod mpi_impl {
    //! The system MPI through rsmpi. MPI's default error handler ends the job on a failed
    //! call, so these calls return errors only for what is checked here.

    use mpi::collective::SystemOperation;
    use mpi::datatype::PartitionMut;
    use mpi::environment::Universe;
    use mpi::topology::{Communicator, SimpleCommunicator};
    use mpi::traits::*;

    use super::Collective;
    use crate::error::{Error, Result};

    /// MPI_COMM_WORLD and this rank's place on its machine.
    pub struct Mpi {
        // Finalises MPI when dropped: held for the process's lifetime.
        _universe: Universe,
        world: SimpleCommunicator,
        local_rank: usize,
    }

    impl Mpi {
        pub fn init() -> Result<Self> {
            let universe = mpi::initialize()
                .ok_or_else(|| Error::Ranks("MPI was initialised twice in this process".into()))?;
            let world = universe.world();
            // The ranks that share this machine's memory: the GPU index is the rank among them.
            let local = world.split_shared(world.rank());
            let local_rank = usize::try_from(local.rank()).unwrap_or(0);
            Ok(Mpi {
                _universe: universe,
                world,
                local_rank,
            })
        }
    }

    impl Collective for Mpi {
        fn rank(&self) -> usize {
            usize::try_from(self.world.rank()).unwrap_or(0)
        }
        fn size(&self) -> usize {
            usize::try_from(self.world.size()).unwrap_or(1)
        }
        fn local_rank(&self) -> usize {
            self.local_rank
        }
        fn describe(&self) -> String {
            let lib = mpi::environment::library_version().unwrap_or_default();
            // Open MPI's string carries the repository and date after a comma.
            let lib = lib.split(',').next().unwrap_or("").trim().to_string();
            format!("MPI ({lib}), {} ranks", self.size())
        }
        fn all_gather(&self, mine: &[u8]) -> Result<Vec<Vec<u8>>> {
            let n = self.size();
            let len = i32::try_from(mine.len()).map_err(|_| {
                Error::Ranks(format!(
                    "all-gather of {} bytes: more than 2 GiB",
                    mine.len()
                ))
            })?;
            let mut lens = vec![0i32; n];
            self.world.all_gather_into(&len, &mut lens[..]);
            let mut displs = Vec::with_capacity(n);
            let mut total = 0i64;
            for &l in &lens {
                displs.push(i32::try_from(total).map_err(|_| {
                    Error::Ranks("all-gather: more than 2 GiB over all ranks".into())
                })?);
                total += l as i64;
            }
            let mut all = vec![0u8; total as usize];
            {
                let mut part = PartitionMut::new(&mut all[..], &lens[..], &displs[..]);
                self.world.all_gather_varcount_into(mine, &mut part);
            }
            Ok(lens
                .iter()
                .zip(&displs)
                .map(|(&l, &d)| all[d as usize..(d + l) as usize].to_vec())
                .collect())
        }
        fn all_reduce_sum_f64(&self, buf: &mut [f64]) -> Result<()> {
            let send = buf.to_vec();
            self.world
                .all_reduce_into(&send[..], buf, SystemOperation::sum());
            Ok(())
        }
        fn all_reduce_sum_f32(&self, buf: &mut [f32]) -> Result<()> {
            let send = buf.to_vec();
            self.world
                .all_reduce_into(&send[..], buf, SystemOperation::sum());
            Ok(())
        }
        fn broadcast(&self, buf: &mut Vec<u8>, root: usize) -> Result<()> {
            let root = i32::try_from(root)
                .ok()
                .filter(|&r| r < self.world.size())
                .ok_or_else(|| Error::Ranks(format!("broadcast from rank {root}: no such rank")))?;
            let p = self.world.process_at_rank(root);
            let mut len = buf.len() as u64;
            p.broadcast_into(&mut len);
            buf.resize(len as usize, 0);
            p.broadcast_into(&mut buf[..]);
            Ok(())
        }
        fn barrier(&self) -> Result<()> {
            self.world.barrier();
            Ok(())
        }
        fn abort(&self, code: i32) -> ! {
            self.world.abort(code)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` on each member of a group of `n` threads; their results in rank order.
    fn on_group<T: Send + 'static>(
        n: usize,
        f: impl Fn(ThreadGroup) -> T + Send + Sync + Copy + 'static,
    ) -> Vec<T> {
        let handles: Vec<_> = ThreadGroup::new(n)
            .into_iter()
            .map(|g| std::thread::spawn(move || f(g)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    }

    #[test]
    fn all_reduce_sum_adds_every_rank_in_rank_order() {
        let out = on_group(3, |g| {
            let r = g.rank() as f64;
            // Rank r holds [r, 10 r + 1, 0.1]; repeated to check rounds do not mix.
            let mut last = Vec::new();
            for round in 0..5 {
                let mut buf = vec![r + round as f64, 10.0 * r + 1.0, 0.1];
                g.all_reduce_sum_f64(&mut buf).unwrap();
                last = buf;
            }
            last
        });
        // Ranks 0, 1, 2 at round 4: 4 + 5 + 6, 1 + 11 + 21, 0.1 + 0.1 + 0.1 (in that order).
        let want = vec![15.0, 33.0, (0.1 + 0.1) + 0.1];
        for got in &out {
            assert_eq!(got, &want);
        }
    }

    #[test]
    fn all_gather_and_broadcast_give_each_rank_the_right_bytes() {
        let out = on_group(3, |g| {
            let mine = vec![g.rank() as u8; g.rank() + 1];
            let all = g.all_gather(&mine).unwrap();
            let mut b = match g.rank() {
                2 => b"from two".to_vec(),
                _ => Vec::new(),
            };
            g.broadcast(&mut b, 2).unwrap();
            g.barrier().unwrap();
            (all, b)
        });
        for (all, b) in out {
            assert_eq!(all, vec![vec![0], vec![1, 1], vec![2, 2, 2]]);
            assert_eq!(b, b"from two");
        }
    }

    #[test]
    fn a_failed_rank_stops_the_others_with_its_number() {
        let out = on_group(2, |g| {
            if g.rank() == 1 {
                g.fail();
                return String::new();
            }
            let mut buf = vec![1.0f32];
            match g.all_reduce_sum_f32(&mut buf) {
                Ok(()) => "no error".into(),
                Err(e) => e.to_string(),
            }
        });
        assert!(out[0].contains("rank 1 of 2 failed"), "{}", out[0]);
    }

    #[test]
    fn mismatched_buffers_are_an_error_naming_the_rank() {
        let out = on_group(2, |g| {
            let mut buf = vec![0.0f64; 2 + g.rank()];
            g.all_reduce_sum_f64(&mut buf).map_err(|e| e.to_string())
        });
        let e = out[0].as_ref().unwrap_err();
        assert!(e.contains("rank 1 sent 24 bytes, this rank 16"), "{e}");
    }
}
