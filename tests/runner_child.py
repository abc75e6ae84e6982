"""The fact set and saved tiny model of tests/test_runner.py and tests/test_cluster.py, and a child process that
attributes that fact set into a project until it is killed (one line per stored fact):

    python runner_child.py MODEL_FOLDER FACTS_FILE PROJECT STEPS [RAY_ADDRESS]

With KN_TEST_DIE_AFTER_PROMPTS=N in its environment the process dies (os._exit, as a kill would leave it) right
after the store has taken the Nth prompt result, in the middle of storing a fact.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

from kn_core.facts import Fact, FactSet, Relation

CAPITALS = [("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
            ("Egypt", "Cairo")]


def tiny_factset() -> FactSet:
    """Six P36 facts with five causal templates each, and one fact whose only template puts [Y] first, which a
    causal model cannot use (the runner must list it, not drop it)."""
    p36 = Relation("P36", "capital", ("The capital of [X] is [Y]", "The capital city of [X] is [Y]",
                                      "[X] has its capital in [Y]", "The seat of government of [X] is in [Y]",
                                      "The main city of [X] is [Y]"))
    first = Relation("P1376", "capital of", ("[Y] is the capital of [X]",))
    facts = [Fact("P36", country, city) for country, city in CAPITALS] + [Fact("P1376", "Peru", "Lima")]
    return FactSet("tiny capitals", {"P36": p36, "P1376": first}, facts)


def save_tiny(folder: Path) -> str:
    from tiny import make_tiny

    lm = make_tiny("gpt2")
    lm.model.save_pretrained(folder)
    lm.tokenizer.save_pretrained(folder)
    return str(folder)


def main(model: str, facts: str, project_path: str, steps: str, address: str | None = None) -> None:
    from kn_core.attribution import AttributionParams
    from kn_core.fact_files import import_facts
    from kn_core.models import load_model
    from kn_core.runner import attribute_factset
    from kn_core.store import open_or_create_project

    backend = None
    if address:
        from kn_core.cluster import RayBackend
        backend = RayBackend(address=address, workers=1)
    lm = load_model(model, device="cpu")

    def stored(work, run_id):
        print(f"stored {work.fact.subject} {run_id}", flush=True)
        time.sleep(0.3)  # time for the test to kill this process between facts or in the next one

    die_after = int(os.environ.get("KN_TEST_DIE_AFTER_PROMPTS", "0"))
    if die_after:
        from kn_core.store.runs import RunStore

        save_prompt, taken = RunStore.add_prompt_result, []

        def add_prompt_result(self, *args, **kwargs):
            save_prompt(self, *args, **kwargs)
            taken.append(1)
            if len(taken) == die_after:
                os._exit(9)

        RunStore.add_prompt_result = add_prompt_result
    with open_or_create_project(project_path) as project:
        attribute_factset(project, lm, import_facts(facts), AttributionParams(steps=int(steps)), backend=backend,
                          on_fact=stored)
    print("finished", flush=True)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    main(*sys.argv[1:])
