//! Stages of a build and their files: what makes a build resumable and lets it be split over
//! processes (shards, MPI ranks).
//!
//! Every pass over the data sums over samples (method.md sections 3-5): the means and Gram
//! matrices of all node layers (stage `stats`), `M'` of each node layer (`metric.NAME`, from
//! the last node layer backwards, since `M'` of layer `l` needs the basis of `l + 1`), and the
//! edges out of each node layer (`edges.NAME`, all needing every basis). A stage's value is a
//! [`Partial`]: f64 sums over a range of samples and the sample count, so the value over a
//! union of disjoint ranges is the sum of the values over the ranges, whoever computed them.
//! The stage functions return averages (over rows, `samples x positions`, with the same
//! positions for every sample); an average times its sample count is that sum.
//!
//! A stage runs over this process's block of samples (all of them, a shard's, or a rank's) in
//! pieces of at most [`piece_samples`] on a grid that depends on the dataset size and batch
//! size only (never on threads or shards), each written to `DIR/stages/STAGE.samples-A-B.
//! safetensors` as it completes (a stage whose first piece shows that the rest takes under
//! [`QUICK_STAGE_S`] sums the rest as one piece); the sum over all samples is written as
//! `DIR/stages/STAGE.
//! safetensors`. Every file carries the [`Identity`] of the build (each `[lib]` setting, a
//! fingerprint of the model file and the data selection) and is refused, naming the first
//! differing field, when the identity differs.

use crate::data::{Dataset, Samples};
use crate::io::weights::{parse_safetensors, serialize_safetensors, Tensors};
use anyhow::{bail, Context};
use std::collections::HashMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

/// Sums over a range of samples: `sums` add, `fixed` (a reference point every part shares,
/// as the Gram shift of [`super::stats::Moments`]) must agree.
#[derive(Clone, Debug, Default)]
pub struct Partial {
    pub samples: usize,
    pub sums: Tensors,
    pub fixed: Tensors,
}

impl Partial {
    /// `other` added in; both must hold the same tensors (names and shapes).
    pub fn add(mut self, other: &Partial, what: &str) -> anyhow::Result<Self> {
        let same = |a: &Tensors, b: &Tensors| {
            a.len() == b.len()
                && a.iter()
                    .zip(b)
                    .all(|(x, y)| x.0 == y.0 && x.1.shape == y.1.shape)
        };
        if !same(&self.sums, &other.sums) || !same(&self.fixed, &other.fixed) {
            bail!(
                "{what}: the parts hold different tensors; were they written by different builds?"
            );
        }
        // A reference point computed on another machine may differ in the last bits (other
        // SIMD kernels); sums about points that close agree far below any tolerance of ours.
        for ((name, a), b) in self.fixed.iter().zip(other.fixed.values()) {
            let close = a
                .data
                .iter()
                .zip(&b.data)
                .all(|(x, y)| (x - y).abs() <= 1e-12 * x.abs().max(y.abs()).max(1.0));
            if !close {
                bail!("{what}: the parts disagree on `{name}`, which every part must share");
            }
        }
        for (a, b) in self.sums.values_mut().zip(other.sums.values()) {
            for (x, y) in a.data.iter_mut().zip(&b.data) {
                *x += y;
            }
        }
        self.samples += other.samples;
        Ok(self)
    }

    /// Every number of `sums` (and the sample count, as f64) in one vector, in name order: what
    /// an allreduce sums.
    fn flatten(&self) -> Vec<f64> {
        let mut v: Vec<f64> = self
            .sums
            .values()
            .flat_map(|t| t.data.iter().copied())
            .collect();
        v.push(self.samples as f64);
        v
    }

    /// The inverse of [`Partial::flatten`] into a partial of this one's shapes.
    fn unflatten(&self, v: &[f64]) -> Self {
        let mut out = self.clone();
        let mut at = 0;
        for t in out.sums.values_mut() {
            let n = t.data.len();
            t.data.copy_from_slice(&v[at..at + n]);
            at += n;
        }
        out.samples = v[at].round() as usize;
        out
    }
}

/// Collective operations over the processes of one build (MPI ranks): each rank sums its own
/// samples, [`Collective::sum`] adds every rank's numbers, rank 0 decides the bases.
pub trait Collective: Sync {
    fn rank(&self) -> usize;
    fn size(&self) -> usize;
    /// Replaces `values` by their sum over all ranks (the same length on every rank).
    fn sum(&self, values: &mut [f64]);
    /// Replaces `values` on every rank by rank 0's (any length).
    fn broadcast(&self, values: &mut Vec<f64>);
}

/// Which samples this process sums.
#[derive(Clone, Copy, Default)]
pub enum Distribution<'a> {
    /// All samples, in this process.
    #[default]
    Whole,
    /// Block `index` of `count` contiguous blocks; the stage stops once its pieces are written
    /// (`ibasis merge` adds the shards' pieces).
    Shard { index: usize, count: usize },
    /// Block `rank` of `size`, summed over the ranks after every stage.
    Ranks(&'a dyn Collective),
}

impl Distribution<'_> {
    /// This process's block of `0..n`.
    pub fn block(&self, n: usize) -> Range<usize> {
        let (i, k) = match *self {
            Distribution::Whole => (0, 1),
            Distribution::Shard { index, count } => (index, count),
            Distribution::Ranks(c) => (c.rank(), c.size()),
        };
        i * n / k..(i + 1) * n / k
    }

    /// Whether this process writes results (the single process, a shard, or rank 0).
    pub fn writes(&self) -> bool {
        match self {
            Distribution::Ranks(c) => c.rank() == 0,
            _ => true,
        }
    }
}

/// Samples per checkpointed piece: about an eighth of the dataset, a whole number of batches.
/// Depends on the dataset and batch size only, so every run cuts the samples the same way and a
/// resumed build sums the same pieces as an uninterrupted one.
pub fn piece_samples(n: usize, batch: usize) -> usize {
    let batch = batch.max(1);
    n.div_ceil(8).div_ceil(batch).max(1) * batch
}

/// What a stage file must agree on to be reused: `(field, value)` pairs, each `[lib]` setting
/// one field, plus `model` and `data` fingerprints and the number of samples.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Identity(pub Vec<(String, String)>);

impl Identity {
    /// The identity of a build of `lib` on the model and data that `model` and `data`
    /// fingerprint.
    pub fn new(lib: &super::LibConfig, model: &str, data: &str, n_samples: usize) -> Self {
        let mut fields = vec![
            ("model".to_string(), model.to_string()),
            ("data".to_string(), data.to_string()),
            ("samples".to_string(), n_samples.to_string()),
        ];
        if let Ok(serde_json::Value::Object(map)) = serde_json::to_value(lib) {
            for (k, v) in map {
                fields.push((format!("[lib] {k}"), v.to_string()));
            }
        }
        Self(fields)
    }

    /// The fields stage `stage` depends on: the statistics on the data, the model and the node
    /// layers; a basis also on the basis settings; edges on everything.
    fn depends(stage: &str, field: &str) -> bool {
        let basis_only = [
            "[lib] edge_formula",
            "[lib] n_stochastic_sources_edges",
            "[lib] compute_dtype",
        ];
        if stage == STATS {
            return matches!(
                field,
                "model"
                    | "data"
                    | "samples"
                    | "[lib] node_layers"
                    | "[lib] rotate_final_node_layer"
            );
        }
        if stage.starts_with("metric.") {
            return !basis_only.contains(&field);
        }
        true
    }

    /// The first field where `file` (a stage file's identity) differs from this one, among
    /// those stage `stage` depends on when `reuse`, else among all.
    fn first_difference(&self, file: &Identity, stage: &str, reuse: bool) -> Option<String> {
        let theirs: HashMap<&str, &str> = file
            .0
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        for (k, v) in &self.0 {
            if reuse && !Self::depends(stage, k) {
                continue;
            }
            match theirs.get(k.as_str()) {
                Some(t) if t == v => {}
                Some(t) => return Some(format!("{k} is {t} there and {v} here")),
                None => return Some(format!("{k} is missing there")),
            }
        }
        None
    }
}

/// The statistics stage.
pub const STATS: &str = "stats";

/// The folder `DIR/stages` of a build, and what may be reused from it.
pub struct StageStore {
    dir: PathBuf,
    identity: Identity,
    /// Reuse stages whose own inputs are unchanged although other settings changed.
    reuse: bool,
}

const ID_PREFIX: &str = "id:";

impl StageStore {
    pub fn new(out: &Path, identity: Identity, reuse: bool) -> Self {
        Self {
            dir: out.join("stages"),
            identity,
            reuse,
        }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn complete_path(&self, stage: &str) -> PathBuf {
        self.dir.join(format!("{stage}.safetensors"))
    }

    fn piece_path(&self, stage: &str, r: &Range<usize>) -> PathBuf {
        self.dir
            .join(format!("{stage}.samples-{}-{}.safetensors", r.start, r.end))
    }

    /// The whole stage, when its file exists (and matches).
    pub fn complete(&self, stage: &str) -> anyhow::Result<Option<Partial>> {
        let path = self.complete_path(stage);
        if !path.exists() {
            return Ok(None);
        }
        self.read(&path, stage)
    }

    /// The pieces of `stage` on disk that lie within `within`, in sample order, without
    /// overlaps (a piece overlapping an earlier one is ignored): their paths, each read once
    /// here to check that it belongs to this build and read again when its turn to be summed
    /// comes (holding them all would cost a stage's size per piece).
    pub fn pieces(
        &self,
        stage: &str,
        within: &Range<usize>,
    ) -> anyhow::Result<Vec<(Range<usize>, PathBuf)>> {
        let mut found: Vec<(Range<usize>, PathBuf)> = piece_files(&self.dir, stage)?
            .into_iter()
            .filter(|(r, _)| r.start >= within.start && r.end <= within.end)
            .collect();
        found.sort_by_key(|(r, _)| (r.start, r.end));
        let mut out: Vec<(Range<usize>, PathBuf)> = Vec::new();
        for (r, path) in found {
            if out.last().is_some_and(|(prev, _)| prev.end > r.start) {
                continue;
            }
            if self.read(&path, stage)?.is_some() {
                out.push((r, path));
            }
        }
        Ok(out)
    }

    /// Reads a stage file, refusing one of another stage or build; with `reuse`, a file whose
    /// own inputs changed is `None` instead (the stage is computed afresh and overwrites it).
    fn read(&self, path: &Path, stage: &str) -> anyhow::Result<Option<Partial>> {
        let (p, meta) = read_stage_file(path)?;
        if meta.get("stage").map(String::as_str) != Some(stage) {
            bail!("stage file {} is not of stage `{stage}`", path.display());
        }
        let id = identity_of(&meta);
        match self.identity.first_difference(&id, stage, self.reuse) {
            None => Ok(Some(p)),
            Some(_) if self.reuse => Ok(None),
            Some(diff) => bail!(
                "stage file {} was written by a different build: {diff}; remove the stages folder to start afresh, or pass --reuse-stages to keep only the stages this change leaves valid",
                path.display()
            ),
        }
    }

    pub fn write_piece(&self, stage: &str, r: &Range<usize>, p: &Partial) -> anyhow::Result<()> {
        write_stage_file(
            &self.piece_path(stage, r),
            stage,
            Some(r),
            &self.identity,
            p,
        )
    }

    pub fn write_complete(&self, stage: &str, p: &Partial) -> anyhow::Result<()> {
        write_stage_file(&self.complete_path(stage), stage, None, &self.identity, p)
    }

    /// Removes the pieces of `stage` once its complete file is written.
    pub fn remove_pieces(&self, stage: &str, within: &Range<usize>) {
        if let Ok(files) = piece_files(&self.dir, stage) {
            for (r, path) in files {
                if r.start >= within.start && r.end <= within.end {
                    let _ = std::fs::remove_file(path);
                }
            }
        }
    }
}

/// `(samples, path)` of every piece file of `stage` in `dir` (none when `dir` is absent).
fn piece_files(dir: &Path, stage: &str) -> anyhow::Result<Vec<(Range<usize>, PathBuf)>> {
    let entries = match std::fs::read_dir(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        r => r.with_context(|| format!("cannot read folder {}", dir.display()))?,
    };
    let prefix = format!("{stage}.samples-");
    let mut out = Vec::new();
    for e in entries {
        let e = e.with_context(|| format!("cannot read folder {}", dir.display()))?;
        let name = e.file_name().to_string_lossy().to_string();
        let Some(rest) = name
            .strip_prefix(&prefix)
            .and_then(|r| r.strip_suffix(".safetensors"))
        else {
            continue;
        };
        if let Some((a, b)) = rest.split_once('-') {
            if let (Ok(a), Ok(b)) = (a.parse::<usize>(), b.parse::<usize>()) {
                if a < b {
                    out.push((a..b, e.path()));
                }
            }
        }
    }
    Ok(out)
}

/// The stage names with piece files in `dir`.
fn staged_names(dir: &Path) -> anyhow::Result<Vec<String>> {
    let mut names: Vec<String> = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            if let Some(i) = name.find(".samples-") {
                if name.ends_with(".safetensors") && !names.contains(&name[..i].to_string()) {
                    names.push(name[..i].to_string());
                }
            }
        }
    }
    names.sort();
    Ok(names)
}

fn identity_of(meta: &HashMap<String, String>) -> Identity {
    let mut fields: Vec<(String, String)> = meta
        .iter()
        .filter_map(|(k, v)| {
            k.strip_prefix(ID_PREFIX)
                .map(|k| (k.to_string(), v.clone()))
        })
        .collect();
    fields.sort();
    Identity(fields)
}

fn write_stage_file(
    path: &Path,
    stage: &str,
    samples: Option<&Range<usize>>,
    identity: &Identity,
    p: &Partial,
) -> anyhow::Result<()> {
    let mut t = Tensors::new();
    for (k, v) in &p.sums {
        t.insert(format!("sum/{k}"), v.clone());
    }
    for (k, v) in &p.fixed {
        t.insert(format!("fixed/{k}"), v.clone());
    }
    let mut meta = HashMap::new();
    meta.insert("stage".to_string(), stage.to_string());
    meta.insert("sample_count".to_string(), p.samples.to_string());
    if let Some(r) = samples {
        meta.insert("samples".to_string(), format!("{}..{}", r.start, r.end));
    }
    meta.insert(
        "ibasis_version".to_string(),
        env!("CARGO_PKG_VERSION").to_string(),
    );
    for (k, v) in &identity.0 {
        meta.insert(format!("{ID_PREFIX}{k}"), v.clone());
    }
    let bytes = serialize_safetensors(&t, false, Some(meta))?;
    crate::io::write_atomic(path, &bytes)
}

/// A stage file's partial and metadata.
fn read_stage_file(path: &Path) -> anyhow::Result<(Partial, HashMap<String, String>)> {
    let bytes = crate::io::read_file(path)?;
    let bad = || format!("{} is not a valid stage file", path.display());
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .with_context(bad)?;
    let meta = header.metadata().clone().unwrap_or_default();
    let tensors = parse_safetensors(&bytes).with_context(bad)?;
    let samples = meta
        .get("sample_count")
        .and_then(|s| s.parse::<usize>().ok())
        .with_context(|| format!("{}: no sample count", bad()))?;
    let mut p = Partial {
        samples,
        ..Partial::default()
    };
    for (k, v) in tensors {
        if v.data.iter().any(|x| !x.is_finite()) {
            bail!("{}: tensor `{k}` holds NaN or infinity", bad());
        }
        match (k.strip_prefix("sum/"), k.strip_prefix("fixed/")) {
            (Some(name), _) => p.sums.insert(name.to_string(), v),
            (_, Some(name)) => p.fixed.insert(name.to_string(), v),
            _ => bail!("{}: unexpected tensor `{k}`", bad()),
        };
    }
    Ok((p, meta))
}

impl Source {
    fn computed(pieces_reused: usize, started: std::time::Instant) -> Self {
        Source::Computed {
            pieces_reused,
            seconds: started.elapsed().as_secs_f64(),
        }
    }
}

/// How a stage's value came about, for the build's log.
#[derive(Clone, Debug, PartialEq)]
pub enum Source {
    /// Read from its complete stage file.
    Reused,
    /// Computed here (`pieces` of them reused from piece files) in `seconds`.
    Computed { pieces_reused: usize, seconds: f64 },
}

/// Runs the stages of one build: where its data lives, which samples it sums, what it may
/// reuse and write. `compute` functions receive a dataset of the piece's samples.
pub struct StageRunner<'a> {
    pub store: Option<&'a StageStore>,
    pub distribution: Distribution<'a>,
    /// Samples in the whole dataset.
    pub n_samples: usize,
    pub batch: usize,
    /// Only read stages (no passes over the data): `ibasis merge`'s continuation.
    pub assemble_only: bool,
    /// `(stage, source)` of every stage run, in order.
    pub log: std::sync::Mutex<Vec<(String, Source)>>,
}

impl StageRunner<'_> {
    /// The value of `stage` over all samples, or `None` when this process cannot know it yet (a
    /// shard that wrote its pieces; an assembly that finds it missing). `data` gives this
    /// process's block of samples (local indices), made on first use.
    pub fn run<'d>(
        &self,
        stage: &str,
        data: &dyn Fn() -> anyhow::Result<&'d dyn Dataset>,
        compute: &dyn Fn(&dyn Dataset) -> anyhow::Result<Partial>,
    ) -> anyhow::Result<Option<Partial>> {
        if let Some(store) = self.store {
            if let Some(p) = store.complete(stage)? {
                self.log
                    .lock()
                    .unwrap()
                    .push((stage.to_string(), Source::Reused));
                return Ok(Some(p));
            }
        }
        if self.assemble_only {
            return Ok(None);
        }
        let block = self.distribution.block(self.n_samples);
        let reused: Vec<(Range<usize>, PathBuf)> = match self.store {
            Some(store) => store.pieces(stage, &block)?,
            None => Vec::new(),
        };
        let pieces_reused = reused.len();
        let started = std::time::Instant::now();
        let k = piece_samples(self.n_samples, self.batch);
        let covered: Vec<Range<usize>> = reused.iter().map(|(r, _)| r.clone()).collect();
        // Every piece of the block in sample order, a path where it is reused: summed as it
        // comes, so that one piece is held besides the running sum (the statistics of
        // SmolLM2's 61 node layers are 162 MB a piece; holding all eight was 1.3 GB of the
        // 30-block build's peak), in the same order whether the build resumed or not.
        let mut agenda: Vec<(Range<usize>, Option<PathBuf>)> = reused
            .into_iter()
            .map(|(r, path)| (r, Some(path)))
            .chain(missing(&block, &covered, k).into_iter().map(|r| (r, None)))
            .collect();
        agenda.sort_by_key(|(r, _)| r.start);
        let mut mine: Option<Partial> = None;
        let mut first = true;
        let mut at = 0;
        while at < agenda.len() {
            let (r, path) = agenda[at].clone();
            at += 1;
            let p = match (path, self.store) {
                (Some(path), Some(store)) => store.read(&path, stage)?.with_context(|| {
                    format!("stage file {} changed during the build", path.display())
                })?,
                _ => {
                    let local = r.start - block.start..r.end - block.start;
                    let d = data()?;
                    let piece = Samples::new(d, local);
                    let t = std::time::Instant::now();
                    let p = compute(&piece)
                        .with_context(|| format!("samples {}..{}", r.start, r.end))?;
                    // A stage whose remaining pieces take less than QUICK_STAGE_S is not worth
                    // more checkpoints: sum the rest in one call (each call has fixed costs,
                    // e.g. the closed forms' per-section products; 8 pieces made the
                    // modular-addition bases 2x slower). Pieces cut elsewhere only change the
                    // order of the sums.
                    let left = agenda[at..].iter().filter(|(_, p)| p.is_none()).count();
                    if first && t.elapsed().as_secs_f64() * left as f64 <= QUICK_STAGE_S {
                        agenda = coalesce_computed(agenda, at);
                    }
                    first = false;
                    if let Some(store) = self.store {
                        store.write_piece(stage, &r, &p)?;
                    }
                    p
                }
            };
            mine = Some(match mine {
                None => p,
                Some(m) => m.add(&p, stage)?,
            });
        }
        let Some(mine) = mine else {
            bail!("stage `{stage}`: no samples in this process's block {block:?}");
        };
        let total = match self.distribution {
            Distribution::Shard { .. } => {
                self.log
                    .lock()
                    .unwrap()
                    .push((stage.to_string(), Source::computed(pieces_reused, started)));
                return Ok(None);
            }
            Distribution::Whole => mine,
            Distribution::Ranks(comm) => {
                let mut v = mine.flatten();
                comm.sum(&mut v);
                mine.unflatten(&v)
            }
        };
        if let Some(store) = self.store {
            if self.distribution.writes() {
                store.write_complete(stage, &total)?;
            }
            store.remove_pieces(stage, &block);
        }
        self.log
            .lock()
            .unwrap()
            .push((stage.to_string(), Source::computed(pieces_reused, started)));
        Ok(Some(total))
    }
}

/// Seconds below which the rest of a stage is summed without further checkpoints.
const QUICK_STAGE_S: f64 = 5.0;

/// `agenda` with its entries from `from` on that are to be computed (no path) joined where
/// adjacent; reused entries stay apart.
fn coalesce_computed(
    agenda: Vec<(Range<usize>, Option<PathBuf>)>,
    from: usize,
) -> Vec<(Range<usize>, Option<PathBuf>)> {
    let mut out: Vec<(Range<usize>, Option<PathBuf>)> = Vec::new();
    for (i, (r, path)) in agenda.into_iter().enumerate() {
        match out.last_mut() {
            Some((last, None)) if i > from && path.is_none() && last.end == r.start => {
                last.end = r.end
            }
            _ => out.push((r, path)),
        }
    }
    out
}

/// The grid pieces (multiples of `k`, cut to `block`) not covered by `done`.
fn missing(block: &Range<usize>, done: &[Range<usize>], k: usize) -> Vec<Range<usize>> {
    let mut covered: Vec<Range<usize>> = done.to_vec();
    covered.sort_by_key(|r| r.start);
    let mut gaps: Vec<Range<usize>> = Vec::new();
    let mut at = block.start;
    for r in covered
        .iter()
        .chain(std::iter::once(&(block.end..block.end)))
    {
        if r.start > at {
            gaps.push(at..r.start);
        }
        at = at.max(r.end);
    }
    let mut out = Vec::new();
    for g in gaps {
        let mut s = g.start;
        while s < g.end {
            let e = ((s / k + 1) * k).min(g.end);
            out.push(s..e);
            s = e;
        }
    }
    out
}

/// `ibasis merge`: adds the piece files of every stage found in `dirs` into complete stage files
/// in `dirs[0]/stages`, checking that the pieces of each stage cover every sample exactly once
/// and come from one build. Returns the stages merged.
pub fn merge_stage_dirs(dirs: &[PathBuf]) -> anyhow::Result<Vec<(String, usize)>> {
    let Some(first) = dirs.first() else {
        bail!("ibasis merge needs at least one build folder");
    };
    let stage_dirs: Vec<PathBuf> = dirs.iter().map(|d| d.join("stages")).collect();
    let mut names: Vec<String> = Vec::new();
    for d in &stage_dirs {
        for n in staged_names(d)? {
            if !names.contains(&n) {
                names.push(n);
            }
        }
    }
    if names.is_empty() {
        bail!(
            "no stage pieces to merge in {}: run the shards (`ibasis build CONFIG --shard I/N --out DIR`) first",
            dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ")
        );
    }
    let mut merged = Vec::new();
    for stage in names {
        let mut pieces: Vec<(Range<usize>, PathBuf)> = Vec::new();
        for d in &stage_dirs {
            pieces.extend(piece_files(d, &stage)?);
        }
        pieces.sort_by_key(|(r, _)| (r.start, r.end));
        pieces.dedup_by(|a, b| a.0 == b.0);
        let mut total: Option<(Partial, Identity, HashMap<String, String>)> = None;
        let mut at = 0usize;
        let mut n_total: Option<usize> = None;
        for (r, path) in &pieces {
            if r.start != at {
                let what = if r.start > at {
                    "missing"
                } else {
                    "overlapping"
                };
                bail!(
                    "stage `{stage}`: samples {at}..{} are {what} (next piece {}); wait for every shard, or remove stale pieces",
                    r.start.max(at),
                    path.display()
                );
            }
            at = r.end;
            let (p, meta) = read_stage_file(path)?;
            let id = identity_of(&meta);
            n_total = meta
                .get(&format!("{ID_PREFIX}samples"))
                .and_then(|s| s.parse().ok());
            total = Some(match total {
                None => (p, id, meta),
                Some((t, tid, m)) => {
                    if let Some(diff) = tid.first_difference(&id, &stage, false) {
                        bail!(
                            "stage `{stage}`: {} comes from a different build: {diff}",
                            path.display()
                        );
                    }
                    (t.add(&p, &stage)?, tid, m)
                }
            });
        }
        let (p, id, _) = total.expect("at least one piece");
        let n =
            n_total.with_context(|| format!("stage `{stage}`: pieces carry no sample count"))?;
        if at != n {
            bail!("stage `{stage}`: pieces cover samples 0..{at} of {n}; wait for every shard");
        }
        let store = StageStore::new(first, id, false);
        store.write_complete(&stage, &p)?;
        store.remove_pieces(&stage, &(0..n));
        merged.push((stage, pieces.len()));
    }
    Ok(merged)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::HostTensor;

    fn partial(samples: usize, v: f64) -> Partial {
        let mut p = Partial {
            samples,
            ..Partial::default()
        };
        p.sums
            .insert("a".into(), HostTensor::new(vec![2], vec![v, 2.0 * v]));
        p.fixed
            .insert("k".into(), HostTensor::new(vec![1], vec![7.0]));
        p
    }

    #[test]
    fn grid_pieces_fill_the_gaps_between_reused_pieces() {
        let m = missing(&(5..50), &[10..20, 35..40], 10);
        assert_eq!(m, vec![5..10, 20..30, 30..35, 40..50]);
        let agenda = |m: &[Range<usize>]| m.iter().map(|r| (r.clone(), None)).collect::<Vec<_>>();
        let joined = coalesce_computed(agenda(&m), 0);
        assert_eq!(joined, agenda(&[5..10, 20..35, 40..50]));
        // Entries before `from` (summed already) and reused ones are never joined.
        let mut mixed = agenda(&[0..5, 5..10, 10..15, 15..20, 20..25]);
        mixed[3].1 = Some(PathBuf::from("reused"));
        let joined = coalesce_computed(mixed, 1);
        let mut expect = agenda(&[0..5, 5..15, 15..20, 20..25]);
        expect[2].1 = Some(PathBuf::from("reused"));
        assert_eq!(joined, expect);
        assert_eq!(missing(&(0..25), &[], 10), vec![0..10, 10..20, 20..25]);
        assert_eq!(piece_samples(100, 8), 16);
        assert_eq!(piece_samples(3, 512), 512);
    }

    #[test]
    fn partials_add_and_refuse_mismatches() {
        let p = partial(3, 1.0).add(&partial(4, 2.0), "t").unwrap();
        assert_eq!(p.samples, 7);
        assert_eq!(p.sums["a"].data, vec![3.0, 6.0]);
        let mut other = partial(1, 1.0);
        other.fixed.get_mut("k").unwrap().data[0] = 8.0;
        assert!(partial(1, 1.0).add(&other, "t").is_err());
        let v = p.flatten();
        let q = partial(0, 0.0).unflatten(&v);
        assert_eq!(q.sums["a"].data, p.sums["a"].data);
        assert_eq!(q.samples, 7);
    }

    #[test]
    fn stage_files_round_trip_and_name_the_differing_field() {
        let dir = tempfile::tempdir().unwrap();
        let lib = super::super::LibConfig::default();
        let id = Identity::new(&lib, "m1", "d1", 10);
        let store = StageStore::new(dir.path(), id.clone(), false);
        store
            .write_piece("metric.x", &(0..4), &partial(4, 1.0))
            .unwrap();
        store.write_complete(STATS, &partial(10, 3.0)).unwrap();
        let back = store.complete(STATS).unwrap().unwrap();
        assert_eq!(back.sums["a"].data, vec![3.0, 6.0]);
        assert_eq!(store.pieces("metric.x", &(0..10)).unwrap().len(), 1);
        assert!(store.pieces("metric.x", &(5..10)).unwrap().is_empty());
        // Another tau: refused, naming the field; with reuse the statistics stay valid.
        let lib2 = super::super::LibConfig {
            tau: 1e-10,
            ..lib.clone()
        };
        let strict = StageStore::new(dir.path(), Identity::new(&lib2, "m1", "d1", 10), false);
        let err = format!("{:#}", strict.complete(STATS).unwrap_err());
        assert!(err.contains("[lib] tau"), "{err}");
        let reuse = StageStore::new(dir.path(), Identity::new(&lib2, "m1", "d1", 10), true);
        assert!(reuse.complete(STATS).unwrap().is_some());
        // ...and a basis stage, which depends on tau, is computed afresh.
        assert!(reuse.pieces("metric.x", &(0..10)).unwrap().is_empty());
        assert!(strict.pieces("metric.x", &(0..10)).is_err());
        // Another model: refused, naming it; with reuse not even the statistics are kept.
        let other = StageStore::new(dir.path(), Identity::new(&lib, "m2", "d1", 10), false);
        let err = format!("{:#}", other.complete(STATS).unwrap_err());
        assert!(err.contains("model is m1 there and m2 here"), "{err}");
        let other = StageStore::new(dir.path(), Identity::new(&lib, "m2", "d1", 10), true);
        assert!(other.complete(STATS).unwrap().is_none());
        // A truncated file: a clear error, no panic.
        let path = dir.path().join("stages").join("stats.safetensors");
        let bytes = std::fs::read(&path).unwrap();
        std::fs::write(&path, &bytes[..bytes.len() / 2]).unwrap();
        assert!(store.complete(STATS).is_err());
    }

    #[test]
    fn merge_needs_every_sample_exactly_once() {
        let dir = tempfile::tempdir().unwrap();
        let id = Identity::new(&super::super::LibConfig::default(), "m", "d", 10);
        let store = StageStore::new(dir.path(), id, false);
        store.write_piece(STATS, &(0..4), &partial(4, 1.0)).unwrap();
        let err = format!(
            "{:#}",
            merge_stage_dirs(&[dir.path().to_path_buf()]).unwrap_err()
        );
        assert!(
            err.contains("0..10 of 10") || err.contains("wait for every shard"),
            "{err}"
        );
        store
            .write_piece(STATS, &(4..10), &partial(6, 2.0))
            .unwrap();
        let merged = merge_stage_dirs(&[dir.path().to_path_buf()]).unwrap();
        assert_eq!(merged, vec![(STATS.to_string(), 2)]);
        let p = store.complete(STATS).unwrap().unwrap();
        assert_eq!((p.samples, p.sums["a"].data[0]), (10, 3.0));
        assert!(store.pieces(STATS, &(0..10)).unwrap().is_empty());
    }
}
