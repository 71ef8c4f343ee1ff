"""The experiments' config path: a typed settings dataclass, a Hydra config in ``configs/`` and its overrides.

An experiment command (``compare``, ...) has a settings dataclass holding every default, registered in Hydra's
ConfigStore as ``<config_name>_schema``; ``configs/<config_name>.yaml`` picks an option of the ``experiment`` group
(``configs/experiment/<option>.yaml``, package ``_global_``), and command-line ``key=value`` arguments override it.
The trainer's ``experiment.name`` key is unrelated: the trainer composes ``configs/train.yaml``, which has no
``experiment`` group. Each run of an experiment is then composed by the trainer's own ``compose``.
"""

from __future__ import annotations

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from lrm_train.train.config import CONFIG_DIR, one_line, unknown_keys


def compose_experiment(config_name: str, schema: type, overrides: list[str]):
    """The settings of ``configs/{config_name}.yaml`` with ``overrides``, as a ``schema`` instance.

    Raises ``ValueError`` with one line naming the culprit (an unknown key, option or a wrong type)."""
    ConfigStore.instance().store(name=f"{config_name}_schema", node=schema)
    GlobalHydra.instance().clear()
    try:
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            composed = hydra_compose(config_name, overrides=list(overrides))
    except Exception as e:  # noqa: BLE001 - Hydra and OmegaConf raise many types; all are config errors here
        raise ValueError(one_line(e)) from None
    unknown = unknown_keys(OmegaConf.to_container(composed, resolve=False), schema)
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r} (check the spelling; --help lists the keys)")
    try:
        return OmegaConf.to_object(composed)
    except Exception as e:  # noqa: BLE001 - a wrong type or the dataclass's own check
        raise ValueError(one_line(e)) from None
