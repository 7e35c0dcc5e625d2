//! The C ABI declared in `include/sdsparse.h`: open a model, generate into a caller's RGB
//! buffer, convert, free, and a thread-local last-error string.
//!
//! Every entry point runs inside `catch_unwind` (a panic becomes `SDSPARSE_ERR_PANIC`, never
//! an unwind into C), checks its pointers before use, and reports failures as an error code
//! plus a one-line message for `sdsparse_last_error`. The structs are `#[repr(C)]` mirrors of
//! the header's; `tests/c_api.rs` checks the header against this file and runs the example C
//! program in `examples/c/`.

use crate::backend::cuda::CudaDevice;
use crate::backend::Device;
use crate::convert::{convert, ConvertOptions};
use crate::error::Error;
use crate::format::DType;
use crate::pipeline::{GenerateRequest, StableDiffusion};
use crate::prune::{ComponentKind, Pattern};
use crate::scheduler::SchedulerKind;
use std::cell::RefCell;
use std::ffi::{c_char, c_int, CStr, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;

pub const SDSPARSE_OK: c_int = 0;
pub const SDSPARSE_ERR_NULL_ARGUMENT: c_int = 1;
pub const SDSPARSE_ERR_INVALID_ARGUMENT: c_int = 2;
pub const SDSPARSE_ERR_BUFFER_TOO_SMALL: c_int = 3;
pub const SDSPARSE_ERR_IO: c_int = 4;
pub const SDSPARSE_ERR_CHECKPOINT: c_int = 5;
pub const SDSPARSE_ERR_CUDA: c_int = 6;
pub const SDSPARSE_ERR_PANIC: c_int = 7;
pub const SDSPARSE_ERR_OTHER: c_int = 8;

pub const SDSPARSE_DEVICE_CPU: c_int = 0;
pub const SDSPARSE_DEVICE_CUDA: c_int = 1;

pub const SDSPARSE_DTYPE_DEFAULT: c_int = 0;
pub const SDSPARSE_DTYPE_F32: c_int = 1;
pub const SDSPARSE_DTYPE_F16: c_int = 2;
pub const SDSPARSE_DTYPE_BF16: c_int = 3;

/// Bumped whenever a struct layout or a signature of the header changes.
pub const SDSPARSE_ABI_VERSION: u32 = 1;

/// `sdsparse_generate_params` (header).
#[repr(C)]
pub struct SdsparseGenerateParams {
    pub prompt: *const c_char,
    pub negative_prompt: *const c_char,
    pub scheduler: *const c_char,
    pub steps: u32,
    pub guidance: f32,
    pub seed: u64,
    pub width: u32,
    pub height: u32,
}

/// `sdsparse_convert_options` (header).
#[repr(C)]
pub struct SdsparseConvertOptions {
    pub text_encoder_sparsity: f64,
    pub unet_sparsity: f64,
    pub pattern: *const c_char,
    pub text_encoder_pattern: *const c_char,
    pub unet_pattern: *const c_char,
    pub method: *const c_char,
    pub scope: *const c_char,
    pub dtype: *const c_char,
    pub seed: u64,
    pub include_conv: i32,
    pub force: i32,
}

/// `sdsparse_convert_report` (header).
#[repr(C)]
pub struct SdsparseConvertReport {
    pub text_encoder_sparsity: f64,
    pub unet_sparsity: f64,
    pub size_ratio: f64,
    pub seconds: f64,
}

/// `sdsparse_model` (opaque in the header).
pub struct SdsparseModel {
    sd: StableDiffusion,
}

thread_local! {
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

/// An error on its way to C: the code and the message `sdsparse_last_error` returns.
struct Failure(c_int, String);

impl From<Error> for Failure {
    fn from(e: Error) -> Failure {
        let code = match &e {
            Error::Io { .. } => SDSPARSE_ERR_IO,
            Error::Checkpoint(_) | Error::Format(_) | Error::Shape(_) => SDSPARSE_ERR_CHECKPOINT,
            Error::Invalid(_) => SDSPARSE_ERR_INVALID_ARGUMENT,
            Error::Cuda(_) => SDSPARSE_ERR_CUDA,
            Error::Msg(_) => SDSPARSE_ERR_OTHER,
        };
        Failure(code, e.to_string())
    }
}

fn invalid(msg: impl Into<String>) -> Failure {
    Failure(SDSPARSE_ERR_INVALID_ARGUMENT, msg.into())
}

fn set_last_error(msg: &str) {
    // Interior NULs cannot be in a C string; they never appear in our messages, but be safe.
    let c = CString::new(msg.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = c);
}

/// Runs an entry point's body: no panic leaves, failures set the last error.
fn guard(f: impl FnOnce() -> Result<(), Failure>) -> c_int {
    match catch_unwind(AssertUnwindSafe(f)) {
        Ok(Ok(())) => SDSPARSE_OK,
        Ok(Err(Failure(code, msg))) => {
            set_last_error(&msg);
            code
        }
        Err(payload) => {
            let what = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "unknown panic".into());
            set_last_error(&format!("internal error (panic): {what}"));
            SDSPARSE_ERR_PANIC
        }
    }
}

/// A required pointer argument, or a "null argument" failure naming it.
fn non_null<'a, T>(p: *const T, what: &str) -> Result<&'a T, Failure> {
    // SAFETY: the caller passes either NULL or a valid pointer to a live `T` (header contract).
    unsafe { p.as_ref() }.ok_or_else(|| Failure(SDSPARSE_ERR_NULL_ARGUMENT, format!("{what} is NULL")))
}

fn non_null_mut<'a, T>(p: *mut T, what: &str) -> Result<&'a mut T, Failure> {
    // SAFETY: as `non_null`, for an exclusive pointer.
    unsafe { p.as_mut() }.ok_or_else(|| Failure(SDSPARSE_ERR_NULL_ARGUMENT, format!("{what} is NULL")))
}

/// A NUL-terminated UTF-8 string argument; `None` for NULL.
fn opt_str(p: *const c_char, what: &str) -> Result<Option<String>, Failure> {
    if p.is_null() {
        return Ok(None);
    }
    // SAFETY: non-NULL string arguments are NUL-terminated (header contract).
    let s = unsafe { CStr::from_ptr(p) };
    s.to_str().map(|s| Some(s.to_string())).map_err(|_| invalid(format!("{what} is not valid UTF-8")))
}

fn req_str(p: *const c_char, what: &str) -> Result<String, Failure> {
    opt_str(p, what)?.ok_or_else(|| Failure(SDSPARSE_ERR_NULL_ARGUMENT, format!("{what} is NULL")))
}

/// The library version, e.g. `"0.1.0"` (static storage).
#[no_mangle]
pub extern "C" fn sdsparse_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr() as *const c_char
}

/// [`SDSPARSE_ABI_VERSION`].
#[no_mangle]
pub extern "C" fn sdsparse_abi_version() -> u32 {
    SDSPARSE_ABI_VERSION
}

/// The message of the last failed call on this thread (`""` when none); valid until the next
/// failing call on this thread.
#[no_mangle]
pub extern "C" fn sdsparse_last_error() -> *const c_char {
    // During thread teardown the thread-local may be gone: then there is no message.
    catch_unwind(|| LAST_ERROR.try_with(|e| e.borrow().as_ptr()).ok()).ok().flatten().unwrap_or(c"".as_ptr())
}

/// Loads a pipeline folder on a device; `*out` receives the model (NULL on failure).
///
/// # Safety
/// `path` is NULL or a NUL-terminated string; `out` is NULL or points to writable storage.
#[no_mangle]
pub unsafe extern "C" fn sdsparse_open(
    path: *const c_char,
    device: c_int,
    out: *mut *mut SdsparseModel,
) -> c_int {
    // SAFETY: the caller's contract is sdsparse_open_dtype's.
    unsafe { sdsparse_open_dtype(path, device, SDSPARSE_DTYPE_DEFAULT, out) }
}

/// `sdsparse_open` with the activation dtype (`SDSPARSE_DTYPE_*`; DEFAULT: f16 on CUDA, f32
/// on the CPU, which computes in f32 only: f16 / bf16 there are an invalid argument).
///
/// # Safety
/// As `sdsparse_open`.
#[no_mangle]
pub unsafe extern "C" fn sdsparse_open_dtype(
    path: *const c_char,
    device: c_int,
    dtype: c_int,
    out: *mut *mut SdsparseModel,
) -> c_int {
    guard(|| {
        let out = non_null_mut(out, "out")?;
        *out = std::ptr::null_mut();
        let path = PathBuf::from(req_str(path, "path")?);
        let dtype = match dtype {
            SDSPARSE_DTYPE_DEFAULT => None,
            SDSPARSE_DTYPE_F32 => Some(crate::DType::F32),
            SDSPARSE_DTYPE_F16 => Some(crate::DType::F16),
            SDSPARSE_DTYPE_BF16 => Some(crate::DType::BF16),
            other => return Err(invalid(format!("dtype must be one of SDSPARSE_DTYPE_*, got {other}"))),
        };
        let device = match device {
            SDSPARSE_DEVICE_CPU => Device::Cpu,
            SDSPARSE_DEVICE_CUDA => Device::Cuda(CudaDevice::new(0)?),
            other => {
                return Err(invalid(format!(
                    "device must be SDSPARSE_DEVICE_CPU or SDSPARSE_DEVICE_CUDA, got {other}"
                )))
            }
        };
        let dtype = dtype.unwrap_or_else(|| device.default_activation_dtype());
        let sd = StableDiffusion::load_as(&path, &Default::default(), &device, dtype)?;
        *out = Box::into_raw(Box::new(SdsparseModel { sd }));
        Ok(())
    })
}

/// Frees a model from `sdsparse_open` (NULL is a no-op).
///
/// # Safety
/// `model` is NULL or a pointer from `sdsparse_open` not freed before.
#[no_mangle]
pub unsafe extern "C" fn sdsparse_free(model: *mut SdsparseModel) {
    if !model.is_null() {
        // A panic in a destructor must not unwind into C either.
        let _ = catch_unwind(AssertUnwindSafe(|| {
            // SAFETY: `model` came from `Box::into_raw` in `sdsparse_open` (caller contract).
            drop(unsafe { Box::from_raw(model) })
        }));
    }
}

/// Fills `params` with the defaults (50 steps, guidance 7.5, seed 0, the checkpoint's
/// scheduler and size, empty prompts).
///
/// # Safety
/// `params` is NULL or points to writable storage.
#[no_mangle]
pub unsafe extern "C" fn sdsparse_generate_params_init(params: *mut SdsparseGenerateParams) -> c_int {
    guard(|| {
        let p = non_null_mut(params, "params")?;
        let d = GenerateRequest::new("");
        *p = SdsparseGenerateParams {
            prompt: std::ptr::null(),
            negative_prompt: std::ptr::null(),
            scheduler: std::ptr::null(),
            steps: d.steps as u32,
            guidance: d.guidance,
            seed: d.seed,
            width: 0,
            height: 0,
        };
        Ok(())
    })
}

/// The request the params describe, checked.
fn request(p: &SdsparseGenerateParams) -> Result<GenerateRequest, Failure> {
    let mut req = GenerateRequest::new(&req_str(p.prompt, "params.prompt")?);
    req.negative_prompt = opt_str(p.negative_prompt, "params.negative_prompt")?.unwrap_or_default();
    req.scheduler =
        opt_str(p.scheduler, "params.scheduler")?.map(|s| SchedulerKind::from_cli_name(&s)).transpose()?;
    if p.steps == 0 {
        return Err(invalid("params.steps must be at least 1"));
    }
    req.steps = p.steps as usize;
    req.guidance = p.guidance;
    req.seed = p.seed;
    req.width = (p.width > 0).then_some(p.width as usize);
    req.height = (p.height > 0).then_some(p.height as usize);
    Ok(req)
}

/// Bytes of a `w x h` RGB image, or an error when that does not fit in memory's address space.
fn rgb_bytes(w: usize, h: usize) -> Result<usize, Failure> {
    w.checked_mul(h)
        .and_then(|p| p.checked_mul(3))
        .filter(|&n| n <= isize::MAX as usize)
        .ok_or_else(|| invalid(format!("a {w}x{h} image is too large")))
}

/// `(width, height)` of the image a request gives, after checking it.
fn image_size(sd: &StableDiffusion, req: &GenerateRequest) -> Result<(usize, usize), Failure> {
    let shape = sd.latent_shape(req)?;
    let f = sd.vae_scale_factor();
    Ok((shape[3] * f, shape[2] * f))
}

/// The size of the image `params` would produce (the RGB buffer needs `3 * width * height`
/// bytes).
///
/// # Safety
/// `model` is NULL or from `sdsparse_open`; `params` NULL or valid; `width`/`height` NULL or
/// writable.
#[no_mangle]
pub unsafe extern "C" fn sdsparse_image_size(
    model: *const SdsparseModel,
    params: *const SdsparseGenerateParams,
    width: *mut u32,
    height: *mut u32,
) -> c_int {
    guard(|| {
        let m = non_null(model, "model")?;
        let req = request(non_null(params, "params")?)?;
        let (w_out, h_out) = (non_null_mut(width, "width")?, non_null_mut(height, "height")?);
        let (w, h) = image_size(&m.sd, &req)?;
        (*w_out, *h_out) = (w as u32, h as u32);
        Ok(())
    })
}

/// Generates an image into `rgb` (`3 * width * height` bytes, row-major, RGB interleaved;
/// the bytes the Rust API's `Generated::to_rgb8` gives).
///
/// # Safety
/// `model` is NULL or from `sdsparse_open`; `params` NULL or valid; `rgb` NULL or writable for
/// `rgb_len` bytes.
#[no_mangle]
pub unsafe extern "C" fn sdsparse_generate(
    model: *const SdsparseModel,
    params: *const SdsparseGenerateParams,
    rgb: *mut u8,
    rgb_len: usize,
) -> c_int {
    guard(|| {
        let m = non_null(model, "model")?;
        let req = request(non_null(params, "params")?)?;
        if rgb.is_null() {
            return Err(Failure(SDSPARSE_ERR_NULL_ARGUMENT, "rgb is NULL".into()));
        }
        // Check the buffer before any work.
        let (w, h) = image_size(&m.sd, &req)?;
        let need = rgb_bytes(w, h)?;
        if rgb_len < need {
            return Err(Failure(
                SDSPARSE_ERR_BUFFER_TOO_SMALL,
                format!("rgb buffer holds {rgb_len} bytes; the {w}x{h} image needs {need}"),
            ));
        }
        let image = m.sd.generate(&req, &mut |_, _| {})?.to_rgb8()?;
        // SAFETY: `rgb` is writable for `rgb_len >= need` bytes (caller contract, checked size).
        let dst = unsafe { std::slice::from_raw_parts_mut(rgb, need) };
        dst.copy_from_slice(&image.pixels);
        Ok(())
    })
}

/// Fills `options` with the defaults (the study's recipe: text encoder 47.5%, UNet 35%,
/// unstructured magnitude pruning per layer, stored dtypes kept, no overwrite).
///
/// # Safety
/// `options` is NULL or points to writable storage.
#[no_mangle]
pub unsafe extern "C" fn sdsparse_convert_options_init(options: *mut SdsparseConvertOptions) -> c_int {
    guard(|| {
        let o = non_null_mut(options, "options")?;
        *o = SdsparseConvertOptions {
            text_encoder_sparsity: -1.0,
            unet_sparsity: -1.0,
            pattern: std::ptr::null(),
            text_encoder_pattern: std::ptr::null(),
            unet_pattern: std::ptr::null(),
            method: std::ptr::null(),
            scope: std::ptr::null(),
            dtype: std::ptr::null(),
            seed: 0,
            include_conv: 0,
            force: 0,
        };
        Ok(())
    })
}

fn convert_options(o: &SdsparseConvertOptions) -> Result<ConvertOptions, Failure> {
    let d = ConvertOptions::default();
    let sparsity = |v: f64| (v >= 0.0).then_some(v);
    let parse_pattern =
        |p, what| opt_str(p, what)?.map(|s| s.parse::<Pattern>()).transpose().map_err(Failure::from);
    let dtype = match opt_str(o.dtype, "options.dtype")?.as_deref() {
        None | Some("keep") => None,
        Some("f32") => Some(DType::F32),
        Some("f16") => Some(DType::F16),
        Some("bf16") => Some(DType::BF16),
        Some(other) => {
            return Err(invalid(format!("unknown dtype '{other}' (expected keep, f16, bf16 or f32)")))
        }
    };
    let mut opts = ConvertOptions {
        text_encoder_sparsity: sparsity(o.text_encoder_sparsity),
        unet_sparsity: sparsity(o.unet_sparsity),
        pattern: parse_pattern(o.pattern, "options.pattern")?.unwrap_or(d.pattern),
        text_encoder_pattern: parse_pattern(o.text_encoder_pattern, "options.text_encoder_pattern")?,
        unet_pattern: parse_pattern(o.unet_pattern, "options.unet_pattern")?,
        seed: o.seed,
        dtype,
        force: o.force != 0,
        ..d
    };
    if let Some(m) = opt_str(o.method, "options.method")? {
        opts.method = m.parse()?;
    }
    if let Some(s) = opt_str(o.scope, "options.scope")? {
        opts.scope = s.parse()?;
    }
    opts.selection.include_conv = o.include_conv != 0;
    Ok(opts)
}

/// Prunes the dense pipeline folder `model` into the sparse folder `out`; `report` (may be
/// NULL) receives the achieved sparsities and sizes.
///
/// # Safety
/// `model`/`out` NULL or NUL-terminated; `options` NULL or valid; `report` NULL or writable.
#[no_mangle]
pub unsafe extern "C" fn sdsparse_convert(
    model: *const c_char,
    out: *const c_char,
    options: *const SdsparseConvertOptions,
    report: *mut SdsparseConvertReport,
) -> c_int {
    guard(|| {
        let model = PathBuf::from(req_str(model, "model")?);
        let out = PathBuf::from(req_str(out, "out")?);
        let opts = convert_options(non_null(options, "options")?)?;
        let r = convert(&model, &out, &opts, &mut |_| {})?;
        // SAFETY: NULL or writable (caller contract).
        if let Some(dst) = unsafe { report.as_mut() } {
            let achieved = |kind: ComponentKind| {
                r.components
                    .iter()
                    .find(|c| ComponentKind::from_folder(&c.name) == kind)
                    .map_or(0.0, |c| c.achieved_sparsity())
            };
            *dst = SdsparseConvertReport {
                text_encoder_sparsity: achieved(ComponentKind::TextEncoder),
                unet_sparsity: achieved(ComponentKind::Unet),
                size_ratio: r.te_unet_ratio(),
                seconds: r.seconds,
            };
        }
        Ok(())
    })
}

// A model may be used from any thread, also from several at once (header contract): every
// entry point takes it read-only, so `Send + Sync` is what that needs.
const _: () = {
    const fn send_and_sync<T: Send + Sync>() {}
    send_and_sync::<SdsparseModel>();
};

#[cfg(test)]
mod tests {
    use super::*;

    fn last_error() -> String {
        // SAFETY: sdsparse_last_error returns a NUL-terminated string that lives until the next
        // failing call on this thread.
        unsafe { CStr::from_ptr(sdsparse_last_error()) }.to_string_lossy().into_owned()
    }

    #[test]
    fn a_panic_becomes_an_error_code_and_message() {
        assert_eq!(guard(|| panic!("planted panic")), SDSPARSE_ERR_PANIC);
        assert!(last_error().contains("planted panic"), "{}", last_error());
        let code = guard(|| Err(Error::Invalid("bad thing".into()).into()));
        assert_eq!(code, SDSPARSE_ERR_INVALID_ARGUMENT);
        assert_eq!(last_error(), "invalid argument: bad thing");
        assert_eq!(guard(|| Ok(())), SDSPARSE_OK);
    }
}
