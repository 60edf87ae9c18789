#!/usr/bin/env bash
# One driver for the GPU checks of issues 11 and 12, sized for one device call (about 3-5 minutes).
# Unverified until it has run on a GPU.
#
#   bash benchmarks/gpu/run_all.sh     # results (log, JSON rows) under $OUT, else /tmp/hf_comq_gpu
#   PYTHON=/path/to/python bash benchmarks/gpu/run_all.sh
#
# Steps (each with its own timeout; a failing step does not stop the others):
#   1. versions; install carried wheels from benchmarks/gpu/wheels/ if compressed-tensors is missing
#   2. int4pack_check.py   - the _weight_int4pack_mm recipe (layout, zero point, group sizes), timings
#   3. tiny_checkpoint.py  - tiny random Llama quantized by hf_comq: W4 per-channel asym, W4 g128 asym, W3 g128 asym
#   4. packed_cuda_check.py plain / packed - plain transformers vs hf_comq packed layers, per-layer errors, timings
#   5. tolerance_probe.py  - the comparator's metrics under rounding and under simulated layout bugs
#   6. vllm_vs_transformers.py - with vLLM if it imports, else with the transformers-fp32 engine (harness + noise floor)
#   7. nccl_calibration.py - data-parallel calibration (issue 16): one GPU rank vs one rank per GPU, same checkpoint
# Exit status: 0 when no step failed (skips are not failures), 1 otherwise.
set -u
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
PY=${PYTHON:-python}
RESULTS=${OUT:-/tmp/hf_comq_gpu}
WORK=$(mktemp -d /tmp/hf_comq_gpu_work.XXXX)
[ "${KEEP_WORK:-0}" = 1 ] || trap 'rm -rf "$WORK"' EXIT  # KEEP_WORK=1 keeps the tiny checkpoints
mkdir -p "$RESULTS"

declare -a SUMMARY=()
FAILED=0
step() {  # step NAME TIMEOUT_S CMD...: run, record PASS / SKIP (rc 2) / FAIL
    local name=$1 limit=$2; shift 2
    echo; echo "=== $name"
    timeout "$limit" "$@"
    local rc=$?
    case $rc in
        0) SUMMARY+=("PASS  $name") ;;
        2) SUMMARY+=("SKIP  $name") ;;
        *) SUMMARY+=("FAIL  $name (rc=$rc)"); FAILED=1 ;;
    esac
    return $rc
}

main() {
echo "=== versions"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || echo "no nvidia-smi"
if ! $PY -c "import compressed_tensors" 2>/dev/null; then
    if compgen -G "benchmarks/gpu/wheels/*.whl" > /dev/null; then
        # --find-links without --no-deps: only what is missing (e.g. pydantic, loguru) comes from the folder
        $PY -m pip install --quiet --no-index --find-links benchmarks/gpu/wheels compressed-tensors \
            || echo "wheel install failed"
    else
        echo "compressed-tensors missing and no wheels carried (see benchmarks/gpu/README.md)"
    fi
fi
$PY - <<'EOF'
import importlib, platform, torch
print("python", platform.python_version(), "| torch", torch.__version__, "| cuda", torch.version.cuda,
      "| device", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
for name in ("transformers", "compressed_tensors", "accelerate", "vllm", "hf_comq"):
    try:
        module = importlib.import_module(name)
        print(f"{name} {getattr(module, '__version__', '?')} ({module.__file__})")
    except Exception as error:
        print(f"{name}: not importable ({type(error).__name__}: {error})")
EOF

step "int4pack recipe" 180 $PY benchmarks/gpu/int4pack_check.py

CHECKPOINTS=()
for spec in "w4_pc_asym --bits 4" "w4_g128_asym --bits 4 --group-size 128" "w3_g128_asym --bits 3 --group-size 128"; do
    set -- $spec  # name, then the flags
    name=$1; shift
    if step "quantize tiny Llama $name" 300 $PY benchmarks/gpu/tiny_checkpoint.py --out "$WORK" --name "$name" "$@"; then
        CHECKPOINTS+=("$WORK/$name")
    elif step "quantize tiny Llama $name on the CPU (fallback)" 400 $PY benchmarks/gpu/tiny_checkpoint.py \
        --out "$WORK" --name "$name" --device cpu "$@"; then
        CHECKPOINTS+=("$WORK/$name")  # the load checks below still run on the GPU
    fi
done

for dir in "${CHECKPOINTS[@]}"; do
    name=$(basename "$dir")
    $PY -c "import json,sys; print(json.dumps(json.load(open(sys.argv[1]))['quantization_config'])[:600])" \
        "$dir/config.json"
    if step "plain transformers load $name" 240 $PY benchmarks/gpu/packed_cuda_check.py --mode plain \
        --model "$dir" --logits "$WORK/$name.plain.pt"; then
        step "hf_comq packed layers $name" 240 $PY benchmarks/gpu/packed_cuda_check.py --mode packed \
            --model "$dir" --logits "$WORK/$name.plain.pt"
    fi
done

if [ -d "$WORK/base" ]; then
    step "tolerance probe (tiny base)" 240 $PY benchmarks/gpu/tolerance_probe.py --model "$WORK/base"
fi

if $PY -c "import vllm" 2>/dev/null; then ENGINE=vllm; else ENGINE=hf-fp32; fi
for dir in "${CHECKPOINTS[@]}"; do
    name=$(basename "$dir")
    step "$ENGINE vs transformers $name" 420 $PY benchmarks/gpu/vllm_vs_transformers.py --engine "$ENGINE" \
        --model "$dir" --json "$RESULTS/compare_${ENGINE}_$name.json"
    [ "$ENGINE" = hf-fp32 ] && break  # without vLLM one run shows the harness works; the rest adds nothing
done

# Data-parallel calibration over NCCL: one rank per GPU; with one GPU only the single-rank NCCL path runs.
GPUS=$(nvidia-smi -L 2>/dev/null | wc -l)
NCCL_OUT="$WORK/nccl"
if step "NCCL calibration, 1 rank (reference)" 300 $PY benchmarks/gpu/nccl_calibration.py --out "$NCCL_OUT" \
    --reference; then
    if [ "$GPUS" -ge 2 ]; then
        step "NCCL calibration, $GPUS ranks" 300 $PY -m torch.distributed.run --nproc-per-node "$GPUS" \
            benchmarks/gpu/nccl_calibration.py --out "$NCCL_OUT"
        step "NCCL checkpoint equals the 1-rank one" 120 $PY benchmarks/gpu/nccl_calibration.py --out "$NCCL_OUT" --compare
    else
        echo "one GPU: NCCL needs a GPU per rank, the multi-rank step is skipped"; SUMMARY+=("SKIP  NCCL calibration, 2+ ranks (one GPU)")
    fi
fi

echo; echo "=== summary (engine for the comparison: $ENGINE)"
printf '%s\n' "${SUMMARY[@]}"
return $FAILED
}

main 2>&1 | tee "$RESULTS/run_all.log"
exit "${PIPESTATUS[0]}"
