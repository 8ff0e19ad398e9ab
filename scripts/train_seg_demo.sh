#!/usr/bin/env bash
# Train the bundled Med3DInsight demo segmentation model and measure the paper's claim.
#
#   bash scripts/train_seg_demo.sh [RUN_DIR]          (default runs/med3d-demo)
#
# 1. PSAT pre-training of the 3D encoder against the frozen 2D MLLM (resources/demo-model).
# 2. Four fine-tunes with the same budget: {PSAT-pretrained, from scratch} x {10 %, 100 %} labels.
# 3. Held-out evaluation of each through `tghmoe segment`'s code path (tghmoe eval-seg).
# 4. The pretrained / 100 % model is bundled to resources/demo-seg-model (README.md = model card).
# Threads: TGHMOE_TRAIN_THREADS (default 1 per run; two fine-tunes run side by side).
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:-runs/med3d-demo}
RECIPE=recipes/med3d-demo.toml
TGHMOE=${TGHMOE:-.venv/bin/tghmoe}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export TGHMOE_TRAIN_THREADS=${TGHMOE_TRAIN_THREADS:-1}
HELDOUT=$(.venv/bin/python -c "import tomllib;print(tomllib.load(open('$RECIPE','rb'))['data']['heldout'])")
mkdir -p "$RUN"

run_finetune() {  # NAME INIT_ARGS FRACTION
  local name=$1 fraction=$3
  # shellcheck disable=SC2086
  $TGHMOE finetune-seg --config "$RECIPE" --out "$RUN/$name" $2 --label-fraction "$fraction" --no-progress --resume \
    > "$RUN/$name.log" 2>&1
  $TGHMOE eval-seg --model "$RUN/$name" --data "$HELDOUT" --out "$RUN/$name/eval_results.json" >> "$RUN/$name.log" 2>&1
}

# From-scratch runs need no pre-training: they start beside it.
TGHMOE_TRAIN_THREADS=1 run_finetune scratch-100 "" 1.0 &
pid_scratch=$!
$TGHMOE pretrain --config "$RECIPE" --out "$RUN/pretrain" --no-progress --resume > "$RUN/pretrain.log" 2>&1
run_finetune psat-100 "--init $RUN/pretrain" 1.0 &
pid_psat=$!
wait "$pid_scratch"
run_finetune scratch-10 "" 0.1 &
pid_scratch10=$!
wait "$pid_psat"
run_finetune psat-10 "--init $RUN/pretrain" 0.1
wait "$pid_scratch10"

# Bundle the PSAT-pretrained, all-labels model (weights, config; the card is written by hand
# from $RUN/*/eval_results.json and training_summary.json).
mkdir -p resources/demo-seg-model
cp "$RUN/psat-100/model.safetensors" "$RUN/psat-100/config.json" resources/demo-seg-model/
cp "$RUN/psat-100/eval_results.json" resources/demo-seg-model/eval_results.json
echo "done: $RUN"
