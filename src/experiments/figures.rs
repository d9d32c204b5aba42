//! Figures of section 10, each written as `STEM.svg` and `STEM.png`: the interaction graph,
//! ablation curves, importance spectra and edge-mass curves.
//!
//! Text is measured and (in PNGs) drawn with the bundled DejaVu Sans (`assets/fonts`, Bitstream
//! Vera licence, redistributable with its notice), registered as plotters' `sans-serif`, so the
//! output does not depend on the fonts of the machine. SVGs name `sans-serif` and let the viewer
//! pick. PNGs are drawn at twice the SVG's pixel size.

use super::modularity::{mass_threshold, Clusters};
use crate::io::write_atomic;
use anyhow::{bail, ensure, Context};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::io::Write;
use std::path::{Path, PathBuf};

pub use super::view::{GraphView, LayerView};

/// The two files a figure was written to.
#[derive(Clone, Debug, PartialEq)]
pub struct FigureFiles {
    /// `STEM.svg`.
    pub svg: PathBuf,
    /// `STEM.png`.
    pub png: PathBuf,
}

/// Settings of [`draw_interaction_graph`].
#[derive(Clone, Debug, PartialEq)]
pub struct GraphDrawOptions {
    /// Most important non-constant features drawn per layer.
    pub top_n: usize,
    /// Per edge matrix, draw the largest edges (among drawn features) holding this fraction of
    /// their total mass.
    pub edge_mass: f64,
    /// At most this many edges per matrix.
    pub max_edges_per_matrix: usize,
    /// With clusters, order each column by cluster (then importance) instead of importance.
    pub group_by_cluster: bool,
    /// Title above the graph.
    pub title: Option<String>,
}

impl Default for GraphDrawOptions {
    fn default() -> Self {
        Self {
            top_n: 40,
            edge_mass: 0.99,
            max_edges_per_matrix: 1500,
            group_by_cluster: true,
            title: None,
        }
    }
}

/// One ablation curve: a score after keeping the `n_kept[k]` most important features.
#[derive(Clone, Debug, PartialEq)]
pub struct Curve {
    /// Basis name, e.g. `"LIB"`, `"PCA"`, `"neurons"`.
    pub label: String,
    /// Numbers of kept features.
    pub n_kept: Vec<usize>,
    /// Score (accuracy, loss) at each `n_kept`.
    pub score: Vec<f64>,
}

/// Pixels of a PNG per pixel of the SVG.
const PNG_SCALE: f64 = 2.0;
const FONT: &str = "sans-serif";

/// Categorical colours (Tableau 10), for clusters and curves.
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
    RGBColor(127, 127, 127),
];
/// Features of clusters beyond the palette, singleton clusters and edges across clusters.
const NEUTRAL: RGBColor = RGBColor(150, 150, 150);
const INK: RGBColor = RGBColor(40, 40, 40);
/// Nodes and edges when there are no clusters.
const PLAIN: RGBColor = RGBColor(31, 90, 160);

fn register_font() -> anyhow::Result<()> {
    static FONT_BYTES: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");
    static DONE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    let ok = *DONE.get_or_init(|| {
        plotters::style::register_font(FONT, FontStyle::Normal, FONT_BYTES).is_ok()
    });
    ensure!(ok, "the bundled font could not be loaded");
    Ok(())
}

/// A figure that can draw itself on any plotters backend at a scale (pixels per SVG pixel).
trait Figure {
    fn size(&self) -> (u32, u32);
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>, s: f64) -> anyhow::Result<()>
    where
        DB::ErrorType: 'static;
}

fn with_suffix(stem: &Path, suffix: &str) -> PathBuf {
    let mut name = stem.as_os_str().to_owned();
    name.push(suffix);
    PathBuf::from(name)
}

/// Renders `fig` to `STEM.svg` and `STEM.png`, each written atomically.
fn save(stem: &Path, fig: &impl Figure) -> anyhow::Result<FigureFiles> {
    register_font()?;
    let (w, h) = fig.size();
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (w, h)).into_drawing_area();
        root.fill(&WHITE)?;
        fig.draw(&root, 1.0)?;
        root.present()?;
    }
    let (pw, ph) = ((w as f64 * PNG_SCALE) as u32, (h as f64 * PNG_SCALE) as u32);
    let mut rgb = vec![0u8; pw as usize * ph as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut rgb, (pw, ph)).into_drawing_area();
        root.fill(&WHITE)?;
        fig.draw(&root, PNG_SCALE)?;
        root.present()?;
    }
    let files = FigureFiles {
        svg: with_suffix(stem, ".svg"),
        png: with_suffix(stem, ".png"),
    };
    write_atomic(&files.svg, svg.as_bytes())?;
    write_atomic(&files.png, &encode_png(&rgb, pw, ph)?)?;
    Ok(files)
}

/// Encodes 8-bit RGB pixels as a PNG (no filtering, zlib via flate2): plotters only encodes
/// straight to a file, which would not be atomic.
fn encode_png(rgb: &[u8], w: u32, h: u32) -> anyhow::Result<Vec<u8>> {
    ensure!(
        rgb.len() == w as usize * h as usize * 3,
        "pixel buffer size"
    );
    fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        let mut crc = flate2::Crc::new();
        crc.update(kind);
        crc.update(data);
        out.extend_from_slice(&crc.sum().to_be_bytes());
    }
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut header = Vec::with_capacity(13);
    header.extend_from_slice(&w.to_be_bytes());
    header.extend_from_slice(&h.to_be_bytes());
    // Bit depth 8, colour type 2 (RGB), deflate, no filter method, no interlace.
    header.extend_from_slice(&[8, 2, 0, 0, 0]);
    chunk(&mut out, b"IHDR", &header);
    let mut z = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    for row in rgb.chunks(w as usize * 3) {
        z.write_all(&[0])?;
        z.write_all(row)?;
    }
    chunk(&mut out, b"IDAT", &z.finish()?);
    chunk(&mut out, b"IEND", &[]);
    Ok(out)
}

fn font(size: f64, s: f64) -> TextStyle<'static> {
    (FONT, size * s).into_font().color(&INK)
}

fn px(v: f64, s: f64) -> i32 {
    (v * s).round() as i32
}

// ---------------------------------------------------------------------------------------------
// Interaction graph

/// A drawn feature: its index in the layer and pixel position (SVG scale).
struct DrawnNode {
    feature: usize,
    x: f64,
    y: f64,
    /// Importance relative to the layer's largest drawn one, in [0, 1].
    rel: f64,
    cluster: Option<usize>,
}

struct DrawnEdge {
    from: (f64, f64),
    to: (f64, f64),
    /// `sqrt(E)` relative to the largest drawn edge of its matrix, in (0, 1].
    rel: f64,
    cluster: Option<usize>,
}

struct GraphFigure {
    size: (u32, u32),
    title: String,
    columns: Vec<(String, String, f64)>,
    nodes: Vec<Vec<DrawnNode>>,
    labels: Vec<Option<Vec<String>>>,
    edges: Vec<DrawnEdge>,
    legend: Vec<(usize, usize)>,
    cluster_sizes: Vec<usize>,
    clustered: bool,
}

const ROW: f64 = 18.0;
const COLUMN_GAP: f64 = 250.0;
const TOP: f64 = 86.0;
const SIDE: f64 = 110.0;

/// Colour of a cluster: its palette entry when it is among the first ones and has at least
/// two members in the whole graph, else neutral.
fn cluster_colour(cluster: Option<usize>, sizes: &[usize]) -> RGBColor {
    match cluster {
        Some(c) if c < PALETTE.len() - 1 && sizes.get(c).is_some_and(|&n| n > 1) => PALETTE[c],
        Some(_) => NEUTRAL,
        None => PLAIN,
    }
}

/// Draws the interaction graph of `view` (section 10) to `STEM.svg` / `STEM.png`: one column
/// per node layer (names on top), the `opts.top_n` most important non-constant features of
/// each top to bottom (by importance, or by cluster then importance), node size and opacity by
/// importance, per-feature labels when the layers have them, and the largest edges (holding
/// `opts.edge_mass` of each matrix among the drawn features) with width and opacity by
/// `sqrt(E)` relative to the matrix's largest. With `clusters`, nodes and within-cluster edges
/// take their cluster's colour (the nine largest clusters; the rest grey) and a legend lists
/// the clusters.
pub fn draw_interaction_graph(
    stem: &Path,
    view: &GraphView,
    clusters: Option<&Clusters>,
    opts: &GraphDrawOptions,
) -> anyhow::Result<FigureFiles> {
    view.validate()?;
    ensure!(!view.layers.is_empty(), "no node layers to draw");
    ensure!(opts.top_n > 0, "top_n must be positive");
    ensure!(
        opts.edge_mass > 0.0 && opts.edge_mass <= 1.0,
        "edge_mass {} outside (0, 1]",
        opts.edge_mass
    );
    if let Some(c) = clusters {
        ensure!(
            c.by_layer.len() == view.layers.len()
                && c.by_layer
                    .iter()
                    .zip(&view.layers)
                    .all(|(b, l)| b.len() == l.importance.len()),
            "clusters were computed for another graph"
        );
    }
    let sizes = clusters.map(Clusters::sizes).unwrap_or_default();
    let cluster_of = |l: usize, f: usize| clusters.and_then(|c| c.of(l, f));

    let n_rows = view
        .layers
        .iter()
        .map(|l| {
            l.importance
                .len()
                .saturating_sub(usize::from(l.has_constant))
                .min(opts.top_n)
        })
        .max()
        .unwrap_or(0);
    let has_legend = clusters.is_some_and(|c| c.n_clusters > 0);
    let width = 2.0 * SIDE + COLUMN_GAP * (view.layers.len() - 1) as f64;
    let height = TOP + ROW * n_rows.max(1) as f64 + if has_legend { 70.0 } else { 30.0 };

    let mut nodes = Vec::new();
    let mut columns = Vec::new();
    for (l, layer) in view.layers.iter().enumerate() {
        let first = usize::from(layer.has_constant);
        let mut order: Vec<usize> = (first..layer.importance.len()).collect();
        order.sort_by(|&a, &b| {
            layer.importance[b]
                .total_cmp(&layer.importance[a])
                .then(a.cmp(&b))
        });
        order.truncate(opts.top_n);
        if opts.group_by_cluster && clusters.is_some() {
            // Stable: importance order within each cluster.
            order.sort_by_key(|&f| cluster_of(l, f).unwrap_or(usize::MAX));
        }
        let max_imp = order
            .iter()
            .map(|&f| layer.importance[f].abs())
            .fold(0.0, f64::max);
        let x = SIDE + COLUMN_GAP * l as f64;
        let drawn: Vec<DrawnNode> = order
            .iter()
            .enumerate()
            .map(|(row, &f)| DrawnNode {
                feature: f,
                x,
                y: TOP + ROW * (row as f64 + 0.5),
                rel: if max_imp > 0.0 {
                    layer.importance[f].abs() / max_imp
                } else {
                    0.0
                },
                cluster: cluster_of(l, f),
            })
            .collect();
        let total = layer.importance.len() - first;
        columns.push((
            layer.name.clone(),
            format!("top {} of {total}", drawn.len()),
            x,
        ));
        nodes.push(drawn);
    }

    let mut edges = Vec::new();
    for (l, e) in view.edges.iter().enumerate() {
        let mut entries = Vec::new();
        for a in &nodes[l] {
            for b in &nodes[l + 1] {
                let v = e[(b.feature, a.feature)];
                if v > 0.0 {
                    entries.push((v, a, b));
                }
            }
        }
        let values: Vec<f64> = entries.iter().map(|t| t.0).collect();
        let threshold = mass_threshold(&values, opts.edge_mass);
        entries.retain(|t| t.0 >= threshold);
        entries.sort_by(|x, y| y.0.total_cmp(&x.0));
        entries.truncate(opts.max_edges_per_matrix);
        let Some(&(max, _, _)) = entries.first() else {
            continue;
        };
        for (v, a, b) in entries {
            edges.push(DrawnEdge {
                from: (a.x, a.y),
                to: (b.x, b.y),
                rel: (v / max).sqrt(),
                cluster: a.cluster.filter(|c| Some(*c) == b.cluster),
            });
        }
    }
    // Faint edges first, so strong ones stay visible on top.
    edges.sort_by(|a, b| a.rel.total_cmp(&b.rel));

    let legend = if has_legend {
        sizes
            .iter()
            .enumerate()
            .filter(|&(c, &n)| c < PALETTE.len() - 1 && n > 1)
            .map(|(c, &n)| (c, n))
            .collect()
    } else {
        vec![]
    };
    let title = opts.title.clone().unwrap_or_else(|| match clusters {
        Some(c) => format!(
            "Interaction graph: {} clusters, modularity Q = {:.3} (gamma = {})",
            c.n_clusters, c.q, c.gamma
        ),
        None => "Interaction graph".to_string(),
    });
    let fig = GraphFigure {
        size: (width.ceil() as u32, height.ceil() as u32),
        title,
        columns,
        labels: view.layers.iter().map(|l| l.labels.clone()).collect(),
        nodes,
        edges,
        legend,
        cluster_sizes: sizes,
        clustered: clusters.is_some(),
    };
    save(stem, &fig).with_context(|| format!("drawing the interaction graph {}", stem.display()))
}

impl Figure for GraphFigure {
    fn size(&self) -> (u32, u32) {
        self.size
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>, s: f64) -> anyhow::Result<()>
    where
        DB::ErrorType: 'static,
    {
        let p = |(x, y): (f64, f64)| (px(x, s), px(y, s));
        let colour = |c: Option<usize>| {
            if self.clustered {
                cluster_colour(c, &self.cluster_sizes)
            } else {
                PLAIN
            }
        };
        let centre = Pos::new(HPos::Center, VPos::Center);
        root.draw(&Text::new(
            self.title.clone(),
            p((self.size.0 as f64 / 2.0, 20.0)),
            font(20.0, s).pos(centre),
        ))?;
        for (name, sub, x) in &self.columns {
            root.draw(&Text::new(
                name.clone(),
                p((*x, 48.0)),
                font(16.0, s).pos(centre),
            ))?;
            root.draw(&Text::new(
                sub.clone(),
                p((*x, 66.0)),
                font(12.5, s).color(&NEUTRAL).pos(centre),
            ))?;
        }
        for e in &self.edges {
            let c = match e.cluster {
                Some(_) => colour(e.cluster),
                None if self.clustered => NEUTRAL,
                None => PLAIN,
            };
            let width = ((0.6 + 4.4 * e.rel) * s).round().max(1.0) as u32;
            let alpha = 0.12 + 0.68 * e.rel;
            root.draw(&PathElement::new(
                vec![p(e.from), p(e.to)],
                c.mix(alpha).stroke_width(width),
            ))?;
        }
        for (l, column) in self.nodes.iter().enumerate() {
            for n in column {
                let c = colour(n.cluster);
                let r = ((2.5 + 4.5 * n.rel.sqrt()) * s).round() as i32;
                root.draw(&Circle::new(
                    p((n.x, n.y)),
                    r,
                    c.mix(0.35 + 0.65 * n.rel.sqrt()).filled(),
                ))?;
                root.draw(&Circle::new(
                    p((n.x, n.y)),
                    r,
                    c.stroke_width(s.round().max(1.0) as u32),
                ))?;
                if let Some(labels) = &self.labels[l] {
                    let text = &labels[n.feature];
                    if text.is_empty() {
                        continue;
                    }
                    let style = font(13.0, s).pos(Pos::new(HPos::Right, VPos::Center));
                    let (tw, th) = root.estimate_text_size(text, &style)?;
                    let right = n.x - 10.0;
                    let (tw, th) = (tw as f64 / s, th as f64 / s);
                    // A translucent backing keeps labels legible over incoming edges.
                    root.draw(&Rectangle::new(
                        [
                            p((right - tw - 2.0, n.y - th / 2.0 - 1.0)),
                            p((right + 1.0, n.y + th / 2.0 + 1.0)),
                        ],
                        WHITE.mix(0.8).filled(),
                    ))?;
                    root.draw(&Text::new(text.clone(), p((right, n.y)), style))?;
                }
            }
        }
        if !self.legend.is_empty() {
            let y = self.size.1 as f64 - 40.0;
            let mut x = 20.0;
            root.draw(&Text::new(
                "clusters (nodes):",
                p((x, y)),
                font(13.0, s).pos(Pos::new(HPos::Left, VPos::Center)),
            ))?;
            x += 120.0;
            for &(c, n) in &self.legend {
                if x > self.size.0 as f64 - 70.0 {
                    break;
                }
                root.draw(&Circle::new(p((x, y)), px(5.0, s), PALETTE[c].filled()))?;
                root.draw(&Text::new(
                    format!("{c} ({n})"),
                    p((x + 9.0, y)),
                    font(13.0, s).pos(Pos::new(HPos::Left, VPos::Center)),
                ))?;
                x += 80.0;
            }
            root.draw(&Text::new(
                "grey: other clusters and edges between clusters",
                p((20.0, y + 20.0)),
                font(12.0, s)
                    .color(&NEUTRAL)
                    .pos(Pos::new(HPos::Left, VPos::Center)),
            ))?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Line charts

struct Series {
    label: String,
    points: Vec<(f64, f64)>,
    colour: RGBColor,
    width: f64,
    markers: bool,
}

struct LineChart {
    title: String,
    x_label: String,
    y_label: String,
    x_log: bool,
    y_log: bool,
    series: Vec<Series>,
    legend_pos: SeriesLabelPosition,
}

/// Most lines a legend lists one by one; beyond it (SmolLM2's 61 node layers drew 122 spectra
/// whose legend ran off the figure) [`shade_by_depth`] takes over.
const LEGEND_MAX: usize = 12;

/// Colours many lines by depth instead of by the palette's ten cycling colours: lines are
/// grouped by their label's first word (`LIB`, `PCA`), each group gets one palette hue, light
/// for its first line and dark for its last, and the legend names only those two ends.
fn shade_by_depth(lines: &mut [Series]) {
    if lines.len() <= LEGEND_MAX {
        return;
    }
    let group = |l: &Series| l.label.split_whitespace().next().unwrap_or("").to_string();
    let mut groups: Vec<String> = Vec::new();
    for l in lines.iter() {
        if !groups.contains(&group(l)) {
            groups.push(group(l));
        }
    }
    for (g, name) in groups.iter().enumerate() {
        let RGBColor(r, gr, b) = PALETTE[g % PALETTE.len()];
        let members: Vec<usize> = (0..lines.len())
            .filter(|&i| group(&lines[i]) == *name)
            .collect();
        let m = members.len();
        for (k, &i) in members.iter().enumerate() {
            // From 70% white (t = 0) to 40% black (t = 1).
            let t = if m > 1 {
                k as f64 / (m - 1) as f64
            } else {
                1.0
            };
            let shade = |c: u8| {
                let c = c as f64;
                let light = c + 0.7 * (255.0 - c);
                (light + t * (0.6 * c - light)).round() as u8
            };
            lines[i].colour = RGBColor(shade(r), shade(gr), shade(b));
            lines[i].label = match k {
                0 if m > 1 => format!("{} (lightest)", lines[i].label),
                _ if k == m - 1 => format!("{} (darkest)", lines[i].label),
                _ => String::new(),
            };
        }
    }
}

fn bounds(values: impl Iterator<Item = f64>, log: bool) -> anyhow::Result<(f64, f64)> {
    let (lo, hi) = values.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    ensure!(lo.is_finite() && hi.is_finite(), "nothing to plot");
    Ok(if log {
        // A little room on either side, as a factor: padding a log axis by whole decades
        // could waste most of it.
        let pad = (hi / lo).powf(0.03).max(1.2);
        (lo / pad, hi * pad)
    } else if hi - lo < 1e-12 * hi.abs().max(1.0) {
        (lo - 0.5, hi + 0.5)
    } else {
        let pad = 0.04 * (hi - lo);
        (lo - pad, hi + pad)
    })
}

impl Figure for LineChart {
    fn size(&self) -> (u32, u32) {
        (860, 520)
    }

    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>, s: f64) -> anyhow::Result<()>
    where
        DB::ErrorType: 'static,
    {
        let all = || self.series.iter().flat_map(|c| c.points.iter());
        let (x0, x1) = bounds(all().map(|p| p.0), self.x_log)?;
        let (y0, y1) = bounds(all().map(|p| p.1), self.y_log)?;
        let log = |lo: f64, hi: f64| {
            let (bold, light) = log_ticks(lo, hi);
            (lo..hi)
                .log_scale()
                .with_key_points(bold)
                .with_light_points(light)
        };
        match (self.x_log, self.y_log) {
            (false, false) => self.draw_on(root, s, x0..x1, y0..y1),
            (true, false) => self.draw_on(root, s, log(x0, x1), y0..y1),
            (false, true) => self.draw_on(root, s, x0..x1, log(y0, y1)),
            (true, true) => self.draw_on(root, s, log(x0, x1), log(y0, y1)),
        }
    }
}

impl LineChart {
    fn draw_on<DB, X, Y>(
        &self,
        root: &DrawingArea<DB, Shift>,
        s: f64,
        x: X,
        y: Y,
    ) -> anyhow::Result<()>
    where
        DB: DrawingBackend,
        DB::ErrorType: 'static,
        X: plotters::coord::ranged1d::AsRangedCoord<Value = f64>,
        Y: plotters::coord::ranged1d::AsRangedCoord<Value = f64>,
        X::CoordDescType: plotters::coord::ranged1d::ValueFormatter<f64>,
        Y::CoordDescType: plotters::coord::ranged1d::ValueFormatter<f64>,
    {
        let mut chart = ChartBuilder::on(root)
            .caption(&self.title, font(19.0, s))
            .margin(px(14.0, s))
            .x_label_area_size(px(48.0, s))
            .y_label_area_size(px(64.0, s))
            .build_cartesian_2d(x, y)?;
        chart
            .configure_mesh()
            .x_desc(&self.x_label)
            .y_desc(&self.y_label)
            .label_style(font(13.0, s))
            .axis_desc_style(font(14.0, s))
            .max_light_lines(4)
            .x_labels(12)
            .y_labels(12)
            .light_line_style(RGBColor(243, 243, 243).stroke_width(s.round().max(1.0) as u32))
            .bold_line_style(RGBColor(218, 218, 218).stroke_width(s.round().max(1.0) as u32))
            .x_label_formatter(&|v| tick(*v))
            .y_label_formatter(&|v| tick(*v))
            .draw()?;
        for series in &self.series {
            let style = series
                .colour
                .stroke_width((series.width * s).round().max(1.0) as u32);
            let drawn = chart.draw_series(LineSeries::new(series.points.iter().copied(), style))?;
            // An empty label stays out of the legend ([`shade_by_depth`]).
            if !series.label.is_empty() {
                drawn.label(series.label.clone()).legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + px(20.0, s), y)], style)
                });
            }
            if series.markers {
                chart.draw_series(
                    series
                        .points
                        .iter()
                        .map(|&pt| Circle::new(pt, px(2.5, s), series.colour.filled())),
                )?;
            }
        }
        chart
            .configure_series_labels()
            .position(self.legend_pos.clone())
            .margin(px(10.0, s))
            .legend_area_size(px(30.0, s))
            .label_font(font(13.0, s))
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(200, 200, 200))
            .draw()?;
        Ok(())
    }
}

/// Labelled and light tick positions of a log axis over `[lo, hi]` (`0 < lo < hi`): decades,
/// plus 2x and 5x multiples when the axis spans under four decades (plotters' own log axis
/// labels only decades, which leaves one or two labels on a short axis); light lines at every
/// multiple of a decade.
fn log_ticks(lo: f64, hi: f64) -> (Vec<f64>, Vec<f64>) {
    let (first, last) = (lo.log10().floor() as i32, hi.log10().ceil() as i32);
    let fine = last - first <= 4;
    let (mut bold, mut light) = (Vec::new(), Vec::new());
    for e in first..=last {
        let decade = 10f64.powi(e);
        for m in 1..10 {
            let v = m as f64 * decade;
            if v < lo * (1.0 - 1e-9) || v > hi * (1.0 + 1e-9) {
                continue;
            }
            if m == 1 || (fine && (m == 2 || m == 5)) {
                bold.push(v);
            } else {
                light.push(v);
            }
        }
    }
    (bold, light)
}

/// Short tick labels: integers as integers, tiny and huge values in exponent form.
fn tick(v: f64) -> String {
    let a = v.abs();
    if a == 0.0 {
        "0".into()
    } else if !(1e-3..1e5).contains(&a) {
        format!("{v:.0e}")
    } else if (v - v.round()).abs() < 1e-9 * a.max(1.0) {
        format!("{}", v.round())
    } else {
        let s = format!("{v:.3}");
        s.trim_end_matches('0').to_string()
    }
}

fn check_finite(what: &str, values: &[f64]) -> anyhow::Result<()> {
    if let Some(v) = values.iter().find(|v| !v.is_finite()) {
        bail!("{what} contains {v}");
    }
    Ok(())
}

/// Draws node-ablation curves of one node layer (section 10): the score after keeping `n`
/// features for each basis, on one axes, plus the unablated `baseline` as a dashed grey line.
/// The x axis is logarithmic when the kept counts span more than a factor 30 (points with
/// `n = 0` are then left out).
pub fn draw_ablation_curves(
    stem: &Path,
    layer_name: &str,
    curves: &[Curve],
    baseline: f64,
    y_label: &str,
) -> anyhow::Result<FigureFiles> {
    ensure!(!curves.is_empty(), "no ablation curves to draw");
    ensure!(baseline.is_finite(), "baseline is {baseline}");
    for c in curves {
        ensure!(
            c.n_kept.len() == c.score.len(),
            "curve {}: {} counts for {} scores",
            c.label,
            c.n_kept.len(),
            c.score.len()
        );
        check_finite(&format!("curve {}", c.label), &c.score)?;
    }
    let positive = curves
        .iter()
        .flat_map(|c| c.n_kept.iter())
        .filter(|&&n| n > 0);
    let (lo, hi) = positive.fold((usize::MAX, 0), |(lo, hi), &n| (lo.min(n), hi.max(n)));
    let x_log = hi > 0 && hi as f64 / lo as f64 > 30.0;
    let mut series: Vec<Series> = curves
        .iter()
        .enumerate()
        .map(|(k, c)| {
            let mut points: Vec<(f64, f64)> = c
                .n_kept
                .iter()
                .zip(&c.score)
                .filter(|(&n, _)| !x_log || n > 0)
                .map(|(&n, &v)| (n as f64, v))
                .collect();
            points.sort_by(|a, b| a.0.total_cmp(&b.0));
            Series {
                label: c.label.clone(),
                colour: PALETTE[k % PALETTE.len()],
                width: 2.0,
                markers: points.len() <= 60,
                points,
            }
        })
        .collect();
    let (x0, x1) = series
        .iter()
        .flat_map(|c| c.points.iter().map(|p| p.0))
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), x| {
            (a.min(x), b.max(x))
        });
    ensure!(x0.is_finite(), "the ablation curves have no points");
    // The legend goes in the corner the curves leave empty: a loss falls as features are
    // kept (upper right free), an accuracy rises (lower right free).
    let falling = series
        .first()
        .is_some_and(|c| match (c.points.first(), c.points.last()) {
            (Some(a), Some(b)) => b.1 < a.1,
            _ => false,
        });
    let legend_pos = if falling {
        SeriesLabelPosition::UpperRight
    } else {
        SeriesLabelPosition::LowerRight
    };
    series.push(Series {
        label: format!("unablated ({})", tick(baseline)),
        points: vec![(x0, baseline), (x1, baseline)],
        colour: RGBColor(120, 120, 120),
        width: 1.0,
        markers: false,
    });
    let fig = LineChart {
        title: format!("Node ablation: {layer_name}"),
        x_label: "features kept".into(),
        y_label: y_label.into(),
        x_log,
        y_log: false,
        series,
        legend_pos,
    };
    save(stem, &fig).with_context(|| format!("drawing ablation curves {}", stem.display()))
}

/// Draws importance (eigenvalue, `Lambda`) spectra, one line per `(name, values)`, against the
/// feature index (from 1) on a logarithmic y axis. Values `<= 0` cannot be shown on it and are
/// left out.
pub fn draw_spectra(stem: &Path, series: &[(String, Vec<f64>)]) -> anyhow::Result<FigureFiles> {
    ensure!(!series.is_empty(), "no spectra to draw");
    let mut lines = Vec::new();
    for (k, (name, values)) in series.iter().enumerate() {
        check_finite(&format!("spectrum {name}"), values)?;
        lines.push(Series {
            label: name.clone(),
            points: values
                .iter()
                .enumerate()
                .filter(|(_, &v)| v > 0.0)
                .map(|(i, &v)| ((i + 1) as f64, v))
                .collect(),
            colour: PALETTE[k % PALETTE.len()],
            width: 2.0,
            markers: false,
        });
    }
    ensure!(
        lines.iter().any(|l| !l.points.is_empty()),
        "the spectra have no positive values"
    );
    shade_by_depth(&mut lines);
    let fig = LineChart {
        title: "Feature importance spectra".into(),
        x_label: "feature (by importance)".into(),
        y_label: "importance".into(),
        x_log: false,
        y_log: true,
        series: lines,
        legend_pos: SeriesLabelPosition::UpperRight,
    };
    save(stem, &fig).with_context(|| format!("drawing spectra {}", stem.display()))
}

/// Draws edge-mass curves: for each `(name, edges)` (all entries of an edge matrix, `>= 0`),
/// the fraction of the total edge mass held by the `k` largest edges against `k`, on a
/// logarithmic x axis. Long curves are thinned to about 400 log-spaced points.
pub fn draw_edge_mass(stem: &Path, series: &[(String, Vec<f64>)]) -> anyhow::Result<FigureFiles> {
    ensure!(!series.is_empty(), "no edge-mass curves to draw");
    let mut lines = Vec::new();
    for (k, (name, values)) in series.iter().enumerate() {
        check_finite(&format!("edges {name}"), values)?;
        ensure!(
            values.iter().all(|&v| v >= 0.0),
            "edges {name} has negative entries"
        );
        let mut sorted = values.clone();
        sorted.sort_by(|a, b| b.total_cmp(a));
        let total: f64 = sorted.iter().sum();
        if total <= 0.0 {
            continue;
        }
        let mut acc = 0.0;
        let cumulative: Vec<f64> = sorted
            .iter()
            .map(|v| {
                acc += v;
                acc / total
            })
            .collect();
        let n = cumulative.len();
        let mut keep: Vec<usize> = (0..=400)
            .map(|t| ((n as f64).powf(t as f64 / 400.0).round() as usize).clamp(1, n) - 1)
            .collect();
        keep.dedup();
        lines.push(Series {
            label: name.clone(),
            points: keep
                .iter()
                .map(|&i| ((i + 1) as f64, cumulative[i]))
                .collect(),
            colour: PALETTE[k % PALETTE.len()],
            width: 2.0,
            markers: false,
        });
    }
    ensure!(!lines.is_empty(), "all edge matrices are zero");
    shade_by_depth(&mut lines);
    let fig = LineChart {
        title: "Edge mass".into(),
        x_label: "number of largest edges".into(),
        y_label: "fraction of total edge mass".into(),
        x_log: true,
        y_log: false,
        series: lines,
        legend_pos: SeriesLabelPosition::LowerRight,
    };
    save(stem, &fig).with_context(|| format!("drawing edge mass {}", stem.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::experiments::modularity::{cluster_graph, ModularityOptions};
    use faer::Mat;

    fn demo_view() -> GraphView {
        let d = 30;
        let layer = |name: &str| LayerView {
            name: name.into(),
            importance: (0..d).map(|i| 10.0 / (i + 1) as f64).collect(),
            has_constant: true,
            labels: Some((0..d).map(|i| format!("f{i}")).collect()),
        };
        let e = Mat::from_fn(d, d, |i, j| {
            if (i % 3) == (j % 3) {
                1.0 + (i * j % 7) as f64
            } else {
                0.01
            }
        });
        GraphView {
            layers: vec![layer("a"), layer("b"), layer("c")],
            edges: vec![e.clone(), e],
        }
    }

    #[test]
    fn many_lines_are_shaded_by_depth_with_a_two_entry_legend_per_group() {
        let line = |label: String| Series {
            label,
            points: vec![(1.0, 1.0)],
            colour: INK,
            width: 1.0,
            markers: false,
        };
        let mut few: Vec<Series> = (0..3).map(|k| line(format!("LIB l{k}"))).collect();
        shade_by_depth(&mut few);
        assert!(few.iter().all(|l| l.colour == INK && !l.label.is_empty()));
        let mut lines: Vec<Series> = ["LIB", "PCA"]
            .iter()
            .flat_map(|m| (0..20).map(move |k| format!("{m} l{k}")))
            .map(line)
            .collect();
        shade_by_depth(&mut lines);
        let labelled: Vec<&str> = lines
            .iter()
            .map(|l| l.label.as_str())
            .filter(|l| !l.is_empty())
            .collect();
        assert_eq!(
            labelled,
            [
                "LIB l0 (lightest)",
                "LIB l19 (darkest)",
                "PCA l0 (lightest)",
                "PCA l19 (darkest)"
            ]
        );
        let brightness = |c: RGBColor| c.0 as u32 + c.1 as u32 + c.2 as u32;
        for group in lines.chunks(20) {
            assert!(group
                .windows(2)
                .all(|w| brightness(w[0].colour) > brightness(w[1].colour)));
        }
        assert_ne!(lines[0].colour, lines[20].colour, "one hue per group");
    }

    #[test]
    fn writes_all_figures_as_svg_and_png() {
        let dir = tempfile::tempdir().unwrap();
        let view = demo_view();
        let clusters = cluster_graph(&view, &ModularityOptions::default()).unwrap();
        let mut written = vec![
            draw_interaction_graph(
                &dir.path().join("g"),
                &view,
                Some(&clusters),
                &Default::default(),
            )
            .unwrap(),
            draw_interaction_graph(&dir.path().join("plain"), &view, None, &Default::default())
                .unwrap(),
        ];
        let curve = |label: &str, k: f64| Curve {
            label: label.into(),
            n_kept: vec![0, 1, 2, 4, 8, 16, 32, 64, 128],
            score: (0..9).map(|i| 1.0 - (-(i as f64) / k).exp()).collect(),
        };
        written.push(
            draw_ablation_curves(
                &dir.path().join("abl"),
                "a",
                &[curve("LIB", 1.0), curve("PCA", 3.0)],
                1.0,
                "accuracy",
            )
            .unwrap(),
        );
        let spectra = vec![
            ("a".to_string(), vec![5.0, 1.0, 0.1, 0.0]),
            ("b".to_string(), vec![2.0, 0.5]),
        ];
        written.push(draw_spectra(&dir.path().join("spec"), &spectra).unwrap());
        written.push(draw_edge_mass(&dir.path().join("mass"), &spectra).unwrap());
        for f in written {
            let svg = std::fs::read_to_string(&f.svg).unwrap();
            assert!(
                svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"),
                "{}",
                f.svg.display()
            );
            let png = std::fs::read(&f.png).unwrap();
            assert!(
                png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 1000,
                "{}",
                f.png.display()
            );
        }
        // Only the figures, no temporary files left behind.
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 10);
    }

    #[test]
    fn bad_inputs_are_errors_not_panics() {
        let dir = tempfile::tempdir().unwrap();
        let stem = dir.path().join("x");
        let empty = GraphView {
            layers: vec![],
            edges: vec![],
        };
        assert!(draw_interaction_graph(&stem, &empty, None, &Default::default()).is_err());
        let mut view = demo_view();
        view.edges[0][(1, 1)] = f64::NAN;
        assert!(draw_interaction_graph(&stem, &view, None, &Default::default()).is_err());
        assert!(draw_ablation_curves(&stem, "a", &[], 1.0, "acc").is_err());
        let nan = Curve {
            label: "LIB".into(),
            n_kept: vec![1, 2],
            score: vec![0.5, f64::NAN],
        };
        assert!(draw_ablation_curves(&stem, "a", &[nan], 1.0, "acc").is_err());
        assert!(draw_spectra(&stem, &[]).is_err());
        assert!(draw_spectra(&stem, &[("a".into(), vec![0.0, -1.0])]).is_err());
        assert!(draw_spectra(&stem, &[("a".into(), vec![1.0, f64::NAN])]).is_err());
        assert!(draw_edge_mass(&stem, &[("a".into(), vec![0.0; 4])]).is_err());
        assert!(draw_edge_mass(&stem, &[("a".into(), vec![])]).is_err());
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
    }

    #[test]
    fn png_encoder_writes_valid_chunks() {
        let png = encode_png(&[255; 2 * 3 * 3], 2, 3).unwrap();
        assert_eq!(&png[12..16], b"IHDR");
        assert_eq!(u32::from_be_bytes(png[16..20].try_into().unwrap()), 2);
        assert_eq!(u32::from_be_bytes(png[20..24].try_into().unwrap()), 3);
        assert!(png.ends_with(&[0, 0, 0, 0, b'I', b'E', b'N', b'D', 0xAE, 0x42, 0x60, 0x82]));
    }

    #[test]
    fn ticks_are_short() {
        assert_eq!(tick(3.0), "3");
        assert_eq!(tick(0.25), "0.25");
        assert_eq!(tick(1e-6), "1e-6");
        assert_eq!(tick(0.0), "0");
    }

    #[test]
    fn log_ticks_add_multiples_on_short_axes() {
        let (bold, light) = log_ticks(0.15, 70.0);
        assert_eq!(bold.len(), 8, "{bold:?}"); // 0.2 0.5 1 2 5 10 20 50
        assert!(light.contains(&3.0) && !bold.contains(&3.0));
        let (bold, _) = log_ticks(1.0, 1e6);
        assert_eq!(bold.len(), 7);
    }
}
