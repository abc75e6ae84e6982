"""The attribution run's parameters as the engine defines them, declared once for the attribution panel's
controls (panels/form.py builds them): ranges from kn_core.validation, choices and defaults from
kn_core.attribution, kn_core.quadrature, kn_core.facts and kn_core.encoding. More steps than STEPS_RANGE allows only
from the kn command with --force."""

from __future__ import annotations

from kn_core.attribution import METHODS, RULES, AttributionParams
from kn_core.encoding import PROMPT_FORMATS
from kn_core.facts import CAUSAL_TEMPLATES
from kn_core.quadrature import QUADRATURES
from kn_core.validation import HOLD_OUT_RANGE, STEPS_RANGE

from .form import Param

TEMPLATES_TIP = ("Causal models: prefix uses every template, cut before [Y] (\"The capital of [X] is [Y], a "
                 "city.\" asks \"The capital of France is\"); end-only uses only templates that end with [Y]. "
                 "Recorded with each run; masked models fill [Y] wherever it is.")

ENGINE = AttributionParams()  # the engine's defaults (the paper's mode)
RUN_PARAMS = (
    Param("steps", "steps", "m, the number of Riemann steps of the integral (paper: 20); Gauss points per panel "
          "with gauss or auto", ENGINE.steps, bounds=(STEPS_RANGE.minimum, STEPS_RANGE.maximum)),
    Param("quadrature", "quadrature", "riemann: the paper's m-step sum; gauss: m Gauss-Legendre points per layer "
          "(dense where needed); auto: points added per layer until its completeness error is within 1% "
          "(kn_core/quadrature.py)", ENGINE.quadrature, choices=QUADRATURES),
    Param("rule", "rule", "right: alpha = k/m, k = 1..m (paper); left: k = 0..m-1 (authors' code)", ENGINE.rule,
          choices=RULES),
    Param("method", "method", "ig: integrated gradients; activation: the paper's baseline (raw activation)",
          ENGINE.method, choices=METHODS),
    Param("templates", "templates", TEMPLATES_TIP, CAUSAL_TEMPLATES[0], choices=CAUSAL_TEMPLATES),
)
HOLD_OUT_MAX = 20  # the engine has no top (it refuses a count that leaves too few templates): the box's own
PROMPT_PARAMS = (
    Param("hold_out", "", "Templates of each fact kept out of the attribution (drawn with the run's seed): an edit "
          "then measures generality on wordings its neurons never saw (0: every template finds the neurons and "
          "generality is n/a)", 0, bounds=(HOLD_OUT_RANGE.minimum, HOLD_OUT_RANGE.widget_maximum(HOLD_OUT_MAX)),
          prefix="hold out "),
    Param("prompt_format", "prompts", "plain: the prompt as it is; chat: through the model's chat template, the "
          "user asking to complete the sentence and the prompt starting the assistant's reply (instruct models), "
          "for attribution and evaluation alike; recorded with runs", PROMPT_FORMATS[0], choices=PROMPT_FORMATS),
)
