#!/usr/bin/env bash
# The ablation of docs/results.md: four arms, one training budget (500 optimiser steps of 8
# samples), the same held-out phantoms and phrasings. Arm (a) is the demo recipe's own
# stage 1 (400) + stage 2 (100), i.e. runs/demo/stage1 from scripts/train_demo.sh.
#   (a) TGH-MoE, two stages              (b) stage 1 only (400 + 100 more stage-1 steps)
#   (c) dense LoRA, same active rank      (d) MoE without text guidance (token routers only)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
R=recipes/demo.toml
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
T="$PY -m napari_tghmoe.cli train --config $R --no-progress"
[[ -f runs/demo/stage1/model.safetensors ]] || $T --stage 1 --out runs/demo/stage1
[[ -f runs/demo/stage2/model.safetensors ]] || $T --stage 2 --init runs/demo/stage1 --out runs/demo/stage2
# (b): the second budget continues stage 1 (stage-1 trainables) on the stage-2 draws
$T --stage 2 --init runs/demo/stage1 --out runs/abl_b --set stage2.trainable_stage=1 \
   --set 'stage2.also_train=["vision", "llm", "llm_norm", "embeddings", "lm_head"]'
# (c): one "shared" group with a single rank-20 expert per block = 2 x 20 = 40 active ranks, as
#      TGH-MoE's 1 (block 2) + 4 (block 3: shared + 3 task groups, top-1 each) experts of rank 8
$T --stage 1 --out runs/abl_c --set 'model.moe.group_names=["shared"]' --set model.moe.experts_per_group=1 \
   --set model.moe.lora_rank=20 --set stage1.steps=500
# (d): text vector zeroed (TGHMoEConfig.text_guidance = false)
$T --stage both --out runs/abl_d --set model.moe.text_guidance=false
DATA=$($PY -c "from napari_tghmoe.train.recipe import load_recipe; print(load_recipe('$R').eval.data)")
for arm in demo/stage2:a abl_b:b abl_c:c abl_d/stage2:d; do
  model=${arm%%:*}; name=${arm##*:}
  $PY -m napari_tghmoe.cli eval --model "runs/$model" --data "$DATA" --task all --device cpu \
      --max-new-tokens 200 --no-bertscore --no-progress --out "runs/eval/abl_$name.json"
done
$PY scripts/results_tables.py "(a) TGH-MoE two-stage=runs/eval/abl_a.json" "(b) stage 1 only=runs/eval/abl_b.json" \
    "(c) dense LoRA=runs/eval/abl_c.json" "(d) no text guidance=runs/eval/abl_d.json"
