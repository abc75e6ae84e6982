"""Knowledge neurons inside mixture-of-experts layers.

transformers 5 stores a layer's experts as 3-D parameters (`gate_up_proj [E, 2F, D]`, `down_proj [E, D, F]`;
transposed, with biases, in GPT-OSS), so there is no per-expert module whose input could be hooked. Here each
MoE layer gets one point whose input is the layer's neurons, flattened: neuron `expert * F + i` for routed expert
`expert` and its intermediate unit i; shared experts follow the routed ones (expert id E, width of their MLP).
A layer that is dense in an MoE model (DeepSeek's first layers, Qwen-MoE's `mlp_only_layers`) is one expert
(id 0): its neurons are the input of its `down_proj`, as in a dense model.

A neuron's activation on a token is the expert's intermediate activation (the input of the expert's down
projection, act(gate) * up) times the token's routing weight (a shared expert's weight is its gate, sigmoid, or
1), and 0 where the token is not routed to the expert. The layer's output is then exactly
sum over neurons of activation x value vector (the neuron's column of its expert's down projection) plus, for
GPT-OSS, the routed experts' biases times their routing weights.

The MoE module's forward is wrapped once, when the layout is built (`install`); the wrapper runs the model's
own forward unless the neurons are in use: a hook on the layer's `ExpertNeurons` point, or routing being
captured or held (`hooks.capture_routing`, `hooks.hold_routing`). Then it computes the same output through the
neuron axis, experts running only on the tokens routed to them.
"""

from __future__ import annotations

import types
from dataclasses import dataclass

import torch
from torch import nn

from .families import UnsupportedModelError, get_path
from .hooks import routing_for, routing_mode


@dataclass(frozen=True)
class Expert:
    """One expert's span of its layer's neuron axis."""
    expert: int  # id within the layer: routed experts 0..E-1, then shared ones
    offset: int  # its first neuron in the layer's flattened axis
    size: int  # its neurons (intermediate units)
    shared: bool = False  # a shared expert: every token goes through it


@dataclass
class Routing:
    """The routing of the tokens of one forward of one MoE layer: top-k expert ids and weights per token, and
    the shared experts' gate (None where they have none)."""
    index: torch.Tensor  # [tokens, k]
    weights: torch.Tensor  # [tokens, k]
    shared: torch.Tensor | None  # [tokens, 1]

    def repeated(self, tokens: int) -> "Routing":
        """This routing for a batch of `tokens` that repeats the recorded tokens (rows of the same sequence)."""
        n = self.index.shape[0]
        if tokens == n:
            return self
        if tokens % n:
            raise RuntimeError(f"held routing of {n} tokens cannot cover a forward of {tokens} tokens")
        reps = tokens // n
        return Routing(self.index.repeat(reps, 1), self.weights.repeat(reps, 1),
                       None if self.shared is None else self.shared.repeat(reps, 1))


class ExpertNeurons(nn.Module):
    """The hook point of one MoE layer: its input is the layer's neurons (batch, seq, width), its output the
    experts' contribution to the residual stream. Never registered in the model (no parameters of its own): the
    MoE module's wrapped forward calls it, so pre-hooks on it see and may replace the neurons."""

    def __init__(self, moe: nn.Module, spec, experts: list[Expert]):
        super().__init__()
        object.__setattr__(self, "moe", moe)  # a plain reference: the model's modules stay where they are
        self.spec = spec
        self.experts = experts
        self.width = sum(e.size for e in experts)

    @property
    def routed(self) -> nn.Module:
        return self.moe.experts

    def shared_mlp(self) -> nn.Module | None:
        return getattr(self.moe, self.spec.shared_expert) if self.spec.shared_expert else None

    def in_use(self) -> bool:
        return bool(self._forward_pre_hooks or self._forward_hooks) or routing_mode() is not None

    # --- the neurons and what they write -----------------------------------------------------------------

    def activations(self, flat: torch.Tensor, routing: Routing) -> torch.Tensor:
        """The layer's neurons [tokens, width] for hidden states [tokens, D]."""
        experts = self.routed
        size = self.experts[0].size
        out = flat.new_zeros(flat.shape[0], self.width)
        for e, tokens, slot in _routed_tokens(routing.index, experts.num_experts):
            weight = experts.gate_up_proj[e]
            gate_up = flat[tokens] @ weight if experts.is_transposed else nn.functional.linear(flat[tokens], weight)
            if experts.has_bias:
                gate_up = gate_up + experts.gate_up_proj_bias[e]
            h = experts._apply_gate(gate_up) * routing.weights[tokens, slot, None].to(flat.dtype)
            out[tokens, e * size:(e + 1) * size] = h
        shared = self.shared_mlp()
        if shared is not None:
            h = shared.act_fn(shared.gate_proj(flat)) * shared.up_proj(flat)
            if routing.shared is not None:
                h = h * routing.shared.to(h.dtype)
            out[:, self.experts[-1].offset:] = h
        return out

    def forward(self, neurons: torch.Tensor, routing: Routing) -> torch.Tensor:
        """The experts' output [tokens, D] from the neurons [..., width]: each expert's down projection of its
        neurons on the tokens routed to it (plus its bias times the routing weight), and the shared experts'."""
        flat = neurons.reshape(-1, neurons.shape[-1])
        experts = self.routed
        size = self.experts[0].size
        hidden = experts.down_proj.shape[-1 if experts.is_transposed else -2]
        out = flat.new_zeros(flat.shape[0], hidden)
        for e, tokens, slot in _routed_tokens(routing.index, experts.num_experts):
            h = flat[tokens, e * size:(e + 1) * size]
            down = experts.down_proj[e]
            y = h @ down if experts.is_transposed else nn.functional.linear(h, down)
            if experts.has_bias:
                y = y + experts.down_proj_bias[e] * routing.weights[tokens, slot, None].to(y.dtype)
            out = out.index_add(0, tokens, y.to(out.dtype))
        shared = self.shared_mlp()
        if shared is not None:
            out = out + shared.down_proj(flat[:, self.experts[-1].offset:])
        return out

    def value_slices(self, indices: list[int]):
        """(2-D weight view, neuron axis, positions in `indices`, expert-local indices) per expert touched."""
        experts = self.routed
        for expert in self.experts:
            picked = [(k, i - expert.offset) for k, i in enumerate(indices)
                      if expert.offset <= i < expert.offset + expert.size]
            if not picked:
                continue
            if expert.shared:
                weight, axis = self.shared_mlp().down_proj.weight, 1
            else:  # a view into the 3-D parameter: writes go to the model's weights
                weight, axis = experts.down_proj[expert.expert], (0 if experts.is_transposed else 1)
            yield weight, axis, [k for k, _ in picked], [i for _, i in picked]

    # --- routing -------------------------------------------------------------------------------------------

    def route(self, flat: torch.Tensor) -> Routing:
        """The model's own routing of hidden states [tokens, D] (the router and the shared experts' gate)."""
        _, weights, index = getattr(self.moe, self.spec.router)(flat)
        gate = getattr(self.moe, self.spec.shared_expert_gate) if self.spec.shared_expert_gate else None
        shared = torch.sigmoid(gate(flat)) if gate is not None else None
        return Routing(index, weights, shared)


def _routed_tokens(index: torch.Tensor, num_experts: int):
    """(expert, tokens routed to it, their top-k slot) for each expert that gets a token."""
    with torch.no_grad():
        hit = torch.unique(index[(index >= 0) & (index < num_experts)]).tolist()
    for e in hit:
        tokens, slot = torch.where(index == e)
        yield e, tokens, slot


def _wrapped_forward(module: nn.Module, hidden_states: torch.Tensor, *args, **kwargs):
    """The MoE module's forward: the model's own, or through the neuron axis while the neurons are in use."""
    point: ExpertNeurons = module.__dict__["_kn_neurons"]
    if not point.in_use():
        inner = module.__dict__.get("_kn_inner_forward")
        return inner(hidden_states, *args, **kwargs) if inner is not None else \
            type(module).forward(module, hidden_states, *args, **kwargs)
    shape = hidden_states.shape
    flat = hidden_states.reshape(-1, shape[-1])
    routing = routing_for(module, flat.shape[0], lambda: point.route(flat))
    neurons = point.activations(flat, routing).view(*shape[:-1], point.width)
    out = point(neurons, routing).view(shape).to(hidden_states.dtype)
    return (out, routing.weights) if point.spec.moe_returns_scores else out


def _check_experts(experts: nn.Module, where: str) -> None:
    missing = [name for name in ("gate_up_proj", "down_proj", "num_experts", "is_transposed", "has_bias",
                                 "_apply_gate") if not hasattr(experts, name)]
    if missing or not getattr(experts, "has_gate", True) or getattr(experts, "has_post_expert_norm", False):
        raise UnsupportedModelError(
            f"{where} is not a transformers-5 experts module with fused gate/up weights (missing or different: "
            f"{', '.join(missing) or 'gate or post-expert norm'}); knowledge neurons in its experts are not supported")
    if experts.down_proj.device.type == "meta":  # offloaded: the neuron path reads the weights directly
        raise UnsupportedModelError(f"{where} has its weights offloaded (on the meta device); knowledge neurons in "
                                    f"experts need them in memory: load the model without disk or CPU offload")


def install(layout) -> tuple[list[nn.Module], list[list[Expert]]]:
    """Per layer: the hook point (an `ExpertNeurons`, or the down projection of a dense layer) and its experts.
    Wraps each MoE module's forward once (a second layout of the same model reuses the points)."""
    spec, points, experts = layout.spec, [], []
    for layer, block in enumerate(layout.blocks):
        module = get_path(block, spec.moe)
        if not hasattr(module, "experts"):  # a dense layer: one expert
            proj = get_path(block, spec.out_proj)
            points.append(proj)
            experts.append([Expert(0, 0, int(proj.weight.shape[1]))])
            continue
        if "_kn_neurons" not in module.__dict__:
            routed = module.experts
            _check_experts(routed, f"layer {layer}'s {spec.moe}.experts")
            size = int(routed.down_proj.shape[1 if routed.is_transposed else 2])
            spans = [Expert(e, e * size, size) for e in range(routed.num_experts)]
            if spec.shared_expert:
                shared = getattr(module, spec.shared_expert)
                spans.append(Expert(routed.num_experts, routed.num_experts * size,
                                    int(shared.down_proj.weight.shape[1]), shared=True))
            module.__dict__["_kn_neurons"] = ExpertNeurons(module, spec, spans)
            if "forward" in module.__dict__:  # e.g. accelerate's device hook: keep it inside ours
                module.__dict__["_kn_inner_forward"] = module.__dict__["forward"]
            module.forward = types.MethodType(_wrapped_forward, module)
        point = module.__dict__["_kn_neurons"]
        points.append(point)
        experts.append(point.experts)
    return points, experts
