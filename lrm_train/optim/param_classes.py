"""Parameter classes: the single place that says what each parameter of the model is.

Every other component - the optimizer's groups, gradient clipping, the loggers, the engines - asks here and never
guesses from a name again. The model itself declares its parameters (``ParamRoleModel``), so a new model family
needs no edit here; ``parameter_roles`` checks that every parameter gets exactly one class.
"""

from __future__ import annotations

from lrm_train.nn.params import ParamClass, ParamRole, ParamRoleModel


def parameter_roles(model: ParamRoleModel) -> dict[str, ParamRole]:
    """Parameter name -> role, for every parameter of ``model`` (unwrapped), each exactly once, in model order."""
    roles: dict[str, ParamRole] = {}
    for name, role in model.parameter_roles():
        assert name not in roles, f"parameter {name} was classified twice"
        roles[name] = role
    names = [name for name, _ in model.named_parameters()]
    unclassified = sorted(set(names) - set(roles))
    assert not unclassified, f"parameters without a class: {', '.join(unclassified)}"
    stale = sorted(set(roles) - set(names))
    assert not stale, f"classified names that are not parameters: {', '.join(stale)}"
    return {name: roles[name] for name in names}


def classify_parameters(model: ParamRoleModel) -> dict[str, ParamClass]:
    """Parameter name -> class, for every parameter of ``model``, each exactly once."""
    return {name: role.param_class for name, role in parameter_roles(model).items()}


def is_clipped(cls: ParamClass, clip_multipliers: bool) -> bool:
    """Whether a class takes part in the clipped global gradient norm (the paper leaves the multipliers out)."""
    return clip_multipliers or cls is not ParamClass.MULTIPLIER
