#!/usr/bin/env bash
# Every accelerator benchmark in one pass, for a GPU machine lent for minutes: each stage has its
# own time limit, so one that hangs or fails leaves the rest their turn. Output goes to the
# terminal and to $OUT/<stage>.log (OUT defaults to ./gpu_logs).
#
#   bash benchmarks/gpu_all.sh                 # all stages, in order of priority
#   bash benchmarks/gpu_all.sh serve mixtral   # only the stages named
#
# Stages and their limits (s): infer 300, finetune 300, peft 120, serve 240, mixtral 160,
# remat 240, peft_remat 120, qlora 150. On an H200 (2026-11-29) infer took 126 s, finetune 111 s
# (90 s of it the first step's compile), peft 27 s, mixtral 77 s: a 15-minute lease runs about
# four stages after the machine's start.
#
# Wheels in .whl/ (qwix, missing from a bare GPU image) are installed to /tmp/site first; fetch
# them where pip reaches PyPI with `pip download --no-deps --only-binary=:all: --python-version
# 3.12 -d .whl qwix==0.1.8` (pure Python; the image has jax, flax, optax, torch, transformers,
# peft).
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_logs}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=src${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.9

stage() {  # name, seconds, command...
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit}s): $*"
    local start=$SECONDS
    timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log"
    echo "=== $name: exit ${PIPESTATUS[0]} after $((SECONDS - start)) s"
}

want() { [ $# -eq 0 ] || [[ " $* " == *" $STAGE "* ]]; }
ALL=(infer finetune peft serve mixtral remat peft_remat qlora)
for STAGE in "${ALL[@]}"; do
    want "$@" || continue
    case $STAGE in
        infer) stage infer 300 $PY benchmarks/gpu.py ;;
        finetune) stage finetune 300 $PY benchmarks/finetune.py --preset mistral7b \
            --batch-size 8 --seq-len 1024 --rounds 1 -k 5 ;;
        peft) stage peft 120 $PY benchmarks/finetune.py --preset mistral7b --stack peft \
            --batch-size 8 --seq-len 1024 --rounds 1 -k 5 ;;
        serve) stage serve 240 $PY benchmarks/gpu_serve.py --requests 32 ;;
        mixtral) stage mixtral 160 $PY benchmarks/gpu.py --preset mixtral --repeats 3 ;;
        remat) stage remat 240 $PY benchmarks/finetune.py --preset mistral7b --remat layer \
            --batch-size 8 --seq-len 1024 --rounds 1 -k 5 ;;
        peft_remat) stage peft_remat 120 $PY benchmarks/finetune.py --preset mistral7b \
            --stack peft --remat layer --batch-size 8 --seq-len 1024 --rounds 1 -k 5 ;;
        qlora) stage qlora 150 $PY benchmarks/finetune.py --preset mistral7b --qlora nf4 \
            --batch-size 8 --seq-len 1024 --rounds 1 -k 5 ;;
    esac
done
