"""FSDP2 (``torch.distributed.fsdp.fully_shard``) behind the engine interface, with the trainer's parameter classes.

Each of the model's ``fsdp_units`` (the embedding, every decoder layer, the LM head) and the root (the final norm)
becomes one FSDP unit: its parameters are DTensors cut by rows (``Shard(0)``) over the ranks, gathered whole just
before the unit's forward and backward and freed after; gradients are reduce-scattered back into row shards. The
gathered copies are in the trainer's compute dtype (bf16 under bf16 autocast, ``train.precision``: by default on CUDA)
and the reductions float32 (``MixedPrecisionPolicy``), the shards float32. ``train.activation_checkpointing`` and
``train.compile`` wrap each layer's forward (``train.build.wrap_layers``) before the layer is sharded - ``fully_shard``
last, as in torchtitan - so FSDP's gathering runs around the checkpointed, compiled forward, whose graphs see whole
parameters.

The optimizer is our own, ``ShardedAdamWMuon``, over the trainer's groups (one per parameter class and role), so every
class keeps its learning rate and weight decay, and it applies the updates every engine shares (``optim``):

- AdamW is elementwise: ``adamw_update_`` on each rank's local rows.
- Muon: the momentum and direction are elementwise too; the Newton-Schulz work is shared as under DDP and ZeRO
  (``share_of_matrices``, ``exchange_updates``): each matrix's direction is gathered by rows onto the one rank that
  orthogonalizes it, each chunk of at most world-size updates is all-gathered, and every rank keeps its rows.
- Clipping and finiteness as every engine: each class's norm from the local gradient shards, squared and summed over
  the ranks in one all-reduce, into ``optim.clipped_norm`` and ``step_is_finite``.

Checkpoints use the trainer's format: full named model and optimizer states, gathered from the shards on save and cut
back into shards on load, so a run resumes on another world size or engine.
"""

from __future__ import annotations

import contextlib
import math

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor, Shard, distribute_tensor, init_device_mesh

from lrm_train.distributed.engine import (
    DistConfig,
    Engine,
    TensorPiece,
    launched_process_group,
    optimizer_piece_name,
    step_is_finite,
    whole_pieces,
)
from lrm_train.optim import (
    GradNorms,
    ParamClass,
    adamw_update_,
    adjusted_lr,
    clipped_norm,
    decoupled_step_,
    muon_direction_,
    ns_dtype,
    orthogonalize,
)
from lrm_train.optim.muon import exchange_updates, share_of_matrices


def rows_of_rank(rows: int, rank: int, world: int) -> slice:
    """The rows of a ``Shard(0)`` tensor that ``rank`` holds: ``torch.chunk``'s split (equal chunks of
    ceil(rows / world), the last ones shorter or empty), which DTensor and FSDP use."""
    per_rank = -(-rows // world)
    start = min(rank * per_rank, rows)
    return slice(start, min(start + per_rank, rows))


class ShardedAdamWMuon(torch.optim.Optimizer):
    """AdamW on the local rows of any DTensor parameter, Muon on matrices with whole-matrix orthogonalization.

    Groups are the trainer's, their parameters the sharded ones; the state holds local tensors (this rank's rows)."""

    def __init__(self, groups: list[dict], rank: int, world: int) -> None:
        super().__init__(groups, {})
        self.rank, self.world = rank, world

    @torch.no_grad()
    def step(self, closure=None, apply: torch.Tensor | None = None):
        """``apply``: a 0-d bool tensor on the device; False skips the step there (no host sync)."""
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            if group["use_muon"]:
                self._muon(params, group, apply)
                continue
            adamw_update_(
                [p.to_local() for p in params],
                [p.grad.to_local() for p in params],
                [self.state[p] for p in params],
                group["lr"],
                group["weight_decay"],
                group["betas"],
                group["eps"],
                apply,
                fused=params[0].device.type == "cuda",  # as optim.AdamW's default
            )

    def _muon(self, params: list[DTensor], group: dict, apply: torch.Tensor | None) -> None:
        directions = [
            muon_direction_(p.grad.to_local(), self.state[p], group["momentum"], group["nesterov"], apply)
            for p in params
        ]
        device = directions[0].device
        dtype = ns_dtype(group["ns_dtype"], device)
        updates: list[torch.Tensor | None] = [None] * len(params)
        for shape, chunk in share_of_matrices([p.shape for p in params], self.world):
            whole = [self._whole_on(owner, directions[i], params[i].shape) for owner, i in enumerate(chunk)]
            mine = None
            if self.rank < len(chunk):
                mine = orthogonalize(whole[self.rank], group["ns_steps"], dtype, group["eps"])
            for i, full in zip(chunk, exchange_updates(mine, shape, self.world, device)):
                updates[i] = full[rows_of_rank(shape[0], self.rank, self.world)]
        for p, update in zip(params, updates):
            step_lr = adjusted_lr(group["lr"], p.shape, group["adjust_lr"])
            decoupled_step_(p.to_local(), update, group["lr"], group["weight_decay"], step_lr, apply)

    def _whole_on(self, owner: int, local: torch.Tensor, shape: torch.Size) -> torch.Tensor | None:
        """The whole matrix on rank ``owner`` from every rank's rows of it (collective); None elsewhere. Each rank
        sends its rows only, padded to the longest share (``gather`` takes equal pieces)."""
        share = -(-shape[0] // self.world)
        padded = local.new_zeros(share, *shape[1:])
        padded[: local.shape[0]] = local
        pieces = [torch.empty_like(padded) for _ in range(self.world)] if self.rank == owner else None
        dist.gather(padded, pieces, dst=owner)
        return torch.cat(pieces)[: shape[0]] if self.rank == owner else None


class FSDPEngine(Engine):
    """FSDP2 under torchrun: parameters, gradients and optimizer state sharded by rows over the ranks."""

    def __init__(self, cfg: DistConfig) -> None:
        super().__init__(cfg, *launched_process_group(cfg))
        self.mesh = init_device_mesh(self.device.type, (self.world_size,))

    def setup(
        self,
        model: nn.Module,
        optimizer,
        classes: dict[str, ParamClass],
        clip_multipliers: bool = False,
        autocast: torch.dtype | None = None,
    ):
        names = {id(p): n for n, p in model.named_parameters()}
        if autocast is not None:
            policy = MixedPrecisionPolicy(param_dtype=autocast, reduce_dtype=torch.float32)
        else:
            policy = MixedPrecisionPolicy()  # float32 throughout, as the trainer asked
        for unit in model.fsdp_units():
            fully_shard(unit, mesh=self.mesh, mp_policy=policy)
        fully_shard(model, mesh=self.mesh, mp_policy=policy)
        # fully_shard replaced every parameter by a DTensor of the same name: the groups take the new ones.
        sharded = dict(model.named_parameters())
        self._check_row_shards(sharded)
        groups = [{**g, "params": [sharded[names[id(p)]] for p in g["params"]]} for g in optimizer.param_groups]
        client = ShardedAdamWMuon(groups, self.rank, self.world_size)
        return super().setup(model, client, classes, clip_multipliers, autocast)

    def _check_row_shards(self, params: dict[str, nn.Parameter]) -> None:
        """Muon and the checkpoints cut full tensors into this rank's rows (``rows_of_rank``): make sure FSDP did the
        same, so a change in torch's layout fails here, not as a silently wrong update."""
        for name, p in params.items():
            rows = rows_of_rank(p.shape[0], self.rank, self.world_size)
            if (
                not isinstance(p, DTensor)
                or p.placements != (Shard(0),)
                or p.to_local().shape[0] != rows.stop - rows.start
            ):
                raise ValueError(f"dist=fsdp: parameter {name} is not sharded by rows as expected")

    # Steps.

    def accumulating(self, last: bool):
        self.model.set_requires_gradient_sync(last)  # reduce-scatter only after the last micro-batch
        return contextlib.nullcontext()

    def optimizer_step(self, max_norm: float, loss_is_finite: torch.Tensor) -> tuple[GradNorms, torch.Tensor]:
        classes = list(self.class_params)
        squares = torch.zeros(len(classes), dtype=torch.float32, device=self.device)
        for i, params in enumerate(self.class_params.values()):
            grads = [p.grad.to_local().float() for p in params if p.grad is not None]
            if grads:
                squares[i] = torch.stack(torch._foreach_norm(grads)).square().sum()
        dist.all_reduce(squares)
        norms = list(squares.sqrt())
        grad_norms = clipped_norm(zip(classes, norms), self.clip_multipliers, max_norm)
        applied = step_is_finite(loss_is_finite.to(self.device), norms)
        if grad_norms.scale is not None:  # a non-finite norm makes the gradients non-finite: the step is skipped then
            torch._foreach_mul_([p.grad.to_local() for p in self.clip_params if p.grad is not None], grad_norms.scale)
        self.optimizer.step(apply=applied)
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norms, applied

    # State.

    @contextlib.contextmanager
    def gathered(self):
        units = [m for m in self.module.modules() if isinstance(m, FSDPModule)]
        for unit in units:
            unit.unshard()
        try:
            yield
        finally:
            for unit in units:
                unit.reshard()

    def _full(self, local: torch.Tensor, like: DTensor) -> torch.Tensor:
        """The full tensor of which ``local`` is this rank's rows, shaped as ``like`` (collective)."""
        return DTensor.from_local(
            local, self.mesh, like.placements, shape=like.shape, stride=like.stride()
        ).full_tensor()

    def _local(self, full: torch.Tensor, like: DTensor) -> torch.Tensor:
        """This rank's rows of ``full``, a copy in ``like``'s dtype (no communication)."""
        return full[rows_of_rank(like.shape[0], self.rank, self.world_size)].to(self.device, like.dtype, copy=True)

    def model_state(self) -> dict[str, torch.Tensor]:
        state = self.module.state_dict()
        return {k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone() for k, v in state.items()}

    def _rows_piece(self, name: str, local: torch.Tensor, shape: torch.Size) -> list[TensorPiece]:
        """This rank's rows of the tensor ``name`` as a sharded checkpoint's piece: rows are contiguous when flattened."""
        rows = rows_of_rank(shape[0], self.rank, self.world_size)
        if rows.start >= rows.stop:  # fewer rows than ranks: this one holds none
            return []
        return [TensorPiece(name, tuple(shape), rows.start * math.prod(shape[1:]), local.detach())]

    def model_shards(self) -> list[TensorPiece]:
        """Each rank its rows of every parameter; rank 0 the buffers (replicated)."""
        pieces = []
        for name, value in self.module.state_dict().items():
            if isinstance(value, DTensor):
                pieces += self._rows_piece(name, value.to_local(), value.shape)
            elif self.is_main:
                pieces += whole_pieces({name: value.detach()})
        return pieces

    def optimizer_shards(self) -> list[TensorPiece]:
        """Each rank its rows of the moments; the step counts (the same on every rank) from rank 0."""
        pieces = []
        for group in self.optimizer.param_groups:
            for p in group["params"]:
                for key, value in self.optimizer.state.get(p, {}).items():
                    name = optimizer_piece_name(self.names[id(p)], key)
                    if value.ndim > 0:
                        pieces += self._rows_piece(name, value, p.shape)
                    elif self.is_main:
                        pieces += whole_pieces({name: value})
        return pieces

    def load_model_state(self, state: dict[str, torch.Tensor]) -> None:
        current = self.module.state_dict()
        sharded = {}
        for key, value in state.items():
            like = current.get(key)
            # A misfit passes through whole, for load_state_dict to name it.
            if isinstance(like, DTensor) and like.shape == value.shape:
                value = distribute_tensor(
                    value.to(self.device, like.dtype), self.mesh, like.placements, src_data_rank=None
                )
            sharded[key] = value
        self.module.load_state_dict(sharded)

    def optimizer_state(self) -> dict[str, dict]:
        named = {}
        for group in self.optimizer.param_groups:  # the same order on every rank: the gathers pair up
            for p in group["params"]:
                if p in self.optimizer.state:
                    state = self.optimizer.state[p]
                    named[self.names[id(p)]] = {
                        k: v.clone() if v.ndim == 0 else self._full(v, p) for k, v in state.items()
                    }
        return named

    def load_optimizer_state(self, state: dict[str, dict]) -> None:
        params = dict(self.module.named_parameters())
        for name, param_state in state.items():
            if name not in params:
                raise ValueError(f"optimizer state for {name!r}, which this model does not have")
            p = params[name]
            self.optimizer.state[p] = {
                k: v.to(self.device, torch.float32, copy=True) if v.ndim == 0 else self._local(v, p)
                for k, v in param_state.items()
            }
