"""Memory of a >= 1B-parameter model: peak RSS (and peak VRAM where CUDA exists) of loading it and of one
attribution, against the size of its weights.

    python benchmarks/bench_memory.py                      # bfloat16, 4 steps, the folder in a temp dir
    python benchmarks/bench_memory.py --dtype float32 --folder /tmp/kn-bench-1b

The model is a random-weights Llama architecture of TinyLlama-1.1B's shape (hidden 2048, 5632 FFN neurons,
22 layers, grouped-query attention) with the default model's tokenizer (vocabulary 49,152, untied head): 1.17B
parameters. It is written once as safetensors (in the chosen dtype), then a fresh process loads it through
`kn_core.models.load_model` (device auto: every GPU through device_map="auto" where CUDA exists) and attributes
one prompt. Peak RSS is the process's ru_maxrss; "weights" is the safetensors file size. Ratios are printed with
the load average, because this machine is shared.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
             num_key_value_heads=4, max_position_embeddings=2048, tie_word_embeddings=False)


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def make(folder: Path, dtype: str) -> None:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from kn_core.models import ensure_default_model

    tokenizer = AutoTokenizer.from_pretrained(ensure_default_model())
    config = LlamaConfig(vocab_size=len(tokenizer), **SHAPE)
    torch.manual_seed(0)
    model = LlamaForCausalLM._from_config(config, dtype=getattr(torch, dtype))
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def measure(folder: Path, dtype: str, steps: int) -> dict:
    import torch

    from kn_core.attribution import AttributionParams, attribute, encode_answer
    from kn_core.models import load_model

    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "2"))))
    before = _peak_rss()
    start = time.perf_counter()
    lm = load_model(str(folder), device="auto", dtype=dtype)
    load_s = time.perf_counter() - start
    after_load = _peak_rss()
    params = sum(p.numel() for p in lm.model.parameters())
    text = "The capital of France is"
    ids = encode_answer(lm, text, " Paris")
    start = time.perf_counter()
    result = attribute(lm, text, AttributionParams(steps=steps), answer_ids=ids)
    attribute_s = time.perf_counter() - start
    weights = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    report = {"parameters": params, "dtype": dtype, "device": lm.describe()["device"], "weights_bytes": weights,
              "rss_before_load": before, "peak_rss_after_load": after_load, "peak_rss_after_attribution": _peak_rss(),
              "load_s": round(load_s, 1), "attribute_s": round(attribute_s, 1), "steps": steps,
              "answer_prob": result.prob, "load_average": os.getloadavg()}
    if torch.cuda.is_available():
        report["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        report["peak_vram_bytes"] = sum(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count()))
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--steps", type=int, default=4, help="integration steps of the one attribution")
    parser.add_argument("--folder", type=Path, help="where the model is written (kept); default: a temp dir")
    parser.add_argument("--child", choices=["make", "measure"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child == "make":
        return make(args.folder, args.dtype)
    if args.child == "measure":
        print(json.dumps(measure(args.folder, args.dtype, args.steps)))
        return
    with tempfile.TemporaryDirectory(prefix="kn-bench-memory-") as tmp:
        folder = args.folder or Path(tmp)
        if not (folder / "config.json").exists():
            print(f"writing a random {SHAPE['num_hidden_layers']}-layer model to {folder}", file=sys.stderr)
            subprocess.run([sys.executable, __file__, "--child", "make", "--folder", str(folder),
                            "--dtype", args.dtype], check=True)
        out = subprocess.run([sys.executable, __file__, "--child", "measure", "--folder", str(folder),
                              "--dtype", args.dtype, "--steps", str(args.steps)],
                             check=True, capture_output=True, text=True).stdout
    report = json.loads(out.strip().splitlines()[-1])
    gib, weights = 1 << 30, report["weights_bytes"]
    print(json.dumps(report, indent=2))
    print(f"{report['parameters'] / 1e9:.2f}B parameters, {report['dtype']} on {report['device']}: weights "
          f"{weights / gib:.2f} GiB; peak RSS after load {report['peak_rss_after_load'] / gib:.2f} GiB "
          f"(x{report['peak_rss_after_load'] / weights:.2f} the weights), after one attribution "
          f"{report['peak_rss_after_attribution'] / gib:.2f} GiB (x{report['peak_rss_after_attribution'] / weights:.2f}); "
          f"load average {report['load_average'][0]:.1f}")
    if "peak_vram_bytes" in report:
        print(f"peak VRAM {report['peak_vram_bytes'] / gib:.2f} GiB (x{report['peak_vram_bytes'] / weights:.2f} the "
              f"weights) on {', '.join(report['cuda_devices'])}")


if __name__ == "__main__":
    main()
