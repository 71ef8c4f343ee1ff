"""DeepSpeed ZeRO 1/2/3 behind the engine interface, with the trainer's parameter classes intact.

DeepSpeed partitions optimizer state (stage 1), gradients (2) and parameters (3) as flat fp32 shards per parameter
group. We hand it our own client optimizer, ``ShardedAdamWMuon``, built from the trainer's groups (one per
parameter class), so every class keeps its learning rate and weight decay, and we keep the two things DeepSpeed's
own machinery would change:

- clipping: DeepSpeed's ``gradient_clipping`` is off. The engine takes each group's norm from DeepSpeed's reduced
  gradient partitions and ``optim.clipped_norm``, as every engine, makes the clipped global norm from them
  (multipliers left out unless ``train.clip_multipliers``), and the optimizer scales
  those classes' gradients before its update - so Muon sees a clipped gradient and its orthogonalized update is
  never shrunk afterwards.
- Muon: only the ``matrix`` class uses it. Momentum and direction are elementwise, so each rank updates them on its
  own shard; the Newton-Schulz work is shared as in ``optim.Muon`` under DDP (``share_of_matrices``,
  ``exchange_updates``): each matrix's direction is reduced onto the one rank that orthogonalizes it, and each chunk of
  at most world-size updates is all-gathered, from which every rank keeps its shard. No rank ever holds more than one
  chunk of whole matrices.
- Finiteness: the engine decides it on the device (``step_is_finite``) and the client skips the update there
  (``apply``); DeepSpeed's own gradient-norm and overflow checks, which read the norm on the host, are off for ZeRO-1/2.

Checkpoints are sharded: each rank writes the pieces of the optimizer state (and under ZeRO-3 or with bf16 parameters,
of the float32 weights) its shards hold, named by parameter and flat offset (``model_shards``/``optimizer_shards``);
a load puts the full named states back together and cuts them into this run's shards, so a run resumes on another
world size or engine.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

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
    is_clipped,
    muon_direction_,
    ns_dtype,
    orthogonalize,
)
from lrm_train.optim.muon import exchange_updates, share_of_matrices


@dataclass
class ShardLayout:
    """Where each parameter of one flat shard lives, so full tensors can be gathered and cut back into shards.

    ``contiguous`` (ZeRO 1/2): the group is one flat vector of the parameters in order, cut into equal slices.
    Otherwise (ZeRO-3): each parameter is cut into equal slices on its own and a shard holds this rank's slice of each.
    """

    params: list[nn.Parameter]
    shapes: list[torch.Size]
    shard_sizes: list[int]  # this rank's elements of each parameter in the shard (ZeRO-3)
    contiguous: bool
    world: int
    rank: int

    def pieces(self, shard_numel: int) -> list[tuple[slice, slice]]:
        """Per parameter, the elements of it this rank's shard holds: (where in the shard, where in the flattened
        parameter); empty slices where it holds none."""
        out = []
        if self.contiguous:
            start, end = self.rank * shard_numel, (self.rank + 1) * shard_numel
            offset = 0
            for shape in self.shapes:
                low, high = max(offset, start), min(offset + shape.numel(), end)
                high = max(low, high)
                out.append((slice(low - start, high - start), slice(low - offset, high - offset)))
                offset += shape.numel()
            return out
        local = 0
        for shape, size in zip(self.shapes, self.shard_sizes):
            low, high = self.rank * size, min((self.rank + 1) * size, shape.numel())
            high = max(low, high)
            out.append((slice(local, local + high - low), slice(low, high)))
            local += size
        return out

    def owned_pieces(self, shard: torch.Tensor, names: list[str]) -> list[TensorPiece]:
        """This rank's elements of each parameter in ``shard`` (or in a tensor laid out like it), named ``names``:
        nothing is communicated, and the ranks' pieces together cover every parameter once (padding left out)."""
        out = []
        for name, shape, (local, place) in zip(names, self.shapes, self.pieces(shard.numel())):
            if place.stop > place.start:
                out.append(TensorPiece(name, tuple(shape), place.start, shard[local]))
        return out

    def gather_to(self, shard: torch.Tensor, index: int, piece: tuple[slice, slice], owner: int):
        """Parameter ``index`` whole on rank ``owner`` from every rank's piece of it (collective); None elsewhere."""
        local, place = piece
        flat = shard.new_zeros(self.shapes[index].numel())
        flat[place] = shard[local]
        dist.reduce(flat, dst=owner)  # the pieces do not overlap: their sum is the parameter, exactly
        return flat.view(self.shapes[index]) if self.rank == owner else None

    def gather(self, shard: torch.Tensor) -> list[torch.Tensor]:
        """Full tensors of every parameter from each rank's ``shard`` (collective)."""
        pieces = [torch.empty_like(shard) for _ in range(self.world)]
        dist.all_gather(pieces, shard.contiguous())
        full = []
        if self.contiguous:
            flat, offset = torch.cat(pieces), 0
            for shape in self.shapes:
                full.append(flat[offset : offset + shape.numel()].view(shape).clone())
                offset += shape.numel()
            return full
        offset = 0
        for shape, size in zip(self.shapes, self.shard_sizes):
            flat = torch.cat([piece[offset : offset + size] for piece in pieces])
            full.append(flat[: shape.numel()].view(shape).clone())
            offset += size
        return full

    def shard(self, full: list[torch.Tensor], like: torch.Tensor) -> torch.Tensor:
        """This rank's shard of the full tensors (the inverse of ``gather``)."""
        if self.contiguous:
            flat = torch.cat([t.reshape(-1) for t in full])
            size = like.numel()
            flat = torch.nn.functional.pad(flat, (0, size * self.world - flat.numel()))
            return flat[self.rank * size : (self.rank + 1) * size].to(like)
        pieces = []
        for tensor, size in zip(full, self.shard_sizes):
            flat = torch.nn.functional.pad(tensor.reshape(-1), (0, size * self.world - tensor.numel()))
            pieces.append(flat[self.rank * size : (self.rank + 1) * size])
        return torch.cat(pieces).to(like)


class ShardedAdamWMuon(torch.optim.Optimizer):
    """The client optimizer DeepSpeed wraps: AdamW on any shard, Muon on matrix shards through their layout.

    Groups are the trainer's (one per parameter class, with its lr, weight decay and optimizer settings).
    Set by the engine before each step: ``group["grad_scale"]`` (a 0-d tensor, or None for the unclipped classes) and
    ``apply`` (a 0-d bool tensor: False skips the update on the device).
    """

    def __init__(self, groups: list[dict]) -> None:
        super().__init__(groups, {})
        self.layouts: dict[int, ShardLayout] = {}  # id(shard) -> layout, for the Muon groups
        self.apply: torch.Tensor | None = None

    @torch.no_grad()
    def step(self, closure=None):
        # DeepSpeed's ZeRO-1/2 steps one group at a time (``param_groups`` swapped for a one-group list), so each group
        # carries its own scale.
        for group in self.param_groups:
            for shard in group["params"]:
                if shard.grad is None:
                    continue
                grad = shard.grad if group["grad_scale"] is None else shard.grad.mul_(group["grad_scale"])
                if group["use_muon"]:
                    self._muon(shard, grad, group)
                else:
                    adamw_update_(
                        [shard],
                        [grad],
                        [self.state[shard]],
                        group["lr"],
                        group["weight_decay"],
                        group["betas"],
                        group["eps"],
                        self.apply,
                        fused=shard.device.type == "cuda",  # as optim.AdamW's default
                    )

    def _muon(self, shard: torch.Tensor, grad: torch.Tensor, group: dict) -> None:
        """Muon on the matrices of this shard, the Newton-Schulz work shared across ranks as ``optim.Muon`` does."""
        layout = self.layouts[id(shard)]
        direction = muon_direction_(grad, self.state[shard], group["momentum"], group["nesterov"], self.apply)
        pieces = layout.pieces(shard.numel())
        dtype = ns_dtype(group["ns_dtype"], shard.device)
        update = torch.zeros_like(shard)
        for shape, chunk in share_of_matrices(layout.shapes, layout.world):
            whole = [layout.gather_to(direction, index, pieces[index], owner) for owner, index in enumerate(chunk)]
            mine = None
            if layout.rank < len(chunk):
                orthogonal = orthogonalize(whole[layout.rank], group["ns_steps"], dtype, group["eps"])
                mine = orthogonal * adjusted_lr(1.0, shape, group["adjust_lr"])  # the shape's LR factor
            for index, full in zip(chunk, exchange_updates(mine, shape, layout.world, shard.device)):
                local, place = pieces[index]
                update[local] = full.reshape(-1)[place]
        decoupled_step_(shard, update, group["lr"], group["weight_decay"], group["lr"], self.apply)


def deepspeed_config(stage: int, cfg: DistConfig, autocast: torch.dtype | None) -> dict:
    """The DeepSpeed config of a ZeRO engine: DeepSpeed shards and reduces; batching, clipping, the norms, finiteness
    and the precision stay the trainer's."""
    return {
        # The trainer splits batches and accumulates micro-batches itself (``accumulating``), so DeepSpeed's own
        # batch bookkeeping stays at 1 x 1; its clipping is off because ``optimizer_step`` clips per class.
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 0.0,
        "zero_allow_untested_optimizer": True,
        "zero_optimization": {
            "stage": stage,
            "stage3_param_persistence_threshold": cfg.zero3_persistence_threshold,
            # ZeRO-3 cuts each parameter group into sub-groups of at most this many elements; larger than any
            # model, it keeps one fp32 shard per group, so a shard never mixes classes and each has one layout.
            "sub_group_size": 1_000_000_000_000,
            # ``optimizer_step`` takes the norms itself, on the device; DeepSpeed's would be read on the host
            # (ZeRO-3 cannot turn it off).
            **({"compute_grad_norm": False} if stage < 3 else {}),
        },
        # bf16 parameters: DeepSpeed keeps the float32 masters in the shards our client updates; its overflow
        # check (a host sync) is off, ``optimizer_step`` decides finiteness on the device.
        "bf16": {"enabled": cfg.bf16_params, "check_grad_overflow": False},
        # The trainer's autocast, kept inside DeepSpeed's forward: without this section that forward switches off
        # an autocast it finds on (it asks CUDA's, so only on GPUs: ZeRO trained in float32 on an H200 under
        # bf16 precision). No module is named lower-precision-safe: the default list would reduce the gradients
        # of nn.Linear layers in bf16.
        **(
            {"torch_autocast": {"enabled": True, "dtype": str(autocast), "lower_precision_safe_modules": []}}
            if autocast is not None
            else {}
        ),
        "steps_per_print": 1 << 30,  # never: the trainer logs
        "wall_clock_breakdown": False,
    }


class ZeroEngine(Engine):
    """DeepSpeed ZeRO (stage from ``dist.name``) under torchrun or the deepspeed launcher."""

    def __init__(self, cfg: DistConfig) -> None:
        import deepspeed
        import deepspeed.ops

        # The shared-memory all-reduce op is only used for inference and would be compiled on first use.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
        super().__init__(cfg, *launched_process_group(cfg))
        self.stage = cfg.name.zero_stage
        self.ds = None

    def setup(
        self,
        model: nn.Module,
        optimizer,
        classes: dict[str, ParamClass],
        clip_multipliers: bool = False,
        autocast: torch.dtype | None = None,
    ):
        import deepspeed
        from deepspeed.utils import set_z3_leaf_modules

        super().setup(model, optimizer, classes, clip_multipliers, autocast)  # DeepSpeed, below, wraps the model
        groups = [{k: v for k, v in g.items()} for g in optimizer.param_groups]
        order = [g["name"] for g in groups]  # DeepSpeed must keep every group, in this order
        client = ShardedAdamWMuon(groups)
        if self.stage == 3:
            set_z3_leaf_modules(model, model.zero3_leaf_modules())
        config = deepspeed_config(self.stage, self.cfg, autocast)
        with _quiet_deepspeed():
            self.ds, ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=client, config=config)
        self.model = self.ds
        self.client = client
        self.ds_optimizer = ds_optimizer
        self._verify_and_map(order)
        return client

    # Parameter classes survive the engine: check what DeepSpeed really holds, and index the shards.

    def _group_params(self) -> list[list[nn.Parameter]]:
        """Per client group, the model parameters DeepSpeed put in its shard(s)."""
        opt = self.ds_optimizer
        if self.stage < 3:
            return [list(group) for group in opt.round_robin_bit16_groups]
        per_group: list[list[nn.Parameter]] = [[] for _ in self.client.param_groups]
        for sub_group, params in enumerate(opt.fp16_groups):
            per_group[opt.sub_group_to_group_id[sub_group]].extend(params)
        return per_group

    def shards(self) -> list[tuple[int, torch.Tensor, ShardLayout]]:
        """(client group index, fp32 shard, layout) for every shard this rank holds."""
        opt = self.ds_optimizer
        if self.stage < 3:
            out = []
            for i, group in enumerate(opt.round_robin_bit16_groups):
                shapes = [p.shape for p in group]
                layout = ShardLayout(list(group), shapes, [], True, self.world_size, self.rank)
                out.append((i, opt.single_partition_of_fp32_groups[i], layout))
            return out
        out = []
        for sub_group, params in enumerate(opt.fp16_groups):
            shapes = [p.ds_shape for p in params]
            sizes = [p.ds_tensor.ds_numel for p in params]
            layout = ShardLayout(list(params), shapes, sizes, False, self.world_size, self.rank)
            out.append((opt.sub_group_to_group_id[sub_group], opt.fp32_partitioned_groups_flat[sub_group], layout))
        return out

    def _verify_and_map(self, order: list[str]) -> None:
        for index, params in enumerate(self._group_params()):
            group = self.client.param_groups[index]
            held = {self.names[id(p)] for p in params}
            expected = set(group["names"])
            if held != expected:
                raise ValueError(
                    f"dist={self.cfg.name}: DeepSpeed regrouped the parameters (group {group['name']!r} holds "
                    f"{len(held)} of its {len(expected)} parameters); per-group LR/WD would be lost"
                )
            if group["use_muon"] and group["param_class"] != ParamClass.MATRIX.value:
                raise ValueError(f"dist={self.cfg.name}: Muon would run on class {group['param_class']!r}")
        if order != [g["name"] for g in self.client.param_groups]:
            raise ValueError(f"dist={self.cfg.name}: DeepSpeed reordered the parameter groups")
        self.client.layouts = {id(shard): layout for _, shard, layout in self.shards()}

    def class_rows(self) -> list[dict]:
        """The parameter-group table built from the parameters DeepSpeed holds in each group."""
        rows = []
        for group, params in zip(self.client.param_groups, self._group_params()):
            numel = sum(p.ds_numel if self.stage == 3 else p.numel() for p in params)
            optimizer = "muon" if group["use_muon"] else "adamw"
            rows.append(
                {
                    "group": group["name"],
                    "count": len(params),
                    "numel": numel,
                    "optimizer": optimizer,
                    "lr": group["lr"],
                    "wd": group["weight_decay"],
                }
            )
        return rows

    # Steps.

    def accumulating(self, last: bool):
        self.ds.set_gradient_accumulation_boundary(last)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss, scale_wrt_gas=False)

    def _group_norms(self) -> list[torch.Tensor]:
        """Per client group, the norm of its reduced gradient: this rank's partitions, squared and summed across ranks
        in one all-reduce. Non-finite stays non-finite, and nothing is read on the host."""
        opt = self.ds_optimizer
        if self.stage < 3:
            group_of = list(range(len(opt.bit16_groups)))
        else:
            group_of = [opt.sub_group_to_group_id[sub_group] for sub_group in range(len(opt.fp16_groups))]
        squares = torch.zeros(len(self.client.param_groups), dtype=torch.float32, device=self.device)
        for sub_group, group in enumerate(group_of):
            grads = opt.averaged_gradients[sub_group]
            if grads:
                squares[group] += torch.stack(torch._foreach_norm([g.float() for g in grads])).square().sum()
        dist.all_reduce(squares)
        return list(squares.sqrt())

    def optimizer_step(self, max_norm: float, loss_is_finite: torch.Tensor) -> tuple[GradNorms, torch.Tensor]:
        groups = self.client.param_groups
        classes = [ParamClass(g["param_class"]) for g in groups]
        norms = self._group_norms()
        grad_norms = clipped_norm(zip(classes, norms), self.clip_multipliers, max_norm)
        applied = step_is_finite(loss_is_finite.to(grad_norms.clipped.device), norms)
        for group, cls in zip(groups, classes):
            group["grad_scale"] = grad_norms.scale if is_clipped(cls, self.clip_multipliers) else None
        self.client.apply = applied
        self.ds.step()
        return grad_norms, applied

    # State.

    def parameter_shapes(self) -> dict[str, torch.Size]:
        if self.stage < 3:
            return super().parameter_shapes()
        return {name: p.ds_shape for name, p in self.module.named_parameters()}

    def gathered(self):
        if self.stage < 3:
            return contextlib.nullcontext()
        import deepspeed

        return deepspeed.zero.GatheredParameters(list(self.module.parameters()))

    def model_state(self) -> dict[str, torch.Tensor]:
        """The full named state; with bf16 parameters, the float32 master weights (what the run really holds)."""
        masters = {}
        if self.cfg.bf16_params:
            for _, shard, layout in self.shards():
                for param, full in zip(layout.params, layout.gather(shard.detach())):
                    masters[self.names[id(param)]] = full
        with self.gathered():
            state = {k: masters.get(k, v).detach().clone() for k, v in self.module.state_dict().items()}
        return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}

    def load_model_state(self, state: dict[str, torch.Tensor]) -> None:
        if self.stage < 3:
            self.module.load_state_dict(state)
        else:
            import deepspeed

            with deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=0):
                self.module.load_state_dict(state)
        if not self.cfg.bf16_params:
            self.ds_optimizer._restore_from_bit16_weights()
            return
        # The masters come from the checkpoint, not from the bf16 copies just loaded (that would round them).
        for _, shard, layout in self.shards():
            shard.data.copy_(layout.shard([state[self.names[id(p)]] for p in layout.params], shard))

    def model_shards(self) -> list[TensorPiece]:
        """ZeRO-1/2 replicate the model (rank 0 writes it) unless its float32 masters live only in the shards; then,
        and under ZeRO-3, each rank gives its own slices of the masters and rank 0 the buffers."""
        if self.stage < 3 and not self.cfg.bf16_params:
            return super().model_shards()
        pieces = []
        for _, shard, layout in self.shards():
            pieces += layout.owned_pieces(shard.detach(), [self.names[id(p)] for p in layout.params])
        params = set(self.names.values())
        buffers = {k: v.float() if v.is_floating_point() else v for k, v in self.module.state_dict().items()}
        if self.is_main:
            pieces += whole_pieces({k: v for k, v in buffers.items() if k not in params})
        return pieces

    def optimizer_shards(self) -> list[TensorPiece]:
        """Each rank's slices of the moments it updates; the step counts (the same on every rank) from rank 0."""
        pieces = []
        for _, shard, layout in self.shards():
            names = [self.names[id(p)] for p in layout.params]
            for key, value in self.client.state.get(shard, {}).items():
                if value.ndim > 0:
                    pieces += layout.owned_pieces(value, [optimizer_piece_name(n, key) for n in names])
                elif self.is_main:
                    pieces += [TensorPiece(optimizer_piece_name(n, key), (), 0, value) for n in names]
        return pieces

    def optimizer_state(self) -> dict[str, dict]:
        named: dict[str, dict] = {}
        for index, shard, layout in self.shards():
            for key, value in self.client.state.get(shard, {}).items():
                full = [value] * len(layout.params) if value.ndim == 0 else layout.gather(value)
                for param, tensor in zip(layout.params, full):
                    named.setdefault(self.names[id(param)], {})[key] = tensor.clone()
        return named

    def load_optimizer_state(self, state: dict[str, dict]) -> None:
        for _, shard, layout in self.shards():
            names = [self.names[id(p)] for p in layout.params]
            keys = set(state.get(names[0], {}))
            loaded = {}
            for key in keys:
                tensors = [state[n][key] for n in names]
                loaded[key] = tensors[0].clone() if tensors[0].ndim == 0 else layout.shard(tensors, shard)
            if loaded:
                self.client.state[shard] = loaded


@contextlib.contextmanager
def _quiet_deepspeed():
    """DeepSpeed's setup without the warnings a user cannot act on: "untested optimizer" (the client optimizer is ours,
    and its ZeRO steps are tested equal to one process's) and, from the first step on, torch's deprecation of a
    collective that DeepSpeed itself calls."""
    from deepspeed.utils import logger

    def keep(record: logging.LogRecord) -> bool:
        return "untested optimizer" not in record.getMessage()

    # (all_gather_into_tensor, reduce_scatter_tensor, ... as torch renames its collectives)
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.\w+` is deprecated", category=FutureWarning)
    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)
