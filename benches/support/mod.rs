//! Shared by the benchmarks: the harness (emulator, runtime, timing, paired runs), the recorder of
//! samples, and the summary report.

pub(crate) mod harness;
pub(crate) mod recorder;
pub(crate) mod report;
