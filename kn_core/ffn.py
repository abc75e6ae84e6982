"""Where each model family keeps its FFN neurons: one hook point per layer.

A knowledge neuron is a coordinate of the *input* of the FFN's output projection (post-activation; for gated
FFNs act(gate) * up). Its value vector is the matching column of that projection's weight (row for GPT-2's
Conv1D, which stores the weight transposed). Reading, scaling and zeroing neurons are forward-pre-hooks on that
module; update and erase write its weight.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


class UnsupportedModelError(ValueError):
    pass


@dataclass(frozen=True)
class FamilySpec:
    kind: str  # "masked" | "causal"
    blocks: str  # dotted path from the top model to the list of transformer blocks
    out_proj: str  # dotted path from one block to the FFN output projection
    final_norm: str | None  # dotted path from the top model to the norm applied before the vocabulary head


_LLAMA_LIKE = FamilySpec("causal", "model.layers", "mlp.down_proj", "model.norm")

FAMILIES: dict[str, FamilySpec] = {
    "bert": FamilySpec("masked", "bert.encoder.layer", "output.dense", None),
    "roberta": FamilySpec("masked", "roberta.encoder.layer", "output.dense", None),
    "xlm-roberta": FamilySpec("masked", "roberta.encoder.layer", "output.dense", None),
    "camembert": FamilySpec("masked", "roberta.encoder.layer", "output.dense", None),
    "distilbert": FamilySpec("masked", "distilbert.transformer.layer", "ffn.lin2", None),
    "electra": FamilySpec("masked", "electra.encoder.layer", "output.dense", None),
    "gpt2": FamilySpec("causal", "transformer.h", "mlp.c_proj", "transformer.ln_f"),
    "gpt_bigcode": FamilySpec("causal", "transformer.h", "mlp.c_proj", "transformer.ln_f"),
    "gpt_neo": FamilySpec("causal", "transformer.h", "mlp.c_proj", "transformer.ln_f"),
    "gptj": FamilySpec("causal", "transformer.h", "mlp.fc_out", "transformer.ln_f"),
    "gpt_neox": FamilySpec("causal", "gpt_neox.layers", "mlp.dense_4h_to_h", "gpt_neox.final_layer_norm"),
    "opt": FamilySpec("causal", "model.decoder.layers", "fc2", "model.decoder.final_layer_norm"),
    "bloom": FamilySpec("causal", "transformer.h", "mlp.dense_4h_to_h", "transformer.ln_f"),
    "falcon": FamilySpec("causal", "transformer.h", "mlp.dense_4h_to_h", "transformer.ln_f"),
    "phi": FamilySpec("causal", "model.layers", "mlp.fc2", "model.final_layernorm"),
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "phi3": _LLAMA_LIKE,
    "olmo": _LLAMA_LIKE,
    "olmo2": _LLAMA_LIKE,
    "stablelm": _LLAMA_LIKE,
    "granite": _LLAMA_LIKE,
    "smollm3": _LLAMA_LIKE,
}


_FLATTENS_TOKENS = {"opt"}  # families whose blocks reshape (batch, seq, hidden) to (batch * seq, hidden)


def supported_families() -> list[str]:
    return sorted(FAMILIES)


def _get(obj: object, dotted: str):
    for name in dotted.split("."):
        obj = getattr(obj, name)
    return obj


def _is_conv1d(module: nn.Module) -> bool:
    # transformers' Conv1D (GPT-2 family) stores weight as (in_features, out_features).
    return type(module).__name__ == "Conv1D"


class FFNLayout:
    """The FFN neurons of one loaded model: hook points, value vectors, embeddings and the vocabulary head."""

    def __init__(self, model: nn.Module):
        model_type = getattr(model.config, "model_type", None)
        spec = FAMILIES.get(model_type)
        if spec is None:
            raise UnsupportedModelError(
                f"model family {model_type!r} is not supported; supported families: "
                + ", ".join(supported_families())
            )
        self.model = model
        self.family = model_type
        self.spec = spec
        self.kind = spec.kind
        try:
            self.blocks: list[nn.Module] = list(_get(model, spec.blocks))
            self.out_projs: list[nn.Module] = [_get(block, spec.out_proj) for block in self.blocks]
        except AttributeError as exc:
            raise UnsupportedModelError(
                f"{type(model).__name__} ({model_type}) does not have the expected layout "
                f"{spec.blocks}[i].{spec.out_proj}; load it as a language-model head class "
                f"({'AutoModelForMaskedLM' if spec.kind == 'masked' else 'AutoModelForCausalLM'})"
            ) from exc
        self.final_norm: nn.Module | None = _get(model, spec.final_norm) if spec.final_norm else None
        if self.final_norm is not None and not callable(self.final_norm):
            self.final_norm = None  # e.g. OPT-350m has no final layer norm (attribute is None)

    def path_to_out_proj(self, layer: int) -> list[nn.Module]:
        """The block of `layer` and its submodules that contain the out-projection, outermost first."""
        path, module = [self.blocks[layer]], self.blocks[layer]
        for name in self.spec.out_proj.split(".")[:-1]:
            module = getattr(module, name)
            path.append(module)
        return path

    @property
    def layers(self) -> int:
        return len(self.out_projs)

    @property
    def neurons(self) -> int:
        proj = self.out_projs[0]
        return proj.weight.shape[0] if _is_conv1d(proj) else proj.weight.shape[1]

    @property
    def hidden(self) -> int:
        proj = self.out_projs[0]
        return proj.weight.shape[1] if _is_conv1d(proj) else proj.weight.shape[0]

    def neuron_axis(self, layer: int) -> int:
        """The axis of the out-projection weight that indexes neurons (0 for Conv1D, 1 for Linear)."""
        return 0 if _is_conv1d(self.out_projs[layer]) else 1

    def value_weight(self, layer: int) -> nn.Parameter:
        return self.out_projs[layer].weight

    def value_vectors(self, layer: int, neurons) -> torch.Tensor:
        """Value vectors of the given neurons of one layer, shape (len(neurons), hidden)."""
        weight = self.value_weight(layer)
        index = torch.as_tensor(neurons, dtype=torch.long, device=weight.device)
        picked = weight.index_select(self.neuron_axis(layer), index)
        return picked if self.neuron_axis(layer) == 0 else picked.T

    def value_vector(self, layer: int, neuron: int) -> torch.Tensor:
        return self.value_vectors(layer, [neuron])[0]

    def input_embeddings(self) -> torch.Tensor:
        return self.model.get_input_embeddings().weight

    def output_embeddings(self) -> torch.Tensor:
        head = self.model.get_output_embeddings()
        return (head if head is not None else self.model.get_input_embeddings()).weight

    def ties_embeddings(self) -> bool:
        return self.output_embeddings().data_ptr() == self.input_embeddings().data_ptr()

    def vocab_head(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """Maps final hidden states (..., hidden) to vocabulary logits (..., vocab).

        For causal models the final norm (and OPT's project_out) is applied here, so pass the last block's
        output (pre-norm) when projecting a value vector; model outputs (`last_hidden_state`) are already
        normed: use `logits_head`.
        """
        if self.kind != "causal":
            return self.logits_head()
        steps = [m for m in (self.final_norm, self._project_out()) if m is not None]
        logits = self.logits_head()

        def head(h: torch.Tensor) -> torch.Tensor:
            for step in steps:
                h = step(h)
            return logits(h)
        return head

    def logits_head(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """Maps the base model's output hidden states (after any final norm) to logits."""
        model, family = self.model, self.family
        if family == "bert":
            return model.cls
        if family in ("roberta", "xlm-roberta", "camembert"):
            return model.lm_head
        if family == "electra":
            return lambda h: model.generator_lm_head(model.generator_predictions(h))
        if family == "distilbert":
            return lambda h: model.vocab_projector(
                model.vocab_layer_norm(model.activation(model.vocab_transform(h)))
            )
        head = model.get_output_embeddings()
        config = model.config
        # The causal-LM classes of some families post-process lm_head's output; the hidden state alone is not enough.
        scaling = getattr(config, "logits_scaling", None)  # Granite divides the logits
        softcap = getattr(config, "final_logit_softcapping", None)  # Gemma-2: tanh(x / cap) * cap
        if not scaling and not softcap:
            return head

        def finish(h: torch.Tensor) -> torch.Tensor:
            out = head(h)
            if scaling:
                out = out / scaling
            if softcap:
                out = torch.tanh(out / softcap) * softcap
            return out
        return finish

    def _project_out(self) -> nn.Module | None:
        # OPT-350m maps hidden (1024) to its word-embedding width (512) after the final norm.
        decoder = getattr(getattr(self.model, "model", None), "decoder", None)
        return getattr(decoder, "project_out", None) if self.family == "opt" else None

    def base_model(self) -> nn.Module:
        return self.model.base_model


def locate_ffn(model: nn.Module) -> FFNLayout:
    return FFNLayout(model)


class ActivationPatch:
    """Forward-pre-hooks on the out-projections; `fn(layer, x) -> x` may return a replaced input.

    `x` is always (batch, seq, neurons): OPT's layers flatten tokens to (batch * seq, ...) before the FFN, so
    the block's input shape is recorded and the activation is viewed back to it around `fn`.
    """

    def __init__(self, layout: FFNLayout, fn: Callable[[int, torch.Tensor], torch.Tensor | None],
                 layers=None):
        self.handles = []
        for layer in (range(layout.layers) if layers is None else layers):
            token_shape: list[torch.Size] = []

            def remember(module, args, kwargs, token_shape=token_shape):
                hidden = args[0] if args else kwargs.get("hidden_states")
                token_shape[:] = [hidden.shape[:-1]] if isinstance(hidden, torch.Tensor) else []

            def hook(module, args, layer=layer, token_shape=token_shape):
                x = args[0]
                flat = x.dim() == 2 and bool(token_shape)
                out = fn(layer, x.view(*token_shape[0], x.shape[-1]) if flat else x)
                if out is None:
                    return None
                return (out.reshape(x.shape) if flat else out,) + tuple(args[1:])

            if layout.family in _FLATTENS_TOKENS:
                self.handles.append(layout.blocks[layer].register_forward_pre_hook(remember, with_kwargs=True))
            self.handles.append(layout.out_projs[layer].register_forward_pre_hook(hook))

    def remove(self):
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def capture_activations(layout: FFNLayout, run: Callable[[], object], layers=None) -> tuple[object, dict[int, torch.Tensor]]:
    """Runs `run()` and returns its result and the out-projection inputs (batch, seq, neurons) per layer."""
    captured: dict[int, torch.Tensor] = {}

    def record(layer, x):
        captured[layer] = x.detach()
        return None

    with ActivationPatch(layout, record, layers):
        result = run()
    return result, captured
