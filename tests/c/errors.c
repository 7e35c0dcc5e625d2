/*
 * The C API's failure paths, from C: every misuse returns its error code with a message, and
 * nothing crashes. Usage: errors MODEL_DIR SCRATCH_DIR. Run by tests/c_api.rs; prints one line
 * per check and exits non-zero when any fails.
 */
#include "sdsparse.h"

#include <stdint.h>
#include <stdio.h>
#include <string.h>

static int failures = 0;

/* One check: `got` must be `want` and, on failure, the last error must contain `needle`. */
static void expect(const char *what, int got, int want, const char *needle) {
    const char *msg = sdsparse_last_error();
    int ok = got == want && msg != NULL && (want == SDSPARSE_OK || (strlen(msg) > 0 && strstr(msg, needle) != NULL));
    printf("%s %s: code %d (want %d), message \"%s\"\n", ok ? "ok  " : "FAIL", what, got, want, msg ? msg : "(null)");
    if (!ok) failures++;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s MODEL_DIR SCRATCH_DIR\n", argv[0]);
        return 2;
    }
    const char *model_dir = argv[1];
    char path[4096];

    /* Opening. */
    sdsparse_model *model = (sdsparse_model *)&failures; /* must be reset to NULL on failure */
    expect("open NULL path", sdsparse_open(NULL, SDSPARSE_DEVICE_CPU, &model), SDSPARSE_ERR_NULL_ARGUMENT, "path");
    expect("open NULL out", sdsparse_open(model_dir, SDSPARSE_DEVICE_CPU, NULL), SDSPARSE_ERR_NULL_ARGUMENT, "out");
    expect("open missing folder", sdsparse_open("/nonexistent/sdsparse-model", SDSPARSE_DEVICE_CPU, &model),
           SDSPARSE_ERR_CHECKPOINT, "/nonexistent/sdsparse-model");
    expect("model NULL after failure", model == NULL ? 0 : 1, 0, "");
    expect("open bad device", sdsparse_open(model_dir, 7, &model), SDSPARSE_ERR_INVALID_ARGUMENT, "device");
    expect("open bad dtype", sdsparse_open_dtype(model_dir, SDSPARSE_DEVICE_CPU, 9, &model),
           SDSPARSE_ERR_INVALID_ARGUMENT, "dtype");
    expect("open f16 on the CPU", sdsparse_open_dtype(model_dir, SDSPARSE_DEVICE_CPU, SDSPARSE_DTYPE_F16, &model),
           SDSPARSE_ERR_INVALID_ARGUMENT, "f32 only");
    expect("open invalid UTF-8", sdsparse_open("\xff\xfe", SDSPARSE_DEVICE_CPU, &model), SDSPARSE_ERR_INVALID_ARGUMENT,
           "UTF-8");
    expect("open model", sdsparse_open(model_dir, SDSPARSE_DEVICE_CPU, &model), SDSPARSE_OK, "");
    if (model == NULL) {
        printf("FAIL no model\n");
        return 1;
    }

    /* Generating. */
    sdsparse_generate_params params;
    expect("params init NULL", sdsparse_generate_params_init(NULL), SDSPARSE_ERR_NULL_ARGUMENT, "params");
    sdsparse_generate_params_init(&params);
    params.steps = 1;
    uint8_t rgb[3 * 64 * 64];
    uint32_t w = 0, h = 0;
    expect("generate NULL prompt", sdsparse_generate(model, &params, rgb, sizeof rgb), SDSPARSE_ERR_NULL_ARGUMENT,
           "prompt");
    params.prompt = "a cat";
    expect("generate NULL model", sdsparse_generate(NULL, &params, rgb, sizeof rgb), SDSPARSE_ERR_NULL_ARGUMENT, "model");
    expect("generate NULL params", sdsparse_generate(model, NULL, rgb, sizeof rgb), SDSPARSE_ERR_NULL_ARGUMENT, "params");
    expect("generate NULL rgb", sdsparse_generate(model, &params, NULL, sizeof rgb), SDSPARSE_ERR_NULL_ARGUMENT, "rgb");
    expect("image size NULL width", sdsparse_image_size(model, &params, NULL, &h), SDSPARSE_ERR_NULL_ARGUMENT, "width");
    expect("image size", sdsparse_image_size(model, &params, &w, &h), SDSPARSE_OK, "");
    expect("generate buffer too small", sdsparse_generate(model, &params, rgb, (size_t)3 * w * h - 1),
           SDSPARSE_ERR_BUFFER_TOO_SMALL, "needs");
    params.width = 33; /* not a multiple of the VAE scale factor */
    expect("generate bad width", sdsparse_generate(model, &params, rgb, sizeof rgb), SDSPARSE_ERR_INVALID_ARGUMENT,
           "width 33");
    params.width = params.height = 0x80000000u; /* 3 * w * h overflows 64 bits */
    expect("generate huge size", sdsparse_generate(model, &params, rgb, SIZE_MAX), SDSPARSE_ERR_INVALID_ARGUMENT,
           "2147483648x2147483648");
    params.width = params.height = 0;
    params.steps = 0;
    expect("generate zero steps", sdsparse_generate(model, &params, rgb, sizeof rgb), SDSPARSE_ERR_INVALID_ARGUMENT,
           "steps");
    params.steps = 1;
    params.scheduler = "heun";
    expect("generate unknown scheduler", sdsparse_generate(model, &params, rgb, sizeof rgb),
           SDSPARSE_ERR_INVALID_ARGUMENT, "heun");
    params.scheduler = NULL;
    expect("generate one step", sdsparse_generate(model, &params, rgb, sizeof rgb), SDSPARSE_OK, "");
    sdsparse_free(model);
    sdsparse_free(NULL);

    /* Converting. */
    sdsparse_convert_options opts;
    sdsparse_convert_report report;
    expect("options init NULL", sdsparse_convert_options_init(NULL), SDSPARSE_ERR_NULL_ARGUMENT, "options");
    sdsparse_convert_options_init(&opts);
    snprintf(path, sizeof path, "%s/converted", argv[2]);
    expect("convert NULL options", sdsparse_convert(model_dir, path, NULL, &report), SDSPARSE_ERR_NULL_ARGUMENT,
           "options");
    expect("convert NULL out", sdsparse_convert(model_dir, NULL, &opts, &report), SDSPARSE_ERR_NULL_ARGUMENT, "out");
    expect("convert missing model", sdsparse_convert("/nonexistent/sdsparse-model", path, &opts, NULL),
           SDSPARSE_ERR_CHECKPOINT, "/nonexistent/sdsparse-model");
    opts.unet_sparsity = 1.5;
    expect("convert sparsity out of range", sdsparse_convert(model_dir, path, &opts, &report),
           SDSPARSE_ERR_INVALID_ARGUMENT, "1.5");
    opts.unet_sparsity = -1.0;
    opts.pattern = "3:4";
    expect("convert unknown pattern", sdsparse_convert(model_dir, path, &opts, &report), SDSPARSE_ERR_INVALID_ARGUMENT,
           "3:4");
    opts.pattern = "2:4";
    expect("convert 2:4", sdsparse_convert(model_dir, path, &opts, &report), SDSPARSE_OK, "");
    printf("report: text encoder %.4f, UNet %.4f, size ratio %.4f\n", report.text_encoder_sparsity,
           report.unet_sparsity, report.size_ratio);
    expect("report 2:4 sparsity", report.unet_sparsity > 0.45 && report.unet_sparsity <= 0.5 &&
                                      report.text_encoder_sparsity > 0.3 && report.text_encoder_sparsity <= 0.5 &&
                                      report.size_ratio > 0.3 && report.size_ratio < 1.0 ? 0 : 1,
           0, "");
    expect("convert exists", sdsparse_convert(model_dir, path, &opts, &report), SDSPARSE_ERR_INVALID_ARGUMENT,
           "exists");
    opts.force = 1;
    expect("convert --force", sdsparse_convert(model_dir, path, &opts, NULL), SDSPARSE_OK, "");
    expect("open converted", sdsparse_open(path, SDSPARSE_DEVICE_CPU, &model), SDSPARSE_OK, "");
    sdsparse_free(model);

    printf("%d failure(s)\n", failures);
    return failures == 0 ? 0 : 1;
}
