//! Per-op time breakdown (`generate --profile`, or `SDSPARSE_PROFILE=1`): how long each kind of
//! op (Linear dense / 2:4 / unstructured, matmul, convolution, attention, norms, elementwise,
//! layout, embedding) took in each pipeline stage (text encoder, UNet, VAE).
//!
//! Every public op of [`super::ops`] (and `SparseLinear::forward`) opens a [`scope`]; only the
//! outermost scope on a thread counts, so an op built from other ops is charged once, to its
//! own kind. On the CPU the scopes are host timers. On a GPU the work is asynchronous, so the
//! profiler synchronises the device's stream when the outermost scope opens and closes: the
//! times are exact per op, at the cost of the overlap between the host's launches and the GPU
//! (and CUDA graphs are off while profiling: a graph replays a whole step without calling the
//! ops). The profiler is thread-local: [`start`] on the thread that runs the pipeline.

use super::cuda::CudaDevice;
use std::cell::RefCell;
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// The kinds of op the table reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum OpKind {
    LinearDense,
    Linear24,
    LinearUnstructured,
    Matmul,
    Conv,
    Attention,
    Norm,
    Elementwise,
    Layout,
    Embedding,
}

impl OpKind {
    pub fn label(self) -> &'static str {
        match self {
            OpKind::LinearDense => "linear dense",
            OpKind::Linear24 => "linear 2:4",
            OpKind::LinearUnstructured => "linear unstructured",
            OpKind::Matmul => "matmul",
            OpKind::Conv => "conv",
            OpKind::Attention => "attention",
            OpKind::Norm => "norms",
            OpKind::Elementwise => "elementwise",
            OpKind::Layout => "layout / copies",
            OpKind::Embedding => "embedding",
        }
    }
}

/// The pipeline stage ops are charged to ([`set_stage`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Stage {
    TextEncoder,
    Unet,
    Vae,
    Other,
}

impl Stage {
    const ALL: [Stage; 4] = [Stage::TextEncoder, Stage::Unet, Stage::Vae, Stage::Other];
    fn label(self) -> &'static str {
        match self {
            Stage::TextEncoder => "text enc",
            Stage::Unet => "UNet",
            Stage::Vae => "VAE",
            Stage::Other => "other",
        }
    }
}

struct State {
    stage: Stage,
    depth: u32,
    sync: Option<CudaDevice>,
    device: String,
    stages: BTreeMap<Stage, Duration>,
    stage_start: Option<(Stage, Instant)>,
    times: BTreeMap<(OpKind, Stage), (u64, Duration)>,
}

thread_local! {
    static PROFILER: RefCell<Option<State>> = const { RefCell::new(None) };
}

/// Whether `SDSPARSE_PROFILE` asks for the table (`1`, `true`, `yes` or `on`, any case).
pub fn requested_by_env() -> bool {
    std::env::var("SDSPARSE_PROFILE")
        .is_ok_and(|v| matches!(v.to_ascii_lowercase().as_str(), "1" | "true" | "yes" | "on"))
}

/// Starts collecting on this thread (replacing an earlier collection). `gpu`: the device whose
/// stream is synchronised around each op (`None` on the CPU).
pub fn start(gpu: Option<CudaDevice>) {
    let device = gpu.as_ref().map_or("cpu".to_string(), |d| format!("{} ({})", d.name(), d.gpu_name()));
    PROFILER.with(|p| {
        *p.borrow_mut() = Some(State {
            stage: Stage::Other,
            depth: 0,
            sync: gpu,
            device,
            stages: BTreeMap::new(),
            stage_start: None,
            times: BTreeMap::new(),
        })
    });
}

/// Whether this thread is collecting.
pub fn active() -> bool {
    PROFILER.with(|p| p.borrow().is_some())
}

fn sync(s: &State) {
    if let Some(d) = &s.sync {
        let _ = d.stream().synchronize();
    }
}

/// Charges the ops that follow to `stage` (and times the stage itself, wall clock).
pub fn set_stage(stage: Stage) {
    PROFILER.with(|p| {
        if let Some(s) = p.borrow_mut().as_mut() {
            sync(s);
            let now = Instant::now();
            if let Some((old, t0)) = s.stage_start.take() {
                *s.stages.entry(old).or_default() += now - t0;
            }
            s.stage = stage;
            s.stage_start = Some((stage, now));
        }
    });
}

/// Stops collecting and returns what was collected (`None` if [`start`] was not called).
pub fn finish() -> Option<Profile> {
    set_stage(Stage::Other);
    PROFILER.with(|p| p.borrow_mut().take()).map(|s| Profile {
        device: s.device,
        gpu: s.sync.is_some(),
        stages: s.stages,
        times: s.times,
    })
}

/// An open op: charged to its kind when dropped (outermost scopes only).
#[must_use = "the op is timed until the scope is dropped"]
pub struct Scope {
    start: Option<(OpKind, Instant)>,
}

/// Opens a scope for one op of `kind` (cheap when not profiling: one thread-local read).
pub fn scope(kind: OpKind) -> Scope {
    let start = PROFILER.with(|p| {
        let mut p = p.borrow_mut();
        let s = p.as_mut()?;
        s.depth += 1;
        if s.depth > 1 {
            return None;
        }
        sync(s);
        Some((kind, Instant::now()))
    });
    Scope { start }
}

impl Drop for Scope {
    fn drop(&mut self) {
        PROFILER.with(|p| {
            let mut p = p.borrow_mut();
            let Some(s) = p.as_mut() else { return };
            s.depth = s.depth.saturating_sub(1);
            if let Some((kind, t0)) = self.start {
                sync(s);
                let e = s.times.entry((kind, s.stage)).or_default();
                e.0 += 1;
                e.1 += t0.elapsed();
            }
        });
    }
}

/// A finished collection: time per op kind and stage.
#[derive(Debug, Clone)]
pub struct Profile {
    pub device: String,
    pub gpu: bool,
    /// Wall time of each stage (between [`set_stage`] calls).
    pub stages: BTreeMap<Stage, Duration>,
    /// `(calls, time)` per op kind and stage.
    pub times: BTreeMap<(OpKind, Stage), (u64, Duration)>,
}

impl Profile {
    /// Calls and time of one op kind over all stages.
    pub fn total(&self, kind: OpKind) -> (u64, Duration) {
        self.times
            .iter()
            .filter(|((k, _), _)| *k == kind)
            .fold((0, Duration::ZERO), |a, (_, v)| (a.0 + v.0, a.1 + v.1))
    }

    /// Time of every op in `stage`.
    pub fn stage_ops(&self, stage: Stage) -> Duration {
        self.times.iter().filter(|((_, st), _)| *st == stage).map(|(_, v)| v.1).sum()
    }

    /// The table `generate --profile` prints: one row per op kind that ran, a column per stage
    /// that ran, the total and its share; then the time outside ops per stage (host work:
    /// tokenizer, scheduler, copies, checks).
    pub fn table(&self) -> String {
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let stages: Vec<Stage> = Stage::ALL
            .into_iter()
            .filter(|st| self.times.keys().any(|(_, s)| s == st) || self.stages.contains_key(st))
            .filter(|st| *st != Stage::Other || self.stage_ops(Stage::Other) > Duration::ZERO)
            .collect();
        let all_ops: Duration = self.times.values().map(|v| v.1).sum();
        let mut s = format!(
            "per-op time on {} ({}):\n",
            self.device,
            if self.gpu { "stream synchronised around each op; CUDA graphs off" } else { "host timers" }
        );
        s += &format!("  {:<20} {:>7}", "op", "calls");
        for st in &stages {
            s += &format!(" {:>11}", format!("{} ms", st.label()));
        }
        s += &format!(" {:>10} {:>6}\n", "total ms", "share");
        let mut kinds: Vec<OpKind> = self.times.keys().map(|(k, _)| *k).collect();
        kinds.dedup();
        for kind in kinds {
            let (calls, total) = self.total(kind);
            s += &format!("  {:<20} {calls:>7}", kind.label());
            for st in &stages {
                s += &format!(" {:>11.1}", ms(self.times.get(&(kind, *st)).map_or(Duration::ZERO, |v| v.1)));
            }
            let share =
                if all_ops.is_zero() { 0.0 } else { 100.0 * total.as_secs_f64() / all_ops.as_secs_f64() };
            s += &format!(" {:>10.1} {share:>5.1}%\n", ms(total));
        }
        s += &format!("  {:<20} {:>7}", "all ops", "");
        for st in &stages {
            s += &format!(" {:>11.1}", ms(self.stage_ops(*st)));
        }
        s += &format!(" {:>10.1}\n", ms(all_ops));
        s += &format!("  {:<20} {:>7}", "outside ops", "");
        for st in &stages {
            let wall = self.stages.get(st).copied().unwrap_or_default();
            s += &format!(" {:>11.1}", ms(wall.saturating_sub(self.stage_ops(*st))));
        }
        s += "\n";
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outermost_scopes_only_and_stages_split() {
        start(None);
        set_stage(Stage::Unet);
        {
            let _outer = scope(OpKind::Attention);
            let _inner = scope(OpKind::Matmul); // part of the attention: not counted twice
            std::thread::sleep(Duration::from_millis(2));
        }
        {
            let _c = scope(OpKind::Conv);
        }
        set_stage(Stage::Vae);
        {
            let _c = scope(OpKind::Conv);
        }
        let p = finish().expect("collected");
        assert!(!active());
        assert_eq!(p.total(OpKind::Attention).0, 1);
        assert_eq!(p.total(OpKind::Matmul).0, 0);
        assert!(p.total(OpKind::Attention).1 >= Duration::from_millis(2));
        assert_eq!(p.times.get(&(OpKind::Conv, Stage::Unet)).map(|v| v.0), Some(1));
        assert_eq!(p.times.get(&(OpKind::Conv, Stage::Vae)).map(|v| v.0), Some(1));
        let t = p.table();
        assert!(t.contains("attention") && t.contains("conv") && !t.contains("matmul"), "{t}");
        assert!(t.contains("UNet ms") && t.contains("VAE ms") && !t.contains("text enc"), "{t}");
        // Not profiling: scopes are no-ops and finish has nothing.
        let _s = scope(OpKind::Norm);
        assert!(finish().is_none());
    }
}
