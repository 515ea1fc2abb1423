"""Benchmark: what priming costs next to plain fine-tuning, measured as ratios within one run.

    python bench.py                      # mBERT-shaped encoder, random weights, batch 32 (no hub needed)
    python bench.py --small --repeats 3  # a tiny config that runs on a CPU in seconds (the tests use it)
    python bench.py --model DIR --data-dir ../shared/data/wikiann   # another encoder, real sentences
    python bench.py --bf16               # the encoder's forward under bfloat16 autocast (kyg.py --bf16)

Medians of repeats, all in one process on one device, so that ratios hold on a noisy machine: a
fine-tuning step of the whole model (the unit), the encoder's forward, meta-steps (2 tasks, S = 5)
of Algorithm 1 with the trunk once ("cached") or line by line ("full"), of the MAML loop, and of
the exact meta-gradient ("2nd"). Peak memory on CUDA only, each case's own (measure, run).
"""
import argparse
import statistics
import time

import torch
from transformers import AutoConfig, AutoModel, AutoTokenizer, BertConfig

import meta
from data import Example, collate, encode, load_split
from model import Tagger, token_loss

MBERT_SHAPE = dict(vocab_size=119547)  # BERT-base, BertConfig's defaults, with mBERT's vocabulary
SMALL_SHAPE = dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                   intermediate_size=128, max_position_embeddings=128)


def sentences(args, vocab_size, count, rng):
    """[Example] * count: real WikiAnn sentences when --data-dir (and --model) are given, else
    random ids and labels, lengths drawn uniformly from 8 to 48 sub-words."""
    if args.data_dir:
        return encode(load_split("en", "train", args.data_dir, count), AutoTokenizer.from_pretrained(args.model), 128)
    return [Example(torch.randint(5, vocab_size, (n,), generator=rng).tolist(),
                    torch.randint(0, 7, (n,), generator=rng).tolist(), [], [])
            for n in torch.randint(8, 49, (count,), generator=rng).tolist()]


def measure(fn, device, repeats):
    """(median seconds, peak bytes or None) of fn() after one warm-up call."""
    cuda = device.type == "cuda"
    done = torch.cuda.synchronize if cuda else lambda: None  # CUDA runs asynchronously: wait for it
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()  # from before the warm-up: it makes the optimizer's state

    def seconds():
        start = time.perf_counter()
        fn(), done()
        return time.perf_counter() - start
    seconds()  # the warm-up
    return statistics.median(seconds() for _ in range(repeats)), torch.cuda.max_memory_allocated() if cuda else None


def run(args):
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(args.model) if args.model else \
        BertConfig(**(SMALL_SHAPE if args.small else MBERT_SHAPE))
    encoder = AutoModel.from_config(config)  # random weights: speed does not depend on them
    encoder.pooler = None
    model = Tagger(encoder, ["en", "es"], bf16=args.bf16).to(device).train()
    rng = torch.Generator().manual_seed(0)
    pool = sentences(args, model.encoder.config.vocab_size, 4 * args.batch_size, rng)
    batches = [{k: v.to(device) for k, v in collate(pool[i:i + args.batch_size], pad_id=0).items()}
               for i in range(0, len(pool), args.batch_size)]
    tasks = [("en", batches[0], batches[1]), ("es", batches[2], batches[3])]

    everything = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device.type == "cuda")

    def ft_step():
        everything.zero_grad(set_to_none=True)
        token_loss(model("en", batches[0]["input_ids"], batches[0]["attention_mask"]), batches[0]["labels"]).backward()
        everything.step()

    def forward():
        with torch.no_grad():
            model.encode(batches[0]["input_ids"], batches[0]["attention_mask"])

    meta_opt, meta_sched = meta.priming_optimizer(model, 1e-5, steps=float("inf"))  # priming's AdamW, θp ∪ θa; no decay
    step = lambda variant, cache, lr, second_order=False: lambda: meta.meta_step(
        model, meta_opt, meta_sched, tasks, meta.InnerLoop(variant, 5, lr, second_order, cache))
    cases = {"ft step": ft_step, "forward": forward, "meta cached": step("meta", True, 0.03),
             "meta full": step("meta", False, 0.03), "maml": step("maml", False, 1e-4),
             "2nd cached": step("meta", True, 0.03, True), "2nd full": step("meta", False, 0.03, True)}
    t, peak = {}, {}  # each case's median time and its peak memory (CUDA only, else None)
    for name, fn in cases.items():
        t[name], peak[name] = measure(fn, device, args.repeats)
        for optimizer in (everything, meta_opt):  # no case's memory holds another's gradients or AdamW state
            optimizer.zero_grad(set_to_none=True)
            optimizer.state.clear()
    return device, model, t, peak


def report(args, device, model, t, peak):
    n_params = sum(p.numel() for p in model.parameters())
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{torch.get_num_threads()} threads"
    lines = [f"device {device} ({where})",
             f"encoder {'small' if args.small else args.model or 'mBERT-shaped'}, {n_params / 1e6:.1f}M parameters, "
             f"batch {args.batch_size}, {'real' if args.data_dir else 'random'} sentences, median of {args.repeats}, "
             f"encoder forward in {'bf16' if args.bf16 else 'fp32'}",
             ""]
    for name, memory in peak.items():  # each case: its time, and its peak memory where measured (CUDA)
        lines.append(f"{name:12s} {t[name] * 1000:9.1f} ms" + (f"   peak {memory / 2**30:6.2f} GiB" if memory else ""))
    unit = 2 * (t["forward"] + t["ft step"])
    ratios = [("meta cached ÷ (2 × (forward + ft step))", t["meta cached"] / unit, "≤ 1.3"),
              ("meta full ÷ meta cached", t["meta full"] / t["meta cached"], "≥ 2"),
              ("maml ÷ meta cached", t["maml"] / t["meta cached"], None),
              ("2nd cached ÷ meta cached", t["2nd cached"] / t["meta cached"], "≤ 1.6"),
              ("2nd full ÷ 2nd cached", t["2nd full"] / t["2nd cached"], "≥ 2.5")]
    if device.type == "cuda":  # peak memory is measured on CUDA only
        ratios += [("peak memory, meta cached ÷ ft step", peak["meta cached"] / peak["ft step"], "≤ 1.2"),
                   ("peak memory, maml ÷ ft step", peak["maml"] / peak["ft step"], None)]
    lines += [""] + [f"{name:39s} = {value:.2f}" + (f"   (target {target})" if target else "")
                     for name, value, target in ratios]
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", help="a model directory or hub name whose config to use (random weights)")
    p.add_argument("--data-dir", help="real en sentences from this WikiAnn directory (needs --model's tokenizer)")
    p.add_argument("--small", action="store_true", help="a tiny config, for a quick CPU check")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device")
    p.add_argument("--bf16", action="store_true", help="the encoder's forward in bfloat16 autocast, as kyg.py --bf16")
    args = p.parse_args(argv)
    print(text := report(args, *run(args)))
    return text


if __name__ == "__main__":
    main()
