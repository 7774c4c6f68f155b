#!/usr/bin/env bash
# The GPU figures of BUILD_NOTES.md, in one short run on a machine with one GPU:
#   bash scripts/gpu_figures.sh [OUT]        (default OUT: runs/gpu_figures)
# - training steps of dense, l0_hc, l0_arm and dep_l0: ResNet-56 at batch 128 (CIFAR-shaped) and
#   ResNet-50 at batch 256 (ImageNet-shaped), random batches on the device, with images per
#   second, the ratio to dense, GFLOP/s and the fraction of a float32 matmul's rate measured in
#   the same run, and a dense step plus the dense loss pass that ARM adds (benchmarks.step_time
#   --peak --loss_pass);
# - inference of the slimmed GReg ResNet-56 pattern against the masked network
#   (benchmarks.slim_inference).
# Each table is printed and written to OUT/*.md, the logs to OUT/stderr.log (read it when a step
# fails). STEPS and REPEATS (default 20 and 5) size the timing; STEPS=1 REPEATS=1 BATCH_SCALE=64
# makes a quick check on a CPU (batches divided by 64).
set -euo pipefail
out=${1:-runs/gpu_figures}
steps=${STEPS:-20}
repeats=${REPEATS:-5}
scale=${BATCH_SCALE:-1}
methods=dense,l0_hc,l0_arm,dep_l0
mkdir -p "$out"
python3 -c "import jax; print(jax.__version__, jax.devices())" | tee "$out/devices.txt"
for spec in resnet56:128 resnet50:256; do
    model=${spec%%:*}
    batch=$(( ${spec##*:} / scale ))
    python3 -m benchmarks.step_time --model="$model" --batch_size="$batch" --methods="$methods" \
        --steps="$steps" --repeats="$repeats" --peak --loss_pass 2>>"$out/stderr.log" | tee "$out/step_time_$model.md"
done
python3 -m benchmarks.slim_inference --model=resnet56 --batch_size=$(( 256 / scale )) \
    --steps="$steps" --repeats="$repeats" 2>>"$out/stderr.log" | tee "$out/slim_inference_resnet56.md"
