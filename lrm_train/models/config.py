"""FalconH1Config and its presets: the 0.5B model of the paper, a tiny CPU model, and a width family."""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace

from lrm_train.nn.kernels import KernelBackend
from lrm_train.nn.parametrization import Parametrization, WidthClass, init_std_scale, multiplier_scale

# How each matrix role's shape grows with the width (nn.parametrization): every role not named here is hidden.
WIDTH_CLASSES = {"embedding": WidthClass.input, "lm_head": WidthClass.readout}
WIDTH_CLASSES.update({"ssm.B": WidthClass.readout, "ssm.C": WidthClass.readout})  # fan-out n_groups x d_state


def width_class(role: str) -> WidthClass:
    return WIDTH_CLASSES.get(role, WidthClass.hidden)


# The matrices ``zero_init_readouts`` starts at zero (microsoft/mup's zero readout init): the LM head, and the scan's
# C, its query (B, the key, keeps its init, so that C learns from the first step, as with a zero attention query). A
# readout's initial random part shrinks only as width^-1/2, and at the widths one tunes on it dominates the change of
# the output for the first steps, a change muP means to be width-independent; from zero it is the learned part alone.
ZERO_INIT_READOUTS = ("lm_head", "ssm.C")


# Fields that choose how a model runs on this machine, not the function it computes: model folders, Hugging Face
# exports and checkpoints' run records leave them out, so a model saved on a GPU loads anywhere.
RUNTIME_FIELDS = ("ssd_backend", "lm_loss_backend")
# Fields that shape how a model starts or how its scales follow the width, not what it computes with given weights.
INIT_FIELDS = ("init_std", "zero_init_readouts", "mamba_a_init_range", "parametrization", "base_width")


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
    # The heads' initial decay rates A: None for 1..heads (Falcon-H1's; the range grows with the head count), or
    # [low, high] covered log-evenly by the heads, the same at every width (the width family's).
    mamba_a_init_range: list[float] | None = None
    rope_theta: float = 1e4
    rms_norm_eps: float = 1e-5
    init_std: float = 0.02
    zero_init_readouts: bool = False  # start ZERO_INIT_READOUTS at zero (the muP transfers: tiny, the width family)
    # How the scales below follow the width (nn.parametrization): standard applies them as given; the muP forms take
    # them as tuned at base_width and scale them (and the optimizer's LR/WD) to hidden_size.
    parametrization: Parametrization = Parametrization.standard
    base_width: int = 1024
    # The 14 muP forward multipliers of the Hugging Face config (at base_width under a muP parametrization).
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
            "base_width",
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
        spread = self.mamba_a_init_range
        if spread is not None and (len(spread) != 2 or not 0 < spread[0] <= spread[1]):
            raise ValueError(f"model.mamba_a_init_range={list(spread)} must be [low, high] with 0 < low <= high")
        for name in ("rope_theta", "rms_norm_eps", "init_std"):
            if not getattr(self, name) > 0:
                raise ValueError(f"model.{name}={getattr(self, name)!r} must be positive")
        # Plain strings too (dataclasses.replace, model folders' config.json): keep the enums.
        for name, choices in (
            ("ssd_backend", KernelBackend),
            ("lm_loss_backend", KernelBackend),
            ("parametrization", Parametrization),
        ):
            value = getattr(self, name)
            if value not in set(choices):
                raise ValueError(f"model.{name}={value!r} must be one of {', '.join(choices)}")
            setattr(self, name, choices(value))

    @property
    def width_ratio(self) -> float:
        """r = hidden_size / base_width, by which a muP parametrization scales (1 under standard)."""
        return 1.0 if self.parametrization is Parametrization.standard else self.hidden_size / self.base_width

    def forward_multipliers(self) -> dict[str, float]:
        """The 14 muP forward multipliers by name."""
        names = ("embedding", "lm_head", "key", "attention_in", "attention_out", "ssm_in", "ssm_out")
        out = {f"{n}_multiplier": float(getattr(self, f"{n}_multiplier")) for n in names}
        out.update({f"ssm_multipliers[{i}]": float(v) for i, v in enumerate(self.ssm_multipliers)})
        out.update({f"mlp_multipliers[{i}]": float(v) for i, v in enumerate(self.mlp_multipliers)})
        return out

    def matrix_multiplier(self, role: str) -> float:
        """The fixed forward multiplier of the matrix of this role (see nn.MATRIX_ROLES) at this width."""
        scale = multiplier_scale(self.parametrization, width_class(role), self.width_ratio)
        return self._base_multiplier(role) * scale

    def matrix_init_std(self, role: str) -> float:
        """The init std of the matrix of this role at this width."""
        if self.zero_init_readouts and role in ZERO_INIT_READOUTS:
            return 0.0
        scale = init_std_scale(self.parametrization, width_class(role), self.width_ratio)
        return self.init_std * scale

    def hf_multipliers(self) -> dict:
        """The Hugging Face config's multiplier fields computing this model's forward at this width (the standard
        parametrization's): each field its matrices' multiplier; up's, which Hugging Face lacks, folded into down's."""
        m = self.matrix_multiplier
        attention_in = m("attn.q")
        ssm_in = self.ssm_in_multiplier
        return {
            "embedding_multiplier": m("embedding"),
            "lm_head_multiplier": m("lm_head"),
            "key_multiplier": m("attn.k") / attention_in,
            "attention_in_multiplier": attention_in,
            "attention_out_multiplier": m("attn.o"),
            "ssm_in_multiplier": ssm_in,
            "ssm_out_multiplier": m("ssm.out_after_norm" if self.mamba_rms_norm else "ssm.out"),
            "ssm_multipliers": [m(f"ssm.{s}") / ssm_in for s in ("z", "x", "B", "C", "dt")],
            "mlp_multipliers": [m("mlp.gate"), m("mlp.down") * m("mlp.up")],
        }

    def folded_multipliers(self, scales: dict[str, float]) -> dict[str, float | list[float]]:
        """This config's forward multiplier fields with a factor per matrix role (``scales``; a missing role: 1)
        folded in: the static transplant of what LRM learned (``models.static_transplant``). The fields do not hold
        one multiplier per role: q and v share ``attention_in``, which takes q's factor (k's field takes k's over it),
        v's factor over q's goes to o, which reads v's output linearly, and up's goes to down, as ``hf_multipliers``
        folds it; with the same weights the model then computes what per-role multipliers would."""
        f = {role: scales.get(role, 1.0) for role in ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.up")}
        out_role = "ssm.out_after_norm" if self.mamba_rms_norm else "ssm.out"
        gate, down = self.mlp_multipliers
        return {
            "embedding_multiplier": self.embedding_multiplier * scales.get("embedding", 1.0),
            "lm_head_multiplier": self.lm_head_multiplier * scales.get("lm_head", 1.0),
            "key_multiplier": self.key_multiplier * f["attn.k"] / f["attn.q"],
            "attention_in_multiplier": self.attention_in_multiplier * f["attn.q"],
            "attention_out_multiplier": self.attention_out_multiplier * f["attn.o"] * f["attn.v"] / f["attn.q"],
            "ssm_in_multiplier": self.ssm_in_multiplier,
            "ssm_out_multiplier": self.ssm_out_multiplier * scales.get(out_role, 1.0),
            "ssm_multipliers": [
                m * scales.get(f"ssm.{name}", 1.0) for m, name in zip(self.ssm_multipliers, ("z", "x", "B", "C", "dt"))
            ],
            "mlp_multipliers": [gate * scales.get("mlp.gate", 1.0), down * scales.get("mlp.down", 1.0) * f["mlp.up"]],
        }

    def function_definition(self) -> dict:
        """What the model computes from given weights: its shape and, at this width, its matrices' multipliers (as
        ``hf_multipliers``); not how it is initialized, nor how its scales would follow another width."""
        multipliers = self.hf_multipliers()
        skipped = {*RUNTIME_FIELDS, *INIT_FIELDS, *multipliers}
        shape = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in skipped}
        return {**shape, **multipliers}

    def _base_multiplier(self, role: str) -> float:
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

# Trains on 2 CPU cores: 4 layers at width 128, a muP transfer of the 0.5B model (its multipliers, init and LRs as
# tuned at width 1024, scaled to 128 by the mup parametrization: e.g. an LM-head multiplier of 0.3125), its readouts
# starting at zero as muP's do.
TINY = dict(
    vocab_size=8192, hidden_size=128, num_hidden_layers=4, intermediate_size=256,
    num_attention_heads=4, num_key_value_heads=2, head_dim=32,
    mamba_d_ssm=192, mamba_n_heads=6, mamba_d_head=32, mamba_n_groups=1, mamba_d_state=16,
    mamba_d_conv=4, mamba_chunk_size=64, rope_theta=1e4, parametrization="mup", base_width=1024,
    zero_init_readouts=True, **{k: v for k, v in FALCON_H1_0P5B.items() if "multiplier" in k},
)
# fmt: on


def width_family(
    hidden_size: int,
    num_hidden_layers: int = 12,
    vocab_size: int = 8192,
    head_dim: int = 64,
    queries_per_kv: int = 1,
    d_state: int = 128,
    parametrization: Parametrization = Parametrization.mup,
) -> FalconH1Config:
    """The 0.5B model's proportions at another width: a muP transfer of it (its multipliers and init as tuned at
    width 1024, scaled by ``parametrization``).

    Everything a width-consistent parametrization needs fixed stays fixed: the head dims (``head_dim``; the 0.5B
    model's 64, smaller for CPU sweeps), the GQA ratio (``queries_per_kv``; 1 by default, because at width 128 heads of
    64 leave one attention head, so the 0.5B model's 4 cannot hold across the family), d_state and the number of SSM
    groups (B.C contracts over d_state as q.k over the head dim), and the range of the heads' initial decay rates
    (A in [1, 16], Mamba2's, whatever the head count). The head counts grow with the width: attention width = hidden/2,
    MLP 2x, SSM 1.5x. Where this differs from Falcon-H1's released shapes: the GQA ratio (the 0.5B model's is 4), A's
    init range (theirs is 1..heads) and, at other widths than 1024, any d_state they chose per size. Under a muP
    parametrization the readouts start at zero (``zero_init_readouts``); Falcon-H1 draws them like every matrix.
    """
    if hidden_size % (2 * head_dim):
        raise ValueError(
            f"width {hidden_size} is not a multiple of 2 x head_dim={head_dim} (model.hidden_size in the width family)"
        )
    heads = hidden_size // (2 * head_dim)
    if heads % queries_per_kv:
        raise ValueError(
            f"width {hidden_size} has {heads} attention heads of {head_dim}: not a multiple of "
            f"queries_per_kv={queries_per_kv} (a smaller head_dim or queries_per_kv)"
        )
    base = FalconH1Config(**FALCON_H1_0P5B)
    return replace(
        base,
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_hidden_layers,
        intermediate_size=2 * hidden_size,
        num_attention_heads=heads,
        num_key_value_heads=heads // queries_per_kv,
        head_dim=head_dim,
        mamba_d_ssm=3 * hidden_size // 2,
        mamba_n_heads=3 * hidden_size // (2 * head_dim),
        mamba_d_head=head_dim,
        mamba_d_state=d_state,
        mamba_a_init_range=[1.0, 16.0],
        parametrization=parametrization,
        base_width=base.hidden_size,
        zero_init_readouts=Parametrization(parametrization) is not Parametrization.standard,
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
