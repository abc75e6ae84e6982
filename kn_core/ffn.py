"""The FFN neurons of a loaded model, found through its family's row in `families.FAMILIES`.

A knowledge neuron is a coordinate of the *input* of the FFN's output projection (post-activation; for gated
FFNs act(gate) * up). Its value vector is the matching column of that projection's weight (row for GPT-2's
Conv1D, which stores the weight transposed). Reading, scaling and zeroing neurons are forward-pre-hooks on that
module (`hooks.ActivationPatch`); update and erase write its weight.

Mixture-of-experts families (`FamilySpec.moe`): a layer's neurons are its experts' neurons flattened into one
axis (`moe.py`); `experts[layer]` lists each expert's span, `width(layer)` the layer's size. `neurons` is the
widest layer; a narrower one (a dense layer of an MoE model) is padded with zero activations and scores, which no
threshold selects and `check_neurons` refuses.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Callable

import torch
from torch import nn

from . import moe
from .families import FamilySpec, UnsupportedModelError, get_path, spec_for_config


def _is_conv1d(module: nn.Module) -> bool:
    # transformers' Conv1D (GPT-2 family) stores weight as (in_features, out_features).
    return type(module).__name__ == "Conv1D"


def spec_from_structure(model: nn.Module, no_row: UnsupportedModelError,
                        check: bool = True) -> tuple[FamilySpec, str]:
    """A row read from the structure of a model whose family has none, or the refusal: why, and the row to add.
    `check=False` reads the structure only (a model on the meta device, before its weights are loaded)."""
    from .discover import check_reading, discover_spec

    try:
        spec, found = discover_spec(model)
        if check and check_reading(FFNLayout(model, spec=spec)):
            spec = replace(spec, flattens_tokens=True)
        return spec, found
    except UnsupportedModelError as reason:
        message = str(no_row).replace(" is not supported;", f" is not supported ({reason}); add its row to "
                                      f"kn_core/families.py (see docs/ARCHITECTURE.md);", 1)
        raise UnsupportedModelError(message) from None


class FFNLayout:
    """The FFN neurons of one loaded model: hook points, value vectors, embeddings and the vocabulary head."""

    def __init__(self, model: nn.Module, spec: FamilySpec | None = None):
        """`spec`: the family's row; by default the row of the model's config, or for a family without one a
        row read from the model's structure (`discover`), which `found` then describes in one line."""
        model_type = getattr(model.config, "model_type", None)
        self.found: str | None = None
        if spec is None:
            try:
                spec = spec_for_config(model.config)
            except UnsupportedModelError as no_row:
                spec, self.found = spec_from_structure(model, no_row)
        self.model = model
        self.family = model_type
        self.spec = spec
        self.kind = spec.kind
        self.experts: list[list[moe.Expert]] | None = None  # per layer, in MoE models
        try:
            self.blocks: list[nn.Module] = list(get_path(model, spec.blocks))
            if spec.moe:
                self.out_projs, self.experts = moe.install(self)
                self._widths = [sum(expert.size for expert in spans) for spans in self.experts]
            else:
                self.out_projs: list[nn.Module] = [get_path(block, spec.out_proj) for block in self.blocks]
        except AttributeError as exc:
            raise UnsupportedModelError(
                f"{type(model).__name__} ({model_type}) does not have the expected layout "
                f"{spec.blocks}[i].{spec.out_proj}; load it as a language-model head class "
                f"({spec.auto_class})"
            ) from exc
        self.final_norm = self._optional(spec.final_norm)  # e.g. OPT-350m has none (the attribute is None)
        self.project_out = self._optional(spec.project_out)
        # BERT-style blocks as an encoder (a BERT configured as a decoder gets cross-attention in its blocks)
        self.bert_style = spec.bert_style and not getattr(model.config, "is_decoder", False)

    def _optional(self, dotted: str | None) -> nn.Module | None:
        try:
            module = get_path(self.model, dotted) if dotted else None
        except AttributeError:
            return None
        return module if callable(module) else None

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
        if self.experts is not None:
            return max(self._widths)
        proj = self.out_projs[0]
        return proj.weight.shape[0] if _is_conv1d(proj) else proj.weight.shape[1]

    def width(self, layer: int) -> int:
        """The neurons of one layer (all layers have `neurons` but a dense layer of an MoE model)."""
        return self.neurons if self.experts is None else self._widths[layer]

    @property
    def hidden(self) -> int:
        return int(self.input_embeddings().shape[1]) if self.experts is not None else self._dense_hidden()

    def _dense_hidden(self) -> int:
        proj = self.out_projs[0]
        return proj.weight.shape[1] if _is_conv1d(proj) else proj.weight.shape[0]

    def expert_of(self, layer: int, index: int) -> tuple[int, int]:
        """(expert, expert-local neuron) of a neuron of an MoE model's layer."""
        for expert in self.experts[layer]:
            if expert.offset <= index < expert.offset + expert.size:
                return expert.expert, index - expert.offset
        raise ValueError(f"neuron ({layer}, {index}) is outside layer {layer}'s {self.width(layer)} neurons")

    def neuron_dict(self, layer: int, index: int) -> dict:
        """A neuron as JSON names it: {"layer", "neuron"}; in an MoE model {"layer", "expert", "neuron" (within
        the expert), "index" (in the layer's flattened axis)}."""
        if self.experts is None:
            return {"layer": layer, "neuron": index}
        expert, local = self.expert_of(layer, index)
        return {"layer": layer, "expert": expert, "neuron": local, "index": index}

    def value_slices(self, layer: int, neurons):
        """(2-D weight, neuron axis, positions in `neurons`, indices into that weight) for each weight holding
        some of the value vectors of `neurons` (one layer): one for a dense layer, one per expert in an MoE
        layer. Writing a slice of such a weight writes the model's weights."""
        neurons = [int(i) for i in neurons]
        point = self.out_projs[layer]
        if isinstance(point, moe.ExpertNeurons):
            yield from point.value_slices(neurons)
        else:
            yield point.weight, self.neuron_axis(layer), list(range(len(neurons))), neurons

    def neuron_axis(self, layer: int) -> int:
        """The axis of the out-projection weight that indexes neurons (0 for Conv1D, 1 for Linear)."""
        return 0 if _is_conv1d(self.out_projs[layer]) else 1

    def value_weight(self, layer: int) -> nn.Parameter:
        return self.out_projs[layer].weight

    def value_vectors(self, layer: int, neurons) -> torch.Tensor:
        """Value vectors of the given neurons of one layer, shape (len(neurons), hidden)."""
        parts = []
        for weight, axis, positions, local in self.value_slices(layer, neurons):
            index = torch.as_tensor(local, dtype=torch.long, device=weight.device)
            picked = weight.index_select(axis, index)
            parts.append((positions, picked if axis == 0 else picked.T))
        if len(parts) == 1:
            return parts[0][1]
        if not parts:  # no neurons asked for in an MoE layer
            return self.output_embeddings().new_zeros(0, self.hidden)
        out = torch.empty(len(neurons), self.hidden, dtype=parts[0][1].dtype, device=parts[0][1].device)
        for positions, vectors in parts:
            out[torch.as_tensor(positions, device=out.device)] = vectors.to(out.device)
        return out

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
        steps = [m for m in (self.final_norm, self.project_out) if m is not None]
        logits = self.logits_head()

        def head(h: torch.Tensor) -> torch.Tensor:
            for step in steps:
                h = step(h)
            return logits(h)
        return head

    def logits_head(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """Maps the base model's output hidden states (after any final norm) to logits."""
        model = self.model
        if self.spec.head:
            steps = [get_path(model, dotted) for dotted in self.spec.head]
            if len(steps) == 1:
                return steps[0]

            def through(h: torch.Tensor) -> torch.Tensor:
                for step in steps:
                    h = step(h)
                return h
            return through
        head = model.get_output_embeddings()
        # an image-text wrapper's own config: its text path does not apply its text config's softcapping (Gemma 3)
        config = model.config
        # The causal-LM classes of some families post-process lm_head's output; the hidden state alone is not enough.
        scaling = getattr(config, "logits_scaling", None)  # Granite divides the logits
        multiplier = getattr(config, "logit_scale", None)  # Cohere multiplies them
        softcap = getattr(config, "final_logit_softcapping", None)  # Gemma-2: tanh(x / cap) * cap
        if not scaling and not softcap and not multiplier:
            return head

        def finish(h: torch.Tensor) -> torch.Tensor:
            out = head(h)
            if scaling:
                out = out / scaling
            if multiplier:
                out = out * multiplier
            if softcap:
                out = torch.tanh(out / softcap) * softcap
            return out
        return finish

    def base_model(self) -> nn.Module:
        return self.model.base_model
