"""Finding a model folder in the diffusers layout, locally or through the Hugging Face hub cache.

Every failure is one sentence that says what was expected, never a traceback from the hub client.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from huggingface_hub import snapshot_download

from qflux.config.errors import QfluxError


def resolve_model_dir(name_or_path: str, subfolders: Sequence[str], *, pipeline: str) -> Path:
    """Return a local folder that holds ``model_index.json`` and the given component subfolders.

    Args:
        name_or_path: a local folder, or a hub id (``owner/name``) fetched into the hub cache.
        subfolders: component folders that must exist (``transformer``, ``vae``, ...).
        pipeline: the pipeline name for messages, e.g. ``"FLUX.1 Kontext"``.

    Raises:
        QfluxError: the folder is missing, has the wrong layout, or the hub id cannot be fetched.
    """
    path = Path(name_or_path).expanduser()
    looks_local = path.exists() or name_or_path.startswith((".", "/", "~")) or name_or_path.count("/") != 1
    if looks_local:
        if not path.is_dir():
            raise QfluxError(
                f"model folder '{name_or_path}' does not exist; expected a {pipeline} model in the diffusers "
                f"layout (model_index.json plus {', '.join(subfolders)}/) or a hub id like owner/name"
            )
    else:
        path = _fetch_from_hub(name_or_path, subfolders, pipeline=pipeline)
    missing = [s for s in subfolders if not (path / s / _first_config(s)).is_file()]
    if not (path / "model_index.json").is_file() or missing:
        what = ["model_index.json"] if not (path / "model_index.json").is_file() else []
        what += [f"{s}/{_first_config(s)}" for s in missing]
        raise QfluxError(
            f"'{path}' is not a {pipeline} model folder in the diffusers layout: missing {', '.join(what)}"
        )
    return path


def _first_config(subfolder: str) -> str:
    """The file that marks a component folder as present."""
    if subfolder.startswith("tokenizer"):
        return "tokenizer_config.json"
    if subfolder == "scheduler":
        return "scheduler_config.json"
    if subfolder == "processor":
        return "processor_config.json"
    return "config.json"


def _fetch_from_hub(repo_id: str, subfolders: Sequence[str], *, pipeline: str) -> Path:
    """Download (or find in the local hub cache) the files of ``repo_id`` that qflux reads."""
    try:
        patterns = ["model_index.json"] + [f"{s}/*" for s in subfolders]
        return Path(snapshot_download(repo_id, allow_patterns=patterns))
    except Exception as e:  # the hub client raises many types; all mean "not available"
        raise QfluxError(
            f"could not fetch '{repo_id}' from the Hugging Face hub ({type(e).__name__}); download the "
            f"{pipeline} model elsewhere and pass its local folder (diffusers layout, with "
            f"model_index.json) as model.pretrained_model_name_or_path"
        ) from None
