// The activation and tensor kernels (cuda/norm.cu, cuda/pointwise.cu, cuda/tensor.cu) compiled for the host on the CUDA
// stand-in of cuda_shim/sds_cuda_host.h; sds_host_launch runs one of them, by its kernel name,
// over a grid on the CPU. tests/activation_host.rs drives them with the Rust launch
// plans (so the plans' grids are exercised too) and compares with the CPU references.
#include "sds_cuda_host.h"

#include "norm.cu"
#include "pointwise.cu"
#include "tensor.cu"

#define SDS_HOST_ENTRY(KERNEL, PARAMS)                                              \
    {#KERNEL, [](const void* p, unsigned gx, unsigned gy, unsigned bx) {               \
         const PARAMS params = *static_cast<const PARAMS*>(p);                         \
         sds_host::launch([&] { KERNEL(params); }, gx, gy, bx);                        \
     }},

#define SDS_HOST_ENTRIES(NAME, T)                                       \
    SDS_HOST_ENTRY(sdsparse_groupnorm_stats_##NAME, SdsGroupNormParams) \
    SDS_HOST_ENTRY(sdsparse_groupnorm_apply_##NAME, SdsGroupNormParams) \
    SDS_HOST_ENTRY(sdsparse_layernorm_##NAME, SdsLayerNormParams)       \
    SDS_HOST_ENTRY(sdsparse_eltwise_gelu_##NAME, SdsEltwiseParams)      \
    SDS_HOST_ENTRY(sdsparse_eltwise_silu_##NAME, SdsEltwiseParams)      \
    SDS_HOST_ENTRY(sdsparse_eltwise_add_##NAME, SdsEltwiseParams)       \
    SDS_HOST_ENTRY(sdsparse_eltwise_sub_##NAME, SdsEltwiseParams)       \
    SDS_HOST_ENTRY(sdsparse_eltwise_mul_##NAME, SdsEltwiseParams)       \
    SDS_HOST_ENTRY(sdsparse_eltwise_div_##NAME, SdsEltwiseParams)       \
    SDS_HOST_ENTRY(sdsparse_eltwise_cfg_##NAME, SdsEltwiseParams)       \
    SDS_HOST_ENTRY(sdsparse_geglu_##NAME, SdsGegluParams)               \
    SDS_HOST_ENTRY(sdsparse_upsample_nearest_##NAME, SdsUpsampleParams) \
    SDS_HOST_ENTRY(sdsparse_concat_##NAME, SdsConcatParams)             \
    SDS_HOST_ENTRY(sdsparse_timestep_embedding_##NAME, SdsTimestepParams) \
    SDS_HOST_ENTRY(sdsparse_affine_##NAME, SdsAffineParams)             \
    SDS_HOST_ENTRY(sdsparse_strided_copy_##NAME, SdsStridedCopyParams)  \
    SDS_HOST_ENTRY(sdsparse_embedding_##NAME, SdsEmbeddingParams)       \
    SDS_HOST_ENTRY(sdsparse_softmax_##NAME, SdsSoftmaxParams)           \
    SDS_HOST_ENTRY(sdsparse_im2col_##NAME, SdsIm2colParams)

namespace {
struct Entry {
    const char* name;
    void (*run)(const void*, unsigned, unsigned, unsigned);
};
const Entry kKernels[] = {SDS_FOR_EACH_DTYPE(SDS_HOST_ENTRIES) SDS_HOST_ENTRY(sdsparse_cast_f32_f16, SdsAffineParams)
                              SDS_HOST_ENTRY(sdsparse_cast_f16_f32, SdsAffineParams)
                              SDS_HOST_ENTRY(sdsparse_cast_f32_bf16, SdsAffineParams)
                              SDS_HOST_ENTRY(sdsparse_cast_bf16_f32, SdsAffineParams)
                              SDS_HOST_ENTRY(sdsparse_softmax_f32_f16, SdsSoftmaxParams)
                              SDS_HOST_ENTRY(sdsparse_softmax_f32_bf16, SdsSoftmaxParams)};
}  // namespace

// Runs kernel `name` (its extern "C" name in the fatbin) on `params` (a pointer to its parameter
// struct) over grid (gx, gy) of bx threads. Returns 0, or -1 for an unknown name.
extern "C" int sds_host_launch(const char* name, const void* params, unsigned gx, unsigned gy, unsigned bx) {
    for (const Entry& e : kKernels) {
        if (strcmp(e.name, name) == 0) {
            e.run(params, gx, gy, bx);
            return 0;
        }
    }
    return -1;
}
