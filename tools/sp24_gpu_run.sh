#!/usr/bin/env bash
# One command for the 2:4 sparse GEMM GPU verification (issue 4).
#
# Here (any machine with the pinned nvcc, no GPU needed):
#   tools/sp24_gpu_run.sh
# builds the fatbin, checks its SASS, builds the test and bench executables (dev profile:
# the kernels' speed does not depend on it) and puts them, stripped, with a runner script
# into .device/sp24/ (ignored by git). Then, in a session that has the device machine, one
# call runs everything there and brings the logs back:
#   run(command="bash .device/sp24/run.sh", carry=[".device/sp24"], timeout_s=600)
# `bash .device/sp24/run.sh tests|bench|peers` runs one part (the bench part is the long one).
set -euo pipefail
root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
dst="$root/.device/sp24"
rm -rf "$dst" && mkdir -p "$dst"

tools/build_sp24_fatbin.sh "$dst/sparse24.fatbin"
tools/check_sass_sp24.sh "$dst/sparse24.fatbin" | tee "$dst/sass_check_here.txt"

exe_of() { # cargo's JSON messages -> path of the executable of the named target
    python3 -c 'import json,sys
name=sys.argv[1]
for l in sys.stdin:
    try: m=json.loads(l)
    except ValueError: continue
    if m.get("reason")=="compiler-artifact" and m.get("executable") and m["target"]["name"]==name: print(m["executable"])' "$1"
}
t=$(cargo test --test sparse24_gemm --no-run --message-format=json | exe_of sparse24_gemm | tail -1)
b=$(cargo bench --profile dev --bench gemm_sparse24 --no-run --message-format=json | exe_of gemm_sparse24 | tail -1)
for pair in "$t:sparse24_gemm" "$b:gemm_sparse24"; do
    src="${pair%%:*}" name="${pair##*:}"
    objcopy --strip-debug "$src" "$dst/$name" 2>/dev/null || cp "$src" "$dst/$name"
done
cp tools/bench_peers_gemm.py tools/check_sass_sp24.sh tools/sass_expect_sp24.txt "$dst/"

cat > "$dst/run.sh" <<'RUN'
#!/usr/bin/env bash
# Runs on the device machine from the repo root: tests, SASS check, benches, peers.
set -uo pipefail
d="$(cd "$(dirname "$0")" && pwd)"
out="${OUT:-/tmp/sp24_out}"; mkdir -p "$out"
part="${1:-all}"
# cudarc loads libcublas dynamically: add the image's CUDA library folders.
extra=$(python3 - <<'PY' 2>/dev/null
import glob, os, site
dirs = set()
for base in site.getsitepackages() + ["/usr/local/cuda/lib64", "/usr/local/cuda/targets/x86_64-linux/lib"]:
    for f in glob.glob(os.path.join(base, "**", "libcublas*.so*"), recursive=True):
        dirs.add(os.path.dirname(f))
print(":".join(sorted(dirs)))
PY
)
export LD_LIBRARY_PATH="${extra}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export SDSPARSE_SP24_FATBIN="$d/sparse24.fatbin" CRITERION_HOME=/tmp/criterion RAYON_NUM_THREADS=16
{ nvidia-smi --query-gpu=name,driver_version,clocks.max.sm --format=csv; nvcc --version 2>/dev/null | tail -2;
  python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)'; } 2>&1 | tee "$out/env.txt"
rc=0
if [[ "$part" == all || "$part" == tests ]]; then
    bash "$d/check_sass_sp24.sh" "$d/sparse24.fatbin" 2>&1 | tee "$out/sass.txt"; [[ ${PIPESTATUS[0]} == 0 ]] || rc=1
    "$d/sparse24_gemm" --test-threads=1 --nocapture 2>&1 | tee "$out/tests.log"; [[ ${PIPESTATUS[0]} == 0 ]] || rc=1
fi
if [[ "$part" == all || "$part" == bench ]]; then
    "$d/gemm_sparse24" --bench 2>&1 | tee "$out/bench.log"; [[ ${PIPESTATUS[0]} == 0 ]] || rc=1
fi
if [[ "$part" == all || "$part" == peers ]]; then
    PYTHONUNBUFFERED=1 python3 "$d/bench_peers_gemm.py" --json "$out/peers.json" 2>&1 | tee "$out/peers.log"
    [[ ${PIPESTATUS[0]} == 0 ]] || rc=1
fi
exit $rc
RUN
chmod +x "$dst/run.sh"
du -sh "$dst"
echo "ready: run(command=\"bash .device/sp24/run.sh\", carry=[\".device/sp24\"], timeout_s=600)"
