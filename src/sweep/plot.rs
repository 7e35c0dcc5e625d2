//! The sweep's pictures: `curves.png` (each measure against sparsity, one line per component
//! and method) and `grid.png` (rows = points, columns = prompts at seed 0), drawn with plotters
//! on its bitmap backend. Text needs a TrueType font: the first of [`FONT_CANDIDATES`] found
//! on the machine (or the file named by `SDSPARSE_FONT`); without one the pictures are drawn
//! without text and a note says so.

use super::{image_name, PointResult, SweepResults};
use crate::error::{Error, Result};
use plotters::prelude::*;
use std::path::Path;
use std::sync::OnceLock;

/// Where a sans-serif TrueType font usually is (Debian/Ubuntu, Fedora, Arch, macOS, Windows).
pub const FONT_CANDIDATES: [&str; 7] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/truetype/liberation/LiberationSans-Regular.ttf",
    "/usr/share/fonts/liberation-sans/LiberationSans-Regular.ttf",
    "/System/Library/Fonts/Supplemental/Arial.ttf",
    "C:\\Windows\\Fonts\\arial.ttf",
];

/// Registers a system font with plotters once; whether text can be drawn.
pub fn fonts_available() -> bool {
    static OK: OnceLock<bool> = OnceLock::new();
    *OK.get_or_init(|| {
        let env = std::env::var("SDSPARSE_FONT").ok();
        for path in env.iter().map(String::as_str).chain(FONT_CANDIDATES) {
            if let Ok(bytes) = std::fs::read(path) {
                // plotters keeps fonts for the life of the program.
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return true;
                }
            }
        }
        eprintln!("note: no TrueType font found (set SDSPARSE_FONT=/path/to/font.ttf); plots have no text");
        false
    })
}

fn perr<E: std::fmt::Display>(path: &Path) -> impl Fn(E) -> Error + '_ {
    move |e| Error::Msg(format!("{}: cannot draw: {e}", path.display()))
}

/// The line a point belongs to: component and method, plus scope, pattern and convolutions
/// when the results mix several.
pub fn series_label(results: &SweepResults, p: &PointResult) -> String {
    let pruned: Vec<&PointResult> = results.points.iter().filter(|q| q.target.is_some()).collect();
    let varies = |f: &dyn Fn(&PointResult) -> String| pruned.iter().any(|q| f(q) != f(pruned[0]));
    let mut s = format!("{} {}", p.target.map(|t| t.name()).unwrap_or("dense"), p.method);
    if varies(&|q| q.scope.clone()) {
        s += &format!(" {}", p.scope);
    }
    if varies(&|q| q.pattern.clone()) {
        s += &format!(" {}", p.pattern);
    }
    if varies(&|q| q.include_conv.to_string()) && p.include_conv {
        s += " +conv";
    }
    s
}

/// The series of the results: `(label, points sorted by sparsity)`, the dense point first in
/// each (as sparsity 0) unless the series has its own 0.
pub fn series(results: &SweepResults) -> Vec<(String, Vec<&PointResult>)> {
    let dense = results.points.iter().find(|p| p.target.is_none());
    let mut out: Vec<(String, Vec<&PointResult>)> = Vec::new();
    for p in results.points.iter().filter(|p| p.target.is_some()) {
        let label = series_label(results, p);
        match out.iter_mut().find(|(l, _)| *l == label) {
            Some((_, v)) => v.push(p),
            None => out.push((label, vec![p])),
        }
    }
    for (_, v) in &mut out {
        v.sort_by(|a, b| a.sparsity.total_cmp(&b.sparsity));
        if let Some(d) = dense {
            if v.first().is_none_or(|p| p.sparsity > 0.0) {
                v.insert(0, d);
            }
        }
    }
    out
}

/// Draws `curves.png`: task score (with a task), SSIM, PSNR and latent relative error
/// against target sparsity.
pub fn curves(results: &SweepResults, path: &Path) -> Result<()> {
    let text = fonts_available();
    let mut measures: Vec<Measure> = Vec::new();
    if results.has_task {
        measures.push(("task score (colour, shape, background right)", |p| p.task_score));
    }
    measures.push(("SSIM vs dense", |p| Some(p.ssim)));
    // Identical images (the dense point, sparsity 0) have no finite PSNR: left out of the plot.
    measures.push(("PSNR vs dense (dB)", |p| (p.psnr_db < super::PSNR_CAP_DB).then_some(p.psnr_db)));
    measures.push(("latent relative error vs dense", |p| Some(p.latent_rel_err)));
    let (w, h) = (1200u32, 900u32);
    let mut buf = image::RgbImage::new(w, h);
    draw_curves(results, &mut buf, path, &measures, text)?;
    save_png(&buf, path)
}

type Measure = (&'static str, fn(&PointResult) -> Option<f64>);

fn draw_curves(
    results: &SweepResults,
    buf: &mut image::RgbImage,
    path: &Path,
    measures: &[Measure],
    text: bool,
) -> Result<()> {
    let all = series(results);
    let xmax = results.points.iter().map(|p| p.sparsity).fold(0.5f64, f64::max).min(1.0);
    let (w, h) = buf.dimensions();
    let raw: &mut [u8] = buf;
    let root = BitMapBackend::with_buffer(raw, (w, h)).into_drawing_area();
    root.fill(&WHITE).map_err(perr(path))?;
    let panels = root.split_evenly((2, 2));
    for ((title, get), area) in measures.iter().zip(panels.iter()) {
        let values: Vec<f64> = all.iter().flat_map(|(_, v)| v.iter().filter_map(|p| get(p))).collect();
        let (mut lo, mut hi) =
            values.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &v| (a.min(v), b.max(v)));
        if !lo.is_finite() {
            (lo, hi) = (0.0, 1.0);
        }
        if title.starts_with("task") || title.starts_with("SSIM") {
            (lo, hi) = (lo.min(0.0), hi.max(1.0));
        }
        let pad = ((hi - lo) * 0.05).max(1e-6);
        let mut builder = ChartBuilder::on(area);
        builder.margin(12);
        if text {
            builder.caption(*title, ("sans-serif", 18)).x_label_area_size(36).y_label_area_size(56);
        }
        let mut chart = builder.build_cartesian_2d(0.0..xmax, (lo - pad)..(hi + pad)).map_err(perr(path))?;
        if text {
            chart
                .configure_mesh()
                .x_desc("target sparsity")
                .light_line_style(WHITE.mix(0.0))
                .draw()
                .map_err(perr(path))?;
        }
        for (i, (label, pts)) in all.iter().enumerate() {
            let colour = Palette99::pick(i).to_rgba();
            let line: Vec<(f64, f64)> = pts.iter().filter_map(|p| get(p).map(|v| (p.sparsity, v))).collect();
            let s = chart
                .draw_series(LineSeries::new(line.clone(), colour.stroke_width(2)))
                .map_err(perr(path))?;
            if text {
                s.label(label.clone()).legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(2))
                });
            }
            chart
                .draw_series(line.iter().map(|&(x, y)| Circle::new((x, y), 3, colour.filled())))
                .map_err(perr(path))?;
        }
        if text && !all.is_empty() {
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .position(SeriesLabelPosition::LowerLeft)
                .label_font(("sans-serif", 13))
                .draw()
                .map_err(perr(path))?;
        }
    }
    root.present().map_err(perr(path))?;
    Ok(())
}

/// Saves through a temporary name, renamed when complete.
fn save_png(buf: &image::RgbImage, path: &Path) -> Result<()> {
    let tmp = path.with_extension("png.tmp");
    buf.save_with_format(&tmp, image::ImageFormat::Png)
        .map_err(|e| Error::Msg(format!("{}: {e}", path.display())))?;
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Draws `grid.png`: one row per point (dense first, then each series by sparsity), one
/// column per prompt (seed 0, at most `MAX_COLUMNS`), cells of 128 pixels, each row
/// labelled with its point (and task score) and each column with its prompt (two lines at most).
pub fn grid(results: &SweepResults, out: &Path, path: &Path) -> Result<()> {
    const MAX_COLUMNS: usize = 10;
    const MAX_ROWS: usize = 200;
    let text = fonts_available();
    let mut rows: Vec<(String, &PointResult)> = Vec::new();
    if let Some(d) = results.points.iter().find(|p| p.target.is_none()) {
        rows.push(("dense".into(), d));
    }
    for (label, pts) in series(results) {
        for p in pts.into_iter().filter(|p| p.target.is_some()) {
            rows.push((format!("{label} {:.3}", p.sparsity), p));
        }
    }
    rows.truncate(MAX_ROWS);
    let cols = results.prompts.len().min(MAX_COLUMNS);
    if rows.is_empty() || cols == 0 {
        return Ok(());
    }
    // The first row's images must be readable (a grid without them is an error, not blank).
    image::open(out.join(&rows[0].1.image_dir).join(image_name(0, 0)))
        .map_err(|e| Error::Msg(format!("grid: cannot read the dense images ({e})")))?;
    // 128 pixels whatever the image size (the toy's 64 px images are scaled up), room for the
    // prompt above each column.
    let cell = 128u32;
    let (label_w, head_h) = if text { (230, 36) } else { (0, 0) };
    let (w, h) = (label_w + cols as u32 * (cell + 2), head_h + rows.len() as u32 * (cell + 2));
    let mut buf = image::RgbImage::from_pixel(w, h, image::Rgb([255, 255, 255]));
    for (r, (_, p)) in rows.iter().enumerate() {
        for c in 0..cols {
            let file = out.join(&p.image_dir).join(image_name(c, 0));
            let Ok(img) = image::open(&file) else { continue };
            let img =
                image::imageops::resize(&img.to_rgb8(), cell, cell, image::imageops::FilterType::Triangle);
            image::imageops::replace(
                &mut buf,
                &img,
                (label_w + c as u32 * (cell + 2)) as i64,
                (head_h + r as u32 * (cell + 2)) as i64,
            );
        }
    }
    if text {
        let (bw, bh) = (buf.width(), buf.height());
        let raw: &mut [u8] = &mut buf;
        let root = BitMapBackend::with_buffer(raw, (bw, bh)).into_drawing_area();
        // About 6 pixels per character at 11 px.
        let per_line = (cell as usize / 6).max(4);
        for (c, prompt) in results.prompts.iter().take(cols).enumerate() {
            let x = (label_w + c as u32 * (cell + 2)) as i32 + 2;
            for (i, line) in wrap_two_lines(prompt, per_line).iter().enumerate() {
                root.draw(&Text::new(line.clone(), (x, 3 + 15 * i as i32), ("sans-serif", 11)))
                    .map_err(perr(path))?;
            }
        }
        for (r, (label, p)) in rows.iter().enumerate() {
            let y = (head_h + r as u32 * (cell + 2) + cell / 2) as i32 - 8;
            let score = p.task_score.map(|s| format!("  task {s:.2}")).unwrap_or_default();
            root.draw(&Text::new(format!("{label}{score}"), (4, y), ("sans-serif", 13)))
                .map_err(perr(path))?;
        }
        root.present().map_err(perr(path))?;
    }
    save_png(&buf, path)
}

/// `text` in at most two lines of at most `width` characters, broken at spaces; what does not
/// fit ends in "...".
fn wrap_two_lines(text: &str, width: usize) -> Vec<String> {
    let mut lines: Vec<String> = vec![String::new()];
    for word in text.split_whitespace() {
        let count = lines.len();
        let line = lines.last_mut().expect("one line at least");
        if line.is_empty() || line.len() + 1 + word.len() <= width {
            if !line.is_empty() {
                line.push(' ');
            }
            line.push_str(word);
        } else if count < 2 {
            lines.push(word.to_string());
        } else {
            line.push_str(" ...");
            break;
        }
    }
    for line in &mut lines {
        if line.chars().count() > width {
            *line = line.chars().take(width.saturating_sub(3)).collect::<String>() + "...";
        }
    }
    lines
}

/// The demo's picture: `rows` of images (each row the same prompts), each image scaled up to
/// at least 192 pixels (nearest neighbour, so the pixels stay visible), a label left of each
/// row, the prompt above each column and `marks[row][col]` (e.g. the task verdict) below each
/// image. Without a font the same layout is drawn without text.
pub fn side_by_side(
    rows: &[Vec<image::RgbImage>],
    row_labels: &[String],
    prompts: &[String],
    marks: &[Vec<String>],
) -> Result<image::RgbImage> {
    let text = fonts_available();
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let side = rows.iter().flatten().map(|i| i.width().max(i.height())).max().unwrap_or(64);
    let scale = 192u32.div_ceil(side).max(1);
    let cell = side * scale;
    let (label_w, head_h, foot_h, gap) = if text { (150u32, 40u32, 22u32, 10u32) } else { (0, 0, 0, 10) };
    let w = label_w + cols as u32 * (cell + gap) + gap;
    let h = head_h + rows.len() as u32 * (cell + foot_h + gap) + gap;
    let mut buf = image::RgbImage::from_pixel(w, h, image::Rgb([255, 255, 255]));
    let x_of = |c: usize| label_w + gap + c as u32 * (cell + gap);
    let y_of = |r: usize| head_h + gap + r as u32 * (cell + foot_h + gap);
    for (r, row) in rows.iter().enumerate() {
        for (c, img) in row.iter().enumerate() {
            let big = image::imageops::resize(
                img,
                img.width() * scale,
                img.height() * scale,
                image::imageops::FilterType::Nearest,
            );
            image::imageops::replace(&mut buf, &big, x_of(c) as i64, y_of(r) as i64);
        }
    }
    if text {
        let raw: &mut [u8] = &mut buf;
        let root = BitMapBackend::with_buffer(raw, (w, h)).into_drawing_area();
        let err = |e: DrawingAreaErrorKind<_>| Error::Msg(format!("demo picture: cannot draw: {e}"));
        for (c, p) in prompts.iter().enumerate().take(cols) {
            // Two lines: "a red circle" / "on a blue background".
            let (a, b) = match p.find(" on ") {
                Some(i) => (&p[..i], &p[i + 1..]),
                None => (p.as_str(), ""),
            };
            for (k, line) in [a, b].iter().enumerate() {
                root.draw(&Text::new(
                    line.to_string(),
                    (x_of(c) as i32, 4 + 17 * k as i32),
                    ("sans-serif", 14),
                ))
                .map_err(err)?;
            }
        }
        for (r, label) in row_labels.iter().enumerate() {
            // Wrapped at spaces into lines of about 20 characters.
            let mut lines = vec![String::new()];
            for word in label.split(' ') {
                if lines.last().is_some_and(|l| l.len() + word.len() > 20) {
                    lines.push(String::new());
                }
                let l = lines.last_mut().expect("one line");
                if !l.is_empty() {
                    l.push(' ');
                }
                l.push_str(word);
            }
            for (k, line) in lines.iter().enumerate() {
                let y = (y_of(r) + cell / 2) as i32 - 10 + 17 * k as i32;
                root.draw(&Text::new(line.clone(), (6, y), ("sans-serif", 15))).map_err(err)?;
            }
            for (c, m) in marks.get(r).into_iter().flatten().enumerate() {
                let colour = if m == "right" { RGBColor(0, 120, 0) } else { RGBColor(190, 0, 0) };
                let style = TextStyle::from(("sans-serif", 14).into_font()).color(&colour);
                root.draw(&Text::new(m.clone(), (x_of(c) as i32, (y_of(r) + cell + 3) as i32), style))
                    .map_err(err)?;
            }
        }
        root.present().map_err(err)?;
    }
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::wrap_two_lines;

    #[test]
    fn prompts_wrap_into_two_lines() {
        assert_eq!(wrap_two_lines("a red circle", 20), ["a red circle"]);
        assert_eq!(
            wrap_two_lines("a red circle on a blue background", 20),
            ["a red circle on a", "blue background"]
        );
        let long = wrap_two_lines("a photograph of an astronaut riding a horse on the moon", 20);
        assert_eq!(long.len(), 2);
        assert!(long.iter().all(|l| l.chars().count() <= 20), "{long:?}");
        assert!(long[1].ends_with("..."), "{long:?}");
        // One word longer than a line is cut.
        assert_eq!(wrap_two_lines("supercalifragilistic", 10), ["superca..."]);
    }
}
