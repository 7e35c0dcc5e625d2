//! The C ABI: `include/sdsparse.h` agrees with `src/capi.rs` (constants, struct fields,
//! function signatures; a planted mismatch is caught), the example C program in
//! `examples/c/generate.c`, built with the `cc` crate against the cdylib, produces the Rust
//! API's image bit for bit on the tiny fixture, and misuse from C (NULL pointers, bad paths,
//! a too-small buffer, bad options) gives error codes and messages, not crashes.

use sdsparse::{Device, GenerateRequest, StableDiffusion};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

mod reference_util;
use reference_util::fixture;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

// ---------------------------------------------------------------- header vs Rust

/// The Rust spelling of a C type of the header.
fn c_type_to_rust(c: &str) -> String {
    let c = c.split_whitespace().collect::<Vec<_>>().join(" ");
    let (base, stars) = (c.trim_end_matches(['*', ' ']), c.matches('*').count());
    let is_const = base.starts_with("const ");
    let base = base.trim_start_matches("const ").trim();
    let mut t = match base {
        "void" if stars == 0 => "()".to_string(),
        "void" => "c_void".into(),
        "int" => "c_int".into(),
        "char" => "c_char".into(),
        "float" => "f32".into(),
        "double" => "f64".into(),
        "size_t" => "usize".into(),
        "uint8_t" => "u8".into(),
        "int32_t" => "i32".into(),
        "uint32_t" => "u32".into(),
        "uint64_t" => "u64".into(),
        s if s.starts_with("sdsparse_") => {
            s.split('_').map(|w| w[..1].to_uppercase() + &w[1..]).collect::<String>()
        }
        other => panic!("no Rust mapping for C type {other:?}"),
    };
    for i in 0..stars {
        // `const` binds to the innermost pointee.
        t = format!("{} {t}", if i == 0 && is_const { "*const" } else { "*mut" });
    }
    t
}

/// Splits a C declaration `TYPE NAME` into `(TYPE, NAME)`.
fn split_decl(decl: &str) -> (String, String) {
    let decl = decl.trim();
    let at = decl.rfind(|c: char| !(c.is_alphanumeric() || c == '_')).expect("a declaration has a type");
    (decl[..=at].to_string(), decl[at + 1..].to_string())
}

/// Everything the header declares, in Rust spelling: `#define` values, struct fields and
/// function signatures `name(arg: type, ..) -> ret`.
#[derive(Debug, PartialEq, Default)]
struct Api {
    constants: BTreeMap<String, i64>,
    structs: BTreeMap<String, Vec<(String, String)>>,
    functions: BTreeMap<String, String>,
}

fn strip_c_comments(s: &str) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find("/*") {
        out += &rest[..i];
        rest = rest[i..].find("*/").map_or("", |j| &rest[i + j + 2..]);
    }
    out + rest
}

fn parse_header(text: &str) -> Api {
    let text = strip_c_comments(text);
    let mut api = Api::default();
    for line in text.lines() {
        let w: Vec<&str> = line.split_whitespace().collect();
        if w.len() == 3 && w[0] == "#define" {
            if let Ok(v) = w[2].parse::<i64>() {
                api.constants.insert(w[1].to_string(), v);
            }
        }
    }
    // Everything but preprocessor lines and `extern "C" {` braces, as statements.
    let body: String = text
        .lines()
        .filter(|l| !l.trim_start().starts_with('#') && !l.contains("extern \"C\"") && l.trim() != "}")
        .collect::<Vec<_>>()
        .join(" ");
    // Struct definitions `typedef struct NAME { TYPE FIELD; .. } NAME;` first (opaque ones,
    // `typedef struct NAME NAME;`, just go), then the function prototypes.
    let mut body = body;
    while let Some(i) = body.find("typedef struct") {
        let after = body[i + "typedef struct".len()..].to_string();
        let semi = after.find(';').expect("typedef ends");
        let end = match after.find('{').filter(|&open| open < semi) {
            None => semi,
            Some(open) => {
                let close = after.find('}').expect("struct closes");
                let fields = after[open + 1..close]
                    .split(';')
                    .map(str::trim)
                    .filter(|f| !f.is_empty())
                    .map(|f| {
                        let (ty, field) = split_decl(f);
                        (field, c_type_to_rust(&ty))
                    })
                    .collect();
                api.structs.insert(after[..open].trim().to_string(), fields);
                close + after[close..].find(';').expect("typedef name ends")
            }
        };
        body = body[..i].to_string() + &after[end + 1..];
    }
    for stmt in body.split(';').map(str::trim).filter(|s| !s.is_empty()) {
        let open = stmt.find('(').unwrap_or_else(|| panic!("not a prototype: {stmt:?}"));
        let (ret, name) = split_decl(&stmt[..open]);
        let args = stmt[open + 1..stmt.rfind(')').expect("prototype closes")].trim();
        let args: Vec<String> = if args == "void" {
            vec![]
        } else {
            args.split(',')
                .map(|a| {
                    let (ty, n) = split_decl(a);
                    format!("{n}: {}", c_type_to_rust(&ty))
                })
                .collect()
        };
        let ret = c_type_to_rust(&ret);
        let ret = if ret == "()" { String::new() } else { format!(" -> {ret}") };
        api.functions.insert(name, format!("({}){ret}", args.join(", ")));
    }
    api
}

/// The same from `src/capi.rs`: `pub const SDSPARSE_*`, `#[repr(C)]` structs and the
/// `#[no_mangle]` functions.
fn parse_rust(text: &str) -> Api {
    let mut api = Api::default();
    let flat: String = text.lines().map(|l| l.split("//").next().unwrap_or("")).collect::<Vec<_>>().join(" ");
    for stmt in flat.split(';') {
        let w: Vec<&str> = stmt.split_whitespace().collect();
        if w.len() >= 5 && w[0] == "pub" && w[1] == "const" && w[2].starts_with("SDSPARSE_") {
            let v = w.last().unwrap_or(&"").parse::<i64>().expect("integer constant");
            api.constants.insert(w[2].trim_end_matches(':').to_string(), v);
        }
    }
    let mut rest = flat.as_str();
    while let Some(i) = rest.find("#[repr(C)] pub struct ") {
        rest = &rest[i + "#[repr(C)] pub struct ".len()..];
        let (name, body) = rest.split_once('{').expect("struct body");
        let body = &body[..body.find('}').expect("struct closes")];
        let fields = body
            .split(',')
            .map(str::trim)
            .filter(|f| !f.is_empty())
            .map(|f| {
                let (n, t) = f.trim_start_matches("pub ").split_once(':').expect("field: type");
                (n.trim().to_string(), t.split_whitespace().collect::<Vec<_>>().join(" "))
            })
            .collect();
        api.structs.insert(name.trim().to_string(), fields);
    }
    let mut rest = flat.as_str();
    while let Some(i) = rest.find("#[no_mangle]") {
        rest = &rest[i..];
        let f = &rest[rest.find("fn ").expect("fn after no_mangle") + 3..];
        let (name, sig) = f.split_once('(').expect("fn(");
        let close = sig.find(')').expect("fn args close");
        let args: Vec<String> = sig[..close]
            .split(',')
            .map(|a| a.split_whitespace().collect::<Vec<_>>().join(" "))
            .filter(|a| !a.is_empty())
            .collect();
        let after = sig[close + 1..].split('{').next().unwrap_or("").trim();
        let ret = after.strip_prefix("->").map(|r| format!(" -> {}", r.trim())).unwrap_or_default();
        api.functions.insert(name.trim().to_string(), format!("({}){ret}", args.join(", ")));
        rest = &rest[1..];
    }
    api
}

/// Differences between the header and the Rust side, one line each.
fn mismatches(header: &Api, rust: &Api) -> Vec<String> {
    let mut out = vec![];
    let rust_struct = |c: &str| c_type_to_rust(c);
    for (name, v) in &header.constants {
        if rust.constants.get(name) != Some(v) {
            out.push(format!("#define {name} {v}: Rust has {:?}", rust.constants.get(name)));
        }
    }
    for name in rust.constants.keys().filter(|n| !header.constants.contains_key(*n)) {
        out.push(format!("{name} is not in the header"));
    }
    for (name, fields) in &header.structs {
        if rust.structs.get(&rust_struct(name)) != Some(fields) {
            out.push(format!(
                "struct {name} {fields:?}: Rust has {:?}",
                rust.structs.get(&rust_struct(name))
            ));
        }
    }
    if header.structs.len() != rust.structs.len() {
        out.push(format!("{} structs in the header, {} in Rust", header.structs.len(), rust.structs.len()));
    }
    for (name, sig) in &header.functions {
        if rust.functions.get(name) != Some(sig) {
            out.push(format!("{name}{sig}: Rust has {:?}", rust.functions.get(name)));
        }
    }
    for name in rust.functions.keys().filter(|n| !header.functions.contains_key(*n)) {
        out.push(format!("{name} is not in the header"));
    }
    out
}

fn header_text() -> String {
    read(&root().join("include/sdsparse.h"))
}

fn rust_text() -> String {
    read(&root().join("src/capi.rs"))
}

#[test]
fn header_matches_the_rust_side() {
    let (h, r) = (parse_header(&header_text()), parse_rust(&rust_text()));
    assert!(h.functions.len() == 11 && h.structs.len() == 3 && h.constants.len() == 16, "parsed {h:#?}");
    let diff = mismatches(&h, &r);
    assert!(diff.is_empty(), "include/sdsparse.h disagrees with src/capi.rs:\n{}", diff.join("\n"));
}

#[test]
fn a_planted_header_mismatch_is_caught() {
    let r = parse_rust(&rust_text());
    for (from, to) in [
        ("uint32_t steps;", "int32_t steps;"),   // field type
        ("float guidance;", "double guidance;"), // field type
        ("uint64_t seed;", "uint32_t seed;"),    // field size
        ("uint8_t *rgb, size_t rgb_len", "size_t rgb_len, uint8_t *rgb"), // argument order
        ("int sdsparse_open(const char *path, int device", "int sdsparse_open(char *path, int device"), // const
        ("#define SDSPARSE_ERR_PANIC 7", "#define SDSPARSE_ERR_PANIC 9"), // constant
        ("void sdsparse_free(sdsparse_model *model);", ""),               // missing function
    ] {
        let text = header_text();
        assert!(text.contains(from), "planted bug {from:?} no longer applies");
        let diff = mismatches(&parse_header(&text.replacen(from, to, 1)), &r);
        assert!(!diff.is_empty(), "changing {from:?} to {to:?} went unnoticed");
    }
}

// ---------------------------------------------------------------- building and running C

/// The folder holding the cdylib cargo built for these tests: `target/<profile>/deps`, beside
/// the test executable (`cargo test` does not copy it up to `target/<profile>`, where a copy
/// from an older `cargo build` may lie). `None` (the test skips) only for an executable staged
/// without it for the GPU machine (`tools/gpu_run.sh` sets `SDSPARSE_REQUIRE_GPU`); under
/// `cargo test` a missing cdylib is a failure.
fn cdylib_dir(test: &str) -> Option<PathBuf> {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().expect("deps folder").to_path_buf();
    let name = format!("{}sdsparse{}", std::env::consts::DLL_PREFIX, std::env::consts::DLL_SUFFIX);
    if !dir.join(&name).is_file() && std::env::var_os("SDSPARSE_REQUIRE_GPU").is_some() {
        eprintln!("skipped: {test}: staged without {name} (a CPU-only test; cargo test runs it)");
        return None;
    }
    assert!(dir.join(&name).is_file(), "{name} not found in {}", dir.display());
    Some(dir)
}

/// The target triple, for the `cc` crate (which normally reads it from a build script's env):
/// only its architecture and OS matter for picking the system C compiler.
fn host_triple() -> String {
    use std::env::consts::{ARCH, OS};
    match OS {
        "macos" => format!("{ARCH}-apple-darwin"),
        "linux" => format!("{ARCH}-unknown-linux-gnu"),
        other => format!("{ARCH}-unknown-{other}"),
    }
}

/// Compiles and links one C file against the cdylib in `lib_dir`; returns the executable.
fn build_c(source: &Path, dir: &Path, lib_dir: &Path) -> PathBuf {
    let triple = host_triple();
    let compiler = cc::Build::new()
        .target(&triple)
        .host(&triple)
        .opt_level(0)
        .debug(false)
        .cargo_metadata(false)
        .emit_rerun_if_env_changed(false)
        .out_dir(dir)
        .std("c99")
        .warnings(true)
        .extra_warnings(true)
        .warnings_into_errors(true)
        .get_compiler();
    let exe = dir.join(source.file_stem().expect("file name"));
    let mut cmd = compiler.to_command();
    cmd.arg("-I")
        .arg(root().join("include"))
        .arg(source)
        .arg("-o")
        .arg(&exe)
        .arg(format!("-L{}", lib_dir.display()))
        .arg("-lsdsparse")
        .arg(format!("-Wl,-rpath,{}", lib_dir.display()));
    let out = cmd.output().expect("run the C compiler");
    assert!(
        out.status.success(),
        "compiling {} failed:\n{}",
        source.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    exe
}

/// A command running a C program built by [`build_c`]. The loader path points at this build's
/// cdylib only: cargo's `LD_LIBRARY_PATH` also lists `target/<profile>`, where a stale copy
/// from an older `cargo build` would win over the executable's run path.
fn c_command(exe: &Path, lib_dir: &Path) -> Command {
    let mut cmd = Command::new(exe);
    for var in ["LD_LIBRARY_PATH", "DYLD_LIBRARY_PATH", "DYLD_FALLBACK_LIBRARY_PATH"] {
        cmd.env(var, lib_dir);
    }
    cmd
}

/// The pixels of a binary PPM (`P6 W H 255`).
fn read_ppm(path: &Path) -> (usize, usize, Vec<u8>) {
    let bytes = std::fs::read(path).expect("PPM written");
    let mut fields = vec![];
    let mut at = 0;
    while fields.len() < 4 {
        while bytes[at].is_ascii_whitespace() {
            at += 1;
        }
        let start = at;
        while !bytes[at].is_ascii_whitespace() {
            at += 1;
        }
        fields.push(String::from_utf8_lossy(&bytes[start..at]).to_string());
    }
    assert_eq!((fields[0].as_str(), fields[3].as_str()), ("P6", "255"));
    let (w, h) = (fields[1].parse().expect("width"), fields[2].parse().expect("height"));
    (w, h, bytes[at + 1..].to_vec())
}

#[cfg(unix)]
#[test]
fn the_c_example_gives_the_rust_apis_image_bit_for_bit() {
    let Some(lib_dir) = cdylib_dir("the_c_example_gives_the_rust_apis_image_bit_for_bit") else { return };
    let tmp = tempfile::tempdir().expect("temp dir");
    let exe = build_c(&root().join("examples/c/generate.c"), tmp.path(), &lib_dir);
    let model = fixture("tiny-sd2-eps");
    let ppm = tmp.path().join("c.ppm");
    let (prompt, steps, seed) = ("a red cube on a table", 3, 7);
    let out = c_command(&exe, &lib_dir)
        .arg(&model)
        .arg(&ppm)
        .arg(prompt)
        .arg(steps.to_string())
        .arg(seed.to_string())
        .output()
        .expect("run the C example");
    assert!(out.status.success(), "C example failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let (w, h, c_pixels) = read_ppm(&ppm);

    let sd = StableDiffusion::load(&model, &Device::Cpu).expect("load the fixture");
    let mut req = GenerateRequest::new(prompt);
    req.steps = steps;
    req.seed = seed;
    let rust = sd.generate(&req, &mut |_, _| {}).expect("generate").to_rgb8().expect("rgb");
    assert_eq!((w, h), (rust.width, rust.height));
    assert_eq!(c_pixels.len(), 3 * w * h);
    let differing = c_pixels.iter().zip(&rust.pixels).filter(|(a, b)| a != b).count();
    assert_eq!(differing, 0, "{differing} of {} bytes differ between the C and Rust images", c_pixels.len());
    // Not a blank image that would match anything.
    let distinct: std::collections::BTreeSet<u8> = c_pixels.iter().copied().collect();
    assert!(distinct.len() > 16, "the image has only {} distinct byte values", distinct.len());
}

#[cfg(unix)]
#[test]
fn c_api_misuse_gives_error_codes_and_messages() {
    let Some(lib_dir) = cdylib_dir("c_api_misuse_gives_error_codes_and_messages") else { return };
    let tmp = tempfile::tempdir().expect("temp dir");
    let exe = build_c(&root().join("tests/c/errors.c"), tmp.path(), &lib_dir);
    let out = c_command(&exe, &lib_dir)
        .arg(fixture("tiny-sd2-eps"))
        .arg(tmp.path())
        .output()
        .expect("run errors.c");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("0 failure(s)"),
        "C API misuse checks failed (status {:?}):\n{stdout}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}
