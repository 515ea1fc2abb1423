"""WikiAnn for kyg: reading, tokenising, batching, priming tasks, and entity-level F1.

The sentences come from the hub (`datasets.load_dataset("unimelb-nlp/wikiann", lang)`, the
default) or a local directory `{lang}/{train,dev,test}.tsv`, CoNLL style (`token<TAB>tag`, a
blank line between sentences); the examples are the same. Then, for model.py, meta.py, kyg.py:
  encode()      words -> sub-word ids; the gold tag sits on each word's first sub-word, -100 elsewhere
  batches()     dynamic padding, length-bucketed: {input_ids, attention_mask, labels} [B, T]
  TaskSampler   one priming task per source language: disjoint support 𝒟tr and query 𝒟ts batches
  word_tags()   predicted label ids of sub-words back to one tag per gold word (unseen words are `O`)
  f1()          entity-level micro F1 (seqeval, IOB2)
"""
import os
import random
from collections import namedtuple

import torch

from report import KygError

# The WikiAnn tag set, in the hub's class-id order (ids 0..6).
LABELS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC"]
LABEL_ID = {tag: i for i, tag in enumerate(LABELS)}
HUB_DATASET = "unimelb-nlp/wikiann"


Sentence = namedtuple("Sentence", "words tags")  # [str] * n_words; [int] * n_words, ids into LABELS


# ----------------------------------------------------------------------------- reading

def load_split(lang, split, data_dir=None, max_sentences=None):
    """One WikiAnn split's sentences, from `data_dir` or else the hub; the first `max_sentences` if given."""
    sentences = _read_local(lang, split, data_dir) if data_dir else _read_hub(lang, split)
    if not sentences:
        raise KygError(f"the {split} split of {lang!r} has no sentences: check the data ({data_dir or HUB_DATASET})")
    return sentences[:max_sentences] if max_sentences else sentences


def _read_local(lang, split, data_dir):
    lang_dir = os.path.join(data_dir, lang)
    if not os.path.isdir(lang_dir):
        known = sorted(d for d in os.listdir(data_dir)
                       if os.path.isdir(os.path.join(data_dir, d))) if os.path.isdir(data_dir) else []
        raise KygError(f"unknown language {lang!r}: {data_dir} has {', '.join(known)}" if known else
                       f"data directory {data_dir!r} has no language folders: lay out {{lang}}/{{train,dev,test}}.tsv")
    path = os.path.join(lang_dir, f"{split}.tsv")
    if not os.path.isfile(path):
        raise KygError(f"missing file {path}: every language needs train, dev and test")
    return read_conll(path)


def read_conll(path):
    """`token<TAB>tag` lines, blank line between sentences, UTF-8 -> [Sentence]."""
    with open(path, "rb") as f:
        raws = [*f, b""]  # a blank line after the last closes the last sentence
    sentences, words, tags = [], [], []
    for line_no, raw in enumerate(raws, 1):
        try:
            line = raw.decode("utf-8").rstrip("\r\n")
        except UnicodeDecodeError as e:
            raise KygError(f"{path}:{line_no}: byte {raw[e.start]:#04x} at column {e.start + 1} is not UTF-8; "
                           f"convert the file to UTF-8 (say, iconv -f latin1 -t utf-8)")
        if not line.strip():
            if words:
                sentences.append(Sentence(words, tags))
            words, tags = [], []
            continue
        word, sep, tag = line.rpartition("\t")
        if not sep:
            raise KygError(f"{path}:{line_no}: expected 'token<TAB>tag', got {line!r}")
        if tag not in LABEL_ID:
            raise KygError(f"{path}:{line_no}: tag {tag!r} is not in the WikiAnn tag set "
                           f"({' '.join(LABELS)}): convert the data to these IOB2 tags")
        words.append(word)
        tags.append(LABEL_ID[tag])
    return sentences


def _read_hub(lang, split):
    import datasets  # only the hub path needs it
    try:
        ds = datasets.load_dataset(HUB_DATASET, lang, split={"dev": "validation"}.get(split, split))
    except ValueError as e:  # datasets says "BuilderConfig 'xx' not found" for unknown configs
        raise KygError(f"unknown language {lang!r} for {HUB_DATASET}: {str(e).splitlines()[0]}")
    except (OSError, ConnectionError) as e:
        raise KygError(f"cannot fetch {HUB_DATASET}/{lang} from the hub ({type(e).__name__}); "
                       f"without the hub, pass --data-dir DIR with {{lang}}/{{train,dev,test}}.tsv")
    names = ds.features["ner_tags"].feature.names
    if names != LABELS:
        raise KygError(f"{HUB_DATASET}/{lang} has tags {names}, expected {LABELS}")
    return [Sentence(list(r["tokens"]), list(r["ner_tags"])) for r in ds]


# ----------------------------------------------------------------------------- tokenising

# input_ids       [int] * T, T <= max_length, special tokens included
# labels          [int] * T: the word's tag on its first sub-word, -100 elsewhere
# word_positions  [int] * n_words: index of the word's first sub-word, -1 if the model never sees it
# tags            [int] * n_words: the gold tags of every word, for scoring
Example = namedtuple("Example", "input_ids labels word_positions tags")


def encode(sentences, tokenizer, max_length):
    """Sentences -> Examples. Truncation cuts what the model sees, never what is scored."""
    if not getattr(tokenizer, "is_fast", False):
        raise KygError(f"the tokenizer ({type(tokenizer).__name__}) is not a fast tokenizer; kyg "
                       f"needs word_ids() to align labels: give the model a tokenizer.json")
    enc = tokenizer([s.words for s in sentences], is_split_into_words=True, truncation=True, max_length=max_length)
    examples = []
    for i, sentence in enumerate(sentences):
        # ✂ exercise 1: the gold tag on each word's first sub-word, -100 elsewhere; where each word starts
        labels, positions = [], [-1] * len(sentence.words)
        previous = None
        for position, word in enumerate(enc.word_ids(i)):
            first = word is not None and word != previous
            labels.append(sentence.tags[word] if first else -100)
            if first:
                positions[word] = position
            previous = word
        # ✂ end
        examples.append(Example(enc["input_ids"][i], labels, positions, sentence.tags))
    return examples


def collate(examples, pad_id):
    """[Example] -> {input_ids, attention_mask, labels}: LongTensors [B, T], T = longest in the batch."""
    width = max(len(e.input_ids) for e in examples)
    pad = lambda rows, value: torch.tensor([row + [value] * (width - len(row)) for row in rows], dtype=torch.long)
    # pad_id None: a tokenizer without a pad token, whose padding the attention mask hides anyway
    return {"input_ids": pad([e.input_ids for e in examples], 0 if pad_id is None else pad_id),
            "attention_mask": pad([[1] * len(e.input_ids) for e in examples], 0),
            "labels": pad([e.labels for e in examples], -100)}


def batches(examples, batch_size, rng=None):
    """Index lists of batches: sorted by length (evaluation), or with `rng` (training) shuffled, sorted
    within windows of 50 batches, so that a batch pads little and the order stays random."""
    order = list(range(len(examples)))
    length = lambda i: len(examples[i].input_ids)
    if rng is None:
        order.sort(key=length)
    else:
        rng.shuffle(order)
        window = 50 * batch_size
        order = [i for w in range(0, len(order), window) for i in sorted(order[w:w + window], key=length)]
    chunks = [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    if rng is not None:
        rng.shuffle(chunks)
    return chunks


# ----------------------------------------------------------------------------- priming tasks

class TaskSampler:
    """Alg. 1, line 7: "sample a batch of tasks 𝒯", one per source language, each two disjoint batches
    of its train split, support 𝒟tr and query 𝒟ts. A language is walked in a shuffled order,
    reshuffled when used up, so within a pass no sentence is drawn twice."""

    def __init__(self, examples_by_lang, support_size, query_size, seed):
        self.examples = examples_by_lang
        self.support_size, self.query_size = support_size, query_size
        for lang, examples in examples_by_lang.items():
            if len(examples) < support_size + query_size:
                raise KygError(f"source language {lang!r} has {len(examples)} training sentences, "
                               f"fewer than one task needs ({support_size} + {query_size})")
        self.rng = random.Random(seed)
        self.queue = {lang: [] for lang in examples_by_lang}

    def state_dict(self):
        """Where the sampler stands (its RNG and what is left of each language's pass), for JSON."""
        return {"rng": self.rng.getstate(), "queue": self.queue}

    def load_state_dict(self, state):
        version, internal, gauss = state["rng"]  # JSON made the RNG state's tuples lists
        self.rng.setstate((version, tuple(internal), gauss))
        self.queue = state["queue"]

    def steps_per_pass(self):
        """Meta-batches in one pass over the smallest source language."""
        return min(len(e) for e in self.examples.values()) // (self.support_size + self.query_size)

    def sample(self):
        """-> [(lang, support [Example], query [Example])], one task per source language."""
        # ✂ exercise 3: Alg. 1, line 7: a batch of tasks, each sentence once a pass
        tasks = []
        for lang, examples in self.examples.items():
            need = self.support_size + self.query_size
            if len(self.queue[lang]) < need:
                self.queue[lang] = list(range(len(examples)))
                self.rng.shuffle(self.queue[lang])
            drawn, self.queue[lang] = self.queue[lang][:need], self.queue[lang][need:]
            tasks.append((lang, [examples[i] for i in drawn[:self.support_size]],
                          [examples[i] for i in drawn[self.support_size:]]))
        return tasks
        # ✂ end


# ----------------------------------------------------------------------------- scoring

def word_tags(example, predicted):
    """The predicted label id of each sub-word of one sentence [T] (the logits' argmax) -> one tag string per
    gold word; a word whose first sub-word the model never saw (cut by truncation) is predicted `O`."""
    best = predicted.tolist()
    return [LABELS[best[p]] if p >= 0 else "O" for p in example.word_positions]


def f1(gold, predicted):
    """Entity-level micro F1 in percent over lists of tag-string sequences: seqeval's default,
    conlleval-compatible mode (an entity is a maximal B-X I-X... span; a stray I-X starts one)."""
    from seqeval.metrics import f1_score
    return 100.0 * f1_score(gold, predicted, zero_division=0)
