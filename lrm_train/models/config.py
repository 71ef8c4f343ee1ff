"""FalconH1Config and its presets: the 0.5B model of the paper, a tiny CPU model, and a width family."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from lrm_train.nn.kernels import KernelBackend

# Fields that choose how a model runs on this machine, not the function it computes: model folders, Hugging Face
# exports and checkpoints' run records leave them out, so a model saved on a GPU loads anywhere.
RUNTIME_FIELDS = ("ssd_backend", "lm_loss_backend")


@dataclass
class FalconH1Config:
    """Shape and muP forward multipliers of a Falcon-H1 hybrid model (names follow the Hugging Face config)."""

    vocab_size: int = 8192
    hidden_size: int = 128
    num_hidden_layers: int = 4
    intermediate_size: int = 256  # MLP width
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    mamba_d_ssm: int = 128
    mamba_n_heads: int = 4
    mamba_d_head: int = 32
    mamba_n_groups: int = 1
    mamba_d_state: int = 16
    mamba_d_conv: int = 4
    mamba_chunk_size: int = 64
    mamba_rms_norm: bool = False
    mamba_norm_before_gate: bool = True
    rope_theta: float = 1e4
    rms_norm_eps: float = 1e-5
    init_std: float = 0.02
    # The 14 muP forward multipliers of the Hugging Face config.
    embedding_multiplier: float = 1.0
    lm_head_multiplier: float = 1.0
    key_multiplier: float = 1.0
    attention_in_multiplier: float = 1.0
    attention_out_multiplier: float = 1.0
    ssm_in_multiplier: float = 1.0
    ssm_out_multiplier: float = 1.0
    ssm_multipliers: list[float] = field(default_factory=lambda: [1.0] * 5)  # z, x, B, C, dt
    mlp_multipliers: list[float] = field(default_factory=lambda: [1.0, 1.0])  # gate, down
    # How the Mamba2 scan runs (see RUNTIME_FIELDS).
    ssd_backend: KernelBackend = KernelBackend.auto
    # How the LM head's cross-entropy runs (see RUNTIME_FIELDS); triton: one fused kernel.
    lm_loss_backend: KernelBackend = KernelBackend.auto

    def __post_init__(self) -> None:
        self.validate()

    @property
    def attention_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    def validate(self) -> None:
        """Raise one ValueError naming the first field that makes the shape impossible."""
        positive = [
            "vocab_size",
            "hidden_size",
            "num_hidden_layers",
            "intermediate_size",
            "num_attention_heads",
            "num_key_value_heads",
            "mamba_d_ssm",
            "mamba_n_heads",
            "mamba_d_head",
            "mamba_n_groups",
            "mamba_d_state",
            "mamba_d_conv",
            "mamba_chunk_size",
        ]
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"model.{name}={value!r} must be a positive integer")
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"model.num_attention_heads={self.num_attention_heads} does not divide "
                f"model.hidden_size={self.hidden_size} (or set model.head_dim)"
            )
        if self.head_dim is not None and (not isinstance(self.head_dim, int) or self.head_dim <= 0):
            raise ValueError(f"model.head_dim={self.head_dim!r} must be a positive integer or None")
        if self.attention_head_dim % 2:
            raise ValueError(f"model.head_dim={self.attention_head_dim} must be even for rotary embeddings")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"model.num_key_value_heads={self.num_key_value_heads} does not divide "
                f"model.num_attention_heads={self.num_attention_heads}"
            )
        if self.mamba_n_heads * self.mamba_d_head != self.mamba_d_ssm:
            raise ValueError(
                f"model.mamba_d_ssm={self.mamba_d_ssm} != mamba_n_heads x mamba_d_head "
                f"= {self.mamba_n_heads} x {self.mamba_d_head}"
            )
        if self.mamba_n_heads % self.mamba_n_groups:
            raise ValueError(
                f"model.mamba_n_groups={self.mamba_n_groups} does not divide model.mamba_n_heads={self.mamba_n_heads}"
            )
        if len(self.ssm_multipliers) != 5:
            raise ValueError(f"model.ssm_multipliers needs 5 values (z, x, B, C, dt), got {len(self.ssm_multipliers)}")
        if len(self.mlp_multipliers) != 2:
            raise ValueError(f"model.mlp_multipliers needs 2 values (gate, down), got {len(self.mlp_multipliers)}")
        for name, value in self.forward_multipliers().items():
            if not math.isfinite(value) or value == 0:
                raise ValueError(f"model.{name}={value!r} must be finite and non-zero")
        for name in ("rope_theta", "rms_norm_eps", "init_std"):
            if not getattr(self, name) > 0:
                raise ValueError(f"model.{name}={getattr(self, name)!r} must be positive")
        for name in ("ssd_backend", "lm_loss_backend"):  # plain strings too (dataclasses.replace): keep the enum
            value = getattr(self, name)
            if value not in set(KernelBackend):
                raise ValueError(f"model.{name}={value!r} must be one of {', '.join(KernelBackend)}")
            setattr(self, name, KernelBackend(value))

    def forward_multipliers(self) -> dict[str, float]:
        """The 14 muP forward multipliers by name."""
        names = ("embedding", "lm_head", "key", "attention_in", "attention_out", "ssm_in", "ssm_out")
        out = {f"{n}_multiplier": float(getattr(self, f"{n}_multiplier")) for n in names}
        out.update({f"ssm_multipliers[{i}]": float(v) for i, v in enumerate(self.ssm_multipliers)})
        out.update({f"mlp_multipliers[{i}]": float(v) for i, v in enumerate(self.mlp_multipliers)})
        return out

    def matrix_multiplier(self, role: str) -> float:
        """The fixed muP factor the Hugging Face forward applies to the matrix of this role (see nn.MATRIX_ROLES)."""
        ssm = dict(zip(("z", "x", "B", "C", "dt"), self.ssm_multipliers))
        if role == "embedding":
            return self.embedding_multiplier
        if role == "lm_head":
            return self.lm_head_multiplier
        if role in ("attn.q", "attn.v"):
            return self.attention_in_multiplier
        if role == "attn.k":
            return self.attention_in_multiplier * self.key_multiplier
        if role == "attn.o":
            return self.attention_out_multiplier
        if role.startswith("ssm.out"):
            return self.ssm_out_multiplier
        if role.startswith("ssm."):
            return self.ssm_in_multiplier * ssm[role.removeprefix("ssm.")]
        if role == "mlp.gate":
            return self.mlp_multipliers[0]
        if role == "mlp.down":
            return self.mlp_multipliers[1]
        if role == "mlp.up":
            return 1.0
        raise KeyError(f"unknown matrix role {role!r}")


# Falcon-H1-0.5B as released and as used by the paper (tuned muP multipliers included).
# fmt: off
FALCON_H1_0P5B = dict(
    vocab_size=32784, hidden_size=1024, num_hidden_layers=36, intermediate_size=2048,
    num_attention_heads=8, num_key_value_heads=2, head_dim=64,
    mamba_d_ssm=1536, mamba_n_heads=24, mamba_d_head=64, mamba_n_groups=1, mamba_d_state=128,
    mamba_d_conv=4, mamba_chunk_size=128, mamba_rms_norm=False, rope_theta=1e11, rms_norm_eps=1e-5,
    embedding_multiplier=5.656854, lm_head_multiplier=0.0390625, key_multiplier=0.390625,
    attention_in_multiplier=1.0, attention_out_multiplier=0.9375, ssm_in_multiplier=1.25,
    ssm_out_multiplier=0.235702, ssm_multipliers=[0.353553, 0.25, 0.353553, 0.5, 0.353553],
    mlp_multipliers=[0.883883, 0.5859375],
)

# Trains on 2 CPU cores: 4 layers at width 128, with the 0.5B model's multipliers so the muP path is exercised.
TINY = dict(
    vocab_size=8192, hidden_size=128, num_hidden_layers=4, intermediate_size=256,
    num_attention_heads=4, num_key_value_heads=2, head_dim=32,
    mamba_d_ssm=192, mamba_n_heads=6, mamba_d_head=32, mamba_n_groups=1, mamba_d_state=16,
    mamba_d_conv=4, mamba_chunk_size=64, rope_theta=1e4,
    **{k: v for k, v in FALCON_H1_0P5B.items() if "multiplier" in k},
)
# fmt: on


def width_family(
    hidden_size: int, num_hidden_layers: int = 12, vocab_size: int = 8192, head_dim: int = 64
) -> FalconH1Config:
    """The 0.5B model's proportions at another width, with its muP multipliers.

    Heads of ``head_dim`` everywhere (the 0.5B model's 64; smaller heads give CPU sweeps widths below 128); attention
    width = hidden/2 with 4 query heads per KV head; MLP 2x; SSM 1.5x.

    For width-scaling studies (the paper sweeps widths 2^7..2^13 at fixed depth): head dims stay fixed and the number
    of heads grows with the width, so learned multipliers can be compared across widths.
    """
    if hidden_size % (2 * head_dim):
        raise ValueError(
            f"width {hidden_size} is not a multiple of 2 x head_dim={head_dim} (model.hidden_size in the width family)"
        )
    heads = hidden_size // (2 * head_dim)
    base = FalconH1Config(**FALCON_H1_0P5B)
    return replace(
        base,
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        intermediate_size=2 * hidden_size,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 4),
        head_dim=head_dim,
        mamba_d_ssm=3 * hidden_size // 2,
        mamba_n_heads=3 * hidden_size // (2 * head_dim),
        mamba_d_head=head_dim,
        mamba_d_state=min(128, hidden_size // 2),
    )


PRESETS = {
    "tiny": lambda: FalconH1Config(**TINY),
    "falcon_h1_0p5b": lambda: FalconH1Config(**FALCON_H1_0P5B),
    **{f"width_{2**k}": (lambda k=k: width_family(2**k)) for k in range(7, 14)},
}


def preset(name: str) -> FalconH1Config:
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
    return PRESETS[name]()
