"""AdamW, written once: ``adamw_update_`` is the step that every engine applies, to one tensor or a whole group.

The update is ``torch.optim.AdamW``'s (decoupled weight decay, bias-corrected moments; on the CPU bitwise equal to its
single-tensor path), and the state keeps its keys (``step``, ``exp_avg``, ``exp_avg_sq``), so checkpoints are
interchangeable with it. It is written with ``torch._foreach_*`` ops; on the CPU, where those ops loop over the
tensors anyway, the optimizer calls it tensor by tensor (the same numbers, a smaller working set). On CUDA it runs
``fused``: torch's fused AdamW kernel, one launch per group instead of ~30 passes over the parameters and thousands of
small kernels, and bitwise torch.optim.AdamW(fused=True)'s update. The ZeRO client applies it shard by shard:
elementwise, so a shard of a flat group gets exactly the update of the parameters it holds.

``apply`` (a 0-d bool tensor on the parameters' device) decides on the device whether the step happens: False leaves
parameters and state bitwise unchanged whatever the gradients hold, without the host ever reading the flag.
"""

from __future__ import annotations

import torch
from torch.optim import Optimizer


def adamw_update_(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    states: list[dict],
    lr: float,
    weight_decay: float,
    betas: tuple[float, float],
    eps: float,
    apply: torch.Tensor | None = None,
    fused: bool = False,
) -> None:
    """One AdamW step of each tensor of ``params`` in place; ``states`` (empty at first) hold their moments and step
    counts. ``apply``: see the module docstring (None: always). ``fused``: torch's fused kernel (see above)."""
    if apply is None:
        apply = torch.ones((), dtype=torch.bool, device=params[0].device)
    for param, state in zip(params, states):
        if not state:
            # The step count lives on the device: it counts applied steps, which only the device knows.
            state["step"] = torch.zeros((), dtype=torch.float32, device=param.device)
            state["exp_avg"] = torch.zeros_like(param)
            state["exp_avg_sq"] = torch.zeros_like(param)
    if fused:
        _fused_update_(params, grads, states, lr, weight_decay, betas, eps, apply)
        return
    _update_moments_(params, grads, states, lr * weight_decay, betas, apply)
    _apply_update_(params, states, lr, betas, eps, apply)


def _count_applied_(steps: list[torch.Tensor], apply: torch.Tensor) -> None:
    """Add 1 to each step count where ``apply``, without the host reading it. Without ``alpha``, a 0-d tensor picks
    foreach add's Scalar overload, which reads its value on the host (a sync per step on CUDA, seen on an H200); the
    Tensor overload keeps it on the device, on its one-launch path only when the dtypes match."""
    torch._foreach_add_(steps, apply.to(steps[0].dtype), alpha=1)


def _fused_update_(params, grads, states, lr: float, weight_decay: float, betas, eps: float, apply) -> None:
    """torch's fused AdamW kernel with a skipped step as its ``found_inf`` (GradScaler's mechanism): the kernel then
    leaves parameters and moments untouched, whatever the gradients hold. It does not count steps: we do, applied only."""
    steps = [s["step"] for s in states]
    _count_applied_(steps, apply)
    torch._fused_adamw_(
        params,
        grads,
        [s["exp_avg"] for s in states],
        [s["exp_avg_sq"] for s in states],
        [],
        steps,
        amsgrad=False,
        lr=lr,
        beta1=betas[0],
        beta2=betas[1],
        weight_decay=weight_decay,
        eps=eps,
        maximize=False,
        grad_scale=None,
        found_inf=(~apply).float(),
    )


def _update_moments_(params, grads, states, decay: float, betas: tuple[float, float], apply: torch.Tensor) -> None:
    """Count the step, decay the parameters, update both moments. A skipped step's gradients may be NaN or inf, so
    each operand is replaced by the one that makes its operation a no-op: the first moment itself as its lerp target,
    zero for the second moment, 1 as a factor."""
    beta1, beta2 = betas
    exp_avgs = [s["exp_avg"] for s in states]
    exp_avg_sqs = [s["exp_avg_sq"] for s in states]
    _count_applied_([s["step"] for s in states], apply)
    torch._foreach_mul_(params, torch.where(apply, 1 - decay, 1.0))
    torch._foreach_lerp_(exp_avgs, [torch.where(apply, g, m) for g, m in zip(grads, exp_avgs)], 1 - beta1)
    grads_or_zero = [torch.where(apply, g, 0.0) for g in grads]
    torch._foreach_mul_(exp_avg_sqs, torch.where(apply, beta2, 1.0))
    torch._foreach_addcmul_(exp_avg_sqs, grads_or_zero, grads_or_zero, value=1 - beta2)


def _apply_update_(params, states, lr: float, betas: tuple[float, float], eps: float, apply: torch.Tensor) -> None:
    """``param -= lr / (1 - beta1^t) * exp_avg / (sqrt(exp_avg_sq / (1 - beta2^t)) + eps)``, a zero step if skipped.

    The bias corrections are computed in float64 from the device's step counts, as torch.optim.AdamW computes them on
    the host from its CPU count; a count of 0 (a skipped first step) is clamped so that they stay finite."""
    beta1, beta2 = betas
    steps = torch.stack([s["step"] for s in states]).double().clamp(min=1)
    step_sizes = torch.where(apply, -lr / (1 - beta1**steps), 0.0).float().unbind()
    bias2_sqrts = (1 - beta2**steps).sqrt().float().unbind()
    denoms = torch._foreach_div(torch._foreach_sqrt([s["exp_avg_sq"] for s in states]), bias2_sqrts)
    torch._foreach_add_(denoms, eps)
    # exp_avg * step_size / denom, in addcdiv's order of operations (which takes no tensor as its factor).
    updates = torch._foreach_mul([s["exp_avg"] for s in states], step_sizes)
    torch._foreach_div_(updates, denoms)
    torch._foreach_add_(params, updates)


class AdamW(Optimizer):
    """``adamw_update_`` on every parameter with a gradient, group by group (deterministic: a fixed order).

    ``fused``: torch's fused kernel, one call per group (default on CUDA). ``foreach``: the foreach ops on a whole group
    in one call instead of one call per tensor (the CPU default)."""

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})
        self.foreach, self.fused = foreach, fused

    @torch.no_grad()
    def step(self, closure=None, apply: torch.Tensor | None = None):
        """``apply``: a 0-d bool tensor on the parameters' device; False skips the step on the device."""
        loss = None if closure is None else closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            on_cuda = params[0].device.type == "cuda"
            fused = self.fused if self.fused is not None else on_cuda
            foreach = fused or (self.foreach if self.foreach is not None else on_cuda)
            batches = [params] if foreach else [[p] for p in params]
            for batch in batches:
                adamw_update_(
                    batch,
                    [p.grad for p in batch],
                    [self.state[p] for p in batch],
                    group["lr"],
                    group["weight_decay"],
                    group["betas"],
                    group["eps"],
                    apply,
                    fused,
                )
        return loss
