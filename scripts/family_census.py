"""Every causal- and masked-LM model type of the installed transformers, decided: a row in kn_core/families.py,
a row read from its structure (kn_core/discover.py), or refused with the reason. Writes docs/FAMILIES.md.

Each type is built as a tiny random model from its own config class (2 layers, hidden 32, 72 FFN neurons where
the config takes those names) in a forked process with a 6 GiB memory cap and a time limit, so one that does not
build is listed with its error instead of stopping the census; types with a row are the suite's and not built.
Seconds per type on an idle core, up to a minute on a loaded one:

    PYTHONPATH=$PWD OMP_NUM_THREADS=1 python scripts/family_census.py > docs/FAMILIES.md
"""

from __future__ import annotations

import os
import resource
import signal
import sys
import warnings

import torch
import transformers
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM
from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                    MODEL_FOR_MASKED_LM_MAPPING_NAMES)
from transformers.utils import logging

from kn_core.families import FAMILIES, IMAGE_TEXT_WRAPPERS, UnsupportedModelError
from kn_core.ffn import FFNLayout

TIME_LIMIT_S = 120
SIZES = dict(vocab_size=100, hidden_size=32, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=8, max_position_embeddings=64, pad_token_id=0)


def decide(model_type: str, auto) -> str:
    try:
        config = AutoConfig.for_model(model_type, **SIZES)
        if config.get_text_config() is not config:
            return f"refused: a wrapper around a {config.get_text_config().model_type!r} model without a row"
        model = auto.from_config(config).eval()  # as load_model does: no dropout in the check's forward
    except BaseException as exc:  # noqa: BLE001 - any failure to build is reported, not raised
        first = str(exc).strip().splitlines()[0][:120] if str(exc).strip() else ""
        return f"not built from its config here ({type(exc).__name__}: {first})"
    try:
        layout = FFNLayout(model)
    except UnsupportedModelError as exc:
        reason = str(exc)
        if "not supported (" in reason and "); add its row" in reason:
            reason = reason[reason.index("not supported (") + 15:reason.index("); add its row")]
        return f"refused: {reason}"
    if layout.found:
        return f"read from its structure: {layout.spec.blocks}[i].{layout.spec.out_proj}"
    return "row"


def in_child(model_type: str, auto) -> str:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))
        signal.alarm(TIME_LIMIT_S)  # a default size that makes a huge tiny model (BLT) ends the child
        try:
            answer = decide(model_type, auto)
        except BaseException as exc:  # noqa: BLE001
            answer = f"not built from its config here ({type(exc).__name__})"
        os.write(write, answer.replace("|", "/").encode())
        os._exit(0)
    os.close(write)
    data = b""
    while chunk := os.read(read, 65536):
        data += chunk
    os.close(read)
    os.waitpid(pid, 0)
    return data.decode() or f"not built from its config here (over {TIME_LIMIT_S} s or 6 GiB)"


def main() -> None:
    warnings.filterwarnings("ignore")
    logging.set_verbosity_error()
    torch.set_num_threads(1)
    print(f"# Model families of transformers {transformers.__version__}\n")
    print("Written by `scripts/family_census.py`: every causal- and masked-LM model type of the installed "
          "transformers, built as a tiny random model from its config. *row*: kn_core/families.py has one (tested in "
          "the suite); *read from its structure*: no row, kn_core/discover.py found the FFN and checked the head "
          "against the model's logits (not in the suite: add a row and a tiny config to test it); *refused*: why. "
          "Mixture-of-experts rows are the MoE section's.\n")
    kinds = sys.argv[1:] or ["causal", "masked"]  # e.g. `masked` alone
    for kind, names, auto in (("causal", MODEL_FOR_CAUSAL_LM_MAPPING_NAMES, AutoModelForCausalLM),
                              ("masked", MODEL_FOR_MASKED_LM_MAPPING_NAMES, AutoModelForMaskedLM)):
        if kind not in kinds:
            continue
        print(f"\n## {kind}\n\n| model type | decision |\n|---|---|")
        for model_type in sorted(names):
            if FAMILIES.get(model_type) is not None:  # built and tested by the suite
                row_kind = FAMILIES[model_type].kind
                answer = "row" if row_kind == kind else f"row as {row_kind} (its {kind} class is not used)"
            elif model_type in IMAGE_TEXT_WRAPPERS:
                answer = "row (image-text: its language model)"
            else:
                answer = in_child(model_type, auto)
            print(f"| {model_type} | {answer} |", flush=True)
            print(model_type, file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
