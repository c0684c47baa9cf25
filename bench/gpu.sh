#!/usr/bin/env bash
# The benchmarks on one CUDA device, in float32 and bfloat16, in under 10 minutes in all.
#
#   bash bench/gpu.sh                 # results in $OUT (default bench_gpu/): JSON + logs
#   L2S_DEMO=/tmp/l2s_demo bash bench/gpu.sh   # also the benches of the demo's trained models
#
# Needs JAX with its CUDA plugin and a CUDA build of PyTorch (the transformers baselines then
# run on the same GPU, `bench/common.py:torch_device`), in the interpreter $PYTHON (default
# python3). The repository root goes on PYTHONPATH, so l2s_jax need not be installed there; the
# check below names any package the benches import that this interpreter lacks. Each bench
# has its own time limit, so one slow bench cannot take the others' time; a bench that fails
# or runs out is reported and the rest still run. Random-weight benches (no downloads): decode (ours vs transformers, both
# dtypes, with the roofline of this device: HBM bandwidth and the GEMM rate at the step's
# shapes), l2s_speedup and train (each dtype). bench/memory.py measures host memory (ru_maxrss)
# and is left out on a GPU. With L2S_DEMO (a `python -m l2s_jax.demo` workdir, with the grown
# LLM for assisted): bf16_agreement and assisted. The limits add up to 580 s.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench_gpu}
PYTHON=${PYTHON:-python3}
mkdir -p "$OUT"
export XLA_PYTHON_CLIENT_PREALLOCATE=false TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

"$PYTHON" - <<'EOF' > "$OUT/device.json" || { rm -f "$OUT/device.json"; exit 2; }
import importlib.util, json
needed = ["jax", "torch", "transformers", "safetensors", "tokenizers", "flax", "optax",
          "orbax.checkpoint", "ml_collections", "qwix", "sacrebleu", "numpy"]
def lacks(name):
  try:
    return importlib.util.find_spec(name) is None
  except ModuleNotFoundError:             # its parent package is missing
    return True
missing = [m for m in needed if lacks(m)]
if missing:
  raise SystemExit(f"bench/gpu.sh: this Python lacks {', '.join(missing)} (torch: a CUDA "
                   "build; the others: `pip install -e .` in the repository root)")
import jax, torch
if jax.default_backend() != "gpu":
  raise SystemExit(f"bench/gpu.sh: JAX's backend is {jax.default_backend()!r}, not gpu "
                   "(install JAX's CUDA plugin)")
if not torch.cuda.is_available():
  raise SystemExit("bench/gpu.sh: PyTorch sees no CUDA device (a CPU build of torch?)")
print(json.dumps({"jax_device": jax.devices()[0].device_kind, "torch_device": torch.cuda.get_device_name(0),
                  "jax": jax.__version__, "torch": torch.__version__}))
EOF
cat "$OUT/device.json"

failed=0
run() {   # run NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: rc=$rc, $((SECONDS - t0)) s (limit $limit s); log $OUT/$name.log"
  [ $rc -eq 0 ] || failed=1
}

run decode 210 "$PYTHON" bench/decode.py --dtypes float32,bfloat16 --xla_flags '' --json "$OUT/decode.json"
for d in float32 bfloat16; do
  run "l2s_speedup_$d" 70 "$PYTHON" bench/l2s_speedup.py --dtype "$d" --json "$OUT/l2s_speedup_$d.json"
  run "train_$d" 50 "$PYTHON" bench/train.py --compute_dtype "$d" --json "$OUT/train_$d.json"
done
if [ -n "${L2S_DEMO:-}" ]; then
  run bf16_agreement 50 "$PYTHON" bench/bf16_agreement.py --workdir "$L2S_DEMO" --json "$OUT/bf16.json"
  run assisted 80 "$PYTHON" bench/assisted.py --workdir "$L2S_DEMO" --json "$OUT/assisted.json"
fi
exit $failed
