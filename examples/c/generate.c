/*
 * sdsparse from C: load a pipeline, generate one image into our own RGB buffer, write it as a
 * binary PPM. Built and run by tests/c_api.rs against the tiny fixture; by hand:
 *
 *   cargo build --release
 *   cc -std=c99 -Iinclude examples/c/generate.c -Ltarget/release -lsdsparse \
 *      -Wl,-rpath,$PWD/target/release -o generate
 *   ./generate sd21-base-sparse out.ppm "a photograph of an astronaut riding a horse" 25 42
 */
#include "sdsparse.h"

#include <stdio.h>
#include <stdlib.h>

/* Prints the library's message for a failed call and returns 1. */
static int fail(const char *what, int code) {
    fprintf(stderr, "%s failed (code %d): %s\n", what, code, sdsparse_last_error());
    return 1;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s MODEL_DIR OUT.ppm [PROMPT] [STEPS] [SEED]\n", argv[0]);
        return 2;
    }
    if (sdsparse_abi_version() != SDSPARSE_ABI_VERSION) {
        fprintf(stderr, "library ABI %u, header ABI %d\n", sdsparse_abi_version(), SDSPARSE_ABI_VERSION);
        return 1;
    }

    sdsparse_model *model = NULL;
    int rc = sdsparse_open(argv[1], SDSPARSE_DEVICE_CPU, &model);
    if (rc != SDSPARSE_OK) return fail("sdsparse_open", rc);

    sdsparse_generate_params params;
    sdsparse_generate_params_init(&params);
    params.prompt = argc > 3 ? argv[3] : "a photograph of an astronaut riding a horse";
    if (argc > 4) params.steps = (uint32_t)strtoul(argv[4], NULL, 10);
    if (argc > 5) params.seed = strtoull(argv[5], NULL, 10);

    uint32_t width = 0, height = 0;
    rc = sdsparse_image_size(model, &params, &width, &height);
    if (rc != SDSPARSE_OK) {
        sdsparse_free(model);
        return fail("sdsparse_image_size", rc);
    }
    size_t len = (size_t)3 * width * height;
    uint8_t *rgb = malloc(len);
    if (rgb == NULL) {
        sdsparse_free(model);
        return 1;
    }
    rc = sdsparse_generate(model, &params, rgb, len);
    sdsparse_free(model);
    if (rc != SDSPARSE_OK) {
        free(rgb);
        return fail("sdsparse_generate", rc);
    }

    FILE *f = fopen(argv[2], "wb");
    if (f == NULL) {
        perror(argv[2]);
        free(rgb);
        return 1;
    }
    fprintf(f, "P6\n%u %u\n255\n", width, height);
    size_t written = fwrite(rgb, 1, len, f);
    free(rgb);
    if (fclose(f) != 0 || written != len) {
        fprintf(stderr, "%s: write failed\n", argv[2]);
        return 1;
    }
    printf("wrote %s (%ux%u, sdsparse %s)\n", argv[2], width, height, sdsparse_version());
    return 0;
}
