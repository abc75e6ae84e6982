"""Causal tracing's cost per prompt (kn_core/tracing.py) against ROME's way of running it, in one run.

    python benchmarks/bench_tracing.py [--prompts 3] [--samples 10] [--every 5]

For each prompt (the built-in facts' first prompt, one fact per relation in turn) and each kind (residual, MLP,
attention), `trace` runs the whole tokens x layers grid. The reference is ROME's `trace_with_patch` loop: one full
forward per restoration (batch = the noise samples; no replay, no skipped positions), on every `--every`-th layer
only (extrapolated to all layers: each restoration costs one full forward whatever its layer), with the same noise;
the cells it computes are compared with the batched ones (largest |difference|). Wall time on a shared CPU is
pessimistic, so CPU seconds of this process are printed beside wall seconds (one thread by default: what the work
costs however loaded the machine is); the ratio within one run is what means something. The load average is
printed before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kn_core.encoding import encode_prompt  # noqa: E402
from kn_core.fact_files import builtin_facts  # noqa: E402
from kn_core.facts import render_prompts  # noqa: E402
from kn_core.hooks import Hooks, replacing_output  # noqa: E402
from kn_core.models import load_model  # noqa: E402
from kn_core.tracing import KINDS, TraceParams, embedding_std, state_modules, subject_span, trace  # noqa: E402


def rome_reference(lm, prompt, subject, params, std, kind, layers):
    """ROME's loop: for each (token, layer) one forward of the noise samples with that state restored."""
    target = encode_prompt(lm, prompt.text, prompt.answer_ids).targets()[0]
    ids = torch.tensor([target.ids] * params.samples)
    start, end = subject_span(lm, prompt.text, target.ids, subject)
    noise = torch.randn(params.samples, end - start, lm.layout.hidden, generator=torch.Generator().manual_seed(
        params.seed), dtype=torch.float64) * (params.noise * std)
    modules = state_modules(lm.layout, kind)
    clean = {}
    with torch.no_grad(), Hooks(post=[(m, lambda mod, a, o, j=j: clean.__setitem__(
            j, (o[0] if isinstance(o, tuple) else o).reshape(1, len(target.ids), -1).clone()))
            for j, m in enumerate(modules)]):
        lm.model(input_ids=ids[:1])

    def corrupt(x):
        x = x.clone()
        x[:, start:end] += noise.to(x.dtype)
        return x

    cells = {}
    for token in range(len(target.ids)):
        for layer in layers:
            def put(x, token=token, layer=layer):
                y = x.reshape(params.samples, len(target.ids), -1).clone()
                y[:, token] = clean[layer][0, token]
                return y.reshape(x.shape)
            with torch.no_grad(), Hooks(post=[(lm.model.get_input_embeddings(), replacing_output(corrupt)),
                                              (modules[layer], replacing_output(put))]):
                logits = lm.model(input_ids=ids).logits[:, target.pos].float()
            cells[token, layer] = float(torch.softmax(logits, -1)[:, target.token].mean())
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompts", type=int, default=3)
    parser.add_argument("--samples", type=int, default=10)
    parser.add_argument("--every", type=int, default=5, help="the reference runs every n-th layer")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: CPU time is then the cost)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "last_run_tracing.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()
    lm = load_model("default", device="cpu")
    facts = builtin_facts()
    std = embedding_std(lm, [f.subject for f in facts.facts])
    prompts = []
    for rid in sorted(facts.relations):
        for fact in facts.facts_of(rid)[:1]:
            rendered, _ = render_prompts(fact, facts.relation(rid), lm.tokenizer, lm.kind)
            if rendered:
                prompts.append(rendered[0])
    prompts = prompts[:args.prompts]
    params = TraceParams(samples=args.samples)
    rows = []
    for prompt in prompts:
        subject = prompt.fact.subject
        for kind in KINDS:
            kind_params = TraceParams(kinds=(kind,), samples=args.samples)
            t0, c0 = time.perf_counter(), time.process_time()
            result = trace(lm, prompt.text, subject, prompt.answer_ids, kind_params, noise_scale=std)
            fast, fast_cpu = time.perf_counter() - t0, time.process_time() - c0
            layers = list(range(0, lm.layout.layers, args.every))
            t0, c0 = time.perf_counter(), time.process_time()
            cells = rome_reference(lm, prompt, subject, params, std[0], kind, layers)
            scale = lm.layout.layers / len(layers)
            slow, slow_cpu = (time.perf_counter() - t0) * scale, (time.process_time() - c0) * scale
            diff = max(abs(result.restored[kind][t, l] - v) for (t, l), v in cells.items())
            rows.append({"prompt": prompt.text, "subject": subject, "kind": kind, "tokens": len(result.tokens),
                         "batched_s": fast, "reference_s_extrapolated": slow, "batched_cpu_s": fast_cpu,
                         "reference_cpu_s_extrapolated": slow_cpu, "ratio": slow_cpu / fast_cpu,
                         "max_abs_difference": diff, "p_clean": result.p_clean, "p_corrupted": result.p_corrupted})
            print(f"{prompt.text!r} [{kind}] {len(result.tokens)} tokens: batched {fast:.1f} s ({fast_cpu:.1f} CPU s), "
                  f"ROME-style {slow:.1f} s ({slow_cpu:.1f} CPU s), x{slow_cpu / fast_cpu:.1f} in CPU time, "
                  f"max |diff| {diff:.1e}", flush=True)
    per_prompt = {k: float(np.mean([r["batched_s"] for r in rows if r["kind"] == k])) for k in KINDS}
    cpu_per_prompt = {k: float(np.mean([r["batched_cpu_s"] for r in rows if r["kind"] == k])) for k in KINDS}
    ratio = float(np.mean([r["ratio"] for r in rows]))
    load_after = os.getloadavg()
    summary = {"seconds_per_prompt": per_prompt, "all_kinds_seconds_per_prompt": sum(per_prompt.values()),
               "cpu_seconds_per_prompt": cpu_per_prompt,
               "all_kinds_cpu_seconds_per_prompt": sum(cpu_per_prompt.values()),
               "mean_ratio_vs_reference": ratio, "samples": args.samples, "load_before": load_before,
               "load_after": load_after, "cpu_threads": torch.get_num_threads(), "rows": rows}
    print("seconds per prompt (CPU seconds): " + ", ".join(f"{k} {v:.1f} ({cpu_per_prompt[k]:.1f})"
                                                         for k, v in per_prompt.items())
          + f"; all three {sum(per_prompt.values()):.1f} s ({sum(cpu_per_prompt.values()):.1f} CPU s); "
          f"x{ratio:.1f} less CPU time than ROME's loop; "
          f"load {load_before[0]:.1f} -> {load_after[0]:.1f}")
    Path(args.out).write_text(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
