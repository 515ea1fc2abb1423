"""Priming: Algorithm 1 of the paper, line by line, and the fine-tuning priming it is compared to.

    Algorithm 1 (Gheini, Ma, May), with θ = θp ∪ θa ∪ θh:
     6  while not converged do                                   prime(): one meta-step per batch
     7      sample a batch of tasks 𝒯                            TaskSampler.sample()  (data.py)
     8      for all 𝒯i ∈ 𝒯 do                                    meta_step()
     9          θ^i = θ                                          adapt()
    10          for s ← 1..S do                                  adapt()
    11              θa^i ← θa^i − α∇L(f_θ^i, 𝒟tr);  θh^i ← θh^i − α∇L(f_θ^i, 𝒟tr)
                    [θp^i ← θp^i − α∇L(f_θ^i, 𝒟tr)]   the red line: MAML only (variant "maml")
    14      θa ← θa − β∇Σ L(f_θ^i, 𝒟ts);  θp ← θp − β∇Σ L(f_θ^i, 𝒟ts)   meta_step(), first order
                                                       (or second); AdamW: priming_optimizer()
    15      θh = θh^1                                            meta_step()
    17  return θp, θa

Parameters are dicts of tensors (CS330 style): the inner loop keeps its own copies θ^i of only the
parameters it updates and runs the model with `torch.func.functional_call`, which reads every
other parameter from the model itself. No model is ever deep-copied.

Variants, named as `kyg.py prime --method` names them: "meta" (Algorithm 1, settings 4 and 7)
updates θa and θh in the inner loop, "maml" (setting 6) θp too: the red line. Both are first order
as the paper's (§4.2); "meta" can be exact (`second_order`). θa is the adapter, or LoRA's or
BitFit's (model.py): the loop only asks which parameters are θa. `fine_tune_step()` is setting 5:
multi-task fine-tuning on the same data, optimizer, schedule and number of updates.
"""
from dataclasses import dataclass

import torch
from torch.func import functional_call

from model import group_of, named_params, token_loss

INNER_GROUPS = {"meta": ("pe", "head"), "maml": ("pretrained", "pe", "head")}


# The exact meta-gradient (`second_order`, "meta" only; the paper uses first order "as a
# workaround", §4.2) differentiates through the S inner steps. Write h = f(x_tr; θp) for the trunk's
# features of the support batch. The "meta" inner loop only ever sees θp through h:
#     φ_0 = (θa, θh),   φ_{s+1} = φ_s − α ∇_φ L_tr(φ_s; h),   query loss  L_ts(θp, φ_S)
# so φ_S is a function of θa and of h, and by the chain rule
#     dL_ts/dθa = ∂L_ts/∂φ_S · dφ_S/dθa,          dφ_{s+1}/dφ_s = I − α ∇²_φ L      (S small steps back)
#     dL_ts/dθp = ∂L_ts/∂θp  +  ∂L_ts/∂φ_S · dφ_S/dh · ∂h/∂θp                    (query pass + one support pass)
# The Hessians are over adapter and head only, and θp is reached through the support features by
# one backward through the trunk, not S of them. Autograd does all of it when h keeps its graph
# and each inner update is built with create_graph=True: that is the whole change. θh still gets
# no meta-gradient (line 15), so its copy starts detached.

@dataclass(frozen=True)
class InnerLoop:
    """Alg. 1, lines 4-5 and 9-12: the inner loop's settings."""
    variant: str = "meta"       # "meta" (Algorithm 1) or "maml" (with the red line)
    steps: int = 5              # S
    lr: float = 0.03            # α
    second_order: bool = False  # line 14 differentiates through the S steps ("meta" only)
    cache_trunk: bool = True    # "meta": f(x_tr; θp) once per task, which is exact (Tagger.trunk_is_fixed_by_pretrained)


def task_loss(model, params, batch, lang, hidden=None):
    """L(f_θ, batch): the model run with `params` in place of its own tensors of those names."""
    inputs = {"hidden": hidden} if hidden is not None else {k: batch[k] for k in ("input_ids", "attention_mask")}
    return token_loss(functional_call(model, params, (lang,), inputs), batch["labels"])


def adapt(model, support, lang, inner):
    """Alg. 1, lines 9-12 for one task: S steps of plain SGD on the support batch. Returns θ^i as
    {name: tensor} of what the inner loop updated (θa, the task's θh, in "maml" θp; the rest of θ^i
    is the model's own), and the support loss before each step, [S] (falling: the loop learns)."""
    second_order = inner.second_order
    # Alg. 1, line 9: θ^i = θ. Only what the inner loop changes needs a copy of its own; in
    # second order θa^i starts as θa itself, so that the inner steps stay on θa's graph.
    # ✂ exercise 4: Alg. 1, line 9, and the red line: the copies θ^i of what the inner loop updates
    fast = {name: p if second_order and group_of(name, model.pe_method) == "pe" else p.detach().clone().requires_grad_()
            for name, p in named_params(model, *INNER_GROUPS[inner.variant], lang=lang).items()}
    # ✂ end
    hidden, support_losses = None, []
    if inner.cache_trunk and inner.variant == "meta" and model.trunk_is_fixed_by_pretrained:
        with torch.set_grad_enabled(second_order):  # second order: θp reaches the query loss through h
            hidden = model.encode(support["input_ids"], support["attention_mask"])
    for _ in range(inner.steps):  # Alg. 1, line 10
        # ✂ exercise 1: Alg. 1, lines 10-11: a step of SGD on θ^i at the support loss
        loss = task_loss(model, fast, support, lang, hidden)
        grads = torch.autograd.grad(loss, list(fast.values()), create_graph=second_order)
        support_losses.append(loss.detach())
        # Alg. 1, line 11 (and, in "maml", the red line): θ^i ← θ^i − α∇L(f_θ^i, 𝒟tr).
        if not second_order:
            with torch.no_grad():  # first order: in place and outside autograd, no graph kept
                for p, g in zip(fast.values(), grads):
                    p -= inner.lr * g
            continue
        # ✂ end
        # ✂ exercise 5: the exact meta-gradient: line 11 as a new tensor on the graph
        fast = {name: p - inner.lr * g for (name, p), g in zip(fast.items(), grads)}
        # ✂ end
    return fast, torch.stack(support_losses)


def meta_step(model, optimizer, scheduler, tasks, inner):
    """Alg. 1, lines 8-15, on a sampled batch of tasks [(lang, support, query)]; the optimizer holds
    θp and θa. Returns the query loss summed over the tasks and the support curve averaged, [S]."""
    optimizer.zero_grad(set_to_none=True)
    meta_params = named_params(model, "pretrained", "pe")
    first_heads = {}
    query_total, support_curve = 0.0, 0.0
    for lang, support, query in tasks:  # Alg. 1, line 8
        fast, support_losses = adapt(model, support, lang, inner)  # Alg. 1, lines 9-12
        # Alg. 1, line 14. backward() accumulates the sum over tasks into .grad of θp and θa.
        # First order: ∇ of L(f_θ^i, 𝒟ts) at θ^i stands for the gradient at θ; it lands in .grad of
        # θp directly where θ^i shares the model's tensor ("meta"), and in the θ^i copies otherwise,
        # collected just below. Second order: the exact gradient, through the inner steps.
        # ✂ exercise 2: Alg. 1, line 14: the query loss at θ^i, its gradient summed into θp's and θa's .grad
        loss = task_loss(model, fast, query, lang)
        loss.backward()
        query_total += loss.detach()
        support_curve += support_losses / len(tasks)
        with torch.no_grad():
            for name, p in fast.items():
                if group_of(name, model.pe_method) == "head" or inner.second_order:
                    continue  # θh gets no meta-gradient; second order needs no copying
                target = meta_params[name]
                target.grad = p.grad.clone() if target.grad is None else target.grad.add_(p.grad)
        # ✂ end
        # Alg. 1, line 15 keeps the first task's adapted head; with a head per language, each
        # head keeps the one adapted by that language's first task in this meta-batch.
        # ✂ exercise 3: Alg. 1, line 15: θh = θh^1, kept here ...
        first_heads.setdefault(lang, {n: p.detach() for n, p in fast.items() if group_of(n, model.pe_method) == "head"})
        # ✂ end
        del fast, loss  # before the next task's adapt(): the MAML loop holds one copy of θp at a time
    optimizer.step()  # Alg. 1, line 14: θp, θa ← AdamW step on the summed meta-gradient
    scheduler.step()
    with torch.no_grad():  # Alg. 1, line 15: θh = θh^1
        # ✂ exercise 3: ... and put in place here
        for head in first_heads.values():
            for name, value in head.items():
                model.get_parameter(name).copy_(value)
        # ✂ end
    return query_total.item(), support_curve.tolist()


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
