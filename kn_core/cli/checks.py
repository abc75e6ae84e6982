"""Every argument of every verb checked before a model loads or anything is computed (kn_core.validation),
and argparse's own errors as one line."""

from __future__ import annotations

import argparse

from .. import validation as v


def whole_number(text: str) -> int:
    """argparse type for counts: also takes whole numbers written as 1e3 or 20.0, so that the range check
    (CHECKS) can say what is allowed; a fraction or a word is refused here, naming what is wanted."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        number = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not number.is_integer():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    return int(number)


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors (usage stays in --help)."""

    def error(self, message):
        self.exit(2, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def _text(flag):
    return lambda value, args: v.check_text(flag, value)


def _at_least(flag, minimum):
    return lambda value, args: v.check_int(flag, value, minimum)


def _in_range(flag, allowed: v.Range, hint: str = ""):
    return lambda value, args: v.check_int(flag, value, allowed.minimum, allowed.maximum, hint)


# dest -> check(value, args); a dest means the same thing in every verb that has it. None values are defaults
# meaning "not given" and are not checked.
CHECKS = {
    "steps": lambda value, args: v.check_steps(value, getattr(args, "force", False), "--steps"),
    "t": lambda value, args: v.check_fraction("--t", value),
    "tolerance": lambda value, args: v.check_number("--tolerance", value, maximum=1.0, positive=True),
    "p": lambda value, args: v.check_fraction("--p", value),
    "top": _at_least("--top", 1),
    "top_k": _at_least("--top-k", 1),
    "k": _in_range("--k", v.ERASE_K_RANGE),
    "max_facts": _at_least("--max-facts", 1),
    "control_facts": _at_least("--control-facts", 0),
    "relation_facts": _at_least("--relation-facts", 0),
    "facts_per_relation": _at_least("--facts-per-relation", 1),
    "control_prompts": _at_least("--control-prompts", 1),
    "prompts_per_fact": _in_range("--prompts-per-fact", v.PROMPTS_PER_FACT_RANGE,
                                  " (refinement needs at least 3 prompts per fact)"),
    "seed": _at_least("--seed", 0),
    "workers": _at_least("--workers", 1),
    "worker_threads": _at_least("--worker-threads", 1),
    "cluster": lambda value, args: v.check_text("--cluster", value) and _cluster(value),
    "max_neurons": _in_range("--max-neurons", v.MAX_NEURONS_RANGE),
    "hold_out": _in_range("--hold-out", v.HOLD_OUT_RANGE),
    "removed_below": lambda value, args: v.check_number("--removed-below", value, maximum=1.0, positive=True),
    "layer": _at_least("--layer", 0),
    "index": _at_least("--index", 0),
    "factor": lambda value, args: v.check_number("--factor", value),
    "lambda1": lambda value, args: v.check_number("--lambda1", value),
    "lambda2": lambda value, args: v.check_number("--lambda2", value),
    "prompt": lambda value, args: ([v.check_text("--prompt", text) for text in value] if isinstance(value, list)
                                   else v.check_text("prompt" if args.command == "predict" else "--prompt", value)),
    "answer": _text("--answer"),
    "subject": _text("--subject"),
    "relation": _text("--relation"),
    "relations": lambda value, args: _relations(value),
    "new_object": _text("--new-object"),
    "model": _text("--model"),
    "facts": _text("--facts"),
    "device": lambda value, args: v.check_device_name("--device", value),
    "save": lambda value, args: v.check_output_file("--save", value),
    "project": lambda value, args: _project(value, args),
    "out": lambda value, args: v.check_output_folder("--out", value),
    "export": lambda value, args: v.check_output_folder("--export", value),
    "rank_file": lambda value, args: v.check_input_file("--rank-file", value),
    "requests": lambda value, args: v.check_input_file("REQUESTS", value),
    "forgetting_prompts": _at_least("--forgetting-prompts", 1),
    "max_prompts": _at_least("--max-prompts", 1),
    "subject_text": _text("--subject-text"),
    "samples": _at_least("--samples", 1),
    "noise": lambda value, args: v.check_number("--noise", value, positive=True),
    "window": _at_least("--window", 1),
    "figure": lambda value, args: _figure(value),
    "path": lambda value, args: v.check_text("path", value),
    "file": lambda value, args: v.check_text("file", value),
    "prompt_format": lambda value, args: v.check_choice("--prompt-format", value, ("plain", "chat")),
    "eval": lambda value, args: v.check_choice("--eval", value, ("forced", "generate")),
    "bench_file": lambda value, args: v.check_input_file("FILE", value),
    "cases": _at_least("--cases", 1),
    "gen_tokens": _at_least("--gen-tokens", 1),
    "generation_prompts": _at_least("--generation-prompts", 0),
    "per_relation": _at_least("--per-relation", 1),
    "max_paraphrases": _at_least("--max-paraphrases", 0),
    "min_prompts": _at_least("--min-prompts", 1),
    "output": lambda value, args: v.check_output_file("--output", value),
    "keep_template": lambda value, args: _keep_template(value, args),
}


# verbs that compute nothing to store: --project there is refused rather than silently ignored
NOTHING_TO_STORE = {("model", "fetch"): "kn model fetch only downloads the default model",
                    ("facts", "list"): "kn facts list only shows a fact set (kn facts import --project stores one)"}


def _project(value, args=None):
    """A project to create, or an existing one that opens for writing: a damaged, locked or read-only file fails
    here, not once the work it is to hold is done."""
    verb = (getattr(args, "command", None),
            getattr(args, "model_command", None) or getattr(args, "facts_command", None))
    if verb in NOTHING_TO_STORE:
        raise v.ValidationError(f"--project is not used by kn {' '.join(verb)}: {NOTHING_TO_STORE[verb]}; leave "
                                f"--project out")
    path = v.check_output_file("--project", value)
    if path.exists():
        from ..store import check_project_file  # numpy and SQLAlchemy, no torch: only when the file exists

        check_project_file(path)
    return path


def _figure(value):
    path = v.check_output_file("--out", value)
    if path.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise v.ValidationError(f"--out = {value!r} is not allowed: expected an image file ending in .png, .svg or "
                                f".pdf")
    return path


def _relations(value):
    v.check_text("--relations", value)
    if not any(r.strip() for r in value.split(",")):
        raise v.ValidationError(f"--relations = {value!r} is not allowed: expected all or relation ids R1,R2")
    return value


def _keep_template(keep: bool, args) -> None:
    """--keep-template keeps what the subject control flags: it needs the control (kn neurons and kn edit take
    --subject-control; kn reproduce runs it unless --no-subject-control)."""
    if not keep:
        return
    if getattr(args, "no_subject_control", False):
        raise v.ValidationError("--keep-template keeps the neurons the subject control flags, and "
                                "--no-subject-control skips that control; drop one of them")
    if not getattr(args, "subject_control", True):
        raise v.ValidationError("--keep-template keeps the neurons the subject control flags; add "
                                "--subject-control (or leave --keep-template out)")


def _cluster(value):
    kind, _, address = value.partition(":")
    if kind != "ray" or (":" in value and not address.strip()):
        raise v.ValidationError(f"--cluster = {value!r} is not allowed: use ray (local, or RAY_ADDRESS) or "
                                f"ray:ADDRESS (e.g. ray:auto or ray:10.0.0.1:6379)")
    return value


def check_args(args: argparse.Namespace) -> None:
    """Raises ValidationError naming the first bad argument."""
    for dest, value in vars(args).items():
        if value is not None and dest in CHECKS:
            CHECKS[dest](value, args)
