//! Build script: compiles every `cuda/*.cu` into one fatbin and embeds it in the crate.
//!
//! - nvcc is looked up in `NVCC`, `$CUDA_HOME/bin`, `$CUDA_PATH/bin`, `PATH`, and finally the
//!   repo-local cache that `tools/install_cuda.sh` fills (`.cache/cuda/nvidia/cu13/bin/nvcc`).
//! - All `.cu` files are `#include`d into one generated translation unit, so the crate ships a
//!   single fatbin (SASS for sm_75, sm_80, sm_86, sm_89, sm_90a plus compute_75 and compute_80
//!   PTX) and Rust finds kernels by their `extern "C"` names. sm_75 (Turing, CUDA 13's oldest
//!   target) gets every kernel, the tensor-core ones as traps (`cuda/include/sdsparse_arch.h`):
//!   such GPUs run the dense cuBLAS path only (docs/CUDA.md).
//! - The fatbin is cached under `<target>/sdsparse-fatbin/`, keyed by a hash of everything in
//!   `cuda/`, the flags and the nvcc version: check, clippy, test and bench each run this script,
//!   and only the first one pays for nvcc.
//! - Without nvcc the crate builds CPU-only (cfg `sdsparse_cuda_kernels` unset) after a warning;
//!   `SDSPARSE_REQUIRE_CUDA=1` turns that, and a failing compile, into a build error.

use std::env;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// Real architectures get SASS; `compute_80` PTX lets newer GPUs JIT the kernels. sm_75 SASS
/// (with the tensor-core kernels as traps) serves Turing GPUs in the dense-only mode; its
/// `compute_75` PTX (56 KB compressed) is the fallback for a driver that cannot use the SASS.
/// Adding sm_75 grew the fatbin by 0.96 MB (10.45 -> 11.42 MB) and nvcc by ~0.5 s (docs/CUDA.md).
const GENCODES: &[(&str, &str)] = &[
    ("compute_75", "sm_75"),
    ("compute_80", "sm_80"),
    ("compute_86", "sm_86"),
    ("compute_89", "sm_89"),
    ("compute_90a", "sm_90a"),
    ("compute_75", "compute_75"),
    ("compute_80", "compute_80"),
];

/// Flags that change the generated code (they are part of the cache key).
const NVCC_FLAGS: &[&str] = &["-fatbin", "-O3", "-std=c++17", "-lineinfo", "--expt-relaxed-constexpr"];

/// The repo-local install of `tools/install_cuda.sh`.
const LOCAL_NVCC: &str = ".cache/cuda/nvidia/cu13/bin/nvcc";

/// How many cached fatbins to keep (older ones are deleted).
const CACHE_KEEP: usize = 6;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(sdsparse_cuda_kernels)");
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rerun-if-changed=cuda");
    for var in ["NVCC", "CUDA_HOME", "CUDA_PATH", "PATH", "SDSPARSE_REQUIRE_CUDA"] {
        println!("cargo::rerun-if-env-changed={var}");
    }

    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"));
    let out_dir = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    let require = matches!(env::var("SDSPARSE_REQUIRE_CUDA").as_deref(), Ok("1") | Ok("true") | Ok("yes"));

    match build_fatbin(&root, &out_dir) {
        Ok(info) => {
            println!("cargo::rustc-cfg=sdsparse_cuda_kernels");
            println!("cargo::rustc-env=SDSPARSE_NVCC_VERSION={}", info.nvcc_version);
            println!("cargo::rustc-env=SDSPARSE_FATBIN_KEY={}", info.key);
        }
        Err(BuildError::NoNvcc(why)) => {
            if require {
                fail(&format!(
                    "SDSPARSE_REQUIRE_CUDA is set but no nvcc was found: {why}. Run tools/install_cuda.sh or set NVCC."
                ));
            }
            println!(
                "cargo::warning=no nvcc found ({why}); building without CUDA kernels. \
                 Run tools/install_cuda.sh (or set NVCC) for GPU support."
            );
        }
        Err(BuildError::Compile(log)) => {
            if require {
                fail(&format!("nvcc failed to compile the CUDA kernels:\n{log}"));
            }
            println!("cargo::warning=nvcc failed; building without CUDA kernels. nvcc said:");
            for line in log.lines().take(60) {
                println!("cargo::warning=  {line}");
            }
        }
    }
}

/// Stops the build with a message (cargo prints it under "failed to run custom build command").
fn fail(message: &str) -> ! {
    eprintln!("error: {message}");
    std::process::exit(1);
}

enum BuildError {
    NoNvcc(String),
    Compile(String),
}

struct FatbinInfo {
    nvcc_version: String,
    key: String,
}

fn build_fatbin(root: &Path, out_dir: &Path) -> Result<FatbinInfo, BuildError> {
    let nvcc = find_nvcc(root)?;
    let version_text = Command::new(&nvcc)
        .arg("--version")
        .output()
        .map_err(|e| BuildError::NoNvcc(format!("{} does not run: {e}", nvcc.display())))?;
    if !version_text.status.success() {
        return Err(BuildError::NoNvcc(format!("{} --version failed", nvcc.display())));
    }
    let version_text = String::from_utf8_lossy(&version_text.stdout).into_owned();
    let nvcc_version = version_text
        .split_whitespace()
        .find(|w| w.starts_with('V') && w[1..].starts_with(|c: char| c.is_ascii_digit()))
        .unwrap_or("unknown")
        .trim_start_matches('V')
        .to_string();

    let cuda_dir = root.join("cuda");
    let sources = list_files(&cuda_dir, |p| p.extension().is_some_and(|e| e == "cu"), false);
    if sources.is_empty() {
        return Err(BuildError::Compile(format!("no .cu files in {}", cuda_dir.display())));
    }
    // One translation unit that includes every kernel file: one fatbin, one module to load.
    let mut unity = String::from("// Generated by build.rs: every cuda/*.cu in one translation unit.\n");
    for src in &sources {
        let name = src.strip_prefix(&cuda_dir).expect("listed under cuda/").to_string_lossy();
        unity.push_str(&format!("#include \"{name}\"\n"));
    }

    let gencode_args: Vec<String> =
        GENCODES.iter().map(|(virt, real)| format!("-gencode=arch={virt},code={real}")).collect();

    // Cache key: all of cuda/ (sources and headers), the unity file, flags and the compiler.
    let mut hasher = Fnv128::new();
    for file in list_files(&cuda_dir, |_| true, true) {
        hasher.write(file.strip_prefix(&cuda_dir).expect("under cuda/").to_string_lossy().as_bytes());
        hasher.write(&fs::read(&file).map_err(|e| BuildError::Compile(format!("{}: {e}", file.display())))?);
    }
    hasher.write(unity.as_bytes());
    for flag in NVCC_FLAGS.iter().copied().chain(gencode_args.iter().map(String::as_str)) {
        hasher.write(flag.as_bytes());
    }
    hasher.write(version_text.as_bytes());
    let key = hasher.hex();

    let fatbin = out_dir.join("sdsparse.fatbin");
    let cache_dir = cache_dir(out_dir);
    let cached = cache_dir.join(format!("{key}.fatbin"));
    if cached.is_file() && fs::copy(&cached, &fatbin).is_ok() {
        return Ok(FatbinInfo { nvcc_version, key });
    }

    let unity_path = out_dir.join("sdsparse_kernels.cu");
    fs::write(&unity_path, &unity)
        .map_err(|e| BuildError::Compile(format!("{}: {e}", unity_path.display())))?;
    // nvcc compiles the architectures in parallel with --threads; cargo's job count is the budget.
    let jobs: usize = env::var("NUM_JOBS").ok().and_then(|j| j.parse().ok()).unwrap_or(2);
    let threads = jobs.clamp(1, GENCODES.len());
    let started = Instant::now();
    let output = Command::new(&nvcc)
        .args(NVCC_FLAGS)
        .args(&gencode_args)
        .arg(format!("--threads={threads}"))
        .arg("-I")
        .arg(cuda_dir.join("include"))
        .arg("-I")
        .arg(&cuda_dir)
        .arg("-o")
        .arg(&fatbin)
        .arg(&unity_path)
        .output()
        .map_err(|e| BuildError::Compile(format!("cannot run {}: {e}", nvcc.display())))?;
    if !output.status.success() {
        let mut log = String::from_utf8_lossy(&output.stderr).into_owned();
        log.push_str(&String::from_utf8_lossy(&output.stdout));
        return Err(BuildError::Compile(log));
    }
    let seconds = started.elapsed().as_secs_f64();
    // Recorded next to the fatbin for whoever wants the compile time (CI logs print it).
    let _ = fs::write(out_dir.join("nvcc-seconds.txt"), format!("{seconds:.1}\n"));

    // Publish to the cache atomically: concurrent builds of other profiles may race us.
    if fs::create_dir_all(&cache_dir).is_ok() {
        let tmp = cache_dir.join(format!("{key}.{}.tmp", std::process::id()));
        if fs::copy(&fatbin, &tmp).is_ok() && fs::rename(&tmp, &cached).is_err() {
            let _ = fs::remove_file(&tmp);
        }
        let _ = fs::write(cache_dir.join(format!("{key}.seconds")), format!("{seconds:.1}\n"));
        prune_cache(&cache_dir);
    }
    Ok(FatbinInfo { nvcc_version, key })
}

fn find_nvcc(root: &Path) -> Result<PathBuf, BuildError> {
    if let Some(nvcc) = env::var_os("NVCC").filter(|v| !v.is_empty()) {
        let nvcc = PathBuf::from(nvcc);
        return if nvcc.is_file() {
            Ok(nvcc)
        } else {
            Err(BuildError::NoNvcc(format!("NVCC={} is not a file", nvcc.display())))
        };
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(home) = env::var_os(var).filter(|v| !v.is_empty()) {
            let nvcc = PathBuf::from(home).join("bin").join("nvcc");
            if nvcc.is_file() {
                return Ok(nvcc);
            }
        }
    }
    if let Some(path) = env::var_os("PATH") {
        for dir in env::split_paths(&path) {
            let nvcc = dir.join("nvcc");
            if nvcc.is_file() {
                return Ok(nvcc);
            }
        }
    }
    let local = root.join(LOCAL_NVCC);
    if local.is_file() {
        // Reinstalling the local toolkit (e.g. another pin) must rebuild the kernels.
        println!("cargo::rerun-if-changed={}", local.display());
        return Ok(local);
    }
    Err(BuildError::NoNvcc("not in NVCC, CUDA_HOME, CUDA_PATH, PATH or .cache/cuda".into()))
}

/// `<target>/sdsparse-fatbin`: OUT_DIR is `<target>[/<triple>]/<profile>/build/<pkg>-<hash>/out`,
/// so every profile of this checkout shares the cache.
fn cache_dir(out_dir: &Path) -> PathBuf {
    out_dir.ancestors().nth(4).unwrap_or(out_dir).join("sdsparse-fatbin")
}

fn prune_cache(cache_dir: &Path) {
    let Ok(entries) = fs::read_dir(cache_dir) else { return };
    let mut fatbins: Vec<(std::time::SystemTime, PathBuf)> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "fatbin"))
        .filter_map(|p| Some((fs::metadata(&p).ok()?.modified().ok()?, p)))
        .collect();
    fatbins.sort_by_key(|f| std::cmp::Reverse(f.0));
    for (_, old) in fatbins.into_iter().skip(CACHE_KEEP) {
        let _ = fs::remove_file(old.with_extension("seconds"));
        let _ = fs::remove_file(old);
    }
}

/// Files under `dir` accepted by `keep`, sorted by path (recursing when `recurse`).
fn list_files(dir: &Path, keep: impl Fn(&Path) -> bool + Copy, recurse: bool) -> Vec<PathBuf> {
    let mut files = Vec::new();
    if let Ok(entries) = fs::read_dir(dir) {
        for entry in entries.filter_map(|e| e.ok()) {
            let path = entry.path();
            if path.is_dir() {
                if recurse {
                    files.extend(list_files(&path, keep, true));
                }
            } else if keep(&path) {
                files.push(path);
            }
        }
    }
    files.sort();
    files
}

/// FNV-1a, 128-bit: a stable content hash without build dependencies (std's hasher may change
/// between Rust releases, which would only cost a recompile, but this never does).
struct Fnv128(u128);

impl Fnv128 {
    fn new() -> Self {
        Fnv128(0x6c62272e07bb014262b821756295c58d)
    }
    fn write(&mut self, bytes: &[u8]) {
        // Length first, so that ("ab", "c") and ("a", "bc") hash differently.
        for &b in (bytes.len() as u64).to_le_bytes().iter().chain(bytes) {
            self.0 ^= u128::from(b);
            self.0 = self.0.wrapping_mul(0x0000000001000000000000000000013B);
        }
    }
    fn hex(&self) -> String {
        format!("{:032x}", self.0)
    }
}
