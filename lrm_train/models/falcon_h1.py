"""Falcon-H1: a parallel hybrid of attention and Mamba2 mixers, then a gated MLP, with learnable multipliers.

One decoder layer:

    h = input_layernorm(x)
    x = x + mamba(h) + attention(h)          # the two mixers read the same normalized input, side by side
    x = x + mlp(pre_ff_layernorm(x))

Every matrix - q, k, v, o; the z, x, B, C, dt sections of the Mamba in_proj; out_proj; gate, up, down; the embedding
and the LM head - is an ``nn.MultipliedLinear``/``nn.MultipliedEmbedding``. The 14 muP forward multipliers of the
Hugging Face model are folded into those layers' fixed multipliers ``m`` (``FalconH1Config.matrix_multiplier``):
multiplying a linear layer's input or output by a constant is the same as multiplying its weight. So the forward
is the Hugging Face one, while the learnable multipliers of ``lrm`` sit on top of it.

Initialization (Falcon-H1 as in Hugging Face, muP style): every matrix and the embedding draw from N(0, init_std^2)
with one std for all widths, because the width dependence lives in the forward multipliers and, once training runs,
a matrix's norm is set by its weight-decay/noise equilibrium sqrt(lr/wd) rather than by its init (the paper's point).
Under a muP parametrization (``cfg.parametrization``) the init std and the fixed multipliers of each matrix follow
the width (``FalconH1Config.matrix_init_std`` / ``matrix_multiplier``). RMSNorm weights start at 1; in the Mamba
mixer A_log = log(1..heads) (decay rates spread over heads; or over a fixed range, ``mamba_a_init_range``, the same
at every width), D = 1, dt_bias = 1, and the depthwise convolution keeps PyTorch's default init, as in Mamba2.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from lrm_train.models.config import FalconH1Config, width_class
from lrm_train.models.ssd import ssd_scan_function
from lrm_train.nn import (
    MULTIPLIER_NAMES,
    GatedRMSNorm,
    Learnable,
    LRMConfig,
    MultipliedEmbedding,
    MultipliedLinear,
    MultipliedMatrix,
    ParamClass,
    ParamRole,
    Placement,
    RMSNorm,
    fused_linear,
    learned_scales_by_role,
    merge_multipliers_,
)
from lrm_train.nn.loss import LMHead, LMLoss
from lrm_train.nn.parametrization import Parametrization

_ROW_COL = Learnable(row=True, col=True)
_ROW = Learnable(row=True)
_NONE = Learnable()

# The paper's symmetry-free placement (appendix), by matrix role. Each multiplicative symmetry of a block
# (q-rows vs k-rows, gate vs up, out_proj-rows vs the next norm, ...) is broken by leaving one side without multipliers.
_SYMMETRY_FREE = {
    "embedding": _ROW_COL,
    "lm_head": _NONE,  # the final RMSNorm weight already is its column multiplier
    "attn.q": _ROW,
    "attn.k": _NONE,
    "attn.v": _NONE,
    "attn.o": _ROW_COL,
    "mlp.gate": _ROW,
    "mlp.up": _NONE,
    "mlp.down": _ROW_COL,
    "ssm.z": _ROW,
    "ssm.x": _NONE,
    "ssm.B": _NONE,
    "ssm.C": _NONE,
    "ssm.dt": _ROW,
    "ssm.out": _ROW_COL,
    "ssm.out_after_norm": _ROW,  # the mixer's gated RMSNorm weight is out_proj's column multiplier
}
MATRIX_ROLES = tuple(_SYMMETRY_FREE)
_WEIGHT_CLASSES = {"embedding": ParamClass.EMBEDDING, "lm_head": ParamClass.LM_HEAD}  # every other role: MATRIX


def learnable(lrm: LRMConfig, role: str) -> Learnable:
    """The learnable multipliers of the matrix of this role under ``lrm.placement``.

    The LM head is the exception the paper makes: a learnable scalar at most (its columns are the final RMSNorm
    weight, and row multipliers hurt), rows only when ``lrm.lm_head_rows`` asks for them.
    """
    if role not in _SYMMETRY_FREE:
        raise KeyError(f"unknown matrix role {role!r}; known roles: {', '.join(MATRIX_ROLES)}")
    if lrm.placement is Placement.none:
        return _NONE
    if role == "lm_head":
        return Learnable(scalar=lrm.placement in (Placement.scalar, Placement.full), row=lrm.lm_head_rows)
    if lrm.placement is Placement.scalar:
        return Learnable(scalar=True)
    if lrm.placement is Placement.full:
        return _ROW_COL
    return _SYMMETRY_FREE[role]


def _multipliers(cfg: FalconH1Config, lrm: LRMConfig, role: str) -> dict:
    return dict(
        multiplier=cfg.matrix_multiplier(role),
        learnable=learnable(lrm, role),
        init=lrm.init,
        init_std=cfg.matrix_init_std(role),
        role=role,
    )


def _matrix(cfg: FalconH1Config, lrm: LRMConfig, role: str, in_features: int, out_features: int) -> MultipliedLinear:
    return MultipliedLinear(in_features, out_features, **_multipliers(cfg, lrm, role))


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def rotary_cos_sin(seq_len: int, head_dim: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-interleaved RoPE tables [seq_len, head_dim] in float32, computed as Hugging Face does."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=device) / head_dim))
    angles = torch.arange(seq_len, device=device).float()[:, None] * inv_freq
    angles = torch.cat((angles, angles), dim=-1)
    return angles.cos(), angles.sin()


class RotaryTables(nn.Module):
    """The RoPE cos/sin tables, built once for every layer and kept as buffers (not saved: they are a function of
    the config). Position p's entries do not depend on the table's length, so a longer table changes nothing."""

    INITIAL_LENGTH = 4096

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        cos, sin = rotary_cos_sin(self.INITIAL_LENGTH, head_dim, theta)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def forward(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        if seq_len > self.cos.shape[0]:  # rare: rebuilt once, outside the (compiled) layers
            self.cos, self.sin = rotary_cos_sin(seq_len, self.head_dim, self.theta, self.cos.device)
        return self.cos[:seq_len], self.sin[:seq_len]


class Attention(nn.Module):
    """Causal GQA self-attention with RoPE (the key multiplier is in k_proj's fixed multiplier, before RoPE)."""

    def __init__(self, cfg: FalconH1Config, lrm: LRMConfig) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = (
            cfg.num_attention_heads,
            cfg.num_key_value_heads,
            cfg.attention_head_dim,
        )
        d, q_dim, kv_dim = cfg.hidden_size, self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.q_proj = _matrix(cfg, lrm, "attn.q", d, q_dim)
        self.k_proj = _matrix(cfg, lrm, "attn.k", d, kv_dim)
        self.v_proj = _matrix(cfg, lrm, "attn.v", d, kv_dim)
        self.o_proj = _matrix(cfg, lrm, "attn.o", q_dim, d)

    def forward(self, h: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        batch, seq_len, _ = h.shape
        qkv = fused_linear(h, [self.q_proj, self.k_proj, self.v_proj])
        q, k, v = qkv.split([self.q_proj.weight.shape[0], self.k_proj.weight.shape[0], self.v_proj.weight.shape[0]], -1)
        q, k, v = (t.view(batch, seq_len, -1, self.head_dim).transpose(1, 2) for t in (q, k, v))
        cos, sin = (table.to(q.dtype) for table in rope)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv_heads != self.n_heads)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq_len, -1))


def _decay_rates(n_heads: int, spread: list[float] | None) -> torch.Tensor:
    """The heads' initial decay rates A: 1..n_heads (Falcon-H1's), or ``spread`` = [low, high] covered log-evenly,
    the same range at every width."""
    if spread is None:
        return torch.arange(1, n_heads + 1, dtype=torch.float32)
    low, high = spread
    return torch.logspace(math.log10(low), math.log10(high), n_heads) if n_heads > 1 else torch.tensor([low])


class Mamba2Mixer(nn.Module):
    """Mamba2: in_proj -> causal depthwise conv + SiLU over [x|B|C] -> SSD scan -> gate by z -> out_proj."""

    SSM_VECTORS = ("A_log", "D", "dt_bias", "conv1d.weight", "conv1d.bias")  # its parameters that are not matrices

    def __init__(self, cfg: FalconH1Config, lrm: LRMConfig) -> None:
        super().__init__()
        self.n_heads, self.head_dim = cfg.mamba_n_heads, cfg.mamba_d_head
        self.n_groups, self.d_state, self.chunk_size = cfg.mamba_n_groups, cfg.mamba_d_state, cfg.mamba_chunk_size
        self.ssd_scan = ssd_scan_function(cfg.ssd_backend)
        d, d_ssm, d_bc = cfg.hidden_size, cfg.mamba_d_ssm, cfg.mamba_n_groups * cfg.mamba_d_state
        # The five sections of the Hugging Face in_proj, in its order; applied as one matmul.
        sizes = {"z": d_ssm, "x": d_ssm, "B": d_bc, "C": d_bc, "dt": self.n_heads}
        self.in_proj = nn.ModuleDict({name: _matrix(cfg, lrm, f"ssm.{name}", d, size) for name, size in sizes.items()})
        self.section_sizes = list(sizes.values())
        conv_dim = d_ssm + 2 * d_bc
        self.conv1d = nn.Conv1d(conv_dim, conv_dim, cfg.mamba_d_conv, groups=conv_dim, padding=cfg.mamba_d_conv - 1)
        self.dt_bias = nn.Parameter(torch.ones(self.n_heads))
        self.A_log = nn.Parameter(torch.log(_decay_rates(self.n_heads, cfg.mamba_a_init_range)))
        self.D = nn.Parameter(torch.ones(self.n_heads))
        self.norm = (
            GatedRMSNorm(d_ssm, cfg.mamba_n_groups, cfg.rms_norm_eps, cfg.mamba_norm_before_gate)
            if cfg.mamba_rms_norm
            else None
        )
        self.out_proj = _matrix(cfg, lrm, "ssm.out_after_norm" if cfg.mamba_rms_norm else "ssm.out", d_ssm, d)

    def scan_inputs(self, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``z, x, B, C, dt`` as the scan and the gate take them: x, B and C after the causal conv, dt after softplus."""
        seq_len = h.shape[1]
        z, x, B, C, dt = fused_linear(h, list(self.in_proj.values())).split(self.section_sizes, dim=-1)
        xbc = torch.cat((x, B, C), dim=-1).transpose(1, 2)
        xbc = F.silu(self.conv1d(xbc)[..., :seq_len]).transpose(1, 2)
        x, B, C = xbc.split(self.section_sizes[1:4], dim=-1)
        return z, x, B, C, F.softplus(dt + self.dt_bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z, x, B, C, dt = self.scan_inputs(h)
        y = self.ssd_scan(
            x.unflatten(-1, (self.n_heads, self.head_dim)),
            dt,
            -torch.exp(self.A_log.float()),
            B.unflatten(-1, (self.n_groups, self.d_state)),
            C.unflatten(-1, (self.n_groups, self.d_state)),
            self.D,
            self.chunk_size,
        ).flatten(-2)
        y = self.norm(y, z) if self.norm is not None else y * F.silu(z)
        return self.out_proj(y)


class GatedMLP(nn.Module):
    """``down(up(x) * silu(gate(x)))``; the two muP MLP multipliers are gate's and down's fixed multipliers."""

    def __init__(self, cfg: FalconH1Config, lrm: LRMConfig) -> None:
        super().__init__()
        self.gate_proj = _matrix(cfg, lrm, "mlp.gate", cfg.hidden_size, cfg.intermediate_size)
        self.up_proj = _matrix(cfg, lrm, "mlp.up", cfg.hidden_size, cfg.intermediate_size)
        self.down_proj = _matrix(cfg, lrm, "mlp.down", cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = fused_linear(x, [self.gate_proj, self.up_proj]).chunk(2, dim=-1)
        return self.down_proj(up * F.silu(gate))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: FalconH1Config, lrm: LRMConfig) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mamba = Mamba2Mixer(cfg, lrm)
        self.self_attn = Attention(cfg, lrm)
        self.pre_ff_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.feed_forward = GatedMLP(cfg, lrm)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        h = self.input_layernorm(x)
        x = x + self.mamba(h) + self.self_attn(h, rope)
        return x + self.feed_forward(self.pre_ff_layernorm(x))


class FalconH1LM(nn.Module):
    """``FalconH1LM(cfg, lrm)(input_ids [B, T]) -> logits [B, T, vocab]`` (untied embedding and LM head);
    ``model(input_ids, targets [B, T], z_loss_weight) -> LMLoss``, computed without the full logits (``LMHead``)."""

    def __init__(self, cfg: FalconH1Config, lrm: LRMConfig | None = None) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.lrm = lrm if lrm is not None else LRMConfig()
        self.embed_tokens = MultipliedEmbedding(
            cfg.vocab_size, cfg.hidden_size, **_multipliers(cfg, self.lrm, "embedding")
        )
        self.rotary = RotaryTables(cfg.attention_head_dim, cfg.rope_theta)
        self.layers = nn.ModuleList(DecoderLayer(cfg, self.lrm) for _ in range(cfg.num_hidden_layers))
        self.final_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = LMHead(
            cfg.hidden_size, cfg.vocab_size, cfg.lm_loss_backend, **_multipliers(cfg, self.lrm, "lm_head")
        )

    def forward(
        self, input_ids: torch.Tensor, targets: torch.Tensor | None = None, z_loss_weight: float = 0.0
    ) -> torch.Tensor | LMLoss:
        x = self.embed_tokens(input_ids)
        rope = self.rotary(input_ids.shape[1])
        for layer in self.layers:
            x = layer(x, rope)
        hidden = self.final_layernorm(x)
        return self.lm_head(hidden) if targets is None else self.lm_head(hidden, targets, z_loss_weight)

    @torch.no_grad()
    def merge_multipliers_(self) -> None:
        """Fold every learnable multiplier into its weight: the plain muP model (``lrm.placement=none``) computing
        the same function, which saves and loads as one."""
        merge_multipliers_(self)
        self.lrm = dataclasses.replace(self.lrm, placement="none", init="one", lm_head_rows=False)

    def matrices(self) -> dict[str, MultipliedMatrix]:
        """Every multiplied matrix by module name (the embedding and LM head included)."""
        return {name: m for name, m in self.named_modules() if isinstance(m, MultipliedMatrix)}

    def parameter_roles(self) -> Iterator[tuple[str, ParamRole]]:
        """Every parameter's class and matrix role (the ``nn.ParamRoleModel`` protocol)."""
        for name, module in self.named_modules():
            prefix = f"{name}." if name else ""
            if isinstance(module, MultipliedMatrix):
                weight_class = _WEIGHT_CLASSES.get(module.role, ParamClass.MATRIX)
                yield f"{prefix}weight", ParamRole(weight_class, module.role, width_class(module.role))
                for multiplier in MULTIPLIER_NAMES:
                    if getattr(module, multiplier) is not None:
                        yield f"{prefix}{multiplier}", ParamRole(ParamClass.MULTIPLIER, module.role)
            elif isinstance(module, (RMSNorm, GatedRMSNorm)):
                yield f"{prefix}weight", ParamRole(ParamClass.NORM)
            elif isinstance(module, Mamba2Mixer):
                for vector in Mamba2Mixer.SSM_VECTORS:
                    yield f"{prefix}{vector}", ParamRole(ParamClass.SSM_VECTOR)

    def width_scaling(self) -> tuple[Parametrization, float]:
        return self.cfg.parametrization, self.cfg.width_ratio

    def zero3_leaf_modules(self) -> list[type[nn.Module]]:
        """These blocks apply their children's weights in one fused matmul (q/k/v, gate/up, in_proj), so ZeRO-3
        gathers a whole block's parameters at its forward, not each child's at the child's."""
        return [Attention, Mamba2Mixer, GatedMLP]

    def fsdp_units(self) -> list[nn.Module]:
        """The blocks FSDP shards and gathers one at a time (the final norm goes with the whole model): a decoder
        layer's blocks apply their children's weights in fused matmuls, so a layer is gathered whole."""
        return [self.embed_tokens, *self.layers, self.lm_head]

    def num_params(self, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed_tokens.weight.numel() if exclude_embedding else n

    def flops_per_token(self, seq_len: int, causal_attention: bool = True) -> float:
        """Training FLOPs (forward + backward = 3x forward) per token at this sequence length.

        Counts every matmul: the linear layers (2 FLOPs per weight), attention scores and values, and the SSD scan as
        it runs - full chunk-by-chunk blocks, state updates and the across-chunk recurrence - plus the depthwise
        convolution. Attention is counted as a causal kernel (FlashAttention) executes it: each query against the keys
        up to it, (seq_len + 1) / 2 on average. ``causal_attention=False`` counts every query against all ``seq_len``
        keys (PaLM's MFU convention, and what an unmasked matmul executes); at seq 4096 that reads 13% more FLOPs for
        the 0.5B model, so an MFU under that convention is 13% higher.
        """
        cfg = self.cfg
        linear = sum(m.weight.numel() for m in self.matrices().values() if m is not self.embed_tokens)
        keys_per_query = (seq_len + 1) / 2 if causal_attention else seq_len
        attention = 4 * keys_per_query * cfg.num_attention_heads * cfg.attention_head_dim
        chunk = cfg.mamba_chunk_size
        chunks = math.ceil(seq_len / chunk)
        heads_state = cfg.mamba_n_heads * cfg.mamba_d_head * cfg.mamba_d_state
        per_scanned_token = (
            2 * chunk * cfg.mamba_n_groups * cfg.mamba_d_state  # C B^T scores inside a chunk
            + 2 * chunk * cfg.mamba_d_ssm  # scores times x
            + 4 * heads_state  # chunk states in, entering states out
            + 2 * chunks * heads_state / chunk  # the recurrence across chunks
        )
        ssd = per_scanned_token * chunks * chunk / seq_len  # the scan runs over seq_len padded to whole chunks
        conv = 2 * cfg.mamba_d_conv * (cfg.mamba_d_ssm + 2 * cfg.mamba_n_groups * cfg.mamba_d_state)
        return 3 * (2 * linear + cfg.num_hidden_layers * (attention + ssd + conv))


def static_transplant(models: Sequence[FalconH1LM]) -> dict[str, float | list[float]]:
    """The model config's forward multiplier fields with the per-role scales that LRM learned folded in, for a fresh
    baseline (``lrm.placement=none``) that starts at those scales and keeps them fixed: what LRM adds beyond finding a
    better static scale. For each matrix role, ``scalar x mean(row) x mean(col)`` of the learned multipliers over the
    muP value the matrix started from, geometric mean over the layers and over ``models`` (trained copies of one
    config: the selection seeds), times the config's fixed multiplier (``FalconH1Config.folded_multipliers``)."""
    first = models[0].cfg
    if any(m.cfg.forward_multipliers() != first.forward_multipliers() for m in models[1:]):
        raise ValueError("static_transplant: the models start from different forward multipliers")
    return first.folded_multipliers(learned_scales_by_role(models))
