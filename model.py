"""The tagger of the paper's Figure 2: logits = h(g(f(x; θp); θa); θh).

  f  `encoder`  a Hugging Face encoder (AutoModel) of the BERT, XLM-R or DistilBERT family, θp (mBERT by default)
  g  `adapter`  one bottleneck adapter after the last layer, θa (the identity without one)
  h  `heads`    one linear token-classification head per language, θh, dropout before it

θa is what the parameter-efficient (PE) method, `pe_method`, trains besides θh: the paper's
adapter g, LoRA's rank-8 updates of f's query and value projections, or BitFit's biases of f.
Every parameter's name says its group (group_of): θp "pretrained" (`encoder.*`), θa "pe"
(`adapter.*`, `*.lora_a`/`*.lora_b`, for BitFit `encoder.*.bias`), θh "head" (`heads.<lang>.*`).
meta.py runs the model through `torch.func.functional_call` with some names bound to the inner
loop's copies; kyg.py fine-tunes it. Also here: loading, with clear errors; the files kyg
writes (primed model directories, a priming's resumable state).
"""
import json
import os
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from data import LABELS
from report import UMASK, KygError, write_atomic, writing

ADAPTER_INIT = "identity"  # how a fresh g starts (Adapter); recorded with every priming and run that has one


class Adapter(nn.Module):
    """g(·; θa), Houlsby et al.'s bottleneck: x + up(relu(down(x))).   [B, T, H] -> [B, T, H]
    `up` starts at zero (as LoRA's B), so a fresh adapter is the identity; `down` keeps PyTorch's
    init, so up's gradient, which flows through relu(down(x)), is not tiny from the first step."""

    def __init__(self, hidden_size, bottleneck):
        super().__init__()
        self.down = nn.Linear(hidden_size, bottleneck)
        self.up = nn.Linear(bottleneck, hidden_size)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x):
        return x + self.up(nn.functional.relu(self.down(x)))


class LoRALinear(nn.Linear):
    """A frozen projection W plus Hu et al.'s low-rank update, W x + (α/r)·B A x, r = 8, α = 16; B = 0
    at first. W keeps its name (`weight`), so it stays θp; `lora_a` [r, in], `lora_b` [out, r] are θa."""

    @classmethod
    def convert(cls, linear, rank=8, alpha=16):
        linear.__class__ = cls  # in place: the encoder's module tree and parameter names stay as they are
        linear.lora_a = nn.Parameter(torch.empty(rank, linear.in_features))
        nn.init.kaiming_uniform_(linear.lora_a, a=5 ** 0.5)  # as nn.Linear initialises its weight
        linear.lora_b = nn.Parameter(torch.zeros(linear.out_features, rank))
        linear.lora_scale = alpha / rank

    def forward(self, x):
        # ✂ exercise 2: LoRA's θa: W x + (α/r)·B A x
        return super().forward(x) + self.lora_scale * (x @ self.lora_a.T @ self.lora_b.T)
        # ✂ end


PE_METHODS = ("adapter", "lora", "bitfit")
# The attention's query and value projections, which LoRA updates (Hu et al.), as the encoder families
# kyg is tested with name them: BERT and XLM-R, then DistilBERT.
LORA_PROJECTIONS = ("attention.self.query", "attention.self.value", "attention.q_lin", "attention.v_lin")


class Tagger(nn.Module):
    def __init__(self, encoder, languages, pe_method="adapter", bottleneck=64, bf16=False):
        super().__init__()
        config = encoder.config
        self.encoder, self.pe_method = encoder, pe_method
        self.bf16 = bf16  # kyg.py's --bf16: f's forward in bfloat16 (Tagger.encode)
        self.adapter = Adapter(config.hidden_size, bottleneck) if pe_method == "adapter" else nn.Identity()
        # f's own dropout rate, before the head: hidden_dropout_prob in BERT and XLM-R, dropout in DistilBERT
        rate = getattr(config, "hidden_dropout_prob", getattr(config, "dropout", None))
        if rate is None:
            raise KygError(f"kyg reads f's dropout rate as BERT, XLM-R or DistilBERT name it, which "
                           f"{config.model_type} does not; pass an encoder of those families")
        self.dropout = nn.Dropout(rate)
        if pe_method == "lora":
            projections = [m for n, m in encoder.named_modules() if n.endswith(LORA_PROJECTIONS)]
            if not projections:
                raise KygError("LoRA needs query and value projections named as BERT or XLM-R (attention.self.query, "
                               ".value) or DistilBERT (attention.q_lin, .v_lin) name them; use --pe adapter or bitfit")
            for linear in projections:
                LoRALinear.convert(linear)
        self.heads = nn.ModuleDict({lang: nn.Linear(config.hidden_size, len(LABELS)) for lang in languages})
        for head in self.heads.values():
            nn.init.normal_(head.weight, std=config.initializer_range)
            nn.init.zeros_(head.bias)

    def encode(self, input_ids, attention_mask):
        """f(x; θp): LongTensors [B, T] -> hidden states [B, T, H]; with `bf16`, f runs under bfloat16
        autocast and what it returns is cast back to fp32, so that g, h and every loss stay fp32."""
        with torch.autocast(input_ids.device.type, torch.bfloat16, enabled=self.bf16):
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return hidden.float() if self.bf16 else hidden

    def forward(self, lang, input_ids=None, attention_mask=None, hidden=None):
        """Logits [B, T, len(LABELS)] from `lang`'s head; `hidden`, f's output [B, T, H], skips f."""
        if hidden is None:
            hidden = self.encode(input_ids, attention_mask)
        return self.heads[lang](self.dropout(self.adapter(hidden)))

    @property
    def trunk_is_fixed_by_pretrained(self):
        """Whether f(x; θp) depends on θp alone (the adapter, or none; not LoRA's or BitFit's θa, which
        live inside f): then while θp is frozen f's output on a batch is the same at every step and no
        gradient of θa or θh enters f, so f runs once per batch (meta.adapt: one dropout draw serves the
        S steps) or per sentence (kyg.py's stored features, computed in eval mode, without dropout)."""
        return not any(name.startswith("encoder.") for name in named_params(self, "pe"))


def group_of(name, pe_method="adapter"):
    """Parameter name -> "pretrained" (θp), "pe" (θa) or "head" (θh), for PE method `pe_method`."""
    if name.startswith("heads."):
        return "head"
    if name.startswith("adapter.") or ".lora_" in name or (pe_method == "bitfit" and name.endswith(".bias")):
        return "pe"
    return "pretrained"


def named_params(model, *groups, lang=None):
    """{name: parameter} of the given groups; with `lang`, only that language's head."""
    return {name: p for name, p in model.named_parameters()
            if group_of(name, model.pe_method) in groups and (lang is None or not name.startswith("heads.")
                                                              or name.startswith(f"heads.{lang}."))}


def token_loss(logits, labels):
    """Mean cross-entropy over the labelled sub-words (first of each word).  [B, T, C], [B, T] -> []"""
    return nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


# ----------------------------------------------------------------------------- loading

def load_encoder(model_name):
    """(f, tokenizer) for a hub name or a local directory. Loading draws nothing from torch's global
    RNG (weights the checkpoint lacks, such as an unused pooler, start from a forked one), so that a
    copy of f kept in memory starts a run exactly as f loaded afresh would (kyg.py loads it once)."""
    from transformers import AutoModel, AutoTokenizer, logging as hf_logging
    hf_logging.set_verbosity_error()  # the unused pooler's "newly initialised" warning is noise here
    hf_logging.disable_progress_bar()
    local = os.path.isdir(model_name)
    if not local and model_name.startswith(("/", ".", "~")):
        raise KygError(f"model directory {model_name!r} not found: pass --model an existing directory or a hub name")
    where = f"model directory {model_name!r}" if local else f"hub model {model_name!r}"
    why = lambda e: str(e).strip().splitlines()[0][:160]
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_name)
    except (OSError, ValueError, TypeError, ImportError) as e:  # transformers 4 wants protobuf to guess one
        fix = "save one beside the weights (tokenizer.save_pretrained)" if local else \
            "without the hub, pass --model DIR, a local model directory"
        raise KygError(f"cannot load the tokenizer of {where} ({why(e)}); {fix}")
    # transformers builds an empty tokenizer (special tokens only) when the files are missing.
    if len(tokenizer) <= len(set(tokenizer.all_special_tokens)):
        raise KygError(f"{where} has no tokenizer (no vocabulary found); save one beside the weights "
                       f"(tokenizer.save_pretrained) or pass another --model")
    try:
        with torch.random.fork_rng(devices=[]):
            encoder = AutoModel.from_pretrained(model_name)
    except (OSError, ValueError, SafetensorError) as e:
        raise KygError(f"cannot load the encoder of {where} ({why(e)}); " + (
            "its config.json and weights are missing or damaged: make it again" if local else "pass another --model"))
    encoder.pooler = None  # token classification never reads it: θp is what is trained
    return encoder, tokenizer


# ----------------------------------------------------------------------------- files
# Everything kyg writes is safetensors or JSON (never a pickle), written atomically.

def save_tensors(tensors, path, metadata=None):
    """{name: tensor} (and a JSON-able `metadata`) -> one safetensors file, atomically."""
    tensors = {n: t.detach().to("cpu").contiguous() for n, t in tensors.items()}
    write_atomic(path, lambda tmp: save_file(tensors, tmp, {"kyg": json.dumps(metadata)}))


def load_tensors(path):
    """({name: tensor}, metadata) from a file save_tensors wrote; a damaged file is a KygError."""
    try:
        with safe_open(path, "pt") as f:
            return {n: f.get_tensor(n) for n in f.keys()}, json.loads((f.metadata() or {}).get("kyg", "null"))
    except (SafetensorError, OSError, ValueError) as e:
        raise KygError(f"{path} is damaged or incomplete ({str(e).splitlines()[0][:120]}); delete it and "
                       f"rerun the command that wrote it")


# A primed model is a Hugging Face directory: the encoder as save_pretrained writes it (so
# AutoModel.from_pretrained(DIR) gives the primed θp), its tokenizer, θa in pe.safetensors, and
# priming.json, written last: a directory without it is a priming that has not finished.
PRIMING_RECORD, PRIMING_STATE, THETA_A = "priming.json", "priming-state.safetensors", "pe.safetensors"


def save_primed(model, tokenizer, priming, directory):
    """The directory described above, written whole beside `directory` and then put in its place, so
    that a primed directory is complete or not there; what `directory` held, the spent resumable state
    (holds_priming), goes after. θp without LoRA's factors, which AutoModel does not know."""
    tmp, spent = f"{directory}.tmp{os.getpid()}", f"{directory}.spent{os.getpid()}"
    try:
        with writing(directory):
            model.encoder.save_pretrained(tmp, state_dict={name: value for name, value in
                                                           model.encoder.state_dict().items() if ".lora_" not in name})
            tokenizer.save_pretrained(tmp)
            save_file({n: p.detach().cpu().contiguous() for n, p in named_params(model, "pe").items()},
                      os.path.join(tmp, THETA_A))  # in a temporary directory: no file needs writing atomically
            Path(tmp, PRIMING_RECORD).write_text(json.dumps(priming, indent=1), encoding="utf-8")
            for name in os.listdir(tmp):
                os.chmod(os.path.join(tmp, name), 0o666 & ~UMASK)
            if os.path.lexists(directory):
                os.replace(directory, spent)
            os.replace(tmp, directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(spent, ignore_errors=True)


def holds_priming(directory):
    """Whether `directory` is a priming's: finished, or stopped, holding only its resumable state and
    what a save cut short by a kill leaves beside it (PRIMING_STATE.tmp<pid>)."""
    names = os.listdir(directory)
    return PRIMING_RECORD in names or all(re.fullmatch(re.escape(PRIMING_STATE) + r"(\.tmp\d+)?", n) for n in names)


def read_priming(directory):
    """The record of a finished priming in `directory`, or a KygError saying what `directory` is."""
    make = "make one with `python kyg.py prime --out DIR`"
    if not os.path.exists(directory):
        raise KygError(f"primed model directory {directory!r} not found; {make}")
    if not os.path.isdir(directory):
        raise KygError(f"{directory} is a file, not a primed model directory; {make}")
    if not os.path.isfile(os.path.join(directory, PRIMING_RECORD)):
        if os.path.isfile(os.path.join(directory, PRIMING_STATE)):
            raise KygError(f"{directory} holds a priming that has not finished; rerun the "
                           f"`kyg.py prime` command that started it to finish it")
        raise KygError(f"{directory} is not a primed model directory (no {PRIMING_RECORD}); {make}")
    if not os.path.isfile(os.path.join(directory, THETA_A)):
        raise KygError(f"{directory} lacks {THETA_A}, the primed θa; delete it and rerun the `kyg.py prime` "
                       f"command that made it")
    try:
        return json.loads(Path(directory, PRIMING_RECORD).read_text(encoding="utf-8"))
    except ValueError as e:
        raise KygError(f"{directory}/{PRIMING_RECORD} is damaged ({e}); delete {directory} and prime again")


def load_primed(model, priming, directory):
    """θa from the primed directory `priming` describes into `model` (loaded from it, so θp is primed),
    when primed for the model's PE method; else θa starts fresh (LoRA's factors mean nothing to g)."""
    theta_a = load_tensors(os.path.join(directory, THETA_A))[0]
    with torch.no_grad():
        for name, p in named_params(model, "pe").items() if priming["pe"] == model.pe_method else []:
            if name not in theta_a:
                raise KygError(f"{directory}/{THETA_A} lacks {name}; delete {directory} and prime again")
            if theta_a[name].shape != p.shape:  # of the PE methods' θa, only the adapter's has a size to choose
                raise KygError(f"{directory} was primed with --bottleneck {priming['bottleneck']}; pass that size")
            p.copy_(theta_a[name])


# The resumable state of a priming: every parameter (θp, θa, each source language's θh), AdamW's
# moments, the scheduler's step, the task sampler's RNG and queues, torch's RNG (dropout), and
# the loss history. One file, so it is replaced whole or not at all.

def save_priming_state(path, model, optimizer, scheduler, sampler, record):
    optim = optimizer.state_dict()
    tensors = {**{f"model.{n}": p for n, p in model.named_parameters()}, "rng.torch": torch.get_rng_state(),
               **{f"optimizer.{i}.{k}": v for i, state in optim["state"].items() for k, v in state.items()},
               **({"rng.cuda": torch.cuda.get_rng_state()} if torch.cuda.is_available() else {})}
    save_tensors(tensors, path, {**record, "param_groups": optim["param_groups"], "scheduler": scheduler.state_dict(),
                                 "sampler": sampler.state_dict()})


def restore_priming_state(tensors, record, model, optimizer, scheduler, sampler):
    """Put back what save_priming_state saved (read by load_tensors); returns its record."""
    model.load_state_dict({name: tensors[f"model.{name}"] for name, _ in model.named_parameters()}, strict=False)
    state = {}
    for name, value in tensors.items():
        if name.startswith("optimizer."):
            _, index, key = name.split(".")
            state.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": record.pop("param_groups")})
    scheduler.load_state_dict(record.pop("scheduler"))
    sampler.load_state_dict(record.pop("sampler"))
    torch.set_rng_state(tensors["rng.torch"])
    if "rng.cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["rng.cuda"])
    return record
