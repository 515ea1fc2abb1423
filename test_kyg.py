"""Specifications of kyg, on a tiny BERT and tiny data built in a temp dir (offline, seconds).

    python -m pytest -q test_kyg.py

Each test asserts one property of the method or of the tools around it: label alignment,
θp untouched by the inner loop, the first-order meta-gradient, θh = θh¹, the cached trunk,
entity-level F1, clear errors on bad input, and every Table 1 row from the command line.
"""
import copy
import gzip
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

import data as D
import kyg
import meta
import model as M

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    M.write_tiny_model(str(root / "model"), D.TINY_SYLLABLES)
    D.write_tiny_data(str(root / "data"), ["en", "es", "hi"], sizes=(80, 30, 30))
    return {"model": str(root / "model"), "data": str(root / "data"), "root": root}


@pytest.fixture
def tagger(tiny):
    torch.manual_seed(0)
    model, tokenizer = M.load(tiny["model"], ["en", "es"])
    model.eval()  # dropout off: the properties below are exact, not statistical
    return model, tokenizer


def batch_of(tiny, tokenizer, lang, start, size):
    examples = D.encode(D.load_split(lang, "train", tiny["data"]), tokenizer, 64)[start:start + size]
    return D.collate(examples, tokenizer.pad_token_id)


def snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# ----------------------------------------------------------------------------- data

def test_labels_sit_on_the_first_subword_only(tagger):
    _, tokenizer = tagger
    sentence = D.Sentence(["kalomi", "su", "vide"], [D.LABEL_ID["B-PER"], 0, D.LABEL_ID["B-LOC"]])
    [ex] = D.encode([sentence], tokenizer, 64)
    pieces = tokenizer.convert_ids_to_tokens(ex.input_ids)
    assert pieces == ["[CLS]", "ka", "##lo", "##mi", "su", "vi", "##de", "[SEP]"]
    assert ex.labels == [-100, D.LABEL_ID["B-PER"], -100, -100, 0, D.LABEL_ID["B-LOC"], -100, -100]
    assert ex.word_positions == [1, 4, 5]


def test_truncation_cuts_the_input_but_every_gold_word_is_scored(tagger):
    _, tokenizer = tagger
    words = ["kalo"] * 10 + ["vide"]
    tags = [D.LABEL_ID["B-PER"]] * 10 + [D.LABEL_ID["B-LOC"]]
    [ex] = D.encode([D.Sentence(words, tags)], tokenizer, max_length=8)
    assert len(ex.input_ids) == 8 and ex.tags == tags
    assert ex.word_positions[:3] == [1, 3, 5] and ex.word_positions[3:] == [-1] * 8
    logits = torch.zeros(8, len(D.LABELS))
    logits[:, D.LABEL_ID["B-PER"]] = 1.0
    predicted = D.word_tags(ex, logits)
    assert predicted == ["B-PER"] * 3 + ["O"] * 8  # unseen words are O, never dropped
    gold = [D.LABELS[t] for t in tags]
    assert D.f1([gold], [predicted]) == pytest.approx(100 * 2 * (3 / 3) * (3 / 11) / (1 + 3 / 11))


def test_entity_f1_counts_whole_spans():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "O"]]
    predicted = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "O"]]
    assert D.f1(gold, predicted) == pytest.approx(100 * 2 / 3)  # 2 of 3 right, 2 of 3 found
    assert D.f1([["B-PER", "I-PER"]], [["B-PER", "O"]]) == 0.0  # half a span is no entity


def test_gzipped_and_plain_local_files_read_the_same(tiny, tmp_path):
    shutil.copytree(os.path.join(tiny["data"], "hi"), tmp_path / "hi")
    with open(tmp_path / "hi" / "dev.tsv", "rb") as f, gzip.open(tmp_path / "hi" / "dev.tsv.gz", "wb") as g:
        g.write(f.read())
    os.remove(tmp_path / "hi" / "dev.tsv")
    assert D.load_split("hi", "dev", str(tmp_path)) == D.load_split("hi", "dev", tiny["data"])


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


def test_tasks_are_disjoint_support_and_query_one_per_language(tagger, tiny):
    _, tokenizer = tagger
    examples = {lang: D.encode(D.load_split(lang, "train", tiny["data"]), tokenizer, 64) for lang in ("en", "es")}
    sampler = D.TaskSampler(examples, 8, 4, seed=0)
    tasks = sampler.sample()
    assert [t[0] for t in tasks] == ["en", "es"]
    for lang, support, query in tasks:
        assert len(support) == 8 and len(query) == 4
        assert not {id(e) for e in support} & {id(e) for e in query}
    assert sampler.steps_per_pass() == 80 // 12


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
    with pytest.raises(D.KygError, match=fix):
        D.load_split(lang, "dev", str(tmp_path / "d"))


def test_model_without_tokenizer_raises_one_clear_error(tiny, tmp_path):
    shutil.copytree(tiny["model"], tmp_path / "m")
    for name in os.listdir(tmp_path / "m"):
        if name.startswith(("tokenizer", "vocab", "special")):
            os.remove(tmp_path / "m" / name)
    with pytest.raises(D.KygError, match="has no tokenizer"):
        M.load(str(tmp_path / "m"), ["hi"])


def test_command_line_errors_are_one_line_without_traceback(tiny, tmp_path):
    result = subprocess.run([sys.executable, os.path.join(HERE, "kyg.py"), "finetune", "--method", "adapter",
                             "--lang", "xx", "--model", tiny["model"], "--data-dir", tiny["data"],
                             "--out", str(tmp_path)], capture_output=True, text=True)
    assert result.returncode != 0
    assert result.stderr.strip().splitlines() == ["kyg: error: unknown language 'xx': "
                                                  f"{tiny['data']} has en, es, hi"]


# ----------------------------------------------------------------------------- model

def test_parameter_groups_partition_the_model(tagger):
    model, _ = tagger
    groups = {M.group_of(n) for n, _ in model.named_parameters()}
    assert groups == {"pretrained", "adapter", "head"}
    assert set(M.named_params(model, "head", lang="es")) == {"heads.es.weight", "heads.es.bias"}
    trained, total = M.parameter_count(model, ("adapter", "head"))
    assert trained == sum(p.numel() for n, p in model.named_parameters() if not n.startswith("encoder."))
    assert total == sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------- Algorithm 1

def test_pe_inner_loop_leaves_pretrained_untouched_and_adapts_adapter_and_head(tagger, tiny):
    model, tokenizer = tagger
    before = snapshot(model)
    fast, support_losses = meta.adapt(model, batch_of(tiny, tokenizer, "en", 0, 8), "en", steps=5, lr=0.03)
    assert {M.group_of(n) for n in fast} == {"adapter", "head"}
    assert all(n.startswith(("adapter.", "heads.en.")) for n in fast)
    for name, p in model.named_parameters():  # the model's own tensors, θp above all, bit-identical
        assert torch.equal(p, before[name]), name
    for name, p in fast.items():  # θa^i and θh^i moved
        assert not torch.equal(p, before[name]), name
    assert support_losses.shape == (5,) and support_losses[-1] < support_losses[0]


def test_maml_inner_loop_changes_pretrained_only_in_the_clone(tagger, tiny):
    model, tokenizer = tagger
    before = snapshot(model)
    fast, _ = meta.adapt(model, batch_of(tiny, tokenizer, "en", 0, 8), "en", steps=2, lr=1e-2, variant="maml")
    assert {M.group_of(n) for n in fast} == {"pretrained", "adapter", "head"}
    moved = [n for n, p in fast.items() if M.group_of(n) == "pretrained" and not torch.equal(p, before[n])]
    assert len(moved) > 10  # θp^i is updated by the red line ...
    for name, p in model.named_parameters():  # ... and θp itself is not
        assert torch.equal(p, before[name]), name


def test_cached_trunk_inner_loop_equals_the_line_by_line_loop(tagger, tiny):
    model, tokenizer = tagger
    support = batch_of(tiny, tokenizer, "en", 0, 8)
    cached, cached_losses = meta.adapt(model, support, "en", steps=5, lr=0.03, cache_trunk=True)
    line_by_line, line_losses = meta.adapt(model, support, "en", steps=5, lr=0.03, cache_trunk=False)
    assert cached.keys() == line_by_line.keys()
    for name in cached:
        torch.testing.assert_close(cached[name], line_by_line[name], rtol=0, atol=1e-6)
    torch.testing.assert_close(cached_losses, line_losses, rtol=0, atol=1e-6)


def constant_lr(optimizer):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)


def test_first_order_meta_gradient_is_the_query_gradient_at_the_adapted_parameters(tagger, tiny):
    model, tokenizer = tagger
    support, query = batch_of(tiny, tokenizer, "en", 0, 8), batch_of(tiny, tokenizer, "en", 8, 8)
    alpha = 0.03

    # By hand, on a copy: one SGD step on θa and θh with the support loss, then ∇ of the query
    # loss with respect to θp and the adapted θa.
    hand = copy.deepcopy(model)
    inner = [p for n, p in hand.named_parameters() if n.startswith(("adapter.", "heads.en."))]
    grads = torch.autograd.grad(M.token_loss(hand("en", support["input_ids"], support["attention_mask"]),
                                             support["labels"]), inner)
    with torch.no_grad():
        for p, g in zip(inner, grads):
            p -= alpha * g
    M.token_loss(hand("en", query["input_ids"], query["attention_mask"]), query["labels"]).backward()
    expected = {n: p.grad for n, p in hand.named_parameters() if not n.startswith("heads.")}

    # kyg's meta-step, with plain SGD at learning rate 1 so that the update is minus the gradient.
    before = snapshot(model)
    params = list(M.named_params(model, "pretrained", "adapter").values())
    sgd = torch.optim.SGD(params, lr=1.0)
    meta.meta_step(model, sgd, constant_lr(sgd), [("en", support, query)], inner_steps=1, inner_lr=alpha)
    for name, p in model.named_parameters():
        if name.startswith("heads."):
            continue
        grad = expected[name] if expected[name] is not None else torch.zeros_like(p)
        torch.testing.assert_close(before[name] - p.detach(), grad, rtol=1e-4, atol=1e-6, msg=name)
    assert any(expected[n].abs().sum() > 0 for n in expected if n.startswith("encoder."))


def test_meta_step_sets_each_head_to_its_first_task_adapted_head_and_moves_theta(tagger, tiny):
    model, tokenizer = tagger
    tasks = [("en", batch_of(tiny, tokenizer, "en", 0, 8), batch_of(tiny, tokenizer, "en", 8, 8)),
             ("en", batch_of(tiny, tokenizer, "en", 16, 8), batch_of(tiny, tokenizer, "en", 24, 8)),
             ("es", batch_of(tiny, tokenizer, "es", 0, 8), batch_of(tiny, tokenizer, "es", 8, 8))]
    first_en, _ = meta.adapt(model, tasks[0][1], "en", 5, 0.03)
    second_en, _ = meta.adapt(model, tasks[1][1], "en", 5, 0.03)
    first_es, _ = meta.adapt(model, tasks[2][1], "es", 5, 0.03)
    before = snapshot(model)
    adamw = torch.optim.AdamW(M.named_params(model, "pretrained", "adapter").values(), lr=1e-3)
    meta.meta_step(model, adamw, constant_lr(adamw), tasks, inner_steps=5, inner_lr=0.03)
    for name, p in model.named_parameters():
        if name.startswith("heads.en."):
            torch.testing.assert_close(p.detach(), first_en[name], rtol=0, atol=1e-7)
            assert not torch.allclose(p, second_en[name])
        elif name.startswith("heads.es."):
            torch.testing.assert_close(p.detach(), first_es[name], rtol=0, atol=1e-7)
    moved = {M.group_of(n) for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == {"pretrained", "adapter", "head"}


def test_fine_tuning_priming_updates_every_group(tagger, tiny):
    model, tokenizer = tagger
    before = snapshot(model)
    adamw = torch.optim.AdamW(model.parameters(), lr=1e-3)
    tasks = [("en", batch_of(tiny, tokenizer, "en", 0, 8), batch_of(tiny, tokenizer, "en", 8, 8))]
    meta.fine_tune_step(model, adamw, constant_lr(adamw), tasks)
    moved = {M.group_of(n) for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert moved == {"pretrained", "adapter", "head"}
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if n.startswith("heads.es."))


def test_meta_priming_lowers_the_query_loss(tagger, tiny):
    model, tokenizer = tagger
    examples = {"en": D.encode(D.load_split("en", "train", tiny["data"]), tokenizer, 64)}
    sampler = D.TaskSampler(examples, 8, 8, seed=0)
    to_device = lambda ex: D.collate(ex, tokenizer.pad_token_id)
    losses, support_curve = meta.prime(model, sampler, to_device, "meta", steps=30, inner_steps=5,
                                       inner_lr=0.03, meta_lr=3e-3)
    assert sum(losses[-5:]) < 0.8 * sum(losses[:5])
    assert support_curve.shape == (5,) and support_curve[-1] < support_curve[0]  # the inner loop learns


# ----------------------------------------------------------------------------- command line

def test_every_table1_row_runs_from_the_command_line_and_writes_a_result(tiny, tmp_path, capsys):
    common = ["--model", tiny["model"], "--data-dir", tiny["data"], "--max-length", "64"]
    primed = {"meta": [], "ft": [], "maml": [], "meta-S1": ["--inner-steps", "1"]}
    for label, extra in primed.items():
        kyg.main(["prime", "--method", label.split("-")[0], "--source", "en", "es", "--steps", "3",
                  "--support-size", "8", "--query-size", "8", "--out", str(tmp_path / f"{label}.pt"),
                  *extra, *common])
    out = str(tmp_path / "results")
    for row, (priming, method, _) in kyg.PAPER_TABLE1.items():
        init = [] if priming == "none" else ["--init", str(tmp_path / f"{priming}.pt")]
        kyg.main(["finetune", "--method", method, "--lang", "hi", "--epochs", "1", "--out", out, *init, *common])
    results = kyg.read_results(out)
    assert [(r["priming"], r["method"]) for r in results] == [row[:2] for row in kyg.PAPER_TABLE1.values()]
    for r in results:
        assert r["lang"] == "hi" and 0 <= r["test_f1"] <= 100 and r["trainable_params"] > 0
    fractions = {r["method"]: r["trainable_fraction"] for r in results}
    assert fractions["head"] < fractions["adapter"] < fractions["full"] == 1.0
    saved = torch.load(os.path.join(out, "weights", "meta-adapter-hi-s1.pt"), weights_only=True)["state"]
    assert {M.group_of(n) for n in saved} == {"adapter", "head"}  # only what adapter tuning changed

    kyg.main(["finetune", "--method", "head", "--lang", "hi", "--epochs", "1", "--out", out, *common])
    assert len(kyg.read_results(out)) == 7 and "skipped" in capsys.readouterr().out  # a rerun skips
    kyg.main(["table", out])
    table = open(os.path.join(out, "table.md"), encoding="utf-8").read()
    assert "| 4/Meta Priming → AT |" in table and "| 4 > 3 |" in table and "/ 81.25" in table


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
            kyg.append_result(str(tmp_path), {"priming": priming, "method": method, "lang": lang,
                                              "seed": seed, "test_f1": score})
    kyg.main(["table", str(tmp_path)])
    rows = {line.split(" | ")[0]: line.rstrip(" |\n").split(" | ")[1:]
            for line in open(tmp_path / "table.md", encoding="utf-8") if line.startswith("| ")}
    assert rows["| 4 > 3"][:2] == ["held (+10.00)", "one seed (+15.00)"]
    assert rows["| 3/AT"][:2] == ["41.00 ± 1.41 (2) / 77.76", "40.00 (1) / 84.1"]  # no spread from one run
    assert rows["| 4 > 5"][0] == "tie (+0.00)"
    assert rows["| 1/Full FT"][-1].startswith("70.50 / 86.73 (1 of 2 languages)")
    assert "languages)" not in rows["| 4/Meta Priming → AT"][-1]
    assert rows["| meta: PE inner loop (Alg. 1)"] == ["72.50 ± 0.71 (2)", "–"]
    assert rows["| meta→full > none→full"] == ["held (+2.00)", "–"]
    assert rows["| maml→full > meta→full"][0] == "tie (+0.50)"


def test_side_by_side_runs_keep_every_result(tmp_path):
    """finetune processes writing into one results folder at once lose none of each other's lines."""
    write = "import kyg, sys\nfor i in range(40): kyg.append_result(sys.argv[1], {'worker': sys.argv[2], 'i': i})"
    workers = [subprocess.Popen([sys.executable, "-c", write, str(tmp_path), str(w)], cwd=HERE) for w in range(4)]
    assert [w.wait() for w in workers] == [0] * 4
    assert sorted((r["worker"], r["i"]) for r in kyg.read_results(str(tmp_path))) == \
        sorted((str(w), i) for w in range(4) for i in range(40))


def test_a_primed_checkpoint_loads_its_pretrained_and_adapter_weights(tiny, tmp_path):
    kyg.main(["prime", "--method", "meta", "--source", "en", "--steps", "2", "--support-size", "8",
              "--query-size", "8", "--meta-lr", "1e-2", "--model", tiny["model"], "--data-dir", tiny["data"],
              "--out", str(tmp_path / "m.pt")])
    checkpoint = torch.load(tmp_path / "m.pt", weights_only=True)
    fresh, _ = M.load(tiny["model"], ["hi"])
    plain = snapshot(fresh)
    assert M.load_primed(fresh, str(tmp_path / "m.pt"))["method"] == "meta"
    for name, value in checkpoint["pretrained"].items():
        assert torch.equal(fresh.encoder.state_dict()[name], value)
    assert any(not torch.equal(plain["encoder." + n], v) for n, v in checkpoint["pretrained"].items()
               if "encoder." + n in plain)  # priming moved θp, and the fresh model now has the moved θp
    for name, value in checkpoint["adapter"].items():
        assert torch.equal(fresh.adapter.state_dict()[name], value)


def test_live_trunk_is_only_for_a_frozen_trunk(tiny, tmp_path):
    with pytest.raises(SystemExit, match="kyg: error: --live-trunk is for head and adapter tuning"):
        kyg.main(["finetune", "--method", "full", "--live-trunk", "--lang", "hi", "--model", tiny["model"],
                  "--data-dir", tiny["data"], "--out", str(tmp_path)])


def test_benchmark_runs_and_reports_every_ratio():
    import bench
    text = bench.main(["--small", "--repeats", "1", "--batch-size", "4", "--device", "cpu"])
    for line in ("ft step", "meta cached", "maml", "meta cached ÷ (2 × (forward + ft step))",
                 "meta full ÷ meta cached", "maml ÷ meta cached"):
        assert line in text


def test_a_seed_gives_the_same_result_alone_or_after_other_seeds(tiny, tmp_path):
    common = ["finetune", "--method", "adapter", "--lang", "hi", "--epochs", "2",
              "--model", tiny["model"], "--data-dir", tiny["data"], "--no-save"]
    kyg.main(common + ["--seed", "1", "2", "--out", str(tmp_path / "both")])
    kyg.main(common + ["--seed", "2", "--out", str(tmp_path / "alone")])
    after, alone = kyg.read_results(str(tmp_path / "both"))[1], kyg.read_results(str(tmp_path / "alone"))[0]
    assert after["seed"] == alone["seed"] == 2
    assert (after["dev_f1"], after["test_f1"]) == (alone["dev_f1"], alone["test_f1"])


def test_training_on_stored_trunk_features_is_exact_without_dropout(tiny, tmp_path):
    shutil.copytree(tiny["model"], tmp_path / "m")
    config = json.load(open(tmp_path / "m" / "config.json"))
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    json.dump(config, open(tmp_path / "m" / "config.json", "w"))
    common = ["finetune", "--method", "adapter", "--lang", "hi", "--epochs", "2", "--model", str(tmp_path / "m"),
              "--data-dir", tiny["data"], "--out", str(tmp_path / "r")]
    weights = lambda: torch.load(tmp_path / "r" / "weights" / "none-adapter-hi-s1.pt", weights_only=True)["state"]
    kyg.main(common)
    from_stored = weights()
    kyg.main(common + ["--live-trunk"])
    from_live = weights()
    stored, live = kyg.read_results(str(tmp_path / "r"))
    assert stored["config"]["cached_trunk"] and not live["config"]["cached_trunk"]
    assert (stored["dev_f1"], stored["test_f1"]) == (live["dev_f1"], live["test_f1"])
    for name in from_stored:
        torch.testing.assert_close(from_stored[name], from_live[name], rtol=1e-4, atol=1e-6)
