//! Which library runs the dense GEMMs of Linear layers and the convolutions, and a record of
//! what actually ran, for the one-line report `generate` prints.
//!
//! cuBLASLt and cuDNN are loaded at run time (cudarc's `dynamic-loading`), like cuBLAS: a
//! machine without them must still run. cuDNN is a separate download that many machines lack,
//! so the convolution falls back to im2col + cuBLAS SGEMM and the dense Linear to cuBLAS SGEMM +
//! the bias kernel. The choice is made per device once ([`lt`], [`dnn`]: the library, its
//! symbols, its version and a handle; any failure is a reason string, never a panic) and can be
//! forced for comparisons with `SDSPARSE_GPU_LINEAR=auto|cublaslt|sgemm` and
//! `SDSPARSE_GPU_CONV=auto|cudnn|im2col` (forcing a library that cannot be loaded is an error).
//! [`choose`] is the whole selection rule, unit-tested below with absent libraries simulated.

use super::device::CudaDevice;
use super::dnn::DnnHandle;
use super::lt::LtHandle;
use crate::error::{Error, Result};
use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

/// What the user asked for through `SDSPARSE_GPU_LINEAR` / `SDSPARSE_GPU_CONV`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Override {
    /// The library when it loads, else the fallback (the default).
    Auto,
    /// The library or an error.
    Library,
    /// The fallback even when the library loads.
    Fallback,
}

/// Parses an override variable's value. `names` are the library's and the fallback's spellings
/// (e.g. `("cudnn", "im2col")`); empty or unset is `Auto`; anything else is a one-line error.
pub fn parse_override(var: &str, value: Option<&str>, (lib, fallback): (&str, &str)) -> Result<Override> {
    match value.map(|v| v.trim().to_ascii_lowercase()) {
        None => Ok(Override::Auto),
        Some(v) if v.is_empty() || v == "auto" => Ok(Override::Auto),
        Some(v) if v == lib => Ok(Override::Library),
        Some(v) if v == fallback => Ok(Override::Fallback),
        Some(v) => Err(Error::Invalid(format!("{var}={v:?}: expected auto, {lib} or {fallback}"))),
    }
}

/// The outcome of [`choose`]: the library's handle, or why the fallback runs.
#[derive(Debug)]
pub enum Choice<'a, T> {
    Library(&'a T),
    Fallback(String),
}

/// The selection rule: `loaded` is the library's handle or why it could not be made.
/// `Auto` takes the library when it loaded; `Library` demands it (an error naming the reason
/// otherwise); `Fallback` never takes it.
pub fn choose<'a, T>(
    what: &str,
    var: &str,
    ovr: Override,
    loaded: &'a std::result::Result<T, String>,
) -> Result<Choice<'a, T>> {
    match (ovr, loaded) {
        (Override::Fallback, _) => Ok(Choice::Fallback(format!("{var} forces it"))),
        (_, Ok(h)) => Ok(Choice::Library(h)),
        (Override::Auto, Err(why)) => Ok(Choice::Fallback(why.clone())),
        (Override::Library, Err(why)) => Err(Error::Cuda(format!("{var} asks for {what}, but {why}"))),
    }
}

/// Reads an override variable once per process.
fn env_override(
    cell: &'static OnceLock<Result<Override>>,
    var: &str,
    names: (&str, &str),
) -> Result<Override> {
    match cell.get_or_init(|| parse_override(var, std::env::var(var).ok().as_deref(), names)) {
        Ok(o) => Ok(*o),
        Err(e) => Err(Error::Invalid(e.to_string())),
    }
}

pub const LINEAR_VAR: &str = "SDSPARSE_GPU_LINEAR";
pub const CONV_VAR: &str = "SDSPARSE_GPU_CONV";

/// `SDSPARSE_GPU_LINEAR`: `auto`, `cublaslt` or `sgemm`.
pub fn linear_override() -> Result<Override> {
    static CELL: OnceLock<Result<Override>> = OnceLock::new();
    env_override(&CELL, LINEAR_VAR, ("cublaslt", "sgemm"))
}

/// `SDSPARSE_GPU_CONV`: `auto`, `cudnn` or `im2col`.
pub fn conv_override() -> Result<Override> {
    static CELL: OnceLock<Result<Override>> = OnceLock::new();
    env_override(&CELL, CONV_VAR, ("cudnn", "im2col"))
}

/// `SDSPARSE_GPU_CONV_ALGO`: how cuDNN's algorithm is chosen (read once per process).
pub fn conv_options() -> Result<super::dnn::ConvOptions> {
    static CELL: OnceLock<Result<super::dnn::ConvOptions>> = OnceLock::new();
    match CELL.get_or_init(super::dnn::ConvOptions::from_env) {
        Ok(o) => Ok(*o),
        Err(e) => Err(Error::Invalid(e.to_string())),
    }
}

/// The first of `names` that does not resolve in a cudarc `culib()` library, if any. cudarc
/// resolves symbols lazily and panics on a missing one, so a library older than the bindings is
/// detected here, before any call. (A macro: the library type is `libloading`'s, which this
/// crate does not name.)
macro_rules! missing_symbol {
    ($lib:expr, $names:expr) => {{
        let lib = $lib;
        $names
            .iter()
            // SAFETY: only looks the symbol up; nothing is called through it.
            .find(|n| unsafe { lib.get::<unsafe extern "C" fn()>(n.as_bytes()) }.is_err())
            .map(|n| n.to_string())
    }};
}
pub(crate) use missing_symbol;

/// Counts of what ran on one device, and why a fallback ran (the first reason seen).
#[derive(Debug, Default, Clone, PartialEq)]
pub struct BackendUse {
    /// cuBLASLt Linear calls: (no epilogue, bias epilogue, GELU + bias epilogue).
    pub lt_calls: (u64, u64, u64),
    /// Dense Linear calls through SGEMM (+ the bias kernel), and why.
    pub sgemm_linear_calls: u64,
    pub linear_fallback: Option<String>,
    /// cuDNN convolutions, of which with the bias fused (`cudnnConvolutionBiasActivationForward`).
    pub cudnn_calls: u64,
    pub cudnn_fused_bias: u64,
    /// The cuDNN version that ran, e.g. "9.10.2".
    pub cudnn_version: Option<String>,
    /// im2col + cuBLAS convolutions, and why.
    pub im2col_calls: u64,
    pub conv_fallback: Option<String>,
}

impl BackendUse {
    /// The report line, e.g. `GPU: conv cuDNN 9.10.2 (52 calls, 52 with fused bias); dense
    /// Linear cuBLASLt (bias epilogue 120, GELU+bias epilogue 0, none 4)`. Both paths are
    /// named when both ran (a layout cuBLASLt / cuDNN refused).
    pub fn summary(&self) -> String {
        let mut conv = Vec::new();
        if self.cudnn_calls > 0 {
            conv.push(format!(
                "cuDNN {} ({} calls, {} with fused bias)",
                self.cudnn_version.as_deref().unwrap_or("?"),
                self.cudnn_calls,
                self.cudnn_fused_bias
            ));
        }
        if self.im2col_calls > 0 || self.cudnn_calls == 0 {
            let why = self.conv_fallback.as_deref().unwrap_or("no convolution ran");
            conv.push(format!("im2col+cuBLAS ({} calls: {why})", self.im2col_calls));
        }
        let mut lin = Vec::new();
        let (none, bias, gelu) = self.lt_calls;
        if none + bias + gelu > 0 {
            lin.push(format!("cuBLASLt (bias epilogue {bias}, GELU+bias epilogue {gelu}, none {none})"));
        }
        if self.sgemm_linear_calls > 0 || none + bias + gelu == 0 {
            let why = self.linear_fallback.as_deref().unwrap_or("no dense Linear ran");
            lin.push(format!("cuBLAS SGEMM + bias kernel ({} calls: {why})", self.sgemm_linear_calls));
        }
        format!("GPU: conv {}; dense Linear {}", conv.join(" + "), lin.join(" + "))
    }
}

/// Per-device state of the two libraries: handles (or why not) and the usage record.
struct PerDevice {
    lt: OnceLock<std::result::Result<Arc<Mutex<LtHandle>>, String>>,
    dnn: OnceLock<std::result::Result<Arc<Mutex<DnnHandle>>, String>>,
    usage: Mutex<BackendUse>,
}

fn per_device(dev: &CudaDevice) -> Arc<PerDevice> {
    static ALL: OnceLock<Mutex<HashMap<usize, Arc<PerDevice>>>> = OnceLock::new();
    let mut all = ALL.get_or_init(|| Mutex::new(HashMap::new())).lock().unwrap_or_else(|p| p.into_inner());
    all.entry(dev.ordinal())
        .or_insert_with(|| {
            Arc::new(PerDevice {
                lt: OnceLock::new(),
                dnn: OnceLock::new(),
                usage: Mutex::new(BackendUse::default()),
            })
        })
        .clone()
}

/// This device's cuBLASLt handle (made on first use), or why it cannot be made.
pub fn lt(dev: &CudaDevice) -> std::result::Result<Arc<Mutex<LtHandle>>, String> {
    let p = per_device(dev);
    p.lt.get_or_init(|| LtHandle::new(dev).map(|h| Arc::new(Mutex::new(h)))).clone()
}

/// This device's cuDNN handle (made on first use), or why it cannot be made.
pub fn dnn(dev: &CudaDevice) -> std::result::Result<Arc<Mutex<DnnHandle>>, String> {
    let p = per_device(dev);
    p.dnn.get_or_init(|| DnnHandle::new(dev).map(|h| Arc::new(Mutex::new(h)))).clone()
}

/// Updates this device's usage record.
pub fn record(dev: &CudaDevice, f: impl FnOnce(&mut BackendUse)) {
    let p = per_device(dev);
    let mut u = p.usage.lock().unwrap_or_else(|e| e.into_inner());
    f(&mut u);
}

/// A copy of this device's usage record.
pub fn usage(dev: &CudaDevice) -> BackendUse {
    per_device(dev).usage.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_parse_and_reject_typos() {
        let names = ("cudnn", "im2col");
        assert_eq!(parse_override(CONV_VAR, None, names).unwrap(), Override::Auto);
        assert_eq!(parse_override(CONV_VAR, Some(""), names).unwrap(), Override::Auto);
        assert_eq!(parse_override(CONV_VAR, Some("AUTO"), names).unwrap(), Override::Auto);
        assert_eq!(parse_override(CONV_VAR, Some("im2col"), names).unwrap(), Override::Fallback);
        assert_eq!(parse_override(CONV_VAR, Some(" cuDNN "), names).unwrap(), Override::Library);
        let e = parse_override(CONV_VAR, Some("cudann"), names).unwrap_err().to_string();
        assert!(e.contains("SDSPARSE_GPU_CONV") && e.contains("expected auto, cudnn or im2col"), "{e}");
    }

    #[test]
    fn selection_falls_back_when_the_library_is_absent() {
        // "Library absent" as the loaders report it: a reason string instead of a handle.
        let absent: std::result::Result<u32, String> =
            Err("cuDNN could not be loaded (libcudnn.so.9 not found)".into());
        let present: std::result::Result<u32, String> = Ok(7);
        match choose("cuDNN", CONV_VAR, Override::Auto, &absent).unwrap() {
            Choice::Fallback(why) => assert!(why.contains("libcudnn.so.9 not found"), "{why}"),
            Choice::Library(_) => panic!("an absent library was chosen"),
        }
        assert!(matches!(choose("cuDNN", CONV_VAR, Override::Auto, &present).unwrap(), Choice::Library(7)));
        match choose("cuDNN", CONV_VAR, Override::Fallback, &present).unwrap() {
            Choice::Fallback(why) => assert_eq!(why, "SDSPARSE_GPU_CONV forces it"),
            Choice::Library(_) => panic!("the forced fallback was not taken"),
        }
        let e = choose("cuDNN", CONV_VAR, Override::Library, &absent).unwrap_err().to_string();
        assert!(e.contains("SDSPARSE_GPU_CONV asks for cuDNN, but cuDNN could not be loaded"), "{e}");
        assert!(!e.contains('\n'));
        assert!(matches!(
            choose("cuDNN", CONV_VAR, Override::Library, &present).unwrap(),
            Choice::Library(7)
        ));
    }

    #[test]
    fn library_probes_never_panic() {
        // On this machine the libraries may or may not be installed: either way the probes
        // answer (a version, or one line saying why not) instead of panicking in cudarc's loader.
        for (name, got) in [
            ("cuBLASLt", super::super::lt::probe().map(|()| "present".to_string())),
            ("cuDNN", super::super::dnn::probe()),
        ] {
            match got {
                Ok(v) => println!("{name}: {v}"),
                Err(why) => {
                    println!("{name}: {why}");
                    assert!(why.contains(name) && !why.contains('\n'), "{why}");
                }
            }
        }
    }

    #[test]
    fn summary_names_what_ran_and_why() {
        let mut u = BackendUse::default();
        assert_eq!(
            u.summary(),
            "GPU: conv im2col+cuBLAS (0 calls: no convolution ran); dense Linear cuBLAS SGEMM + bias kernel \
             (0 calls: no dense Linear ran)"
        );
        u.im2col_calls = 52;
        u.conv_fallback = Some("cuDNN could not be loaded (libcudnn.so.9 not found)".into());
        u.lt_calls = (4, 120, 0);
        let s = u.summary();
        assert!(s.starts_with("GPU: conv im2col+cuBLAS (52 calls: cuDNN could not be loaded"), "{s}");
        assert!(
            s.ends_with("dense Linear cuBLASLt (bias epilogue 120, GELU+bias epilogue 0, none 4)"),
            "{s}"
        );
        u.cudnn_calls = 50;
        u.cudnn_fused_bias = 48;
        u.cudnn_version = Some("9.10.2".into());
        u.sgemm_linear_calls = 2;
        u.linear_fallback = Some("cuBLASLt has no algorithm for this layout (NOT_SUPPORTED)".into());
        let s = u.summary();
        assert!(
            s.contains("conv cuDNN 9.10.2 (50 calls, 48 with fused bias) + im2col+cuBLAS (52 calls"),
            "{s}"
        );
        assert!(s.contains("+ cuBLAS SGEMM + bias kernel (2 calls: cuBLASLt has no algorithm"), "{s}");
        assert!(!s.contains('\n'));
    }
}
