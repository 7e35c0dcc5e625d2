// Which architecture the device code is being compiled for, for the kernels that need sm_80.
//
// build.rs compiles every cuda/*.cu for sm_75 (Turing: T4, RTX 20xx; CUDA 13's oldest target)
// and sm_80+. The tensor-core kernels (mma.sync m16n8k16, mma.sp, cp.async, ldmatrix +
// mma, wgmma) need sm_80: for sm_75 their bodies compile to a trap, so every kernel name
// still exists in every image of the fatbin, and the host never launches them there
// (src/backend/cuda/device.rs, ArchMode::DenseOnly). tools/check_sass.sh checks both sides.
#pragma once

// 1 on the host pass and for sm_80 or newer device code, 0 for older device code.
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define SDS_TENSOR_CORE_ARCH 1
#else
#define SDS_TENSOR_CORE_ARCH 0
#endif

// The body of an sm_80-only kernel: `stmt` on sm_80+, a trap below (launching it there is a bug
// of the host routing, and a trap says so loudly instead of computing garbage).
#if SDS_TENSOR_CORE_ARCH
#define SDS_SM80_ONLY(stmt) stmt
#else
#define SDS_SM80_ONLY(stmt) __trap()
#endif
