"""The offline stand-ins for mBERT and WikiAnn that the tests and `run.sh smoke` use, written by
`python kyg.py tiny DIR`: a tiny random BERT whose words are syllables, and WikiAnn-shaped data in
which an entity word starts with its type's syllable, so that the task is learnable in seconds.
"""
import random
from pathlib import Path

import torch

TINY_SYLLABLES = ("ka", "lo", "mi", "ra", "te", "su", "no", "vi", "de", "ba", "go", "pe", ".")
ENTITY_START = {"PER": "ka", "ORG": "ba", "LOC": "vi"}  # what makes the tiny task learnable


def write_tiny_model(directory, seed=0):
    """A 2-layer, hidden-32 BERT with random weights, as a Hugging Face directory, whose vocabulary is
    the syllables and `##syllables`, so a word of k syllables is k sub-words."""
    from transformers import BertConfig, BertModel
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + list(TINY_SYLLABLES) + ["##" + s for s in TINY_SYLLABLES]
    torch.manual_seed(seed)
    BertModel(BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(directory)
    Path(directory, "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    # BertTokenizer, which the fast tokenizer loads from vocab.txt
    Path(directory, "tokenizer_config.json").write_text('{"tokenizer_class": "BertTokenizer", "do_lower_case": false}')


def write_tiny_data(directory, languages, sizes=(200, 50, 50), seed=0):
    """WikiAnn-shaped data, `{lang}/{train,dev,test}.tsv`, for tests and `run.sh smoke`: words of 1-3
    syllables, an entity word starting with its type's syllable, entities of one or two words."""
    others = [s for s in TINY_SYLLABLES if s not in ENTITY_START.values() and s != "."]
    for lang in languages:
        rng = random.Random(f"{seed}-{lang}")
        word = lambda first: first + "".join(rng.choices(others, k=rng.randint(0, 2)))
        for split, size in zip(("train", "dev", "test"), sizes):
            lines = []
            for _ in range(size):
                for _ in range(rng.randint(3, 10)):
                    kind = rng.choice(["O", "O", "O", "PER", "ORG", "LOC"])
                    lines += [f"{word(rng.choice(others))}\tO"] if kind == "O" else [
                        f"{word(ENTITY_START[kind])}\t{'BI'[i > 0]}-{kind}" for i in range(rng.randint(1, 2))]
                lines.append(".\tO\n")
            Path(directory, lang).mkdir(parents=True, exist_ok=True)
            Path(directory, lang, f"{split}.tsv").write_text("\n".join(lines), encoding="utf-8")
