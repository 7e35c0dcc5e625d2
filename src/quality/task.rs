//! The task score of a toy model trained on a closed caption grammar (`task.json` beside the
//! model, written by `tools/train_toy.py`): does a generated image show the shape colour, the
//! shape kind and the background colour its prompt asked for? No reference model is needed:
//! the images of the task are flat colours, and a small deterministic analysis reads them.
//!
//! How an image is read ([`analyze`]):
//! 1. every pixel is labelled with the nearest palette colour (squared sRGB distance; ties go
//!    to the colour listed first in `task.json`);
//! 2. the **background** is the most common label on the image border (the outermost 2 pixels
//!    on each side; shapes are drawn at least 2 pixels inside it);
//! 3. the **shape colour** is the most common label among the other pixels (at least
//!    [`MIN_SHAPE_FRACTION`] of the image, else there is no shape);
//! 4. the **shape kind** comes from the largest 4-connected region of shape-colour pixels,
//!    by two numbers of its bounding box: the *fill* (region area / box area: 1 for a square,
//!    pi/4 ~ 0.79 for a circle, 1/2 for a triangle) and the *top-heaviness* (area in the top half
//!    of the box / area in the bottom half: ~1/3 for the upright triangles of the task, 1 for a
//!    circle or square). Top-heaviness below [`TRIANGLE_MAX_TOP_RATIO`] is a triangle; else fill
//!    of at least [`SQUARE_MIN_FILL`] is a square; else a circle.
//!
//! A prompt is parsed with the grammar of `task.json` (`a {shape_colour} {shape} on a
//! {background_colour} background`); an image passes when all three attributes match.
//! `tests/task_score.rs` checks it on the training images (all pass) and on noise (chance).

use crate::error::{Error, Result};
use serde::Deserialize;
use std::path::Path;

/// Fewer shape pixels than this fraction of the image: no shape found.
pub const MIN_SHAPE_FRACTION: f64 = 0.02;
/// Top-half / bottom-half area below this: a triangle (upright triangles give 1/3).
pub const TRIANGLE_MAX_TOP_RATIO: f64 = 0.6;
/// Fill of the bounding box at least this (and not a triangle): a square (circles give 0.79).
pub const SQUARE_MIN_FILL: f64 = 0.9;
/// Width of the border the background colour is read from, in pixels.
pub const BORDER_PX: usize = 2;

/// The caption grammar and palette of a toy task (`task.json`).
#[derive(Debug, Clone, Deserialize)]
pub struct TaskSpec {
    /// E.g. `a {shape_colour} {shape} on a {background_colour} background`.
    pub grammar: String,
    /// Colour name → sRGB `[r, g, b]`, in the file's order.
    #[serde(deserialize_with = "ordered_colours")]
    pub colours: Vec<(String, [u8; 3])>,
    /// Shape names: the analysis knows `circle`, `square` and `triangle`.
    pub shapes: Vec<String>,
    /// Side of the square training images, in pixels.
    #[serde(default)]
    pub image_size: Option<usize>,
}

fn ordered_colours<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Vec<(String, [u8; 3])>, D::Error> {
    struct V;
    impl<'de> serde::de::Visitor<'de> for V {
        type Value = Vec<(String, [u8; 3])>;
        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("an object of colour name -> [r, g, b]")
        }
        fn visit_map<A: serde::de::MapAccess<'de>>(
            self,
            mut m: A,
        ) -> std::result::Result<Self::Value, A::Error> {
            let mut v = Vec::new();
            while let Some((k, rgb)) = m.next_entry::<String, [u8; 3]>()? {
                v.push((k, rgb));
            }
            Ok(v)
        }
    }
    d.deserialize_map(V)
}

/// What a prompt asks for, as indices into the spec's colours and shapes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scene {
    pub shape_colour: usize,
    pub shape: usize,
    pub background: usize,
}

/// What [`analyze`] read from an image.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reading {
    pub background: usize,
    /// `None`: no shape pixels (or too few).
    pub shape_colour: Option<usize>,
    /// `None`: no shape, or a shape name the analysis does not know.
    pub shape: Option<usize>,
    /// Region area / bounding-box area.
    pub fill: f64,
    /// Region area in the top half of its box / in the bottom half.
    pub top_ratio: f64,
}

/// Per-attribute and overall verdict of one image against its prompt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Verdict {
    pub shape_colour: bool,
    pub shape: bool,
    pub background: bool,
}

impl Verdict {
    /// All three attributes match.
    pub fn pass(&self) -> bool {
        self.shape_colour && self.shape && self.background
    }
}

impl TaskSpec {
    /// Reads `task.json` of a model folder; `Ok(None)` when there is none.
    pub fn from_model_dir(dir: &Path) -> Result<Option<Self>> {
        let path = dir.join("task.json");
        if !path.exists() {
            return Ok(None);
        }
        let text = std::fs::read_to_string(&path).map_err(|e| Error::io(&path, e))?;
        Self::from_json_str(&text).map(Some).map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))
    }

    pub fn from_json_str(text: &str) -> Result<Self> {
        let spec: TaskSpec =
            serde_json::from_str(text).map_err(|e| Error::Invalid(format!("invalid task.json ({e})")))?;
        for key in ["{shape_colour}", "{shape}", "{background_colour}"] {
            if !spec.grammar.contains(key) {
                return Err(Error::Invalid(format!("task.json: grammar {:?} lacks {key}", spec.grammar)));
            }
        }
        if spec.colours.len() < 2 || spec.shapes.is_empty() {
            return Err(Error::Invalid("task.json: needs at least 2 colours and 1 shape".into()));
        }
        Ok(spec)
    }

    /// The caption of a scene.
    pub fn caption(&self, s: &Scene) -> String {
        self.grammar
            .replace("{shape_colour}", &self.colours[s.shape_colour].0)
            .replace("{shape}", &self.shapes[s.shape])
            .replace("{background_colour}", &self.colours[s.background].0)
    }

    /// Every scene of the grammar (shape colour differs from background), in a fixed order.
    pub fn all_scenes(&self) -> Vec<Scene> {
        let n = self.colours.len();
        let mut v = Vec::new();
        for background in 0..n {
            for shape_colour in 0..n {
                for shape in 0..self.shapes.len() {
                    if shape_colour != background {
                        v.push(Scene { shape_colour, shape, background });
                    }
                }
            }
        }
        v
    }

    /// The scene a prompt asks for, if it follows the grammar (case and surrounding space
    /// ignored).
    pub fn parse(&self, prompt: &str) -> Option<Scene> {
        let p = prompt.trim().to_lowercase();
        self.all_scenes().into_iter().find(|s| self.caption(s).to_lowercase() == p)
    }

    fn nearest(&self, px: &[u8]) -> usize {
        let mut best = (u32::MAX, 0);
        for (i, (_, c)) in self.colours.iter().enumerate() {
            let d: u32 = (0..3).map(|k| (px[k] as i32 - c[k] as i32).pow(2) as u32).sum();
            if d < best.0 {
                best = (d, i);
            }
        }
        best.1
    }
}

/// Reads background colour, shape colour and shape kind from interleaved RGB8 pixels
/// (`rgb.len() == 3 * width * height`). See the module documentation for the rules.
pub fn analyze(spec: &TaskSpec, width: usize, height: usize, rgb: &[u8]) -> Result<Reading> {
    if width <= 2 * BORDER_PX || height <= 2 * BORDER_PX || rgb.len() != 3 * width * height {
        return Err(Error::Shape(format!(
            "task score: expected {width}x{height} RGB8 pixels larger than the {BORDER_PX}-pixel border, got {} bytes",
            rgb.len()
        )));
    }
    let n = spec.colours.len();
    let labels: Vec<usize> = rgb.chunks_exact(3).map(|p| spec.nearest(p)).collect();
    let argmax =
        |counts: &[usize]| counts.iter().enumerate().max_by_key(|(i, &c)| (c, usize::MAX - i)).map(|x| x.0);

    let mut border = vec![0usize; n];
    for y in 0..height {
        for x in 0..width {
            let edge = x < BORDER_PX || y < BORDER_PX || x >= width - BORDER_PX || y >= height - BORDER_PX;
            if edge {
                border[labels[y * width + x]] += 1;
            }
        }
    }
    let background = argmax(&border).unwrap_or(0);
    let mut others = vec![0usize; n];
    labels.iter().filter(|&&l| l != background).for_each(|&l| others[l] += 1);
    let shape_px: usize = others.iter().sum();
    let mut reading = Reading { background, shape_colour: None, shape: None, fill: 0.0, top_ratio: 0.0 };
    if (shape_px as f64) < MIN_SHAPE_FRACTION * (width * height) as f64 {
        return Ok(reading);
    }
    let colour = argmax(&others).unwrap_or(0);
    reading.shape_colour = Some(colour);

    // Largest 4-connected region of the shape colour.
    let mut region = vec![u32::MAX; width * height];
    let (mut best_id, mut best_size) = (u32::MAX, 0usize);
    let mut stack = Vec::new();
    let mut id = 0u32;
    for start in 0..width * height {
        if labels[start] != colour || region[start] != u32::MAX {
            continue;
        }
        let mut size = 0;
        region[start] = id;
        stack.push(start);
        while let Some(p) = stack.pop() {
            size += 1;
            let (x, y) = (p % width, p / width);
            let mut visit = |q: usize| {
                if labels[q] == colour && region[q] == u32::MAX {
                    region[q] = id;
                    stack.push(q);
                }
            };
            if x > 0 {
                visit(p - 1);
            }
            if x + 1 < width {
                visit(p + 1);
            }
            if y > 0 {
                visit(p - width);
            }
            if y + 1 < height {
                visit(p + width);
            }
        }
        if size > best_size {
            (best_id, best_size) = (id, size);
        }
        id += 1;
    }
    let (mut x0, mut y0, mut x1, mut y1) = (usize::MAX, usize::MAX, 0, 0);
    for (p, &r) in region.iter().enumerate() {
        if r == best_id {
            let (x, y) = (p % width, p / width);
            (x0, y0, x1, y1) = (x0.min(x), y0.min(y), x1.max(x), y1.max(y));
        }
    }
    let (bw, bh) = (x1 - x0 + 1, y1 - y0 + 1);
    reading.fill = best_size as f64 / (bw * bh) as f64;
    // Top half: rows strictly above the box's middle line; an odd middle row counts half each way.
    let (mut top, mut bottom) = (0.0f64, 0.0f64);
    for (p, &r) in region.iter().enumerate() {
        if r == best_id {
            let y2 = 2 * (p / width - y0) + 1; // twice the row centre's offset from the box top
            match y2.cmp(&bh) {
                std::cmp::Ordering::Less => top += 1.0,
                std::cmp::Ordering::Greater => bottom += 1.0,
                std::cmp::Ordering::Equal => {
                    top += 0.5;
                    bottom += 0.5
                }
            }
        }
    }
    reading.top_ratio = if bottom > 0.0 { top / bottom } else { f64::INFINITY };
    let kind = if reading.top_ratio < TRIANGLE_MAX_TOP_RATIO {
        "triangle"
    } else if reading.fill >= SQUARE_MIN_FILL {
        "square"
    } else {
        "circle"
    };
    reading.shape = spec.shapes.iter().position(|s| s == kind);
    Ok(reading)
}

/// The verdict of an image against the scene its prompt asked for.
pub fn judge(spec: &TaskSpec, scene: &Scene, width: usize, height: usize, rgb: &[u8]) -> Result<Verdict> {
    let r = analyze(spec, width, height, rgb)?;
    Ok(Verdict {
        shape_colour: r.shape_colour == Some(scene.shape_colour),
        shape: r.shape_colour.is_some() && r.shape == Some(scene.shape),
        background: r.background == scene.background,
    })
}

/// Renders a training-style image (the geometry of `tools/train_toy.py`): a filled shape of
/// extent `size` pixels (circle diameter, square side, triangle base = height) centred at
/// `(cx, cy)`, plain palette colours, no anti-aliasing. For tests and checks of the analysis.
pub fn render_scene(spec: &TaskSpec, scene: &Scene, side: usize, size: f64, cx: f64, cy: f64) -> Vec<u8> {
    let h = size / 2.0;
    let mut out = Vec::with_capacity(3 * side * side);
    for y in 0..side {
        for x in 0..side {
            let (px, py) = (x as f64 + 0.5, y as f64 + 0.5);
            let inside = match spec.shapes[scene.shape].as_str() {
                "circle" => (px - cx).powi(2) + (py - cy).powi(2) <= h * h,
                "square" => (px - cx).abs() <= h && (py - cy).abs() <= h,
                _ => {
                    let top = cy - h;
                    py >= top && py <= cy + h && (px - cx).abs() <= (py - top) / 2.0
                }
            };
            let c = if inside { scene.shape_colour } else { scene.background };
            out.extend_from_slice(&spec.colours[c].1);
        }
    }
    out
}
