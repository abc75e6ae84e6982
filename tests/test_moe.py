"""Knowledge neurons inside mixture-of-experts layers (kn_core/moe.py, docs/MOE.md), on tiny random models of
every MoE family, against references that use the model's own forward and compute one expert neuron by hand.

A neuron (layer, expert, i) has activation = the expert's act(gate) * up at unit i times the token's routing
weight (0 where the token is not routed to the expert); attribution scales it with every layer's routing held
at the clean run's.
"""

import numpy as np
import pytest
import torch

from kn_core.attribution import AttributionParams, attribute, encode_answer
from kn_core.edits import Amplify, Erase, Suppress, Update
from kn_core.families import FAMILIES, get_path
from kn_core.hooks import Hooks, capture_activations
from test_ffn import one_thread  # noqa: F401 (autouse: tiny models run on one thread)
from tiny import make_tiny, save_tiny

MOE_FAMILIES = sorted(f for f, spec in FAMILIES.items() if spec.moe)
TEXT, ANSWER = "The capital of France is", " Paris"




def moe_module(lm, layer):
    return get_path(lm.layout.blocks[layer], lm.layout.spec.moe)


def by_hand(lm, layer, expert, i, h, routing):
    """(activation, value vector) of neuron i of `expert` at one token with FFN input h [D], from the model's
    weights: the definition written out, independent of kn_core.moe. `routing`: (weights [k], ids [k], shared
    gate or None) of that token."""
    module, spec = moe_module(lm, layer), lm.layout.spec
    if not hasattr(module, "experts"):  # a dense layer: one expert
        a = (module.act_fn(module.gate_proj(h)) * module.up_proj(h))[i]
        return a, module.down_proj.weight[:, i]
    experts = module.experts
    if expert == experts.num_experts:  # the shared expert
        shared = getattr(module, spec.shared_expert)
        a = (shared.act_fn(shared.gate_proj(h)) * shared.up_proj(h))[i]
        if routing[2] is not None:
            a = a * routing[2]
        return a, shared.down_proj.weight[:, i]
    weights, ids, _ = routing
    down = experts.down_proj[expert]
    v = down[i] if experts.is_transposed else down[:, i]
    if expert not in ids.tolist():
        return torch.zeros((), dtype=h.dtype), v
    w = weights[ids.tolist().index(expert)]
    gate_up = h @ experts.gate_up_proj[expert] if experts.is_transposed else experts.gate_up_proj[expert] @ h
    if experts.has_bias:
        gate_up = gate_up + experts.gate_up_proj_bias[expert]
    return experts._apply_gate(gate_up[None])[0, i] * w, v


def clean_routing(lm, ids):
    """Each MoE layer's router output and shared gate in the clean forward, and each FFN's input (by hooks on
    the model's own modules)."""
    spec, routers, gates, inputs = lm.layout.spec, {}, {}, {}
    post, pre = [], []
    for layer in range(lm.layout.layers):
        module = moe_module(lm, layer)
        pre.append((module, lambda m, a, kw, l=layer: inputs.__setitem__(l, a[0].detach())))
        if hasattr(module, "experts"):
            post.append((getattr(module, spec.router), lambda m, a, o, l=layer: routers.__setitem__(l, o)))
            if spec.shared_expert_gate:
                post.append((getattr(module, spec.shared_expert_gate),
                             lambda m, a, o, l=layer: gates.__setitem__(l, o)))
    with torch.no_grad(), Hooks(pre=pre, post=post):
        lm.model(input_ids=ids)
    return routers, gates, inputs


def routed_biases(lm, layer, routing):
    """What an MoE layer adds at a token besides its neurons: the routed experts' output biases (GPT-OSS) times
    their routing weights."""
    module = moe_module(lm, layer)
    experts = getattr(module, "experts", None)
    if experts is None or not experts.has_bias:
        return 0.0
    weights, ids, _ = routing
    return sum(w * experts.down_proj_bias[int(e)] for w, e in zip(weights, ids))


def reference_neuron(lm, ids, layer, expert, i, steps):
    """IG of one expert neuron by the definition: full forwards of the model's own code with every router's
    output (and shared gate) replaced by the clean run's; at the answer position the layer's output is its
    neurons' part scaled by alpha (the paper scales the layer's whole activation vector), and this neuron's
    activation is the leaf whose gradient is taken."""
    routers, gates, inputs = clean_routing(lm, ids)
    pos, target = ids.shape[1] - 1, None
    module = moe_module(lm, layer)
    h = inputs[layer][0, pos]
    routing = None
    if layer in routers:
        _, weights, index = routers[layer]
        shared = torch.sigmoid(gates[layer][pos, 0]) if layer in gates else None
        routing = (weights[pos], index[pos], shared)
    a, v = by_hand(lm, layer, expert, i, h, routing)
    a, v = a.detach(), v.detach()
    bias = routed_biases(lm, layer, routing) if routing is not None else 0.0
    total = 0.0
    for k in range(1, steps + 1):
        alpha = k / steps
        s = (alpha * a).clone().requires_grad_(True)

        def swap(m, args, out, s=s, alpha=alpha):
            tensor = out[0] if isinstance(out, tuple) else out
            tensor = tensor.clone()
            tensor[0, pos] = alpha * (tensor[0, pos] - bias) + bias + (s - alpha * a) * v
            return (tensor, *out[1:]) if isinstance(out, tuple) else tensor

        held = [(getattr(moe_module(lm, l), lm.layout.spec.router), lambda m, x, o, l=l: routers[l])
                for l in routers]
        held += [(getattr(moe_module(lm, l), lm.layout.spec.shared_expert_gate), lambda m, x, o, l=l: gates[l])
                 for l in gates]
        with torch.enable_grad(), Hooks(post=held + [(module, swap)]):
            logits = lm.model(input_ids=ids).logits[0, pos]
            if target is None:
                target = int(encode_answer(lm, TEXT, ANSWER)[0])
            (grad,) = torch.autograd.grad(logits.softmax(-1)[target], s)
        total += float(grad)
    return float(a) * total / steps, float(a)


def neurons_to_check(lm, layer, routing_ids):
    """A few neurons of a routed expert, an unrouted one and the shared expert (flat indices, expert, local)."""
    spans = lm.layout.experts[layer]
    routed = [e for e in spans if not e.shared and e.expert in routing_ids] or spans[:1]
    unrouted = [e for e in spans if not e.shared and e.expert not in routing_ids and len(spans) > 1]
    picks = [(routed[0], 0), (routed[-1], routed[-1].size - 1)] + [(e, 3) for e in unrouted[:1]]
    picks += [(e, 1) for e in spans if e.shared]
    return [(e.offset + i, e.expert, i) for e, i in picks]


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_attribution_matches_one_expert_neuron_reference(family):
    lm = make_tiny(family)
    lm.model.double()
    ids = torch.tensor([list(lm.tokenizer(TEXT)["input_ids"])])
    answer = encode_answer(lm, TEXT, ANSWER)
    ours = attribute(lm, TEXT, AttributionParams(steps=3, layers_per_pass=2), answer_ids=answer)
    routers, _, _ = clean_routing(lm, torch.tensor([list(ids[0]) ]))
    pos = ids.shape[1] - 1
    checked = 0
    for layer in range(lm.layout.layers):
        routed_ids = routers[layer][2][pos].tolist() if layer in routers else [0]
        for flat, expert, i in neurons_to_check(lm, layer, routed_ids):
            ref, act = reference_neuron(lm, ids, layer, expert, i, steps=3)
            assert ours.activations[layer, flat] == pytest.approx(act, rel=1e-6, abs=1e-9)
            assert ours.scores[layer, flat] == pytest.approx(ref, rel=1e-6, abs=1e-9), (layer, expert, i)
            checked += 1
            if expert not in routed_ids and not lm.layout.experts[layer][-1].shared or act == 0:
                assert ours.scores[layer, flat] == 0
    assert checked >= 3 * lm.layout.layers - 1
    for layer in range(lm.layout.layers):  # a dense layer's padding: zero activation and score
        assert not ours.scores[layer, lm.layout.width(layer):].any()


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_neuron_path_reproduces_the_models_forward(family):
    """With hooks on the neurons, each MoE layer computes its output through the neuron axis; unchanged logits."""
    lm = make_tiny(family)
    lm.model.double()
    ids = torch.tensor([list(lm.tokenizer(TEXT + " Paris .")["input_ids"])] * 2)
    with torch.no_grad():
        plain = lm.model(input_ids=ids).logits
        through, acts = capture_activations(lm.layout, lambda: lm.model(input_ids=ids).logits)
    assert torch.allclose(plain, through, rtol=1e-10, atol=1e-10)
    layer = lm.layout.layers - 1
    spans = lm.layout.experts[layer]
    active = [e.expert for e in spans if acts[layer][0, -1, e.offset:e.offset + e.size].abs().sum() > 0]
    routed = [e for e in active if not spans[e].shared]
    assert len(routed) == lm.model.config.num_experts_per_tok


def _weights(lm):
    return {name: p.detach().clone() for name, p in lm.model.named_parameters()}


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_edits_on_expert_neurons_revert_bitwise(family):
    lm = make_tiny(family)
    ids = torch.tensor([list(lm.tokenizer(TEXT)["input_ids"])])
    L = lm.layout.layers - 1
    spans = lm.layout.experts[L]
    neurons = [(L, spans[0].offset + 2), (L, spans[-1].offset + 1), (L - 1, 5)]
    before, weights = lm.model(input_ids=ids).logits.detach(), _weights(lm)
    old, new = encode_answer(lm, TEXT, ANSWER), encode_answer(lm, TEXT, " Rome")
    for edit in (Suppress(neurons, "all"), Amplify(neurons, 3.0, "answer"), Update(neurons, old, new),
                 Erase(neurons)):
        handle = edit.apply(lm)
        changed = lm.model(input_ids=ids).logits.detach()
        handle.revert()
        after = lm.model(input_ids=ids).logits.detach()
        assert torch.equal(after, before), edit.kind
        assert all(torch.equal(p, weights[n]) for n, p in lm.model.named_parameters()), edit.kind
        if edit.kind in ("update", "erase"):
            assert not torch.equal(changed, before), edit.kind


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "gpt_oss"])
def test_erase_writes_exactly_the_experts_value_vectors(family):
    lm = make_tiny(family)
    L = lm.layout.layers - 1
    spans = lm.layout.experts[L]
    neurons = [(L, spans[1].offset + 4), (L, spans[-1].offset)]
    handle = Erase(neurons).apply(lm)
    assert not lm.layout.value_vectors(L, [n for _, n in neurons]).any()
    experts = moe_module(lm, L).experts
    down = experts.down_proj[1]
    assert not (down[4] if experts.is_transposed else down[:, 4]).any()
    handle.revert()
    assert lm.layout.value_vectors(L, [n for _, n in neurons]).abs().sum() > 0


def test_suppressing_an_expert_neuron_removes_activation_times_value_vector():
    lm = make_tiny("mixtral")
    lm.model.double()
    ids = torch.tensor([list(lm.tokenizer(TEXT)["input_ids"])])
    L = lm.layout.layers - 1
    outputs = {}
    module = moe_module(lm, L)
    with torch.no_grad(), Hooks(post=[(module, lambda m, a, o: outputs.__setitem__("x", o))]):
        _, acts = capture_activations(lm.layout, lambda: lm.model(input_ids=ids))
        clean = outputs["x"][0, -1].clone()
        flat = int(torch.nonzero(acts[L][0, -1])[0])
        handle = Suppress([(L, flat)], "answer").apply(lm)
        lm.model(input_ids=ids)
        handle.revert()
    delta = clean - outputs["x"][0, -1]
    expected = acts[L][0, -1, flat] * lm.layout.value_vector(L, flat)
    assert torch.allclose(delta, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
def test_padding_of_a_dense_layer_is_refused(family):
    lm = make_tiny(family)
    width = lm.layout.width(0)
    assert width < lm.layout.neurons
    with pytest.raises(ValueError, match="outside layer 0"):
        Suppress([(0, width)], "all").apply(lm)


def test_massive_is_measured_against_the_neurons_own_expert():
    """An MoE layer's median mixes experts of very different sizes (and zeros of unrouted ones): a neuron 150x
    its own always-routed expert is massive even where the layer's median would hide it; a large neuron of an
    expert that half the prompts or fewer reach is not (it is not large on most inputs)."""
    from kn_core.moe import Expert
    from kn_core.neurons import ActivationStats, flag_massive, neuron_flags

    rng = np.random.default_rng(0)
    prompts, size, few = 40, 50, 19  # expert 2 reaches fewer than half the prompts
    acts = np.zeros((prompts, 1, 5 * size), dtype=np.float32)
    acts[:, 0, :size] = rng.uniform(0.5, 1.5, (prompts, size))  # expert 0: every prompt, typical size 1
    acts[:, 0, 7] = 150.0
    acts[:, 0, size:4 * size] = rng.uniform(90, 110, (prompts, 3 * size))  # expert 1: every prompt, typical 100
    acts[:few, 0, 4 * size:] = rng.uniform(0.5, 1.5, (few, size))
    acts[:few, 0, 4 * size + 3] = 5000.0
    spans = [[Expert(0, 0, size), Expert(1, size, 3 * size), Expert(2, 4 * size, size)]]
    per_layer = ActivationStats.from_activations(list(acts))
    per_expert = ActivationStats.from_activations(list(acts), experts=spans)
    assert (0, 7) not in flag_massive(per_layer, top_fraction=0.02)
    assert flag_massive(per_expert, top_fraction=0.02) == {(0, 7)}
    assert "expert" in neuron_flags(per_expert).rule["massive"]
    assert ActivationStats.from_dict(per_expert.to_dict()).expert_median_abs.tolist() == \
        per_expert.expert_median_abs.tolist()


def test_flags_and_random_controls_on_an_moe_model():
    from kn_core.edit_plan import random_neurons
    from kn_core.neurons import run_flags

    lm = make_tiny("qwen2_moe")
    flags = run_flags(lm)
    assert all(i < lm.layout.width(l) for l, i in flags.massive)
    like = [(2, lm.layout.experts[2][1].offset + 3), (0, 5), (2, lm.layout.experts[2][-1].offset)]
    control = random_neurons(lm, like, seed=3)
    for (layer, index), (_, drawn) in zip(like, control):
        assert lm.layout.expert_of(layer, index)[0] == lm.layout.expert_of(layer, drawn)[0]
        assert drawn < lm.layout.width(layer)


@pytest.fixture(scope="module")
def saved_moe(tmp_path_factory):
    return save_tiny(make_tiny("qwen2_moe"), tmp_path_factory.mktemp("qwen2_moe"))


def test_cli_json_names_each_neurons_expert(capsys, saved_moe):
    import json

    from kn_core.cli import main

    assert main(["model", "info", "--model", saved_moe, "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["neurons"] == 144 and info["moe"] == {"experts": [1, 5, 5], "shared": [0, 1, 1],
                                                      "layer_neurons": [72, 144, 144]}

    code = main(["attribute", "--prompt", TEXT, "--answer", ANSWER, "--model", saved_moe, "--steps", "2", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0 and doc["coarse"]
    lm = make_tiny("qwen2_moe")
    for entry in doc["coarse"]:
        assert set(entry) == {"layer", "expert", "neuron", "index", "score"}
        expert = lm.layout.experts[entry["layer"]][entry["expert"]]
        assert entry["index"] == expert.offset + entry["neuron"] and entry["neuron"] < expert.size


def test_experts_the_neuron_path_cannot_compute_are_refused_in_one_line():
    from transformers import AutoModelForCausalLM

    from kn_core.families import UnsupportedModelError
    from kn_core.ffn import FFNLayout

    model = AutoModelForCausalLM.from_config(make_tiny("mixtral").model.config)
    model.model.layers[1].mlp.experts.has_post_expert_norm = True
    with pytest.raises(UnsupportedModelError, match=r"layer 1's mlp.experts .* not supported") as info:
        FFNLayout(model)
    assert "\n" not in str(info.value)


def test_cli_neurons_name_experts_in_json_and_text(capsys, saved_moe):
    import json

    from kn_core.cli import main

    argv = ["neurons", "--relation", "P36", "--subject", "France", "--model", saved_moe, "--steps", "2", "--t", "0.1",
            "--p", "0.1"]
    assert main(argv + ["--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    entries = doc["refined"] + [e for c in doc["coarse"] for e in c]
    assert entries and all({"layer", "expert", "neuron", "index", "flags"} <= set(e) for e in entries)
    assert main(argv) == 0
    text = capsys.readouterr().out
    first = doc["refined"][0] if doc["refined"] else None
    if first:
        assert f"refined L{first['layer']} E{first['expert']} N{first['neuron']}" in text


@pytest.mark.parametrize("family", MOE_FAMILIES)
def test_held_routing_makes_completeness_hold(family):
    """With routing held, each layer's path is smooth: Gauss-Legendre quadrature meets completeness (the layer's
    scores sum to P(clean) - P(layer zeroed, routing held)) within its tolerance in every layer."""
    lm = make_tiny(family)
    lm.model.double()
    answer = encode_answer(lm, TEXT, ANSWER)
    result = attribute(lm, TEXT, AttributionParams(quadrature="gauss"), answer_ids=answer)
    assert all(c["within_tolerance"] for c in result.completeness), result.completeness


def test_reproduction_report_names_the_experts_of_each_facts_neurons(tmp_path):
    from test_reproduce import _run

    report = _run(make_tiny("qwen2_moe"), tmp_path, t=0.05, p=0.1)
    details = report["facts_detail"]
    assert details and any(fact["neurons"] for fact in details)
    lm = make_tiny("qwen2_moe")
    for fact in details:
        assert fact["neurons_named"] == [lm.layout.neuron_dict(l, i) for l, i in fact["neurons"]]


def test_offloaded_experts_are_refused_in_one_line():
    from transformers import AutoModelForCausalLM

    from kn_core.families import UnsupportedModelError
    from kn_core.ffn import FFNLayout

    config = make_tiny("olmoe").model.config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(UnsupportedModelError, match="offloaded"):
        FFNLayout(model)
