//! Experiments over built graphs: builds, training, ablations, clustering, figures, reports.

pub mod figures;
pub mod modularity;
pub mod report;
