"""The tagger of the paper's Figure 2: logits = h(g(f(x; θp); θa); θh).

  f  `encoder`  any Hugging Face encoder (AutoModel), pretrained θp (mBERT by default)
  g  `adapter`  one bottleneck adapter after the last layer, θa (absent for head tuning
                and for full fine-tuning from the plain pretrained model)
  h  `heads`    one linear token-classification head per language, θh, dropout before it

Algorithm 1 treats the three groups differently, so every parameter name says its group:
`encoder.*` is θp ("pretrained"), `adapter.*` is θa ("adapter"), `heads.<lang>.*` is θh ("head").
meta.py runs this module through `torch.func.functional_call` with some of those names bound to
other tensors (the inner loop's adapted copies); kyg.py fine-tunes it directly.

Also here: loading from the hub or a local directory with clear errors; the files kyg writes
(safetensors and JSON, atomically): primed model directories and the resumable state of a
priming; and the tiny BERT that the tests and `run.sh smoke` build offline.
"""
import json
import logging
import os

import torch
import torch.nn.functional as F
from torch import nn

from data import LABELS, KygError

DEFAULT_MODEL = "bert-base-multilingual-cased"
GROUPS = ("pretrained", "adapter", "head")


class Adapter(nn.Module):
    """g(·; θa), Houlsby et al.'s bottleneck: x + up(relu(down(x))).   [B, T, H] -> [B, T, H]

    A fresh adapter is exactly the identity, so a fresh model starts from the pretrained encoder's
    features (Houlsby et al.'s aim): `up` starts at zero, as LoRA's B does. `down` keeps PyTorch's
    default init, so that up's gradient, which flows through relu(down(x)), is not tiny from the
    first step; with both projections near zero, each one's gradient is scaled by the other."""

    def __init__(self, hidden_size, bottleneck):
        super().__init__()
        self.down = nn.Linear(hidden_size, bottleneck)
        self.up = nn.Linear(bottleneck, hidden_size)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x):
        return x + self.up(F.relu(self.down(x)))


class Tagger(nn.Module):
    def __init__(self, encoder, languages, with_adapter=True, bottleneck=64):
        super().__init__()
        hidden = encoder.config.hidden_size
        self.encoder = encoder
        self.adapter = Adapter(hidden, bottleneck) if with_adapter else nn.Identity()
        self.dropout = nn.Dropout(encoder.config.hidden_dropout_prob)
        self.heads = nn.ModuleDict({lang: nn.Linear(hidden, len(LABELS)) for lang in languages})
        for head in self.heads.values():
            nn.init.normal_(head.weight, std=encoder.config.initializer_range)
            nn.init.zeros_(head.bias)

    def encode(self, input_ids, attention_mask):
        """f(x; θp): LongTensors [B, T] -> hidden states [B, T, H]."""
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def forward(self, lang, input_ids=None, attention_mask=None, hidden=None):
        """Logits [B, T, len(LABELS)] from `lang`'s head. Pass `hidden` (the encoder's output,
        [B, T, H]) instead of the ids to skip f: the cached-trunk paths, where θp is fixed."""
        if hidden is None:
            hidden = self.encode(input_ids, attention_mask)
        return self.heads[lang](self.dropout(self.adapter(hidden)))


def group_of(name):
    """Parameter name -> "pretrained" (θp), "adapter" (θa) or "head" (θh)."""
    return {"encoder": "pretrained", "adapter": "adapter", "heads": "head"}[name.split(".", 1)[0]]


def named_params(model, *groups, lang=None):
    """{name: parameter} of the given groups; with `lang`, only that language's head."""
    return {name: p for name, p in model.named_parameters()
            if group_of(name) in groups and (lang is None or group_of(name) != "head"
                                             or name.startswith(f"heads.{lang}."))}


def token_loss(logits, labels):
    """Mean cross-entropy over the labelled sub-words (first of each word).  [B, T, C], [B, T] -> []"""
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)


# ----------------------------------------------------------------------------- loading

def load(model_name, languages, with_adapter=True, bottleneck=64):
    """(Tagger, tokenizer) for a hub name or a local directory; errors say what is missing."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()  # the unused pooler's "newly initialised" warning is noise here
    hf_logging.disable_progress_bar()
    logging.getLogger("transformers").setLevel(logging.ERROR)
    local = os.path.isdir(model_name)
    if not local and model_name.startswith(("/", ".", "~")):
        raise KygError(f"model directory {model_name!r} not found: pass --model an existing directory or a hub name")
    where = f"model directory {model_name!r}" if local else f"hub model {model_name!r}"
    why = lambda e: str(e).strip().splitlines()[0][:160]
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_name)
    except (OSError, ValueError, TypeError) as e:
        fix = "save one beside the weights (tokenizer.save_pretrained)" if local else \
            "without the hub, pass --model DIR, a local model directory"
        raise KygError(f"cannot load the tokenizer of {where} ({why(e)}); {fix}")
    # transformers builds an empty tokenizer (special tokens only) when the files are missing.
    if len(tokenizer) <= len(set(tokenizer.all_special_tokens)):
        raise KygError(f"{where} has no tokenizer (no vocabulary found); save one beside the weights "
                       f"(tokenizer.save_pretrained) or pass another --model")
    try:
        encoder = AutoModel.from_pretrained(model_name)
    except (OSError, ValueError) as e:
        raise KygError(f"cannot load the encoder of {where} ({why(e)}); pass --model a hub name or a "
                       f"directory with config.json and weights")
    # Token classification never reads the pooler; dropping it keeps θp to what is trained.
    if getattr(encoder, "pooler", None) is not None:
        encoder.pooler = None
    return Tagger(encoder, languages, with_adapter, bottleneck), tokenizer


def parameter_count(model, groups):
    """(trainable, total) parameter counts when `groups` are the ones being trained."""
    params = dict(model.named_parameters())
    trained = sum(p.numel() for n, p in params.items() if group_of(n) in groups)
    return trained, sum(p.numel() for p in params.values())


# ----------------------------------------------------------------------------- files
# Everything kyg writes is safetensors or JSON (never a pickle), written to a temporary file and
# renamed into place, so that a crash never leaves half a file under the final name.

def write_atomic(path, write):
    """write(temporary path), then rename it to `path`."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    write(tmp)
    os.replace(tmp, path)


def save_tensors(tensors, path, metadata=None):
    """{name: tensor} (and a JSON-able `metadata`) -> one safetensors file, atomically."""
    from safetensors.torch import save_file
    tensors = {n: t.detach().to("cpu").contiguous() for n, t in tensors.items()}
    write_atomic(path, lambda tmp: save_file(tensors, tmp, {"kyg": json.dumps(metadata)}))


def load_tensors(path):
    """({name: tensor}, metadata) from a file save_tensors wrote; a damaged file is a KygError."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(path, "pt") as f:
            return {n: f.get_tensor(n) for n in f.keys()}, json.loads((f.metadata() or {}).get("kyg", "null"))
    except (SafetensorError, OSError, ValueError) as e:
        raise KygError(f"{path} is damaged or incomplete ({str(e).splitlines()[0][:120]}); delete it and "
                       f"rerun the command that wrote it")


def write_json(obj, path):
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1)
    write_atomic(path, write)


# A primed model is a Hugging Face directory: the encoder as save_pretrained writes it (so
# AutoModel.from_pretrained(DIR) gives the primed θp), its tokenizer, θa in adapter.safetensors,
# and priming.json, written last: a directory without it is a priming that has not finished.
PRIMING_RECORD, PRIMING_STATE = "priming.json", "priming-state.safetensors"


def save_primed(model, tokenizer, priming, directory):
    model.encoder.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    save_tensors(model.adapter.state_dict(), os.path.join(directory, "adapter.safetensors"))
    write_json(priming, os.path.join(directory, PRIMING_RECORD))


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
    try:
        with open(os.path.join(directory, PRIMING_RECORD), encoding="utf-8") as f:
            return json.load(f)
    except ValueError as e:
        raise KygError(f"{directory}/{PRIMING_RECORD} is damaged ({e}); delete {directory} and prime again")


def load_primed(model, directory):
    """Load θp and θa from a primed model directory into `model`; returns its priming record."""
    priming = read_priming(directory)
    try:
        model.encoder.load_state_dict(load_tensors(os.path.join(directory, "model.safetensors"))[0])
        model.adapter.load_state_dict(load_tensors(os.path.join(directory, "adapter.safetensors"))[0])
    except RuntimeError:
        raise KygError(f"{directory} was primed from {priming['model']!r}, whose weights do not fit the "
                       f"--model given; pass --model {priming['model']}")
    return priming


# The resumable state of a priming: every parameter (θp, θa, each source language's θh), AdamW's
# moments, the scheduler's step, the task sampler's RNG and queues, torch's RNG (dropout), and
# the loss history. One file, so it is replaced whole or not at all.

def save_priming_state(path, model, optimizer, scheduler, sampler, record):
    tensors = {f"model.{n}": p for n, p in model.named_parameters()}
    tensors["rng.torch"] = torch.get_rng_state()
    if torch.cuda.is_available():
        tensors["rng.cuda"] = torch.cuda.get_rng_state()
    optim = optimizer.state_dict()
    for index, state in optim["state"].items():
        tensors.update({f"optimizer.{index}.{k}": v for k, v in state.items()})
    save_tensors(tensors, path, {**record, "param_groups": optim["param_groups"], "scheduler": scheduler.state_dict(),
                                 "sampler": sampler.state_dict()})


def restore_priming_state(tensors, record, model, optimizer, scheduler, sampler):
    """Put back what save_priming_state saved (read by load_tensors); returns its record."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(tensors[f"model.{name}"])
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


# ----------------------------------------------------------------------------- tiny model

def write_tiny_model(directory, syllables, seed=0):
    """A 2-layer, hidden-32 BERT with random weights whose WordPiece vocabulary is `syllables`
    (word-initial) and `##syllables` (word-inner), so a word of k syllables is k sub-words.
    Saved as a normal Hugging Face directory (config, weights, tokenizer.json)."""
    from transformers import BertConfig, BertModel, BertTokenizer
    os.makedirs(directory, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(syllables) + ["##" + s for s in syllables]
    vocab_file = os.path.join(directory, "vocab.txt")
    with open(vocab_file, "w", encoding="utf-8") as f:
        f.write("\n".join(vocab) + "\n")
    BertTokenizer(vocab=vocab_file, do_lower_case=False).save_pretrained(directory)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(directory)
    return directory
