"""A checkpoint's MTP layer without loading the model: what `mtpd inspect` reports and what
`mtpd drafter extract` writes. Only the safetensors headers are read, then the MTP tensors alone
(MLX loads lazily: the trunk's bytes are never read)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import mlx.core as mx
from safetensors import safe_open

from daemon.models import block_io, family


def _config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json in {folder}: expected an mlx-lm or Hugging Face model folder")
    return json.loads(path.read_text())


def tensor_shapes(folder: Path) -> dict[str, tuple[Path, int, str]]:
    """checkpoint key -> (file, elements, safetensors dtype), from the safetensors headers."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {folder}")
    shapes = {}
    for file in files:
        with safe_open(str(file), framework="numpy") as f:
            for key in f.keys():
                piece = f.get_slice(key)
                count = 1
                for d in piece.get_shape():
                    count *= d
                shapes[key] = (file, count, piece.get_dtype())
    return shapes


def tensor_index(folder: Path) -> dict[str, tuple[Path, int]]:
    """checkpoint key -> (file, bytes), from the safetensors headers."""
    return {key: (file, count * itemsize(dtype)) for key, (file, count, dtype) in tensor_shapes(folder).items()}


def _text(config: dict):
    """(the text config, mlx-lm's model class and args for `config`); the text config carries the
    layer count the args derive where the config leaves it implicit (Nemotron-H)."""
    from mlx_lm.utils import _get_classes

    model_cls, args_cls = _get_classes(config)
    args = args_cls.from_dict(config)
    return family.text_config(config, getattr(args, "num_hidden_layers", None)), model_cls, args


def itemsize(dtype: str) -> int:
    return {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2}.get(
        dtype, 1)


def inspect(path: str) -> dict:
    """The family, the MTP tensors found and their bytes against the model's, and what mtpd does;
    for a block drafter's folder, what kind it is."""
    folder = Path(path)
    if folder.suffix == ".gguf" or not folder.is_dir():
        if not folder.is_file():
            raise FileNotFoundError(f"no such model: {folder}")
        return {"model": str(folder), "family": "llama (GGUF)", "mtp_tensors": 0,
                "plan": "plain decoding; a drafter folder (--drafter DIR, mtpd train-drafter) speculates"}
    config = _config(folder)
    if block_io.kind(config):
        return block_io.describe(folder, config)
    adapter = family.adapter(config["model_type"])
    text = _text(config)[0] if adapter is not None else family.text_config(config)
    index = tensor_index(folder)
    mtp = [k for k in index if adapter is not None and adapter.is_mtp(k, text)]
    total, mtp_bytes = sum(b for _, b in index.values()), sum(index[k][1] for k in mtp)
    report = {"model": str(folder), "family": config["model_type"], "layers": text.get("num_hidden_layers"),
              "hidden_size": text.get("hidden_size"), "tensors": len(index), "bytes": total,
              "mtp_layers": len({adapter.LAYER.match(k).group(1) for k in mtp}), "mtp_tensors": len(mtp),
              "mtp_bytes": mtp_bytes, "mtp_share": mtp_bytes / total if total else 0.0}
    if adapter is None:
        report["plan"] = "plain decoding: mtpd has no MTP adapter for this family (a trained drafter folder still works)"
    else:
        report["forward"] = adapter.FORWARD
        why = family.unsupported(config["model_type"], mtp)
        if why:
            report["plan"] = f"plain decoding: {why}"
        elif mtp:
            report["plan"] = "speculates with the checkpoint's own MTP layer"
        else:
            report["plan"] = ("plain decoding: this checkpoint has no MTP tensors (a conversion that dropped them?); "
                              "`mtpd drafter extract ORIGINAL --out DIR`, then --drafter DIR")
    return report


def read_mtp(folder: Path) -> tuple[dict, dict, list[dict]]:
    """(the checkpoint's config, its text config, the MTP layers in the drafter's names), reading
    only the MTP tensors."""
    config = _config(folder)
    adapter = family.adapter(config["model_type"])
    if adapter is None:
        raise ValueError(f"no MTP adapter for the {config['model_type']!r} family")
    text, model_cls, args = _text(config)
    owner = SimpleNamespace(args=args)  # sanitize reads the model's args alone
    lazy = {}
    for file in sorted(folder.glob("*.safetensors")):
        lazy.update(mx.load(str(file)))
    mtp = {k: lazy.pop(k) for k in [k for k in lazy if adapter.is_mtp(k, text)]}
    if not mtp:
        raise ValueError(f"{folder} has no MTP tensors for the {config['model_type']!r} family")
    if why := family.unsupported(config["model_type"], mtp):
        raise ValueError(f"{folder}: {why}")
    sanitize = getattr(model_cls, "sanitize", None)
    converted = adapter.convert(mtp, lazy, text, (lambda w: sanitize(owner, w)) if sanitize else (lambda w: w))
    return config, text, converted


def extract(src: str, out: str, bits: int | None = None) -> dict:
    """Writes the MTP layer of the checkpoint at `src` as a drafter folder at `out` (quantized to
    `bits` when given), for `--drafter DIR` next to a conversion that dropped it."""
    from daemon.models import drafter_io

    _, text, mtp = read_mtp(Path(src))
    drafter = drafter_io.from_checkpoint(text, mtp)
    if bits is not None:
        drafter_io.quantize(drafter, bits, keep_quantized=True)
    drafter_io.save(drafter, out, extra={"source": str(src), "bits": bits})
    return {"drafter": str(out), "family": text["model_type"], "layers": len(mtp), "tensors": sum(map(len, mtp)),
            "bits": bits}
