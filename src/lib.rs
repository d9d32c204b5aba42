//! ibasis: the Local Interaction Basis (LIB) of trained neural networks and their interaction
//! graphs (Bushnaq et al. 2024). The specification is `../shared/spec/method.md`; section numbers
//! in comments refer to it.
//!
//! Layers, each importing only the ones below it:
//! `experiments` (builds, ablations, figures, reports) -> `algorithm` (statistics, bases, edges)
//! -> `models` (modules with forward / VJP / JVP) -> `tensor` (activations, linear algebra).
//! `io` (checkpoint and result files) and `data` (datasets) sit beside `models`.

pub mod algorithm;
pub mod data;
pub mod experiments;
pub mod io;
pub mod models;
pub mod tensor;
