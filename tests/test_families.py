"""Every family end to end from a saved folder (load, attribute against the slow reference, edit with bitwise
undo), image-text checkpoints through their language model, and the structural fallback for a family without
a row (a made-up architecture)."""

import numpy as np
import pytest
import torch

from kn_core import edits as E
from kn_core.attribution import AttributionParams, attribute, encode_answer
from kn_core.edit_stack import EditStack
from kn_core.families import IMAGE_TEXT_WRAPPERS
from kn_core.models import load_model
from test_attribution import reference_scores
from test_edits import assert_bitwise, snapshot
from tiny import ALL_FAMILIES, IMAGE_TEXT, make_tiny, save_tiny_image_text


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _prompt(lm):
    if lm.kind == "masked":
        return "The capital of France is [MASK] .", "Paris"
    return "The capital of France is", " Paris"


def _attributes_and_edits(lm):
    """Attribution equals the one-layer-one-step reference; every edit kind changes the model's output and
    undoing them all restores every weight byte for byte."""
    text, answer = _prompt(lm)
    ids = encode_answer(lm, text, answer)
    ours = attribute(lm, text, AttributionParams(steps=2), answer_ids=ids).scores
    ref = reference_scores(lm, text, ids, steps=2)
    assert np.abs(ours - ref).max() <= 1e-5 * np.abs(ref).max()
    x = lm.tokenizer(text, return_tensors="pt").input_ids
    clean = lm.model(input_ids=x).logits
    original = snapshot(lm)
    strongest = tuple((layer, int(np.abs(ours[layer]).argmax())) for layer in range(lm.layout.layers))
    stack = EditStack(lm)
    try:
        for edit in (E.Suppress(strongest, "all"), E.Amplify(strongest, 3.0, "all"),
                     E.Update(strongest[:1], (6,), (7,), 1.0, 8.0), E.Erase(strongest[1:2])):
            stack.push(edit)
            assert not torch.equal(lm.model(input_ids=x).logits, clean), edit.describe()
    finally:
        stack.clear()
    assert_bitwise(lm, original)
    assert torch.equal(lm.model(input_ids=x).logits, clean)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_every_family_loads_attributes_and_edits(family, tmp_path):
    built = make_tiny(family)
    built.model.save_pretrained(tmp_path)
    built.tokenizer.save_pretrained(tmp_path)
    lm = load_model(str(tmp_path), device="cpu")
    assert lm.family == family and lm.sha256 == built.sha256
    lm.model.set_attn_implementation("eager")
    _attributes_and_edits(lm)


@pytest.fixture(scope="module", params=sorted(IMAGE_TEXT))
def image_text(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(request.param)
    save_tiny_image_text(request.param, folder)
    return load_model(str(folder), device="cpu")


def test_wrappers_under_test_are_the_supported_ones():
    assert sorted(IMAGE_TEXT) == sorted(IMAGE_TEXT_WRAPPERS)


def test_image_text_checkpoint_runs_its_language_model(image_text):
    lm = image_text
    config = lm.model.config
    text_type = config.get_text_config().model_type
    assert lm.describe()["loaded"].startswith(f"the {text_type} language model and head of this {config.model_type}")
    language_model = lm.model.model.language_model
    assert lm.layout.blocks == list(language_model.layers)
    # the text path of the wrapper is its language model and head, nothing else
    x = lm.tokenizer("The capital of France is", return_tensors="pt").input_ids
    hidden = language_model(input_ids=x).last_hidden_state
    assert torch.allclose(lm.layout.logits_head()(hidden), lm.model(input_ids=x).logits, rtol=1e-5, atol=1e-6)


def test_image_text_checkpoint_attributes_and_edits(image_text):
    image_text.model.set_attn_implementation("eager")
    _attributes_and_edits(image_text)
