#!/usr/bin/env bash
# The ablation and baselines of docs/results.md ("Ablation"), all arms from ONE trained base: the
# bundled demo model's stage-1 function (scripts/demo_stage1_weights.py: the shipped weights with
# every stage-2 part set back), continued on the current phantoms (balanced choice lists, four
# planes, four phases) with the fixed routing (detached top-k renormalisation, stage 2 starting
# at the stage-1 function).
#   p7  stage-1 phase 7: PHASE7_STEPS steps with images      z7  the same steps, images zeroed
#   (a) TGH-MoE two-stage: p7 + stage 2 (100 steps)           -> the new bundled demo model
#   (b) stage 1 only: p7 + 100 more stage-1 steps
#   (d) no text guidance: p7 + stage 2 with text_guidance = false
#   (e) level 1 by content: p7 + stage 2 with topic groups (report, chest, abdomen, acquisition,
#       general) taught by the question's topic (napari_tghmoe.model.prompts.routing_label)
#   (f) level 1 from the answer alone: p7 + stage 2 with task_loss_coef = 0
#   (z) image zeroed: z7 + stage 2, trained and scored on zeros
# Every arm is scored on the recipe's 200 held-out phantoms with 95 % case-bootstrap intervals
# (the ablation table: $OUT/eval/{a_closed,b,d,e,f,z_closed}.json; scripts/results_tables.py);
# the image-free prior (tghmoe eval-baseline) is learnt on the training seeds.
# Environment: OUT (default runs/ablation), PHASE7_STEPS (default 800), ARMS_TASK (task for arms
# b, d, e, f; default vqa_closed), TGHMOE_TRAIN_THREADS.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/ablation}
STEPS=${PHASE7_STEPS:-800}
ARMS_TASK=${ARMS_TASK:-vqa_closed}
R=recipes/demo.toml
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
T="$PY -m napari_tghmoe.cli train --config $R --no-progress"
E="$PY -m napari_tghmoe.cli eval --device cpu --no-progress --no-bertscore"
recipe() { $PY -c "from napari_tghmoe.train.recipe import load_recipe; r = load_recipe('$R'); print($1)"; }
DATA=$(recipe r.eval.data)
TRAIN=$(recipe 'r.data.train[0]')
MAXTOK=$(recipe r.eval.max_new_tokens)
mkdir -p "$OUT/eval"

[[ -f $OUT/s1/model.safetensors ]] || $PY scripts/demo_stage1_weights.py --out "$OUT/s1"
# Phase 7 = the last [[stage1_continue]] of the recipe (seed 6), run from the recovered stage 1.
P7=(--set seed=6 --set stage1.steps=$STEPS --set stage1.lr=3e-4 --set stage1.warmup_steps=20 --set stage1.save_every=200
    --set stage1.vision_probe_coef=1.0 --set stage1.lm_loss_per_sample=true
    --set 'data.task_weights={report = 0.25, vqa_closed = 0.65, vqa_open = 0.1}')
[[ -f $OUT/p7/model.safetensors ]] || $T --stage 1 --init "$OUT/s1" --out "$OUT/p7" "${P7[@]}" &
[[ -f $OUT/z7/model.safetensors ]] || $T --stage 1 --init "$OUT/s1" --out "$OUT/z7" "${P7[@]}" --set data.zero_image=true &
wait
[[ -f $OUT/a/model.safetensors ]] || $T --stage 2 --init "$OUT/p7" --out "$OUT/a"
[[ -f $OUT/z/model.safetensors ]] || $T --stage 2 --init "$OUT/z7" --out "$OUT/z" --set data.zero_image=true
[[ -f $OUT/b/model.safetensors ]] || $T --stage 2 --init "$OUT/p7" --out "$OUT/b" --set stage2.trainable_stage=1 \
   --set 'stage2.also_train=["vision", "merger", "llm", "llm_norm", "embeddings", "lm_head"]' --set stage2.lr=3e-4
[[ -f $OUT/d/model.safetensors ]] || $T --stage 2 --init-weights "$OUT/p7" --out "$OUT/d" --set model.moe.text_guidance=false
[[ -f $OUT/e/model.safetensors ]] || $T --stage 2 --init-weights "$OUT/p7" --out "$OUT/e" \
   --set 'model.moe.group_names=["shared", "report", "chest", "abdomen", "acquisition", "general"]'
[[ -f $OUT/f/model.safetensors ]] || $T --stage 2 --init-weights "$OUT/p7" --out "$OUT/f" --set model.moe.task_loss_coef=0.0

$PY -m napari_tghmoe.cli eval-baseline --train "$TRAIN" --data "$DATA" --out "$OUT/eval/prior.json"
ev() { # name model task [extra]
  [[ -f $OUT/eval/$1.json ]] || $E --model "$2" --data "$DATA" --task "$3" --max-new-tokens "$MAXTOK" --out "$OUT/eval/$1.json" "${@:4}"
}
ev shipped resources/demo-model all
ev a "$OUT/a" all --prior-train "$TRAIN"
ev z "$OUT/z" all --zero-image
ev b "$OUT/b" "$ARMS_TASK"
ev d "$OUT/d" "$ARMS_TASK"
ev e "$OUT/e" "$ARMS_TASK"
ev f "$OUT/f" "$ARMS_TASK"
ev a_closed "$OUT/a" "$ARMS_TASK"  # (a) and (z) again with the arms' task: the same question framings
ev z_closed "$OUT/z" "$ARMS_TASK" --zero-image
for arm in a d e f; do
  $PY scripts/routing_content.py "$OUT/$arm" --data "$DATA" --out "$OUT/eval/routing_$arm.json" > "$OUT/eval/routing_$arm.txt"
done
$PY scripts/routing_content.py resources/demo-model --data "$DATA" --out "$OUT/eval/routing_shipped.json" > "$OUT/eval/routing_shipped.txt"
# (a) with its baselines beside every closed accuracy: the learnt prior (already there from
# --prior-train) and the model trained and scored with the image zeroed (z).
$PY - "$OUT/eval" <<'PY'
import json, sys
from pathlib import Path
from napari_tghmoe.eval.evaluate import attach_baselines, write_results
folder = Path(sys.argv[1])
results = json.loads((folder / "a.json").read_text())
zero = json.loads((folder / "z.json").read_text())["vqa_closed"]
attach_baselines(results, {"image zeroed, same budget": zero})
write_results(results, folder / "a_baselines.json")
PY
echo "ablation written to $OUT/eval"
