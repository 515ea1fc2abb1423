#!/usr/bin/env bash
# run.sh: the whole paper in one command, resumable.
#
#   bash run.sh          every row of Table 1 for the six target languages and the Figure 3/4
#                        matrix (priming {meta, maml, none} x fine-tuning {adapter, full}),
#                        priming on en + es, then the table beside the paper's (OUT/table.md)
#   bash run.sh smoke    the same pipeline end to end on a tiny BERT and tiny data that it makes
#                        itself: offline, a few minutes on 2 CPU cores, numbers that mean nothing
#
# Settings, from the environment (defaults in brackets):
#   KYG_MODEL        hub name or local model directory   [bert-base-multilingual-cased]
#   KYG_DATA_DIR     local WikiAnn, {lang}/{train,dev,test}.tsv   [the hub]
#   KYG_DEVICE       cuda or cpu                          [cuda when present]
#   KYG_SEEDS        fine-tuning seeds                    [1 2 3]
#   KYG_LANGS        target languages                     [hi af az lt et nl]
#   KYG_OUT          results directory                    [runs/paper]
#   KYG_MAX_TRAIN    training sentences per language, priming and fine-tuning alike   [all]
#   KYG_MAX_EVAL     dev and test sentences scored        [all]
#   KYG_PRIME_STEPS  meta-steps of each priming           [one pass over the smaller source set]
#   KYG_EPOCHS       fine-tuning epochs                   [5]
#   KYG_LIVE_TRUNK   1: head and adapter tuning run the frozen encoder at every step (kyg.py
#                    finetune --live-trunk) instead of training on its features computed once   [0]
#
# Time: the full run with mBERT on one GPU has not been measured yet (no GPU was lent to the
# session that wrote this); see README.md, "Performance", for what has been measured.
#
# Resumable: primed models and results are written atomically, and a rerun skips every finished
# priming and every fine-tuning run already in OUT/results.jsonl; a priming that was stopped
# resumes from the state it last saved (kyg.py prime --save-every).
set -euo pipefail
cd "$(dirname "$0")"

MODEL=${KYG_MODEL:-bert-base-multilingual-cased}
DATA_DIR=${KYG_DATA_DIR:-}
SEEDS=${KYG_SEEDS:-1 2 3}
LANGS=${KYG_LANGS:-hi af az lt et nl}
OUT=${KYG_OUT:-runs/paper}
EPOCHS=${KYG_EPOCHS:-5}
PRIME=()
FINETUNE=(--epochs "$EPOCHS")

if [[ "${1:-}" == smoke ]]; then
    OUT=${KYG_OUT:-runs/smoke}
    python kyg.py tiny "$OUT/tiny"
    MODEL=$OUT/tiny/model DATA_DIR=$OUT/tiny/data SEEDS=${KYG_SEEDS:-1 2}
    PRIME=(--steps 8 --support-size 8 --query-size 8)
    FINETUNE=(--epochs 2)
    export HF_HUB_OFFLINE=1
elif [[ -n "${1:-}" ]]; then
    echo "usage: bash run.sh [smoke]" >&2
    exit 2
fi

COMMON=(--model "$MODEL")
[[ -n "$DATA_DIR" ]] && COMMON+=(--data-dir "$DATA_DIR")
[[ -n "${KYG_DEVICE:-}" ]] && COMMON+=(--device "$KYG_DEVICE")
[[ -n "${KYG_MAX_TRAIN:-}" ]] && COMMON+=(--max-train "$KYG_MAX_TRAIN")
[[ -n "${KYG_MAX_EVAL:-}" ]] && FINETUNE+=(--max-eval "$KYG_MAX_EVAL")
[[ -n "${KYG_PRIME_STEPS:-}" ]] && PRIME+=(--steps "$KYG_PRIME_STEPS")
PE_TUNING=()
[[ "${KYG_LIVE_TRUNK:-0}" == 1 ]] && PE_TUNING+=(--live-trunk)
mkdir -p "$OUT/primed"

# The stages, cheapest comparisons first, so that on slow hardware the parameter-efficient rows
# (and 4 vs 3, the paper's main claim) arrive early; full fine-tuning, the costliest, comes last.
#   name        what it runs
STAGES=(
    "row2       finetune none head"
    "row3       finetune none adapter"
    "prime-meta prime meta"
    "row4       finetune meta adapter"
    "prime-ft   prime ft"
    "row5       finetune ft adapter"
    "prime-S1   prime meta-S1"
    "row7       finetune meta-S1 adapter"
    "prime-maml prime maml"
    "row6       finetune maml adapter"
    "prime-2nd  prime meta-2nd"
    "row4-2nd   finetune meta-2nd adapter"
    "prime-S1-2nd prime meta-S1-2nd"
    "row7-2nd   finetune meta-S1-2nd adapter"
    "row1       finetune none full"
    "fig3-meta  finetune meta full"
    "fig3-maml  finetune maml full"
)
started=$SECONDS
for i in "${!STAGES[@]}"; do
    read -r name kind priming method <<< "${STAGES[$i]}"
    elapsed=$((SECONDS - started))
    eta=$([[ $i -gt 0 ]] && echo "$((elapsed * (${#STAGES[@]} - i) / i / 60)) min" || echo "?")
    echo "== run.sh: stage $((i + 1)) of ${#STAGES[@]}: $name ($((elapsed / 60)) min so far, ETA $eta)"
    if [[ $kind == prime ]]; then
        variant=()  # the label says it: meta-S1 is S = 1, meta-2nd the exact meta-gradient
        [[ $priming == *-S1* ]] && variant+=(--inner-steps 1)
        [[ $priming == *-2nd ]] && variant+=(--second-order)
        python kyg.py prime --method "${priming%%-*}" "${variant[@]}" "${PRIME[@]}" "${COMMON[@]}" \
            --out "$OUT/primed/$priming"
    else
        init=()
        [[ $priming != none ]] && init=(--init "$OUT/primed/$priming")
        # Full fine-tuning writes no weights: a copy of mBERT per run (~700 MB) is what PE tuning avoids.
        extra=("${PE_TUNING[@]}")
        [[ $method == full ]] && extra=(--no-save)
        # shellcheck disable=SC2086
        python kyg.py finetune --method "$method" "${init[@]}" --lang $LANGS --seed $SEEDS \
            "${FINETUNE[@]}" "${extra[@]}" "${COMMON[@]}" --out "$OUT"
    fi
done
echo "== run.sh: all ${#STAGES[@]} stages done in $(((SECONDS - started) / 60)) min"
python kyg.py table "$OUT"
[[ "${1:-}" == smoke ]] && echo "run.sh smoke: the pipeline ran end to end; its numbers come from a tiny random model and mean nothing."
exit 0
