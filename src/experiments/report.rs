//! A self-contained HTML report: sections of text, tables and figures in one file, with the
//! styling inline, SVG figures inlined and PNG figures as base64 data URIs, so it opens
//! anywhere without network access or sibling files.

use super::figures::FigureFiles;
use crate::io::write_atomic;
use anyhow::Context;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};

/// A report: a title and its sections, in order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Report {
    /// Title of the page and its top heading.
    pub title: String,
    /// Sections, in order.
    pub sections: Vec<ReportSection>,
}

/// One section: a heading, then paragraphs, tables and figures in that order.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ReportSection {
    /// Section heading.
    pub heading: String,
    /// Paragraphs of plain text (escaped, not markup).
    pub paragraphs: Vec<String>,
    /// Tables.
    pub tables: Vec<Table>,
    /// Figures.
    pub figures: Vec<Figure>,
}

/// A table of plain-text cells; cells that look like numbers are right-aligned.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Table {
    /// Caption above the table.
    pub caption: String,
    /// Column names.
    pub header: Vec<String>,
    /// Rows of cells.
    pub rows: Vec<Vec<String>>,
}

/// A figure and its caption.
#[derive(Clone, Debug, PartialEq)]
pub struct Figure {
    /// Caption below the figure.
    pub caption: String,
    /// The image.
    pub image: FigureImage,
}

/// Where a figure's image comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum FigureImage {
    /// An SVG file, inlined.
    SvgFile(PathBuf),
    /// A PNG file, embedded as a data URI.
    PngFile(PathBuf),
    /// SVG markup, inlined.
    Svg(String),
    /// PNG bytes, embedded as a data URI.
    Png(Vec<u8>),
}

impl Figure {
    /// A figure showing the SVG of figure files written by [`super::figures`].
    pub fn from_files(caption: impl Into<String>, files: &FigureFiles) -> Self {
        Self {
            caption: caption.into(),
            image: FigureImage::SvgFile(files.svg.clone()),
        }
    }
}

const STYLE: &str = r#"
:root { --ink: #222; --muted: #666; --line: #ddd; --accent: #1f5aa0; --zebra: #f6f8fa; }
* { box-sizing: border-box; }
body { margin: 0; background: #fff; color: var(--ink);
  font: 15px/1.55 "DejaVu Sans", "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1100px; margin: 0 auto; padding: 28px 32px 64px; }
h1 { font-size: 28px; margin: 0 0 6px; }
h2 { font-size: 21px; margin: 40px 0 12px; padding-bottom: 4px; border-bottom: 2px solid var(--line); }
p { margin: 0 0 12px; max-width: 80ch; }
nav { margin: 10px 0 24px; padding: 10px 16px; background: var(--zebra); border-radius: 6px; }
nav ol { margin: 0; padding-left: 20px; columns: 2; }
nav a, nav a:visited { color: var(--accent); text-decoration: none; }
nav a:hover { text-decoration: underline; }
table { border-collapse: collapse; margin: 8px 0 22px; font-size: 14px; }
caption { caption-side: top; text-align: left; font-weight: bold; padding-bottom: 6px; }
th, td { padding: 5px 12px; border-bottom: 1px solid var(--line); text-align: left; vertical-align: top; }
th { background: #eef2f7; border-bottom: 2px solid #c8d1dc; }
tbody tr:nth-child(even) { background: var(--zebra); }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 12px 0 28px; padding: 12px; border: 1px solid var(--line); border-radius: 6px; }
figure svg, figure img { display: block; max-width: 100%; height: auto; margin: 0 auto; }
figcaption { margin-top: 8px; color: var(--muted); font-size: 14px; }
.meta { color: var(--muted); font-size: 13px; }
"#;

/// Escapes text for HTML content and attribute values.
pub fn escape_html(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Standard base64 with padding (RFC 4648).
pub(crate) fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for k in 0..4 {
            if k <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * k)) as usize & 63] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// SVG markup ready to inline: any XML declaration or doctype before the `<svg` element is
/// dropped (they are not allowed inside HTML).
fn inline_svg(svg: &str) -> anyhow::Result<&str> {
    let start = svg
        .find("<svg")
        .context("not an SVG document: no <svg> element")?;
    Ok(svg[start..].trim_end())
}

/// Whether a cell reads as a number (for right alignment), e.g. `12`, `-0.5`, `3e-4`, `97.5%`.
fn is_numeric(cell: &str) -> bool {
    let t = cell.trim().trim_end_matches('%');
    !t.is_empty() && t.parse::<f64>().is_ok()
}

fn render_figure(html: &mut String, fig: &Figure) -> anyhow::Result<()> {
    html.push_str("<figure>\n");
    match &fig.image {
        FigureImage::SvgFile(path) => {
            let svg = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read figure {}", path.display()))?;
            html.push_str(inline_svg(&svg).with_context(|| path.display().to_string())?);
        }
        FigureImage::Svg(svg) => html.push_str(inline_svg(svg)?),
        FigureImage::PngFile(path) => {
            let png = std::fs::read(path)
                .with_context(|| format!("cannot read figure {}", path.display()))?;
            push_png(html, &png, &fig.caption);
        }
        FigureImage::Png(png) => push_png(html, png, &fig.caption),
    }
    let _ = write!(
        html,
        "\n<figcaption>{}</figcaption>\n</figure>\n",
        escape_html(&fig.caption)
    );
    Ok(())
}

fn push_png(html: &mut String, png: &[u8], alt: &str) {
    let _ = write!(
        html,
        r#"<img alt="{}" src="data:image/png;base64,{}">"#,
        escape_html(alt),
        base64(png)
    );
}

fn render_table(html: &mut String, table: &Table) {
    html.push_str("<table>\n");
    if !table.caption.is_empty() {
        let _ = writeln!(html, "<caption>{}</caption>", escape_html(&table.caption));
    }
    if !table.header.is_empty() {
        html.push_str("<thead><tr>");
        for h in &table.header {
            let _ = write!(html, "<th>{}</th>", escape_html(h));
        }
        html.push_str("</tr></thead>\n");
    }
    html.push_str("<tbody>\n");
    for row in &table.rows {
        html.push_str("<tr>");
        for cell in row {
            let class = if is_numeric(cell) {
                r#" class="num""#
            } else {
                ""
            };
            let _ = write!(html, "<td{class}>{}</td>", escape_html(cell));
        }
        html.push_str("</tr>\n");
    }
    html.push_str("</tbody>\n</table>\n");
}

/// Renders `report` as one self-contained HTML page.
pub fn render_report(report: &Report) -> anyhow::Result<String> {
    let title = escape_html(&report.title);
    let mut html = String::new();
    let _ = write!(
        html,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{title}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<main>\n<h1>{title}</h1>\n"
    );
    if report.sections.len() > 1 {
        html.push_str("<nav><ol>\n");
        for (i, s) in report.sections.iter().enumerate() {
            let _ = writeln!(
                html,
                "<li><a href=\"#s{i}\">{}</a></li>",
                escape_html(&s.heading)
            );
        }
        html.push_str("</ol></nav>\n");
    }
    for (i, section) in report.sections.iter().enumerate() {
        let _ = writeln!(
            html,
            "<section id=\"s{i}\">\n<h2>{}</h2>",
            escape_html(&section.heading)
        );
        for p in &section.paragraphs {
            let _ = writeln!(html, "<p>{}</p>", escape_html(p));
        }
        for t in &section.tables {
            render_table(&mut html, t);
        }
        for f in &section.figures {
            render_figure(&mut html, f)
                .with_context(|| format!("section {:?}", section.heading))?;
        }
        html.push_str("</section>\n");
    }
    html.push_str("</main>\n</body>\n</html>\n");
    Ok(html)
}

/// Writes `report` to `out` as one self-contained HTML file (atomically).
pub fn write_report(out: &Path, report: &Report) -> anyhow::Result<()> {
    let html = render_report(report)?;
    write_atomic(out, html.as_bytes()).with_context(|| format!("writing report {}", out.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::experiments::figures::{draw_spectra, FigureFiles};

    #[test]
    fn base64_matches_rfc4648_vectors() {
        let cases = [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foobar", "Zm9vYmFy"),
        ];
        for (raw, enc) in cases {
            assert_eq!(base64(raw.as_bytes()), enc);
        }
    }

    #[test]
    fn escapes_text() {
        assert_eq!(
            escape_html(r#"<a href="x">&'"#),
            "&lt;a href=&quot;x&quot;&gt;&amp;&#39;"
        );
    }

    #[test]
    fn report_is_self_contained() {
        let dir = tempfile::tempdir().unwrap();
        let files: FigureFiles = draw_spectra(
            &dir.path().join("spec"),
            &[("l0".into(), vec![3.0, 1.0, 0.2])],
        )
        .unwrap();
        let png = std::fs::read(&files.png).unwrap();
        let report = Report {
            title: "Demo <report>".into(),
            sections: vec![
                ReportSection {
                    heading: "Spectra & more".into(),
                    paragraphs: vec!["Plain text, <b>not bold</b>.".into()],
                    tables: vec![Table {
                        caption: "Numbers".into(),
                        header: vec!["layer".into(), "Q".into()],
                        rows: vec![vec!["l0".into(), "0.42".into()]],
                    }],
                    figures: vec![
                        Figure::from_files("svg spectrum", &files),
                        Figure {
                            caption: "png spectrum".into(),
                            image: FigureImage::PngFile(files.png.clone()),
                        },
                    ],
                },
                ReportSection {
                    heading: "Second".into(),
                    figures: vec![Figure {
                        caption: "bytes".into(),
                        image: FigureImage::Png(png.clone()),
                    }],
                    ..Default::default()
                },
            ],
        };
        let out = dir.path().join("report.html");
        write_report(&out, &report).unwrap();
        let html = std::fs::read_to_string(&out).unwrap();

        assert!(html.contains(inline_svg(&std::fs::read_to_string(&files.svg).unwrap()).unwrap()));
        assert_eq!(html.matches("<svg").count(), 1);
        assert_eq!(
            html.matches(&format!("data:image/png;base64,{}", base64(&png)))
                .count(),
            2
        );
        assert!(
            html.contains("Demo &lt;report&gt;") && html.contains("&lt;b&gt;not bold&lt;/b&gt;")
        );
        assert!(html.contains(r#"<td class="num">0.42</td>"#));
        let mut rest = html.as_str();
        while let Some(at) = rest.find("http") {
            assert!(
                rest[at..].starts_with("http://www.w3.org/"),
                "external URL at {}",
                &rest[at..at + 40]
            );
            rest = &rest[at + 4..];
        }
        assert!(
            !html.contains("src=\"http") && !html.contains("@import") && !html.contains("url(")
        );
    }

    #[test]
    fn missing_figure_is_an_error() {
        let report = Report {
            title: "x".into(),
            sections: vec![ReportSection {
                heading: "s".into(),
                figures: vec![Figure {
                    caption: "gone".into(),
                    image: FigureImage::SvgFile("/nonexistent/x.svg".into()),
                }],
                ..Default::default()
            }],
        };
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("r.html");
        assert!(write_report(&out, &report).is_err());
        assert!(!out.exists());
    }
}
