"""Attribution on a mixture-of-experts model against a dense model of the same active parameters, in one run.

    PYTHONPATH=. python benchmarks/bench_moe.py [--device cpu|cuda] [--steps 20] [--repeat 3] [--json out.json]

Both models are random-weight Mixtral / Mistral configs of the same attention, hidden size and depth; the MoE
model has E experts of F neurons each, k of them per token, the dense one an FFN of k x F neurons, so a token
meets the same FFN weights in both. Prints seconds per prompt (median of --repeat runs after one warm-up), the
ratio MoE / dense, the neurons each attributes, and the machine load (`uptime`) the figures were taken at.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from kn_core.attribution import AttributionParams, attribute, encode_answer  # noqa: E402
from kn_core.models import pick_device, wrap_model  # noqa: E402
from tiny import make_tokenizer  # noqa: E402

PROMPT, ANSWER = "The capital of France is", " Paris"


def build(family: str, device: torch.device, args) -> object:
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = make_tokenizer("causal")
    common = dict(vocab_size=len(tokenizer), hidden_size=args.hidden, num_hidden_layers=args.layers,
                  num_attention_heads=args.heads, num_key_value_heads=args.heads // 2, max_position_embeddings=128,
                  pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id)
    if family == "mixtral":
        config = AutoConfig.for_model("mixtral", intermediate_size=args.expert_neurons,
                                      num_local_experts=args.experts, num_experts_per_tok=args.top_k, **common)
    else:
        config = AutoConfig.for_model("mistral", intermediate_size=args.top_k * args.expert_neurons, **common)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).to(device).eval()
    return wrap_model(model, tokenizer, source=f"bench-{family}")


def seconds_per_prompt(lm, params: AttributionParams, repeat: int) -> float:
    ids = encode_answer(lm, PROMPT, ANSWER)
    attribute(lm, PROMPT, params, answer_ids=ids)  # warm-up
    times = []
    for _ in range(repeat):
        if lm.device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        attribute(lm, PROMPT, params, answer_ids=ids)
        if lm.device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--expert-neurons", type=int, default=512)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    device = pick_device(args.device)
    params = AttributionParams(steps=args.steps)
    load_before = os.getloadavg()
    figures = {}
    for family in ("mistral", "mixtral"):
        lm = build(family, device, args)
        figures[family] = {"seconds_per_prompt": seconds_per_prompt(lm, params, args.repeat),
                           "neurons_per_layer": lm.layout.neurons,
                           "active_ffn_neurons_per_token": args.top_k * args.expert_neurons}
        del lm
    ratio = figures["mixtral"]["seconds_per_prompt"] / figures["mistral"]["seconds_per_prompt"]
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    report = {"device": device_name, "torch_threads": torch.get_num_threads(), "steps": args.steps,
              "config": {k: getattr(args, k) for k in ("hidden", "layers", "heads", "experts", "top_k",
                                                        "expert_neurons")},
              "dense": figures["mistral"], "moe": figures["mixtral"], "ratio_moe_over_dense": ratio,
              "load_avg_1min_before_after": [load_before[0], os.getloadavg()[0]]}
    print(f"device {device_name}, {args.steps} steps, {args.layers} layers, hidden {args.hidden}")
    print(f"dense  (FFN {args.top_k * args.expert_neurons}):  {figures['mistral']['seconds_per_prompt']:.3f} s/prompt")
    print(f"MoE    ({args.experts} experts x {args.expert_neurons}, top {args.top_k}; "
          f"{figures['mixtral']['neurons_per_layer']} neurons/layer attributed): "
          f"{figures['mixtral']['seconds_per_prompt']:.3f} s/prompt")
    print(f"ratio MoE / dense: {ratio:.2f}x   (load average {load_before[0]:.2f} before, "
          f"{os.getloadavg()[0]:.2f} after)")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
