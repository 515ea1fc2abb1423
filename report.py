"""What runs leave behind, and what is drawn from it: OUT/results.jsonl, its table and figures.

    python kyg.py table results/paper-scale     # -> table.md and the figures beside results.jsonl

Every table and claim is computed from `results.jsonl`, one JSON line per fine-tuning run, so it
must hold each run once: kyg.py claims a run before it starts it and appends its line, each under
a `lock` that dies with its process. Then the paper's Table 1, the map of its rows (ours too)
that run.sh also reads, the orderings the paper claims, and `table`. Imports no torch.
"""
import hashlib
import json
import os
import re
import statistics
from collections import namedtuple
from contextlib import contextmanager, nullcontext
from pathlib import Path

from filelock import FileLock, Timeout
from safetensors import SafetensorError

RESULTS_FORMAT = 3  # of each line of results.jsonl; 3: a run's config holds its device and precision
REQUIRED = ("format", "priming", "method", "lang", "seed", "test_f1")  # what every line holds


class KygError(Exception):
    """Bad input the user can fix. kyg.py prints it as one line; the message names the fix."""


UMASK = os.umask(0o022)
os.umask(UMASK)  # the user's, which every file kyg writes honours (safetensors alone would write 0600)


@contextmanager
def writing(path):
    """Around a write of `path`: a failure to write (a full disk, no permission) is one KygError naming it."""
    try:
        yield
    except (OSError, SafetensorError) as e:
        raise KygError(f"cannot write {path} ({getattr(e, 'strerror', None) or e}); free space on its disk or "
                       f"check its permissions, or pass another --out") from None


def write_atomic(path, write):
    """write(temporary path), then rename it to `path`: a crash or a failed write never leaves half a
    file under its name, nor the temporary one beside it."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        with writing(path):
            write(tmp)
            os.chmod(tmp, 0o666 & ~UMASK)
            os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


@contextmanager
def lock(path, wait=True):
    """Hold the lock file `path` (True), or without `wait` yield False if another process holds it."""
    try:
        with FileLock(path, timeout=-1 if wait else 0):  # filelock makes the lock's directory
            yield True
    except Timeout:
        yield False


def append_result(directory, record):
    """Append one JSON line to DIR/results.jsonl, under the file's lock; a failed append is cut off, so that
    the file never holds half a line."""
    path = os.path.join(directory, "results.jsonl")
    with lock(f"{path}.lock"), writing(path):
        size = os.path.getsize(path) if os.path.exists(path) else 0
        try:
            with open(path, "a", encoding="utf-8") as f:
                f.write(json.dumps({"format": RESULTS_FORMAT, **record}) + "\n")
        except OSError:
            os.truncate(path, size)
            raise


def read_results(directory):
    """The records of DIR/results.jsonl; a line that is not one is a KygError naming it."""
    path = os.path.join(directory, "results.jsonl")
    lines, records = [], []
    if os.path.isfile(path):  # not halfway through another's append_result: none can write a read-only folder
        with lock(f"{path}.lock") if os.access(directory, os.W_OK) else nullcontext():
            lines = Path(path).read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except ValueError as e:
            raise KygError(f"{path}, line {number}, is not a JSON record ({e}); delete or mend that line")
        missing = set(REQUIRED) - set(record if isinstance(record, dict) else ())
        if missing or record["format"] != RESULTS_FORMAT:
            why = f"lacks {', '.join(sorted(missing))}" if missing else f"says format {record['format']}"
            raise KygError(f"{path}, line {number}, is not a kyg result of format {RESULTS_FORMAT} (it {why}); "
                           f"read it with the kyg that wrote it, or pass another results directory")
        records.append(record)
    return records


# ----------------------------------------------------------------------------- the paper's claims

TARGET_LANGS = ["hi", "af", "az", "lt", "et", "nl"]  # §4.1, Table 1
# Every row, keyed by the ids run.sh's KYG_ROWS uses: (priming label, fine-tuning method, name in
# the table). 5b is the control for 4 > 5 (FT priming whose heads learn at the head-tuning rate),
# -2nd the exact meta-gradient; fig3-* are Figure 3's full fine-tuning after priming.
ROWS = {"1": ("none", "full", "1/Full FT"), "2": ("none", "head", "2/HT"), "3": ("none", "adapter", "3/AT"),
        "4": ("meta", "adapter", "4/Meta Priming → AT"),
        "4-2nd": ("meta-2nd", "adapter", "4/Meta Priming → AT [second order]"),
        "5": ("ft", "adapter", "5/FT Priming → AT"),
        "5b": ("ft-head0.001", "adapter", "5b/FT Priming, heads at 0.001 → AT"),
        "6": ("maml", "adapter", "6/MP [MAML Loop] → AT"), "7": ("meta-S1", "adapter", "7/MP [1 Inner Step] → AT"),
        "7-2nd": ("meta-S1-2nd", "adapter", "7/MP [1 Inner Step] → AT [second order]"),
        "fig3-meta": ("meta", "full", None), "fig3-maml": ("maml", "full", None)}
PAPER_TABLE1 = {  # entity-level F1, mBERT, priming on en + es
    "1": [86.73, 91.29, 87.70, 89.43, 90.88, 91.47], "2": [72.71, 79.11, 74.24, 78.34, 81.23, 78.90],
    "3": [77.76, 84.10, 81.08, 83.00, 85.13, 83.89], "4": [81.25, 88.23, 83.29, 86.30, 87.18, 88.97],
    "5": [79.55, 87.78, 82.28, 85.79, 86.56, 88.82], "6": [80.18, 85.82, 81.47, 85.73, 85.86, 88.13],
    "7": [80.23, 86.46, 80.35, 84.43, 86.14, 88.49]}
# The claims, checked per language: claim -> (better row, worse row). Table 1's, then Figure 3's
# (before full fine-tuning, a MAML inner loop beats the PE one, in all but lt and et in §5.1, and
# either priming beats none), then kyg's: 4 > 5b and 4 > 7 with the exact meta-gradient.
ORDERINGS = {**{f"{a} > {b}": (a, b) for a, b in [("4", "5"), ("4", "6"), ("4", "7"), ("4", "3"), ("3", "2")] +
                [("1", row) for row in "234567"]},
             "maml→full > meta→full": ("fig3-maml", "fig3-meta"), "meta→full > none→full": ("fig3-meta", "1"),
             "maml→full > none→full": ("fig3-maml", "1"), "4 > 5b": ("4", "5b"),
             "4 > 7 [second order]": ("4-2nd", "7-2nd")}
ORDERINGS = {claim: (ROWS[a][:2], ROWS[b][:2]) for claim, (a, b) in ORDERINGS.items()}
# Priming × fine-tuning matrices, averaged over the languages: file -> (title, primings, methods). The
# second, Figure 4 beyond the adapter, only where LoRA or BitFit ran; its row "ft{pe}" is FT priming
# of the column's θa (ft, ft-lora, ft-bitfit), the baseline each diagonal cell must beat.
OWN_INNER_LOOP = {"adapter": "meta", "lora": "meta-lora", "bitfit": "meta-bitfit"}  # the diagonal
MATRICES = {"figure4": ("Figure 4: average test F1 over the languages, priming × fine-tuning "
                        "(the paper's is 2 × 2; the no-priming row is kyg's)",
                        ("meta", "maml", "none"), ("adapter", "full")),
            "figure4-pe": ("Figure 4 beyond the adapter, kyg's extension: priming with each PE method's inner loop "
                           "× tuning with each, average test F1 over the languages; the diagonal is priming that "
                           "knows where it is going",
                           (*OWN_INNER_LOOP.values(), "ft{pe}", "none"), tuple(OWN_INNER_LOOP))}
PRIMING_NAMES = {"meta": "adapter inner loop (Alg. 1)", "maml": "MAML inner loop", "none": "no priming",
                 "meta-lora": "LoRA inner loop", "meta-bitfit": "BitFit inner loop", "ft{pe}": "FT priming, same θa"}
in_column = lambda priming, method: priming.format(pe="" if method == "adapter" else f"-{method}")
# Beyond the adapter, kyg's extrapolation of Figure 4 (§6 only expects priming to apply to other PE
# methods): in each column, the method's own inner loop beats another's, FT priming of the same θa,
# and none (the adapter's last two are 4 > 5 and 4 > 3).
ORDERINGS.update({f"{own}→{m} > {other}→{m}": ((own, m), (other, m)) for m, own in OWN_INNER_LOOP.items()
                  for other in [in_column(row, m) for row in MATRICES["figure4-pe"][1]]
                  if other != own and (m != "adapter" or other.startswith("meta-"))})


# A priming's label, as the table names it, is its method (meta, ft, maml; "none": no priming) and a
# part for each setting away from its default; run.sh primes a label with the flags that this table
# gives it. (setting, default, label part, that part as a pattern, the `kyg.py prime` flag)
PRIMING_LABEL = (("pe", "adapter", "-{}", r"-(lora|bitfit)", "--pe"),                  # LoRA's or BitFit's θa
                 ("inner_steps", 5, "-S{}", r"-S(\d+)", "--inner-steps"),              # row 7: S = 1
                 ("head_lr", None, "-head{:g}", r"-head([\d.e+-]+?)", "--head-lr"),    # row 5b
                 ("second_order", False, "-2nd", r"(-2nd)", "--second-order"))         # the exact meta-gradient


def priming_label(priming):
    """The label of a priming's record (None: no priming), from the record alone, so that a change of
    kyg's defaults never relabels a priming."""
    return "none" if priming is None else priming["method"] + "".join(
        part.format(priming[key]) for key, default, part, _, _ in PRIMING_LABEL if priming.get(key, default) != default)


def priming_flags(label):
    """The `kyg.py prime` flags of the priming a label names: 'meta-S1-2nd' -> --method meta --inner-steps 1
    --second-order."""
    match = re.fullmatch("(meta|ft|maml)" + "".join(f"(?:{pattern})?" for *_, pattern, _ in PRIMING_LABEL), label)
    if not match:
        raise KygError(f"{label!r} is not a priming label: meta, ft or maml, then any of -lora or -bitfit, "
                       f"-S<inner steps>, -head<rate>, -2nd, in that order")
    flags = ["--method", match[1]]
    for (_, default, _, _, flag), value in zip(PRIMING_LABEL, match.groups()[1:]):
        flags += [] if value is None else [flag] if default is False else [flag, value]
    return flags


def priming_settings(values):
    """The settings that make a priming what it is, of those its method uses, from `values`: a priming's
    flags (kyg.py prime) or a priming's record. A rerun must match them, and so must the priming of a
    run that is to count as recorded; of a record, only the settings it holds (an older kyg's lack some)."""
    method, pe = values.get("method"), values.get("pe", "adapter")  # records from before LoRA and BitFit lack pe
    keys = ["model", "data_dir", "source", "steps", "meta_lr", "support_size", "query_size", "max_train",
            "max_length", "seed", "device", "precision"]
    keys += ["head_lr"] if method == "ft" else ["inner_steps", "inner_lr"]
    keys += ["second_order"] if method == "meta" else []
    keys += ["bottleneck", "adapter_init"] if pe == "adapter" else []
    return {"method": method, "pe": pe, **{key: values[key] for key in keys if key in values}}


def same_settings(saved, settings, what):
    """A KygError naming the first setting in which `settings` differ from the `saved` ones (steps None:
    one pass, resolved later, so any number)."""
    if key := first_difference(saved, {k: v for k, v in settings.items() if v is not None or k != "steps"}):
        name = {"adapter_init": "kyg's adapter init", "precision": "precision"}.get(key, f"--{key.replace('_', '-')}")
        raise KygError(f"{what} was made with {name} {saved[key]}, not {settings[key]}; "
                       f"rerun with the same settings, or pass another --out to start afresh")


def first_difference(a, b):
    """The first setting, in sorted order, that both dicts hold with different values, or None."""
    return next((key for key in sorted(a.keys() & b.keys()) if a[key] != b[key]), None)


# ----------------------------------------------------------------------------- a run's identity

def run_name(config, priming):
    """A file name for the run: readable, and unique to what it computes (its config and its priming's
    settings), so that two runs never share one."""
    identity = [config, priming and priming_settings(priming)]
    digest = hashlib.sha1(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:10]
    return f"{priming_label(priming)}-{config['method']}-{config['lang']}-lr{config['lr']:g}-s{config['seed']}-{digest}"


def recorded(directory, config, priming):
    """Whether DIR/results.jsonl holds the run: one of this config after a priming of the same settings.
    The primed directory's path is not compared: a run is what it computes, however --init was spelled."""
    settings = priming and priming_settings(priming)
    return any(all(r.get("config", {}).get(k) == v for k, v in config.items())
               and (r.get("priming_config") and priming_settings(r["priming_config"])) == settings
               for r in read_results(directory))


def diverged(record):
    """Whether the run's training loss stopped being finite (kyg.py fine_tune): it has no F1 to report."""
    return record.get("diverged_in_epoch") is not None


# ----------------------------------------------------------------------------- the table

def one_recipe(directory, cell, records):
    """A KygError naming the first setting in which the runs of one cell differ, but the seed, the rate
    (chosen on dev), the primed directory (a priming seed's) and the device (the cell says so). A setting
    only one of two records holds is not compared: an older kyg did not have it."""
    def recipe(r):
        priming = r.get("priming_config")
        return {**{k: v for k, v in (r.get("config") or {}).items() if k not in ("seed", "lr", "init", "device")},
                **{f"priming's {k}": v for k, v in (priming_settings(priming) if priming else {}).items()
                   if k not in ("seed", "device")}}
    first = recipe(records[0])
    for other in map(recipe, records[1:]):
        if key := first_difference(first, other):
            raise KygError(f"{directory}/results.jsonl pools runs of {cell} that differ in {key} ({first[key]}, "
                           f"{other[key]}); tune each recipe into its own --out")


def markdown(header, rows):
    """A Markdown table: the header's cells, then one line of cells per row."""
    line = lambda cells: "| " + " | ".join(str(c) for c in cells) + " |"
    return [line(header), "|---|" + "---|" * (len(header) - 1)] + [line(row) for row in rows]


Cell = namedtuple("Cell", "mean std n devices")  # a table cell: test F1 over the runs of one rate


def cell_of(records):
    """A cell's numbers, from its runs at the rate chosen on dev: the mean test F1, its std over the runs
    (0 for one run), how many runs, and the devices they ran on where more than one ('' else)."""
    scores = [r["test_f1"] for r in records]
    devices = sorted({(r.get("config") or {}).get("device", "cpu") for r in records})
    return Cell(statistics.mean(scores), statistics.stdev(scores) if len(scores) > 1 else 0.0, len(scores),
                "+".join(devices) if len(devices) > 1 else "")


def shown(cell):
    """A Cell as the table prints it: mean ± std (n), or mean (n) of a single run; – where none ran."""
    if not cell:
        return "–"
    n = f"({cell.n}: {cell.devices})" if cell.devices else f"({cell.n})"
    return f"{cell.mean:.2f} {n}" if cell.n == 1 else f"{cell.mean:.2f} ± {cell.std:.2f} {n}"


# What the table is drawn from. runs: (priming, method, lang) -> {lr: [record]}; best_lr: the rate chosen on
# dev for each (none where every rate had a run diverge); chosen: its records; cells: their Cells; langs.
Tuned = namedtuple("Tuned", "runs best_lr chosen cells langs")


def tuned(directory, results):
    """The Tuned of `results`: each rate's runs, the rate with the best mean dev F1 of those where no run
    diverged, and its Cell."""
    runs = {}
    for r in results:
        runs.setdefault((r["priming"], r["method"], r["lang"]), {}).setdefault(r.get("lr"), []).append(r)
    for (priming, method, lang), by_lr in runs.items():
        one_recipe(directory, f"{priming} → {method} on {lang}", [r for records in by_lr.values() for r in records])
    fit = {key: [lr for lr, records in by_lr.items() if not any(map(diverged, records))] for key, by_lr in runs.items()}
    best_lr = {key: max(fit[key], key=lambda lr: statistics.mean(r.get("dev_f1", 0) for r in by_lr[lr]))
               for key, by_lr in runs.items() if fit[key]}
    chosen = {key: runs[key][lr] for key, lr in best_lr.items()}
    langs = [l for l in TARGET_LANGS if any(k[2] == l for k in runs)] + sorted({k[2] for k in runs} - set(TARGET_LANGS))
    return Tuned(runs, best_lr, chosen, {key: cell_of(records) for key, records in chosen.items()}, langs)


def table(directory):
    """Ours beside the paper's Table 1, Figure 3, the orderings, Figure 4 -> DIR/table.md and figures;
    returns the table's text and a line about the figures."""
    results = read_results(directory)
    if not results:
        raise KygError(f"no results in {directory}/results.jsonl: run `kyg.py finetune --out {directory}` first")
    t = tuned(directory, results)
    # Of the primings whose records carry their curves, each label and seed's first: the row's own, not a
    # priming made again later with the same settings (another kyg's, say, whose curve differs).
    primings = {(r["priming"], p["seed"]): p for r in reversed(results)
                if (p := r.get("priming_config") or {}).get("loss_by_step")}
    matrices = figure4_matrices(t)
    out = table1(directory, results, t) + chosen_rates(t) + priming_seeds(t) + figure3(t)
    text = "\n".join(out + orderings(t) + figure4(matrices)) + "\n"
    write_atomic(os.path.join(directory, "table.md"), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return text, plot(directory, t, matrices, pictures(primings, t.chosen))


def table1(directory, results, t):
    """Table 1: each of the paper's rows (and ours where they ran) per language, and its average."""
    rows = []
    for row, (priming, method, name) in ROWS.items():
        paper = dict(zip(TARGET_LANGS, PAPER_TABLE1.get(row, [])))
        if not name or not paper and not any(key[:2] == (priming, method) for key in t.runs):
            continue
        cells = {lang: t.cells.get((priming, method, lang)) for lang in t.langs}
        counted = [l for l in t.langs if l in paper or not paper]  # the paper's languages; all in a row of ours
        ran = [l for l in counted if cells[l]]
        theirs = f"{statistics.mean(paper[l] for l in ran):.2f}" if paper and ran else "–"
        average = f"{statistics.mean(cells[l].mean for l in ran):.2f} / {theirs}" if ran else "–"
        if ran and len(ran) < len(counted):  # an average over fewer languages than the other rows'
            average += f" ({len(ran)} of {len(counted)} languages)"
        texts = ["diverged" if (priming, method, l) in t.runs and not cells[l] else shown(cells[l]) for l in t.langs]
        rows.append([name, *(f"{text} / {paper.get(l, '–')}" for text, l in zip(texts, t.langs)), average])
    runs = "1 run" if len(results) == 1 else f"{len(results)} runs"
    lost = sum(map(diverged, results))
    lost = f"; {lost} diverged (their loss stopped being finite), and their rates are never chosen" if lost else ""
    return ["# Table 1: ours beside the paper's\n",
            "Test F1 (entity-level, micro), mean ± std over seeds (n); the paper's number after the slash.",
            f"From `{os.path.join(directory, 'results.jsonl')}`, {runs}{lost}.\n",
            *markdown(["row", *t.langs, "average"], rows)]


def chosen_rates(t):
    """The rate chosen on dev in each cell, where some cell tried several or had a run diverge."""
    if not any(len(by_lr) > 1 or key not in t.best_lr for key, by_lr in t.runs.items()):
        return []
    rate = lambda key: "–" if key not in t.runs else f"{t.best_lr[key]:g} ({len(t.runs[key])})" \
        if key in t.best_lr else f"none of {len(t.runs[key])}: all diverged"
    return ["\n## Learning rate chosen on dev\n", "The rate with the best mean dev F1 over its runs, of the "
            "n rates tried: rate (n). The table shows that rate's test F1.\n",
            *markdown(["priming → fine-tuning", *t.langs], [[f"{p} → {m}", *(rate((p, m, l)) for l in t.langs)]
                                                           for p, m in sorted({key[:2] for key in t.runs})])]


def priming_seeds(t):
    """Each priming seed's mean, where a cell pools the runs after several."""
    seed = lambda r: (r.get("priming_config") or {}).get("seed")
    by_seed = {key: {s: [r["test_f1"] for r in records if seed(r) == s] for s in sorted(set(map(seed, records)))}
               for key, records in t.chosen.items()}
    pooled = sorted({key[:2] for key, seeds in by_seed.items() if len(seeds) > 1})
    if not pooled:
        return []
    return ["\n## Priming seeds\n", "Test F1 per priming seed p (mean over fine-tuning seeds). The table's "
            "cells pool them, so their std holds the spread of both.\n",
            *markdown(["priming → fine-tuning", *t.langs], [[f"{p} → {m}", *(", ".join(
                f"p{s}: {statistics.mean(v):.2f}" for s, v in by_seed.get((p, m, l), {}).items()) or "–"
                for l in t.langs)] for p, m in pooled])]


def figure3(t):
    """Figure 3's numbers, where full fine-tuning ran: full FT after each priming, per language."""
    if not any(key[1] == "full" for key in t.cells):
        return []
    return ["\n## Figure 3: full fine-tuning after each priming\n",
            "Test F1, mean ± std over seeds (n). The paper gives these as bars only, without numbers.\n",
            *markdown(["priming → full FT", *t.langs], [[f"{p}: {PRIMING_NAMES[p]}", *(
                shown(t.cells.get((p, "full", l))) for l in t.langs)] for p in MATRICES["figure4"][1]])]


def verdict(better, worse):
    """An ordering in one language, from the Cells of its better and its worse side."""
    if not (better and worse):
        return "–"
    gap, spread = better.mean - worse.mean, max(better.std, worse.std)
    return ("one seed" if min(better.n, worse.n) < 2 else "held" if gap > spread else "tie" if abs(gap) <= spread
            else "not held") + f" ({gap:+.2f})"


def orderings(t):
    """Every claim of ORDERINGS about rows that ran, judged per language against the seeds' spread."""
    claims = [[claim, *(verdict(t.cells.get(better + (l,)), t.cells.get(worse + (l,))) for l in t.langs)]
              for claim, (better, worse) in ORDERINGS.items()]
    claims = [c for c in claims if set(c[1:]) != {"–"}]  # claims about rows not run: out
    if not claims:
        return []
    return ["\n## The paper's orderings, per language\n",
            "Table 1's and Figure 3's (§5.1 itself finds maml→full > meta→full in all but lt and et); then kyg's "
            "own: 4 > 5b, 4 > 7 [second order] and, in the claims naming meta-lora or meta-bitfit, Figure 4's "
            "diagonal extended beyond the adapter, each PE method primed best by its own inner loop (§6 only "
            "expects priming to apply to other PE methods). "
            "held: ours agree and the gap exceeds the larger seed std; tie: the gap is within it; "
            "not held: ours disagree by more than it; one seed: a side has a single run, so no spread to judge by.\n",
            *markdown(["claim", *t.langs], claims)]


def figure4(matrices):
    """Figure 4's matrix, and beyond the adapter where it ran, as tables (figure4_matrices)."""
    out = []
    for name, (primings, methods, matrix) in matrices.items():
        out += [f"\n## {MATRICES[name][0]}\n", *markdown(["priming ↓ fine-tuning →", *methods], [
            [PRIMING_NAMES[p], *(f"{matrix[p, m]:.2f}" if matrix[p, m] is not None else "–" for m in methods)]
            for p in primings])]
    return out


def figure4_matrices(t):
    """{file: (primings, methods, {(priming, method): average test F1 over every language, or None})} of the MATRICES
    that ran (Figure 4 beyond the adapter only where LoRA or BitFit did), without the rows and columns that did not."""
    def average(priming, method):  # over every language, or None where one did not run
        means = [c.mean for l in t.langs if (c := t.cells.get((in_column(priming, method), method, l)))]
        return statistics.mean(means) if len(means) == len(t.langs) else None
    matrices = {}
    for name, (_, primings, methods) in MATRICES.items():
        if name != "figure4" and not any(key[1] in ("lora", "bitfit") for key in t.cells):
            continue
        matrix = {(p, m): average(p, m) for p in primings for m in methods}
        primings = [p for p in primings if any(matrix[p, m] is not None for m in methods)]
        methods = [m for m in methods if any(matrix[p, m] is not None for p in primings)]
        if methods:
            matrices[name] = primings, methods, matrix
    return matrices


def pictures(primings, chosen):
    """{file: (title, x label, y label, {panel: {line: [y]}})} from the primings {(label, seed): record}
    and the runs `chosen` on dev: each priming's loss by step, per batch; its support loss over the S
    inner steps (mean of its first and of its last tenth of steps, a panel each, so that each has its
    own scale); dev F1 by epoch of adapter tuning after each."""
    name = {(p, m): row_name for p, m, row_name in ROWS.values() if row_name}
    loss, inner, tuning = {}, {"first": {}, "last": {}}, {}
    for (label, seed), p in sorted(primings.items()):
        line = f"{name.get((label, 'adapter'), label)}, priming seed {seed}"
        # A step's loss is summed over its batches: a query batch a task (meta, maml); FT's support and query.
        batches = len(p["source"]) * (2 if p["method"] == "ft" else 1)
        loss[line] = [step_loss / batches for step_loss in p["loss_by_step"]]
        curves = p.get("support_loss_by_step") or [[]]
        tenth = max(1, len(curves) // 10)
        for when, part in [("first", curves[:tenth]), ("last", curves[-tenth:])] if len(curves[0]) > 1 else []:
            inner[when][f"{line}: {when} {tenth} steps"] = [statistics.mean(step) for step in zip(*part)]
    for (p, m, _), records in sorted(chosen.items()):
        tuning.setdefault(name.get((p, m), f"{p} → {m}"), []).extend(
            r["dev_f1_by_epoch"] for r in records if m == "adapter" and r.get("dev_f1_by_epoch"))
    tuning = {line: [statistics.mean(epoch) for epoch in zip(*runs)] for line, runs in tuning.items() if runs}
    return {"priming": ("Priming: the loss at every step, as the mean loss of one batch\n(meta: a query batch, after "
                        "the inner loop; ft: a support or a query batch)", "priming step", "loss per batch",
                        {"": loss}),
            "inner-loop": ("The inner loop learning to learn: support loss over Algorithm 1's S steps\n"
                           "(each panel on its own scale)", "inner step", "support loss before the step",
                           {f"{when} tenth of priming": lines for when, lines in inner.items()}),
            "fine-tuning": ("Adapter tuning after each priming", "epoch", "dev F1 (mean over runs)", {"": tuning})}


def plot(directory, t, matrices, lines):
    """Figure 3 (full fine-tuning after each priming, per language), the pictures of priming at work
    (`pictures`) and the matrices as PNG beside table.md, each where its data exist."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "kyg: figures skipped: `pip install matplotlib` to draw figure3.png and figure4.png"
    figures = {"figure3": figure3_points(plt, t)} if any(key[1] == "full" for key in t.cells) else {}
    figures.update({name: curves(plt, *picture) for name, picture in lines.items() if any(picture[3].values())})
    figures.update({name: heatmap(plt, name, *matrix) for name, matrix in matrices.items()})
    for name, fig in figures.items():
        fig.tight_layout()
        fig.savefig(os.path.join(directory, f"{name}.png"), dpi=120)
        plt.close(fig)
    return "kyg: wrote " + ", ".join(f"{directory}/{name}.png" for name in figures)


def figure3_points(plt, t):
    """Figure 3: test F1 after full fine-tuning, per language, after each priming (mean ± std)."""
    fig, ax = plt.subplots(figsize=(max(5, 1.2 + 1.1 * len(t.langs)), 3.2))  # the legend's width at least
    for i, priming in enumerate(MATRICES["figure4"][1]):  # points, not bars from 0: the gaps are 1-2 F1
        cells = [t.cells.get((priming, "full", lang)) for lang in t.langs]
        ax.errorbar([x + 0.2 * (i - 1) for x in range(len(t.langs))], [c.mean if c else float("nan") for c in cells],
                    yerr=[c.std if c else 0 for c in cells], fmt="o", capsize=3, label=PRIMING_NAMES[priming])
    ax.set_xticks(range(len(t.langs)), t.langs)
    ax.set_ylabel("test F1 after full FT\n(mean ± std over seeds)")
    ax.legend(fontsize=8, ncol=3, loc="lower center", bbox_to_anchor=(0.5, 1.0), frameon=False)  # off the points
    return fig


def heatmap(plt, name, primings, methods, matrix):
    """A priming × fine-tuning matrix of figure4_matrices, each cell's average written in it."""
    fig, ax = plt.subplots(figsize=(3.2 + 1.3 * len(methods), 0.8 + 0.8 * len(primings)))
    grid = [[matrix[p, m] if matrix[p, m] is not None else float("nan") for m in methods] for p in primings]
    image = ax.imshow(grid, cmap="Greens")
    for i, row in enumerate(grid):
        for j, value in enumerate(row):  # white on the darker half of the colour map
            ax.text(j, i, f"{value:.2f}" if value == value else "not run", ha="center", va="center",
                    color="white" if value == value and image.norm(value) > 0.5 else "black")
            if OWN_INNER_LOOP.get(methods[j]) == primings[i] and name == "figure4-pe":  # the diagonal
                ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, lw=2.5, ec="black"))
    ax.set_xticks(range(len(methods)), methods)
    ax.set_yticks(range(len(primings)), [PRIMING_NAMES.get(p, f"{p} priming") for p in primings])
    ax.set(xlabel="fine-tuning", title="average test F1" + (" (boxed: own inner loop)" if name == "figure4-pe"
                                                             else " (no priming: kyg's row)"))
    return fig


def curves(plt, title, x, y, panels):
    """A picture of `pictures`: a panel each, a line per curve."""
    fig, axes = plt.subplots(1, len(panels), squeeze=False, figsize=(7 if len(panels) == 1 else 5 * len(panels), 4.3))
    for ax, (panel, lines) in zip(axes[0], panels.items()):
        for label, ys in lines.items():
            ax.plot(range(1, len(ys) + 1), ys, marker="o" if len(ys) < 30 else None, label=label)
        ax.set(title=panel, xlabel=x, ylabel=y)
        ax.xaxis.get_major_locator().set_params(integer=True)  # steps and epochs are whole
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=11)
    return fig
