//! Compiles `shim.cpp` (extern "C" wrappers over `cuda/include/sdsparse_index.h`, the header the
//! CUDA kernels include) with the host C++ compiler, so the emulator tests call the kernels' own
//! index math.
fn main() {
    let include = "../../cuda/include";
    println!("cargo::rerun-if-changed=shim.cpp");
    println!("cargo::rerun-if-changed={include}/sdsparse_index.h");
    cc::Build::new()
        .cpp(true)
        .std("c++17")
        .include(include)
        .warnings(true)
        .file("shim.cpp")
        .compile("sdsparse_kernel_index");
}
