#!/usr/bin/env bash
# Reproduce the bundled demo model (resources/demo-model) from nothing but this repository:
#   0. the cascade's evidence of the phase-8 phantoms and its site and phase heads,
#   1. tghmoe train --config recipes/demo.toml --stage both: stage 1 (builds the BPE tokenizer on
#      the phantom training corpus, then trains the randomly initialised base + shared experts +
#      merger + LLM LoRA), its thirteen continuation phases (the eighth attaches the 3D evidence encoder, the ninth goes on, the tenth and eleventh add simulated evidence, the twelfth trains on faithful report targets, the thirteenth oversamples scans with several findings, the fourteenth trains on faithful answers) ([[stage1_continue]] in the recipe: more
#      closed questions, then the auxiliary vision loss and the per-sample LM loss, then mostly
#      closed questions, then a longer one at a lower lr, then one on the current phantoms), then stage 2 (task experts and routers) from the last phase,
#   2. evaluation on the recipe's held-out phantom seeds with held-out phrasings,
#   3. the model card (README.md), card_check.json and eval_results.json in resources/demo-model.
# Environment: OUT (default runs/demo), DEST (default resources/demo-model), RESUME=1 to continue
# a killed run, TGHMOE_TRAIN_THREADS (torch threads per process on a CPU).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/demo}
DEST=${DEST:-resources/demo-model}
RECIPE=recipes/demo.toml
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
resume=()
if [[ -n "${RESUME:-}" ]]; then resume=(--resume); fi

# Phase 8 reads the bundled cascade's evidence of full-size phantoms: segment them once (cached as
# JSON, TGHMOE_EVIDENCE_CACHE), and give the cascade its site and phase heads (learnt from the
# training phantoms' evidence and truth; resources/demo-seg-model/sites.*, phase.*).
export TGHMOE_EVIDENCE_CACHE=${TGHMOE_EVIDENCE_CACHE:-$OUT/evidence}
# Phases 10-13 also read simulated evidence of 600 more phantoms each (phase 13: 200 of 310600-311599) (their truth with the cascade's kind
# of errors; the site head also learns from 1,000 of them).
$PY scripts/scan_evidence.py --seeds 300000-300199 --out "$TGHMOE_EVIDENCE_CACHE"
$PY scripts/oracle_evidence.py --seeds 310000-311599 --out "$TGHMOE_EVIDENCE_CACHE"
$PY scripts/train_sites.py --evidence "$TGHMOE_EVIDENCE_CACHE" --seeds 300000-300199 --out resources/demo-seg-model \
    --simulated "$TGHMOE_EVIDENCE_CACHE" --simulated-seeds 310000-310999

t0=$(date +%s)
# Stage 1 and its phases (recipe [[stage1_continue]]: stage1/, stage1-2/ ... stage1-6/),
# then stage 2 from the last phase.
$PY -m napari_tghmoe.cli train --config "$RECIPE" --stage both --out "$OUT" "${resume[@]}"
PHASES=$($PY -c "
from pathlib import Path
from napari_tghmoe.train.cli import stage1_phase_dir
from napari_tghmoe.train.recipe import load_recipe, stage1_phases
print(' '.join(str(stage1_phase_dir(Path('$OUT'), i)) for i in range(1, len(stage1_phases(load_recipe('$RECIPE'))) + 1)))")
LAST1=${PHASES##* }
s1=$($PY -c "import json, sys; print(int(sum(json.load(open(f'{d}/training_summary.json'))['seconds_this_run'] for d in sys.argv[1:])))" $PHASES)
s2=$($PY -c "import json; print(int(json.load(open('$OUT/stage2/training_summary.json'))['seconds_this_run']))")
t1=$((t0 + s1))
t2=$((t1 + s2))

# The evidence words' cut of the shipped model: a decoding setting, chosen after training on
# validation phantoms 820200-820259 for the cascade's verifier ensemble (0.4; phase 12 trained with
# the single verifier's words at 0.6: docs/results.md, "Fifth round").
$PY -c "
import sys
from napari_tghmoe.model.configuration import TGHMoEConfig
config = TGHMoEConfig.from_pretrained(sys.argv[1])
config.volume_words_min_certainty = float(sys.argv[2])
config.save_pretrained(sys.argv[1])" "$OUT/stage2" "${WORDS_CUT:-0.4}"

DATA=$($PY -c "from napari_tghmoe.train.recipe import load_recipe; print(load_recipe('$RECIPE').eval.data)")
MAXTOK=$($PY -c "from napari_tghmoe.train.recipe import load_recipe; print(load_recipe('$RECIPE').eval.max_new_tokens)")
$PY -m napari_tghmoe.cli eval --model "$OUT/stage2" --data "$DATA" --task all --device cpu \
    --max-new-tokens "$MAXTOK" --out "$OUT/eval/heldout.json"

$PY -m napari_tghmoe.train.card --model "$OUT/stage2" --stage1 "$LAST1" --recipe "$RECIPE" \
    --results "$OUT/eval/heldout.json" --dest "$DEST" --command "scripts/train_demo.sh" \
    --stage1-note "fourteen phases: 400 steps (lr 2e-3) + 500 + 1000 (lr 1e-3, closed-VQA weight 0.6) + 1500 (auxiliary vision loss, per-sample LM loss) + 2000 (closed-VQA weight 0.7) + 2500 (lr 3e-4, closed-VQA weight 0.65) + 800 (lr 3e-4, phantoms in four planes and four phases, balanced choices) + 800 (lr 5e-4, full-size phantoms, the 3D evidence encoder attached) + 1000 (the same, new draws) + 1500 (600 more phantoms with simulated evidence) + 1500 (the next 600 of them) + 1500 (faithful report targets, the words' cut 0.6) + 1500 (the words at 0.4, scans with several findings oversampled) + 1500 (faithful answers to questions about findings), 18000 in all" \
    --stage1-seconds $((t1 - t0)) --stage2-seconds $((t2 - t1)) \
    --hardware "$(nproc) CPU cores ($(uname -m)), shared with other jobs; no GPU"
echo "demo model written to $DEST"
