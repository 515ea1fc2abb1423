"""Specifications of kyg, on a tiny BERT and tiny data built in a temp dir (offline, seconds).

    python -m pytest -q test_kyg.py

    python -m pytest -q test_kyg.py -m "not slow"   # without those that start processes

Each test asserts one property of the method or of the tools around it. They are grouped by what
they specify, in this order: data; the model and θ's groups; Algorithm 1, line by line; priming;
fine-tuning; the table; the command line; reliability. Shared fixtures and helpers come first.
"""
import copy
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

# Every test runs on the CPU, and so do the kyg.py processes the tests start: the properties below are
# exact equalities (a resumed priming bit-identical, a seed's result the same alone or after others),
# which PyTorch promises on a CPU and not on CUDA by default. `bash run.sh smoke` checks CUDA end to end.
os.environ["CUDA_VISIBLE_DEVICES"] = ""
import torch  # noqa: E402  (after hiding CUDA)
import transformers  # noqa: E402

import data as D
import kyg
import meta
import model as M
import report
import tiny as T


HERE = os.path.dirname(os.path.abspath(__file__))


def load_tagger(model_dir, languages, pe_method="adapter"):
    """(Tagger, tokenizer) for a model directory, built as `kyg.py prime` builds its model."""
    encoder, tokenizer = M.load_encoder(model_dir)
    return M.Tagger(encoder, languages, pe_method), tokenizer


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    T.write_tiny_model(str(root / "model"))
    T.write_tiny_data(str(root / "data"), ["en", "es", "hi"], sizes=(80, 30, 30))
    return {"model": str(root / "model"), "data": str(root / "data"), "root": root}


@pytest.fixture
def tagger(tiny):
    torch.manual_seed(0)
    model, tokenizer = load_tagger(tiny["model"], ["en", "es"])
    model.eval()  # dropout off: the properties below are exact, not statistical
    return model, tokenizer


@pytest.fixture(params=M.PE_METHODS)
def any_pe_tagger(tiny, request):
    """The tagger with θa of each PE method: the adapter, LoRA, BitFit."""
    torch.manual_seed(0)
    model, tokenizer = load_tagger(tiny["model"], ["en", "es"], pe_method=request.param)
    model.eval()
    return model, tokenizer


def batch_of(tiny, tokenizer, lang, start, size):
    """`size` training sentences of `lang` from `start`, as a batch labelled as data.encode labels
    (the tag on each word's first sub-word) but here, so that only encode's own check needs it."""
    sentences = D.load_split(lang, "train", tiny["data"])[start:start + size]
    encoded = tokenizer([s.words for s in sentences], is_split_into_words=True, truncation=True, max_length=64)
    examples = []
    for i, sentence in enumerate(sentences):
        words = encoded.word_ids(i)
        labels = [sentence.tags[w] if w is not None and (j == 0 or w != words[j - 1]) else -100
                  for j, w in enumerate(words)]
        examples.append(D.Example(encoded["input_ids"][i], labels, [], sentence.tags))
    return D.collate(examples, tokenizer.pad_token_id)


def table_rows(directory):
    """DIR/table.md's Markdown tables as {a row's first cell, "| " included: [its other cells]}."""
    return {line.split(" | ")[0]: line.rstrip(" |\n").split(" | ")[1:]
            for line in open(os.path.join(directory, "table.md"), encoding="utf-8") if line.startswith("| ")}


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def about(name):
    """assert_close's msg: the parameter's name, then torch's own report of the mismatch."""
    return lambda report: f"{name}: {report}"


def moved_by(p, before):
    return f"moved by up to {(p.detach() - before).abs().max().item():.3g}"


def tiny_encoder_of(family, tiny):
    """A tiny random encoder of `family`, a model directory with the tiny BERT's tokenizer."""
    directory = tiny["root"] / family
    if family == "bert" or directory.exists():
        return tiny["model"] if family == "bert" else str(directory)
    shutil.copytree(tiny["model"], directory)  # the tokenizer's files; config and weights are replaced
    vocab = len((directory / "vocab.txt").read_text(encoding="utf-8").splitlines())
    torch.manual_seed(0)
    transformers.AutoModel.from_config(TINY_FAMILIES[family](vocab)).save_pretrained(str(directory))
    return str(directory)


WITHOUT_FCNTL = "import sys\nsys.modules['fcntl'] = None  # as on Windows: no Unix locks\n"


def kyg_process(*args):
    """`python kyg.py ARGS` as a process of its own, offline, its output captured as text."""
    return subprocess.Popen([sys.executable, os.path.join(HERE, "kyg.py"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})


def run_kyg(*args):
    """kyg_process(ARGS) waited for: its returncode, stdout and stderr."""
    process = kyg_process(*args)
    out, err = process.communicate()
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


def start_and_kill(args, done):
    """Start `kyg.py args`, SIGKILL it as soon as done() is true, and check it was killed mid-run."""
    process = kyg_process(*args)
    while not done() and process.poll() is None:
        time.sleep(0.005)
    process.kill()
    assert process.wait() == -signal.SIGKILL  # killed, not finished


# ---------------------------------------- data: reading WikiAnn, labels on sub-words, entity-level F1


@pytest.mark.exercise1
def test_labels_sit_on_the_first_subword_only(tagger):
    _, tokenizer = tagger
    sentence = D.Sentence(["kalomi", "su", "vide"], [D.LABEL_ID["B-PER"], 0, D.LABEL_ID["B-LOC"]])
    [ex] = D.encode([sentence], tokenizer, 64)
    pieces = tokenizer.convert_ids_to_tokens(ex.input_ids)
    assert pieces == ["[CLS]", "ka", "##lo", "##mi", "su", "vi", "##de", "[SEP]"]
    assert ex.labels == [-100, D.LABEL_ID["B-PER"], -100, -100, 0, D.LABEL_ID["B-LOC"], -100, -100]
    assert ex.word_positions == [1, 4, 5]


@pytest.mark.exercise1
def test_a_word_with_no_subwords_is_scored_as_unseen_and_the_next_keeps_its_place(tagger):
    _, tokenizer = tagger
    tags = [D.LABEL_ID["B-PER"], D.LABEL_ID["B-ORG"], D.LABEL_ID["B-LOC"]]
    [ex] = D.encode([D.Sentence(["kalomi", "\u200b", "vide"], tags)], tokenizer, 64)  # the tokenizer drops "\u200b"
    assert tokenizer.convert_ids_to_tokens(ex.input_ids) == ["[CLS]", "ka", "##lo", "##mi", "vi", "##de", "[SEP]"]
    assert ex.labels == [-100, tags[0], -100, -100, tags[2], -100, -100], ex.labels
    assert ex.word_positions == [1, -1, 4], ex.word_positions
    assert D.word_tags(ex, torch.tensor(ex.labels).clamp(min=0)) == ["B-PER", "O", "B-LOC"]  # scored, as O


@pytest.mark.exercise1
def test_truncation_cuts_the_input_but_every_gold_word_is_scored(tagger):
    _, tokenizer = tagger
    words = ["kalo"] * 10 + ["vide"]
    tags = [D.LABEL_ID["B-PER"]] * 10 + [D.LABEL_ID["B-LOC"]]
    [ex] = D.encode([D.Sentence(words, tags)], tokenizer, max_length=8)
    assert len(ex.input_ids) == 8 and ex.tags == tags
    assert ex.word_positions[:3] == [1, 3, 5] and ex.word_positions[3:] == [-1] * 8
    logits = torch.zeros(8, len(D.LABELS))
    logits[:, D.LABEL_ID["B-PER"]] = 1.0
    predicted = D.word_tags(ex, logits.argmax(-1))
    assert predicted == ["B-PER"] * 3 + ["O"] * 8  # unseen words are O, never dropped
    gold = [D.LABELS[t] for t in tags]
    assert D.f1([gold], [predicted]) == pytest.approx(100 * 2 * (3 / 3) * (3 / 11) / (1 + 3 / 11))


def test_entity_f1_counts_whole_spans():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    predicted = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "O"]]
    assert D.f1(gold, predicted) == pytest.approx(100 * 2 / 3)  # 2 of 3 right, 2 of 3 found
    assert D.f1([["B-PER", "I-PER"]], [["B-PER", "O"]]) == 0.0  # half a span is no entity


def test_hub_path_gives_the_same_examples_as_local_files(tiny, monkeypatch):
    datasets = pytest.importorskip("datasets")
    local = D.load_split("hi", "dev", tiny["data"])
    features = datasets.Features({"tokens": datasets.Sequence(datasets.Value("string")),
                                  "ner_tags": datasets.Sequence(datasets.ClassLabel(names=D.LABELS))})
    served = datasets.Dataset.from_dict({"tokens": [s.words for s in local], "ner_tags": [s.tags for s in local]},
                                        features=features)
    asked = []
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: asked.append((a, k)) or served)
    assert D.load_split("hi", "dev") == local
    assert asked == [((D.HUB_DATASET, "hi"), {"split": "validation"})]


@pytest.mark.parametrize("problem, fix", [
    ("unknown language", "has en, es, hi"),
    ("missing file", "every language needs train, dev and test"),
    ("tag outside the set", "is not in the WikiAnn tag set"),
    ("empty split", "has no sentences"),
])
def test_bad_data_raises_one_clear_error(tiny, tmp_path, problem, fix):
    shutil.copytree(tiny["data"], tmp_path / "d")
    lang = "hi"
    if problem == "unknown language":
        lang = "xx"
    elif problem == "missing file":
        os.remove(tmp_path / "d" / "hi" / "dev.tsv")
    elif problem == "tag outside the set":
        with open(tmp_path / "d" / "hi" / "dev.tsv", "a") as f:
            f.write("Obama\tB-MISC\n\n")
    else:
        open(tmp_path / "d" / "hi" / "dev.tsv", "w").close()
    with pytest.raises(report.KygError, match=fix):
        D.load_split(lang, "dev", str(tmp_path / "d"))


# ---------------------------------------- the model and θ's groups: θp, θa (adapter, LoRA, BitFit), θh;
# loading and primed directories


def test_model_without_tokenizer_raises_one_clear_error(tiny, tmp_path):
    shutil.copytree(tiny["model"], tmp_path / "m")
    for name in os.listdir(tmp_path / "m"):
        if name.startswith(("tokenizer", "vocab", "special")):
            os.remove(tmp_path / "m" / name)
    with pytest.raises(report.KygError, match=r"tokenizer.*; save one beside the weights"):  # wording: by version
        load_tagger(str(tmp_path / "m"), ["hi"])


def test_parameter_groups_partition_the_model(tagger):
    model, _ = tagger
    groups = {M.group_of(n) for n, _ in model.named_parameters()}
    assert groups == {"pretrained", "pe", "head"}
    assert set(M.named_params(model, "head", lang="es")) == {"heads.es.weight", "heads.es.bias"}
    not_encoder = {n for n, _ in model.named_parameters() if not n.startswith("encoder.")}
    assert set(M.named_params(model, "pe", "head")) == not_encoder


# The tiny BERT's shape and vocabulary in the other encoder families kyg supports.
TINY_FAMILIES = {
    "xlm-roberta": lambda vocab: transformers.XLMRobertaConfig(
        vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=66, pad_token_id=0),  # XLM-R's positions start after the padding id
    "distilbert": lambda vocab: transformers.DistilBertConfig(
        vocab_size=vocab, dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=64, pad_token_id=0),
}


@pytest.mark.parametrize("family", ["bert", *TINY_FAMILIES])
@pytest.mark.parametrize("pe", M.PE_METHODS)
def test_each_encoder_family_tags_and_primes_with_each_pe_method(tiny, family, pe):
    """BERT, XLM-R and DistilBERT, each tiny and random: the tagger loads with each PE method's θa
    (LoRA's: A and B on the query and the value projection of every layer), and one meta-step
    moves θp, θa and θh."""
    torch.manual_seed(0)
    model, tokenizer = load_tagger(tiny_encoder_of(family, tiny), ["en", "es"], pe_method=pe)
    assert type(model.encoder).__name__.lower().startswith(family.replace("-", "")), type(model.encoder)
    if pe == "lora":
        layers = model.encoder.config.num_hidden_layers
        assert len(M.named_params(model, "pe")) == 2 * 2 * layers, list(M.named_params(model, "pe"))
    before = snapshot(model)
    adamw = torch.optim.AdamW(M.named_params(model, "pretrained", "pe").values(), lr=1e-3)
    meta.meta_step(model, adamw, constant_lr(adamw), two_tasks(tiny, tokenizer), meta.InnerLoop(steps=2))
    moved = {M.group_of(n, pe) for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == {"pretrained", "pe", "head"}, moved


def test_an_encoder_of_another_family_is_refused_in_one_line():
    """ModernBERT names its dropout neither as BERT nor as DistilBERT does: kyg says what it runs."""
    encoder = transformers.ModernBertModel(transformers.ModernBertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1, sep_token_id=2))
    with pytest.raises(report.KygError, match=r"as BERT, XLM-R or DistilBERT name it, which modernbert does not; pass"):
        M.Tagger(encoder, ["hi"])


def test_a_distilbert_is_primed_and_tuned_from_the_command_line(tiny, tmp_path):
    """The encoder a student reaches for on a laptop: LoRA priming and tuning of a DistilBERT run,
    and the primed directory loads as a DistilBERT."""
    common = ["--model", tiny_encoder_of("distilbert", tiny), "--data-dir", tiny["data"]]
    kyg.main(["prime", "--method", "meta", "--pe", "lora", "--source", "en", "es", "--steps", "2",
              "--support-size", "8", "--query-size", "8", "--out", str(tmp_path / "p"), *common])
    assert type(transformers.AutoModel.from_pretrained(str(tmp_path / "p"))).__name__ == "DistilBertModel"
    kyg.main(["finetune", "--method", "lora", "--lang", "hi", "--epochs", "1", "--init", str(tmp_path / "p"),
              "--no-save", "--out", str(tmp_path / "r"), *common])
    [record] = report.read_results(str(tmp_path / "r"))
    assert record["priming"] == "meta-lora" and 0 <= record["test_f1"] <= 100, record


@pytest.mark.exercise2
def test_a_lora_layer_adds_its_scaled_low_rank_update_to_w_x():
    """LoRA's θa (Hu et al.): with B ≠ 0, a layer computes W x + (α/r)·B A x, α/r = 16/8 = 2.
    Catches the update without its scale α/r, and W x left out."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(12, 10)
    weight, bias = linear.weight.detach().clone(), linear.bias.detach().clone()
    M.LoRALinear.convert(linear)
    with torch.no_grad():
        linear.lora_b.normal_()  # B starts at 0, where the update vanishes whatever its form
    x = torch.randn(3, 5, 12)
    low_rank = x @ linear.lora_a.detach().T @ linear.lora_b.detach().T
    torch.testing.assert_close(linear(x).detach(), x @ weight.T + bias + 2 * low_rank,
                               msg=lambda report: f"W x + (α/r)·B A x with α/r = 2: {report}")


@pytest.mark.exercise2
def test_a_fresh_lora_changes_nothing_and_sits_in_theta_a(tiny):
    torch.manual_seed(0)
    plain, tokenizer = load_tagger(tiny["model"], ["en"], pe_method=None)
    lora, _ = load_tagger(tiny["model"], ["en"], pe_method="lora")
    plain.eval(), lora.eval()
    batch = batch_of(tiny, tokenizer, "en", 0, 8)
    assert torch.equal(lora.encode(batch["input_ids"], batch["attention_mask"]),
                       plain.encode(batch["input_ids"], batch["attention_mask"]))
    theta_a = M.named_params(lora, "pe")
    layers = plain.encoder.config.num_hidden_layers
    assert len(theta_a) == 2 * 2 * layers and all(".attention.self.query.lora_" in n or
                                                  ".attention.self.value.lora_" in n for n in theta_a)
    # θp's names as they were
    assert set(M.named_params(lora, "pretrained")) == set(M.named_params(plain, "pretrained"))
    assert not lora.trunk_is_fixed_by_pretrained  # θa inside the trunk: no cached-trunk shortcut


def test_a_fresh_adapter_is_exactly_the_identity():
    adapter = M.Adapter(16, 4)
    x = torch.randn(2, 3, 16)
    assert torch.equal(adapter(x), x)
    assert adapter.down.weight.abs().min() > 0  # while its down projection is not zero: up learns at once


def test_a_primed_model_is_a_hugging_face_directory_holding_the_primed_weights(tiny, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModel
    kyg.main(["prime", "--method", "meta", "--source", "en", "--steps", "2", "--support-size", "8",
              "--query-size", "8", "--meta-lr", "1e-2", "--model", tiny["model"], "--data-dir", tiny["data"],
              "--out", str(tmp_path / "m")])
    primed = AutoModel.from_pretrained(str(tmp_path / "m")).state_dict()  # any library can load θp
    plain = AutoModel.from_pretrained(tiny["model"]).state_dict()
    fresh = kyg.tagger(kyg.parser().parse_args(["finetune", "--method", "adapter", "--lang", "hi", "--out", "r",
                                                 "--model", tiny["model"], "--init", str(tmp_path / "m")]),
                       M.read_priming(str(tmp_path / "m")), M.load_encoder(str(tmp_path / "m"))[0], "hi")
    for name, value in fresh.encoder.state_dict().items():
        assert torch.equal(primed[name], value), name
    assert any(not torch.equal(plain[n], v) for n, v in fresh.encoder.state_dict().items())  # priming moved θp
    theta_a = load_file(tmp_path / "m" / M.THETA_A)
    assert theta_a.keys() == M.named_params(fresh, "pe").keys()
    for name, value in theta_a.items():
        assert torch.equal(M.named_params(fresh, "pe")[name], value)
    assert not list(tmp_path.glob("m/*state*"))  # the resumable state goes once priming is finished


def test_a_primed_directory_loads_whether_its_encoder_is_one_file_or_shards(tiny, tmp_path):
    kyg.main(["prime", "--method", "meta", "--source", "en", "--steps", "2", "--support-size", "8", "--query-size",
              "8", "--meta-lr", "1e-2", "--model", tiny["model"], "--data-dir", tiny["data"],
              "--out", str(tmp_path / "m")])
    one_file, _ = load_tagger(str(tmp_path / "m"), ["hi"])
    os.remove(tmp_path / "m" / "model.safetensors")
    one_file.encoder.save_pretrained(str(tmp_path / "m"), max_shard_size="50KB")  # as for a large encoder
    assert len(list(tmp_path.glob("m/model-*-of-*.safetensors"))) > 1
    sharded, _ = load_tagger(str(tmp_path / "m"), ["hi"])
    for (name, p), q in zip(one_file.encoder.named_parameters(), sharded.encoder.parameters()):
        assert torch.equal(p, q), name


def test_a_run_starts_from_the_in_memory_encoder_exactly_as_from_a_fresh_load(tiny, tmp_path):
    """kyg.py loads f once per language and tunes a copy per run: after the same seed, the copy's model
    is the freshly loaded one, θa and θh included, even for a checkpoint that lacks weights (the pooler
    here), which transformers initialises at random: loading must draw nothing from the global RNG."""
    from safetensors.torch import load_file, save_file
    shutil.copytree(tiny["model"], tmp_path / "m")
    weights = load_file(tmp_path / "m" / "model.safetensors")
    save_file({n: w for n, w in weights.items() if not n.startswith("pooler.")}, tmp_path / "m" / "model.safetensors",
              {"format": "pt"})
    args = kyg.parser().parse_args(["finetune", "--method", "adapter", "--lang", "hi", "--out", "r",
                                    "--model", str(tmp_path / "m")])
    kept, _ = M.load_encoder(str(tmp_path / "m"))
    for seed in (1, 2):
        torch.manual_seed(seed)
        copied = kyg.tagger(args, None, kept, "hi")
        torch.manual_seed(seed)
        fresh, _ = load_tagger(str(tmp_path / "m"), ["hi"])
        for (name, p), q in zip(copied.named_parameters(), fresh.parameters()):
            assert torch.equal(p, q), name


# ---------------------------------------- Algorithm 1, line by line


def eighty_examples_each(languages):
    """Stand-ins for 80 encoded sentences a language: the sampler only counts and picks them."""
    return {lang: [D.Example([i], [], [], []) for i in range(80)] for lang in languages}


@pytest.mark.exercise3
def test_tasks_are_disjoint_support_and_query_one_per_language():
    sampler = D.TaskSampler(eighty_examples_each(["en", "es"]), 8, 4, seed=0)
    tasks = sampler.sample()
    assert [t[0] for t in tasks] == ["en", "es"]
    for lang, support, query in tasks:
        assert len(support) == 8 and len(query) == 4
        assert not {id(e) for e in support} & {id(e) for e in query}
    assert sampler.steps_per_pass() == 80 // 12


@pytest.mark.exercise3
def test_a_pass_over_the_source_data_draws_each_sentence_once():
    """Alg. 1, line 7: steps_per_pass() meta-batches see every sentence of a language at most once
    (catches sampling with replacement, or a queue reshuffled before it is used up)."""
    sampler = D.TaskSampler(eighty_examples_each(["en", "es"]), 8, 4, seed=0)
    seen = {"en": [], "es": []}
    for _ in range(sampler.steps_per_pass()):
        for lang, support, query in sampler.sample():
            seen[lang] += [id(e) for e in support + query]
    for lang, ids in seen.items():
        assert len(ids) == len(set(ids)) == sampler.steps_per_pass() * 12, \
            f"{lang}: {len(ids)} drawn, {len(set(ids))} of them different, in {sampler.steps_per_pass()} tasks of 12"


@pytest.mark.exercise3
def test_no_task_holds_a_sentence_twice_even_where_a_pass_ends():
    """80 sentences, tasks of 12: each pass leaves 8 unused, so tasks are drawn across ends of passes
    (catches the next pass appended to the last one's leftovers, which can draw a sentence twice)."""
    sampler = D.TaskSampler(eighty_examples_each(["en", "es"]), 8, 4, seed=0)
    for step in range(10 * sampler.steps_per_pass()):
        for lang, support, query in sampler.sample():
            ids = [id(e) for e in support + query]
            assert len(set(ids)) == len(ids) == 12, f"step {step}, {lang}: {len(ids) - len(set(ids))} drawn twice"


@pytest.mark.exercise3
def test_a_resumed_sampler_draws_what_the_stopped_one_would_have():
    """A stopped priming saves the sampler's state as JSON (model.save_priming_state); restored from it,
    the sampler goes on with the same sentences, across the end of a pass (catches a state that holds the
    sentences themselves, which JSON turns into lists, instead of naming them)."""
    examples = eighty_examples_each(["en", "es"])
    stopped, resumed = D.TaskSampler(examples, 8, 4, seed=0), D.TaskSampler(examples, 8, 4, seed=1)
    for _ in range(3):
        stopped.sample()
    resumed.load_state_dict(json.loads(json.dumps(stopped.state_dict())))
    for step in range(2 * stopped.steps_per_pass()):
        expected, got = stopped.sample(), resumed.sample()
        assert [(lang, [id(e) for e in s + q]) for lang, s, q in got] == \
            [(lang, [id(e) for e in s + q]) for lang, s, q in expected], f"step {step} after resuming"


@pytest.mark.parametrize("variant", ["meta", "maml"])
@pytest.mark.exercise4
@pytest.mark.exercise5
def test_the_inner_loops_copies_are_leaves_that_share_nothing_with_theta(any_pe_tagger, variant):
    """Alg. 1, line 9: θ^i = θ for what the inner loop updates (θa, the task's θh; in "maml" θp too),
    each a copy of its own: equal to θ, a leaf of no graph, in storage of its own, so that neither a
    step on it nor a gradient through it reaches θ. Catches a copy still on θ's graph (clone()
    without detach()), one sharing θ's storage (detach() without clone()), θ's own tensor, and θp
    copied in the "meta" loop, whose θp must be the model's own (its meta-gradient lands there)."""
    model, _ = any_pe_tagger
    copies = meta.inner_loop_copies(model, "en", variant)
    updated = ("pretrained", "pe", "head") if variant == "maml" else ("pe", "head")
    assert set(copies) == set(M.named_params(model, *updated, lang="en"))
    for name, theta_i in copies.items():
        theta = model.get_parameter(name)
        assert torch.equal(theta_i, theta), f"{name} {moved_by(theta_i, theta)}"
        assert theta_i.is_leaf and theta_i.requires_grad, \
            f"{name}: is_leaf {theta_i.is_leaf}, requires_grad {theta_i.requires_grad}, " \
            f"grad_fn {theta_i.grad_fn and type(theta_i.grad_fn).__name__}"
        assert theta_i.untyped_storage().data_ptr() != theta.untyped_storage().data_ptr(), f"{name} shares θ's storage"
    sum(theta_i.sum() for theta_i in copies.values()).backward()
    reached = [name for name in copies if model.get_parameter(name).grad is not None]
    assert not reached, f"a gradient through the copies reached θ itself: {reached}"


@pytest.mark.exercise5
def test_pe_inner_loop_leaves_pretrained_untouched_and_adapts_adapter_and_head(any_pe_tagger, tiny):
    model, tokenizer = any_pe_tagger
    before = snapshot(model)
    for p in model.parameters():  # line 14's Σ over earlier tasks, which the inner loop must leave alone
        p.grad = torch.full_like(p, 0.5)
    fast, support_losses = meta.adapt(model, batch_of(tiny, tokenizer, "en", 0, 8), "en", meta.InnerLoop(steps=5))
    changed = [n for n, p in model.named_parameters() if not torch.equal(p.grad, torch.full_like(p, 0.5))]
    assert not changed, f"the inner loop changed the .grad of {len(changed)} of θ's tensors, {changed[:3]} ..."
    theta_a = {"adapter": "adapter.", "lora": ".lora_", "bitfit": ".bias"}[model.pe_method]
    assert {n for n in fast if not n.startswith("heads.")} == {n for n in before if theta_a in n and "heads" not in n}
    assert {n for n in fast if n.startswith("heads.")} == {"heads.en.weight", "heads.en.bias"}
    for name, p in model.named_parameters():  # the model's own tensors, θp above all, bit-identical
        assert torch.equal(p, before[name]), f"{name} {moved_by(p, before[name])}"
    moved = {n for n, p in fast.items() if not torch.equal(p, before[n])}  # θa^i and θh^i moved
    # the head and some of θa, not all: LoRA's A moves below float32's step at first
    assert {"heads.en.weight", "heads.en.bias"} <= moved and len(moved) > 2, moved
    assert support_losses.shape == (5,) and support_losses[-1] < support_losses[0], support_losses


@pytest.mark.exercise5
def test_maml_inner_loop_changes_pretrained_only_in_the_clone(tagger, tiny):
    model, tokenizer = tagger
    before = snapshot(model)
    fast, _ = meta.adapt(model, batch_of(tiny, tokenizer, "en", 0, 8), "en", meta.InnerLoop("maml", steps=2, lr=1e-2))
    assert {M.group_of(n) for n in fast} == {"pretrained", "pe", "head"}
    moved = [n for n, p in fast.items() if M.group_of(n) == "pretrained" and not torch.equal(p, before[n])]
    assert len(moved) > 10, moved  # θp^i is updated by the red line ...
    for name, p in model.named_parameters():  # ... and θp itself is not
        assert torch.equal(p, before[name]), f"{name} {moved_by(p, before[name])}"


@pytest.mark.exercise5
def test_cached_trunk_inner_loop_equals_the_line_by_line_loop(tagger, tiny):
    model, tokenizer = tagger
    support = batch_of(tiny, tokenizer, "en", 0, 8)
    cached, cached_losses = meta.adapt(model, support, "en", meta.InnerLoop(cache_trunk=True))
    line_by_line, line_losses = meta.adapt(model, support, "en", meta.InnerLoop(cache_trunk=False))
    assert cached.keys() == line_by_line.keys()
    for name in cached:
        torch.testing.assert_close(cached[name], line_by_line[name], rtol=0, atol=1e-6, msg=about(name))
    torch.testing.assert_close(cached_losses, line_losses, rtol=0, atol=1e-6, msg=about("support curve"))


def constant_lr(optimizer):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def inner_loop_by_hand(model, support, lang, inner_steps, alpha, red_line=False):
    """Alg. 1, lines 9-12 for one task written out on a deep copy, independently of meta.py: S steps
    of plain SGD on θa^i and θh^i (and, on the red line, θp^i), each at the gradient of that step.
    Returns the copy, θ^i."""
    hand = copy.deepcopy(model)
    inner = [p for n, p in hand.named_parameters() if n.startswith(f"heads.{lang}.") or
             M.group_of(n, hand.pe_method) == "pe" or (red_line and M.group_of(n, hand.pe_method) == "pretrained")]
    for _ in range(inner_steps):
        support_loss = M.token_loss(hand(lang, support["input_ids"], support["attention_mask"]), support["labels"])
        grads = torch.autograd.grad(support_loss, inner)
        with torch.no_grad():
            for p, g in zip(inner, grads):
                p -= alpha * g
    return hand


def by_hand(model, support, query, lang, inner_steps, alpha, red_line=False):
    """Alg. 1 for one task, by hand: the inner loop (inner_loop_by_hand), then the query loss's
    gradient at θ^i. Returns it for θp and θa: the first-order meta-gradient."""
    hand = inner_loop_by_hand(model, support, lang, inner_steps, alpha, red_line)
    M.token_loss(hand(lang, query["input_ids"], query["attention_mask"]), query["labels"]).backward()
    return {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in hand.named_parameters()
            if not n.startswith("heads.")}


@pytest.mark.parametrize("variant", ["meta", "maml"])
@pytest.mark.exercise5
def test_the_inner_loop_takes_s_steps_of_sgd_each_at_its_own_gradient(any_pe_tagger, tiny, variant):
    """Alg. 1, lines 10-11, first order, S = 3: θ^i after adapt() is θ^i stepped by hand. Catches a
    step that reuses the first step's gradient, and one that leaves θh^i (or θp^i) where it was."""
    model, tokenizer = any_pe_tagger
    support = batch_of(tiny, tokenizer, "en", 0, 8)
    fast, _ = meta.adapt(model, support, "en", meta.InnerLoop(variant, steps=3, lr=1e-2))
    hand = inner_loop_by_hand(model, support, "en", 3, 1e-2, red_line=variant == "maml")
    for name, p in fast.items():
        torch.testing.assert_close(p.detach(), hand.get_parameter(name).detach(), rtol=1e-4, atol=1e-6, msg=about(name))


@pytest.mark.exercise5
def test_the_inner_loops_first_support_loss_is_the_loss_at_theta(any_pe_tagger, tiny):
    """The support curve holds the loss before each inner step, so it starts at L(f_θ, 𝒟tr), the
    model's own loss (catches the loss recorded after each step instead)."""
    model, tokenizer = any_pe_tagger
    support = batch_of(tiny, tokenizer, "en", 0, 8)
    at_theta = M.token_loss(model("en", support["input_ids"], support["attention_mask"]), support["labels"]).item()
    _, support_losses = meta.adapt(model, support, "en", meta.InnerLoop(steps=3))
    assert support_losses[0].item() == pytest.approx(at_theta, rel=1e-6), \
        f"support curve {support_losses.tolist()}, loss at θ {at_theta}"


def two_tasks(tiny, tokenizer):
    return [(lang, batch_of(tiny, tokenizer, lang, 0, 8), batch_of(tiny, tokenizer, lang, 8, 8))
            for lang in ("en", "es")]


def two_tasks_in_en_and_one_in_es(tiny, tokenizer):
    return [("en", batch_of(tiny, tokenizer, "en", 0, 8), batch_of(tiny, tokenizer, "en", 8, 8)),
            ("en", batch_of(tiny, tokenizer, "en", 16, 8), batch_of(tiny, tokenizer, "en", 24, 8)),
            ("es", batch_of(tiny, tokenizer, "es", 0, 8), batch_of(tiny, tokenizer, "es", 8, 8))]


def added_meta_gradient(model, tasks, inner):
    """.grad of θp and θa after adapt() and add_meta_gradient() for each task in turn, from none."""
    for lang, support, query in tasks:
        fast, _ = meta.adapt(model, support, lang, inner)
        meta.add_meta_gradient(model, fast, query, lang, inner)
    return {n: p.grad if p.grad is not None else torch.zeros_like(p)
            for n, p in M.named_params(model, "pretrained", "pe").items()}


@pytest.mark.exercise6
def test_first_order_meta_gradient_is_the_query_gradient_at_the_adapted_parameters(any_pe_tagger, tiny):
    """Line 14 for one task, S = 3: what reaches .grad of θp and θa is the gradient of the query loss
    at θ^i. Catches a meta-gradient taken at θ instead, and θa's left in the copies."""
    model, tokenizer = any_pe_tagger
    [task] = two_tasks(tiny, tokenizer)[:1]
    expected = by_hand(model, *task[1:], "en", inner_steps=3, alpha=0.03)
    added = added_meta_gradient(model, [task], meta.InnerLoop(steps=3, lr=0.03))
    for name, grad in expected.items():
        torch.testing.assert_close(added[name], grad, rtol=1e-4, atol=1e-6, msg=about(name))
    assert any(expected[n].abs().sum() > 0 for n in expected if M.group_of(n, model.pe_method) == "pretrained")


@pytest.mark.exercise6
def test_the_meta_gradient_of_a_batch_of_tasks_is_the_sum_of_each_tasks(any_pe_tagger, tiny):
    """Line 14's Σ over 𝒯i: task after task, .grad of θp and θa holds g(en) + g(es), each computed
    by hand. Catches a gradient overwritten by the next task's, or one of the tasks' dropped."""
    model, tokenizer = any_pe_tagger
    tasks = two_tasks(tiny, tokenizer)
    expected = [by_hand(model, support, query, lang, inner_steps=2, alpha=0.03) for lang, support, query in tasks]
    added = added_meta_gradient(model, tasks, meta.InnerLoop(steps=2, lr=0.03))
    for name in added:
        torch.testing.assert_close(added[name], expected[0][name] + expected[1][name], rtol=1e-4, atol=1e-6,
                                   msg=about(name))


@pytest.mark.exercise6
def test_the_maml_loops_meta_gradient_reaches_theta_p_through_its_adapted_copy(tagger, tiny):
    """Row 6, the red line, first order: S steps of SGD on all of θ in a copy, then the query
    gradient at the copy, for θp as for θa. Catches a line 14 that drops the θp gradients living
    in the inner copies (row 6 would silently become adapter-only priming)."""
    model, tokenizer = tagger
    tasks = two_tasks(tiny, tokenizer)
    expected = [by_hand(model, s, q, lang, inner_steps=2, alpha=1e-2, red_line=True) for lang, s, q in tasks]
    added = added_meta_gradient(model, tasks, meta.InnerLoop("maml", steps=2, lr=1e-2))
    for name in added:
        torch.testing.assert_close(added[name], expected[0][name] + expected[1][name], rtol=1e-4, atol=1e-6,
                                   msg=about(name))
    assert any(added[n].abs().sum() > 0 for n in added if M.group_of(n) == "pretrained")


@pytest.mark.exercise7
def test_meta_step_moves_theta_p_and_theta_a_by_the_sum_of_the_tasks_gradients(tagger, tiny):
    """Line 14 as a whole: one meta-step with plain SGD at lr 1 moves θp and θa by minus the sum of
    the tasks' meta-gradients, each computed by hand (catches an optimizer step per task)."""
    model, tokenizer = tagger
    tasks = two_tasks(tiny, tokenizer)
    expected = [by_hand(model, support, query, lang, inner_steps=2, alpha=0.03) for lang, support, query in tasks]
    before = snapshot(model)
    meta_params = M.named_params(model, "pretrained", "pe")
    sgd = torch.optim.SGD(meta_params.values(), lr=1.0)
    meta.meta_step(model, sgd, constant_lr(sgd), tasks, meta.InnerLoop(steps=2, lr=0.03))
    for name, p in meta_params.items():
        torch.testing.assert_close(before[name] - p.detach(), expected[0][name] + expected[1][name], rtol=1e-4,
                                   atol=1e-6, msg=about(name))


@pytest.mark.exercise7
def test_meta_step_starts_from_zero_gradients_and_steps_optimizer_and_schedule_once(tagger, tiny):
    """Line 14 is one update per meta-step: a second meta-step at lr 0 leaves in .grad exactly what
    the same step leaves from fresh gradients (catches a missing zero_grad), and the optimizer and
    the scheduler step once per meta-step, not once per task."""
    model, tokenizer = tagger
    tasks = two_tasks(tiny, tokenizer)
    sgd = torch.optim.SGD(M.named_params(model, "pretrained", "pe").values(), lr=0.0)
    steps = []
    sgd.register_step_post_hook(lambda *_: steps.append("optimizer"))
    scheduler = constant_lr(sgd)
    meta.meta_step(model, sgd, scheduler, tasks, meta.InnerLoop(steps=2))
    assert steps == ["optimizer"] and scheduler.last_epoch == 1, (steps, scheduler.last_epoch)
    fresh = copy.deepcopy(model)  # θh is now θh^1 (line 15); θp and θa did not move at lr 0
    meta.meta_step(model, sgd, scheduler, tasks, meta.InnerLoop(steps=2))
    fresh_sgd = torch.optim.SGD(M.named_params(fresh, "pretrained", "pe").values(), lr=0.0)
    for p in fresh.parameters():
        p.grad = None
    meta.meta_step(fresh, fresh_sgd, constant_lr(fresh_sgd), tasks, meta.InnerLoop(steps=2))
    for (name, p), q in zip(M.named_params(model, "pretrained", "pe").items(),
                            M.named_params(fresh, "pretrained", "pe").values()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=1e-7, msg=about(name))
    assert steps == ["optimizer"] * 2 and scheduler.last_epoch == 2, (steps, scheduler.last_epoch)


@pytest.mark.exercise7
def test_meta_step_returns_the_summed_query_loss_and_the_mean_support_curve(tagger, tiny):
    """What prime() records of a meta-step: the query loss at θ^i summed over its tasks (line 14's Σ)
    and the support curve averaged over them, each task's as adapt() gives it from θ. Catches the
    curves summed, the query losses averaged, or θh¹ set (line 15) before a language's later tasks
    have adapted from θh itself."""
    model, tokenizer = tagger
    tasks, inner = two_tasks_in_en_and_one_in_es(tiny, tokenizer), meta.InnerLoop(steps=3)
    curves, query_losses = [], []
    for lang, support, query in tasks:
        fast, curve = meta.adapt(model, support, lang, inner)
        curves.append(curve)
        query_losses.append(meta.task_loss(model, fast, query, lang).item())
    sgd = torch.optim.SGD(M.named_params(model, "pretrained", "pe").values(), lr=0.0)
    query_loss, support_curve = meta.meta_step(model, sgd, constant_lr(sgd), tasks, inner)
    assert query_loss == pytest.approx(sum(query_losses), rel=1e-6), f"{query_loss}, the tasks' {query_losses}"
    torch.testing.assert_close(torch.tensor(support_curve), torch.stack(curves).mean(0),
                               msg=lambda report: f"the tasks' curves {[c.tolist() for c in curves]}: {report}")


@pytest.mark.exercise7
def test_meta_step_sets_each_head_to_its_first_task_adapted_head_and_moves_theta(tagger, tiny):
    """Line 15, θh = θh¹, with a head per language: each head is the one its language's first task
    adapted, not a later task's (catches the last task's head kept)."""
    model, tokenizer = tagger
    tasks = two_tasks_in_en_and_one_in_es(tiny, tokenizer)
    first_en, _ = meta.adapt(model, tasks[0][1], "en", meta.InnerLoop())
    second_en, _ = meta.adapt(model, tasks[1][1], "en", meta.InnerLoop())
    first_es, _ = meta.adapt(model, tasks[2][1], "es", meta.InnerLoop())
    before = snapshot(model)
    adamw = torch.optim.AdamW(M.named_params(model, "pretrained", "pe").values(), lr=1e-3)
    meta.meta_step(model, adamw, constant_lr(adamw), tasks, meta.InnerLoop())
    for name, p in model.named_parameters():
        if name.startswith("heads.en."):
            torch.testing.assert_close(p.detach(), first_en[name], rtol=0, atol=1e-7, msg=about(name))
            assert not torch.allclose(p, second_en[name]), f"{name} is the second en task's head"
        elif name.startswith("heads.es."):
            torch.testing.assert_close(p.detach(), first_es[name], rtol=0, atol=1e-7, msg=about(name))
    moved = {M.group_of(n) for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == {"pretrained", "pe", "head"}, moved


def meta_gradient(model, tasks, inner_steps, second_order):
    """{name: ∂} of θp and θa from one meta_step on a copy of `model` (SGD at lr 0 keeps .grad)."""
    model = copy.deepcopy(model)
    params = M.named_params(model, "pretrained", "pe")
    sgd = torch.optim.SGD(params.values(), lr=0.0)
    meta.meta_step(model, sgd, constant_lr(sgd), tasks, meta.InnerLoop(steps=inner_steps, second_order=second_order))
    return {n: p.grad if p.grad is not None else torch.zeros_like(p) for n, p in params.items()}


def unrolled_meta_gradient(model, support, query, lang, inner_steps, lr):
    """The exact meta-gradient, computed independently of meta.py: S inner steps of the whole
    model, each kept in the graph (create_graph=True), then ∂ of the query loss w.r.t. θp and θa
    (in PyTorch's plain attention, the one with a second derivative)."""
    from torch.func import functional_call
    from torch.nn.attention import SDPBackend, sdpa_kernel
    run = lambda params, batch: M.token_loss(functional_call(
        model, params, (lang,), {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}),
        batch["labels"])
    fast = dict(M.named_params(model, "pe"))
    fast.update({n: p.detach().clone().requires_grad_() for n, p in model.named_parameters()
                 if n.startswith(f"heads.{lang}.")})
    with sdpa_kernel(SDPBackend.MATH):
        for _ in range(inner_steps):
            grads = torch.autograd.grad(run(fast, support), list(fast.values()), create_graph=True)
            fast = {n: p - lr * g for (n, p), g in zip(fast.items(), grads)}
    meta_params = M.named_params(model, "pretrained", "pe")
    grads = torch.autograd.grad(run(fast, query), list(meta_params.values()), allow_unused=True)
    return {n: g if g is not None else torch.zeros_like(p) for (n, p), g in zip(meta_params.items(), grads)}


@pytest.mark.exercise8
def test_second_order_meta_gradient_is_the_gradient_through_the_inner_steps(any_pe_tagger, tiny):
    """For each PE method's θa: LoRA's and BitFit's live inside f, so f's attention is differentiated twice."""
    model, tokenizer = any_pe_tagger
    model.double()
    support, query = batch_of(tiny, tokenizer, "en", 0, 8), batch_of(tiny, tokenizer, "en", 8, 8)
    exact = unrolled_meta_gradient(model, support, query, "en", inner_steps=3, lr=0.03)
    second = meta_gradient(model, [("en", support, query)], 3, second_order=True)
    first = meta_gradient(model, [("en", support, query)], 3, second_order=False)
    for name in exact:
        torch.testing.assert_close(second[name], exact[name], rtol=0, atol=1e-10, msg=about(name))
    gap = max((first[n] - exact[n]).abs().max().item() for n in exact)
    assert gap > 1e-5  # first order is an approximation, and a visible one
    assert any(exact[n].abs().max() > 0 for n in exact if n.startswith("encoder."))


@pytest.mark.exercise8
def test_second_order_meta_gradient_agrees_with_finite_differences_along_theta_p(tagger, tiny):
    model, tokenizer = tagger
    model.double()
    support, query = batch_of(tiny, tokenizer, "en", 0, 8), batch_of(tiny, tokenizer, "en", 8, 8)
    grad = meta_gradient(model, [("en", support, query)], 3, second_order=True)
    pretrained = M.named_params(model, "pretrained")
    torch.manual_seed(1)
    direction = {n: torch.randn_like(p) for n, p in pretrained.items()}

    def query_loss_after_inner_steps(step):  # L(f_θ^i, 𝒟ts) with θp moved by step · direction
        with torch.no_grad():
            for n, p in pretrained.items():
                p += step * direction[n]
        fast, _ = meta.adapt(model, support, "en", meta.InnerLoop(steps=3))
        with torch.no_grad():
            loss = meta.task_loss(model, fast, query, "en").item()
            for n, p in pretrained.items():
                p -= step * direction[n]
        return loss

    eps = 1e-7  # small: relu kinks in the adapter make a wide difference inexact
    numeric = (query_loss_after_inner_steps(eps) - query_loss_after_inner_steps(-eps)) / (2 * eps)
    analytic = sum((grad[n] * direction[n]).sum().item() for n in pretrained)
    assert numeric == pytest.approx(analytic, rel=1e-6)


@pytest.mark.exercise8
def test_second_order_meta_gradient_of_a_batch_of_tasks_is_the_sum_of_each_tasks(tagger, tiny):
    """Line 14's Σ with the exact meta-gradient: catches per-task zeroing of .grad on that path."""
    model, tokenizer = tagger
    model.double()
    tasks = two_tasks(tiny, tokenizer)
    exact = [unrolled_meta_gradient(model, support, query, lang, inner_steps=2, lr=0.03)
             for lang, support, query in tasks]
    second = meta_gradient(model, tasks, 2, second_order=True)
    for name in second:
        torch.testing.assert_close(second[name], exact[0][name] + exact[1][name], rtol=0, atol=1e-10, msg=about(name))


def cosine(a, b):
    a, b = torch.cat([g.flatten() for g in a.values()]), torch.cat([b[n].flatten() for n in a])
    return (a @ b / (a.norm() * b.norm())).item()


def test_under_bf16_a_first_order_step_points_where_fp32s_does(tagger, tiny):
    """--bf16 autocasts only f's forward: the first-order meta-gradient of one meta-step (θp and θa, two
    tasks, S = 5) points where fp32's does (cosine 1.0000 to four places, measured), and f returns fp32."""
    model, tokenizer = tagger
    tasks = two_tasks(tiny, tokenizer)
    fp32 = meta_gradient(model, tasks, 5, second_order=False)
    model.bf16 = True
    bf16 = meta_gradient(model, tasks, 5, second_order=False)
    batch = tasks[0][1]
    assert model.encode(batch["input_ids"], batch["attention_mask"]).dtype == torch.float32
    assert not all(torch.equal(fp32[n], bf16[n]) for n in fp32)  # bf16 did run
    assert cosine(fp32, bf16) > 0.999, cosine(fp32, bf16)


def test_the_priming_rate_decays_linearly_to_zero(tagger):
    """§4.2's linear schedule for β: the k-th of `steps` updates is at β (1 - k/steps), the last at β/steps."""
    model, _ = tagger
    optimizer, scheduler = meta.priming_optimizer(model, meta_lr=5e-5, steps=4)
    used = []
    for _ in range(4):
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert used == pytest.approx([5e-5, 3.75e-5, 2.5e-5, 1.25e-5], abs=1e-12), used
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


def test_each_exercise_check_runs_the_tests_marked_for_it():
    """EXERCISES.md's checks select tests by mark (`-m exerciseN`), so that a test joins a check only
    when marked for it (it needs no later exercise), never because of a word in its name."""
    text = open(os.path.join(HERE, "EXERCISES.md"), encoding="utf-8").read()
    checks = [line.split(" -m ")[-1].split("`")[0] for line in text.splitlines() if "pytest test_kyg.py -m " in line]
    marked = {mark.name for test in globals().values() for mark in getattr(test, "pytestmark", [])}
    assert checks == [f"exercise{n}" for n in range(1, 9)], checks
    assert set(checks) <= marked, f"checks that select no test: {sorted(set(checks) - marked)}"

# ---------------------------------------- priming: Algorithm 1 and setting 5 from end to end


def test_fine_tuning_priming_updates_every_group(tagger, tiny):
    model, tokenizer = tagger
    before = snapshot(model)
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tasks = [("en", batch_of(tiny, tokenizer, "en", 0, 8), batch_of(tiny, tokenizer, "en", 8, 8))]
    meta.fine_tune_step(model, adamw, constant_lr(adamw), tasks)
    moved = {M.group_of(n) for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == {"pretrained", "pe", "head"}
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n.startswith("heads.es."))


def test_fine_tuning_priming_steps_on_the_support_and_query_loss_together(tagger, tiny):
    """Setting 5 sees the sentences a meta-step sees: one update on the sum of each task's support
    and query loss (plain SGD at lr 1 moves θ by minus its gradient). Catches a step on one batch."""
    model, tokenizer = tagger
    tasks = two_tasks(tiny, tokenizer)
    hand = copy.deepcopy(model)
    sum(M.token_loss(hand(lang, b["input_ids"], b["attention_mask"]), b["labels"])
        for lang, support, query in tasks for b in (support, query)).backward()
    before = snapshot(model)
    sgd = torch.optim.SGD(model.parameters(), lr=1.0)
    meta.fine_tune_step(model, sgd, constant_lr(sgd), tasks)
    for (name, p), q in zip(model.named_parameters(), hand.parameters()):
        torch.testing.assert_close(before[name] - p.detach(), q.grad, rtol=1e-4, atol=1e-6, msg=about(name))


def test_meta_priming_lowers_the_query_loss(tagger, tiny):
    model, tokenizer = tagger
    examples = {"en": D.encode(D.load_split("en", "train", tiny["data"]), tokenizer, 64)}
    sampler = D.TaskSampler(examples, 8, 8, seed=0)
    to_device = lambda ex: D.collate(ex, tokenizer.pad_token_id)
    optimizer, scheduler = meta.priming_optimizer(model, meta_lr=3e-3, steps=30)
    task_batches = ([(lang, to_device(s), to_device(q)) for lang, s, q in sampler.sample()] for _ in range(30))
    losses, support_losses = zip(*meta.prime(model, task_batches, optimizer, scheduler, meta.InnerLoop()))
    support_curve = torch.tensor(support_losses).mean(0)
    assert len(losses) == 30 and sum(losses[-5:]) < 0.8 * sum(losses[:5])
    assert support_curve.shape == (5,) and support_curve[-1] < support_curve[0]  # the inner loop learns


def test_fine_tuning_priming_can_give_the_heads_their_own_learning_rate(tagger):
    model, _ = tagger
    optimizer, _ = meta.priming_optimizer(model, 5e-5, steps=10, head_lr=1e-3)
    by_lr = {group["lr"]: {M.group_of(n) for n, p in model.named_parameters()
                           if any(p is q for q in group["params"])} for group in optimizer.param_groups}
    assert by_lr == {5e-5: {"pretrained", "pe"}, 1e-3: {"head"}}
    assert report.priming_label({"method": "ft", "pe": "adapter", "head_lr": 1e-3}) == "ft-head0.001"


@pytest.mark.parametrize("pe", ["lora", "bitfit"])
def test_lora_and_bitfit_prime_and_tune_only_their_parameters(tiny, tmp_path, pe):
    common = ["--model", tiny["model"], "--data-dir", tiny["data"]]
    kyg.main(["prime", "--method", "meta", "--pe", pe, "--source", "en", "es", "--steps", "2", "--support-size", "8",
              "--query-size", "8", "--out", str(tmp_path / "p"), *common])
    primed, _ = load_tagger(tiny["model"], ["hi"], pe_method=pe)
    priming = M.read_priming(str(tmp_path / "p"))
    assert priming["pe"] == pe
    M.load_primed(primed, priming, str(tmp_path / "p"))  # θa primed for this method is carried ...
    theta_a = M.load_tensors(str(tmp_path / "p" / M.THETA_A))[0]
    assert theta_a.keys() == M.named_params(primed, "pe").keys()
    assert all(torch.equal(M.named_params(primed, "pe")[n], v) for n, v in theta_a.items())
    torch.manual_seed(0)
    other, _ = load_tagger(tiny["model"], ["hi"], pe_method="adapter")
    fresh_adapter = {n: p.clone() for n, p in M.named_params(other, "pe").items()}
    M.load_primed(other, priming, str(tmp_path / "p"))  # ... and a θa of another method starts fresh
    assert all(torch.equal(M.named_params(other, "pe")[n], v) for n, v in fresh_adapter.items())

    out = tmp_path / "r"
    for init in ([], ["--init", str(tmp_path / "p")]):
        kyg.main(["finetune", "--method", pe, "--lang", "hi", "--epochs", "1", "--out", str(out), *init, *common])
    for record in report.read_results(str(out)):
        saved = M.load_tensors(str(out / record["weights"]))[0]
        assert set(saved) == set(M.named_params(primed, "pe")) | {"heads.hi.weight", "heads.hi.bias"}
        assert record["trainable_params"] == sum(v.numel() for v in saved.values())
        assert "cached_trunk" not in record["config"] and "bottleneck" not in record["config"]  # not used
    kyg.main(["table", str(out)])  # the priming × tuning matrix beyond the adapter, with its diagonal cell
    table = (out / "table.md").read_text(encoding="utf-8")
    assert f"| priming ↓ fine-tuning → | {pe} |" in table  # the one column that ran
    row = next(line for line in table.splitlines() if line.startswith(f"| {report.PRIMING_NAMES[f'meta-{pe}']} |"))
    assert row.split(" | ")[1].replace(".", "").strip(" |").isdigit()


def test_a_bf16_priming_and_tuning_run_end_to_end_and_say_so(tiny, tmp_path):
    common = ["--model", tiny["model"], "--data-dir", tiny["data"], "--bf16"]
    kyg.main(["prime", "--method", "meta", "--source", "en", "--steps", "2", "--support-size", "8", "--query-size",
              "8", "--out", str(tmp_path / "p"), *common])
    assert M.read_priming(str(tmp_path / "p"))["precision"] == "bf16"
    args = ["finetune", "--method", "adapter", "--lang", "hi", "--epochs", "1", "--no-save",
            "--out", str(tmp_path / "r")]
    kyg.main(args + ["--init", str(tmp_path / "p"), *common])
    kyg.main(args + common[:-1])  # fp32: another run, not one already done
    assert [r["config"]["precision"] for r in report.read_results(str(tmp_path / "r"))] == ["bf16", "fp32"]
    language = kyg.prepare_language(kyg.parser().parse_args(args + common), "hi", torch.device("cpu"))
    assert {f.dtype for f in language.train.features} == {torch.float32}  # stored features stay fp32


def tiny_priming(tiny, out, *flags):
    """`kyg.py prime` arguments of a short priming on the tiny data into `out`."""
    return ["prime", *flags, "--support-size", "8", "--query-size", "8", "--model", tiny["model"],
            "--data-dir", tiny["data"], "--out", str(out)]


@pytest.mark.parametrize("method, flags, says", [
    ("meta", ["--inner-lr", "1e6"], r"step 1 of 3 \(its loss is nan\).*lower --inner-lr \(α, 1e\+06\)"),
    ("ft", ["--meta-lr", "1e3"], r"step [4-6] of 6 \(its loss is nan\).*lower --meta-lr \(β, 1000\)")])
def test_a_priming_whose_loss_is_not_finite_stops_there_and_writes_no_primed_model(tiny, tmp_path, method, flags,
                                                                                 says):
    """A rate far too large: the priming stops at the step whose loss is not finite, names the rate to
    lower (α when the inner loop broke a whole θ, else β), and leaves no primed model, only the state it
    saved before that step, which still resumes."""
    steps = "3" if method == "meta" else "6"
    args = tiny_priming(tiny, tmp_path / "m", "--method", method, "--steps", steps, "--save-every", "3", *flags)
    with pytest.raises(SystemExit, match=r"^kyg: error: the priming diverged at " + says + " and prime into a new"):
        kyg.main(args)
    assert not (tmp_path / "m" / M.PRIMING_RECORD).exists()
    if method == "ft":  # saved at step 3, diverged later: the state stays, and the same command resumes from it
        assert len(M.load_tensors(str(tmp_path / "m" / M.PRIMING_STATE))[1]["history"]["loss"]) == 3
        with pytest.raises(SystemExit, match="kyg: error: the priming diverged"):
            kyg.main(args)


# ---------------------------------------- fine-tuning


def test_several_learning_rates_run_in_one_process_and_are_recorded(tiny, tmp_path):
    args = ["finetune", "--method", "head", "--lang", "hi", "--lr", "1e-3", "3e-3", "--epochs", "1",
            "--model", tiny["model"], "--data-dir", tiny["data"], "--no-save", "--out", str(tmp_path)]
    kyg.main(args)
    kyg.main(args)  # both are done: skipped
    assert [(r["lr"], r["config"]["lr"], r["config"]["schedule"]) for r in report.read_results(str(tmp_path))] == \
        [(1e-3, 1e-3, "constant"), (3e-3, 3e-3, "constant")]


def test_a_run_asked_for_in_other_words_is_one_run(tiny, tmp_path):
    """The record keeps the rate the run used, so naming the default makes no second run; nor does a
    directory spelled otherwise (a trailing slash, as shell completion adds, or ./)."""
    args = ["finetune", "--method", "head", "--lang", "hi", "--epochs", "1", "--model", tiny["model"],
            "--no-save", "--out", str(tmp_path)]
    kyg.main(args + ["--data-dir", tiny["data"]])
    kyg.main(args + ["--data-dir", tiny["data"], "--lr", str(kyg.FINETUNE_LR["head"])])
    kyg.main(args + ["--data-dir", tiny["data"] + "/"])
    kyg.main(args + ["--data-dir", os.path.join(tiny["data"], ".", "")])
    records = report.read_results(str(tmp_path))
    assert [(r["lr"], r["config"]["lr"], r["config"]["data_dir"]) for r in records] == [(1e-3, 1e-3, tiny["data"])]


def test_a_run_after_one_priming_is_one_run_however_its_directory_is_named(tiny, tmp_path, monkeypatch):
    """A run is what it computes: its primed directory named relative, absolute, through a symlink or
    from another working directory is one run; another priming seed is another run."""
    prime = ["prime", "--method", "meta", "--steps", "1", "--support-size", "8", "--query-size", "8",
             "--model", tiny["model"], "--data-dir", tiny["data"]]
    kyg.main(prime + ["--out", str(tmp_path / "p")])
    kyg.main(prime + ["--out", str(tmp_path / "p2"), "--seed", "2"])
    os.symlink(tmp_path / "p", tmp_path / "link")
    (tmp_path / "sub").mkdir()
    tune = ["finetune", "--method", "head", "--lang", "hi", "--epochs", "1", "--model", tiny["model"],
            "--data-dir", tiny["data"], "--no-save", "--out", str(tmp_path / "r")]
    monkeypatch.chdir(tmp_path)
    for init in ["p", str(tmp_path / "p"), "link", "./p/"]:
        kyg.main(tune + ["--init", init])
    monkeypatch.chdir(tmp_path / "sub")
    kyg.main(tune + ["--init", "../p"])
    kyg.main(tune + ["--init", "../p2"])
    seeds = [r["priming_config"]["seed"] for r in report.read_results(str(tmp_path / "r"))]
    assert seeds == [1, 2], f"priming seed of each recorded run: {seeds}"


def test_a_run_whose_loss_is_not_finite_is_recorded_as_diverged_and_never_chosen(tiny, tmp_path, capsys):
    """In a grid of rates, the rate that diverges does not stop the others; its run says so in its last
    line and its record (no F1: 0 would look like a score), a rerun skips it, and the table never
    chooses it and counts it."""
    args = ["finetune", "--method", "head", "--lang", "hi", "--lr", "1e30", "1e-3", "--epochs", "2",
            "--model", tiny["model"], "--data-dir", tiny["data"], "--out", str(tmp_path)]
    kyg.main(args)
    lines = capsys.readouterr().out.splitlines()
    assert "diverged in epoch 1 (its training loss is not finite)" in lines[1] and "--lr 1e+30" in lines[1], lines
    broken, fine = report.read_results(str(tmp_path))
    assert (broken["lr"], broken["diverged_in_epoch"], broken["dev_f1"], broken["test_f1"]) == (1e30, 1, None, None)
    assert broken["weights"] is None and os.listdir(tmp_path / "weights") == [os.path.basename(fine["weights"])]
    assert fine["diverged_in_epoch"] is None and fine["test_f1"] > 0
    kyg.main(args)
    assert len(report.read_results(str(tmp_path))) == 2
    kyg.main(["table", str(tmp_path)])
    rows, text = table_rows(tmp_path), (tmp_path / "table.md").read_text(encoding="utf-8")
    assert rows["| 2/HT"][0] == f"{fine['test_f1']:.2f} (1) / 72.71" and rows["| none → head"] == ["0.001 (2)"]
    assert "2 runs; 1 diverged (their loss stopped being finite), and their rates are never chosen." in text


def test_live_trunk_is_only_for_a_frozen_trunk(tiny, tmp_path):
    with pytest.raises(SystemExit, match="kyg: error: --live-trunk is for head and adapter tuning"):
        kyg.main(["finetune", "--method", "full", "--live-trunk", "--lang", "hi", "--model", tiny["model"],
                  "--data-dir", tiny["data"], "--out", str(tmp_path)])


def test_a_seed_gives_the_same_result_alone_or_after_other_seeds(tiny, tmp_path):
    common = ["finetune", "--method", "adapter", "--lang", "hi", "--epochs", "2",
              "--model", tiny["model"], "--data-dir", tiny["data"], "--no-save"]
    kyg.main(common + ["--seed", "1", "2", "--out", str(tmp_path / "both")])
    kyg.main(common + ["--seed", "2", "--out", str(tmp_path / "alone")])
    after, alone = report.read_results(str(tmp_path / "both"))[1], report.read_results(str(tmp_path / "alone"))[0]
    assert after["seed"] == alone["seed"] == 2
    assert (after["dev_f1"], after["test_f1"]) == (alone["dev_f1"], alone["test_f1"])


def test_training_on_stored_trunk_features_is_exact_without_dropout(tiny, tmp_path):
    shutil.copytree(tiny["model"], tmp_path / "m")
    config = json.load(open(tmp_path / "m" / "config.json"))
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    json.dump(config, open(tmp_path / "m" / "config.json", "w"))
    common = ["finetune", "--method", "adapter", "--lang", "hi", "--epochs", "2", "--model", str(tmp_path / "m"),
              "--data-dir", tiny["data"], "--out", str(tmp_path / "r")]
    kyg.main(common)
    kyg.main(common + ["--live-trunk"])
    stored, live = report.read_results(str(tmp_path / "r"))
    from_stored, from_live = (M.load_tensors(str(tmp_path / "r" / r["weights"]))[0] for r in (stored, live))
    assert stored["config"]["cached_trunk"] and not live["config"]["cached_trunk"]
    assert (stored["dev_f1"], stored["test_f1"]) == (live["dev_f1"], live["test_f1"])
    for name in from_stored:
        torch.testing.assert_close(from_stored[name], from_live[name], rtol=1e-4, atol=1e-6)


# ---------------------------------------- the table, the figures and the pictures


def test_table_judges_an_ordering_only_against_a_spread(tmp_path):
    """A claim is 'held' only when the gap exceeds the seed spread: with one seed there is no spread,
    and an average over fewer languages than the table shows says so. Figure 3's claims (full
    fine-tuning after priming) are judged the same way."""
    runs = [("none", "adapter", "hi", [40.0, 42.0]), ("meta", "adapter", "hi", [50.0, 52.0]),
            ("ft", "adapter", "hi", [49.0, 53.0]), ("none", "adapter", "af", [40.0]),
            ("meta", "adapter", "af", [55.0]), ("none", "full", "hi", [70.0, 71.0]),
            ("meta", "full", "hi", [72.0, 73.0]), ("maml", "full", "hi", [71.0, 75.0])]
    for priming, method, lang, scores in runs:
        for seed, score in enumerate(scores, 1):
            report.append_result(str(tmp_path), {"priming": priming, "method": method, "lang": lang,
                                              "seed": seed, "test_f1": score})
    kyg.main(["table", str(tmp_path)])
    rows = table_rows(tmp_path)
    assert rows["| 4 > 3"][:2] == ["held (+10.00)", "one seed (+15.00)"]
    assert rows["| 3/AT"][:2] == ["41.00 ± 1.41 (2) / 77.76", "40.00 (1) / 84.1"]  # no spread from one run
    assert rows["| 4 > 5"][0] == "tie (+0.00)"
    assert rows["| 1/Full FT"][-1].startswith("70.50 / 86.73 (1 of 2 languages)")
    assert "languages)" not in rows["| 4/Meta Priming → AT"][-1]
    assert rows["| meta: adapter inner loop (Alg. 1)"] == ["72.50 ± 0.71 (2)", "–"]
    assert rows["| meta→full > none→full"] == ["held (+2.00)", "–"]
    assert rows["| maml→full > meta→full"][0] == "tie (+0.50)"


def test_a_cell_whose_every_rate_diverged_says_so(tmp_path):
    """A cell with no rate left to choose shows 'diverged', not a number and not nothing; a table of one
    run says "1 run", and shows no claims' header without a claim under it."""
    report.append_result(str(tmp_path), {"priming": "none", "method": "adapter", "lang": "hi", "seed": 1, "lr": 1e9,
                                      "dev_f1": None, "test_f1": None, "diverged_in_epoch": 2})
    kyg.main(["table", str(tmp_path)])
    rows, text = table_rows(tmp_path), (tmp_path / "table.md").read_text(encoding="utf-8")
    assert rows["| 3/AT"] == ["diverged / 77.76", "–"] and rows["| none → adapter"] == ["none of 1: all diverged"]
    assert "`, 1 run; 1 diverged" in text and "| claim |" not in text, text


def test_the_matrix_beyond_the_adapter_compares_each_column_with_its_own_ft_priming(tmp_path):
    """Figure 4 beyond the adapter: the FT-priming row holds, in each column, FT priming of that
    column's θa (ft, ft-lora); the diagonal is judged against every other row of its column. A row
    or a column with no runs is left out."""
    runs = [("meta-lora", "lora", [60.0, 62.0]), ("meta", "lora", [50.0, 51.0]), ("ft-lora", "lora", [61.0, 65.0]),
            ("ft", "adapter", [40.0, 41.0]), ("ft", "lora", [10.0, 11.0]), ("none", "lora", [20.0, 21.0])]
    for priming, method, scores in runs:
        for seed, score in enumerate(scores, 1):
            report.append_result(str(tmp_path), {"priming": priming, "method": method, "lang": "hi", "seed": seed,
                                              "test_f1": score})
    kyg.main(["table", str(tmp_path)])
    rows = table_rows(tmp_path)
    assert rows["| FT priming, same θa"] == ["40.50", "63.00"]  # not ft→lora's 10.50; bitfit: not run
    assert rows["| priming ↓ fine-tuning →"] == ["adapter", "lora"] and "| BitFit inner loop" not in rows
    assert rows["| meta-lora→lora > meta→lora"] == ["held (+10.50)"]
    assert rows["| meta-lora→lora > ft-lora→lora"] == ["tie (-2.00)"]
    assert rows["| meta-lora→lora > none→lora"] == ["held (+40.50)"]
    assert "| meta-bitfit→bitfit > ft-bitfit→bitfit" not in rows  # no runs: left out
    assert "## Figure 3" not in (tmp_path / "table.md").read_text(encoding="utf-8")  # no full fine-tuning ran


def test_table_keeps_the_learning_rate_with_the_best_dev_f1_and_pools_priming_seeds(tmp_path):
    """Rates are chosen on dev, never on test; runs from several priming seeds pool into one cell."""
    runs = [(1e-3, 1, 50.0, 60.0), (1e-3, 2, 52.0, 62.0), (1e-2, 1, 55.0, 40.0), (1e-2, 2, 57.0, 42.0)]
    for lr, seed, dev, test in runs:
        report.append_result(str(tmp_path), {"priming": "none", "method": "adapter", "lang": "hi", "seed": seed,
                                          "lr": lr, "dev_f1": dev, "test_f1": test})
    for priming_seed, score in ((1, 70.0), (1, 72.0), (2, 60.0), (2, 62.0)):
        report.append_result(str(tmp_path), {"priming": "meta", "method": "adapter", "lang": "hi", "seed": 1,
                                          "lr": 1e-3, "dev_f1": 0.0, "test_f1": score,
                                          "priming_config": {"seed": priming_seed}})
    kyg.main(["table", str(tmp_path)])
    rows = table_rows(tmp_path)
    assert rows["| 3/AT"][0] == "41.00 ± 1.41 (2) / 77.76"  # 1e-2: the better dev F1, the worse test F1
    assert rows["| none → adapter"] == ["0.01 (2)"]  # of two rates tried
    assert rows["| 4/Meta Priming → AT"][0].startswith("66.00 ± 5.89 (4)")  # both priming seeds' spread
    assert rows["| meta → adapter"] == ["p1: 71.00, p2: 61.00"]


def test_the_pictures_of_priming_at_work_plot_the_records(tiny, tmp_path):
    """Drawn by `table` from a tiny run: each priming's loss at every step, its support loss over
    the S inner steps early and late, and dev F1 by epoch after each priming: the records' numbers."""
    common = ["--model", tiny["model"], "--data-dir", tiny["data"], "--max-train", "40"]
    for method in ("meta", "ft"):
        kyg.main(["prime", "--method", method, "--source", "en", "es", "--steps", "20",
                  "--support-size", "4", "--query-size", "4", "--out", str(tmp_path / method), *common])
    out = str(tmp_path / "r")
    for init in ([], ["--init", str(tmp_path / "meta")], ["--init", str(tmp_path / "ft")]):
        kyg.main(["finetune", "--method", "adapter", "--lang", "hi", "--seed", "1", "2", "--epochs", "3",
                  "--no-save", "--out", out, *init, *common])
    kyg.main(["table", out])
    results = report.read_results(out)
    runs = {r["priming"]: [x["dev_f1_by_epoch"] for x in results if x["priming"] == r["priming"]] for r in results}
    chosen = {(r["priming"], r["method"], r["lang"]): [x for x in results if x["priming"] == r["priming"]]
              for r in results}
    primings = {(r["priming"], r["priming_config"]["seed"]): r["priming_config"]
                for r in results if r["priming_config"]}
    data = {name: panels for name, (_, _, _, panels) in report.pictures(primings, chosen).items()}
    meta_record, ft_record = (M.read_priming(str(tmp_path / m)) for m in ("meta", "ft"))
    # Per batch, so that the heights compare: a meta-step's loss sums 2 query batches (en, es), FT's 4.
    assert data["priming"] == {"": {
        "4/Meta Priming → AT, priming seed 1": pytest.approx([loss / 2 for loss in meta_record["loss_by_step"]]),
        "5/FT Priming → AT, priming seed 1": pytest.approx([loss / 4 for loss in ft_record["loss_by_step"]])}}
    curves = meta_record["support_loss_by_step"]
    assert len(curves) == 20 and all(len(c) == 5 for c in curves) and ft_record["support_loss_by_step"] is None
    mean = lambda rows: [sum(c[s] for c in rows) / len(rows) for s in range(5)]
    label = "4/Meta Priming → AT, priming seed 1"
    assert data["inner-loop"] == {  # early and late, each in a panel of its own scale
        "first tenth of priming": {f"{label}: first 2 steps": pytest.approx(mean(curves[:2]))},
        "last tenth of priming": {f"{label}: last 2 steps": pytest.approx(mean(curves[-2:]))}}
    name = {"none": "3/AT", "meta": "4/Meta Priming → AT", "ft": "5/FT Priming → AT"}
    assert data["fine-tuning"] == {"": {name[p]: pytest.approx([(a + b) / 2 for a, b in zip(*runs[p])]) for p in name}}
    assert all(len(epochs) == 3 for runs_of in runs.values() for epochs in runs_of)
    if importlib.util.find_spec("matplotlib"):  # CI installs it; the table draws no figure without it
        for picture in ("priming", "inner-loop", "fine-tuning"):
            assert os.path.getsize(os.path.join(out, f"{picture}.png")) > 0


def test_reporting_needs_no_torch(tmp_path):
    """report.py (the records and the table) imports and draws a table where torch is missing."""
    report.append_result(str(tmp_path), {"priming": "none", "method": "adapter", "lang": "hi", "seed": 1,
                                         "test_f1": 1.0})
    code = "import sys\nsys.modules['torch'] = None\nimport report\nreport.table(sys.argv[1])"
    run = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=HERE, capture_output=True, text=True)
    assert run.returncode == 0 and (tmp_path / "table.md").exists(), run.stderr


def test_every_committed_result_records_the_rate_it_ran_at():
    for path in [os.path.join(root, "results.jsonl") for root, _, files in os.walk(os.path.join(HERE, "results"))
                 if "results.jsonl" in files]:
        for r in report.read_results(os.path.dirname(path)):
            assert r["lr"] > 0 and r["config"]["lr"] == r["lr"], path


def test_a_cell_never_pools_runs_of_different_recipes_and_says_when_devices_differ(tmp_path):
    """Runs that differ in anything but the seed, the rate and the device are refused in one line naming
    the setting; a cell of CPU and CUDA runs says so."""
    for priming, score in (("none", 50.0), ("meta", 60.0)):
        for seed, device in ((1, "cpu"), (2, "cuda")):
            record = {"priming": priming, "method": "adapter", "lang": "hi", "seed": seed,
                      "test_f1": score + seed, "config": {"epochs": 5, "device": device}}
            report.append_result(str(tmp_path / "a"), record)
    kyg.main(["table", str(tmp_path / "a")])
    rows = table_rows(tmp_path / "a")
    assert rows["| 3/AT"] == ["51.50 ± 0.71 (2: cpu+cuda) / 77.76", "51.50 / 77.76"]
    assert rows["| 4 > 3"] == ["held (+10.00)"]  # judged as any other cell
    for seed, epochs in ((1, 1), (2, 3)):
        report.append_result(str(tmp_path / "b"), {"priming": "none", "method": "adapter", "lang": "hi", "seed": seed,
                                                   "test_f1": 50.0, "config": {"epochs": epochs}})
    with pytest.raises(SystemExit, match=r"^kyg: error: \S+ pools runs of none → adapter on hi that differ in epochs "
                                         r"\(1, 3\); tune each recipe into its own --out$"):
        kyg.main(["table", str(tmp_path / "b")])


# ---------------------------------------- the command line


def test_command_line_errors_are_one_line_without_traceback(tiny, tmp_path):
    result = run_kyg("finetune", "--method", "adapter", "--lang", "xx", "--model", tiny["model"],
                     "--data-dir", tiny["data"], "--out", str(tmp_path))
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == ["kyg: error: unknown language 'xx': "
                                                  f"{tiny['data']} has en, es, hi"]


def test_every_table1_row_runs_from_the_command_line_and_writes_a_result(tiny, tmp_path, capsys):
    common = ["--model", tiny["model"], "--data-dir", tiny["data"], "--max-length", "64"]
    primed = {"meta": [], "ft": [], "maml": [], "meta-S1": ["--inner-steps", "1"]}
    for label, extra in primed.items():
        kyg.main(["prime", "--method", label.split("-")[0], "--source", "en", "es", "--steps", "3",
                  "--support-size", "8", "--query-size", "8", "--out", str(tmp_path / label),
                  *extra, *common])
    said = {line.split()[2].strip("(,"): line for line in capsys.readouterr().out.splitlines()
            if line.startswith("kyg: primed (")}  # FT priming's loss is on its training batches: no query set
    assert " training loss " in said["ft"] and all(" query loss " in said[m] for m in ("meta", "maml", "meta-S1")), said
    out = str(tmp_path / "results")
    table1 = [report.ROWS[row][:2] for row in report.PAPER_TABLE1]
    for priming, method in table1:
        init = [] if priming == "none" else ["--init", str(tmp_path / priming)]
        kyg.main(["finetune", "--method", method, "--lang", "hi", "--epochs", "1", "--out", out, *init, *common])
    results = report.read_results(out)
    assert [(r["priming"], r["method"]) for r in results] == table1
    for r in results:
        assert r["lang"] == "hi" and 0 <= r["test_f1"] <= 100 and r["trainable_params"] > 0
    fractions = {r["method"]: r["trainable_fraction"] for r in results}
    assert fractions["head"] < fractions["adapter"] < fractions["full"] == 1.0
    meta_adapter = next(r for r in results if r["priming"] == "meta" and r["method"] == "adapter")
    saved = M.load_tensors(os.path.join(out, meta_adapter["weights"]))[0]
    assert {M.group_of(n) for n in saved} == {"pe", "head"}  # only what adapter tuning changed

    kyg.main(["finetune", "--method", "head", "--lang", "hi", "--epochs", "1", "--out", out, *common])
    assert len(report.read_results(out)) == 7 and "skipped" in capsys.readouterr().out  # a rerun skips
    kyg.main(["table", out])
    table = open(os.path.join(out, "table.md"), encoding="utf-8").read()
    assert "| 4/Meta Priming → AT |" in table and "| 4 > 3 |" in table and "/ 81.25" in table


@pytest.mark.parametrize("command", ["prime", "tiny"])
def test_kyg_never_writes_over_a_directory_it_did_not_make(tiny, tmp_path, command):
    """A priming's --out (tiny's DIR) that holds a user's files, a model directory say, is refused in one
    line before anything is written, and nothing in it or beside it changes; an empty one is written."""
    user = tmp_path / "mbert"
    shutil.copytree(tiny["model"], user)
    before = {p.name: p.read_bytes() for p in user.iterdir()}
    args = tiny_priming(tiny, "", "--method", "meta", "--steps", "1")[:-1] if command == "prime" else ["tiny"]
    with pytest.raises(SystemExit, match=r"^kyg: error: \S+mbert is a directory that holds files kyg did not "
                                         r"write, which kyg does not write over; pass a new or empty directory$"):
        kyg.main(args + [str(user)])
    assert {p.name: p.read_bytes() for p in user.iterdir()} == before and os.listdir(tmp_path) == ["mbert"]
    (tmp_path / "empty").mkdir()
    kyg.main(args + [str(tmp_path / "empty")])
    written = sorted(os.listdir(tmp_path / "empty"))
    kyg.main(args + [str(tmp_path / "empty")])  # what kyg wrote there is its own: a rerun is not refused
    assert len(written) > 1 and sorted(os.listdir(tmp_path / "empty")) == written


def test_the_command_line_needs_no_fcntl():
    run = subprocess.run([sys.executable, "-c", WITHOUT_FCNTL + "import kyg\nkyg.main(['finetune', '--help'])"],
                         cwd=HERE, capture_output=True, text=True)
    assert run.returncode == 0 and "--method" in run.stdout, run.stderr


def bad_input(tiny, tmp_path, case):
    """(arguments, what the one error line must say) for each kind of bad input."""
    common = ["--model", tiny["model"], "--data-dir", tiny["data"]]
    tune = ["finetune", "--method", "adapter", "--lang", "hi", "--out", str(tmp_path / "r"), *common]
    if case == "a damaged primed model":
        kyg.main(["prime", "--method", "meta", "--steps", "1", "--support-size", "8", "--query-size", "8",
                  "--out", str(tmp_path / "m"), *common])
        weights = tmp_path / "m" / "model.safetensors"
        weights.write_bytes(weights.read_bytes()[:1000])
    if case == "an init from another model":
        other = str(tmp_path / "other")
        T.write_tiny_model(other, seed=1)
        kyg.main(["prime", "--method", "meta", "--steps", "1", "--support-size", "8", "--query-size", "8",
                  "--out", str(tmp_path / "m"), "--model", other, "--data-dir", tiny["data"]])
    if case in ("a primed directory without its θa", "an adapter of another size"):
        kyg.main(["prime", "--method", "meta", "--steps", "1", "--support-size", "8", "--query-size", "8",
                  "--out", str(tmp_path / "m"), *common])
    if case == "a primed directory without its θa":
        os.rename(tmp_path / "m" / M.THETA_A, tmp_path / "m" / "adapter.safetensors")
    if case == "a data file that is not UTF-8":
        shutil.copytree(tiny["data"], tmp_path / "d")
        with open(tmp_path / "d" / "hi" / "dev.tsv", "ab") as f:
            f.write("Mal\u00e9\tB-PER\n".encode("latin-1"))
    if case in ("a malformed results line", "a results file of another format"):
        os.makedirs(tmp_path / "r")
        line = '{"priming": "none", "method": "adapter", "lang": "hi", "seed": 1, "test_f1": 5' + \
            ("" if case == "a malformed results line" else ', "format": 99}')
        (tmp_path / "r" / "results.jsonl").write_text(line + "\n")
    return {
        "init is not a primed model": (tune + ["--init", os.path.join(HERE, "README.md")], "is a file, not a primed"),
        "a damaged primed model": (tune + ["--init", str(tmp_path / "m")],
                                   "cannot load the encoder of model directory"),
        "an init from another model": (tune + ["--init", str(tmp_path / "m")], "was primed from"),
        "zero epochs": (tune + ["--epochs", "0"], "argument --epochs: must be above 0"),
        "zero batch size": (tune + ["--batch-size", "0"], "argument --batch-size: must be above 0"),
        "a negative learning rate": (tune + ["--lr", "-1"], "argument --lr: must be above 0"),
        "zero training sentences": (tune + ["--max-train", "0"], "argument --max-train: must be above 0"),
        "zero priming steps": (["prime", "--method", "meta", "--steps", "0", "--out", str(tmp_path / "p"), *common],
                               "argument --steps: must be above 0"),
        "a malformed results line": (tune, "results.jsonl, line 1, is not a JSON record"),
        "a results file of another format": (["table", str(tmp_path / "r")], "is not a kyg result of format 3"),
        "a primed directory without its θa": (tune + ["--init", str(tmp_path / "m")],
                                              f"lacks {M.THETA_A}, the primed θa"),
        "an adapter of another size": (tune + ["--init", str(tmp_path / "m"), "--bottleneck", "16"],
                                       "was primed with --bottleneck 64; pass that size"),
        "a device this machine lacks": (tune + ["--device", "cuda:7"], "--device cuda:7 is not available here"),
        "a device that does not exist": (tune + ["--device", "tpu"], "--device tpu is not available here"),
        "an --out under a file": (tune[:5] + ["--out", os.path.join(HERE, "README.md", "r"), *common],
                                  "Not a directory"),
        "a primed --out under a file": (["prime", "--method", "meta", "--out", os.path.join(HERE, "README.md", "p"),
                                         *common], "README.md: "),
        "a data file that is not UTF-8": (tune[:-2] + ["--data-dir", str(tmp_path / "d")],
                                          f"{tmp_path / 'd' / 'hi' / 'dev.tsv'}:"),
    }[case]


@pytest.mark.parametrize("case", ["init is not a primed model", "a damaged primed model", "an init from another model",
                                  "zero epochs", "zero batch size", "a negative learning rate",
                                  "zero training sentences", "zero priming steps", "a malformed results line",
                                  "a results file of another format", "a primed directory without its θa",
                                  "an adapter of another size",
                                  "a device this machine lacks", "a device that does not exist",
                                  "an --out under a file",
                                  "a primed --out under a file", "a data file that is not UTF-8"])
def test_bad_input_is_one_error_line(tiny, tmp_path, case):
    """In process, for speed: kyg.main ends in SystemExit with the line that the command line
    prints to stderr alone (test_command_line_errors_are_one_line_without_traceback); any other
    exception, a traceback on the command line, fails the test."""
    args, says = bad_input(tiny, tmp_path, case)
    with pytest.raises(SystemExit) as stop:
        kyg.main(args)
    line = str(stop.value.code)
    assert "\n" not in line and line.startswith("kyg: error: ") and says in line and "; " in line, line


def test_an_out_that_cannot_be_written_is_one_error_line(tiny, tmp_path, monkeypatch):
    """A read-only --out (simulated: root, as CI runs, may write anywhere) ends in one line, as a
    full disk or any other refusal to write would."""
    def refuse(path, *_, **__):
        raise PermissionError(13, "Permission denied", path)
    monkeypatch.setattr(os, "makedirs", refuse)
    with pytest.raises(SystemExit, match=r"^kyg: error: \S+/r: Permission denied; check that path"):
        kyg.main(["finetune", "--method", "adapter", "--lang", "hi", "--out", str(tmp_path / "r"),
                  "--model", tiny["model"], "--data-dir", tiny["data"]])


def test_benchmark_runs_and_reports_every_ratio():
    import bench
    text = bench.main(["--small", "--repeats", "1", "--batch-size", "4", "--device", "cpu"])
    for line in ("ft step", "meta cached", "maml", "meta cached ÷ (2 × (forward + ft step))",
                 "meta full ÷ meta cached", "maml ÷ meta cached", "2nd cached ÷ meta cached",
                 "2nd full ÷ 2nd cached"):
        assert line in text


def test_a_device_that_cannot_run_a_kernel_is_one_error_line(tiny, tmp_path, monkeypatch):
    """As a torch built without kernels for a GPU would: refused before any work, naming the device."""
    real_ones = torch.ones

    def no_kernels(*size, device=None, **kwargs):
        if device is not None:
            raise RuntimeError("CUDA error: no kernel image is available for execution on the device")
        return real_ones(*size, **kwargs)
    monkeypatch.setattr(torch, "ones", no_kernels)
    with pytest.raises(SystemExit, match=r"^kyg: error: --device cpu is not available here \(CUDA error: no kernel"):
        kyg.main(["finetune", "--method", "adapter", "--lang", "hi", "--device", "cpu", "--out", str(tmp_path),
                  "--model", tiny["model"], "--data-dir", tiny["data"]])


def test_run_sh_primes_with_the_flags_its_label_names():
    assert report.priming_flags("meta-S1-2nd") == ["--method", "meta", "--inner-steps", "1", "--second-order"]
    assert report.priming_flags("ft-bitfit-head0.001") == ["--method", "ft", "--pe", "bitfit", "--head-lr", "0.001"]
    for priming in ({"method": "maml", "pe": "lora"}, {"method": "ft", "pe": "adapter", "head_lr": 1e-05},
                    {"method": "meta", "pe": "adapter", "inner_steps": 3, "second_order": True}):
        flags = report.priming_flags(report.priming_label(priming))
        parsed = kyg.parser().parse_args(["prime", *flags, "--out", "p"])
        assert all(getattr(parsed, key) == value for key, value in priming.items()), (priming, flags)


# ---------------------------------------- reliability: stopped, killed and side-by-side runs, reruns


def test_results_are_read_between_appends_never_halfway_through_one(tmp_path):
    """A reader (a worker asking whether its run is recorded) while another process appends a line
    reads the records before that line or after it, never half of it."""
    import threading
    report.append_result(str(tmp_path), {"priming": "none", "method": "head", "lang": "hi", "seed": 1, "test_f1": 1.0})
    path, read = tmp_path / "results.jsonl", []

    def reader():
        try:
            read.append([r["seed"] for r in report.read_results(str(tmp_path))])
        except report.KygError as e:
            read.append(e)
    thread = threading.Thread(target=reader)
    with report.lock(f"{path}.lock"), open(path, "a", encoding="utf-8") as f:  # an append under way
        f.write('{"format": 3, "priming": "none", "method": "head", ')
        f.flush()
        thread.start()
        thread.join(0.5)
        f.write('"lang": "hi", "seed": 2, "test_f1": 2.0}\n')
    thread.join()
    assert read in ([[1]], [[1, 2]]), read


@pytest.mark.slow  # starts processes
@pytest.mark.parametrize("prelude", ["", WITHOUT_FCNTL], ids=["fcntl", "no fcntl"])
def test_side_by_side_runs_keep_every_result(tmp_path, prelude):
    """finetune processes writing into one results folder at once lose none of each other's
    lines, with the operating system's locks or, where fcntl is missing, filelock's others."""
    write = prelude + "import report, sys\nfor i in range(40): report.append_result(sys.argv[1], " \
        "{'priming': 'none', 'method': 'head', 'lang': sys.argv[2], 'seed': i, 'test_f1': 0.0})"
    workers = [subprocess.Popen([sys.executable, "-c", write, str(tmp_path), str(w)], cwd=HERE) for w in range(4)]
    assert [w.wait() for w in workers] == [0] * 4
    assert sorted((r["lang"], r["seed"]) for r in report.read_results(str(tmp_path))) == \
        sorted((str(w), i) for w in range(4) for i in range(40))


@pytest.mark.slow  # starts processes
@pytest.mark.parametrize("method", ["meta", "maml"])
def test_a_killed_priming_resumes_and_ends_bit_identical(tiny, tmp_path, method):
    # 12 sentences a task, 80 a language: a save falls mid-pass, with the sampler's queues part-used.
    args = ["prime", "--method", method, "--steps", "60", "--save-every", "5", "--support-size", "8",
            "--query-size", "4", "--model", tiny["model"], "--data-dir", tiny["data"], "--out"]
    whole = run_kyg(*args, str(tmp_path / "whole"))
    assert whole.returncode == 0 and "prime" in whole.stderr
    assert "\r" not in whole.stderr  # a log gets lines, not carriage-return redraws
    start_and_kill(args + [str(tmp_path / "killed")], lambda: (tmp_path / "killed" / M.PRIMING_STATE).exists())
    with pytest.raises(SystemExit, match="holds a priming that has not finished; rerun"):
        kyg.main(["finetune", "--method", "adapter", "--lang", "hi", "--model", tiny["model"], "--data-dir",
                  tiny["data"], "--init", str(tmp_path / "killed"), "--out", str(tmp_path / "r")])
    rerun = run_kyg(*args, str(tmp_path / "killed"))
    assert rerun.returncode == 0
    resumed_from = int(rerun.stdout.split("from step ")[1].split()[0])
    assert 0 < resumed_from < 60 and resumed_from % 5 == 0
    for name in ("model.safetensors", M.THETA_A):
        assert (tmp_path / "killed" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes(), name
    curve = lambda out: M.read_priming(str(out))["loss_by_step"]  # the loss of every step survives the kill
    assert len(curve(tmp_path / "whole")) == 60 and curve(tmp_path / "killed") == curve(tmp_path / "whole")


@pytest.mark.slow  # starts processes
def test_a_killed_finetune_keeps_every_finished_run_and_redoes_the_killed_one(tiny, tmp_path):
    out = tmp_path / "r"
    args = ["finetune", "--method", "adapter", "--lang", "hi", "--seed", "1", "2", "--epochs", "40",
            "--model", tiny["model"], "--data-dir", tiny["data"], "--out", str(out)]
    results = out / "results.jsonl"  # append_result creates it empty, then writes the line: wait for the line
    start_and_kill(args, lambda: results.exists() and results.read_bytes().endswith(b"\n"))
    assert [r["seed"] for r in report.read_results(str(out))] == [1]  # seed 1 whole, seed 2 not half-written
    assert run_kyg(*args).returncode == 0
    assert [r["seed"] for r in report.read_results(str(out))] == [1, 2]


@pytest.mark.slow  # starts processes
def test_workers_on_one_command_divide_its_runs_and_record_each_once(tiny, tmp_path):
    """Two processes on one command of 2 languages × 2 seeds: each claims a run before it starts
    it, so the 4 runs are recorded once each, and both did some of them."""
    args = ["finetune", "--method", "adapter", "--lang", "en", "hi", "--seed", "1", "2", "--epochs", "20",
            "--model", tiny["model"], "--data-dir", tiny["data"], "--no-save", "--out", str(tmp_path)]
    workers = [kyg_process(*args) for _ in range(2)]
    ran = [out.count("dev F1") for out, _ in (w.communicate() for w in workers)]
    assert [w.returncode for w in workers] == [0, 0]
    assert sorted((r["lang"], r["seed"]) for r in report.read_results(str(tmp_path))) == \
        [("en", 1), ("en", 2), ("hi", 1), ("hi", 2)]
    assert sum(ran) == 4 and min(ran) >= 1, ran


@pytest.mark.slow  # starts processes
def test_a_run_whose_worker_was_killed_is_redone_by_the_other_worker(tiny, tmp_path):
    """kill -9 frees a worker's claim: the other worker redoes its run and finishes every run."""
    args = ["finetune", "--method", "adapter", "--lang", "en", "hi", "--seed", "1", "2", "--epochs", "40",
            "--model", tiny["model"], "--data-dir", tiny["data"], "--no-save", "--out", str(tmp_path)]
    killed, survivor = kyg_process(*args), kyg_process(*args)
    while not (tmp_path / "results.jsonl").exists() and killed.poll() is None:
        time.sleep(0.01)
    killed.kill()
    assert killed.wait() == -signal.SIGKILL  # killed mid-work, not finished
    assert survivor.wait() == 0
    assert sorted((r["lang"], r["seed"]) for r in report.read_results(str(tmp_path))) == \
        [("en", 1), ("en", 2), ("hi", 1), ("hi", 2)]


@pytest.mark.slow  # starts processes
def test_two_workers_needing_one_priming_prime_it_once(tiny, tmp_path):
    args = ["prime", "--method", "meta", "--steps", "20", "--support-size", "8", "--query-size", "8",
            "--model", tiny["model"], "--data-dir", tiny["data"], "--out", str(tmp_path / "m")]
    outputs = [w.communicate()[0] for w in [kyg_process(*args) for _ in range(2)]]
    assert sorted("kyg: primed (" in out for out in outputs) == [False, True], outputs
    assert any("is primed already" in out for out in outputs)


def test_a_full_disk_is_one_error_line_and_leaves_every_record_whole(tiny, tmp_path, monkeypatch):
    """A write that fails halfway (a full disk, simulated: half the bytes, then ENOSPC) ends in one line
    and leaves no half: results.jsonl keeps its earlier records and nothing more, failed weights leave
    no file (nor a temporary one), and a priming whose primed model cannot be written keeps its state."""
    tune = ["finetune", "--method", "head", "--lang", "hi", "--epochs", "1", "--model", tiny["model"],
            "--data-dir", tiny["data"], "--out", str(tmp_path / "r")]
    kyg.main(tune + ["--no-save"])
    before = (tmp_path / "r" / "results.jsonl").read_bytes()
    real_open = open

    class FullDisk:  # a file that takes half of what is written to it, then has no space left
        def __init__(self, path, mode, **kwargs):
            self.file = real_open(path, mode, **kwargs)

        def __enter__(self):
            return self

        def __exit__(self, *_):
            self.file.close()

        def write(self, text):
            self.file.write(text[:len(text) // 2])
            self.file.flush()
            raise OSError(28, "No space left on device")
    with monkeypatch.context() as patch:
        patch.setattr(report, "open", FullDisk, raising=False)
        with pytest.raises(SystemExit, match=r"^kyg: error: cannot write \S+results.jsonl \(No space left on "
                                             r"device\); free space on its disk or check its permissions"):
            kyg.main(tune + ["--seed", "2", "--no-save"])
    assert (tmp_path / "r" / "results.jsonl").read_bytes() == before

    def half_then_full(tensors, path, metadata=None):
        open(path, "wb").write(b"half a file")
        raise M.SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")
    with monkeypatch.context() as patch:
        patch.setattr(M, "save_file", half_then_full)
        with pytest.raises(SystemExit, match=r"^kyg: error: cannot write \S+\.safetensors \(.*No space left"):
            kyg.main(tune + ["--seed", "3"])
    assert os.listdir(tmp_path / "r" / "weights") == [] and (tmp_path / "r" / "results.jsonl").read_bytes() == before
    prime = tiny_priming(tiny, tmp_path / "m", "--method", "meta", "--steps", "2", "--save-every", "1")
    with monkeypatch.context() as patch:  # the primed model's θa, written last but for priming.json
        real_save = M.save_file
        patch.setattr(M, "save_file", lambda t, path, metadata=None: half_then_full(t, path) if os.path.basename(
            path).startswith(M.THETA_A) else real_save(t, path, metadata))
        with pytest.raises(SystemExit, match=r"^kyg: error: cannot write \S+m \(.*No space left"):
            kyg.main(prime)
    assert os.listdir(tmp_path / "m") == [M.PRIMING_STATE] and not any(".tmp" in n for n in os.listdir(tmp_path))
    kyg.main(prime)  # space again: it resumes from its state and finishes
    assert (tmp_path / "m" / M.PRIMING_RECORD).exists()


def test_what_kyg_writes_is_as_readable_as_the_users_umask_says(tiny, tmp_path, monkeypatch):
    umask = 0o027  # neither 0600 (what safetensors writes) nor 0644 (the usual umask's) is right here
    monkeypatch.setattr(report, "UMASK", umask)
    monkeypatch.setattr(M, "UMASK", umask)
    previous = os.umask(umask)
    try:
        kyg.main(tiny_priming(tiny, tmp_path / "m", "--method", "meta", "--steps", "1"))
        kyg.main(["finetune", "--method", "adapter", "--lang", "hi", "--epochs", "1", "--model", tiny["model"],
                  "--data-dir", tiny["data"], "--init", str(tmp_path / "m"), "--out", str(tmp_path / "r")])
    finally:
        os.umask(previous)
    written = [*(tmp_path / "m").iterdir(), *(tmp_path / "r" / "weights").iterdir(), tmp_path / "r" / "results.jsonl"]
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in written}
    assert set(modes.values()) == {oct(0o640)}, modes


def test_a_priming_killed_while_it_saved_its_state_resumes_and_finishes(tiny, tmp_path, monkeypatch):
    """A kill halfway through a save of the resumable state leaves its temporary file beside the last
    whole state: a rerun resumes from that state, and what it leaves is the primed directory alone."""
    args = tiny_priming(tiny, tmp_path / "m", "--method", "meta", "--steps", "2", "--save-every", "1")
    with monkeypatch.context() as patch:  # stopped after step 1's save
        patch.setattr(M, "save_primed", lambda *_: sys.exit("stopped"))
        with pytest.raises(SystemExit, match="stopped"):
            kyg.main(args)
    (tmp_path / "m" / f"{M.PRIMING_STATE}.tmp12345").write_bytes(b"half a state")
    kyg.main(args)
    primed = sorted(os.listdir(tmp_path / "m"))
    assert M.read_priming(str(tmp_path / "m"))["steps"] == 2 and M.PRIMING_STATE not in primed, primed
    beside = sorted(set(os.listdir(tmp_path)) - {"m", "m.lock"})  # no half-written or spent directory
    assert not [name for name in primed if ".tmp" in name] and not beside, (primed, beside)


def test_a_rerun_with_other_settings_is_refused(tiny, tmp_path):
    args = ["prime", "--method", "meta", "--steps", "2", "--support-size", "8", "--query-size", "8",
            "--model", tiny["model"], "--data-dir", tiny["data"], "--out", str(tmp_path / "m")]
    kyg.main(args)
    kyg.main(args)  # the same settings: skipped
    with pytest.raises(SystemExit, match=r"kyg: error: \S+ was made with --steps 2, not 3; rerun with the same"):
        kyg.main(args + ["--steps", "3"])


def test_a_priming_continues_only_on_the_device_it_ran_on(tiny, tmp_path, monkeypatch):
    """A stopped priming's optimizer and RNG states belong to its device: elsewhere it is refused in
    one line. A finished one is weights, and serves any device."""
    args = ["prime", "--method", "meta", "--steps", "2", "--save-every", "1", "--support-size", "8",
            "--query-size", "8", "--model", tiny["model"], "--data-dir", tiny["data"], "--out", str(tmp_path / "m")]
    with monkeypatch.context() as patch:  # stopped after step 1's save, as by a kill at the end
        patch.setattr(M, "save_primed", lambda *_: sys.exit("stopped"))
        with pytest.raises(SystemExit, match="stopped"):
            kyg.main(args)
    assert (tmp_path / "m" / M.PRIMING_STATE).exists()
    elsewhere = lambda args: torch.device("cpu") if args.device == "cpu" else SimpleNamespace(type="cuda")
    monkeypatch.setattr(kyg, "device_of", elsewhere)
    with pytest.raises(SystemExit, match=r"kyg: error: the stopped priming in \S+ was made with --device cpu, "
                                         r"not cuda; rerun"):
        kyg.main(args)
    kyg.main(args + ["--device", "cpu"])  # it finishes where it ran ...
    kyg.main(args)  # ... and, finished, is skipped on another device, not refused
