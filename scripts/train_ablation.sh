#!/usr/bin/env bash
# The ablation of docs/results.md ("Ablation"), issue 15: every arm from ONE trained base (the
# previous demo model's stage-1 function, phase 7 of recipes/demo.toml: P7, default
# runs/ablation/p7, made by scripts/demo_stage1_weights.py from that model and its phase 7), the
# same data (recipe phase 8: full-size phantoms 300000-300199, whose cascade evidence is cached),
# the same budget (PHASE8_STEPS stage-1 steps, then 100 steps):
#   p8e  phase 8 with the 3D evidence encoder (the bundled cascade + its site head)
#   p8   phase 8 without it (video tokens only)
#   (a) TGH-MoE two-stage with the 3D encoder: p8e + stage 2             -> the bundled demo model
#   (b) TGH-MoE two-stage without it:          p8  + stage 2
#   (c) stage 1 only:                          p8e + 100 more stage-1 steps
#   (d) dense LoRA:                            p8e + 100 steps of one always-on LoRA expert per MoE
#                                              block in place of the routed task experts
#   (e) text-blind MoE:                        p8e + stage 2 with the text vector zeroed
# Every arm is scored on the recipe's held-out phantoms with 95 % case-bootstrap intervals.
# Cascade evidence: TGHMOE_EVIDENCE_CACHE (default $OUT/evidence; scripts/scan_evidence.py fills it
# in parallel, the engine fills what is missing itself).
# Environment: OUT (default runs/ablation), P7, PHASE8_STEPS (default 800), TGHMOE_TRAIN_THREADS.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/ablation}
P7=${P7:-$OUT/p7}
STEPS=${PHASE8_STEPS:-800}
R=recipes/demo.toml
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
export TGHMOE_EVIDENCE_CACHE=${TGHMOE_EVIDENCE_CACHE:-$OUT/evidence}
T="$PY -m napari_tghmoe.cli train --config $R --no-progress"
E="$PY -m napari_tghmoe.cli eval --device cpu --no-progress --no-bertscore"
recipe() { $PY -c "from napari_tghmoe.train.recipe import load_recipe, stage1_phases; r = load_recipe('$R'); p = stage1_phases(r)[7]; print($1)"; }
DATA=$(recipe r.eval.data)
TRAIN=$(recipe 'p.data.train[0]')
MAXTOK=$(recipe r.eval.max_new_tokens)
mkdir -p "$OUT/eval"

# Phase 8 = the recipe's eighth [[stage1_continue]] entry, run from phase 7 (with and without the encoder).
P8=(--set seed=7 --set stage1.steps=$STEPS --set stage1.lr=5e-4 --set stage1.warmup_steps=20 --set stage1.save_every=200
    --set stage1.lm_loss_per_sample=true --set "data.train=[\"$TRAIN\"]"
    --set 'data.task_weights={report = 0.3, vqa_closed = 0.5, vqa_open = 0.2}')
ENC=(--set model.volume_encoder=demo --set model.volume_token_source=evidence)
DATA8=(--set "data.train=[\"$TRAIN\"]")
[[ -f $OUT/p8e/model.safetensors ]] || $T --stage 1 --init "$P7" --out "$OUT/p8e" "${P8[@]}" "${ENC[@]}" &
[[ -f $OUT/p8/model.safetensors ]] || $T --stage 1 --init "$P7" --out "$OUT/p8" "${P8[@]}" &
wait
[[ -f $OUT/a/model.safetensors ]] || $T --stage 2 --init "$OUT/p8e" --out "$OUT/a" "${DATA8[@]}" &
[[ -f $OUT/b/model.safetensors ]] || $T --stage 2 --init "$OUT/p8" --out "$OUT/b" "${DATA8[@]}" &
wait
[[ -f $OUT/c/model.safetensors ]] || $T --stage 2 --init "$OUT/p8e" --out "$OUT/c" "${DATA8[@]}" --set stage2.trainable_stage=1 \
   --set 'stage2.also_train=["vision", "merger", "llm", "llm_norm", "embeddings", "lm_head"]' --set stage2.lr=5e-4 &
[[ -f $OUT/d/model.safetensors ]] || $T --stage 2 --init-weights "$OUT/p8e" --out "$OUT/d" "${DATA8[@]}" "${ENC[@]}" \
   --set 'model.moe.group_names=["shared", "dense"]' --set 'model.moe.experts_per_group={shared = 2, dense = 1}' \
   --set model.moe.task_loss_coef=0.0 &
wait
[[ -f $OUT/e/model.safetensors ]] || $T --stage 2 --init-weights "$OUT/p8e" --out "$OUT/e" "${DATA8[@]}" "${ENC[@]}" \
   --set model.moe.text_guidance=false

ev() { # name model task [extra]
  [[ -f $OUT/eval/$1.json ]] || $E --model "$2" --data "$DATA" --task "$3" --max-new-tokens "$MAXTOK" --out "$OUT/eval/$1.json" "${@:4}"
}
ev a "$OUT/a" all &  # (a) on every task: the issue's targets
ev a_closed "$OUT/a" vqa_closed &  # (a) again with the arms' task: the same question framings
wait
ev b "$OUT/b" vqa_closed &
ev c "$OUT/c" vqa_closed &
wait
ev d "$OUT/d" vqa_closed &
ev e "$OUT/e" vqa_closed &
wait
for arm in a e; do
  $PY scripts/routing_content.py "$OUT/$arm" --data "$DATA" --out "$OUT/eval/routing_$arm.json" > "$OUT/eval/routing_$arm.txt"
done
echo "ablation written to $OUT/eval"
