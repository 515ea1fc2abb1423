"""kyg: the command line. Priming (meta.py), then fine-tuning and scoring (here), then the table (report.py).

    python kyg.py prime --method meta --out primed/meta             # Algorithm 1 on en + es
    python kyg.py finetune --method adapter --init primed/meta --lang hi --out results
    python kyg.py prime --method meta --pe lora --out primed/meta-lora   # Algorithm 1 for LoRA (or bitfit)
    python kyg.py table results                                      # ours beside Table 1
    python kyg.py tiny DIR        # a tiny BERT and tiny WikiAnn-style data, for offline smoke runs

Table 1's rows: 1 finetune full, 2 head, 3 adapter; 4 prime meta, 5 ft, 6 maml, 7 meta --inner-steps 1,
each -> finetune adapter (report.ROWS; run.sh runs them). Processes on one command share its work.
"""
import argparse
import copy
import functools
import math
import os
import random
import signal
import sys
import time
from collections import namedtuple
from types import SimpleNamespace

import torch
from tqdm.auto import tqdm

import model as M
import report
from data import LABELS, TaskSampler, batches, collate, encode, f1, load_split, word_tags
from meta import InnerLoop, prime as priming_steps, priming_optimizer
from report import KygError, priming_label
from tiny import write_tiny_data, write_tiny_model

# ---- defaults: the paper's where it gives them (§4.1, §4.2, §5.1), ours otherwise (README)
MODEL = "bert-base-multilingual-cased"  # §4.2
SOURCE_LANGS = ["en", "es"]            # §4.1
INNER_STEPS = 5                        # S, §4.2 (setting 7: 1)
INNER_LR = {"meta": 0.03, "maml": 1e-4}  # α, §4.2; the MAML loop needs 1e-4 (§5.1)
META_LR = 5e-5                         # β, AdamW with a linear schedule, §4.2
BOTTLENECK = 64                        # §4.2
SUPPORT_SIZE, QUERY_SIZE = 32, 32      # sentences in 𝒟tr and 𝒟ts of one task (ours)
FINETUNE_LR = {"full": 5e-5, "head": 1e-3, "adapter": 1e-3,  # ours; `--lr A B C` tries several
               "lora": 5e-4, "bitfit": 1e-3}                   # Hu et al.'s for a base model; Ben Zaken et al.'s top
# full FT decays linearly to 0; the rest keep a constant rate, chosen on dev for the adapter, kept for every PE method
FINETUNE_SCHEDULE = {method: "linear" if method == "full" else "constant" for method in FINETUNE_LR}
EPOCHS = 5                             # ours; the epoch is chosen on dev F1
BATCH_SIZE = 32                        # ours
MAX_LENGTH = 128                       # sub-words the model sees (ours); scoring uses every word


def main(argv=None):
    args = parser().parse_args(argv)
    try:
        args.command(args)
    except KygError as e:
        sys.exit(f"kyg: error: {e}")
    except torch.OutOfMemoryError as e:  # a device's memory, not a file: say what to change
        sys.exit(f"kyg: error: out of memory on the device ({str(e).splitlines()[0][:120]}); pass a smaller "
                 f"--batch-size, or --bf16, or free the device")
    except OSError as e:  # a path that cannot be written or read: under a file, read-only, a full disk
        sys.exit(f"kyg: error: {e.filename or 'a file'}: {e.strerror or e}; check that path and its permissions")


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, like every other kyg error, instead of usage + message
        sys.exit(f"kyg: error: {message}; see `python {self.prog.replace('kyg', 'kyg.py', 1)} --help`")


def positive(kind):
    """An argparse type: a number of `kind` above zero (counts, sizes, learning rates)."""
    def parse(text):
        value = kind(text)  # not a number: argparse says "invalid int value: 'x'"
        if not (value > 0 and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be above 0, got {text}")
        return value
    parse.__name__ = kind.__name__
    return parse


def parser():
    p = Parser(prog="kyg", description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(required=True, metavar="COMMAND")
    count, rate = positive(int), positive(float)

    def shared(q):
        q.add_argument("--model", default=MODEL, help=f"hub name or local directory (default {MODEL})")
        # --data-dir in one spelling (no trailing slash, no ./): a run's key holds it (run_config)
        q.add_argument("--data-dir", type=os.path.normpath,
                       help="local WikiAnn, {lang}/{train,dev,test}.tsv (default: the hub)")
        q.add_argument("--device", help="default: cuda when present, else cpu")
        q.add_argument("--bf16", action="store_true", help="run the encoder's forward under bfloat16 autocast "
                       "(losses, optimizer and stored features stay fp32); off: the paper's numbers are fp32")
        q.add_argument("--max-train", type=count, help="use only the first N training sentences per language")
        q.add_argument("--max-length", type=count, default=MAX_LENGTH, help="sub-words the model sees")
        q.add_argument("--batch-size", type=count, default=BATCH_SIZE)
        q.add_argument("--bottleneck", type=count, default=BOTTLENECK, help="the adapter's")

    q = sub.add_parser("prime", help="prime θp and θa on the source languages (Alg. 1, or setting 5)")
    shared(q)
    q.add_argument("--method", choices=["meta", "ft", "maml"], required=True, help="meta: Algorithm 1; ft: "
                   "multi-task fine-tuning (setting 5); maml: with the red line (first-order, as the paper's row 6)")
    q.add_argument("--pe", choices=M.PE_METHODS, default="adapter", help="the PE method θa belongs to, so what the "
                   "inner loop trains (default: the paper's adapter)")
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
    q.add_argument("--seed", type=int, default=1)
    q.add_argument("--save-every", type=count, metavar="N", help="save the state a stopped run resumes from "
                   f"every N meta-steps (default: every {SAVE_MINUTES} minutes; always on Ctrl-C)")
    q.add_argument("--out", required=True, help="the primed model directory to write (θp and θa)")
    q.set_defaults(command=prime)

    q = sub.add_parser("finetune", help="fine-tune on target languages; append each run to OUT/results.jsonl")
    shared(q)
    q.add_argument("--method", choices=list(FINETUNE_LR), required=True,
                   help="what is trained: everything, θh alone, or θh and the θa of a PE method")
    q.add_argument("--init", type=os.path.normpath, help="a primed model directory (default: the pretrained model)")
    q.add_argument("--lang", nargs="+", required=True, help="one run per language, rate and seed")
    q.add_argument("--seed", type=int, nargs="+", default=[1])
    q.add_argument("--epochs", type=count, default=EPOCHS)
    q.add_argument("--lr", type=rate, nargs="+", help="default: 5e-5 full, 5e-4 lora, 1e-3 others; several: "
                   "one run each, and `table` keeps the one with the best dev F1 per row and language")
    q.add_argument("--max-eval", type=count, help="score only the first N dev and test sentences")
    q.add_argument("--max-dev", type=count, help="score only the first N dev sentences (over --max-eval)")
    q.add_argument("--live-trunk", action="store_true", help="head/adapter: run the frozen encoder (with its "
                   "dropout) at every step, not once; about 36x slower on a CPU (docs/details.md, 'Frozen trunk')")
    q.add_argument("--no-save", action="store_true", help="do not write the fine-tuned weights")
    q.add_argument("--out", required=True, help="results directory")
    q.set_defaults(command=finetune)

    q = sub.add_parser("table", help="ours beside the paper's Table 1, Figures 3 and 4, from DIR/results.jsonl")
    q.add_argument("dir")
    q.set_defaults(command=lambda args: print(*report.table(args.dir), sep="\n"))

    q = sub.add_parser("tiny", help="write a tiny BERT (DIR/model) and tiny WikiAnn-style data (DIR/data)")
    q.add_argument("dir")
    q.set_defaults(command=tiny)
    return p


# ----------------------------------------------------------------------------- shared helpers

def device_of(args):
    """The device to run on, tried with a kernel (a torch built without kernels for this GPU fails
    here, not mid-run), refused in one line when it cannot run one."""
    name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        ones = torch.ones(4, 4, device=name)
        (ones @ ones).sum().item()
    except (RuntimeError, AssertionError) as e:  # no such device here, a torch built without it, a full GPU
        raise KygError(f"--device {name} is not available here ({str(e).strip().splitlines()[0][:160]}); "
                       f"pass --device cpu, or leave --device out")
    return torch.device(name)


def to_device_fn(tokenizer, device):
    """[Example] -> {input_ids, attention_mask, labels} [B, T] on `device`, or only the tensors `keys`."""
    return lambda examples, keys=("input_ids", "attention_mask", "labels"): {
        k: v.to(device, non_blocking=True) for k, v in collate(examples, tokenizer.pad_token_id).items() if k in keys}


def progress(**kwargs):
    """A progress bar with an ETA: the notebook kind in a notebook; in a log file, a line a minute."""
    # In a log, each update a line of its own, not carriage-return redraws.
    lines = SimpleNamespace(write=lambda text: text.strip() and sys.stderr.write(text.strip("\r").rstrip() + "\n"),
                            flush=sys.stderr.flush)
    in_log = not sys.stderr.isatty() and "ipykernel" not in sys.modules
    return tqdm(**kwargs, **({"file": lines, "mininterval": 60} if in_log else {}))


def new_or_ours(path, ours=lambda directory: False):
    """A KygError unless `path` is absent, an empty directory, or a directory that `ours` says is kyg's:
    kyg never writes over what a user keeps there (a model, a project)."""
    if os.path.exists(path) and not (os.path.isdir(path) and (not os.listdir(path) or ours(path))):
        what = "a directory that holds files kyg did not write" if os.path.isdir(path) else "a file"
        raise KygError(f"{path} is {what}, which kyg does not write over; pass a new or empty directory")


# ----------------------------------------------------------------------------- prime

SAVE_MINUTES = 10  # the resumable state of a priming is saved this often by default


PrimingRun = namedtuple("PrimingRun", "model tokenizer sampler optimizer scheduler settings")


def prime(args):
    """Write a primed model directory, θp and θa after Algorithm 1 (or setting 5) on --source; resume
    a stopped one from its last saved state; wait while another process primes the same --out."""
    new_or_ours(args.out, M.holds_priming)
    if args.second_order and args.method != "meta":
        raise KygError(f"--second-order is for --method meta (the PE inner loop); drop it for {args.method}")
    if args.head_lr and args.method != "ft":
        raise KygError("--head-lr is for --method ft (meta and maml train heads in the inner loop, at α)")
    device = device_of(args)
    # What makes this priming what it is, the defaults resolved. The device is one of them: a priming
    # resumes only where its optimizer and RNG states belong.
    settings = report.priming_settings({**vars(args), "inner_lr": args.inner_lr or INNER_LR.get(args.method),
                                        "adapter_init": M.ADAPTER_INIT, "device": device.type,
                                        "precision": "bf16" if args.bf16 else "fp32"})
    for wait in (False, True):
        with report.lock(os.path.normpath(args.out) + ".lock", wait) as mine:
            if mine:
                return prime_alone(args, settings, device)
        print(f"kyg: another kyg is priming {args.out}; waiting for it", file=sys.stderr)


def prime_alone(args, settings, device):
    state_path = os.path.join(args.out, M.PRIMING_STATE)
    if os.path.isfile(os.path.join(args.out, M.PRIMING_RECORD)):  # a finished priming serves any device
        report.same_settings(M.read_priming(args.out), {k: v for k, v in settings.items() if k != "device"}, args.out)
        print(f"kyg: {args.out} is primed already with these settings, skipped (delete it to prime again)")
        return
    saved = M.load_tensors(state_path) if os.path.isfile(state_path) else None
    if saved:
        report.same_settings(saved[1]["settings"], settings, f"the stopped priming in {args.out}")
    run = start_priming(args, settings, device)
    history = {"loss": [], "support_loss": [], "seconds": 0.0}
    if saved:
        history = M.restore_priming_state(*saved, run.model, run.optimizer, run.scheduler, run.sampler)["history"]
        print(f"kyg: resuming the priming in {args.out} from step {len(history['loss'])} of {run.settings['steps']}")
    finish_priming(args, run, priming_loop(args, run, history, device))


def start_priming(args, settings, device):
    """The model, tokenizer, task sampler (Alg. 1, line 7) and optimizer of a priming from its start;
    its settings with the number of steps resolved."""
    torch.manual_seed(args.seed)  # every device's generator: θa's and θh's init, dropout
    encoder, tokenizer = M.load_encoder(args.model)
    model = M.Tagger(encoder, args.source, args.pe, args.bottleneck, args.bf16)
    sources = {lang: encode(load_split(lang, "train", args.data_dir, args.max_train), tokenizer, args.max_length)
               for lang in args.source}
    sampler = TaskSampler(sources, args.support_size, args.query_size, args.seed)
    steps = args.steps or sampler.steps_per_pass()
    why = "--steps" if args.steps else f"one pass over {min(map(len, sources.values()))} sentences, the smallest " \
        f"source language's training sentences, {args.support_size} + {args.query_size} a task"
    print(f"kyg: priming takes {steps} {'updates' if args.method == 'ft' else 'meta-steps'} ({why})")
    optimizer, scheduler = priming_optimizer(model.to(device), args.meta_lr, steps,
                                             (args.head_lr or args.meta_lr) if args.method == "ft" else None)
    return PrimingRun(model, tokenizer, sampler, optimizer, scheduler, {**settings, "steps": steps})


def priming_loop(args, run, history, device):
    """The steps from where `history` ends to the last; saves the state a stopped run resumes from
    every --save-every steps (or SAVE_MINUTES), and on Ctrl-C, then stops. Returns the history."""
    settings, steps = run.settings, run.settings["steps"]
    inner = None if args.method == "ft" else \
        InnerLoop(args.method, args.inner_steps, settings["inner_lr"], args.second_order)
    to_device = to_device_fn(run.tokenizer, device)
    task_batches = ([(lang, to_device(support), to_device(query)) for lang, support, query in run.sampler.sample()]
                    for _ in range(len(history["loss"]), steps))  # Alg. 1, line 7, one batch per step left
    started, last_save, stop = time.time() - history["seconds"], time.time(), []

    def on_ctrl_c(*_):
        stop.append(True)
        signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C quits at once
        print("\nkyg: Ctrl-C: saving after this step (press again to quit without saving)", file=sys.stderr)

    previous_handler = signal.signal(signal.SIGINT, on_ctrl_c)
    try:
        with progress(total=steps, initial=len(history["loss"]), desc=f"prime {args.method}", unit="step") as bar:
            for loss, support_losses in priming_steps(run.model, task_batches, run.optimizer, run.scheduler, inner):
                if not math.isfinite(loss):  # before anything is saved: no state, no primed model from a broken θ
                    raise KygError(divergence(args, settings, len(history["loss"]) + 1, loss, support_losses))
                history["loss"].append(loss)
                history["support_loss"] += [support_losses] if support_losses else []
                history["seconds"] = round(time.time() - started, 1)
                bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
                bar.update()
                step = len(history["loss"])
                due = step % args.save_every == 0 if args.save_every else time.time() - last_save >= 60 * SAVE_MINUTES
                if step < steps and (due or stop):  # the state a stopped run resumes from
                    M.save_priming_state(os.path.join(args.out, M.PRIMING_STATE), run.model, run.optimizer,
                                         run.scheduler, run.sampler, {"settings": settings, "history": history})
                    last_save = time.time()
                    if stop:
                        sys.exit(f"kyg: stopped after step {step} of {steps}, state saved in {args.out}; "
                                 f"rerun the same command to resume")
    finally:
        signal.signal(signal.SIGINT, previous_handler)
    return history


def divergence(args, settings, step, loss, support_losses):
    """What to say when a priming's loss is no longer finite: the rate to lower is α where the inner loop
    broke a θ that was whole (its first support loss, at θ, is finite), else that of the updates of θ."""
    rate = f"--inner-lr (α, {settings['inner_lr']:g})" if support_losses and math.isfinite(support_losses[0]) else \
        f"--meta-lr (β, {args.meta_lr:g})" + (f" or --head-lr ({args.head_lr:g})" if args.head_lr else "")
    return (f"the priming diverged at step {step} of {settings['steps']} (its loss is {loss}), and nothing was "
            f"written as primed; lower {rate} and prime into a new --out")


def finish_priming(args, run, history):
    """Alg. 1, line 17: return θp, θa, as a primed model directory with the record of the priming."""
    losses, curves = history["loss"], history["support_loss"] or None
    priming = {**run.settings, "seconds": history["seconds"], "loss_by_step": [round(x, 4) for x in losses],
               "support_loss_by_step": curves and [[round(x, 3) for x in c] for c in curves]}
    M.save_primed(run.model, run.tokenizer, priming, args.out)
    print(f"kyg: primed ({priming_label(priming)}, {len(losses)} steps, {priming['seconds']} s, "
          f"{'training' if args.method == 'ft' else 'query'} loss {losses[0]:.3f} -> {losses[-1]:.3f}) -> {args.out}")


# ----------------------------------------------------------------------------- finetune

TRAINED = {"full": ("pretrained", "pe", "head"), "head": ("head",)}  # the PE methods: ("pe", "head")
STORED_FEATURES = ("head", "adapter")  # the methods that leave f(x; θp) alone (Tagger.trunk_is_fixed_by_pretrained)
Split = namedtuple("Split", "examples features")  # features: f's output on each sentence, [T_i, H], or None
Language = namedtuple("Language", "encoder to_device train dev test")  # what a language's runs share


def pe_method_of(method, priming):
    """The PE method of the tuned model's θa: the method's own; for full FT the priming's, or none."""
    return method if method in M.PE_METHODS else priming["pe"] if priming and method == "full" else None


def run_config(args, priming, device, lang, lr, seed):
    """The settings that make a run what it is, of those its method uses; with its priming's settings (not
    --init's path), its key to skip and claim it (report.recorded). The device and the precision are among
    them: runs on a CPU and on a GPU are different runs."""
    config = {key: getattr(args, key) for key in ("model", "data_dir", "method", "max_train", "max_eval", "max_dev",
                                                   "max_length", "epochs", "batch_size")}
    return {**config, "lang": lang, "lr": lr, "seed": seed, "schedule": FINETUNE_SCHEDULE[args.method],
            "device": device.type, "precision": "bf16" if args.bf16 else "fp32",
            **({"cached_trunk": not args.live_trunk} if args.method in STORED_FEATURES else {}),
            **({"bottleneck": args.bottleneck, "adapter_init": M.ADAPTER_INIT}
               if pe_method_of(args.method, priming) == "adapter" else {})}


def finetune(args):
    """Every run of --lang × --lr × --seed not in OUT/results.jsonl, each claimed before it starts: first
    those no other process holds, then, waiting for their claims, those it held (a dead one's are redone)."""
    if args.live_trunk and args.method not in STORED_FEATURES:
        raise KygError(f"--live-trunk is for head and adapter tuning: {args.method} always runs the encoder")
    priming = M.read_priming(args.init) if args.init else None
    if priming and os.path.normpath(priming["model"]) != os.path.normpath(args.model):
        raise KygError(f"{args.init} was primed from {priming['model']!r}, not from --model {args.model!r}; "
                       f"pass --model {priming['model']}")
    device = device_of(args)
    os.makedirs(args.out, exist_ok=True)
    configs = [run_config(args, priming, device, lang, lr, seed) for lang in args.lang
               for lr in args.lr or [FINETUNE_LR[args.method]] for seed in args.seed]
    # A language's encoder, data and stored features are made for its first run, then kept while its runs last.
    prepared = functools.lru_cache(maxsize=1)(lambda lang: prepare_language(args, lang, device))
    for wait in (False, True):
        held = []
        for config in configs:
            name = report.run_name(config, priming)
            with report.lock(os.path.join(args.out, "claims", f"{name}.lock"), wait) as mine:  # the run's claim
                if not mine:
                    held.append(config)
                elif report.recorded(args.out, config, priming):
                    print(f"kyg: {name}: already in {args.out}/results.jsonl, skipped")
                else:
                    fine_tune(args, priming, config, name, prepared(config["lang"]), device)
        configs = held


def prepare_language(args, lang, device):
    """A Language: f (θp, primed with --init), loaded once, `to_device` for batches of its tokenizer, and the
    train, dev and test Splits; for the methods that leave f alone, with f's eval-mode output on each
    sentence (train's not with --live-trunk): exact but for f's dropout."""
    encoder, tokenizer = M.load_encoder(args.init or args.model)
    to_device = to_device_fn(tokenizer, device)
    split = lambda name, cap: encode(load_split(lang, name, args.data_dir, cap), tokenizer, args.max_length)
    splits = {"train": split("train", args.max_train), "dev": split("dev", args.max_dev or args.max_eval),
              "test": split("test", args.max_eval)}
    if args.method not in STORED_FEATURES:
        return Language(encoder, to_device, *(Split(examples, None) for examples in splits.values()))
    trunk = M.Tagger(encoder, [], pe_method=None, bf16=args.bf16).to(device).eval()  # f alone

    def features(examples):
        stored = [None] * len(examples)
        with torch.no_grad():
            for chunk in batches(examples, 2 * args.batch_size):
                batch = to_device([examples[i] for i in chunk], ("input_ids", "attention_mask"))
                hidden = trunk.encode(batch["input_ids"], batch["attention_mask"])
                for row, i in enumerate(chunk):
                    stored[i] = hidden[row, :len(examples[i].input_ids)].clone()
        return stored
    stored = [Split(examples, None if name == "train" and args.live_trunk else features(examples))
              for name, examples in splits.items()]
    encoder.to("cpu")  # each run tunes a copy of f, made from here
    return Language(encoder, to_device, *stored)


def tagger(args, priming, encoder, lang):
    """A run's model: θa and θh fresh around a copy of f as loaded (θp), with the primed θa of --init where
    it fits; what loading afresh gives, as loading draws nothing from the RNG (model.load_encoder)."""
    model = M.Tagger(copy.deepcopy(encoder), [lang], pe_method_of(args.method, priming), args.bottleneck, args.bf16)
    if priming:
        M.load_primed(model, priming, args.init)
    return model


def logits_of(model, lang, split, chunk, to_device):
    """(logits [B, T, C], labels [B, T]) of the sentences `chunk` of a Split, from its stored features if any."""
    examples = [split.examples[i] for i in chunk]
    if split.features is None:
        batch = to_device(examples)
        return model(lang, batch["input_ids"], batch["attention_mask"]), batch["labels"]
    hidden = torch.nn.utils.rnn.pad_sequence([split.features[i] for i in chunk], batch_first=True)
    return model(lang, hidden=hidden), to_device(examples, ("labels",))["labels"]


def score(model, lang, split, to_device, batch_size):
    """Entity-level F1 of the model's tags for a Split, in eval mode."""
    model.eval()
    gold, predicted = [], []
    with torch.no_grad():
        for chunk in batches(split.examples, 2 * batch_size):
            best = logits_of(model, lang, split, chunk, to_device)[0].argmax(-1).cpu()  # [B, T]: one copy a batch
            gold += [[LABELS[t] for t in split.examples[i].tags] for i in chunk]
            predicted += [word_tags(split.examples[i], best[row]) for row, i in enumerate(chunk)]
    return f1(gold, predicted)


def fine_tune(args, priming, config, name, language, device):
    """One run: tune (`train`), score the epoch with the best dev F1 on test, append the record. A run
    whose training loss stopped being finite is recorded as diverged, without an F1 or weights."""
    lang, lr, seed = config["lang"], config["lr"], config["seed"]
    torch.manual_seed(seed)  # every device's generator: θa's and θh's init, dropout
    model = tagger(args, priming, language.encoder, lang)
    for part in [model] if language.train.features is None else [model.adapter, model.heads]:  # f runs, or not
        part.to(device)
    trainable = M.named_params(model.requires_grad_(False), *TRAINED.get(args.method, ("pe", "head")))
    for p in trainable.values():  # what the method tunes, left the only parameters that require gradients
        p.requires_grad_()
    trained, total = sum(p.numel() for p in trainable.values()), sum(p.numel() for p in model.parameters())
    print(f"kyg: {args.method} fine-tuning updates {trained:,} of {total:,} parameters ({100 * trained / total:.3g}%)")
    started = time.time()
    dev_by_epoch, (dev_f1, best_epoch, state), diverged_in = train(args, model, trainable, config, language, name)
    scores, weights = {"dev_f1": None, "test_f1": None, "best_epoch": None}, None  # a diverged run's
    if not diverged_in:
        model.load_state_dict(state, strict=False)
        test_f1 = score(model, lang, language.test, language.to_device, args.batch_size)
        scores = {"dev_f1": round(dev_f1, 2), "test_f1": round(test_f1, 2), "best_epoch": best_epoch}
        if not args.no_save:
            weights = os.path.join("weights", f"{name}.safetensors")
            M.save_tensors(state, os.path.join(args.out, weights), {"method": args.method, "lang": lang,
                                                                    "init": args.init})
    saved_bytes = sum(p.numel() * p.element_size() for p in trainable.values())
    report.append_result(args.out, {
        "priming": priming_label(priming), "method": args.method, "lang": lang, "lr": lr, "seed": seed,
        **scores, "diverged_in_epoch": diverged_in, "dev_f1_by_epoch": [round(x, 2) for x in dev_by_epoch],
        "trainable_params": trained, "total_params": total, "trainable_fraction": trained / total,
        "saved_bytes": saved_bytes, "weights": weights, "seconds": round(time.time() - started, 1),
        "device": str(device), "train_sentences": len(language.train.examples), "config": config,
        "priming_config": priming})
    outcome = f"diverged in epoch {diverged_in} (its training loss is not finite), so `table` never chooses " \
        f"--lr {lr:g}; a smaller --lr may train" if diverged_in else f"dev F1 {dev_f1:.2f} (epoch {best_epoch}), " \
        f"test F1 {test_f1:.2f}, {saved_bytes / 2**20:.2f} MiB of weights to store"
    print(f"kyg: {name}: {outcome} -> {args.out}/results.jsonl")


def train(args, model, trainable, config, language, name):
    """--epochs of AdamW on the `trainable` parameters, dev F1 after each. Returns (dev F1 by epoch, (the
    best dev F1, its epoch, its trained state), the epoch in which the loss stopped being finite, or None)."""
    lang, device = config["lang"], next(iter(trainable.values())).device
    per_epoch = math.ceil(len(language.train.examples) / args.batch_size)
    steps = args.epochs * per_epoch
    optimizer = torch.optim.AdamW(list(trainable.values()), lr=config["lr"], fused=device.type == "cuda")
    linear = config["schedule"] == "linear"  # a linear decay to 0 over the steps, else a constant rate
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps if linear else 1.0)
    rng = random.Random(config["seed"])
    dev_by_epoch, best = [], (-1.0, 0, None)  # (dev F1, epoch, trained state)
    with progress(total=steps, desc=name, unit="step") as bar:
        for epoch in range(1, args.epochs + 1):
            model.train()
            epoch_loss = torch.zeros((), device=device)  # read once an epoch: a read waits for the device
            for chunk in batches(language.train.examples, args.batch_size, rng):
                loss = M.token_loss(*logits_of(model, lang, language.train, chunk, language.to_device))
                epoch_loss += loss.detach()
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                scheduler.step()
                bar.update()
            mean_loss = epoch_loss.item() / per_epoch
            if not math.isfinite(mean_loss):  # a step's loss was not finite
                return dev_by_epoch, best, epoch
            dev_by_epoch.append(score(model, lang, language.dev, language.to_device, args.batch_size))
            bar.set_postfix(loss=f"{mean_loss:.3f}", dev=f"{dev_by_epoch[-1]:.1f}")
            if dev_by_epoch[-1] > best[0]:
                state = {n: p.detach().to("cpu", copy=True) for n, p in model.named_parameters() if p.requires_grad}
                best = (dev_by_epoch[-1], epoch, state)
    return dev_by_epoch, best, None


def tiny(args):
    """The offline stand-ins for mBERT and WikiAnn that the tests and `run.sh smoke` use."""
    new_or_ours(args.dir, lambda directory: sorted(os.listdir(directory)) == ["data", "model"])  # a tiny DIR
    write_tiny_model(os.path.join(args.dir, "model"))
    write_tiny_data(os.path.join(args.dir, "data"), SOURCE_LANGS + report.TARGET_LANGS)
    print(f"kyg: wrote {args.dir}/model (tiny BERT) and {args.dir}/data (tiny WikiAnn-style data)")


if __name__ == "__main__":
    main()
