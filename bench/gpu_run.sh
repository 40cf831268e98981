#!/usr/bin/env bash
# bench_gpu.py on a lent GPU machine in one command (bench/README.md, "bench_gpu.py"): install the carried
# bitsandbytes wheel offline (failure tolerated: bench_gpu.py then benchmarks a bf16 base instead of NF4),
# make prunepeft and prunepeft_triton importable from this tree (nothing to build: the C++ extension is
# optional and the benchmark does not need it), run the benchmark under a wall-clock budget, and copy the
# CSV, the figure and the log to $OUT. Extra arguments go to bench_gpu.py.
#
#   BENCH_COMMIT=<sha> bash bench/gpu_run.sh        # env: OUT (default ./out), BENCH_BUDGET_S (390), PYTHON
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
OUT="${OUT:-$ROOT/out}"
BUDGET="${BENCH_BUDGET_S:-390}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
unset TRITON_INTERPRET PRUNEPEFT_BACKEND

log() { echo "[$(date +%H:%M:%S)] gpu_run: $*"; }

run() {
  log "start in $ROOT; budget ${BUDGET} s; commit ${BENCH_COMMIT:-unset}"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || log "nvidia-smi failed"

  # 1. bitsandbytes from the carried wheel, into its own folder (the image's environment stays as it is)
  local site=/tmp/gpu_run_site
  if "$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('bitsandbytes') is None)"; then
    log "bitsandbytes already installed"
  elif compgen -G "wheels/bitsandbytes-*.whl" >/dev/null; then
    if "$PY" -m pip install -q --no-index --no-deps --no-cache-dir --disable-pip-version-check \
      --target "$site" --find-links wheels bitsandbytes; then
      log "bitsandbytes installed from $(ls wheels/bitsandbytes-*.whl)"
    else
      log "bitsandbytes install failed: bench_gpu.py falls back to a bf16 base"
    fi
  else
    log "no wheels/bitsandbytes-*.whl carried: bench_gpu.py falls back to a bf16 base"
  fi

  # 2. prunepeft from this tree; prunepeft_triton is triton_kernels/ under its installed name
  local shim
  shim="$(mktemp -d)"
  ln -s "$ROOT/triton_kernels" "$shim/prunepeft_triton"
  export PYTHONPATH="$ROOT:$shim:$site${PYTHONPATH:+:$PYTHONPATH}"
  "$PY" - <<'EOF' || { log "imports failed"; return 2; }
import importlib.metadata as md, sys
import torch, triton, prunepeft, prunepeft_triton
from prunepeft.backends import triton as tb
v = {}
for p in ("torch", "triton", "bitsandbytes", "peft", "transformers"):
    try:
        v[p] = md.version(p)
    except md.PackageNotFoundError:
        v[p] = "missing"
print("python", sys.version.split()[0], v, "cuda", torch.version.cuda, "gpu",
      torch.cuda.get_device_name() if torch.cuda.is_available() else None)
print("prunepeft backends:", prunepeft.available_backends(), "triton:", tb.unavailable_reason("cuda") or "ok")
EOF

  # 3. the benchmark: its own budget stops it cleanly; timeout is the backstop
  log "bench_gpu.py --budget-s $BUDGET $*"
  timeout -k 15 "$((${BUDGET%.*} + 60))" "$PY" bench/bench_gpu.py --budget-s "$BUDGET" "$@"
  local rc=$?
  log "bench_gpu.py exit status $rc"

  # 4. results
  for f in bench/results/gpu.csv bench/results/gpu_layer.png; do
    if [ -f "$f" ]; then cp "$f" "$OUT/" && log "copied $f to \$OUT"; else log "missing: $f"; fi
  done
  return "$rc"
}

run "$@" 2>&1 | tee "$OUT/gpu_run.log"
exit "${PIPESTATUS[0]}"
