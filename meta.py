"""Priming: Algorithm 1 of the paper, line by line, and the fine-tuning priming it is compared to.

    Algorithm 1 (Gheini, Ma, May), with θ = θp ∪ θa ∪ θh:
     6  while not converged do                                   prime(): one meta-step per batch
     7      sample a batch of tasks 𝒯                            TaskSampler.sample()  (data.py)
     8      for all 𝒯i ∈ 𝒯 do                                    meta_step()
     9          θ^i = θ                                          adapt(): inner_loop_copies()
    10          for s ← 1..S do                                  adapt()
    11              θa^i ← θa^i − α∇L(f_θ^i, 𝒟tr);  θh^i ← θh^i − α∇L(f_θ^i, 𝒟tr)
                    [θp^i ← θp^i − α∇L(f_θ^i, 𝒟tr)]   the red line: MAML only (variant "maml")
    14      θa ← θa − β∇Σ L(f_θ^i, 𝒟ts);  θp ← θp − β∇Σ L(f_θ^i, 𝒟ts)   meta_step(): the Σ from
                   add_meta_gradient(), first order (or second); the step: AdamW, priming_optimizer()
    15      θh = θh^1                                            meta_step()
    17  return θp, θa
§3.2 numbers the lines in its prose otherwise: its inner loop "lines 3-8", line 9 and line 10 are
lines 8-13, 14 and 15 here.

Parameters are dicts of tensors (CS330 style): the inner loop keeps its own copies θ^i of only the
parameters it updates and runs the model with `torch.func.functional_call`, which reads every
other parameter from the model itself. No model is ever deep-copied.

Variants, named as `kyg.py prime --method` names them: "meta" (Algorithm 1, settings 4 and 7)
updates θa and θh in the inner loop, "maml" (setting 6) θp too: the red line. Both are first order
as the paper's (§4.2); "meta" can be exact (`second_order`). θa is the adapter, or LoRA's or
BitFit's (model.py): the loop only asks which parameters are θa. `fine_tune_step()` is setting 5:
multi-task fine-tuning on the same data, optimizer, schedule and number of updates.
"""
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from model import group_of, named_params, token_loss

INNER_GROUPS = {"meta": ("pe", "head"), "maml": ("pretrained", "pe", "head")}


# The exact meta-gradient (`second_order`, "meta" only; the paper's is first order, §4.2) keeps the
# S inner steps in the graph, so that line 14 differentiates through them. Why, with the adapter, that
# costs only one more backward through the trunk per task: docs/details.md, "The exact meta-gradient".

@dataclass(frozen=True)
class InnerLoop:
    """Alg. 1, lines 4-5 and 9-12: the inner loop's settings."""
    variant: str = "meta"       # "meta" (Algorithm 1) or "maml" (with the red line)
    steps: int = 5              # S
    lr: float = 0.03            # α
    second_order: bool = False  # line 14 differentiates through the S steps ("meta" only)
    cache_trunk: bool = True    # "meta": f(x_tr; θp) once per task: exact without dropout; in training one draw, all S


def task_loss(model, params, batch, lang, hidden=None):
    """L(f_θ, batch): the model run with `params` in place of its own tensors of those names."""
    inputs = {"hidden": hidden} if hidden is not None else {k: batch[k] for k in ("input_ids", "attention_mask")}
    return token_loss(torch.func.functional_call(model, params, (lang,), inputs), batch["labels"])


def inner_loop_copies(model, lang, variant):
    """Alg. 1, line 9, θ^i = θ, for what the inner loop updates: θa, the task's θh and, in "maml", θp
    (the red line), each a copy of its own, {name: tensor}. The rest of θ^i is the model's own."""
    # ✂ exercise 4: Alg. 1, line 9: copies that the inner loop can step while θ stays where it is
    return {name: p.detach().clone().requires_grad_()
            for name, p in named_params(model, *INNER_GROUPS[variant], lang=lang).items()}
    # ✂ end


def adapt(model, support, lang, inner):
    """Alg. 1, lines 9-12 for one task: S steps of plain SGD on the support batch. Returns θ^i as
    {name: tensor} of what the inner loop updated (θa, the task's θh, in "maml" θp; the rest of θ^i
    is the model's own), and the support loss before each step, [S] (falling: the loop learns)."""
    fast = inner_loop_copies(model, lang, inner.variant)  # Alg. 1, line 9: θ^i = θ
    if inner.second_order:  # θa^i starts as θa itself, so that the inner steps stay on θa's graph
        fast.update(named_params(model, "pe"))
    hidden, support_losses = None, []
    if inner.cache_trunk and inner.variant == "meta" and model.trunk_is_fixed_by_pretrained:
        with torch.set_grad_enabled(inner.second_order):  # second order: θp reaches the query loss through h
            hidden = model.encode(support["input_ids"], support["attention_mask"])
    # Second order with θa inside f (LoRA, BitFit), line 14 differentiates f's attention twice: only
    # PyTorch's plain attention kernel has a second derivative, its fused ones have none.
    plain_attention = inner.second_order and not model.trunk_is_fixed_by_pretrained
    for _ in range(inner.steps):  # Alg. 1, line 10
        with sdpa_kernel(SDPBackend.MATH) if plain_attention else nullcontext():
            loss = task_loss(model, fast, support, lang, hidden)
        support_losses.append(loss.detach())  # before the step: the first is the loss at θ
        # Alg. 1, line 11 (and, in "maml", the red line): θ^i ← θ^i − α∇L(f_θ^i, 𝒟tr)
        if inner.second_order:
            # ✂ exercise 8: Alg. 1, line 11 for the exact meta-gradient: the step as new tensors on the graph
            grads = torch.autograd.grad(loss, list(fast.values()), create_graph=True)
            fast = {name: p - inner.lr * g for (name, p), g in zip(fast.items(), grads)}
            # ✂ end
        else:
            # ✂ exercise 5: Alg. 1, line 11, first order: a step of SGD on the copies, in place, keeping no graph
            grads = torch.autograd.grad(loss, list(fast.values()))
            with torch.no_grad():
                for p, g in zip(fast.values(), grads):
                    p -= inner.lr * g
            # ✂ end
    return fast, torch.stack(support_losses)


def add_meta_gradient(model, fast, query, lang, inner):
    """Alg. 1, line 14 for one task: the gradient of the query loss at θ^i, L(f_θ^i, 𝒟ts), added
    into the .grad of θp and θa, where line 14's Σ over the tasks accumulates. Returns the loss, 0-d."""
    # ✂ exercise 6: Alg. 1, line 14: the query loss at θ^i, its gradient added into the .grad of θp and θa
    loss = task_loss(model, fast, query, lang)
    loss.backward()
    # First order, the gradient at θ^i stands for the one at θ: θp's lands in θp's .grad by itself
    # in "meta" (θ^i reads the model's own θp), θa's (and in "maml" θp's) lands in the copies and is
    # added from them. Second order, backward() has reached θp and θa through the inner steps.
    if not inner.second_order:
        meta_params = named_params(model, "pretrained", "pe")
        with torch.no_grad():
            for name, p in fast.items():
                if name in meta_params:  # not θh's copy: θh gets no meta-gradient (line 15)
                    target = meta_params[name]
                    target.grad = p.grad.clone() if target.grad is None else target.grad.add_(p.grad)
    return loss.detach()
    # ✂ end


def meta_step(model, optimizer, scheduler, tasks, inner):
    """Alg. 1, lines 8-15, on a sampled batch of tasks [(lang, support, query)]; the optimizer holds
    θp and θa. Returns the query loss summed over the tasks and the support curve averaged, [S]."""
    optimizer.zero_grad(set_to_none=True)
    first_heads, query_losses, support_curves = {}, [], []
    for lang, support, query in tasks:  # Alg. 1, line 8
        fast, support_losses = adapt(model, support, lang, inner)  # Alg. 1, lines 9-12
        query_losses.append(add_meta_gradient(model, fast, query, lang, inner))  # Alg. 1, line 14, task by task
        support_curves.append(support_losses)
        # Alg. 1, line 15 keeps the first task's adapted head; with a head per language, each
        # head keeps the one adapted by that language's first task in this meta-batch.
        # ✂ exercise 7: Alg. 1, line 15: θh = θh^1, each language's adapted head from its first task
        first_heads.setdefault(lang, {n: p.detach() for n, p in fast.items() if group_of(n, model.pe_method) == "head"})
        # ✂ end
        del fast  # before the next task's adapt(): the MAML loop holds one copy of θp at a time
    optimizer.step()  # Alg. 1, line 14: θp, θa ← AdamW step on the summed meta-gradient
    scheduler.step()
    # Alg. 1, line 15: θh = θh^1, set once every task has adapted from θh itself
    model.load_state_dict({name: value for head in first_heads.values() for name, value in head.items()}, strict=False)
    return torch.stack(query_losses).sum().item(), torch.stack(support_curves).mean(0).tolist()


def fine_tune_step(model, optimizer, scheduler, tasks):
    """Setting 5: one multi-task fine-tuning update of θp ∪ θa ∪ θh on the same sentences a
    meta-step sees (each task's support and query together). Returns the summed loss."""
    optimizer.zero_grad(set_to_none=True)
    total = 0.0
    for lang, support, query in tasks:
        for batch in (support, query):
            loss = token_loss(model(lang, batch["input_ids"], batch["attention_mask"]), batch["labels"])
            loss.backward()
            total += loss.item()
    optimizer.step()
    scheduler.step()
    return total


def priming_optimizer(model, meta_lr, steps, head_lr=None):
    """(optimizer, scheduler) of Alg. 1, line 14: AdamW at β over θp ∪ θa (with `head_lr`, setting 5's
    θh too, at that rate), decaying linearly to 0 over `steps` (§4.2)."""
    params = list(named_params(model, "pretrained", "pe").values())
    groups = [{"params": params}] + ([{"params": list(named_params(model, "head").values()), "lr": head_lr}]
                                     if head_lr else [])
    optimizer = torch.optim.AdamW(groups, lr=meta_lr, fused=params[0].is_cuda)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)


def prime(model, task_batches, optimizer, scheduler, inner=None):
    """Alg. 1, line 6: a meta-step (without `inner`, a step of setting 5) on each batch of tasks the
    caller samples (line 7). Yields each step's query (or training) loss and support curve (or None)."""
    model.train()
    for tasks in task_batches:
        yield (fine_tune_step(model, optimizer, scheduler, tasks), None) if inner is None else \
            meta_step(model, optimizer, scheduler, tasks, inner)
