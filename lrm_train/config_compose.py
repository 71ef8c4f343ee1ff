"""How every command makes its config: Hydra's compose API over ``configs/<name>.yaml`` and a dataclass schema.

The schema (a dataclass holding every default) is stored in Hydra's ConfigStore as ``<name>_schema``, which the YAML
lists first in its defaults; the YAML files pick group options and name only what those change. ``compose_schema``
turns every config error - an unknown key (also one added with ``+``), an unknown group option, a wrong type, a
dataclass's own check - into one ``ValueError`` line naming the culprit, before any work.

It sits beside the packages (like ``utils``) so that ``data``, ``train`` and ``experiments`` share it.
"""

from __future__ import annotations

import dataclasses
import itertools
import types
import typing
from pathlib import Path

from hydra import compose as hydra_compose
from hydra import initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.global_hydra import GlobalHydra
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def compose_schema(config_name: str, schema: type, overrides: list[str] | tuple[str, ...] = ()):
    """``configs/{config_name}.yaml`` with Hydra ``overrides``, as an instance of ``schema``."""
    ConfigStore.instance().store(name=f"{config_name}_schema", node=schema)
    GlobalHydra.instance().clear()  # compose may run again in the same process (tests, experiments)
    try:
        # A key inside a list of dataclasses (data.mixture=[{...}]) is checked here: OmegaConf's error for it names the
        # key without its place (``wieght``, not ``data.mixture[1].wieght``).
        for override in OverridesParser.create().parse_overrides(list(overrides)):
            hint = _field_type(schema, override.key_or_group)
            if unknown := _unknown_in(override.value(), hint, override.key_or_group):
                raise ValueError(_unknown_key(unknown[0]))
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
            composed = hydra_compose(config_name, overrides=list(overrides))
    except Exception as e:  # noqa: BLE001 - Hydra and OmegaConf raise many types; all are config errors here
        raise ValueError(one_line(e)) from None
    unknown = unknown_keys(OmegaConf.to_container(composed, resolve=False), schema)
    if unknown:
        raise ValueError(_unknown_key(unknown[0]))
    try:
        return OmegaConf.to_object(composed)
    except Exception as e:  # noqa: BLE001 - a wrong type, or a dataclass's own check
        raise ValueError(one_line(e)) from None


def compose_saved(path: Path, schema: type, overrides: list[str] | tuple[str, ...] = ()):
    """A config a command saved (a run's ``config.yaml``), read through today's ``schema``, with ``key=value``
    overrides in Hydra's syntax; every error one ``ValueError`` line, like ``compose_schema``'s.

    Group options (``optim=muon``) pick defaults for a fresh config; a saved config has its values already, so they are
    refused with the keys to set instead.
    """
    try:
        saved = OmegaConf.load(path)
    except FileNotFoundError:
        raise ValueError(f"{path}: no such file") from None
    except Exception as e:  # noqa: BLE001 - YAML and OmegaConf raise many types
        raise ValueError(f"{path}: not a YAML config ({one_line(e)})") from None
    unknown = unknown_keys(OmegaConf.to_container(saved, resolve=False), schema)
    if unknown:
        raise ValueError(f"{path}: {_unknown_key(unknown[0])}")
    hints = typing.get_type_hints(schema)
    try:
        config = OmegaConf.merge(OmegaConf.structured(schema), saved)
        for override in OverridesParser.create().parse_overrides(list(overrides)):
            key = override.key_or_group
            if dataclasses.is_dataclass(hints.get(key)):
                raise ValueError(
                    f"{override.input_line}: a group option picks a fresh config's defaults; to change the saved "
                    f"run's, set its keys ({key}.<field>=...)"
                )
            OmegaConf.update(config, key, override.value(), merge=True)
        return OmegaConf.to_object(config)
    except Exception as e:  # noqa: BLE001 - as in compose_schema
        raise ValueError(one_line(e)) from None


def unknown_keys(config: dict, schema: type, prefix: str = "") -> list[str]:
    """Keys of ``config`` that ``schema`` (a dataclass) does not declare, recursively.

    A typed Hydra node keeps a key added with ``+`` and ``OmegaConf.to_object`` then drops it without a word, so a
    typo such as ``+train.max_stepz=10`` would silently do nothing; free-form fields (``dict[str, Any]``) are not checked.
    """
    hints = typing.get_type_hints(schema)
    found = []
    for key, value in config.items():
        if key not in hints:
            found.append(f"{prefix}{key}")
        else:
            found += _unknown_in(value, hints[key], f"{prefix}{key}")
    return found


def _unknown_in(value: object, hint: object, key: str) -> list[str]:
    """Unknown keys inside ``value``, the value of the field ``key`` of type ``hint``: a dataclass (or an optional
    one), or a list of them (``data.mixture``), entry i named ``key[i]``."""
    hint = _required(hint)
    if dataclasses.is_dataclass(hint) and isinstance(value, dict):
        return unknown_keys(value, hint, f"{key}.")
    if typing.get_origin(hint) is list and isinstance(value, list):
        (item,) = typing.get_args(hint)
        return [found for i, entry in enumerate(value) for found in _unknown_in(entry, item, f"{key}[{i}]")]
    return []


def _required(hint: object) -> object:
    """``X`` for ``X | None``; any other type as it is."""
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        args = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        return args[0] if len(args) == 1 else hint
    return hint


def _field_type(schema: type, dotted: str) -> object:
    """The type of the field at ``dotted`` (``data.mixture``) in ``schema``; None when there is no such field."""
    hint: object = schema
    for name in dotted.split("."):
        hint = _required(hint)
        if not dataclasses.is_dataclass(hint) or name not in (fields := typing.get_type_hints(hint)):
            return None
        hint = fields[name]
    return hint


def _unknown_key(key: str) -> str:
    return f"unknown config key {key!r} (check the spelling; --help lists the keys)"


def one_line(error: BaseException) -> str:
    """A Hydra/OmegaConf error (several lines, chained causes) as one line naming the key; for an unknown group
    option, the options Hydra lists."""
    cause = error
    while cause is not None:
        key = getattr(cause, "full_key", None)
        if key and isinstance(cause, ConfigAttributeError | ConfigKeyError):
            return _unknown_key(key)
        if key:
            return f"{key}: {str(cause).strip().splitlines()[0]}"
        if type(cause) is ValueError:  # a dataclass's own check, wrapped by OmegaConf
            return str(cause)
        cause = cause.__cause__ or cause.__context__
    text = str(error).strip()
    line = text.splitlines()[0] if text else type(error).__name__
    if "Available options in" in text:
        listed = text.split("Available options in", 1)[1].splitlines()[1:]
        options = [name.strip() for name in itertools.takewhile(lambda name: name.startswith("\t"), listed)]
        line += f" (options: {', '.join(options)})"
    return line


def help_text(config_name: str, usage: str) -> str:
    """``usage`` followed by the comment block of ``configs/{config_name}.yaml`` (after its first two lines)."""
    lines = (CONFIG_DIR / f"{config_name}.yaml").read_text().splitlines()
    comments = [line for line in lines if line.startswith("#")]
    return usage + "\n" + "\n".join(line[2:] for line in comments[2:])
