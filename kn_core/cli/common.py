"""What every `kn` verb shares: the common options, the one-line error, output, model loading, the
project, and the progress bar (a tqdm bar listening to a `kn_core.tasks.Task`)."""

from __future__ import annotations

import argparse
import os
import sys
from contextlib import contextmanager
from typing import Iterator

from ..jsonio import dumps
from ..tasks import Task

COMMON = argparse.ArgumentParser(add_help=False)
COMMON.add_argument("--model", default="default",
                    help="Hugging Face id, local folder, or 'default' (the embedded SmolLM2-135M-Instruct)")
COMMON.add_argument("--device", default="auto", help="auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N or mps")
COMMON.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="auto (float32), float32, bfloat16 or float16")
COMMON.add_argument("--trust-remote-code", action="store_true", help="allow model code from the hub (off by default)")
COMMON.add_argument("--allow-missing-weights", action="store_true",
                    help="load a model whose weight files lack tensors (random values), or hold unknown or "
                         "mis-shaped ones; which ones is recorded with the results (off: refused)")
COMMON.add_argument("--json", action="store_true", help="print one JSON document on stdout")
COMMON.add_argument("--project", help="a .knproj project file to store what this command computes")


class CliError(Exception):
    """A user-facing failure: one line, exit status 2."""


def say(message: str) -> None:
    """A message for the user: stderr, so that stdout stays one JSON document with --json."""
    print(message, file=sys.stderr, flush=True)


def emit(args, document: dict, text: str) -> None:
    """With --json: `document` as strict JSON (non-finite numbers -> null with a note, see jsonio)."""
    print(dumps(document) if args.json else text, flush=True)


def load(args):
    from ..models import load_model

    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    lm = load_model(args.model, device=args.device, dtype=args.dtype, trust_remote_code=args.trust_remote_code,
                    allow_missing_weights=getattr(args, "allow_missing_weights", False),
                    task=Task(on_progress=lambda fraction, message: say(f"[model] {message}")))
    if getattr(args, "prompt_format", None) is not None:  # verbs with --prompt-format (prompt_format_option)
        from ..encoding import PromptError, set_prompt_format

        try:
            set_prompt_format(lm, args.prompt_format)
        except PromptError as exc:
            raise CliError(str(exc)) from None
    if getattr(args, "eval", None) == "generate" and lm.kind != "causal":
        raise CliError(f"--eval generate needs a causal model ({lm.family} is masked: it fills a slot, it does not "
                       "continue); use --eval forced")
    return lm


def prompt_format_option(p) -> None:
    """--prompt-format: how every prompt of the verb is encoded (kn_core.encoding: plain, or the model's chat
    template); applied by `load` and recorded with what the verb stores and prints."""
    p.add_argument("--prompt-format", choices=["plain", "chat"], default="plain",
                   help="plain (default): the prompt as it is; chat: the tokenizer's chat template, the user asking "
                        "to complete the sentence and the prompt starting the assistant's reply (instruct models; "
                        "recorded with the results)")


def eval_option(p) -> None:
    """--eval: how an edit's prompts are judged correct (kn_core.evaluation.generation_rows)."""
    p.add_argument("--eval", choices=["forced", "generate"], default="forced",
                   help="forced (default): teacher-forced, every answer token the greedy choice; generate: the greedy "
                        "continuation (answer tokens + 2 new tokens) starts with the answer or an alias (case and "
                        "spaces ignored); probabilities stay teacher-forced (recorded with the results)")


def prompt_format_field(lm) -> dict:
    """The prompt format for --json output: always named, plain included."""
    from ..encoding import prompt_format

    return {"prompt_format": prompt_format(lm)}


@contextmanager
def project_of(args, whole_set: bool = False):
    """The project named by --project (created if missing), or None.

    What the block stores is one transaction: a command that fails stores nothing (no model row, no failed run,
    no facts) and a project it created is removed again. `whole_set` (kn attribute --facts): every fact commits
    on its own (a killed run keeps its completed facts), and a new project is removed only if it holds nothing."""
    if not getattr(args, "project", None):
        yield None
        return
    from pathlib import Path

    from ..store import open_or_create_project

    path = Path(args.project).expanduser()
    existed = path.exists()
    project = open_or_create_project(path)
    failed = True
    try:
        if whole_set:
            yield project
        else:
            with project.atomic(f"storing what kn {args.command} computed"):
                yield project
        failed = False
    finally:
        empty = (failed and not existed and project.at_its_path()
                 and not any(project.counts().get(k) for k in ("models", "facts", "runs")))
        project.close()
        if empty:  # a failed command leaves no project that did not exist (never another file put there)
            path.unlink(missing_ok=True)


def command_params(args) -> dict:
    """The options a command ran with, as they are recorded beside what it computed."""
    skip = ("func", "json", "project", "command")
    return {k: v for k, v in vars(args).items() if k not in skip and (v is None or isinstance(v, (str, int, float,
                                                                                                  bool, list)))}


def store_evaluation(args, lm, kind: str, report: dict, params: dict) -> None:
    with project_of(args) as project:
        if project is not None:
            project.add_model(lm)
            project.add_evaluation(kind, report, params=params, model=lm)


@contextmanager
def progress_bar(desc: str) -> Iterator[Task]:
    """A Task whose progress draws a tqdm bar on stderr; the bar goes away when the block ends."""
    from tqdm import tqdm

    bar = tqdm(total=1000, desc=desc, file=sys.stderr, leave=False,
               bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining}")

    def show(fraction, message):
        if message:
            bar.set_description_str(f"{desc}: {message}", refresh=False)
        if fraction is not None:
            bar.n = int(1000 * fraction)
        bar.refresh()

    try:
        yield Task(on_progress=show)
    finally:
        bar.close()


def factset_of(args):
    from ..fact_files import builtin_facts, import_facts

    name = getattr(args, "facts", None) or "builtin"
    return builtin_facts() if name == "builtin" else import_facts(name)


def find_fact(factset, relation: str, subject: str):
    try:
        factset.relation(relation)
    except KeyError:
        raise CliError(f"no relation {relation!r} in fact set {factset.name!r}; "
                       f"relations: {', '.join(sorted(factset.relations))}") from None
    for fact in factset.facts_of(relation):
        if fact.subject.lower() == subject.lower():
            return fact
    subjects = ", ".join(f.subject for f in factset.facts_of(relation)[:12])
    raise CliError(f"no fact with subject {subject!r} in relation {relation}; subjects include: {subjects}")


def neuron_list(neurons, scores=None, layout=None) -> list[dict]:
    """Neurons for JSON: {"layer", "neuron"}; in a mixture-of-experts model (`layout` given)
    {"layer", "expert", "neuron" (within the expert), "index" (in the layer's flattened axis, what inputs take)}."""
    out = [layout.neuron_dict(int(l), int(i)) if layout is not None else {"layer": int(l), "neuron": int(i)}
           for l, i in neurons]
    if scores is not None:
        for entry, (l, i) in zip(out, neurons):
            entry["score"] = float(scores[l, i])
    return out


PROTOCOL_CHOICES = ("kn", "easyedit", "rome", "mquake")  # protocols.PROTOCOLS (not imported: numpy at parse time)
