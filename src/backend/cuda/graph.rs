//! CUDA graphs of the UNet step: the ~700 launches of one SD2 UNet call (with CFG) captured once
//! per shape and replayed, so the host's launch overhead is paid once instead of every step.
//!
//! [`StepGraphs`] is the per-run bookkeeping (host-tested): the first call of a shape runs
//! eagerly (it tunes the sparse kernels, grows workspaces, warms cuBLAS: none of which may
//! happen inside a capture), the second is captured, every later one replays. A capture that
//! fails (an op that is not capturable, a driver without graph support) turns graphs off for
//! that shape with one note, and the step runs eagerly. The device side is [`capture`] (cudarc
//! 0.19's `CudaStream::begin_capture` / `end_capture`) and [`write_values`], which updates a
//! graph's input buffer in place (a replay reads the addresses captured, so inputs are copied
//! into fixed buffers before each launch).
//!
//! Graphs are off with `SDSPARSE_CUDA_GRAPHS=0` (or `generate --no-cuda-graphs`), and while the
//! per-op profiler runs (it synchronises around every op, which a capture forbids).

use super::decompress::DeviceValues;
use super::device::{driver_err, CudaDevice};
use crate::backend::{Storage, Tensor};
use crate::error::{Error, Result};
use cudarc::driver::{sys, CudaGraph, DevicePtr};
use std::collections::{HashMap, HashSet};
use std::hash::Hash;

/// What to do for one step of a given shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepPlan {
    /// Run the ops directly (graphs off, first call of the shape, or its capture failed).
    Eager,
    /// Capture this call into a graph, then launch it.
    Capture,
    /// Launch the graph captured earlier.
    Replay,
}

/// Graphs by shape key for one run, and which shapes ran or failed.
#[derive(Debug)]
pub struct StepGraphs<K: Eq + Hash + Clone, G> {
    enabled: bool,
    seen: HashSet<K>,
    failed: HashSet<K>,
    graphs: HashMap<K, G>,
}

impl<K: Eq + Hash + Clone + std::fmt::Debug, G> StepGraphs<K, G> {
    pub fn new(enabled: bool) -> Self {
        StepGraphs { enabled, seen: HashSet::new(), failed: HashSet::new(), graphs: HashMap::new() }
    }

    /// The plan for a step of shape `key` (and records that the shape ran).
    pub fn plan(&mut self, key: &K) -> StepPlan {
        if !self.enabled || self.failed.contains(key) {
            return StepPlan::Eager;
        }
        if self.graphs.contains_key(key) {
            return StepPlan::Replay;
        }
        if self.seen.insert(key.clone()) {
            StepPlan::Eager
        } else {
            StepPlan::Capture
        }
    }

    /// Stores the graph captured for `key`.
    pub fn captured(&mut self, key: &K, graph: G) {
        self.graphs.insert(key.clone(), graph);
    }

    /// Records a failed capture: `key` runs eagerly from now on. Returns the one-line note.
    pub fn capture_failed(&mut self, key: &K, why: &str) -> String {
        self.failed.insert(key.clone());
        format!("CUDA graph capture of the UNet step failed for shape {key:?} ({why}); running it eagerly")
    }

    pub fn graph(&self, key: &K) -> Option<&G> {
        self.graphs.get(key)
    }

    /// Graphs captured so far.
    pub fn len(&self) -> usize {
        self.graphs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.graphs.is_empty()
    }
}

/// Whether graphs are on by default (`SDSPARSE_CUDA_GRAPHS=0` / `off` turns them off).
pub fn enabled_by_env() -> bool {
    !matches!(std::env::var("SDSPARSE_CUDA_GRAPHS").as_deref(), Ok("0") | Ok("off") | Ok("false"))
}

/// Captures the device work `body` enqueues on `dev`'s stream into an instantiated graph (not
/// yet launched: a capture records, it does not run). The capture is ended whatever `body`
/// returns, so a failed capture leaves the stream usable; any error (from `body`, or an op
/// that invalidated the capture) is returned and nothing is kept.
pub fn capture(dev: &CudaDevice, body: impl FnOnce() -> Result<()>) -> Result<CudaGraph> {
    let stream = dev.stream();
    stream
        .begin_capture(sys::CUstreamCaptureMode::CU_STREAM_CAPTURE_MODE_THREAD_LOCAL)
        .map_err(driver_err("cannot begin a stream capture"))?;
    let ran = body();
    let ended = stream.end_capture(sys::CUgraphInstantiate_flags(0));
    ran?;
    match ended {
        Ok(Some(g)) => Ok(g),
        Ok(None) => Err(Error::Cuda("the capture recorded no work".into())),
        Err(e) => Err(Error::Cuda(format!("end of capture: {e}"))),
    }
}

/// Launches a captured graph on its stream.
pub fn launch(graph: &CudaGraph) -> Result<()> {
    graph.launch().map_err(driver_err("graph launch failed"))
}

/// Overwrites the GPU tensor `t` in place with `values` converted to its dtype (f32, f16 or
/// bf16; stream-ordered; the host buffer may be dropped on return), keeping its address, which a
/// captured graph reads.
pub fn write_values(t: &Tensor, values: &[f32]) -> Result<()> {
    let Storage::Cuda(s) = t.storage() else {
        return Err(Error::Invalid("write_values: not a GPU tensor".into()));
    };
    if values.len() != t.numel() || s.len() < values.len() {
        return Err(Error::Shape(format!("write_values: {} values for {:?}", values.len(), t.shape())));
    }
    let dev = s.device();
    let stream = dev.stream().cu_stream();
    // SAFETY (each arm): the pointer addresses at least `values.len()` elements of a live
    // allocation of this device; a copy from pageable host memory is staged before it returns.
    let copied = match s.values() {
        DeviceValues::F32(d) => unsafe {
            cudarc::driver::result::memcpy_htod_async(dev.device_ptr(d), values, stream)
        },
        DeviceValues::F16(d) => {
            let h: Vec<half::f16> = values.iter().map(|&v| half::f16::from_f32(v)).collect();
            unsafe { cudarc::driver::result::memcpy_htod_async(dev.device_ptr(d), &h[..], stream) }
        }
        DeviceValues::BF16(d) => {
            let h: Vec<half::bf16> = values.iter().map(|&v| half::bf16::from_f32(v)).collect();
            unsafe { cudarc::driver::result::memcpy_htod_async(dev.device_ptr(d), &h[..], stream) }
        }
    };
    copied.map_err(driver_err("host to device copy failed"))
}

/// Copies the f32 GPU tensor `src` into `dst` (same element count; stream-ordered, capturable).
pub fn copy_f32(src: &Tensor, dst: &Tensor) -> Result<()> {
    let (Storage::Cuda(s), Storage::Cuda(d)) = (src.storage(), dst.storage()) else {
        return Err(Error::Invalid("copy_f32: not GPU tensors".into()));
    };
    if src.numel() != dst.numel() {
        return Err(Error::Shape(format!("copy_f32: {:?} into {:?}", src.shape(), dst.shape())));
    }
    let dev = d.device();
    let (sp, _gs) = s.slice()?.device_ptr(dev.stream());
    let (dp, _gd) = d.slice()?.device_ptr(dev.stream());
    // SAFETY: both address at least numel f32 of live allocations of this device.
    unsafe { cudarc::driver::result::memcpy_dtod_async(dp, sp, src.numel() * 4, dev.stream().cu_stream()) }
        .map_err(driver_err("device to device copy failed"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_shape_runs_eagerly_once_then_is_captured_then_replayed() {
        let mut g: StepGraphs<(usize, usize), &str> = StepGraphs::new(true);
        let a = (2, 64);
        let b = (2, 96);
        assert_eq!(g.plan(&a), StepPlan::Eager); // warm-up: tuning, workspaces
        assert_eq!(g.plan(&a), StepPlan::Capture);
        g.captured(&a, "graph a");
        assert_eq!(g.plan(&a), StepPlan::Replay);
        assert_eq!(g.graph(&a), Some(&"graph a"));
        // Another shape has its own warm-up and graph.
        assert_eq!(g.plan(&b), StepPlan::Eager);
        assert_eq!(g.plan(&b), StepPlan::Capture);
        let note = g.capture_failed(&b, "operation not permitted when stream is capturing");
        assert!(note.contains("eagerly") && !note.contains('\n'), "{note}");
        assert_eq!(g.plan(&b), StepPlan::Eager);
        assert_eq!(g.plan(&b), StepPlan::Eager); // never retried
        assert_eq!(g.plan(&a), StepPlan::Replay);
        assert_eq!(g.len(), 1);
    }

    #[test]
    fn disabled_graphs_always_run_eagerly() {
        let mut g: StepGraphs<u32, ()> = StepGraphs::new(false);
        for _ in 0..3 {
            assert_eq!(g.plan(&7), StepPlan::Eager);
        }
        assert!(g.is_empty());
    }
}
