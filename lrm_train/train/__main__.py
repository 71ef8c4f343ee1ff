"""``python -m lrm_train.train [overrides]`` and ``torchrun --nproc_per_node=N -m lrm_train.train [overrides]``."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lrm_train.train.config import register_configs, validate
from lrm_train.train.loop import train

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "configs")


def _one_line(error: BaseException) -> str:
    """Hydra/OmegaConf errors span several lines and chain causes: keep the first line of each, without repeats."""
    parts, seen = [], set()
    while error is not None:
        line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        full_key = getattr(error, "full_key", None)
        if full_key and full_key not in line:
            line = f"{line} ({full_key})"
        if line not in seen:
            parts.append(line)
            seen.add(line)
        error = error.__cause__ or error.__context__
    return ": ".join(parts[:2])  # deeper causes repeat the same complaint in template form


def check_config(overrides: list[str]) -> None:
    """Compose and validate the config exactly as the run will, so a bad one fails with one line before any work."""
    register_configs()
    ours = [o for o in overrides if not o.lstrip("+~").startswith(("hydra.", "hydra/"))]
    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base=None):
            validate(OmegaConf.to_object(compose("train", overrides=ours)))
    except Exception as e:  # noqa: BLE001 - any composition or validation error ends the run here
        print(f"error: config: {_one_line(e)}", file=sys.stderr)
        sys.exit(2)


@hydra.main(version_base=None, config_path=CONFIG_DIR, config_name="train")
def _run(cfg) -> None:
    try:
        train(OmegaConf.to_object(cfg))
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(3)


def main() -> None:
    check_config([a for a in sys.argv[1:] if not a.startswith("-")])
    _run()


if __name__ == "__main__":
    main()
