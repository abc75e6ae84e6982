"""The bad-input catalogue (issue 14): every case ends with exit status 2 and exactly one line on stderr that
names the problem, no traceback, within 10 s, and every path it was given byte for byte unchanged (`run_failing`:
files, folders, and paths that did not exist stay absent).

Cases run in-process through `main(argv)` on tiny models saved to folders, or on the default model where they
must fail before it loads. `[model] ...` lines (the loader's progress) are not counted as output lines; a warning
that escapes is (the real `kn` prints it on stderr). The Python API's catalogue: tests/test_bad_inputs_api.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

from kn_core.cli import main
from tiny import make_tiny

ROOT = Path(__file__).resolve().parents[1]
SURROGATE = "Fr\udcffance"  # what a mis-decoded byte becomes (surrogateescape)
LONG = " ".join(["Paris"] * 300)  # more tokens than the tiny models' 64 positions


S = ["neurons", "--relation", "P36", "--subject", "France"]
ATTR = ["attribute", "--prompt", "The capital of France is", "--answer", " Paris"]
UPD = ["edit", "update", "--relation", "P36", "--subject", "France"]
SUP = ["edit", "suppress", "--relation", "P36", "--subject", "France"]
AMP = ["edit", "amplify", "--relation", "P36", "--subject", "France"]
ERASE = ["edit", "erase", "--relation", "P36"]
DEG = ["edit", "degeneracy", "--relation", "P36", "--subject", "France"]
BATCH = ["edit", "batch", "{jsonl_bad}"]
NEURON = ["neuron", "--layer", "1", "--index", "2"]
REP = ["reproduce", "--out", "{tmp}/rep"]
TRACE = ["trace", "--relation", "P36", "--subject", "France"]
TRACE_PROMPT = ["trace", "--prompt", "The capital of France is", "--subject-text", "France", "--answer", " Paris"]
NO_MODEL = ["--model", "/nonexistent/model"]  # a case with this fails on its own input, before the model loads

# (id, argv, words the error line must contain) or pytest.param(...) with marks.
CASES = [
    # integration steps
    ("steps-0", S + ["--steps", "0"], ["--steps", "0", "1000"]),
    ("steps-negative", S + ["--steps", "-1"], ["--steps", "-1"]),
    ("steps-huge", S + ["--steps", "100000"], ["--steps", "100000", "--force"]),
    ("steps-1e9", S + ["--steps", "1e9"], ["--steps", "1000000000", "1 to 1000"]),
    ("steps-fraction", S + ["--steps", "2.5"], ["--steps", "2.5"]),
    ("steps-word", ERASE + ["--steps", "abc"], ["--steps", "abc"]),
    ("steps-attribute-1001", ATTR + ["--steps", "1001"], ["--steps", "1001"]),
    ("steps-suppress", SUP + ["--steps", "5000"], ["--steps", "5000"]),
    ("steps-reproduce", REP + ["--steps", "0"], ["--steps", "0"]),
    ("keep-template-without-control", S + ["--keep-template"], ["--keep-template", "--subject-control"]),
    ("keep-template-without-control-edit", SUP + ["--keep-template"], ["--keep-template", "--subject-control"]),
    ("keep-template-without-control-update", UPD + ["--new-object", "Berlin", "--keep-template"],
     ["--keep-template", "--subject-control"]),
    ("keep-template-no-control-reproduce", REP + ["--keep-template", "--no-subject-control"],
     ["--keep-template", "--no-subject-control"]),
    ("steps-reproduce-force-not-offered", REP + ["--steps", "2000", "--force"], ["--force"]),
    # quadrature and its tolerance (kn attribute, kn neurons, and the verbs that find neurons to edit)
    ("quadrature-suppress-unknown", SUP + ["--quadrature", "simpson"], ["--quadrature", "simpson", "riemann"]),
    ("quadrature-batch-unknown", BATCH + ["--quadrature", "trapezoid"], ["--quadrature", "trapezoid", "riemann"]),
    ("tolerance-suppress-0", SUP + ["--tolerance", "0"], ["--tolerance", "0", "> 0"]),
    ("tolerance-amplify-word", AMP + ["--tolerance", "low"], ["--tolerance", "low", "invalid float"]),
    ("tolerance-update-nan", UPD + ["--new-object", "Berlin", "--tolerance", "nan"], ["--tolerance", "nan", "<= 1.0"]),
    ("tolerance-erase-above-1", ERASE + ["--tolerance", "2"], ["--tolerance", "2", "<= 1.0"]),
    ("tolerance-batch-negative", BATCH + ["--tolerance=-0.1"], ["--tolerance", "-0.1", "> 0"]),
    ("steps-suppress-gauss-1001", SUP + ["--quadrature", "gauss", "--steps", "1001"], ["--steps", "1001", "--force"]),
    ("steps-batch-auto-0", BATCH + ["--quadrature", "auto", "--steps", "0"], ["--steps", "0", "1 to 1000"]),
    # thresholds t and p
    ("t-nan", S + ["--t", "nan"], ["--t", "nan", "0.0 to 1.0"]),
    ("t-inf", S + ["--t", "inf"], ["--t", "inf"]),
    ("t-negative", S + ["--t", "-1"], ["--t", "-1"]),
    ("t-above-1", S + ["--t", "1.5"], ["--t", "1.5"]),
    ("p-nan", S + ["--p", "nan"], ["--p", "nan"]),
    ("p-5", S + ["--p", "5"], ["--p", "5"]),
    ("p-negative", S + ["--p", "-1"], ["--p", "-1"]),
    ("t-attribute-nan", ATTR + ["--t", "nan"], ["--t", "nan"]),
    ("t-suppress-negative", SUP + ["--t", "-0.1"], ["--t", "-0.1"]),
    ("p-update-inf", UPD + ["--new-object", "Berlin", "--p", "inf"], ["--p", "inf"]),
    ("p-erase-2", ERASE + ["--p", "2"], ["--p", "2"]),
    ("t-word", S + ["--t", "high"], ["--t", "high"]),
    # counts
    ("top-negative", ["predict", "hi", "--top", "-5"], ["--top", "-5", ">= 1"]),
    ("top-0", ["predict", "hi", "--top", "0"], ["--top", "0"]),
    ("top-k-negative", NEURON + ["--top-k", "-3"], ["--top-k", "-3"]),
    ("top-k-0", NEURON + ["--top-k", "0"], ["--top-k", "0"]),
    ("erase-k-0", ERASE + ["--k", "0"], ["--k", "0"]),
    ("erase-max-facts-0", ERASE + ["--max-facts", "0"], ["--max-facts", "0"]),
    ("erase-control-facts-negative", ERASE + ["--control-facts", "-1"], ["--control-facts", "-1"]),
    ("update-relation-facts-negative", UPD + ["--new-object", "B", "--relation-facts", "-2"], ["--relation-facts"]),
    ("reproduce-facts-per-relation-0", REP + ["--facts-per-relation", "0"], ["--facts-per-relation", "0"]),
    ("reproduce-control-prompts-0", REP + ["--control-prompts", "0"], ["--control-prompts", "0"]),
    ("reproduce-prompts-per-fact-2", REP + ["--prompts-per-fact", "2"], ["--prompts-per-fact", "2", "3"]),
    ("neuron-layer-negative", ["neuron", "--layer", "-1", "--index", "0"], ["--layer", "-1"]),
    ("neuron-index-negative", ["neuron", "--layer", "0", "--index", "-5"], ["--index", "-5"]),
    ("seed-negative", SUP + ["--seed", "-1"], ["--seed", "-1"]),
    # factors and lambdas
    ("factor-nan", AMP + ["--factor", "nan"], ["--factor", "nan"]),
    ("factor-inf", AMP + ["--factor", "inf"], ["--factor", "inf"]),
    ("factor-minus-inf", AMP + ["--factor=-inf"], ["--factor", "-inf"]),
    ("lambda1-nan", UPD + ["--new-object", "Berlin", "--lambda1", "nan"], ["--lambda1", "nan"]),
    ("lambda2-inf", UPD + ["--new-object", "Berlin", "--lambda2", "inf"], ["--lambda2", "inf"]),
    ("lambda1-word", UPD + ["--new-object", "Berlin", "--lambda1", "big"], ["--lambda1", "big"]),
    # text
    ("predict-empty", ["predict", ""], ["prompt", "non-empty"]),
    ("predict-blank", ["predict", "   "], ["prompt", "non-empty"]),
    ("predict-nul", ["predict", "Paris\x00is"], ["prompt", "NUL"]),
    ("predict-surrogate", ["predict", SURROGATE], ["prompt", "surrogate"]),
    ("attribute-prompt-empty", ["attribute", "--prompt", "", "--answer", " Paris"], ["--prompt", "non-empty"]),
    ("attribute-answer-empty", ["attribute", "--prompt", "x", "--answer", ""], ["--answer", "non-empty"]),
    ("attribute-answer-blank", ["attribute", "--prompt", "x", "--answer", "   "], ["--answer", "non-empty"]),
    ("attribute-prompt-nul", ["attribute", "--prompt", "x\x00", "--answer", " y"], ["--prompt", "NUL"]),
    ("attribute-answer-surrogate", ["attribute", "--prompt", "x", "--answer", SURROGATE], ["--answer", "surrogate"]),
    ("subject-empty", ["neurons", "--relation", "P36", "--subject", ""], ["--subject", "non-empty"]),
    ("subject-nul", ["neurons", "--relation", "P36", "--subject", "Fr\x00ance"], ["--subject", "NUL"]),
    ("subject-surrogate", SUP[:4] + ["--subject", SURROGATE], ["--subject", "surrogate"]),
    ("relation-blank", ["neurons", "--relation", "   ", "--subject", "France"], ["--relation", "non-empty"]),
    ("new-object-empty", UPD + ["--new-object", ""], ["--new-object", "non-empty"]),
    ("new-object-blank", UPD + ["--new-object", "  "], ["--new-object", "non-empty"]),
    ("new-object-nul", UPD + ["--new-object", "Berl\x00in"], ["--new-object", "NUL"]),
    ("neuron-prompt-empty", NEURON + ["--prompt", ""], ["--prompt", "non-empty"]),
    ("neuron-prompt-nul", NEURON + ["--prompt", "ok", "--prompt", "a\x00"], ["--prompt", "NUL"]),
    ("relations-blank", REP + ["--relations", " "], ["--relations"]),
    ("model-empty", ["model", "info", "--model", ""], ["--model", "non-empty"]),
    ("facts-nul", ["facts", "list", "--facts", "a\x00.csv"], ["--facts", "NUL"]),
    # output and input paths
    ("save-missing-folder", ATTR + ["--save", "/missing/dir/x.npz"], ["--save", "/missing/dir", "does not exist"]),
    ("save-is-a-folder", ATTR + ["--save", "{dir}"], ["--save", "folder"]),
    ("save-under-a-file", ATTR + ["--save", "{file}/x.npz"], ["--save"]),
    ("reproduce-out-is-a-file", ["reproduce", "--out", "{file}"], ["--out", "existing file"]),
    ("bench-file-missing", ["bench", "/missing/cf.json", "--out", "{tmp}/b"], ["FILE", "no such file"]),
    ("bench-cases-zero", ["bench", "{file}", "--cases", "0", "--out", "{tmp}/b"], ["--cases", "0"]),
    ("bench-gen-tokens-zero", ["bench", "{file}", "--gen-tokens", "0", "--out", "{tmp}/b"], ["--gen-tokens"]),
    ("bench-not-a-benchmark", ["bench", "{file}", "--out", "{tmp}/b"], ["line 1", "not valid JSON"]),
    ("bench-unknown-format", ["bench", "{jsonl_unknown_format}", "--out", "{tmp}/b"], ["not a known benchmark format"]),
    ("bench-cluster-unknown", ["bench", "{counterfact}", "--cluster", "spark", "--out", "{tmp}/b"],
     ["--cluster", "spark"]),
    ("bench-workers-without-cluster", ["bench", "{counterfact}", "--workers", "2", "--out", "{tmp}/b"],
     ["--cluster ray"]),
    ("bench-mquake-protocol-on-counterfact", ["bench", "{counterfact}", "--protocol", "mquake", "--out", "{tmp}/b"],
     ["--protocol mquake", "counterfact"]),
    ("to-counterfact-output-is-a-folder", ["facts", "to-counterfact", "--output", "{dir}"], ["--output", "folder"]),
    ("to-counterfact-per-relation-zero", ["facts", "to-counterfact", "--output", "{tmp}/c.json", "--per-relation",
                                          "0"], ["--per-relation"]),
    ("reproduce-out-under-a-file", ["reproduce", "--out", "{file}/sub"], ["--out", "is a file"]),
    ("export-is-a-file", SUP + ["--export", "{file}"], ["--export", "existing file"]),
    ("project-export-out-is-a-file", ["project", "export", "{project}", "--out", "{file}"], ["--out", "file"]),
    ("project-is-a-folder", ["predict", "hi", "--project", "{dir}"], ["--project", "folder"]),
    ("project-missing-folder", ["predict", "hi", "--project", "/missing/dir/p.knproj"], ["--project", "/missing"]),
    ("rank-file-missing", NEURON + ["--rank-file", "/missing/sentences.txt"], ["--rank-file", "no such file"]),
    ("rank-file-is-a-folder", NEURON + ["--rank-file", "{dir}"], ["--rank-file", "regular file"]),
    # device and dtype
    ("device-cuda-abc", ["predict", "hi", "--device", "cuda:abc"], ["--device", "cuda:abc"]),
    ("device-gpu", ["predict", "hi", "--device", "gpu"], ["--device", "gpu"]),
    ("device-cuda-colon", ["predict", "hi", "--device", "cuda:"], ["--device"]),
    ("dtype-float8", ["predict", "hi", "--dtype", "float8"], ["--dtype", "float8"]),
    pytest.param("device-cuda-99", ["predict", "hi", "--model", "{gpt2}", "--device", "cuda:99"], ["cuda:99"],
                 id="device-cuda-99"),
    # argparse
    ("predict-no-prompt", ["predict"], ["prompt", "required"]),
    ("neurons-no-subject", ["neurons", "--relation", "P36"], ["--subject", "required"]),
    ("edit-unknown-kind", ["edit", "bogus"], ["bogus"]),
    ("rule-middle", ATTR + ["--rule", "middle"], ["--rule", "middle"]),
    ("method-xyz", ATTR + ["--method", "xyz"], ["--method", "xyz"]),
    ("share-prompts-maybe", S + ["--share-prompts", "maybe"], ["--share-prompts", "maybe"]),
    ("scope-everywhere", SUP + ["--scope", "everywhere"], ["--scope", "everywhere"]),
    ("fill-one", ERASE + ["--fill", "one"], ["--fill", "one"]),
    ("degeneracy-criterion-rank", DEG + ["--criterion", "rank"], ["--criterion", "rank"]),
    ("degeneracy-removed-below-2", DEG + ["--removed-below", "2"], ["--removed-below", "2"]),
    ("degeneracy-removed-below-0", DEG + ["--removed-below", "0"], ["--removed-below", "> 0"]),
    ("hold-out-negative", SUP + ["--hold-out", "-1"], ["--hold-out", "-1"]),
    ("degeneracy-max-neurons-1", DEG + ["--max-neurons", "1"], ["--max-neurons", "1"]),
    ("batch-requests-missing", ["edit", "batch", "{tmp}/none.jsonl"], ["REQUESTS", "no such file"]),
    ("batch-requests-folder", ["edit", "batch", "{tmp}"], ["REQUESTS", "regular file"]),
    ("batch-mode", BATCH + ["--mode", "parallel"], ["--mode", "parallel"]),
    ("batch-kind-erase", BATCH + ["--kind", "erase"], ["--kind", "erase"]),
    ("batch-max-prompts-0", BATCH + ["--max-prompts", "0"], ["--max-prompts", "0"]),
    ("batch-forgetting-prompts-0", BATCH + ["--forgetting-prompts", "0"], ["--forgetting-prompts", "0"]),
    ("degeneracy-subject-unknown", ["edit", "degeneracy", "--relation", "P36", "--subject", "Atlantis"], ["Atlantis"]),
    ("position-first", NEURON + ["--position", "first"], ["--position", "first"]),
    ("select-best", REP + ["--select", "best"], ["--select", "best"]),
    ("unknown-verb", ["frobnicate"], ["frobnicate"]),
    ("unknown-flag", ["predict", "hi", "--frobnicate"], ["--frobnicate"]),
    ("layer-word", ["neuron", "--layer", "top", "--index", "0"], ["--layer", "top"]),
    # lookups
    ("relation-unknown", ["neurons", "--relation", "P999", "--subject", "France"], ["P999", "relations"]),
    ("subject-unknown", ["neurons", "--relation", "P36", "--subject", "Atlantis"], ["Atlantis"]),
    ("erase-relation-unknown", ["edit", "erase", "--relation", "P999"], ["P999"]),
    ("facts-list-relation-unknown", ["facts", "list", "--relation", "P999"], ["P999"]),
    ("facts-missing-file", ["facts", "list", "--facts", "/nonexistent.csv"], ["no such file"]),
    ("facts-import-missing", ["facts", "import", "/nonexistent.jsonl"], ["no such file"]),
    # models
    ("model-missing-folder", ["model", "info", "--model", "/nonexistent/folder/xyz"], ["/nonexistent/folder/xyz"]),
    ("model-folder-not-a-model", ["model", "info", "--model", "{dir}"], ["not a model"]),
    ("predict-masked-without-mask", ["predict", "The capital of France is Paris .", "--model", "{bert}"], ["mask"]),
    ("neuron-layer-beyond-model", ["neuron", "--layer", "99", "--index", "0", "--model", "{gpt2}"],
     ["--layer", "99", "0 to 2"]),
    ("neuron-index-beyond-model", ["neuron", "--layer", "0", "--index", "9999", "--model", "{gpt2}"],
     ["--index", "9999", "0 to 71"]),
    pytest.param("predict-prompt-too-long", ["predict", LONG, "--model", "{gpt2}"], ["positions"],
                 id="predict-prompt-too-long"),
    pytest.param("attribute-prompt-too-long", ["attribute", "--prompt", LONG, "--answer", " Paris", "--model",
                                              "{gpt2}", "--steps", "1"], ["positions"],
                 id="attribute-prompt-too-long"),
    pytest.param("model-type-unknown", ["model", "info", "--model", "{unknown_type}"], ["nonsense"],
                 id="model-type-unknown"),
    pytest.param("model-bad-pickle", ["model", "info", "--model", "{bad_pickle}"], ["pytorch_model.bin"],
                 id="model-bad-pickle"),
    # nothing is written to a project by a failing command
    ("project-t-nan", S + ["--t", "nan", "--project", "{project}"], ["--t"]),
    ("project-save-missing", ATTR + ["--save", "/missing/x.npz", "--project", "{project}"], ["--save"]),
    ("project-new-object-empty", UPD + ["--new-object", "", "--project", "{project}"], ["--new-object"]),
    ("project-predict-empty", ["predict", "", "--project", "{project}"], ["prompt"]),
    ("project-no-mask", ["predict", "Paris .", "--model", "{bert}", "--project", "{project}"], ["mask"]),
    ("project-facts-import-missing", ["facts", "import", "/nonexistent.csv", "--project", "{project}"],
     ["no such file"]),
    ("project-relation-unknown", ["neurons", "--relation", "P999", "--subject", "X", "--project", "{project}"],
     ["P999"]),
    ("project-info-missing", ["project", "info", "/missing.knproj"], ["no such project file"]),
    ("project-info-not-a-project", ["project", "info", "{file}"], ["{file}"]),
    ("project-info-folder", ["project", "info", "{dir}"], ["{dir}"]),
    ("project-export-missing", ["project", "export", "/missing.knproj", "--out", "{tmp}/e"], ["no such project"]),
    ("project-info-json-missing", ["project", "info", "/missing.knproj", "--json"], ["no such project file"]),
    # kn report: nothing is written when the project or the folder is wrong
    ("report-missing-project", ["report", "/missing.knproj", "--out", "{tmp}/r"], ["no such project file"]),
    ("report-corrupt-project", ["report", "{truncated_project}", "--out", "{tmp}/r"], ["truncated"]),
    ("report-not-a-project", ["report", "{file}", "--out", "{tmp}/r"], ["not a Knowledge Neuron Studio project"]),
    ("report-out-is-a-file", ["report", "{project}", "--out", "{file}"], ["--out", "existing file"]),
    ("report-out-under-a-file", ["report", "{project}", "--out", "{file}/r"], ["--out", "is a file"]),
    ("report-out-unwritable", ["report", "{project}", "--out", "/proc/kn-report"], ["/proc/kn-report"]),
    ("report-out-holds-other-files", ["report", "{project}", "--out", "{pararel_dir}"],
     ["already holds other files", "new or empty folder"]),
    # a whole fact set (kn attribute --facts; docs/SCALE.md)
    ("facts-run-no-project", ["attribute", "--facts", "builtin"], ["--project"]),
    ("facts-run-relation-unknown", ["attribute", "--facts", "builtin", "--relations", "P999", "--project",
                                    "{project}"], ["P999"]),
    ("facts-run-cluster-unknown", ["attribute", "--facts", "builtin", "--project", "{project}", "--cluster", "spark"],
     ["--cluster", "spark"]),
    ("facts-run-workers-0", ["attribute", "--facts", "builtin", "--project", "{project}", "--cluster", "ray",
                             "--workers", "0"], ["--workers", "0"]),
    ("facts-run-workers-without-cluster", ["attribute", "--facts", "builtin", "--project", "{project}", "--workers",
                                           "2"], ["--cluster ray"]),
    ("facts-run-causal-templates-unknown", ["attribute", "--facts", "builtin", "--project", "{project}",
                                            "--causal-templates", "suffix"], ["--causal-templates", "suffix"]),
    # the facts importer
    pytest.param("csv-unterminated-quote", ["facts", "import", "{csv_quote}"], ["quote"], id="csv-unterminated-quote"),
    pytest.param("jsonl-deeply-nested", ["facts", "import", "{jsonl_nested}"], ["line 1"], id="jsonl-deeply-nested"),
    pytest.param("pararel-file-is-a-folder", ["facts", "import", "{pararel_dir}"], ["P36"],
                 id="pararel-file-is-a-folder"),
    pytest.param("pararel-no-facts", ["facts", "import", "{pararel_empty}"], ["no facts"], id="pararel-no-facts"),
    pytest.param("jsonl-undeclared-relation", ["facts", "list", "--facts", "{jsonl_undeclared}"],
                 ["P999", "declares"], id="jsonl-undeclared-relation"),
    pytest.param("csv-undeclared-relation", ["facts", "import", "{csv_undeclared}"], ["P999", "declares"],
                 id="csv-undeclared-relation"),
    ("jsonl-not-json", ["facts", "import", "{jsonl_bad}"], ["line 1"]),
    ("csv-empty", ["facts", "import", "{csv_empty}"], ["empty"]),
    # found by the audit before closing issue 14 (each failed before its fix)
    ("jsonl-nul-subject", ["facts", "import", "{jsonl_nul}"], ["line 2", "subject", "NUL"]),
    ("jsonl-surrogate-object", ["facts", "import", "{jsonl_surrogate}"], ["line 2", "object", "surrogate"]),
    ("csv-nul-template", ["facts", "import", "{csv_nul_template}"], ["line 3", "template", "NUL"]),
    pytest.param("neuron-prompt-too-long", NEURON + ["--prompt", LONG, "--model", "{gpt2}"], ["positions"],
                 id="neuron-prompt-too-long"),
    pytest.param("neuron-rank-file-too-long", NEURON + ["--rank-file", "{rank_long}", "--model", "{gpt2}"],
                 ["positions"], id="neuron-rank-file-too-long"),
    ("neuron-rank-file-not-utf8", NEURON + ["--rank-file", "{rank_latin1}"] + NO_MODEL, ["--rank-file", "UTF-8"]),
    ("neuron-rank-file-nul", NEURON + ["--rank-file", "{rank_nul}"] + NO_MODEL, ["--rank-file line 2", "NUL"]),
    pytest.param("model-empty-pickle", ["model", "info", "--model", "{empty_pickle}"],
                 ["pytorch_model.bin", "empty", "safetensors"], id="model-empty-pickle"),
    pytest.param("model-damaged-safetensors", ["model", "info", "--model", "{bad_safetensors}"],
                 ["model.safetensors", "damaged"], id="model-damaged-safetensors"),
    pytest.param("model-bad-pickle-no-unsafe-advice", ["model", "info", "--model", "{bad_pickle}"],
                 ["never unpickled"], id="model-bad-pickle-no-unsafe-advice"),
    ("save-fifo", ATTR + ["--save", "{fifo}"] + NO_MODEL, ["--save", "special file"]),
    ("project-fifo-before-model", ["predict", "hi", "--project", "{fifo}"] + NO_MODEL, ["--project", "special file"]),
    ("project-truncated-before-model", S + ["--project", "{truncated_project}"] + NO_MODEL,
     ["truncated", "kn project recover"]),
    ("project-not-a-project-before-model", ["predict", "hi", "--project", "{file}"] + NO_MODEL,
     ["not a Knowledge Neuron Studio project"]),
    ("facts-run-relations-none", ["attribute", "--facts", "builtin", "--project", "{project}", "--relations", ",,"]
     + NO_MODEL, ["--relations", "',,'"]),
    ("reproduce-relation-unknown-before-model", REP + ["--relations", "P999"] + NO_MODEL, ["P999"]),
    ("batch-nul-object", ["edit", "batch", "{batch_nul}"] + NO_MODEL, ["line 1", "new_object", "NUL"]),
    ("batch-surrogate-prompt", ["edit", "batch", "{batch_surrogate}"] + NO_MODEL, ["line 1", "surrogate"]),
    ("batch-bad-lines-in-one-line", ["edit", "batch", "{batch_two_bad}"] + NO_MODEL,
     ["2 bad request(s)", "line 1: not valid JSON", "line 2: no fact", "--skip-bad"]),
    pytest.param("batch-prompt-too-long", ["edit", "batch", "{batch_long}", "--model", "{gpt2}"],
                 ["line 1", "positions"], id="batch-prompt-too-long"),
    # prompt formats and generation-based evaluation (issue 22)
    ("prompt-format-unknown", S + ["--prompt-format", "markdown"], ["--prompt-format", "markdown", "plain"]),
    ("prompt-format-reproduce-unknown", REP + ["--prompt-format", "Chat"], ["--prompt-format", "Chat"]),
    ("prompt-format-batch-unknown", BATCH + ["--prompt-format", "json"], ["--prompt-format", "json"]),
    ("eval-unknown", SUP + ["--eval", "sample"], ["--eval", "sample", "forced"]),
    ("eval-batch-unknown", BATCH + ["--eval", "greedy"], ["--eval", "greedy"]),
    pytest.param("prompt-format-chat-without-template", ATTR + ["--prompt-format", "chat", "--model", "{gpt2}"],
                 ["no chat template", "--prompt-format plain"], id="prompt-format-chat-without-template"),
    pytest.param("prompt-format-chat-masked", S + ["--prompt-format", "chat", "--model", "{bert}"],
                 ["masked", "--prompt-format plain"], id="prompt-format-chat-masked"),
    pytest.param("eval-generate-masked", SUP + ["--eval", "generate", "--model", "{bert}"],
                 ["--eval generate", "causal", "--eval forced"], id="eval-generate-masked"),
    # kn trace (causal tracing)
    ("trace-subject-not-in-prompt", ["trace", "--prompt", "The capital of France is", "--subject-text", "Japan",
                                     "--answer", " Paris"], ["--subject-text", "Japan", "does not occur", "exactly"]),
    ("trace-fact-and-prompt", TRACE + ["--prompt", "The capital of France is"], ["either", "not both"]),
    ("trace-relation-without-subject", ["trace", "--relation", "P36"], ["--relation and --subject", "both"]),
    ("trace-prompt-without-answer", ["trace", "--prompt", "The capital of France is", "--subject-text", "France"],
     ["--answer"]),
    ("trace-nothing", ["trace"], ["--relation R --subject S", "--prompt"]),
    ("trace-samples-0", TRACE + ["--samples", "0"], ["--samples", "0", ">= 1"]),
    ("trace-samples-fraction", TRACE + ["--samples", "2.5"], ["--samples", "2.5"]),
    ("trace-noise-0", TRACE + ["--noise", "0"], ["--noise", "> 0"]),
    ("trace-noise-nan", TRACE + ["--noise", "nan"], ["--noise", "nan"]),
    ("trace-window-0", TRACE + ["--window", "0"], ["--window", ">= 1"]),
    ("trace-seed-negative", TRACE_PROMPT + ["--seed", "-1"], ["--seed", "-1"]),
    ("trace-kind-unknown", TRACE + ["--kind", "ffn"], ["--kind", "ffn", "residual"]),
    ("trace-out-not-an-image", TRACE + ["--out", "{tmp}/trace.txt"], ["--out", ".png"]),
    ("trace-out-is-a-folder", TRACE + ["--out", "{dir}"], ["--out", "folder"]),
    ("trace-subject-text-empty", TRACE_PROMPT[:3] + ["--subject-text", "", "--answer", " Paris"], ["--subject-text"]),
    ("trace-relation-unknown", ["trace", "--relation", "P999", "--subject", "France"], ["no relation", "P999"]),
    pytest.param("trace-prompt-too-long", ["trace", "--prompt", LONG, "--subject-text", "Paris", "--answer",
                                           " Paris", "--model", "{gpt2}"], ["positions"], id="trace-prompt-too-long"),
]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny models in folders, an existing file and folder, a project, and broken fact files."""
    from kn_core.store import create_project

    root = tmp_path_factory.mktemp("bad")
    places = {"tmp": str(root)}
    for family in ("bert", "gpt2"):
        lm = make_tiny(family)
        folder = root / family
        lm.model.save_pretrained(folder)
        lm.tokenizer.save_pretrained(folder)
        places[family] = str(folder)
    nan_model = make_tiny("gpt2")
    with torch.no_grad():
        nan_model.layout.blocks[0].mlp.c_proj.weight[0, 0] = float("nan")  # as an overflowed fine-tune leaves it
    nan_model.model.save_pretrained(root / "nan_weights")
    nan_model.tokenizer.save_pretrained(root / "nan_weights")
    places["nan_weights"] = str(root / "nan_weights")
    (root / "a_file.txt").write_text("not a project, not a model\n")
    places["file"] = str(root / "a_file.txt")
    (root / "a_dir").mkdir()
    places["dir"] = str(root / "a_dir")
    places["counterfact"] = str(ROOT / "tests" / "data" / "counterfact_sample.json")
    with create_project(root / "p.knproj") as project:
        project.add_fact({"relation": "P36", "subject": "France", "object": "Paris"})
    places["project"] = str(root / "p.knproj")
    unknown = root / "unknown_type"
    unknown.mkdir()
    (unknown / "config.json").write_text('{"model_type": "nonsense", "hidden_size": 8}')
    places["unknown_type"] = str(unknown)
    bad = root / "bad_pickle"
    shutil.copytree(places["gpt2"], bad)
    for weights in bad.glob("*.safetensors"):
        weights.unlink()
    (bad / "pytorch_model.bin").write_bytes(b"\x80\x04not a pickle at all")
    places["bad_pickle"] = str(bad)
    files = {"csv_quote": ("q.csv", 'kind,relation,subject,object\nrelation,P1,,\nfact,P1,"France,Paris\n'),
             "jsonl_nested": ("n.jsonl", "[" * 100000 + "]" * 100000 + "\n"),
             "jsonl_bad": ("b.jsonl", "{not json\n"),
             "csv_empty": ("e.csv", ""),
             "jsonl_undeclared": ("u.jsonl", '{"kind": "fact", "relation": "P999", "subject": "France", '
                                             '"object": "Paris"}\n'),
             "csv_undeclared": ("u.csv", "kind,relation,name,template,subject,object\nfact,P999,,,France,Paris\n")}
    for key, (name, text) in files.items():
        (root / name).write_text(text)
        places[key] = str(root / name)
    pararel = root / "pararel_dir" / "pattern_data" / "graphs_json"
    pararel.mkdir(parents=True)
    (root / "pararel_dir" / "trex_lms_vocab").mkdir()
    (pararel / "P36.jsonl").mkdir()
    places["pararel_dir"] = str(root / "pararel_dir")
    empty = root / "pararel_empty" / "pattern_data" / "graphs_json"
    empty.mkdir(parents=True)
    (root / "pararel_empty" / "trex_lms_vocab").mkdir()
    (empty / "P36.jsonl").write_text('{"pattern": "[X] is the capital of [Y] ."}\n')
    places["pararel_empty"] = str(root / "pararel_empty")
    _audit_files(root, places)
    return places


def _audit_files(root: Path, places: dict) -> None:
    """The inputs of the cases the audit before closing issue 14 added."""
    relation = '{"kind": "relation", "id": "P1", "name": "in", "templates": ["[X] is in [Y] ."]}\n'
    texts = {
        "jsonl_nul": ("nul.jsonl", relation + '{"kind": "fact", "relation": "P1", "subject": "Fr\\u0000ance", '
                                              '"object": "Paris"}\n'),
        "jsonl_surrogate": ("sur.jsonl", relation + '{"kind": "fact", "relation": "P1", "subject": "France", '
                                                    '"object": "Par\\udcffis"}\n'),
        "csv_nul_template": ("t.csv", "kind,relation,name,template,subject,object\nrelation,P1,in,,,\n"
                                      "template,P1,,[X] is\x00 in [Y] .,,\nfact,P1,,,France,Paris\n"),
        "rank_long": ("long.txt", "Paris is nice\n" + LONG + "\n"),
        "rank_nul": ("nul.txt", "Paris is nice\nParis\x00 too\n"),
        "batch_nul": ("nul_requests.jsonl", '{"relation": "P36", "subject": "France", "new_object": "Ber\\u0000lin"}\n'),
        "batch_surrogate": ("sur_requests.jsonl", '{"prompt": "The capital of Fr\\udcffance is", "subject": '
                                                  '"Fr\\udcffance", "ground_truth": "Paris", "target_new": "Rome"}\n'),
        "jsonl_unknown_format": ("unknown_format.json", '[{"question": "What?", "answer": "x"}]'),
        "batch_two_bad": ("bad_requests.jsonl", '{oops\n{"relation": "P36", "subject": "Atlantis"}\n'),
        "batch_long": ("long_requests.jsonl", '{"prompt": "' + LONG + ' The capital of France is", "subject": '
                                              '"France", "ground_truth": "Paris", "target_new": "Berlin", '
                                              '"neurons": [[0, 1]]}\n'),
    }
    for key, (name, text) in texts.items():
        (root / name).write_text(text)
        places[key] = str(root / name)
    (root / "latin1.txt").write_bytes("Caf\xe9 de Paris\n".encode("latin-1"))
    places["rank_latin1"] = str(root / "latin1.txt")
    os.mkfifo(root / "pipe.npz")
    places["fifo"] = str(root / "pipe.npz")
    truncated = root / "truncated.knproj"
    truncated.write_bytes(Path(places["project"]).read_bytes()[:5000])
    places["truncated_project"] = str(truncated)
    empty = root / "empty_pickle"
    shutil.copytree(places["bad_pickle"], empty)
    (empty / "pytorch_model.bin").write_bytes(b"")
    places["empty_pickle"] = str(empty)
    damaged = root / "bad_safetensors"
    shutil.copytree(places["gpt2"], damaged)
    weights = next(damaged.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    places["bad_safetensors"] = str(damaged)


def _fill(text: str, places: dict) -> str:
    for key, value in places.items():
        text = text.replace("{" + key + "}", value)
    return text


def _params():
    for case in CASES:
        yield case if isinstance(case, type(pytest.param())) else pytest.param(*case, id=case[0])


def _sha(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def snapshot(argv, places: dict) -> dict:
    """What every path a command was given holds: a file's sha256, a folder's files (names and sha256s), or that
    nothing is there (a failed command must not create it: a project, an --out folder). Special files (a FIFO)
    are recorded by kind without being opened. The world's project is always included."""
    paths = [places["project"]] + [part for arg in argv for part in (arg, arg.partition("=")[2]) if part]
    state = {}
    for text in paths:
        path = Path(text)
        try:
            if not path.is_absolute() and not path.exists():
                continue  # plain words ("hi", "P36"), not paths
            if path.is_dir():
                state[text] = {str(f.relative_to(path)): _sha(f) if f.is_file() else "special"
                               for f in sorted(path.rglob("*"))}
            elif path.is_file():
                state[text] = _sha(text)
            else:
                state[text] = "special" if path.exists() else "absent"
        except OSError:  # a name too long for the file system, a path through a file
            state[text] = "unreadable"
    return state


def run_failing(argv, places: dict, capsys) -> tuple[int, list[str], str, str, float]:
    """Runs `kn argv` in-process; returns (status, stderr lines that count, stdout, stderr, seconds) after
    checking that every path it was given is byte-identical afterwards (`snapshot`)."""
    before = snapshot(argv, places)
    started = time.perf_counter()
    with warnings.catch_warnings(record=True) as escaped:  # the real `kn` prints each one on stderr
        warnings.simplefilter("always")
        code = main(argv)
    seconds = time.perf_counter() - started
    out, err = capsys.readouterr()
    shown = [line.rsplit("\r", 1)[-1] for line in err.split("\n")]  # what a terminal shows: progress bars redraw
    lines = [line for line in shown if line.strip() and not line.startswith("[model]")]
    lines += [f"{w.category.__name__}: {w.message}" for w in escaped if not issubclass(w.category, _HIDDEN)]
    after = snapshot(argv, places)
    changed = {path: (before[path], after.get(path)) for path in before if after.get(path) != before[path]}
    assert not changed, f"a failing command changed what it was given: {sorted(changed)}"
    return code, lines, out, err, seconds


def check_one_line(code, lines, out, err, seconds, words, places) -> None:
    assert code == 2, (code, err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    assert "Traceback" not in err and "Traceback" not in out
    for word in words:
        assert _fill(word, places) in lines[0], (word, lines[0])
    assert len(lines[0]) < 1500, len(lines[0])  # a huge field is quoted in part, not echoed whole
    assert seconds < 10, seconds


@pytest.mark.parametrize("name,argv,words", list(_params()))
def test_bad_input_is_one_line_status_2(name, argv, words, world, capsys):
    argv = [_fill(a, world) for a in argv]
    check_one_line(*run_failing(argv, world, capsys), words, world)


def test_non_finite_scores_end_the_run_in_one_line(world, capsys):
    """NaN scores (here from a NaN weight; in practice an overflow in float16) would make every threshold
    t x max undefined and the prompt's neurons silently missing: found only by attributing, so after the progress
    bar, the run ends with one error line and status 2."""
    code = main(["attribute", "--model", world["nan_weights"], "--prompt", "The capital of", "--answer", " Paris",
                 "--steps", "2", "--json"])
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert code == 2 and "Traceback" not in err
    assert len(errors) == 1 and "NaN or infinite" in errors[0] and "weights" in errors[0], err
    assert json.loads(out)["error_type"] == "NonFiniteScoresError"


# what Python does not show by default outside __main__
_HIDDEN = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)


def test_a_project_open_elsewhere_fails_before_the_model_loads(world, capsys):
    """The GUI (or another kn) holding the project: refused at once, not when the results are to be saved."""
    from kn_core.store import open_project

    before = _sha(world["project"])
    with open_project(world["project"]):  # flock is per open file, so this process's second open is refused too
        code = main(S + ["--project", world["project"]] + NO_MODEL)
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "open in another process" in err, err
    assert _sha(world["project"]) == before


@pytest.mark.parametrize("argv", [
    ["attribute", "--prompt", "The capital of France is", "--answer", " Paris", "--save", "/missing/dir/x.npz"],
    ["edit", "update", "--relation", "P36", "--subject", "France", "--new-object", ""],
    ["neurons", "--relation", "P36", "--subject", "France", "--steps", "1e9"],
])
def test_bad_arguments_fail_before_any_import_of_the_engine(argv):
    """As a fresh process, the common mistakes fail in well under a second: no model, not even torch."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    code = ("import sys, time; t = time.perf_counter(); from kn_core.cli import main; c = main(sys.argv[1:]); "
            "print(time.perf_counter() - t, 'torch' in sys.modules); sys.exit(c)")
    done = subprocess.run([sys.executable, "-c", code, *argv], capture_output=True, text=True, env=env, timeout=60)
    seconds, torch_loaded = done.stdout.split()
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert torch_loaded == "False" and float(seconds) < 1.0


def test_project_info_on_a_fifo_does_not_hang(tmp_path):
    fifo = tmp_path / "p.knproj"
    os.mkfifo(fifo)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    try:
        done = subprocess.run([sys.executable, "-m", "kn_core.cli", "project", "info", str(fifo)],
                              capture_output=True, text=True, env=env, timeout=10)
    except subprocess.TimeoutExpired:
        pytest.fail("kn project info on a FIFO hung")
    assert done.returncode == 2 and len(done.stderr.strip().splitlines()) == 1


def test_every_argument_of_every_verb_is_checked():
    """A new option gets a check in kn_core/cli/checks.py (or has choices, or is a flag)."""
    import argparse

    from kn_core.cli import build_parser
    from kn_core.cli.checks import CHECKS

    def parsers(parser):
        yield parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in action.choices.values():
                    yield from parsers(sub)

    unchecked = set()
    for parser in parsers(build_parser()):
        for action in parser._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction, argparse._StoreTrueAction)):
                continue
            if action.choices is None and action.dest not in CHECKS:
                unchecked.add(f"{parser.prog} {action.dest}")
    assert not unchecked, sorted(unchecked)
