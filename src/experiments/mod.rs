//! Experiments over built graphs: builds, evaluation, training, ablations, clustering, figures
//! and reports. Each reads configs and files and calls into `algorithm` and `models`.

pub mod ablate;
pub mod bench;
pub mod build;
pub mod clustering;
pub mod config;
pub mod eval;
pub mod explorer;
pub mod figures;
pub mod fourier;
pub mod modularity;
pub mod pipeline;
pub mod plan;
pub mod ranks;
pub mod report;
pub mod train;
pub mod view;
