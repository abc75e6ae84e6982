"""File -> Open scores: a `kn attribute --save` file (kn_core.scores_file) becomes a run of the project, under a
relation of its own (no templates: its one prompt is the file's), so the plots, neuron sets and edits work on
it as on any run."""

from __future__ import annotations

from pathlib import Path

from kn_core.attribution import PromptScores
from kn_core.facts import Fact, Prompt, Relation
from kn_core.scores_file import SavedScores, ScoresFileError

from .session import COMPLETE, Run

SCORES_RELATION = Relation("scores", "opened score files (kn attribute --save)", ())


def scores_run(saved: SavedScores, path: str | Path, lm=None) -> Run:
    """The run of a scores file. With a model loaded, the file's neuron grid must be the model's (its neurons
    are what the panels inspect and edit); ScoresFileError otherwise."""
    layers, neurons = saved.scores.shape
    if lm is not None and (lm.layout.layers, lm.layout.neurons) != (layers, neurons):
        raise ScoresFileError(f"{Path(path).name}: its scores are {layers} layers x {neurons} neurons but the loaded "
                              f"model has {lm.layout.layers} x {lm.layout.neurons}; load the model it was attributed "
                              f"on ({saved.model.get('name') or saved.model.get('source') or 'not recorded'}) or "
                              "open it with no model loaded")
    fact = Fact(SCORES_RELATION.id, " ".join(saved.prompt.split()), saved.answer.strip())
    model = {"source": f"not recorded in {Path(path).name}", "layers": layers, "neurons": neurons, **saved.model}
    kind = model.get("kind", "causal")
    result = PromptScores(prompt=saved.prompt, answer=saved.answer, answer_ids=saved.answer_ids,
                          scores=saved.scores, activations=saved.activations, prob=saved.prob, token_probs=[],
                          completeness=[], seconds=0.0, params=dict(saved.params))
    prompt = Prompt(text=saved.prompt, answer=saved.answer, answer_ids=saved.answer_ids, template="", fact=fact,
                    kind=kind)
    return Run(fact=fact, prompts=[prompt], scores=[result], params=dict(saved.params),
               model=model, state=COMPLETE)


def same_scores(a: Run, b: Run) -> bool:
    import numpy as np

    return (len(a.scores) == len(b.scores) == 1 and np.array_equal(a.scores[0].scores, b.scores[0].scores)
            and np.array_equal(a.scores[0].activations, b.scores[0].activations))
