//! The emulator's PostgreSQL: [`cluster`] starts and stops a private cluster, [`shared`] lets one
//! cluster serve the emulators of a whole test run.

mod cluster;
mod shared;

pub use cluster::DIR_PREFIX;
pub(crate) use cluster::{Cluster, Location};
pub(crate) use shared::Attached;
pub use shared::SharedCluster;
