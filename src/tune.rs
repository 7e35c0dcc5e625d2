//! Self-checking dispatch of the sparse GEMM kernels: which kernel variant runs each shape
//! class on this GPU, decided by measurement instead of a table written without a GPU.
//!
//! On first use of a shape class ([`ShapeClass`]: kernel family, M rounded up to a power of two,
//! N, K) on a GPU, every candidate variant runs once on random data and is compared element-wise
//! with cuBLAS on the decompressed weight (`test_util::check_close`, the T1 bound of
//! `../shared/notes/kernel-review.md`: norm <= 2e-3 and every element within
//! 1e-2 (|ref| + rms)). A variant that disagrees is never chosen (one line says so); the fastest
//! agreeing one (CUDA events) is; when none agrees the class falls back to decompress + cuBLAS
//! ([`Choice::Dense`]), also said in one line. The GPU side is behind [`KernelProbe`] so the
//! decision logic is tested on the host with fakes.
//!
//! Choices are cached per GPU model, driver version and kernel build ([`GpuKey`]) in
//! `$XDG_CACHE_HOME/sdsparse/dispatch.json` (else `~/.cache/sdsparse/dispatch.json`;
//! `SDSPARSE_TUNE_CACHE` overrides the path), written to a temporary name and renamed. A corrupt
//! file is ignored with a note (and replaced by the next save), never a panic. `generate
//! --retune` ([`set_retune`]) measures again; `SDSPARSE_TUNE=off` skips the check and uses the
//! first candidate (the static heuristic) for every class.

use crate::error::{Error, Result};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};

/// Version of the cache file's layout; a file with another version is ignored (with a note).
/// (2: classes carry their fused epilogue, [`EpilogueClass`].)
pub const CACHE_FORMAT: u32 = 2;

/// Norm-wise and element-wise bounds of the first-use check (kernel review T1).
pub use crate::backend::test_util::{GPU_ELEM_TOL, GPU_NORM_TOL};

/// The sparse kernel families that have variants to choose from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// 2:4 `mma.sp` / `wgmma.sp` kernels (`cuda/sparse24_gemm.cu`).
    Sparse24,
    /// Tiled-bitmap kernels (`cuda/unstructured_gemm.cu`).
    Unstructured,
}

/// The fused epilogue a kernel launch runs besides the bias (`y = act(x·Wᵀ + b) + residual`).
///
/// Part of the [`ShapeClass`] key, and the first-use check runs the candidates with exactly
/// these flags (plus a bias) against cuBLAS followed by the separate ops: the epilogue is the
/// kernels' own code, and not one path — the GEGLU epilogue reads value and gate rows in pairs
/// from the staged tile (a layout that depends on each variant's tile), and the residual is a
/// second f16 load with its own vector path. A check without them would vouch for code that
/// the fused layers do not run. The cost is one more check for the few (N, K) shapes that run
/// two epilogues (a class is measured once per GPU and cached).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct EpilogueClass {
    /// Exact (erf) GELU after the bias.
    pub gelu: bool,
    /// GEGLU on a row-interleaved 2:4 weight (`sparse24::geglu_interleave`): output `N / 2`.
    pub geglu: bool,
    /// An f16 residual added last.
    pub residual: bool,
}

/// A GEMM `y[M, N] = x[M, K] · W[N, K]ᵀ` as far as the dispatch cares: the family, M rounded
/// up to a power of two (M varies with batch and image size; the tile choice follows its
/// magnitude), the weight's exact N and K, and the fused epilogue ([`EpilogueClass`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct ShapeClass {
    pub family: Family,
    /// `M.next_power_of_two()`.
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub epilogue: EpilogueClass,
}

impl ShapeClass {
    /// A class without fused activation or residual (bias only).
    pub fn new(family: Family, m: usize, n: usize, k: usize) -> ShapeClass {
        ShapeClass { family, m: m.max(1).next_power_of_two(), n, k, epilogue: EpilogueClass::default() }
    }

    /// The same shape with the fused epilogue `epilogue`.
    pub fn with_epilogue(self, epilogue: EpilogueClass) -> ShapeClass {
        ShapeClass { epilogue, ..self }
    }
}

impl std::fmt::Display for ShapeClass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let fam = match self.family {
            Family::Sparse24 => "2:4",
            Family::Unstructured => "unstructured",
        };
        write!(f, "{fam} GEMM [M <= {}, N {}, K {}]", self.m, self.n, self.k)?;
        let e = self.epilogue;
        for (on, name) in [(e.gelu, "GELU"), (e.geglu, "GEGLU"), (e.residual, "residual")] {
            if on {
                write!(f, " + {name}")?;
            }
        }
        Ok(())
    }
}

/// What runs a shape class.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Choice {
    /// The named kernel variant (as [`KernelProbe::candidates`] names it).
    Kernel(String),
    /// Decompress the weight once and multiply with cuBLAS (no variant agreed with it).
    Dense,
}

/// The GPU a cached choice holds for: model name, driver version (`cuDriverGetVersion`) and the
/// kernel build (CRC-32 of the embedded fatbin, so rebuilt kernels are measured again).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct GpuKey {
    pub gpu: String,
    pub driver: i32,
    pub kernels: String,
}

/// One candidate's result: its element-wise check against cuBLAS (`Ok(norm error)` or the
/// first violation) and, when it agreed, its time per call in milliseconds.
#[derive(Debug, Clone, PartialEq)]
pub struct Measurement {
    pub candidate: String,
    pub check: std::result::Result<f64, String>,
    pub ms: Option<f64>,
}

/// The GPU side of a first-use check, for one shape class and one weight: random input,
/// cuBLAS reference, candidate runs and timings. Implemented on the GPU by `sparse_linear`;
/// tests inject fakes.
pub trait KernelProbe {
    /// Variants to try, the static heuristic's guess first (it wins ties).
    fn candidates(&self) -> Vec<String>;
    /// cuBLAS on the decompressed weight for the probe's random input (f32, `[M, N]`).
    fn reference(&mut self) -> Result<Vec<f32>>;
    /// The candidate's output for the same input.
    fn run(&mut self, candidate: &str) -> Result<Vec<f32>>;
    /// Milliseconds per call (CUDA events over a few calls after a warm-up).
    fn time_ms(&mut self, candidate: &str) -> Result<f64>;
}

/// Checks every candidate against the reference and times the ones that agree. A candidate
/// whose launch fails counts as disagreeing (its error is the reason).
pub fn measure(probe: &mut dyn KernelProbe) -> Result<Vec<Measurement>> {
    let reference = probe.reference()?;
    let mut out = Vec::new();
    for candidate in probe.candidates() {
        let check = match probe.run(&candidate) {
            Ok(y) => crate::backend::test_util::check_close(&y, &reference, GPU_NORM_TOL, GPU_ELEM_TOL),
            Err(e) => Err(format!("failed: {e}")),
        };
        let ms = match &check {
            Ok(_) => Some(probe.time_ms(&candidate)?),
            Err(_) => None,
        };
        out.push(Measurement { candidate, check, ms });
    }
    Ok(out)
}

/// The fastest candidate that agreed (the earlier one on a tie); [`Choice::Dense`] when none
/// did. A disagreeing candidate is never chosen, however fast.
pub fn decide(measurements: &[Measurement]) -> Choice {
    let mut best: Option<(&str, f64)> = None;
    for m in measurements {
        if let (Ok(_), Some(ms)) = (&m.check, m.ms) {
            if ms.is_finite() && best.is_none_or(|(_, b)| ms < b) {
                best = Some((&m.candidate, ms));
            }
        }
    }
    match best {
        Some((name, _)) => Choice::Kernel(name.to_string()),
        None => Choice::Dense,
    }
}

/// One line per finding of a check: each disagreeing variant, and the dense fallback.
pub fn notes(class: &ShapeClass, measurements: &[Measurement], choice: &Choice) -> Vec<String> {
    let mut notes: Vec<String> = measurements
        .iter()
        .filter_map(|m| {
            m.check.as_ref().err().map(|why| {
                format!("sparse kernel {} disagrees with cuBLAS on {class} ({why}); not used", m.candidate)
            })
        })
        .collect();
    if *choice == Choice::Dense {
        notes.push(format!(
            "no sparse kernel variant agrees with cuBLAS on {class}: those layers run decompressed + cuBLAS"
        ));
    }
    notes
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct CacheEntry {
    gpu: GpuKey,
    class: ShapeClass,
    choice: Choice,
    /// The chosen variant's time per call when measured (information only).
    #[serde(default)]
    ms: Option<f64>,
}

#[derive(Debug, Serialize, Deserialize)]
struct CacheFile {
    format: u32,
    entries: Vec<CacheEntry>,
}

/// The tuned choices of every GPU this user ran on (the cache file's content).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TuneCache {
    entries: Vec<CacheEntry>,
}

impl TuneCache {
    /// `SDSPARSE_TUNE_CACHE`, else `$XDG_CACHE_HOME/sdsparse/dispatch.json`, else
    /// `$HOME/.cache/sdsparse/dispatch.json`; `None` when neither variable is set.
    pub fn default_path() -> Option<PathBuf> {
        let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty()).map(PathBuf::from);
        if let Some(p) = var("SDSPARSE_TUNE_CACHE") {
            return Some(p);
        }
        var("XDG_CACHE_HOME")
            .or_else(|| var("HOME").map(|h| h.join(".cache")))
            .map(|d| d.join("sdsparse").join("dispatch.json"))
    }

    /// Reads `path`. A missing file is an empty cache; an unreadable, corrupt or other-format
    /// file is an empty cache plus a one-line note saying it is ignored.
    pub fn load(path: &Path) -> (TuneCache, Option<String>) {
        let bytes = match std::fs::read(path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return (TuneCache::default(), None),
            Err(e) => {
                return (TuneCache::default(), Some(format!("cannot read {} ({e}); ignored", path.display())))
            }
        };
        match serde_json::from_slice::<CacheFile>(&bytes) {
            Ok(f) if f.format == CACHE_FORMAT => (TuneCache { entries: f.entries }, None),
            Ok(f) => (
                TuneCache::default(),
                Some(format!(
                    "{} has cache format {} (this build writes {CACHE_FORMAT}); ignored, kernels are tuned again",
                    path.display(),
                    f.format
                )),
            ),
            Err(e) => (
                TuneCache::default(),
                Some(format!("{} is not a valid tuning cache ({e}); ignored, kernels are tuned again", path.display())),
            ),
        }
    }

    /// Writes the cache to `path` (folder created; temporary name, then rename).
    pub fn save(&self, path: &Path) -> Result<()> {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        }
        let file = CacheFile { format: CACHE_FORMAT, entries: self.entries.clone() };
        let json = serde_json::to_vec_pretty(&file).map_err(|e| Error::Msg(format!("tuning cache: {e}")))?;
        crate::output::write_file(path, &json)
    }

    /// The cached choice for `class` on `gpu` (other GPUs, drivers and kernel builds miss).
    pub fn lookup(&self, gpu: &GpuKey, class: &ShapeClass) -> Option<&Choice> {
        self.entries.iter().find(|e| e.gpu == *gpu && e.class == *class).map(|e| &e.choice)
    }

    /// Records (or replaces) the choice for `class` on `gpu`.
    pub fn insert(&mut self, gpu: &GpuKey, class: ShapeClass, choice: Choice, ms: Option<f64>) {
        self.entries.retain(|e| !(e.gpu == *gpu && e.class == class));
        self.entries.push(CacheEntry { gpu: gpu.clone(), class, choice, ms });
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// The per-process dispatch state: choices made in this process, the cache they came from or
/// go to, and whether to measure again.
#[derive(Debug)]
pub struct Tuner {
    path: Option<PathBuf>,
    cache: TuneCache,
    loaded: bool,
    retune: bool,
    decided: HashMap<(GpuKey, ShapeClass), Choice>,
}

impl Tuner {
    /// A tuner backed by the cache file at `path` (`None`: in memory only), read on first use.
    pub fn new(path: Option<PathBuf>, retune: bool) -> Tuner {
        Tuner { path, cache: TuneCache::default(), loaded: false, retune, decided: HashMap::new() }
    }

    /// The choice for `class` on `gpu`: made earlier in this process, else cached (unless
    /// retuning), else measured with the probe `make_probe` builds (and cached). Every note
    /// (ignored cache file, disagreeing variant, dense fallback, unsaved cache) goes to `note`.
    pub fn choose(
        &mut self,
        gpu: &GpuKey,
        class: ShapeClass,
        make_probe: &mut dyn FnMut() -> Result<Box<dyn KernelProbe>>,
        note: &mut dyn FnMut(String),
    ) -> Result<Choice> {
        let key = (gpu.clone(), class);
        if let Some(c) = self.decided.get(&key) {
            return Ok(c.clone());
        }
        if !self.loaded {
            self.loaded = true;
            if let Some(p) = &self.path {
                let (cache, msg) = TuneCache::load(p);
                self.cache = cache;
                if let Some(m) = msg {
                    note(m);
                }
            }
        }
        if !self.retune {
            if let Some(c) = self.cache.lookup(gpu, &class) {
                self.decided.insert(key, c.clone());
                return Ok(c.clone());
            }
        }
        let mut probe = make_probe()?;
        let measurements = measure(probe.as_mut())?;
        let choice = decide(&measurements);
        for n in notes(&class, &measurements, &choice) {
            note(n);
        }
        let ms =
            measurements.iter().find(|m| Choice::Kernel(m.candidate.clone()) == choice).and_then(|m| m.ms);
        self.cache.insert(gpu, class, choice.clone(), ms);
        if let Some(p) = &self.path {
            if let Err(e) = self.cache.save(p) {
                note(format!("the kernel tuning cache was not saved: {e}"));
            }
        }
        self.decided.insert(key, choice.clone());
        Ok(choice)
    }
}

impl Tuner {
    /// Sets the choice for `class` on `gpu` for this process without measuring or caching
    /// (tests: force the dense fallback or one variant).
    pub fn override_choice(&mut self, gpu: &GpuKey, class: ShapeClass, choice: Choice) {
        self.decided.insert((gpu.clone(), class), choice);
    }
}

static RETUNE: AtomicBool = AtomicBool::new(false);

/// Makes this process measure every shape class again instead of trusting the cache
/// (`generate --retune`); the new choices replace the cached ones. Call before loading a model.
pub fn set_retune(retune: bool) {
    RETUNE.store(retune, Ordering::Relaxed);
    if let Ok(mut t) = tuner().lock() {
        t.retune = retune;
        t.decided.clear();
    }
}

/// Whether the first-use check runs (`SDSPARSE_TUNE=off` turns it off: the heuristic's first
/// candidate runs every class, unchecked).
pub fn enabled() -> bool {
    !matches!(std::env::var("SDSPARSE_TUNE").as_deref(), Ok("off") | Ok("0"))
}

/// Keeps test runs out of the user's cache: unless `SDSPARSE_TUNE_CACHE` names a file (the
/// device check sets one to keep the choices), this process's tuner keeps its choices in memory
/// only. Called by `test_util::cuda_device_or_skip` when a GPU test opens its device, before any
/// choice is made (a tuner already in use is left as it is).
pub fn keep_cache_in_memory_for_tests() {
    if std::env::var_os("SDSPARSE_TUNE_CACHE").is_some_and(|v| !v.is_empty()) {
        return;
    }
    if let Ok(mut t) = tuner().lock() {
        if !t.loaded && t.decided.is_empty() {
            t.path = None;
        }
    }
}

/// The process-wide tuner over [`TuneCache::default_path`].
pub fn tuner() -> &'static Mutex<Tuner> {
    static TUNER: OnceLock<Mutex<Tuner>> = OnceLock::new();
    TUNER.get_or_init(|| Mutex::new(Tuner::new(TuneCache::default_path(), RETUNE.load(Ordering::Relaxed))))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// GPU tests open their device through `cuda_device_or_skip`, which calls this: the global
    /// tuner then writes no file (unless SDSPARSE_TUNE_CACHE asks for one).
    #[test]
    fn test_runs_keep_the_cache_in_memory() {
        if std::env::var_os("SDSPARSE_TUNE_CACHE").is_some() {
            return;
        }
        keep_cache_in_memory_for_tests();
        assert_eq!(tuner().lock().unwrap().path, None);
    }
    use crate::backend::test_util::TestRng;

    /// A fake GPU: "kernels" are CPU GEMMs, one of which may carry a planted bug.
    struct FakeProbe {
        x: Vec<f32>,
        w: Vec<f32>,
        m: usize,
        n: usize,
        k: usize,
        /// Per candidate: (name, bug, ms).
        variants: Vec<(&'static str, Bug, f64)>,
        timed: Vec<String>,
    }

    #[derive(Clone, Copy, PartialEq)]
    enum Bug {
        None,
        /// One output element negated (what a norm-only check misses on big outputs).
        NegateOne,
        /// The k loop stops one short (an off-by-one in a K tail).
        ShortK,
        /// The launch fails.
        LaunchError,
    }

    impl FakeProbe {
        fn new(variants: Vec<(&'static str, Bug, f64)>) -> FakeProbe {
            let mut rng = TestRng::fresh("tune");
            let (m, n, k) = (154, 320, 64);
            FakeProbe { x: rng.vec(m * k), w: rng.vec(n * k), m, n, k, variants, timed: Vec::new() }
        }
        fn gemm(&self, k_used: usize) -> Vec<f32> {
            let mut y = vec![0f32; self.m * self.n];
            for i in 0..self.m {
                for j in 0..self.n {
                    y[i * self.n + j] =
                        (0..k_used).map(|c| self.x[i * self.k + c] * self.w[j * self.k + c]).sum();
                }
            }
            y
        }
    }

    impl KernelProbe for FakeProbe {
        fn candidates(&self) -> Vec<String> {
            self.variants.iter().map(|v| v.0.to_string()).collect()
        }
        fn reference(&mut self) -> Result<Vec<f32>> {
            Ok(self.gemm(self.k))
        }
        fn run(&mut self, candidate: &str) -> Result<Vec<f32>> {
            let (_, bug, _) = *self.variants.iter().find(|v| v.0 == candidate).expect("a candidate");
            match bug {
                Bug::None => Ok(self.gemm(self.k)),
                Bug::NegateOne => {
                    // The element nearest half the rms: big enough for the element-wise bound,
                    // too small to move the norm-wise error past 1e-2.
                    let mut y = self.gemm(self.k);
                    let rms = (y.iter().map(|v| v * v).sum::<f32>() / y.len() as f32).sqrt();
                    let i = (0..y.len())
                        .min_by(|&a, &b| {
                            (y[a].abs() - rms / 2.0).abs().total_cmp(&(y[b].abs() - rms / 2.0).abs())
                        })
                        .expect("non-empty");
                    y[i] = -y[i];
                    Ok(y)
                }
                Bug::ShortK => Ok(self.gemm(self.k - 1)),
                Bug::LaunchError => Err(Error::Cuda("CUDA_ERROR_LAUNCH_FAILED".into())),
            }
        }
        fn time_ms(&mut self, candidate: &str) -> Result<f64> {
            self.timed.push(candidate.to_string());
            Ok(self.variants.iter().find(|v| v.0 == candidate).expect("a candidate").2)
        }
    }

    fn key(gpu: &str, driver: i32) -> GpuKey {
        GpuKey { gpu: gpu.into(), driver, kernels: "0badf00d".into() }
    }

    #[test]
    fn the_fastest_agreeing_variant_wins_and_planted_bugs_never_do() -> Result<()> {
        // The buggy variants are the fastest: a timing-only tuner would pick them.
        let mut p = FakeProbe::new(vec![
            ("heuristic", Bug::None, 2.0),
            ("negate_one", Bug::NegateOne, 0.1),
            ("short_k", Bug::ShortK, 0.2),
            ("broken", Bug::LaunchError, 0.05),
            ("fast", Bug::None, 1.0),
        ]);
        let ms = measure(&mut p)?;
        assert_eq!(decide(&ms), Choice::Kernel("fast".into()));
        // Buggy variants are not even timed, and each gets its one-line note.
        assert_eq!(p.timed, vec!["heuristic", "fast"]);
        let class = ShapeClass::new(Family::Sparse24, 154, 320, 64);
        let notes = notes(&class, &ms, &decide(&ms));
        assert_eq!(notes.len(), 3, "{notes:?}");
        assert!(notes[0].contains("negate_one") && notes[0].contains("element "), "{}", notes[0]);
        assert!(notes[2].contains("CUDA_ERROR_LAUNCH_FAILED"), "{}", notes[2]);
        assert!(notes.iter().all(|n| !n.contains('\n')));
        Ok(())
    }

    #[test]
    fn all_disagreeing_falls_back_to_dense() -> Result<()> {
        let mut p = FakeProbe::new(vec![("a", Bug::NegateOne, 0.1), ("b", Bug::ShortK, 0.1)]);
        let ms = measure(&mut p)?;
        let choice = decide(&ms);
        assert_eq!(choice, Choice::Dense);
        let class = ShapeClass::new(Family::Unstructured, 100, 320, 64);
        let n = notes(&class, &ms, &choice);
        assert!(
            n.last().is_some_and(|l| l.contains("decompressed + cuBLAS") && l.contains("M <= 128")),
            "{n:?}"
        );
        // Ties go to the earlier (heuristic) candidate; NaN times never win.
        let ok = |c: &str, ms: f64| Measurement { candidate: c.into(), check: Ok(1e-4), ms: Some(ms) };
        assert_eq!(decide(&[ok("h", 1.0), ok("o", 1.0)]), Choice::Kernel("h".into()));
        assert_eq!(decide(&[ok("h", f64::NAN), ok("o", 3.0)]), Choice::Kernel("o".into()));
        assert_eq!(decide(&[]), Choice::Dense);
        Ok(())
    }

    #[test]
    fn the_check_catches_a_bug_a_norm_bound_would_miss() {
        // One negated element of 154 x 320 moves the norm-wise error by ~1e-2 / sqrt(size):
        // the element-wise bound is what catches it.
        let mut p = FakeProbe::new(vec![("negate_one", Bug::NegateOne, 0.1)]);
        let reference = p.reference().unwrap();
        let y = p.run("negate_one").unwrap();
        let norm = crate::backend::test_util::rel_error(&y, &reference);
        assert!(norm < 1e-2, "norm-wise error {norm} alone would pass a 1e-2 norm bound");
        assert!(crate::backend::test_util::check_close(&y, &reference, GPU_NORM_TOL, GPU_ELEM_TOL).is_err());
    }

    #[test]
    fn shape_classes_name_their_epilogue() {
        let c = ShapeClass::new(Family::Sparse24, 3000, 2560, 320);
        assert_eq!(c.to_string(), "2:4 GEMM [M <= 4096, N 2560, K 320]");
        let e = EpilogueClass { geglu: true, residual: true, ..Default::default() };
        assert_eq!(c.with_epilogue(e).to_string(), "2:4 GEMM [M <= 4096, N 2560, K 320] + GEGLU + residual");
    }

    #[test]
    fn cache_round_trips_and_misses_on_other_gpus() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::Msg(e.to_string()))?;
        let path = dir.path().join("sub").join("dispatch.json");
        let h200 = key("NVIDIA H200", 13000);
        let c1 = ShapeClass::new(Family::Sparse24, 4096, 320, 320);
        let c2 = ShapeClass::new(Family::Unstructured, 154, 1024, 4096);
        let mut cache = TuneCache::default();
        cache.insert(&h200, c1, Choice::Kernel("v2_pipe_bt128".into()), Some(0.01));
        cache.insert(&h200, c2, Choice::Dense, None);
        cache.insert(&h200, c1, Choice::Kernel("v3_wgmma".into()), Some(0.008)); // replaces
        cache.save(&path)?;
        let (back, note) = TuneCache::load(&path);
        assert_eq!(note, None);
        assert_eq!(back, cache);
        assert_eq!(back.len(), 2);
        assert_eq!(back.lookup(&h200, &c1), Some(&Choice::Kernel("v3_wgmma".into())));
        assert_eq!(back.lookup(&h200, &c2), Some(&Choice::Dense));
        // Another GPU, another driver, another kernel build, another class: misses.
        assert_eq!(back.lookup(&key("NVIDIA A100-SXM4-80GB", 13000), &c1), None);
        assert_eq!(back.lookup(&key("NVIDIA H200", 13010), &c1), None);
        assert_eq!(back.lookup(&GpuKey { kernels: "12345678".into(), ..h200.clone() }, &c1), None);
        assert_eq!(back.lookup(&h200, &ShapeClass::new(Family::Sparse24, 8192, 320, 320)), None);
        // The same shape with a fused epilogue is another class (its check runs the epilogue).
        for e in [
            EpilogueClass { gelu: true, ..Default::default() },
            EpilogueClass { geglu: true, ..Default::default() },
            EpilogueClass { residual: true, ..Default::default() },
        ] {
            assert_eq!(back.lookup(&h200, &c1.with_epilogue(e)), None, "{e:?}");
        }
        // M is bucketed: 3000 and 4096 share a class.
        assert_eq!(
            back.lookup(&h200, &ShapeClass::new(Family::Sparse24, 3000, 320, 320)),
            back.lookup(&h200, &c1)
        );
        // No temporary file is left beside it.
        let names: Vec<_> =
            std::fs::read_dir(path.parent().unwrap()).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("dispatch.json")]);
        Ok(())
    }

    #[test]
    fn corrupt_or_foreign_cache_files_are_ignored_with_a_note() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::Msg(e.to_string()))?;
        let path = dir.path().join("dispatch.json");
        assert_eq!(TuneCache::load(&path), (TuneCache::default(), None)); // missing: silent
        for bad in [&b"{\"format\": 1, \"entries\": [{\"gpu\": 3"[..], b"\xff\xfe garbage", b"[]", b""] {
            std::fs::write(&path, bad).unwrap();
            let (c, note) = TuneCache::load(&path);
            assert!(c.is_empty());
            let note = note.expect("a note");
            assert!(note.contains("ignored") && !note.contains('\n'), "{note}");
        }
        std::fs::write(&path, br#"{"format": 99, "entries": []}"#).unwrap();
        assert!(TuneCache::load(&path).1.is_some_and(|n| n.contains("format 99")));
        // A tuner over a corrupt file notes it once, measures, and replaces the file.
        std::fs::write(&path, b"not json").unwrap();
        let mut t = Tuner::new(Some(path.clone()), false);
        let mut notes = Vec::new();
        let gpu = key("NVIDIA H200", 13000);
        let class = ShapeClass::new(Family::Sparse24, 154, 320, 64);
        let mut make =
            || -> Result<Box<dyn KernelProbe>> { Ok(Box::new(FakeProbe::new(vec![("a", Bug::None, 1.0)]))) };
        assert_eq!(t.choose(&gpu, class, &mut make, &mut |n| notes.push(n))?, Choice::Kernel("a".into()));
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert_eq!(TuneCache::load(&path).0.lookup(&gpu, &class), Some(&Choice::Kernel("a".into())));
        Ok(())
    }

    #[test]
    fn tuner_uses_the_cache_and_retune_measures_again() -> Result<()> {
        let dir = tempfile::tempdir().map_err(|e| Error::Msg(e.to_string()))?;
        let path = dir.path().join("dispatch.json");
        let gpu = key("NVIDIA H200", 13000);
        let class = ShapeClass::new(Family::Unstructured, 8192, 1280, 1280);
        let probes = std::cell::Cell::new(0);
        let make = |variants: Vec<(&'static str, Bug, f64)>| {
            let probes = &probes;
            move || -> Result<Box<dyn KernelProbe>> {
                probes.set(probes.get() + 1);
                Ok(Box::new(FakeProbe::new(variants.clone())))
            }
        };
        let mut quiet = |_: String| {};
        let mut t = Tuner::new(Some(path.clone()), false);
        let first = make(vec![("bm64", Bug::None, 2.0), ("bm128", Bug::None, 1.0)]);
        assert_eq!(t.choose(&gpu, class, &mut { first }, &mut quiet)?, Choice::Kernel("bm128".into()));
        assert_eq!(probes.get(), 1);
        // A second process trusts the file and builds no probe.
        let mut t2 = Tuner::new(Some(path.clone()), false);
        let mut never = || -> Result<Box<dyn KernelProbe>> { Err(Error::Msg("no probe expected".into())) };
        assert_eq!(t2.choose(&gpu, class, &mut never, &mut quiet)?, Choice::Kernel("bm128".into()));
        // Another driver misses and measures.
        let other = GpuKey { driver: 13010, ..gpu.clone() };
        let mut m2 = make(vec![("bm64", Bug::None, 1.0)]);
        assert_eq!(t2.choose(&other, class, &mut m2, &mut quiet)?, Choice::Kernel("bm64".into()));
        // --retune: measured again; now bm128 is broken on this GPU, so bm64 replaces it.
        let mut t3 = Tuner::new(Some(path.clone()), true);
        let mut m3 = make(vec![("bm64", Bug::None, 2.0), ("bm128", Bug::ShortK, 1.0)]);
        assert_eq!(t3.choose(&gpu, class, &mut m3, &mut quiet)?, Choice::Kernel("bm64".into()));
        let (cache, _) = TuneCache::load(&path);
        assert_eq!(cache.lookup(&gpu, &class), Some(&Choice::Kernel("bm64".into())));
        assert_eq!(cache.lookup(&other, &class), Some(&Choice::Kernel("bm64".into())));
        assert_eq!(probes.get(), 3);
        Ok(())
    }
}
