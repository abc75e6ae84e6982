"""Knowledge Neuron Studio engine: models, FFN neurons, attribution, edits, evaluation, project store.

Imports no Qt, so it serves the CLI, the app, scripts and notebooks alike.
"""

__version__ = "0.1.0"
