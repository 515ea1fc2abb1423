"""Priming: Algorithm 1 of the paper, line by line, and the fine-tuning priming it is compared to.

    Algorithm 1 (Gheini, Ma, May), with θ = θp ∪ θa ∪ θh:
     6  while not converged do                                   prime(): `steps` meta-steps
     7      sample a batch of tasks 𝒯                            TaskSampler.sample()  (data.py)
     8      for all 𝒯i ∈ 𝒯 do                                    meta_step()
     9          θ^i = θ                                          adapt()
    10          for s ← 1..S do                                  adapt()
    11              θa^i ← θa^i − α∇L(f_θ^i, 𝒟tr);  θh^i ← θh^i − α∇L(f_θ^i, 𝒟tr)
                    [θp^i ← θp^i − α∇L(f_θ^i, 𝒟tr)]   the red line: MAML only ("maml")
    14      θa ← θa − β∇Σ L(f_θ^i, 𝒟ts);  θp ← θp − β∇Σ L(f_θ^i, 𝒟ts)   meta_step(), first-order, AdamW
    15      θh = θh^1                                            meta_step()
    17  return θp, θa

Parameters are dicts of tensors (CS330 style): the inner loop keeps its own copies θ^i of only the
parameters it updates and runs the model with `torch.func.functional_call`, which reads every
other parameter from the model itself. No model is ever deep-copied.

First-order (§4.2): the meta-gradient is the gradient of the query loss at the adapted
parameters θ^i, used as the gradient at θ. So the inner steps are never differentiated through:
each update is detached, and the query loss backpropagates into the θ^i tensors (for θa, and for
θp in "maml") or, where θ^i is θ itself (θp in "pe"), straight into the model's own .grad.

Variants: "pe" (the paper's, settings 4 and 7) updates θa and θh in the inner loop; "maml"
(setting 6) also runs the red line. `fine_tune_step()` is setting 5, priming by plain multi-task
fine-tuning on the same data with the same optimizer, schedule and number of updates.
"""
import torch
from torch.func import functional_call

from model import group_of, named_params, token_loss

INNER_GROUPS = {"pe": ("adapter", "head"), "maml": ("pretrained", "adapter", "head")}


def task_loss(model, params, batch, lang, hidden=None):
    """L(f_θ, batch): the model run with `params` in place of its own tensors of those names."""
    inputs = {"hidden": hidden} if hidden is not None else {
        "input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    logits = functional_call(model, params, (lang,), inputs)
    return token_loss(logits, batch["labels"])


def adapt(model, support, lang, steps, lr, variant="pe", cache_trunk=True):
    """Alg. 1, lines 9-12 for one task: S steps of plain SGD on the support batch.

    Returns θ^i as {name: tensor} for the parameters the inner loop updated (θa, the task's θh,
    and in "maml" θp; every other parameter of θ^i is the model's own, untouched), and the
    support loss before each of the S steps, [S] (it falls when the inner loop learns).

    With `cache_trunk` ("pe" only), f(x; θp) is computed once instead of at every step. This is
    exact: the "pe" inner loop never changes θp, so the encoder's output on the support batch is
    the same at every step, and the gradients for θa and θh never flow into the encoder. (With
    dropout on, the cached path draws one dropout mask in the encoder for all S steps, the
    line-by-line path a fresh one each step: the same distribution, different samples.)
    """
    inner_names = named_params(model, *INNER_GROUPS[variant], lang=lang)
    # Alg. 1, line 9: θ^i = θ. Only what the inner loop changes needs a copy of its own.
    fast = {name: p.detach().clone().requires_grad_() for name, p in inner_names.items()}
    hidden, support_losses = None, []
    if cache_trunk and variant == "pe":
        with torch.no_grad():
            hidden = model.encode(support["input_ids"], support["attention_mask"])
    for _ in range(steps):  # Alg. 1, line 10
        loss = task_loss(model, fast, support, lang, hidden)
        grads = torch.autograd.grad(loss, list(fast.values()))
        support_losses.append(loss.detach())
        # Alg. 1, line 11 (and, in "maml", the red line): θ^i ← θ^i − α∇L(f_θ^i, 𝒟tr).
        # In place and outside autograd: first-order, so no graph is kept through the inner loop.
        with torch.no_grad():
            for p, g in zip(fast.values(), grads):
                p -= lr * g
    return fast, torch.stack(support_losses)


def meta_step(model, optimizer, scheduler, tasks, inner_steps, inner_lr, variant="pe", cache_trunk=True):
    """One pass of the while loop, Alg. 1 lines 8-15, over an already sampled batch of tasks
    (line 7): [(lang, support batch, query batch)]. The optimizer holds θp and θa (AdamW, β).
    Returns the query loss summed over the tasks, and the support loss before each inner step
    averaged over them, [S]."""
    optimizer.zero_grad(set_to_none=True)
    meta_params = named_params(model, "pretrained", "adapter")
    first_heads = {}
    query_total, support_curve = 0.0, 0.0
    for lang, support, query in tasks:  # Alg. 1, line 8
        fast, support_losses = adapt(model, support, lang, inner_steps, inner_lr, variant, cache_trunk)  # 9-12
        # Alg. 1, line 14, first-order: ∇ of L(f_θ^i, 𝒟ts) at θ^i stands for the gradient at θ.
        # backward() accumulates the sum over tasks: into .grad of θp directly where θ^i shares
        # the model's tensor ("pe"), and into the θ^i copies otherwise, collected just below.
        loss = task_loss(model, fast, query, lang)
        loss.backward()
        query_total += loss.detach()
        support_curve += support_losses / len(tasks)
        with torch.no_grad():
            for name, p in fast.items():
                if group_of(name) == "head":
                    continue  # θh gets no meta-gradient
                target = meta_params[name]
                target.grad = p.grad.clone() if target.grad is None else target.grad.add_(p.grad)
        # Alg. 1, line 15 keeps the first task's adapted head; with a head per language, each
        # head keeps the one adapted by that language's first task in this meta-batch.
        first_heads.setdefault(lang, {n: p.detach() for n, p in fast.items() if group_of(n) == "head"})
        del fast, loss  # before the next task's adapt(): the MAML loop holds one copy of θp at a time
    optimizer.step()  # Alg. 1, line 14: θp, θa ← AdamW step on the summed meta-gradient
    scheduler.step()
    with torch.no_grad():  # Alg. 1, line 15: θh = θh^1
        for head in first_heads.values():
            for name, value in head.items():
                model.get_parameter(name).copy_(value)
    return query_total.item(), support_curve.cpu()


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


def prime(model, sampler, to_device, method, steps, inner_steps, inner_lr, meta_lr):
    """Alg. 1, line 6 ("while not converged"): `steps` meta-steps, or for method "ft" as many
    fine-tuning updates, with AdamW at `meta_lr` (β) decaying linearly to 0. Returns the losses.

    method: "meta" (Algorithm 1), "maml" (Algorithm 1 with the red line), "ft" (setting 5).
    `to_device` turns a list of Examples into a batch of tensors on the model's device.
    Returns the query loss of every step (for "ft", the training loss), and the support loss
    before each inner step averaged over all meta-steps, [S] (None for "ft")."""
    from tqdm import tqdm
    trained = ("pretrained", "adapter", "head") if method == "ft" else ("pretrained", "adapter")
    params = list(named_params(model, *trained).values())
    optimizer = torch.optim.AdamW(params, lr=meta_lr, fused=params[0].is_cuda)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    model.train()
    losses, support_curves = [], []
    progress = tqdm(range(steps), desc=f"prime {method}", unit="step")
    for _ in progress:
        tasks = [(lang, to_device(support), to_device(query))
                 for lang, support, query in sampler.sample()]  # Alg. 1, line 7
        if method == "ft":
            loss = fine_tune_step(model, optimizer, scheduler, tasks)
        else:
            loss, curve = meta_step(model, optimizer, scheduler, tasks, inner_steps, inner_lr,
                                    variant="maml" if method == "maml" else "pe")
            support_curves.append(curve)
        losses.append(loss)
        progress.set_postfix(loss=f"{loss:.3f}")
    return losses, torch.stack(support_curves).mean(0) if support_curves else None
