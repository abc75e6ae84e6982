"""What loading a model refuses before (config) and after (weights) reading its files, each in one line:

- a config with no layers or a non-finite number (a NaN `layer_norm_epsilon` makes every output NaN);
- a config that implies far more parameters than its weight files can hold (`n_layer: 1000000` would otherwise
  allocate memory for minutes before failing): the count is taken from the model built on the meta device (no
  memory) with one and two layers, extrapolated linearly, and compared with the files' bytes;
- a tokenizer that does not load, or loads with no vocabulary (its files missing): named as the tokenizer;
- weights the files do not provide, or provide under unknown names or other shapes: transformers would fill the
  missing ones with random values, so two loads would give two models (`allow_missing_weights` loads them
  anyway and the loader records which tensors were not read from the files).
"""

from __future__ import annotations

import math
import os

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack")
MIN_BYTES_PER_PARAMETER = 0.5  # 4-bit quantized files; float16 takes 2, float32 4
SIZE_SLACK_BYTES = 16 << 20  # configs' rounding (vocabulary padding) and file headers
SHOWN_KEYS = 3


class ModelLoadError(RuntimeError):
    pass


def _layers_field(config) -> tuple[str, object]:
    for name in ("num_hidden_layers", "n_layer", "num_layers", "n_layers"):
        if hasattr(config, name):
            return name, getattr(config, name)
    return "", None


def check_config(config, path: str) -> None:
    """No layers, or a NaN / infinite number anywhere in the config: refused before anything is built."""
    name, layers = _layers_field(config)
    shown = {"num_hidden_layers": "n_layer / num_hidden_layers"}.get(name, name)
    if name and (isinstance(layers, bool) or not isinstance(layers, int) or layers < 1):
        raise ModelLoadError(f"{path}: config.json says {shown} = {layers!r}; a model needs at least one layer "
                             f"(knowledge neurons live in its FFN layers): fix config.json or get the model again")
    for key, value in _numbers(config.to_dict()):
        if not math.isfinite(value):
            raise ModelLoadError(f"{path}: config.json has {key} = {value}, not a finite number; every output "
                                 f"would be NaN: fix config.json or get the model again")


def _numbers(tree, prefix: str = ""):
    if isinstance(tree, dict):
        for key, value in tree.items():
            yield from _numbers(value, f"{prefix}{key}.")
    elif isinstance(tree, (list, tuple)):
        for i, value in enumerate(tree):
            yield from _numbers(value, f"{prefix}{i}.")
    elif isinstance(tree, float):
        yield prefix.rstrip("."), tree


def implied_parameters(auto, config) -> int | None:
    """The parameter count `config` implies, from the model built on the meta device with 1 and 2 layers (cheap
    for any size) extrapolated to the config's layers; None when that cannot be worked out."""
    import copy

    import torch

    name, layers = _layers_field(config)
    if not name or not isinstance(layers, int):
        return None
    counts = []
    try:
        for n in (1, 2):
            small = copy.deepcopy(config)
            setattr(small, name, n)
            for field in ("layer_types", "block_types"):  # per-layer lists must match the layer count
                if isinstance(getattr(small, field, None), list):
                    setattr(small, field, getattr(small, field)[:n] or None)
            with torch.device("meta"):
                model = auto.from_config(small)
            counts.append(sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()))
    except Exception:  # noqa: BLE001 - an estimate only: a family that cannot be built this way is not refused
        return None
    per_layer = counts[1] - counts[0]
    return counts[0] + per_layer * (layers - 1)


def check_size(auto, config, path: str) -> None:
    """Refuses a config whose size cannot be in the weight files next to it (before memory is allocated)."""
    files = [f for f in os.listdir(path) if f.endswith(WEIGHT_SUFFIXES)]
    if not files:
        return  # transformers names the missing files in its own error
    on_disk = sum(os.path.getsize(os.path.join(path, f)) for f in files)
    implied = implied_parameters(auto, config)
    if implied is None or implied * MIN_BYTES_PER_PARAMETER <= on_disk + SIZE_SLACK_BYTES:
        return
    name, layers = _layers_field(config)
    raise ModelLoadError(f"{path}: config.json ({name} = {layers}) implies {implied:.3g} parameters, but the weight "
                         f"files hold {on_disk / 1e6:.3g} MB (room for at most "
                         f"{on_disk / MIN_BYTES_PER_PARAMETER:.3g}): config.json does not belong with these weights; "
                         f"fix it or get the model again")


def load_tokenizer(auto_tokenizer, path: str, source: str, trust_remote_code: bool, local_only: bool):
    """The tokenizer, or one line naming the tokenizer (not the weights) as what failed to load."""
    where = path if os.path.isdir(path) else repr(source)
    try:
        tokenizer = auto_tokenizer.from_pretrained(path, trust_remote_code=trust_remote_code,
                                                   local_files_only=local_only)
    except Exception as exc:  # noqa: BLE001 - tokenizers, json and transformers raise many types for a bad file
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        files = sorted(f for f in os.listdir(path) if "token" in f or f in ("vocab.txt", "vocab.json", "merges.txt",
                                                                            "spiece.model")) \
            if os.path.isdir(path) else []
        raise ModelLoadError(f"could not load the tokenizer in {where} ({', '.join(files) or 'no tokenizer files'}): "
                             f"{(lines[0] if lines else type(exc).__name__)[:200]}; the tokenizer files are damaged "
                             f"or incomplete: get them again with the model") from exc
    if len(tokenizer) <= 1:
        raise ModelLoadError(f"the tokenizer in {where} has no vocabulary (its files, e.g. tokenizer.json, are "
                             f"missing): copy the tokenizer files next to the model (save_pretrained writes them)")
    return tokenizer


def weights_not_from_files(loading: dict, path: str, allow: bool) -> dict:
    """{missing, unexpected, mismatched: [names]} of transformers' loading info (empty when every tensor came from
    the files); refused in one line unless `allow`."""
    found = {"missing": sorted(loading.get("missing_keys") or ()),
             "unexpected": sorted(loading.get("unexpected_keys") or ()),
             "mismatched": sorted(f"{k[0]} (file {tuple(k[1])}, model {tuple(k[2])})" if isinstance(k, tuple)
                                  else str(k) for k in (loading.get("mismatched_keys") or ()))}
    found = {kind: names for kind, names in found.items() if names}
    if not found or allow:
        return found
    said = {"missing": "not in the weight files (they would be random values)",
            "unexpected": "in the files but unknown to the model",
            "mismatched": "of another shape than the model's"}
    parts = [f"{len(names)} tensor(s) {said[kind]}: {', '.join(names[:SHOWN_KEYS])}"
             + (f" and {len(names) - SHOWN_KEYS} more" if len(names) > SHOWN_KEYS else "")
             for kind, names in found.items()]
    raise ModelLoadError(f"the weights in {path} do not match the model: {'; '.join(parts)}; get the complete "
                         f"model again (or pass --allow-missing-weights to use it anyway, recorded with the results)")
