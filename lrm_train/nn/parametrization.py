"""How a model's scales follow its width: the parametrization, a model's choice, read by the model and the optimizer.

A model is tuned at a base width ``d0``; at width ``d`` (``r = d / d0``) each matrix scales by the class of its shape:

- ``hidden``: fan-in and fan-out grow with the width (attention, MLP, most of the Mamba mixer);
- ``readout``: fan-in grows, fan-out does not (the LM head; Mamba's B and C, whose fan-out is groups x d_state);
- ``input``: fan-in does not grow (the embedding).

A readout that starts random (Mamba's B; the LM head and C start at zero under ``zero_init_readouts``) has its init
std grow as r^1/2 against its r^-1 multiplier in every muP form, so its initial output on order-one inputs is the same at
every width: with a constant std it would shrink as r^-1/2 while its updates do not, and the Mamba scan's first steps
(C times B) would mix a width-dependent part into what the coordinate check measures. microsoft/mup keeps a random
readout's std constant instead (its effective weight then falls as 1/d, ours as 1/sqrt(d)); the README has both
measured.

Norm weights, SSM vectors and the learnable multipliers are vectors: nothing about them scales. The model applies the
init std and fixed forward multiplier exponents below; the optimizer applies its own LR and weight-decay exponents
(``optim.builder``), because AdamW's and Muon's updates grow differently with width.

``standard``: every scale as given, at every width (what the model config states is what runs). The two muP forms of
the paper's Table 1, which train the same way (Adam's and Muon's reparametrization symmetries map one onto the other):

- ``mup``: the init std of hidden matrices falls as r^-1/2 and readouts carry a forward multiplier r^-1; the optimizer
  scales the hidden LR (AdamW r^-1, Muon r^-1/2) and the weight decay inversely, so that lr x wd is constant.
- ``mup_multiplier_adamw`` / ``mup_multiplier_muon`` (Falcon-H1's form): LR and weight decay constant at every width;
  every matrix with a growing fan-in carries a forward multiplier (hidden r^-1 under AdamW, r^-1/2 under Muon;
  readouts r^-1), and the hidden init std grows as r^+1/2 under AdamW (constant under Muon) so outputs start at the
  same scale. The forward multipliers are derived for one optimizer's update, hence one name per optimizer.

Adam's epsilon follows the gradient (``gradient_exponent``): muP keeps activations of order one, so the gradient
reaching a width-growing vector is of order 1/d per coordinate, and a weight's gradient entry is that times its forward
multiplier. A constant epsilon would then damp wide models' updates more than narrow ones' wherever gradients are small
(the first steps from a zero readout), which the coordinate check measured as a falling change of Mamba's dt; scaling
epsilon by the same power of r as the gradient keeps Adam's update the same at every width, and keeps the two muP forms
identical under Adam's reparametrization symmetry (Everett et al. 2024 make the same point for muP's epsilon).
"""

from __future__ import annotations

from enum import StrEnum


class WidthClass(StrEnum):
    hidden = "hidden"
    readout = "readout"
    input = "input"


class Parametrization(StrEnum):
    standard = "standard"
    mup = "mup"
    mup_multiplier_adamw = "mup_multiplier_adamw"
    mup_multiplier_muon = "mup_multiplier_muon"


# (init std exponent, forward multiplier exponent) by parametrization and class; a missing class is (0, 0).
_MODEL_EXPONENTS: dict[Parametrization, dict[WidthClass, tuple[float, float]]] = {
    Parametrization.standard: {},
    Parametrization.mup: {WidthClass.hidden: (-0.5, 0.0), WidthClass.readout: (0.5, -1.0)},
    Parametrization.mup_multiplier_adamw: {WidthClass.hidden: (0.5, -1.0), WidthClass.readout: (0.5, -1.0)},
    Parametrization.mup_multiplier_muon: {WidthClass.hidden: (0.0, -0.5), WidthClass.readout: (0.5, -1.0)},
}


def _exponents(parametrization: Parametrization, width_class: WidthClass) -> tuple[float, float]:
    return _MODEL_EXPONENTS[parametrization].get(width_class, (0.0, 0.0))


def init_std_scale(parametrization: Parametrization, width_class: WidthClass, ratio: float) -> float:
    """The factor on the base init std of a matrix of ``width_class`` at width ratio ``ratio`` = d / d0."""
    return ratio ** _exponents(parametrization, width_class)[0]


def multiplier_scale(parametrization: Parametrization, width_class: WidthClass, ratio: float) -> float:
    """The factor on the base forward multiplier of a matrix of ``width_class`` at width ratio ``ratio``."""
    return ratio ** _exponents(parametrization, width_class)[1]


def gradient_exponent(parametrization: Parametrization, width_class: WidthClass | None) -> float:
    """The exponent q of the scale r^q of a parameter's gradient entries: ``width_class`` for a matrix weight (the
    embedding and LM head included), None for the rest (norm weights, SSM vectors, learnable multipliers).

    A matrix's gradient entry is its forward multiplier times the gradient of its output, of order 1/d for a
    width-growing output (hidden, input) and of order one for a readout's. Vectors act on width-growing hidden vectors:
    1/d. So are the learnable row and column multipliers' gradients; a scalar's is of order one, far above epsilon at
    any width, and shares the rule. ``standard`` scales nothing."""
    if parametrization is Parametrization.standard:
        return 0.0
    if width_class is None:
        return -1.0
    return _exponents(parametrization, width_class)[1] + (0.0 if width_class is WidthClass.readout else -1.0)
