"""``python -m qflux.tiny FAMILY DIR [--seed=0] [--size=tiny]``: a tiny random model of a family, built offline
in the diffusers folder layout (each family's builder: ``qflux/models/<family>/tiny.py``)."""

from __future__ import annotations

from qflux.models import TINY_MODELS


def main(model: str, out_dir: str, seed: int = 0, size: str = "tiny") -> None:
    """CLI: ``python -m qflux.tiny MODEL DIR [--seed=0] [--size=...]``; MODEL is one of :data:`TINY_MODELS`."""
    if model not in TINY_MODELS:
        raise SystemExit(f"unknown tiny model {model!r}; choose one of {sorted(TINY_MODELS)}")
    try:
        path = TINY_MODELS[model](out_dir, seed=seed, size=size)
    except ValueError as e:  # an unknown size names the ones there are
        raise SystemExit(str(e)) from None
    print(f"wrote tiny {model} model to {path}")


if __name__ == "__main__":
    import fire

    fire.Fire(main)
