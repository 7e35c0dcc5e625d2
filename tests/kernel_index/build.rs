//! Compiles `shim.cpp` (extern "C" wrappers over `cuda/include/sdsparse_index.h`, the header the
//! CUDA kernels include) with the host C++ compiler, so the emulator tests call the kernels' own
//! index math, and `activation_host.cpp`: the activation kernels (`cuda/norm.cu`,
//! `cuda/pointwise.cu`, `cuda/tensor.cu`) on the host CUDA stand-in of `cuda_shim/`.
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

    // The activation kernels themselves on the host CUDA stand-in (cuda_shim/).
    for f in ["activation_host.cpp", "cuda_shim/sds_cuda_host.h", "cuda_shim/cuda_fp16.h", "cuda_shim/cuda_bf16.h"] {
        println!("cargo::rerun-if-changed={f}");
    }
    for f in ["norm.cu", "pointwise.cu", "tensor.cu", "include/sdsparse_dtype.cuh", "include/sdsparse_params.h"] {
        println!("cargo::rerun-if-changed=../../cuda/{f}");
    }
    cc::Build::new()
        .cpp(true)
        .std("c++17")
        .include("cuda_shim")
        .include(include)
        .include("../../cuda")
        .flag_if_supported("-Wno-unknown-pragmas")
        .flag_if_supported("-Wno-clobbered") // swapcontext returns twice; nothing is clobbered
        .file("activation_host.cpp")
        .compile("sdsparse_activation_host");
}
