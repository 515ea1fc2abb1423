"""kyg: the command line. Priming (meta.py), fine-tuning and evaluation, and the results table.

    python kyg.py prime --method meta --out primed/meta             # Algorithm 1 on en + es
    python kyg.py finetune --method adapter --init primed/meta --lang hi --out results
    python kyg.py prime --method meta --pe lora --out primed/meta-lora   # Algorithm 1 for LoRA (or bitfit)
    python kyg.py table results                                      # ours beside Table 1
    python kyg.py tiny DIR        # a tiny BERT and tiny WikiAnn-style data, for offline smoke runs

Every command takes --model (hub name or local directory), --data-dir (local WikiAnn; default:
the hub), --seed, --device. Table 1's rows are:
    1 finetune full      2 finetune head      3 finetune adapter
    4 prime meta -> adapter      5 prime ft -> adapter      6 prime maml -> adapter
    7 prime meta --inner-steps 1 -> adapter
run.sh runs them all; the README says why each default below is what it is.
"""
import argparse
import fcntl
import json
import math
import os
import random
import signal
import statistics
import sys
import time

# ---- defaults: the paper's where it gives them (§4.1, §4.2, §5.1), ours otherwise (README)
MODEL = "bert-base-multilingual-cased"  # §4.2
SOURCE_LANGS = ["en", "es"]            # §4.1
TARGET_LANGS = ["hi", "af", "az", "lt", "et", "nl"]  # §4.1, Table 1
INNER_STEPS = 5                        # S, §4.2 (setting 7: 1)
INNER_LR = {"meta": 0.03, "maml": 1e-4}  # α, §4.2; the MAML loop needs 1e-4 (§5.1)
META_LR = 5e-5                         # β, AdamW with a linear schedule, §4.2
BOTTLENECK = 64                        # §4.2
SUPPORT_SIZE, QUERY_SIZE = 32, 32      # sentences in 𝒟tr and 𝒟ts of one task (ours)
FINETUNE_LR = {"full": 5e-5, "head": 1e-3, "adapter": 1e-3,  # ours; `--lr A B C` tries several
               "lora": 5e-4, "bitfit": 1e-3}                   # Hu et al.'s for a base model; Ben Zaken et al.'s top
FINETUNE_SCHEDULE = {"full": "linear", "head": "constant", "adapter": "constant",  # chosen on dev for the
                     "lora": "constant", "bitfit": "constant"}                     # adapter, kept for every PE method
EPOCHS = 5                             # ours; the epoch is chosen on dev F1
BATCH_SIZE = 32                        # ours
MAX_LENGTH = 128                       # sub-words the model sees (ours); scoring uses every word

# Table 1 of the paper: entity-level F1, mBERT, priming on en + es. (priming, fine-tuning) per row.
PAPER_TABLE1 = {
    1: ("none", "full", {"hi": 86.73, "af": 91.29, "az": 87.70, "lt": 89.43, "et": 90.88, "nl": 91.47}),
    2: ("none", "head", {"hi": 72.71, "af": 79.11, "az": 74.24, "lt": 78.34, "et": 81.23, "nl": 78.90}),
    3: ("none", "adapter", {"hi": 77.76, "af": 84.10, "az": 81.08, "lt": 83.00, "et": 85.13, "nl": 83.89}),
    4: ("meta", "adapter", {"hi": 81.25, "af": 88.23, "az": 83.29, "lt": 86.30, "et": 87.18, "nl": 88.97}),
    5: ("ft", "adapter", {"hi": 79.55, "af": 87.78, "az": 82.28, "lt": 85.79, "et": 86.56, "nl": 88.82}),
    6: ("maml", "adapter", {"hi": 80.18, "af": 85.82, "az": 81.47, "lt": 85.73, "et": 85.86, "nl": 88.13}),
    7: ("meta-S1", "adapter", {"hi": 80.23, "af": 86.46, "az": 80.35, "lt": 84.43, "et": 86.14, "nl": 88.49}),
}
ROW_NAMES = {1: "Full FT", 2: "HT", 3: "AT", 4: "Meta Priming → AT", 5: "FT Priming → AT",
             6: "MP [MAML Loop] → AT", 7: "MP [1 Inner Step] → AT"}
# Rows the paper does not have: 5b, the control for 4 > 5 (FT priming whose heads learn at the
# head-tuning rate, not at β), and 4 and 7 primed with the exact meta-gradient (meta.py).
FT_HEAD_LR = 1e-3
EXTRA_ROWS = {f"5b/FT Priming, heads at {FT_HEAD_LR:g} → AT": (f"ft-head{FT_HEAD_LR:g}", "adapter"),
              **{f"{row}/{ROW_NAMES[row]} [second order]": (f"{PAPER_TABLE1[row][0]}-2nd", "adapter") for row in (4, 7)}}
# The paper's claims, checked per language: (claim, better (priming, fine-tuning), worse). Table 1's
# orderings by row number, then Figure 3's (§5.3): before full fine-tuning, a MAML inner loop beats
# the PE one (in all but lt and et, the paper says), and either priming beats none.
ORDERINGS = [(f"{better} > {worse}", PAPER_TABLE1[better][:2], PAPER_TABLE1[worse][:2]) for better, worse in
             [(4, 5), (4, 6), (4, 7), (4, 3), (3, 2)] + [(1, row) for row in range(2, 8)]] + \
            [(f"{better}→full > {worse}→full", (better, "full"), (worse, "full"))
             for better, worse in [("maml", "meta"), ("meta", "none"), ("maml", "none")]] + \
            [("4 > 5b", PAPER_TABLE1[4][:2], EXTRA_ROWS[next(iter(EXTRA_ROWS))]),
             ("4 > 7 [second order]", *list(EXTRA_ROWS.values())[1:])]
# What makes two fine-tuning runs the same run (a rerun skips it); the device does not.
RUN_KEY = ("model", "data_dir", "init", "method", "lang", "seed", "max_train", "max_eval", "max_dev", "max_length",
           "epochs", "lr", "batch_size", "bottleneck", "cached_trunk", "schedule", "adapter_init")
# What makes two primings the same priming: a rerun resumes or skips it, and refuses other settings.
PRIMING_SETTINGS = ("method", "pe", "second_order", "model", "data_dir", "source", "steps", "inner_steps", "inner_lr",
                    "meta_lr", "head_lr", "support_size", "query_size", "bottleneck", "max_train", "max_length",
                    "seed", "adapter_init")
# How a fresh adapter starts (model.Adapter), recorded with every priming and run. Before
# "identity" (up = 0, down at PyTorch's default), both projections were N(0, 1e-3): results/.
ADAPTER_INIT = "identity"
RESULTS_FORMAT = 2  # of OUT/results.jsonl's records; 2: --init names a primed model directory
SAVE_MINUTES = 10   # the resumable state of a priming is saved this often by default
FIGURE4_PRIMING, FIGURE4_FINETUNING = ("meta", "maml", "none"), ("adapter", "full")
# Priming × fine-tuning matrices, each averaged over the languages: file -> (title, rows, columns).
# The second, Figure 4 beyond the adapter (LoRA, BitFit), only where such runs exist; its row "ft{pe}"
# is FT priming of the column's θa (ft, ft-lora, ft-bitfit): the baseline each diagonal cell must beat.
OWN_INNER_LOOP = {"adapter": "meta", "lora": "meta-lora", "bitfit": "meta-bitfit"}  # the matrix's diagonal
MATRICES = {"figure4": ("Figure 4: average test F1 over the languages, priming × fine-tuning",
                        FIGURE4_PRIMING, FIGURE4_FINETUNING),
            "figure4-pe": ("Figure 4 beyond the adapter: priming with each PE method's inner loop × tuning with "
                           "each, average test F1 over the languages; the diagonal is priming that knows where "
                           "it is going", (*OWN_INNER_LOOP.values(), "ft{pe}", "none"), tuple(OWN_INNER_LOOP))}
PRIMING_NAMES = {"meta": "adapter inner loop (Alg. 1)", "maml": "MAML inner loop", "none": "no priming",
                 "meta-lora": "LoRA inner loop", "meta-bitfit": "BitFit inner loop", "ft{pe}": "FT priming, same θa"}
matrix_priming = lambda row, method: row.format(pe="" if method == "adapter" else f"-{method}")
# "Know where you're going" beyond the adapter: in each column, priming with that method's own inner
# loop beats priming with another's, FT priming of the same θa, and none (the adapter's last two are 4 > 5, 4 > 3).
ORDERINGS += [(f"{own}→{m} > {other}→{m}", (own, m), (other, m)) for m, own in OWN_INNER_LOOP.items()
              for other in [matrix_priming(row, m) for row in MATRICES["figure4-pe"][1]]
              if other != own and (m != "adapter" or other.startswith("meta-"))]


def main(argv=None):
    args = parser().parse_args(argv)
    from data import KygError
    try:
        args.command(args)
    except KygError as e:
        sys.exit(f"kyg: error: {e}")


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other kyg error, instead of usage + message
        sys.exit(f"kyg: error: {message}; see `python {self.prog.replace('kyg', 'kyg.py', 1)} --help`")


def positive(kind):
    """An argparse type: a number of `kind` above zero (counts, sizes, learning rates)."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a{'n integer' if kind is int else ' number'}")
        if not (value > 0 and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
        return value
    return parse


def parser():
    p = Parser(prog="kyg", description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(required=True, metavar="COMMAND")
    count, rate = positive(int), positive(float)

    def shared(q):
        q.add_argument("--model", default=MODEL, help=f"hub name or local directory (default {MODEL})")
        q.add_argument("--data-dir", help="local WikiAnn, {lang}/{train,dev,test}.tsv[.gz] (default: the hub)")
        q.add_argument("--device", help="default: cuda when present, else cpu")
        q.add_argument("--max-train", type=count, help="use only the first N training sentences per language")
        q.add_argument("--max-length", type=count, default=MAX_LENGTH, help="sub-words the model sees")
        q.add_argument("--batch-size", type=count, default=BATCH_SIZE)

    q = sub.add_parser("prime", help="prime θp and θa on the source languages (Alg. 1, or setting 5)")
    shared(q)
    q.add_argument("--method", choices=["meta", "ft", "maml"], required=True,
                   help="meta: Algorithm 1; ft: multi-task fine-tuning (setting 5); maml: with the red line (first-order "
                        "MAML, as the paper's row 6)")
    q.add_argument("--pe", choices=["adapter", "lora", "bitfit"], default="adapter",
                   help="the parameter-efficient method θa belongs to, and so what the inner loop trains (default: "
                        "the paper's adapter)")
    q.add_argument("--second-order", action="store_true",
                   help="meta only: the exact meta-gradient through the inner steps, not the paper's first order")
    q.add_argument("--source", nargs="+", default=SOURCE_LANGS)
    q.add_argument("--steps", type=count, help="meta-steps (default: one pass over the smallest source train split)")
    q.add_argument("--inner-steps", type=count, default=INNER_STEPS, help="S")
    q.add_argument("--inner-lr", type=rate, help="α (default 0.03 for meta, 1e-4 for maml)")
    q.add_argument("--meta-lr", type=rate, default=META_LR, help="β")
    q.add_argument("--head-lr", type=rate, help="ft only: the heads' learning rate (default: β, like θp and θa)")
    q.add_argument("--support-size", type=count, default=SUPPORT_SIZE)
    q.add_argument("--query-size", type=count, default=QUERY_SIZE)
    q.add_argument("--bottleneck", type=count, default=BOTTLENECK)
    q.add_argument("--seed", type=int, default=1)
    q.add_argument("--save-every", type=count, metavar="N", help="save the state a stopped run resumes from "
                   f"every N meta-steps (default: every {SAVE_MINUTES} minutes; always on Ctrl-C)")
    q.add_argument("--out", required=True, help="the primed model directory to write (θp and θa)")
    q.set_defaults(command=prime)

    q = sub.add_parser("finetune", help="fine-tune on one target language; append the result to OUT/results.jsonl")
    shared(q)
    q.add_argument("--method", choices=["full", "head", "adapter", "lora", "bitfit"], required=True,
                   help="what is trained: everything, θh alone, or θh and the θa of a PE method")
    q.add_argument("--init", help="a primed model directory (default: the plain pretrained model)")
    q.add_argument("--lang", nargs="+", required=True, help="one run per language and seed")
    q.add_argument("--seed", type=int, nargs="+", default=[1])
    q.add_argument("--epochs", type=count, default=EPOCHS)
    q.add_argument("--lr", type=rate, nargs="+", help="default: 5e-5 full, 5e-4 lora, 1e-3 others; several: "
                   "one run each, and `table` keeps the one with the best dev F1 per row and language")
    q.add_argument("--bottleneck", type=count, default=BOTTLENECK)
    q.add_argument("--max-eval", type=count, help="score only the first N dev and test sentences")
    q.add_argument("--max-dev", type=count, help="score only the first N dev sentences (over --max-eval)")
    q.add_argument("--live-trunk", action="store_true",
                   help="head/adapter: run the frozen encoder (with its dropout) at every step instead of "
                        "training on its eval-mode outputs computed once; ~30x slower on a CPU, and F1 "
                        "within the seed spread of the default (README, 'Frozen trunk')")
    q.add_argument("--no-save", action="store_true", help="do not write the fine-tuned weights")
    q.add_argument("--out", required=True, help="results directory")
    q.set_defaults(command=finetune)

    q = sub.add_parser("table", help="ours beside the paper's Table 1, Figures 3 and 4, from DIR/results.jsonl")
    q.add_argument("dir")
    q.set_defaults(command=table)

    q = sub.add_parser("tiny", help="write a tiny BERT (DIR/model) and tiny WikiAnn-style data (DIR/data)")
    q.add_argument("dir")
    q.set_defaults(command=tiny)
    return p


# ----------------------------------------------------------------------------- shared helpers

def setup(args, seed):
    """Seed everything; pick the device."""
    import torch
    random.seed(seed)
    torch.manual_seed(seed)
    return torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))


def to_device_fn(tokenizer, device):
    from data import collate
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    return lambda examples: {k: v.to(device, non_blocking=True) for k, v in collate(examples, pad_id).items()}


def read_results(directory):
    """The records of DIR/results.jsonl; a line that is not one is a KygError naming it."""
    from data import KygError
    path = os.path.join(directory, "results.jsonl")
    if not os.path.isfile(path):
        return []
    records = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as e:
                raise KygError(f"{path}, line {number}, is not a JSON record ({e}); delete or mend that line")
            record = record if isinstance(record, dict) else {}
            missing = {"format", "priming", "method", "lang", "seed", "test_f1"} - record.keys()
            if record.get("format", RESULTS_FORMAT) != RESULTS_FORMAT or missing:
                why = f"lacks {', '.join(sorted(missing))}" if missing else f"says format {record['format']}"
                raise KygError(f"{path}, line {number}, is not a kyg result of format {RESULTS_FORMAT} (it {why}); "
                               f"read it with the kyg that wrote it, or pass another results directory")
            records.append(record)
    return records


def append_result(directory, record):
    """Append one JSON line atomically: the whole file is rewritten to a temp file and renamed.
    The rewrite holds a lock, so that finetune processes running side by side into one folder
    (say, one per language) cannot overwrite each other's lines."""
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, "results.jsonl")
    with open(f"{path}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        lines = [json.dumps(r) for r in read_results(directory)] + [json.dumps({"format": RESULTS_FORMAT, **record})]
        tmp = f"{path}.tmp{os.getpid()}"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        os.replace(tmp, path)


def priming_label(priming):
    """How a model was primed, as Table 1 names it: none, meta, ft, maml, with -lora or -bitfit when
    its θa was not the adapter, then -S1 (S ≠ 5; row 7); then
    -head<lr> for FT priming with its own head learning rate (ft-head0.001, row 5b), and -2nd for
    the exact meta-gradient (meta-2nd, meta-S1-2nd). Priming seeds share a label: their runs pool."""
    if priming is None:
        return "none"
    label = priming["method"] + (f"-{priming['pe']}" if priming.get("pe", "adapter") != "adapter" else "")
    if priming["method"] != "ft" and priming["inner_steps"] != INNER_STEPS:
        label += f"-S{priming['inner_steps']}"
    if priming.get("head_lr"):
        label += f"-head{priming['head_lr']:g}"
    return label + ("-2nd" if priming.get("second_order") else "")


# ----------------------------------------------------------------------------- prime

def prime(args):
    """Write a primed model directory: θp and θa after Algorithm 1 (or setting 5) on --source. A
    stopped run (Ctrl-C, a crash, a kill) resumes from the state it last saved in --out."""
    import model as M
    from data import KygError, TaskSampler, encode, load_split
    from meta import priming_optimizer, prime as run_priming
    if os.path.isfile(args.out):
        raise KygError(f"--out {args.out} is a file; priming writes a directory: pass a new path")
    if args.second_order and args.method != "meta":
        raise KygError(f"--second-order is for --method meta (the PE inner loop); drop it for {args.method}")
    if args.head_lr and args.method != "ft":
        raise KygError(f"--head-lr is for --method ft (meta and maml train heads in the inner loop, at α)")
    args.inner_lr = args.inner_lr if args.inner_lr is not None else INNER_LR.get(args.method, 0.0)
    args.adapter_init = ADAPTER_INIT
    settings = {k: getattr(args, k) for k in PRIMING_SETTINGS}
    state_path = os.path.join(args.out, M.PRIMING_STATE)
    if os.path.isfile(os.path.join(args.out, M.PRIMING_RECORD)):
        same_settings(M.read_priming(args.out), settings, args.out)
        print(f"kyg: {args.out} is primed already with these settings, skipped (delete it to prime again)")
        return
    saved = M.load_tensors(state_path) if os.path.isfile(state_path) else None
    if saved:
        same_settings(saved[1]["settings"], settings, f"the stopped priming in {args.out}")
    device = setup(args, args.seed)
    model, tokenizer = M.load(args.model, args.source, args.pe, args.bottleneck)
    model.to(device)
    sources = {lang: encode(load_split(lang, "train", args.data_dir, args.max_train), tokenizer, args.max_length)
               for lang in args.source}
    sampler = TaskSampler(sources, args.support_size, args.query_size, args.seed)
    steps = settings["steps"] = args.steps or sampler.steps_per_pass()
    smallest = min(len(examples) for examples in sources.values())
    why = "--steps" if args.steps else f"one pass over {smallest} sentences, the smallest source language's " \
        f"training sentences, {args.support_size} + {args.query_size} a task"
    print(f"kyg: priming takes {steps} {'meta-steps' if args.method != 'ft' else 'updates'} ({why})")
    optimizer, scheduler = priming_optimizer(model, args.method, args.meta_lr, steps, args.head_lr)
    history = {"loss": [], "support_loss": [], "seconds": 0.0}
    if saved:
        history = M.restore_priming_state(*saved, model, optimizer, scheduler, sampler)["history"]
        print(f"kyg: resuming the priming in {args.out} from step {len(history['loss'])} of {steps}")
    started, last_save, stop = time.time() - history["seconds"], time.time(), []

    def after_step():  # save the state every --save-every steps (or minutes), and on Ctrl-C
        nonlocal last_save
        step = len(history["loss"])
        due = step % args.save_every == 0 if args.save_every else time.time() - last_save >= 60 * SAVE_MINUTES
        if step < steps and (due or stop):
            history["seconds"] = round(time.time() - started, 1)
            M.save_priming_state(state_path, model, optimizer, scheduler, sampler,
                                 {"settings": settings, "history": history})
            last_save = time.time()
            if stop:
                sys.exit(f"kyg: stopped after step {step} of {steps}, state saved in {args.out}; "
                         f"rerun the same command to resume")

    def on_ctrl_c(*_):
        stop.append(True)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C quits at once
        print("\nkyg: Ctrl-C: saving after this step (press again to quit without saving)", file=sys.stderr)

    previous_handler = signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        run_priming(model, sampler, to_device_fn(tokenizer, device), args.method, optimizer, scheduler, steps,
                    args.inner_steps, args.inner_lr, history, after_step, args.second_order)
    finally:
        signal.signal(signal.SIGINT, previous_handler)
    losses, curves = history["loss"], history["support_loss"]
    curve = [round(statistics.mean(c[s] for c in curves), 4) for s in range(len(curves[0]))] if curves else None
    priming = {**settings, "seconds": round(time.time() - started, 1),
               "loss_by_step": [round(loss, 4) for loss in losses], "support_loss_by_inner_step": curve}
    M.save_primed(model, tokenizer, priming, args.out)  # priming.json last: only now is it finished
    if os.path.isfile(state_path):
        os.remove(state_path)
    inner = "" if curve is None else f", support loss over the inner steps {' > '.join(f'{x:.3f}' for x in curve)}"
    print(f"kyg: primed ({priming_label(priming)}, {steps} steps, {priming['seconds']} s, query loss "
          f"{losses[0]:.3f} -> {losses[-1]:.3f}{inner}) -> {args.out}")


def same_settings(saved, settings, what):
    """A KygError naming the first setting in which `settings` differ from the `saved` ones."""
    from data import KygError
    for key, value in settings.items():
        if saved.get(key) != value and not (key == "steps" and value is None):  # None: one pass, resolved later
            name = "kyg's adapter init" if key == "adapter_init" else f"--{key.replace('_', '-')}"  # no flag
            raise KygError(f"{what} was made with {name} {saved.get(key)}, not {value}; "
                           f"rerun with the same settings, or pass another --out to start afresh")


# ----------------------------------------------------------------------------- finetune

def finetune(args):
    """One fine-tuning run per --lang and --seed; a run already in OUT/results.jsonl is skipped."""
    from data import KygError
    from model import read_priming
    if args.live_trunk and args.method not in ("head", "adapter"):
        raise KygError(f"--live-trunk is for head and adapter tuning: {args.method} always runs the encoder")
    primed_from = read_priming(args.init)["model"] if args.init else args.model
    if os.path.normpath(primed_from) != os.path.normpath(args.model):
        raise KygError(f"{args.init} was primed from {primed_from!r}, not from --model {args.model!r}; "
                       f"pass --model {primed_from}")
    # Recorded as `cached_trunk`: whether training ran on stored features of the frozen trunk.
    args.cached_trunk = args.method in ("head", "adapter") and not args.live_trunk
    args.schedule, args.adapter_init = FINETUNE_SCHEDULE[args.method], ADAPTER_INIT
    key = lambda c: tuple(c.get(k) for k in RUN_KEY)
    runs = [(lang, lr, seed) for lang in args.lang for lr in args.lr or [None] for seed in args.seed]
    reused = {}  # the same for every seed and rate of a language: tokenised splits, frozen-trunk features
    for number, (lang, lr, seed) in enumerate(runs, 1):
        if reused.get("lang") != lang:
            reused = {"lang": lang}
        config = {**{k: v for k, v in vars(args).items() if k not in ("command", "device", "out", "no_save", "live_trunk")},
                  "lang": lang, "lr": lr, "seed": seed}
        label = f"run {number} of {len(runs)}"
        if any(key(r.get("config", {})) == key(config) for r in read_results(args.out)):
            print(f"kyg: {label}: {args.method} on {lang}, lr {lr or 'default'}, seed {seed}, init "
                  f"{args.init or 'none'}: already in {args.out}/results.jsonl, skipped")
        else:
            finetune_one(args, lang, lr or FINETUNE_LR[args.method], seed, config, reused, label)


def trunk_features(model, examples, to_device, batch_size):
    """f(x; θp) in eval mode, one [T_i, H] tensor per example."""
    import torch
    from data import batches
    model.eval()
    features = [None] * len(examples)
    with torch.no_grad():
        for chunk in batches(examples, 2 * batch_size):
            batch = to_device([examples[i] for i in chunk])
            hidden = model.encode(batch["input_ids"], batch["attention_mask"])
            for row, i in enumerate(chunk):
                features[i] = hidden[row, :len(examples[i].input_ids)].clone()
    return features


def logits_and_labels(model, lang, examples, chunk, features, to_device):
    """(logits [B, T, C], labels [B, T]) of examples[chunk], from stored trunk features if given."""
    from torch.nn.utils.rnn import pad_sequence
    batch = to_device([examples[i] for i in chunk])
    if features is None:
        return model(lang, batch["input_ids"], batch["attention_mask"]), batch["labels"]
    return model(lang, hidden=pad_sequence([features[i] for i in chunk], batch_first=True)), batch["labels"]


def score(model, examples, features, forward, batch_size):
    """Entity-level F1 of the model's tags for `examples`, in eval mode."""
    import torch
    from data import LABELS, batches, f1, word_tags
    model.eval()
    gold, predicted = [], []
    with torch.no_grad():
        for chunk in batches(examples, 2 * batch_size):
            logits = forward(examples, chunk, features)[0].float().cpu()
            for row, i in enumerate(chunk):
                gold.append([LABELS[t] for t in examples[i].tags])
                predicted.append(word_tags(examples[i], logits[row]))
    return f1(gold, predicted)


def finetune_one(args, lang, lr, seed, config, reused, run_label):
    """Fine-tune θ of --method on `lang` at `lr`, choose the epoch on dev F1, report dev and test F1.
    `reused` carries what depends on neither seed nor rate from one run to the next."""
    import torch
    import model as M
    from tqdm import tqdm
    from data import batches, encode, load_split
    device = setup(args, seed)
    priming = M.read_priming(args.init) if args.init else None
    pe = args.method if args.method in M.PE_METHODS else priming["pe"] if args.method == "full" and priming else None
    model, tokenizer = M.load(args.model, [lang], pe, args.bottleneck)
    if args.init:
        M.load_primed(model, args.init)
    groups = {"full": ("pretrained", "adapter", "head"), "head": ("head",)}.get(args.method, ("adapter", "head"))
    trainable = M.named_params(model, *groups)
    for p in model.parameters():
        p.requires_grad_(any(p is q for q in trainable.values()))
    model.to(device)
    trained, total = M.parameter_count(model, groups)
    print(f"kyg: {args.method} fine-tuning updates {trained:,} of {total:,} parameters "
          f"({100 * trained / total:.3g}%)")

    if "splits" not in reused:
        split = lambda name, cap: encode(load_split(lang, name, args.data_dir, cap), tokenizer, args.max_length)
        reused["splits"] = (split("train", args.max_train), split("dev", args.max_dev or args.max_eval),
                            split("test", args.max_eval))
    train, dev, test = reused["splits"]
    to_device = to_device_fn(tokenizer, device)
    optimizer = torch.optim.AdamW(trainable.values(), lr=lr, fused=device.type == "cuda")
    steps = args.epochs * math.ceil(len(train) / args.batch_size)
    scheduler = torch.optim.lr_scheduler.LambdaLR(  # a linear decay to 0, or constant
        optimizer, lambda step: 1 - step / steps if args.schedule == "linear" else 1.0)
    rng = random.Random(seed)

    # While training leaves f(x; θp) alone (head tuning, and adapter tuning, whose θa sits after f),
    # it is the same in every epoch: dev and test are scored from features computed once, which is
    # exact in eval mode. Training on them too (the default; --live-trunk turns it off) drops the
    # dropout inside the frozen encoder. LoRA and BitFit change f itself: no shortcut there.
    frozen_trunk = "pretrained" not in groups and model.trunk_is_fixed_by_pretrained
    forward = lambda examples, chunk, features: logits_and_labels(model, lang, examples, chunk, features, to_device)
    evaluate = lambda examples, features: score(model, examples, features, forward, args.batch_size)

    started = time.time()
    if frozen_trunk and "features" not in reused:  # θp (plain or primed) is the same for every seed
        features = lambda examples: trunk_features(model, examples, to_device, args.batch_size)
        reused["features"] = (features(train) if args.cached_trunk else None, features(dev), features(test))
    train_features, dev_features, test_features = reused.get("features", (None, None, None))
    best = (-1.0, 0, None)  # (dev F1, epoch, trained state)
    progress = tqdm(total=steps, desc=f"{run_label}: {priming_label(priming)}→{args.method} {lang} s{seed}",
                    unit="step")
    for epoch in range(1, args.epochs + 1):
        model.train()
        for chunk in batches(train, args.batch_size, rng):
            loss = M.token_loss(*forward(train, chunk, train_features))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            progress.update()
            progress.set_postfix(loss=f"{loss.item():.3f}", best_dev=f"{best[0]:.1f}")
        dev_f1 = evaluate(dev, dev_features)
        if dev_f1 > best[0]:
            state = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}
            best = (dev_f1, epoch, state)
    progress.close()
    dev_f1, best_epoch, state = best
    model.load_state_dict(state, strict=False)
    test_f1 = evaluate(test, test_features)

    primed_seed = f"-p{priming['seed']}" if priming and priming["seed"] != 1 else ""
    name = f"{priming_label(priming)}{primed_seed}-{args.method}-{lang}-lr{lr:g}-s{seed}"
    saved_bytes = sum(t.numel() * t.element_size() for t in state.values())
    if not args.no_save:
        M.save_tensors(state, os.path.join(args.out, "weights", f"{name}.safetensors"),
                       {"method": args.method, "lang": lang, "init": args.init})
    record = {"priming": priming_label(priming), "method": args.method, "lang": lang, "lr": lr, "seed": seed,
              "dev_f1": round(dev_f1, 2), "test_f1": round(test_f1, 2), "best_epoch": best_epoch,
              "trainable_params": trained, "total_params": total, "trainable_fraction": trained / total,
              "saved_bytes": saved_bytes, "seconds": round(time.time() - started, 1),
              "device": str(device), "train_sentences": len(train), "config": config, "priming_config": priming}
    append_result(args.out, record)
    print(f"kyg: {name}: dev F1 {dev_f1:.2f} (epoch {best_epoch}), test F1 {test_f1:.2f}, "
          f"{saved_bytes / 2**20:.2f} MiB of weights to store -> {args.out}/results.jsonl")


# ----------------------------------------------------------------------------- table

def table(args):
    """Ours (mean ± std over seeds) beside the paper's Table 1, Figure 3, the orderings it claims, Figure 4."""
    results = read_results(args.dir)
    if not results:
        from data import KygError
        raise KygError(f"no results in {args.dir}/results.jsonl: run `kyg.py finetune --out {args.dir}` first")
    runs = {}  # (priming, method, lang) -> {lr: [record]}; with several rates, dev F1 picks one
    for r in results:
        runs.setdefault((r["priming"], r["method"], r["lang"]), {}).setdefault(r.get("lr"), []).append(r)
    best_lr = {key: max(by_lr, key=lambda lr: statistics.mean(r.get("dev_f1", 0) for r in by_lr[lr]))
               for key, by_lr in runs.items()}
    chosen = {key: runs[key][lr] for key, lr in best_lr.items()}
    scores = {key: [r["test_f1"] for r in records] for key, records in chosen.items()}
    langs = [l for l in TARGET_LANGS if any(k[2] == l for k in scores)] + \
        sorted({k[2] for k in scores} - set(TARGET_LANGS))
    stat = lambda key: (statistics.mean(scores[key]), statistics.stdev(scores[key]) if len(scores[key]) > 1 else 0.0,
                        len(scores[key])) if key in scores else None

    out = [f"# Table 1: ours beside the paper's\n",
           f"Test F1 (entity-level, micro), mean ± std over seeds (n); the paper's number after the slash.",
           f"From `{os.path.join(args.dir, 'results.jsonl')}`, {len(results)} runs.\n",
           "| row | " + " | ".join(langs) + " | average |", "|---|" + "---|" * (len(langs) + 1)]
    cell = lambda s: "–" if not s else f"{s[0]:.2f} ({s[2]})" if s[2] == 1 else f"{s[0]:.2f} ± {s[1]:.2f} ({s[2]})"
    rows = [(f"{row}/{ROW_NAMES[row]}", priming, method, paper) for row, (priming, method, paper) in PAPER_TABLE1.items()]
    for name, (priming, method) in EXTRA_ROWS.items():  # where they were run, each beside the row it varies
        if any(key[:2] == (priming, method) for key in scores):
            rows.insert(max(i for i, row in enumerate(rows) if row[0][0] == name[0]) + 1, (name, priming, method, {}))
    for name, priming, method, paper in rows:
        cells, ours, theirs = [], [], []
        for lang in langs:
            s = stat((priming, method, lang))
            cells.append(f"{cell(s)} / {paper.get(lang, '–')}")
            if s and (lang in paper or not paper):
                ours.append(s[0])
                theirs += [paper[lang]] if paper else []
        average = f"{statistics.mean(ours):.2f} / {f'{statistics.mean(theirs):.2f}' if theirs else '–'}" if ours else "–"
        comparable = sum(lang in paper for lang in langs) if paper else len(langs)
        if ours and len(ours) < comparable:  # an average over fewer languages than the other rows'
            average += f" ({len(ours)} of {comparable} languages)"
        out.append(f"| {name} | " + " | ".join(cells) + f" | {average} |")

    header = lambda first: [f"| {first} | " + " | ".join(langs) + " |", "|---|" + "---|" * len(langs)]
    pairs = sorted({key[:2] for key in runs})
    if any(len(by_lr) > 1 for by_lr in runs.values()):
        out += ["\n## Learning rate chosen on dev\n", "The rate with the best mean dev F1 over its runs, of the "
                "n rates tried: rate (n). The table shows that rate's test F1.\n"] + header("priming → fine-tuning")
        out += [f"| {p} → {m} | " + " | ".join(f"{best_lr[p, m, l]:g} ({len(runs[p, m, l])})" if (p, m, l) in runs
                                                else "–" for l in langs) + " |" for p, m in pairs]
    priming_seed = lambda r: (r.get("priming_config") or {}).get("seed")
    pooled = [pair for pair in pairs if any(len({priming_seed(r) for r in chosen[key]}) > 1
                                            for key in chosen if key[:2] == pair)]
    if pooled:
        out += ["\n## Priming seeds\n", "Test F1 per priming seed p (mean over fine-tuning seeds). The table's "
                "cells pool them, so their std holds the spread of both.\n"] + header("priming → fine-tuning")
        for p, m in pooled:
            cells = []
            for l in langs:
                by_seed = {}
                for r in chosen.get((p, m, l), []):
                    by_seed.setdefault(priming_seed(r), []).append(r["test_f1"])
                cells.append(", ".join(f"p{s}: {statistics.mean(v):.2f}" for s, v in sorted(by_seed.items())) or "–")
            out.append(f"| {p} → {m} | " + " | ".join(cells) + " |")
    curves = {(r["priming"], p["seed"]): p for r in results if (p := r.get("priming_config") or {}).get("loss_by_step")}
    if curves:  # e.g. whether row 5b's heads learn where row 5's barely move
        out += ["\n## Priming loss\n", "Each priming's loss, averaged over each tenth of its steps: meta and maml, "
                "the query loss after the inner loop; ft, the loss of the support and query batches, each summed "
                "over a step's tasks. Then its length in steps and in minutes.\n",
                "| priming (seed) | " + " | ".join(f"{10 * i}–{10 * i + 10}%" for i in range(10)) + " | steps | min |",
                "|---|" + "---|" * 12]
        for (priming, seed), p in sorted(curves.items()):
            loss, n = p["loss_by_step"], len(p["loss_by_step"])
            tenths = [loss[i * n // 10:max((i + 1) * n // 10, i * n // 10 + 1)] for i in range(10)]
            out.append(f"| {priming} ({seed}) | " + " | ".join(f"{statistics.mean(t):.3f}" for t in tenths) +
                       f" | {n} | {p['seconds'] / 60:.0f} |")

    if any(key[1] == "full" for key in scores):  # where full fine-tuning ran
        out += ["\n## Figure 3: full fine-tuning after each priming\n",
                "Test F1, mean ± std over seeds (n). The paper gives these as bars only, without numbers.\n"]
        out += header("priming → full FT") + [f"| {priming}: {PRIMING_NAMES[priming]} | " + " | ".join(
            cell(stat((priming, "full", l))) for l in langs) + " |" for priming in FIGURE4_PRIMING]

    out += ["\n## The paper's orderings, per language\n",
            "Table 1's and Figure 3's; then, in the claims naming meta-lora or meta-bitfit, the one §6 expects "
            "beyond the adapter: each PE method is primed best by its own inner loop. "
            "held: ours agree and the gap exceeds the larger seed std; tie: the gap is within it; "
            "not held: ours disagree by more than it; one seed: a side has a single run, so no spread to judge by.\n",
            "| claim | " + " | ".join(langs) + " |", "|---|" + "---|" * len(langs)]
    for claim, better, worse in ORDERINGS:
        cells = []
        for lang in langs:
            a, b = stat(better + (lang,)), stat(worse + (lang,))
            if not (a and b):
                cells.append("–")
                continue
            gap, spread = a[0] - b[0], max(a[1], b[1])
            verdict = "one seed" if min(a[2], b[2]) < 2 else \
                "held" if gap > spread else "tie" if abs(gap) <= spread else "not held"
            cells.append(f"{verdict} ({gap:+.2f})")
        if any(c != "–" for c in cells):  # a claim about rows this folder does not have is left out
            out.append(f"| {claim} | " + " | ".join(cells) + " |")

    matrices = {}
    for name, (title, primings, methods) in MATRICES.items():
        if name != "figure4" and not any(key[1] in ("lora", "bitfit") for key in scores):
            continue
        matrix = {}
        for priming in primings:
            for method in methods:
                means = [s[0] for l in langs if (s := stat((matrix_priming(priming, method), method, l)))]
                matrix[priming, method] = statistics.mean(means) if len(means) == len(langs) else None
        primings = [p for p in primings if any(matrix[p, m] is not None for m in methods)]  # rows and columns
        methods = [m for m in methods if any(matrix[p, m] is not None for p in primings)]   # not run are left out
        if not methods:
            continue
        matrices[name] = primings, methods, matrix
        out += [f"\n## {title}\n", "| priming ↓ fine-tuning → | " + " | ".join(methods) + " |",
                "|---|" + "---|" * len(methods)]
        for priming in primings:
            out.append(f"| {PRIMING_NAMES[priming]} | " + " | ".join(f"{matrix[priming, m]:.2f}" if matrix[priming, m] is not None
                                                      else "–" for m in methods) + " |")
    text = "\n".join(out) + "\n"
    with open(os.path.join(args.dir, "table.md.tmp"), "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(os.path.join(args.dir, "table.md.tmp"), os.path.join(args.dir, "table.md"))
    print(text)
    print(plot(args.dir, scores, langs, matrices))


def plot(directory, scores, langs, matrices):
    """Figure 3 (full fine-tuning after each priming, per language) and the matrices as PNG."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "kyg: figures skipped: `pip install matplotlib` to draw figure3.png and figure4.png"
    drawn = ["figure3"] if any(key[1] == "full" for key in scores) else []  # where full fine-tuning ran
    if drawn:
        fig, ax = plt.subplots(figsize=(1.2 + 1.1 * len(langs), 3.2))
        for i, priming in enumerate(FIGURE4_PRIMING):  # points, not bars from 0: the gaps are 1-2 F1
            runs = [scores.get((priming, "full", lang), []) for lang in langs]
            ax.errorbar([x + 0.2 * (i - 1) for x in range(len(langs))],
                        [statistics.mean(r) if r else float("nan") for r in runs],
                        yerr=[statistics.stdev(r) if len(r) > 1 else 0 for r in runs],
                        fmt="o", capsize=3, label=PRIMING_NAMES[priming])
        ax.set_xticks(range(len(langs)), langs)
        ax.set_ylabel("test F1 after full FT\n(mean ± std over seeds)")
        ax.legend(fontsize=8, ncol=3, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)  # clear of the points
        fig.tight_layout()
        fig.savefig(os.path.join(directory, "figure3.png"), dpi=120)
    for name, (primings, methods, matrix) in matrices.items():
        fig, ax = plt.subplots(figsize=(3.2 + 1.3 * len(methods), 0.8 + 0.8 * len(primings)))
        grid = [[matrix[p, m] if matrix[p, m] is not None else float("nan") for m in methods] for p in primings]
        image = ax.imshow(grid, cmap="Greens")
        for i, row in enumerate(grid):
            for j, value in enumerate(row):  # white on the darker half of the colour map
                dark = value == value and image.norm(value) > 0.5
                ax.text(j, i, f"{value:.2f}" if value == value else "not run", ha="center", va="center",
                        color="white" if dark else "black")
                if OWN_INNER_LOOP.get(methods[j]) == primings[i] and name == "figure4-pe":  # the diagonal
                    ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, lw=2.5, ec="black"))
        ax.set_xticks(range(len(methods)), methods)
        ax.set_xlabel("fine-tuning")
        ax.set_yticks(range(len(primings)), [PRIMING_NAMES.get(p, f"{p} priming") for p in primings])
        ax.set_title("average test F1" + (" (boxed: own inner loop)" if name == "figure4-pe" else ""))
        fig.tight_layout()
        fig.savefig(os.path.join(directory, f"{name}.png"), dpi=120)
    return "kyg: wrote " + ", ".join(f"{directory}/{name}.png" for name in drawn + list(matrices))


# ----------------------------------------------------------------------------- tiny

def tiny(args):
    """The offline stand-ins for mBERT and WikiAnn that the tests and `run.sh smoke` use."""
    from data import TINY_SYLLABLES, write_tiny_data
    from model import write_tiny_model
    write_tiny_model(os.path.join(args.dir, "model"), TINY_SYLLABLES)
    write_tiny_data(os.path.join(args.dir, "data"), SOURCE_LANGS + TARGET_LANGS)
    print(f"kyg: wrote {args.dir}/model (tiny BERT) and {args.dir}/data (tiny WikiAnn-style data)")


if __name__ == "__main__":
    main()
