"""Attribution speed: ours vs a slow reference vs the PyPI package `knowledge-neurons==0.0.2`, in one run.

    bash benchmarks/bench_attribution.sh            # installs the package into .bench-deps only, then runs this

Models: GPT-2-small and BERT-base architectures built from their configs with a fixed seed (random weights,
word-level tokenizers of the real vocabulary sizes; speed does not depend on what the weights know), and the
embedded default model. Prints seconds per prompt and ratios, the neuron agreement with the package on BERT
(both hook the post-GELU activation there), and achieved GFLOP/s against a matrix-multiply peak measured here.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / ".bench-deps"))

from kn_core.attribution import AttributionParams, attribute, attribute_fact, encode_answer  # noqa: E402
from kn_core.hooks import ActivationPatch  # noqa: E402
from kn_core.neurons import coarse_neurons  # noqa: E402
from kn_core.models import load_model, pick_device, wrap_model  # noqa: E402

PROMPT_WORDS = "The capital of France is".split()


def word_tokenizer(vocab_size: int, masked: bool):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] if masked else ["<|endoftext|>"]
    words = PROMPT_WORDS + ["Paris", "."] + ([] if masked else ["Ġ" + w for w in PROMPT_WORDS + ["Paris"]])
    vocab = {w: i for i, w in enumerate(specials + words)}
    for i in range(len(vocab), vocab_size):
        vocab[f"w{i}"] = i
    tok = Tokenizer(models.WordLevel(vocab, unk_token=specials[1] if masked else specials[0]))
    if masked:
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                           special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
        return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                       sep_token="[SEP]", mask_token="[MASK]",
                                       model_input_names=["input_ids", "token_type_ids", "attention_mask"])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   bos_token="<|endoftext|>")


def build(arch: str, device: torch.device):
    from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    if arch == "bert-base":
        model = BertForMaskedLM(BertConfig(vocab_size=28996))  # bert-base-cased's shape
        tok = word_tokenizer(28996, masked=True)
        prompt, answer = "The capital of France is [MASK] .", "Paris"
    else:
        model = GPT2LMHeadModel(GPT2Config())  # gpt2 (small): 12 layers, 768 hidden, 3072 neurons
        tok = word_tokenizer(50257, masked=False)
        prompt, answer = "The capital of France is", " Paris"
    model.to(device)
    return wrap_model(model, tok, source=arch), prompt, answer


def timed(fn, repeats: int):
    best = float("inf")
    result = None
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return best, result


def reference(lm, text, answer_ids, steps=20):
    """The slow, obvious method: one layer and one step at a time, full forward passes (as tests/)."""
    ids = torch.tensor([lm.tokenizer(text)["input_ids"]], device=lm.device)
    pos = ids.shape[1] - 1 if lm.kind == "causal" else ids[0].tolist().index(lm.tokenizer.mask_token_id)
    out = []
    for layer in range(lm.layout.layers):
        seen = {}
        with torch.no_grad(), ActivationPatch(lm.layout, lambda l, a: seen.__setitem__(l, a[0, pos].clone()), [layer]):
            lm.model(input_ids=ids)
        w, total = seen[layer], torch.zeros_like(seen[layer])
        for k in range(1, steps + 1):
            point = (k / steps * w).clone().requires_grad_(True)

            def put(l, a, point=point):
                a = a.clone()
                a[0, pos] = point
                return a

            with torch.enable_grad(), ActivationPatch(lm.layout, put, [layer]):
                p = lm.model(input_ids=ids).logits[0, pos].softmax(-1)[answer_ids[0]]
                total += torch.autograd.grad(p, point)[0]
        out.append((w * total / steps).cpu().numpy())
    return np.stack(out)


def package_scores(lm, prompt, answer):
    from knowledge_neurons import KnowledgeNeurons

    kind = "bert" if lm.kind == "masked" else "gpt2"
    kn = KnowledgeNeurons(lm.model, lm.tokenizer, model_type=kind, device=lm.device)
    target = answer if kind == "bert" else answer
    return kn.get_scores(prompt, target, batch_size=20, steps=20, pbar=False).cpu().numpy()


def matmul_peak(device: torch.device) -> float:
    n = 2048 if device.type == "cpu" else 8192
    a, b = torch.randn(n, n, device=device), torch.randn(n, n, device=device)
    for _ in range(2):
        a @ b
    seconds, _ = timed(lambda: [a @ b for _ in range(5)], 3)
    return 5 * 2 * n**3 / seconds / 1e9


def counted_flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def jaccard(a, b) -> float:
    a, b = set(a), set(b)
    return len(a & b) / len(a | b) if a | b else 1.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--repeats", type=int, default=2, help="best of N for our timings")
    parser.add_argument("--skip-reference", action="store_true", help="skip the slow reference (minutes on a CPU)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    device = pick_device(args.device)
    try:
        import knowledge_neurons  # noqa: F401
        have_package = True
    except ImportError:
        have_package = False
        print("knowledge-neurons is not installed: run benchmarks/bench_attribution.sh", file=sys.stderr)

    peak = matmul_peak(device)
    figures: dict = {"device": str(device), "torch": torch.__version__, "threads": torch.get_num_threads(),
                     "matmul_peak_gflops": peak, "models": {}}
    print(f"device {device}, {torch.get_num_threads()} threads, matmul peak {peak:.0f} GFLOP/s at the start "
          f"(each row's 'of peak' uses a peak measured just before it)\n")
    header = f"{'model':<22}{'ours s':>9}{'package s':>11}{'reference s':>13}{'vs package':>12}{'vs reference':>14}{'GFLOP/s':>9}{'of peak':>9}"
    print(header)
    rows = [("gpt2-small", None), ("bert-base", None), ("default (SmolLM2-135M)", "default")]
    params = AttributionParams(steps=20)
    for name, source in rows:
        if source:
            lm = load_model(source, device=args.device)
            prompt, answer = "The capital of France is", " Paris"
        else:
            lm, prompt, answer = build(name, device)
        ids = encode_answer(lm, prompt, answer)
        attribute(lm, prompt, AttributionParams(steps=2), answer_ids=ids)  # warm-up
        row_peak = matmul_peak(device)  # shared machines drift: each row's efficiency uses a peak taken beside it
        ours_s, ours = timed(lambda: attribute(lm, prompt, params, answer_ids=ids), args.repeats)
        flops = counted_flops(lambda: attribute(lm, prompt, params, answer_ids=ids))
        entry = {"ours_s": ours_s, "flops": flops, "gflops": flops / ours_s / 1e9, "matmul_peak_gflops": row_peak}
        if have_package and not source:
            entry["package_s"], pkg = timed(lambda: package_scores(lm, prompt, answer), args.repeats)
            entry["vs_package"] = entry["package_s"] / ours_s
            if lm.kind == "masked":
                t = 0.2
                entry["agreement_jaccard_t0.2"] = jaccard(coarse_neurons(ours.scores, t), coarse_neurons(pkg, t))
                entry["score_correlation"] = float(np.corrcoef(ours.scores.ravel(), pkg.ravel())[0, 1])
        if not args.skip_reference:
            entry["reference_s"], ref = timed(lambda: reference(lm, prompt, ids), 1)
            entry["vs_reference"] = entry["reference_s"] / ours_s
            entry["max_rel_diff_vs_reference"] = float(np.abs(ref - ours.scores).max() / np.abs(ref).max())
        if lm.kind == "masked":  # a fact of 9 paraphrases: in shared passes, and one prompt after another
            fact = [_P(t.replace("[MASK]", lm.tokenizer.mask_token), ids) for t in FACT_9]
            entry["fact_9_prompts_s"], _ = timed(
                lambda: attribute_fact(lm, fact, replace(params, share_prompts=True)), args.repeats)
            entry["fact_9_prompts_one_by_one_s"], _ = timed(
                lambda: attribute_fact(lm, fact, replace(params, share_prompts=False)), args.repeats)
            entry["fact_9_sharing_speedup"] = entry["fact_9_prompts_one_by_one_s"] / entry["fact_9_prompts_s"]
        figures["models"][name] = entry
        def cell(key, width, unit=""):
            return (format(entry[key], ".2f" if not unit else ".1f") + unit if key in entry else "-").rjust(width)

        print(f"{name:<22}{cell('ours_s', 9)}{cell('package_s', 11)}{cell('reference_s', 13)}"
              f"{cell('vs_package', 12, 'x')}{cell('vs_reference', 14, 'x')}{entry['gflops']:9.1f}"
              f"{100 * entry['gflops'] / row_peak:8.0f}%", flush=True)
        del lm
    print()
    for name, entry in figures["models"].items():
        extra = {k: v for k, v in entry.items() if k in ("agreement_jaccard_t0.2", "score_correlation",
                                                         "max_rel_diff_vs_reference", "fact_9_prompts_s",
                                                         "fact_9_prompts_one_by_one_s", "fact_9_sharing_speedup")}
        if extra:
            print(name, ", ".join(f"{k} {v:.3g}" for k, v in extra.items()))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


FACT_9 = ["The capital of France is [MASK] .", "France's capital is [MASK] .", "The capital city of France is [MASK] .",
          "[MASK] is the capital of France .", "France has its capital at [MASK] .", "The French capital is [MASK] .",
          "[MASK] , the capital of France , is a large city .", "The seat of the government of France is [MASK] .",
          "France is governed from [MASK] ."]


class _P:
    def __init__(self, text, ids):
        self.text, self.answer_ids, self.answer = text, ids, ""


if __name__ == "__main__":
    raise SystemExit(main())
