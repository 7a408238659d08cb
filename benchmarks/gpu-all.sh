#!/usr/bin/env bash
# Regenerates every GPU results file under benchmarks/results/, each by its own script, one after another,
# on a machine with a CUDA GPU. Steps, in this order (name some to run only those):
#   advisor      advisor-accuracy.md: Llama 1B shape, nf4, LoRA r16, batch 4 x seq 1024, without and with
#                gradient checkpointing; every lever estimated and measured
#   attribution  attribution-cuda.md: the same 1B step plain, on the fast path, with the allocator's trace and
#                with the tracker, interleaved; what explaining a failed test costs each way
#   overhead     overhead-cuda.md: 200 small tests with the plugin and without, five rounds
#   examples     gpu-examples.md: the example suite at tiny and 1b, recorded, then run again against that
#   gpus         gpus-<N>x<GPU>.md and .json: the example suite serial, pinned and packed
# Expected (from earlier H100/H200 timings of the same steps): about 4 minutes for the first three and 5 for
# the last two. Where one command may last at most 10 minutes, run it as two:
# `gpu-all.sh advisor attribution overhead`, then `gpu-all.sh examples gpus`.
# With OUT set, the log and a copy of every results file written go to $OUT (a remote machine sends $OUT
# back). GPUMEM_BENCH_COMMIT names the commit where the tree was copied without its .git. PYTHON picks the
# interpreter (default: python).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
results=benchmarks/results
models=.pytest_cache/d/gpumem-models # the example suite's own checkpoint cache: each shape is made once
if [[ -n ${OUT:-} ]]; then
    mkdir -p "$OUT/results"
    exec > >(tee -a "$OUT/gpu-all.log") 2>&1
    tee_pid=$!
    trap 'exec >&- 2>&-; wait "$tee_pid"' EXIT # the log is whole before the command returns
fi

tag=$("$python" -c '
import re, torch
name = torch.cuda.get_device_name(0)
short = re.search(r"\b[A-Z]+\d+\w*", name)
print(str(torch.cuda.device_count()) + "x" + (short.group(0) if short else re.sub(r"\W+", "-", name)))')

advisor() {
    "$python" benchmarks/advisor_accuracy.py --size 1b --checkpointing off,on --model-dir "$models" \
        --out "$results/advisor-accuracy.md"
}
attribution() {
    "$python" benchmarks/attribution.py --sizes 1b --batch 4 --seq 1024 --model-dir "$models" \
        --out "$results/attribution-cuda.md"
}
overhead() {
    "$python" benchmarks/overhead.py --backend cuda --suites small --repeat 5 --out "$results/overhead-cuda.md"
}
examples() {
    "$python" benchmarks/gpu_examples.py --model-sizes tiny,1b --out "$results/gpu-examples.md"
}
gpus() {
    "$python" benchmarks/gpus.py --model-sizes tiny,1b --out "$results/gpus-$tag.md" --json "$results/gpus-$tag.json"
}
declare -A files=(
    [advisor]=advisor-accuracy.md [attribution]=attribution-cuda.md [overhead]=overhead-cuda.md
    [examples]=gpu-examples.md [gpus]="gpus-$tag.md gpus-$tag.json"
)

steps=("$@")
[[ ${#steps[@]} -gt 0 ]] || steps=(advisor attribution overhead examples gpus)
failed=()
for step in "${steps[@]}"; do
    [[ -v "files[$step]" ]] || { echo "gpu-all.sh: unknown step $step; steps: ${!files[*]}" >&2; exit 2; }
    echo "== $step ($(date -u +%H:%M:%S))"
    start=$SECONDS
    if "$step"; then
        echo "== $step: ok in $((SECONDS - start)) s"
        for file in ${files[$step]}; do
            [[ -z ${OUT:-} ]] || cp "$results/$file" "$OUT/results/"
        done
    else
        echo "== $step: FAILED after $((SECONDS - start)) s"
        failed+=("$step")
    fi
done
[[ ${#failed[@]} -eq 0 ]] || { echo "failed: ${failed[*]}"; exit 1; }
