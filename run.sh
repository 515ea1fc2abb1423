#!/usr/bin/env bash
# run.sh: the whole paper in one command, resumable.
#
#   bash run.sh              every row of Table 1 for the six target languages, rows 5b (the control
#                            for 4 > 5) and 4 and 7 with the exact meta-gradient, and the Figure 3/4
#                            matrix (priming {meta, maml, none} x fine-tuning {adapter, full}),
#                            priming on en + es, then the table beside the paper's (OUT/table.md)
#   bash run.sh small        the same on less data: 1,000 training sentences a language (1/5 to
#                            1/20 of each's), 40 priming steps, 300 dev and test sentences, 20 epochs
#                            (results/small: rows 2-7 and 5b, five rates, two priming seeds)
#   bash run.sh paper-scale  the paper's data: every sentence, one priming pass (312 steps), dev
#                            capped at 1,000 (results/paper-scale: small's rows, then row 1 and Figure 3)
#   bash run.sh pe-methods   Algorithm 1 beyond the adapter: priming with the inner loop of each of
#                            adapter, LoRA and BitFit x tuning with each, and none/FT priming before
#                            LoRA and BitFit (results/pe-methods: hi af nl, 300 training sentences)
#   bash run.sh demo         rows 3, 4 and 5 on one language (az) in under 10 minutes on a laptop CPU:
#                            a small multilingual encoder (multilingual-e5-small), 1,000 sentences a
#                            language, 30 priming steps, three seeds; the table and the pictures of
#                            priming at work (results/demo)
#   bash run.sh smoke        the pipeline end to end on a tiny BERT and tiny data that it makes
#                            itself, two target languages: offline, about a minute on 2 CPU cores,
#                            numbers that mean nothing
#
# Settings, from the environment (defaults in brackets; a preset changes some defaults):
#   KYG_MODEL        hub name or local model directory   [bert-base-multilingual-cased]
#   KYG_DATA_DIR     local WikiAnn, {lang}/{train,dev,test}.tsv   [the hub]
#   KYG_DEVICE       cuda or cpu                          [cuda when present]
#   KYG_BF16         1: the encoder's forward in bfloat16 (kyg.py --bf16; fp32 losses and optimizer)   [0]
#   KYG_ROWS         what to run: 1-7, 5b, 4-2nd, 7-2nd, fig3-meta, fig3-maml, or any PRIMING:METHOD
#                    (a priming label as the table names it, e.g. meta-lora:bitfit)   [all]
#   KYG_SEEDS        fine-tuning seeds                    [1 2 3]
#   KYG_PRIME_SEEDS  priming seeds of rows 4 and 5 (every other priming uses seed 1)   [1]
#   KYG_LRS          head- and adapter-tuning rates; several: chosen on dev   [kyg.py's default]
#   KYG_LANGS        target languages                     [hi af az lt et nl]
#   KYG_OUT          results directory                    [runs/paper]
#   KYG_MAX_TRAIN    training sentences per language, priming and fine-tuning alike   [all]
#   KYG_MAX_EVAL     dev and test sentences scored        [all]
#   KYG_MAX_DEV      dev sentences scored (over KYG_MAX_EVAL)   [all]
#   KYG_PRIME_STEPS  meta-steps of each priming           [one pass over the smaller source set]
#   KYG_EPOCHS       fine-tuning epochs                   [5]
#   KYG_LIVE_TRUNK   1: head and adapter tuning run the frozen encoder at every step (kyg.py
#                    finetune --live-trunk) instead of training on its features computed once   [0]
#
# Time, an estimate: about 1.3 hours on one H100 in fp32, not measured end to end. Its arithmetic
# (README.md, "Where it runs"): per-step times measured on an H100 with mBERT-shaped batches of
# 32 x 48 tokens (forward 9.7 ms, full fine-tuning step 34.4 ms, cached meta-step 114 ms) times
# the steps of each row: 3 rows of full fine-tuning (1 and Figure 3's two) x 30,510 steps 52 min,
# their dev and test passes 9 min, the encoder's features for the 9 head and adapter rows 6 min,
# 7 primings of 312 steps 6 min, and the head and adapter updates on stored features 5-9 min.
#
# Resumable: primed models and results are written atomically, and a rerun skips every finished
# priming and every fine-tuning run already in OUT/results.jsonl; a priming that was stopped
# resumes from the state it last saved (kyg.py prime --save-every). Shared: run.sh started twice
# on one preset divides the work (each run is claimed before it starts; one primes, one waits).
set -euo pipefail
cd "$(dirname "$0")"

ALL_ROWS="2 3 4 5 5b 7 6 4-2nd 7-2nd 1 fig3-meta fig3-maml"  # cheapest first: PE rows arrive early
RATES="1e-3 3e-3 1e-2 3e-2 1e-1"  # the presets' head- and adapter-tuning grid, chosen on dev per row and language
case "${1:-}" in
    "") OUT=${KYG_OUT:-runs/paper} ;;
    smoke)
        OUT=${KYG_OUT:-runs/smoke}
        # whole, or not there
        [[ -d $OUT/tiny ]] || { python kyg.py tiny "$OUT/tiny.$$" && mv "$OUT/tiny.$$" "$OUT/tiny"; }
        KYG_MODEL=$OUT/tiny/model KYG_DATA_DIR=$OUT/tiny/data KYG_SEEDS=${KYG_SEEDS:-1 2} KYG_LANGS=${KYG_LANGS:-hi af}
        KYG_PRIME_STEPS=8 KYG_EPOCHS=2 KYG_PRIME_SEEDS=${KYG_PRIME_SEEDS:-1 2} KYG_LRS=${KYG_LRS:-1e-2}
        KYG_ROWS=${KYG_ROWS:-$ALL_ROWS meta-lora:lora meta-bitfit:bitfit meta-lora:adapter}
        SMOKE=(--support-size 8 --query-size 8)
        export HF_HUB_OFFLINE=1 ;;
    small)
        OUT=${KYG_OUT:-results/small} KYG_ROWS=${KYG_ROWS:-2 3 4 5 5b 7 6}
        KYG_MAX_TRAIN=${KYG_MAX_TRAIN:-1000} KYG_MAX_EVAL=${KYG_MAX_EVAL:-300} KYG_PRIME_STEPS=${KYG_PRIME_STEPS:-40}
        KYG_EPOCHS=${KYG_EPOCHS:-20} KYG_LRS=${KYG_LRS:-$RATES} KYG_PRIME_SEEDS=${KYG_PRIME_SEEDS:-1 2} ;;
    paper-scale)
        OUT=${KYG_OUT:-results/paper-scale} KYG_ROWS=${KYG_ROWS:-2 3 4 5 5b 7 6 1 fig3-meta fig3-maml}
        KYG_MAX_DEV=${KYG_MAX_DEV:-1000} KYG_LRS=${KYG_LRS:-$RATES} KYG_PRIME_SEEDS=${KYG_PRIME_SEEDS:-1 2} ;;
    pe-methods)
        OUT=${KYG_OUT:-results/pe-methods} KYG_LANGS=${KYG_LANGS:-hi af nl} KYG_MAX_TRAIN=${KYG_MAX_TRAIN:-300}
        KYG_MAX_EVAL=${KYG_MAX_EVAL:-300} KYG_PRIME_STEPS=${KYG_PRIME_STEPS:-40} KYG_EPOCHS=${KYG_EPOCHS:-10}
        KYG_ROWS=${KYG_ROWS:-$(for p in meta meta-lora meta-bitfit; do
                                   for m in adapter lora bitfit; do echo $p:$m; done; done)
                              none:adapter none:lora none:bitfit ft:adapter ft-lora:lora ft-bitfit:bitfit} ;;
    demo)
        OUT=${KYG_OUT:-results/demo} KYG_MODEL=${KYG_MODEL:-intfloat/multilingual-e5-small} KYG_ROWS=${KYG_ROWS:-3 4 5}
        KYG_LANGS=${KYG_LANGS:-az} KYG_MAX_TRAIN=${KYG_MAX_TRAIN:-1000} KYG_MAX_EVAL=${KYG_MAX_EVAL:-300}
        KYG_PRIME_STEPS=${KYG_PRIME_STEPS:-30} KYG_EPOCHS=${KYG_EPOCHS:-20} KYG_LRS=${KYG_LRS:-3e-3} ;;
    *) echo "usage: bash run.sh [demo | small | paper-scale | pe-methods | smoke]" >&2; exit 2 ;;
esac

COMMON=(--model "${KYG_MODEL:-bert-base-multilingual-cased}")
[[ -n "${KYG_DATA_DIR:-}" ]] && COMMON+=(--data-dir "$KYG_DATA_DIR")
[[ -n "${KYG_DEVICE:-}" ]] && COMMON+=(--device "$KYG_DEVICE")
[[ "${KYG_BF16:-0}" == 1 ]] && COMMON+=(--bf16)
[[ -n "${KYG_MAX_TRAIN:-}" ]] && COMMON+=(--max-train "$KYG_MAX_TRAIN")
PRIME=("${SMOKE[@]}")
[[ -n "${KYG_PRIME_STEPS:-}" ]] && PRIME+=(--steps "$KYG_PRIME_STEPS")
FINETUNE=(--epochs "${KYG_EPOCHS:-5}")
[[ -n "${KYG_MAX_EVAL:-}" ]] && FINETUNE+=(--max-eval "$KYG_MAX_EVAL")
[[ -n "${KYG_MAX_DEV:-}" ]] && FINETUNE+=(--max-dev "$KYG_MAX_DEV")

# Each row: the priming it starts from (a label, as the table names it) and the fine-tuning (report.ROWS).
declare -A ROW
while read -r row priming method; do ROW[$row]="$priming $method"; done < <(python -c 'import report
for row, (priming, method, _) in report.ROWS.items(): print(row, priming, method)')

prime() {  # prime LABEL SEED: into PRIMED=OUT/primed/LABEL[-seedSEED], unless it is finished there
    local flags
    PRIMED=$OUT/primed/$1
    [[ $2 != 1 ]] && PRIMED+=-seed$2
    flags=$(python -c 'import report, sys
try: print(*report.priming_flags(sys.argv[1]))  # what the label says, as report.PRIMING_LABEL maps it
except report.KygError as e: sys.exit(f"run.sh: {e}")' "$1")
    # shellcheck disable=SC2086
    python kyg.py prime $flags --seed "$2" "${PRIME[@]}" "${COMMON[@]}" --out "$PRIMED" >&2
}

ROWS=(${KYG_ROWS:-$ALL_ROWS})
started=$SECONDS
for i in "${!ROWS[@]}"; do
    row=${ROWS[$i]}
    [[ $row == *:* ]] && ROW[$row]="${row%:*} ${row#*:}"
    [[ -n "${ROW[$row]:-}" ]] || { echo "run.sh: unknown row '$row' in KYG_ROWS; use some of: $ALL_ROWS" >&2; exit 2; }
    read -r priming method <<< "${ROW[$row]}"
    elapsed=$((SECONDS - started))
    eta=$([[ $i -gt 0 ]] && echo "$((elapsed * (${#ROWS[@]} - i) / i / 60)) min" || echo "?")
    echo "== run.sh: row $row ($((i + 1)) of ${#ROWS[@]}): $priming -> $method ($((elapsed / 60)) min so far, ETA $eta)"
    seeds=1
    [[ $row == 4 || $row == 5 ]] && seeds=${KYG_PRIME_SEEDS:-1}
    for seed in $seeds; do
        init=()
        # prime in this shell, not in a $(...), so that a priming that fails stops run.sh (set -e)
        if [[ $priming != none ]]; then prime "$priming" "$seed"; init=(--init "$PRIMED"); fi
        # Full fine-tuning writes no weights: a copy of mBERT per run (~700 MB) is what PE tuning avoids.
        extra=()
        [[ $method == full ]] && extra=(--no-save)
        [[ $method != full && -n "${KYG_LRS:-}" ]] && extra+=(--lr $KYG_LRS)
        [[ $method == head || $method == adapter ]] && [[ "${KYG_LIVE_TRUNK:-0}" == 1 ]] && extra+=(--live-trunk)
        # shellcheck disable=SC2086
        python kyg.py finetune --method "$method" "${init[@]}" --lang ${KYG_LANGS:-hi af az lt et nl} \
            --seed ${KYG_SEEDS:-1 2 3} "${FINETUNE[@]}" "${extra[@]}" "${COMMON[@]}" --out "$OUT"
    done
done
echo "== run.sh: all ${#ROWS[@]} rows done in $(((SECONDS - started) / 60)) min"
for row in "${ROWS[@]}"; do  # recorded under the row's own label: the priming ran with the flags it names
    read -r priming method <<< "${ROW[$row]}"
    grep -qF "\"priming\": \"$priming\", \"method\": \"$method\"" "$OUT/results.jsonl" ||
        { echo "run.sh: row $row has no run recorded as $priming -> $method in $OUT/results.jsonl" >&2; exit 1; }
done
python kyg.py table "$OUT"
if [[ "${1:-}" == demo ]]; then
    grep -E "^\| (row|3/AT|4/Meta Priming → AT|5/FT Priming → AT|4 > 3|4 > 5) \|" "$OUT/table.md"
    echo "run.sh demo: done in $((SECONDS / 60)) min $((SECONDS % 60)) s;" \
         "the pictures of priming at work are $OUT/*.png"
fi
[[ "${1:-}" == smoke ]] && echo "run.sh smoke: the pipeline ran end to end;" \
                                "its numbers come from a tiny random model and mean nothing."
exit 0
