"""Per-rank memory of a run before it is launched: ``python -m lrm_train.train [overrides] --estimate[=N,...]``.

The model is built on the meta device (shapes only); the optimizer's groups come from ``optim.parameter_groups``, so
each parameter gets the state its optimizer keeps (AdamW: two moments and a step count; Muon: one momentum). For each
engine, ``ENGINES`` says what it cuts into world-size pieces; a new engine is one more entry there.

What is counted, per rank:

- weights: the model's parameters in their dtype (float32, or bf16 under ``dist.bf16_params``; autocast keeps float32
  weights), the float32 master shard DeepSpeed keeps next to them (a copy even of float32 ones), and, where parameters
  are sharded, the largest unit gathered whole at once (a ZeRO-3 block: attention, Mamba, MLP, embedding or LM head).
- gradients: one per parameter, in its dtype; DDP's all-reduce buckets hold a second copy; with bf16 parameters,
  ZeRO's float32 copy of this rank's shard for the master update; DeepSpeed's reduce bucket (2 GB in float32).
- optimizer: the states above, in the parameters' dtype (ZeRO: float32, on the shards).
- activations: what one micro-batch's forward keeps for backward (``layer_activations``: the tensors the eager
  layers of ``models.falcon_h1`` save), plus what the LM head holds while the loss runs (a chunk of logits). With
  ``train.activation_checkpointing`` a layer keeps its input only and one layer's tensors are rebuilt in backward.

The total adds all of these as if they were live at once, which they nearly are at the end of a forward (the
gradients of a step are freed before the next forward, so this over-counts by up to the gradients). Not counted: the
gradients of activations in flight during backward, Newton-Schulz and collective workspaces, the CUDA context and
allocator fragmentation (keep 10-20% of a GPU free), and what ``train.compile`` saves less (this is the eager model).
On CPU the estimate is within 5% of the measured peak of training steps (``scripts/estimate_memory.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lrm_train.models import FalconH1Config, FalconH1LM, KernelBackend
from lrm_train.nn.loss import chunk_tokens
from lrm_train.optim import classify_parameters
from lrm_train.optim.builder import parameter_groups
from lrm_train.train.config import RunConfig

FLOAT32 = 4
BF16 = 2
GiB = 1 << 30


@dataclass(frozen=True)
class Sharding:
    """What an engine cuts into world-size pieces, and the copies it keeps besides."""

    weights: bool = False
    gradients: bool = False
    optimizer: bool = False
    master_weights: bool = False  # a float32 copy of this rank's shard of the weights (and of bf16 gradients)
    gradient_buckets: bool = False  # a second full copy of the gradients, in the all-reduce buckets
    reduce_bucket: bool = False  # DeepSpeed's contiguous reduce bucket, REDUCE_BUCKET_ELEMENTS in the gradients' dtype
    keeps_small_whole: bool = False  # parameters under dist.zero3_persistence_threshold stay whole on every rank
    bf16_params: bool = False  # honours dist.bf16_params (the others keep float32 parameters)


# DeepSpeed's default ``reduce_bucket_size``, which ``distributed.zero`` keeps: one buffer of this many elements per
# rank, whatever the model's size.
REDUCE_BUCKET_ELEMENTS = 500_000_000
_ZERO = dict(optimizer=True, master_weights=True, reduce_bucket=True, bf16_params=True)
ENGINES = {
    "single": Sharding(),
    "ddp": Sharding(gradient_buckets=True),
    "zero1": Sharding(**_ZERO),
    "zero2": Sharding(**_ZERO, gradients=True),
    "zero3": Sharding(**_ZERO, weights=True, gradients=True, keeps_small_whole=True),
    # FSDP2's shards are the parameters themselves (no master copy, no reduce bucket); a unit is gathered whole around
    # its forward and backward.
    "fsdp": Sharding(weights=True, gradients=True, optimizer=True),
}


@dataclass(frozen=True)
class Target:
    """What the run computes in: its device type, activation dtype and kernels (from the config, as the trainer picks
    them; ``dist.device=cuda`` estimates a GPU run on a machine without one)."""

    cuda: bool
    bf16: bool
    triton_scan: bool
    triton_loss: bool

    @classmethod
    def of(cls, cfg: RunConfig) -> Target:
        device = cfg.dist.device
        cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
        bf16 = cfg.train.precision.autocast_dtype(cuda) is not None

        def triton(backend: KernelBackend) -> bool:
            return backend is KernelBackend.triton or (backend is KernelBackend.auto and cuda)

        return cls(cuda, bf16, triton(cfg.model.ssd_backend), triton(cfg.model.lm_loss_backend))

    @property
    def activation_bytes(self) -> int:
        return BF16 if self.bf16 else FLOAT32

    def describe(self) -> str:
        kernels = f"{'triton' if self.triton_scan else 'torch'} scan"
        return f"{'cuda' if self.cuda else 'cpu'}, {'bf16 autocast' if self.bf16 else 'float32'}, {kernels}"


@dataclass
class Activations:
    """Bytes one micro-batch keeps for backward (``saved``), and the largest transient on top of them (``peak_extra``:
    the LM head's chunk of logits, and with checkpointing one layer rebuilt in backward)."""

    saved: int
    peak_extra: int

    @property
    def peak(self) -> int:
        return self.saved + self.peak_extra


@dataclass
class RankMemory:
    engine: str
    world_size: int
    weights: int
    gradients: int
    optimizer: int
    activations: Activations
    checkpointed: Activations  # under train.activation_checkpointing

    @property
    def states(self) -> int:
        return self.weights + self.gradients + self.optimizer

    @property
    def total(self) -> int:
        return self.states + self.activations.peak

    @property
    def total_checkpointed(self) -> int:
        return self.states + self.checkpointed.peak


@dataclass
class ParamInfo:
    numel: int
    state_copies: int  # tensors of the parameter's size the optimizer keeps
    state_scalars: int  # 0-d float32 tensors it keeps (AdamW's step)


def parameter_info(model: FalconH1LM, cfg: RunConfig) -> dict[str, ParamInfo]:
    """Every parameter's size and optimizer state, by name, as ``optim.build_optimizer`` assigns them."""
    info = {}
    for group in parameter_groups(model, classify_parameters(model), cfg.optim):
        for name, param in zip(group["names"], group["params"]):
            muon = group["use_muon"]
            info[name] = ParamInfo(param.numel(), 1 if muon else 2, 0 if muon else 1)
    return info


def gathered_units(model: FalconH1LM) -> list[int]:
    """The parameter counts of the units ZeRO-3 gathers whole at once: each decoder layer's blocks
    (``zero3_leaf_modules``), the embedding and the LM head."""
    leaves = tuple(model.zero3_leaf_modules())
    units = [sum(p.numel() for p in m.parameters()) for m in model.modules() if isinstance(m, leaves)]
    return [*units, model.embed_tokens.weight.numel(), model.lm_head.weight.numel()]


def layer_activations(cfg: FalconH1Config, target: Target, batch: int, seq_len: int) -> int:
    """Bytes one decoder layer's eager forward saves for backward over ``batch`` sequences of ``seq_len`` tokens.

    Per token, from the tensors autograd keeps in ``models.falcon_h1`` (A: the activation dtype; the RMSNorms, the
    attention's log-sum-exp and the torch SSD scan work in float32 whatever the autocast):
    - RMSNorm (two): its float32 input, normalized input and 1/rms: 2d + 1, float32;
    - the normalized input the mixers' matmuls read: d (A), once for the attention and the Mamba mixer;
    - attention: q|k|v (the fused matmul's output; v is a view of it), q and k after RoPE, RoPE's rotated halves,
      the output: 3 (q + kv), and one log-sum-exp per head (float32);
    - Mamba2: the fused in_proj output (z|x|B|C|dt), the convolution's input and output, SiLU's output, dt before
      and after softplus, y, SiLU(z) and the gated product; the SSD scan's own tensors (torch scan only: the
      chunk's decay and score matrices, Q per head and per group, the chunk states and a few copies of x, B and C);
    - MLP: its input, gate|up, SiLU(gate) and the product: d + 4 intermediate;
    and, per layer rather than per token, the effective weights (multiplied and concatenated copies of the matrices,
    in A) that the matmuls' backward reads.
    """
    d, inter = cfg.hidden_size, cfg.intermediate_size
    heads = cfg.num_attention_heads
    q, kv = heads * cfg.attention_head_dim, cfg.num_key_value_heads * cfg.attention_head_dim
    p, h, gn, chunk = cfg.mamba_d_ssm, cfg.mamba_n_heads, cfg.mamba_n_groups * cfg.mamba_d_state, cfg.mamba_chunk_size
    act = target.activation_bytes
    norms = 2 * (2 * d + 1) * FLOAT32
    mixer_input = d * act
    attention = 3 * (q + kv) * act + heads * FLOAT32
    in_proj = 2 * p + 2 * gn + h
    mamba = (in_proj + 3 * (p + 2 * gn) + 2 * h + 3 * p) * act
    if cfg.mamba_rms_norm:  # the gated RMSNorm keeps float32 SiLU(z), input and normalized input
        mamba += 3 * p * FLOAT32 - 2 * p * act
    if not target.triton_scan:
        # The scan pads the sequence to whole chunks. The chunk states are kept twice: once with the zero state in
        # front (one chunk more), once entering each chunk.
        chunks = math.ceil(seq_len / chunk)
        states = h * cfg.mamba_d_head * cfg.mamba_d_state / chunk * (2 + 1 / chunks)
        scan = 2 * h * chunk + cfg.mamba_n_groups * chunk + 4 * p + 5 * gn + 2 * h + states
        mamba += scan * FLOAT32 * chunks * chunk / seq_len
    mlp = (d + 4 * inter) * act
    per_token = norms + mixer_input + attention + mamba + mlp
    return int(per_token * batch * seq_len) + layer_matrix_numel(cfg) * act


def layer_matrix_numel(cfg: FalconH1Config) -> int:
    """Elements of one decoder layer's matrices (the attention's, the Mamba in/out projections and the MLP's)."""
    d = cfg.hidden_size
    q = cfg.num_attention_heads * cfg.attention_head_dim
    kv = cfg.num_key_value_heads * cfg.attention_head_dim
    p, gn = cfg.mamba_d_ssm, cfg.mamba_n_groups * cfg.mamba_d_state
    attention = d * (2 * q + 2 * kv)
    mamba = d * (2 * p + 2 * gn + cfg.mamba_n_heads) + p * d
    return attention + mamba + 3 * d * cfg.intermediate_size


def activations(cfg: RunConfig, target: Target, checkpointing: bool) -> Activations:
    """One micro-batch's activations: the layers', the embedding's and the LM head's."""
    m = cfg.model
    tokens = cfg.train.micro_batch_size * cfg.data.seq_len
    d, act = m.hidden_size, target.activation_bytes
    layer = layer_activations(m, target, cfg.train.micro_batch_size, cfg.data.seq_len)
    # The embedding keeps the token ids; the final RMSNorm as every norm; the LM head computes its gradients in the
    # forward and keeps them (the hidden states' and its weight's, float32) until backward.
    outside = tokens * 8 + tokens * (2 * d + 1) * FLOAT32
    outside += tokens * d * FLOAT32 + m.vocab_size * d * FLOAT32
    # While the loss runs: one chunk of logits (and the torch path's float32 copy of a bf16 one), the chunk's
    # weight-gradient product and, under autocast, the head's weight in its dtype.
    rows = min(tokens, chunk_tokens(tokens, d, m.vocab_size))
    logits = rows * m.vocab_size * (act if target.triton_loss or act == FLOAT32 else act + FLOAT32)
    logits += m.vocab_size * d * (act if act == FLOAT32 else 2 * act)
    if checkpointing:  # each layer keeps its (float32) input; backward rebuilds one layer at a time
        kept = m.num_hidden_layers * tokens * d * FLOAT32
        return Activations(kept + outside, max(logits, layer))
    return Activations(m.num_hidden_layers * layer + outside, logits)


def rank_memory(
    engine: str, world_size: int, params: dict[str, ParamInfo], units: list[int], cfg: RunConfig, target: Target
) -> RankMemory:
    sharding = ENGINES[engine]
    param_bytes = BF16 if cfg.dist.bf16_params and sharding.bf16_params else FLOAT32
    whole_below = cfg.dist.zero3_persistence_threshold if sharding.keeps_small_whole else 0

    def per_rank(numel: int, sharded: bool) -> int:
        return numel if not sharded or numel < whole_below else math.ceil(numel / world_size)

    numels = [info.numel for info in params.values()]
    weights = sum(per_rank(n, sharding.weights) for n in numels) * param_bytes
    if sharding.weights:
        weights += max(units) * param_bytes
    gradients = sum(per_rank(n, sharding.gradients) for n in numels) * param_bytes
    if sharding.gradient_buckets:
        gradients *= 2
    if sharding.master_weights:  # DeepSpeed clones the shard even of float32 weights (measured: 2 ranks, CPU)
        shard = sum(math.ceil(n / world_size) for n in numels) * FLOAT32
        weights += shard
        if param_bytes != FLOAT32:  # the master update reads float32 gradients: a copy of the bf16 shard
            gradients += shard
    if sharding.reduce_bucket:
        gradients += REDUCE_BUCKET_ELEMENTS * param_bytes
    # Single process and DDP keep the states in the parameters' dtype (float32 there); ZeRO in its float32 shards.
    optimizer = sum(
        per_rank(info.numel, sharding.optimizer) * info.state_copies * FLOAT32 + info.state_scalars * FLOAT32
        for info in params.values()
    )
    return RankMemory(
        engine,
        world_size,
        weights,
        gradients,
        optimizer,
        activations(cfg, target, checkpointing=False),
        activations(cfg, target, checkpointing=True),
    )


def estimate(cfg: RunConfig, world_sizes: list[int]) -> list[RankMemory]:
    """Per-rank memory of every engine at each world size (``single`` at one rank only)."""
    with torch.device("meta"):  # shapes only: nothing allocated, whatever the model's size
        model = FalconH1LM(cfg.model, cfg.lrm)
    params, units, target = parameter_info(model, cfg), gathered_units(model), Target.of(cfg)
    rows = []
    for world_size in world_sizes:
        for engine in ENGINES:
            if engine == "single" and world_size != 1:
                continue
            rows.append(rank_memory(engine, world_size, params, units, cfg, target))
    return rows


def format_estimate(cfg: RunConfig, world_sizes: list[int]) -> str:
    """The table ``--estimate`` prints, in GiB per rank."""
    target = Target.of(cfg)
    with torch.device("meta"):
        numel = FalconH1LM(cfg.model, cfg.lrm).num_params()
    tokens = f"micro-batch {cfg.train.micro_batch_size} x seq {cfg.data.seq_len}"
    title = (
        f"per-rank memory (GiB) of {numel / 1e6:,.1f}M parameters, optim={cfg.optim.name}, {tokens}, "
        f"{target.describe()}; ckpt: train.activation_checkpointing=true"
    )
    header = (
        f"{'engine':<8}{'ranks':>6}{'weights':>10}{'grads':>9}{'optimizer':>11}{'activations':>13}"
        f"{'act. ckpt':>11}{'total':>9}{'total ckpt':>12}"
    )
    lines = [title, header]
    for r in estimate(cfg, world_sizes):
        figures = (r.weights, r.gradients, r.optimizer, r.activations.peak, r.checkpointed.peak, r.total)
        cells = "".join(f"{value / GiB:>{width}.3f}" for value, width in zip(figures, (10, 9, 11, 13, 11, 9)))
        lines.append(f"{r.engine:<8}{r.world_size:>6}{cells}{r.total_checkpointed / GiB:>12.3f}")
    lines.append(
        "an upper bound of the peak (gradients and a forward's activations counted as live together); not counted: "
        "activation gradients in flight, Newton-Schulz and collective workspaces, the CUDA context, allocator "
        "fragmentation; train.compile keeps less than this eager estimate"
    )
    return "\n".join(lines)
