/*
 * sdsparse C API: pruned Stable Diffusion 2 from C (and anything with a C FFI).
 *
 * Link against the cdylib (`cargo build --release` gives target/release/libsdsparse.so,
 * .dylib or sdsparse.dll). Written by hand; tests/c_api.rs checks every declaration below
 * against src/capi.rs and runs examples/c/generate.c. Stability: docs/API.md.
 *
 * Conventions:
 * - Every function that can fail returns an int: SDSPARSE_OK (0) or an SDSPARSE_ERR_* code;
 *   sdsparse_last_error() then gives a one-line message (thread-local).
 * - Strings are NUL-terminated UTF-8. Pointers marked "may be NULL" are optional; a NULL
 *   required pointer is SDSPARSE_ERR_NULL_ARGUMENT, never a crash.
 * - No Rust panic crosses this boundary: an internal error is SDSPARSE_ERR_PANIC.
 * - A model may be used from any thread, also from several at once (calls only read it).
 */
#ifndef SDSPARSE_H
#define SDSPARSE_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define SDSPARSE_OK 0
#define SDSPARSE_ERR_NULL_ARGUMENT 1
#define SDSPARSE_ERR_INVALID_ARGUMENT 2
#define SDSPARSE_ERR_BUFFER_TOO_SMALL 3
#define SDSPARSE_ERR_IO 4
#define SDSPARSE_ERR_CHECKPOINT 5
#define SDSPARSE_ERR_CUDA 6
#define SDSPARSE_ERR_PANIC 7
#define SDSPARSE_ERR_OTHER 8

#define SDSPARSE_DEVICE_CPU 0
/* The pipeline on the first CUDA GPU (sm_80+; sm_75 runs the dense cuBLAS path only, without bf16;
   f16 activations unless sdsparse_open_dtype asks otherwise); no GPU, a GPU older than sm_75, no
   kernels in the build or no cuBLAS is SDSPARSE_ERR_CUDA with the reason. */
#define SDSPARSE_DEVICE_CUDA 1

/* Activation dtypes (sdsparse_open_dtype): DEFAULT is f16 on CUDA and f32 on the CPU. On CUDA,
   GEMMs accumulate and norms / softmax compute in f32 whatever the dtype; the CPU computes in f32
   only (F16 / BF16 there are SDSPARSE_ERR_INVALID_ARGUMENT). */
#define SDSPARSE_DTYPE_DEFAULT 0
#define SDSPARSE_DTYPE_F32 1
#define SDSPARSE_DTYPE_F16 2
#define SDSPARSE_DTYPE_BF16 3

/* Bumped whenever a struct layout or a signature below changes. */
#define SDSPARSE_ABI_VERSION 1

/* A loaded pipeline (opaque). */
typedef struct sdsparse_model sdsparse_model;

/* What to generate. Fill with sdsparse_generate_params_init, then set fields. */
typedef struct sdsparse_generate_params {
    const char *prompt;          /* required */
    const char *negative_prompt; /* may be NULL: "" */
    const char *scheduler;       /* may be NULL: the checkpoint's; "ddim", "euler", "dpm++2m", "pndm" */
    uint32_t steps;              /* denoising steps, >= 1 (default 50) */
    float guidance;              /* classifier-free guidance scale; <= 1 turns it off (default 7.5) */
    uint64_t seed;               /* seed of the initial noise (sdsparse's generator, not torch's) */
    uint32_t width;              /* pixels, a multiple of 8; 0: the model's default */
    uint32_t height;             /* pixels, a multiple of 8; 0: the model's default */
} sdsparse_generate_params;

/* How to convert. Fill with sdsparse_convert_options_init (the study's recipe), then set fields. */
typedef struct sdsparse_convert_options {
    double text_encoder_sparsity;     /* < 0: default (0.475; 0.5 for 2:4) */
    double unet_sparsity;             /* < 0: default (0.35; 0.5 for 2:4) */
    const char *pattern;              /* may be NULL: "unstructured"; or "2:4" */
    const char *text_encoder_pattern; /* may be NULL: pattern */
    const char *unet_pattern;         /* may be NULL: pattern */
    const char *method;               /* may be NULL: "magnitude"; or another `convert --method` name */
    const char *scope;                /* may be NULL: "layer"; or "global" */
    const char *dtype;                /* may be NULL: "keep"; or "f16", "bf16", "f32" */
    uint64_t seed;                    /* seed of the random method */
    int32_t include_conv;             /* non-zero: also prune the UNet's convolutions */
    int32_t force;                    /* non-zero: replace an existing output folder */
} sdsparse_convert_options;

/* What a conversion did. */
typedef struct sdsparse_convert_report {
    double text_encoder_sparsity; /* achieved, over the text encoder's prunable layers */
    double unet_sparsity;         /* achieved, over the UNet's prunable layers */
    double size_ratio;            /* text encoder + UNet stored bytes / their dense bytes */
    double seconds;
} sdsparse_convert_report;

/* The library version, e.g. "0.1.0" (static storage). */
const char *sdsparse_version(void);

/* SDSPARSE_ABI_VERSION of the library: compare with the header's before use. */
uint32_t sdsparse_abi_version(void);

/* The message of the last failed call on this thread ("" when none); valid until the next
 * failing call on this thread. */
const char *sdsparse_last_error(void);

/* Loads a diffusers SD2 pipeline folder (dense, or converted by sdsparse) on `device`
 * (SDSPARSE_DEVICE_*). On success *out is the model; on failure *out is NULL. */
int sdsparse_open(const char *path, int device, sdsparse_model **out);

/* sdsparse_open with the activation dtype (SDSPARSE_DTYPE_*). */
int sdsparse_open_dtype(const char *path, int device, int dtype, sdsparse_model **out);

/* Frees a model (NULL is a no-op). */
void sdsparse_free(sdsparse_model *model);

/* Fills `params` with the defaults. */
int sdsparse_generate_params_init(sdsparse_generate_params *params);

/* The image size `params` gives; the RGB buffer needs 3 * width * height bytes. */
int sdsparse_image_size(const sdsparse_model *model, const sdsparse_generate_params *params,
                        uint32_t *width, uint32_t *height);

/* Generates into `rgb`: 3 * width * height bytes (sdsparse_image_size), row-major, R G B
 * interleaved. An `rgb_len` below that is SDSPARSE_ERR_BUFFER_TOO_SMALL, checked before any work. */
int sdsparse_generate(const sdsparse_model *model, const sdsparse_generate_params *params,
                      uint8_t *rgb, size_t rgb_len);

/* Fills `options` with the defaults. */
int sdsparse_convert_options_init(sdsparse_convert_options *options);

/* Prunes the dense diffusers folder `model` into the sparse folder `out` (written under a
 * temporary name, renamed when complete). `report` may be NULL. */
int sdsparse_convert(const char *model, const char *out, const sdsparse_convert_options *options,
                     sdsparse_convert_report *report);

#ifdef __cplusplus
}
#endif

#endif /* SDSPARSE_H */
