//! MPI ranks for `mpirun -np N ibasis build ...` (cargo feature `mpi`): the
//! [`Collective`] the stage runner sums and broadcasts with, over rsmpi and the system's MPI.
//!
//! Without the feature, [`init`] refuses to run under an MPI launcher with more than one rank
//! (every rank would run the whole build and write the same files).

use crate::algorithm::stages::Collective;

/// The number of ranks an MPI launcher (OpenMPI, MPICH/Hydra, Slurm's PMI) says this process
/// belongs to; `None` outside a launcher.
pub fn launcher_size() -> Option<usize> {
    ["OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_SIZE"]
        .iter()
        .find_map(|k| std::env::var(k).ok()?.parse().ok())
}

/// This process's ranks when it was launched by `mpirun` with more than one rank.
pub fn init() -> anyhow::Result<Option<Ranks>> {
    match launcher_size() {
        Some(n) if n > 1 => imp::init(),
        _ => Ok(None),
    }
}

#[cfg(feature = "mpi")]
mod imp {
    use super::Ranks;
    use mpi::collective::SystemOperation;
    use mpi::topology::{Communicator, SimpleCommunicator};
    use mpi::traits::*;

    pub fn init() -> anyhow::Result<Option<Ranks>> {
        let universe = mpi::initialize()
            .ok_or_else(|| anyhow::anyhow!("MPI was already initialised in this process"))?;
        let world = universe.world();
        Ok(Some(Ranks {
            rank: world.rank() as usize,
            size: world.size() as usize,
            world,
            _universe: universe,
        }))
    }

    // At most this many numbers per MPI call (its counts are 32-bit).
    const CHUNK: usize = 1 << 26;

    pub fn sum(world: &SimpleCommunicator, values: &mut [f64]) {
        let mut out = vec![0.0; values.len().min(CHUNK)];
        for chunk in values.chunks_mut(CHUNK) {
            let out = &mut out[..chunk.len()];
            world.all_reduce_into(&chunk[..], out, SystemOperation::sum());
            chunk.copy_from_slice(out);
        }
    }

    pub fn broadcast(world: &SimpleCommunicator, values: &mut Vec<f64>) {
        let root = world.process_at_rank(0);
        let mut len = values.len() as u64;
        root.broadcast_into(&mut len);
        values.resize(len as usize, 0.0);
        for chunk in values.chunks_mut(CHUNK) {
            root.broadcast_into(chunk);
        }
    }
}

#[cfg(not(feature = "mpi"))]
mod imp {
    pub fn init() -> anyhow::Result<Option<super::Ranks>> {
        anyhow::bail!(
            "this ibasis was built without MPI, but runs as one of {} MPI ranks: build it with `cargo build --release --features mpi` (Debian: apt-get install libopenmpi-dev openmpi-bin libclang-dev)",
            super::launcher_size().unwrap_or(0)
        )
    }
}

/// This process's place among the MPI ranks of one build.
pub struct Ranks {
    rank: usize,
    size: usize,
    #[cfg(feature = "mpi")]
    world: mpi::topology::SimpleCommunicator,
    #[cfg(feature = "mpi")]
    _universe: mpi::environment::Universe,
}

// SAFETY: rsmpi's communicator holds a raw MPI handle, so it is neither Send nor Sync. The
// build shares `&Ranks` with its worker threads only inside `Distribution`; the stage runner
// calls `sum` and `broadcast` from the main thread alone, outside every rayon loop, as MPI's
// default thread level (MPI_THREAD_SINGLE) requires.
unsafe impl Sync for Ranks {}

impl Collective for Ranks {
    fn rank(&self) -> usize {
        self.rank
    }
    fn size(&self) -> usize {
        self.size
    }
    #[cfg(feature = "mpi")]
    fn sum(&self, values: &mut [f64]) {
        imp::sum(&self.world, values)
    }
    #[cfg(feature = "mpi")]
    fn broadcast(&self, values: &mut Vec<f64>) {
        imp::broadcast(&self.world, values)
    }
    #[cfg(not(feature = "mpi"))]
    fn sum(&self, _: &mut [f64]) {
        unreachable!("no ranks without the mpi feature")
    }
    #[cfg(not(feature = "mpi"))]
    fn broadcast(&self, _: &mut Vec<f64>) {
        unreachable!("no ranks without the mpi feature")
    }
}
