//! Experiments over built graphs: builds, training, ablations, clustering, figures, reports.
pub mod train;
