"""Facts: data model, prompt rendering (masked and causal), importers, exporters and the built-in set."""

from __future__ import annotations

import json

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from kn_core.fact_files import FactImportError, builtin_facts, export_facts, export_pararel, import_facts
from kn_core.facts import (
    Fact, FactSet, Prompt, Relation, Skipped, render_factset, render_prompts, render_text, validate_template,
)
from kn_core.models import default_model_dir

CAPITAL = Relation("P36", "capital", (
    "The capital of [X] is [Y] .",
    "[X]'s capital city is [Y]",
    "[Y] is the capital of [X] .",          # object first: unusable for a causal model
    "The capital of [X] is [Y], a city .",  # text after the object: unusable for a causal model
))


@pytest.fixture(scope="module")
def smol():
    """The default model's tokenizer only (fast; no weights)."""
    path = default_model_dir()
    if not (path / "tokenizer.json").exists() and not (path / "tokenizer_config.json").exists():
        pytest.skip("the default model is not cached (run the set-up script)")
    return AutoTokenizer.from_pretrained(path)


@pytest.fixture(scope="module")
def wordpiece():
    """A tiny BERT-style WordPiece tokenizer: 'Ouagadougou' splits into three pieces, 'Zzz' is unknown."""
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "The", "capital", "of", "is", "France", "Paris",
             "Burkina", "Faso", "O", "##uaga", "##dougou", "city", "'", "s", ".", ",", "a"]
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
                                   sep_token="[SEP]", mask_token="[MASK]")


# ---------------------------------------------------------------- data model

def test_validate_template():
    assert validate_template("[X] is in [Y] .") == "[X] is in [Y] ."
    with pytest.raises(ValueError, match=r"no \[X\]"):
        validate_template("The capital is [Y] .")
    with pytest.raises(ValueError, match=r"no \[Y\]"):
        validate_template("The capital of [X] .")
    with pytest.raises(ValueError, match="more than once"):
        validate_template("[X] [Y] [Y]")
    with pytest.raises(ValueError):
        Relation("P1", "r", ("no slots",))


def test_factset_queries_and_edits():
    fs = FactSet("t", {"P36": CAPITAL}, [Fact("P36", "France", "Paris"), Fact("P36", "Italy", "Rome")])
    assert fs.objects_of("P36") == ["Paris", "Rome"]
    assert fs.relation("P36") is CAPITAL and len(fs.facts_of("P36")) == 2
    with pytest.raises(KeyError, match="no relation"):
        fs.relation("P999")

    added = fs.with_fact(Fact("P36", "Spain", "Madrid"))
    assert len(added) == 3 and len(fs) == 2  # the original is untouched (undo keeps it)
    edited = added.replacing_fact(Fact("P36", "Italy", "Rome"), Fact("P36", "Italy", "Roma"))
    assert edited.facts[1] == Fact("P36", "Italy", "Roma")
    assert len(edited.without_fact(Fact("P36", "Spain", "Madrid"))) == 2
    with pytest.raises(ValueError, match="listed twice"):
        fs.with_fact(Fact("P36", "France", "Paris"))
    with pytest.raises(ValueError, match="unknown relation"):
        fs.with_fact(Fact("P37", "France", "French"))

    t2 = fs.with_template("P36", "[X] has the capital [Y] .")
    assert t2.relation("P36").templates[-1] == "[X] has the capital [Y] ."
    t3 = t2.replacing_template("P36", "[X] has the capital [Y] .", "[X]'s seat is [Y] .")
    assert "[X]'s seat is [Y] ." in t3.relation("P36").templates
    assert "[X]'s seat is [Y] ." not in t3.without_template("P36", "[X]'s seat is [Y] .").relation("P36").templates
    with pytest.raises(ValueError, match=r"no \[Y\]"):
        fs.with_template("P36", "[X] only")
    gone = fs.without_relation("P36")
    assert gone.relations == {} and gone.facts == []
    with pytest.raises(ValueError, match="non-empty subject"):
        Fact("P36", " ", "Paris")


def test_render_text():
    assert render_text("The capital of [X] is [Y] .", "France") == "The capital of France is [Y] ."
    assert render_text("The capital of [X] is [Y] .", "France", "Paris") == "The capital of France is Paris ."


# ---------------------------------------------------------------- causal rendering

def test_causal_end_only_prompts_and_skips(smol):
    prompts, skipped = render_prompts(Fact("P36", "France", "Paris"), CAPITAL, smol, "causal",
                                      causal_templates="end-only")
    assert [p.text for p in prompts] == ["The capital of France is", "France's capital city is"]
    for p in prompts:
        assert isinstance(p, Prompt) and p.kind == "causal" and p.answer == " Paris"
        assert smol.decode(list(p.answer_ids)) == " Paris"
    # the answer's tokens continue the prompt's tokens exactly
    full = smol(prompts[0].text + prompts[0].answer, add_special_tokens=False)["input_ids"]
    assert tuple(full[-len(prompts[0].answer_ids):]) == prompts[0].answer_ids
    assert [s.template for s in skipped] == [CAPITAL.templates[2], CAPITAL.templates[3]]
    assert all(isinstance(s, Skipped) and "not at the end" in s.reason for s in skipped)
    assert "a city" in skipped[1].reason


def test_causal_prefix_uses_the_text_before_the_object(smol):
    rel = Relation("P19", "place of birth", (
        "[X] was born in [Y] .",
        "[X] was born in [Y], a city in Europe .",   # same prefix as the first: used once
        "[X] was born in the city of [Y], which is in Europe .",
        "[Y] is the birthplace of [X] .",            # nothing before [Y]
    ))
    fact = Fact("P19", "Mozart", "Salzburg")
    prompts, skipped = render_prompts(fact, rel, smol, "causal")  # prefix is the default
    assert [(p.text, p.answer, p.template) for p in prompts] == [
        ("Mozart was born in", " Salzburg", rel.templates[0]),
        ("Mozart was born in the city of", " Salzburg", rel.templates[2])]
    assert prompts[1].answer_ids == tuple(smol("Mozart was born in the city of Salzburg",
                                               add_special_tokens=False)["input_ids"][-len(prompts[1].answer_ids):])
    assert smol.decode(list(prompts[1].answer_ids)) == " Salzburg"
    reasons = {s.template: s.reason for s in skipped}
    assert set(reasons) == {rel.templates[1], rel.templates[3]}  # every template is used or has a reason
    assert "same prompt" in reasons[rel.templates[1]] and rel.templates[0] in reasons[rel.templates[1]]
    assert "nothing comes before" in reasons[rel.templates[3]]
    assert render_prompts(fact, rel, smol, "causal", causal_templates="prefix") == (prompts, skipped)

    end_only, end_skipped = render_prompts(fact, rel, smol, "causal", causal_templates="end-only")
    assert [p.text for p in end_only] == ["Mozart was born in"]
    assert [s.template for s in end_skipped] == list(rel.templates[1:])
    with pytest.raises(ValueError, match="causal_templates"):
        render_prompts(fact, rel, smol, "causal", causal_templates="suffix")

    fs = FactSet("t", {"P19": rel}, [fact, Fact("P19", "Bach", "Eisenach")])
    all_prompts, all_skipped = render_factset(fs, smol, "causal")
    assert len(all_prompts) == 4 and len(all_skipped) == 4
    assert len(render_factset(fs, smol, "causal", "end-only")[0]) == 2


def test_causal_prefix_of_a_template_that_starts_with_the_object(smol):
    rel = Relation("P1", "r", ("[Y] is where [X] was born .", " [Y]: [X]"))
    prompts, skipped = render_prompts(Fact("P1", "Mozart", "Salzburg"), rel, smol, "causal")
    assert prompts == [] and len(skipped) == 2
    assert all("nothing comes before" in s.reason for s in skipped)


def test_causal_prefix_without_the_subject_is_skipped(smol):
    """ "the [Y] debut of [X]." (a PARAREL template) would give the prompt "the" for every fact."""
    rel = Relation("P449", "original broadcaster", ("the [Y] debut of [X].", "[X] premiered on [Y]."))
    prompts, (skip,) = render_prompts(Fact("P449", "Friends", "NBC"), rel, smol, "causal")
    assert [p.text for p in prompts] == ["Friends premiered on"]
    assert skip.template == rel.templates[0] and "does not name the subject" in skip.reason


def test_causal_multi_token_answer_is_kept_whole(smol):
    (prompt, *_), _ = render_prompts(Fact("P36", "Burkina Faso", "Ouagadougou"), CAPITAL, smol, "causal")
    assert len(prompt.answer_ids) > 1
    assert smol.decode(list(prompt.answer_ids)) == " Ouagadougou"


def test_causal_without_space_and_without_prefix(smol):
    rel = Relation("P1", "r", ("[X] (born in [Y]", "[Y] [X]"))
    prompts, skipped = render_prompts(Fact("P1", "Mozart", "Salzburg"), rel, smol, "causal")
    assert prompts[0].text == "Mozart (born in" and prompts[0].answer == " Salzburg"
    rel = Relation("P1", "r", ("[X] code:[Y]",))
    (prompt,), _ = render_prompts(Fact("P1", "Mozart", "K525"), rel, smol, "causal")
    assert prompt.text == "Mozart code:" and prompt.answer == "K525"  # no space before [Y]: none in the answer
    rel = Relation("P1", "r", ("[Y] is [X]",))
    _, (skip,) = render_prompts(Fact("P1", "Mozart", "Salzburg"), rel, smol, "causal", causal_templates="end-only")
    assert "not at the end" in skip.reason


def test_causal_unknown_answer_is_skipped():
    from tiny import make_tokenizer

    tok = make_tokenizer("causal")
    rel = Relation("P36", "capital", ("The capital of [X] is [Y] .",))
    (ok,), _ = render_prompts(Fact("P36", "France", "Paris"), rel, tok, "causal")
    assert ok.answer_ids == tuple(tok(" Paris", add_special_tokens=False)["input_ids"])
    prompts, (skip,) = render_prompts(Fact("P36", "France", "Qwertyville"), rel, tok, "causal")
    assert prompts == [] and "unknown" in skip.reason and "<unk>" in skip.reason


# ---------------------------------------------------------------- masked rendering

def test_masked_single_and_multi_token(wordpiece):
    rel = Relation("P36", "capital", ("The capital of [X] is [Y] .", "[Y] is the capital of [X] ."))
    prompts, skipped = render_prompts(Fact("P36", "France", "Paris"), rel, wordpiece, "masked")
    assert skipped == []
    assert [p.text for p in prompts] == ["The capital of France is [MASK] .", "[MASK] is the capital of France ."]
    assert prompts[0].answer == "Paris" and prompts[0].answer_ids == (wordpiece.convert_tokens_to_ids("Paris"),)

    (p, _), _ = render_prompts(Fact("P36", "Burkina Faso", "Ouagadougou"), rel, wordpiece, "masked")
    assert p.text == "The capital of Burkina Faso is [MASK][MASK][MASK] ."
    assert wordpiece.convert_ids_to_tokens(list(p.answer_ids)) == ["O", "##uaga", "##dougou"]
    ids = wordpiece(p.text)["input_ids"]
    assert ids.count(wordpiece.mask_token_id) == 3


def test_masked_unknown_answer_is_skipped_not_unk(wordpiece):
    rel = Relation("P36", "capital", ("The capital of [X] is [Y] .",))
    prompts, (skip,) = render_prompts(Fact("P36", "France", "Zzz"), rel, wordpiece, "masked")
    assert prompts == [] and "[UNK]" in skip.reason


def test_masked_needs_a_mask_token(smol):
    with pytest.raises(ValueError, match="no mask token"):
        render_prompts(Fact("P36", "France", "Paris"), CAPITAL, smol, "masked")
    with pytest.raises(ValueError, match="unknown model kind"):
        render_prompts(Fact("P36", "France", "Paris"), CAPITAL, smol, "seq2seq")


def test_masked_with_tiny_bert_tokenizer():
    from tiny import make_tokenizer

    tok = make_tokenizer("masked")
    rel = Relation("P36", "capital", ("The capital of [X] is [Y] .",))
    (p,), _ = render_prompts(Fact("P36", "Argentina", "Buenos Aires"), rel, tok, "masked")
    assert p.text == "The capital of Argentina is [MASK][MASK] ."
    assert tok.convert_ids_to_tokens(list(p.answer_ids)) == ["Buenos", "Aires"]


# ---------------------------------------------------------------- import / export

def _sample() -> FactSet:
    rels = {"P36": Relation("P36", "capital", ("The capital of [X] is [Y] .", "[X], \"capital\": [Y]")),
            "P37": Relation("P37", "official language", ("In [X], people speak [Y] .",)),
            "P99": Relation("P99", "empty relation", ())}
    facts = [Fact("P36", "France", "Paris"), Fact("P36", "Côte d'Ivoire", "Yamoussoukro"),
             Fact("P37", "Spain", "Spanish, Castilian")]
    return FactSet("sample, with comma", rels, facts)


@pytest.mark.parametrize("suffix", [".csv", ".jsonl"])
def test_export_import_round_trip(tmp_path, suffix):
    fs = _sample()
    path = export_facts(fs, tmp_path / f"facts{suffix}")
    assert import_facts(path) == fs


def test_pararel_round_trip_and_layouts(tmp_path):
    fs = _sample()
    export_pararel(fs, tmp_path / "pararel" / "data")
    for folder in (tmp_path / "pararel", tmp_path / "pararel" / "data"):  # repo root or its data/ folder
        back = import_facts(folder)
        assert back.relations == fs.relations and back.facts == fs.facts
    assert import_facts(tmp_path / "pararel" / "data").name == "data"


def test_pararel_import_of_upstream_layout(tmp_path):
    root = tmp_path / "pararel" / "data"
    (root / "pattern_data" / "graphs_json").mkdir(parents=True)
    (root / "trex_lms_vocab").mkdir()
    (root / "pattern_data" / "graphs_json" / "P36.jsonl").write_text(
        '{"pattern": "The capital of [X] is [Y] .", "lemma": "capital", "tense": "present"}\n'
        '{"pattern": "[X]\'s capital is [Y] .", "lemma": "capital", "tense": "present"}\n')
    (root / "trex_lms_vocab" / "P36.jsonl").write_text(
        '{"sub_label": "France", "obj_label": "Paris", "uuid": "1"}\n'
        '{"sub_label": "Italy", "obj_label": "Rome", "uuid": "2"}\n'
        '{"sub_label": "Italy", "obj_label": "Rome", "uuid": "3"}\n')  # duplicates are dropped
    fs = import_facts(tmp_path / "pararel")
    assert fs.relation("P36").name == "capital"  # Wikidata label, as the folder names none
    assert fs.relation("P36").templates == ("The capital of [X] is [Y] .", "[X]'s capital is [Y] .")
    assert fs.facts == [Fact("P36", "France", "Paris"), Fact("P36", "Italy", "Rome")]

    (root / "trex_lms_vocab" / "P36.jsonl").write_text('{"sub_label": "France", "obj_label": "Paris"}\n{"sub_label": "Italy"}\n')
    with pytest.raises(FactImportError, match=r"P36\.jsonl, line 2: .*obj_label"):
        import_facts(tmp_path / "pararel")


def test_pararel_facts_without_templates_are_listed_as_left_out(tmp_path):
    """A facts file whose relation has no pattern file (PARAREL's dev folder has two) was dropped without a word."""
    from kn_core.fact_files import import_facts_described

    root = tmp_path / "pararel"
    export_pararel(_sample(), root)
    (root / "trex_lms_vocab" / "P31.jsonl").write_text('{"sub_label": "Paris", "obj_label": "city"}\n\n'
                                                      '{"sub_label": "Rome", "obj_label": "city"}\n')
    factset, read, left = import_facts_described(root)
    assert "P31" not in factset.relations
    assert left == [{"field": "trex_lms_vocab/P31.jsonl", "records": 2,
                     "reason": "no pattern_data/graphs_json/P31.jsonl, so no templates to ask these facts with"}]
    assert import_facts_described(tmp_path / "pararel")[2] == left
    (root / "trex_lms_vocab" / "P31.jsonl").unlink()
    assert import_facts_described(root)[2] == []


def test_import_errors_name_file_and_line(tmp_path):
    csv_path = tmp_path / "bad.csv"
    csv_path.write_text("kind,relation,name,template,subject,object\n"
                        "relation,P36,capital,,,\n"
                        "template,P36,,The capital of [X] is [Y] .,,\n"
                        "fact,P36,,,France,Paris\n"
                        "template,P36,,The capital is [Y] .,,\n")
    with pytest.raises(FactImportError) as err:
        import_facts(csv_path)
    assert "bad.csv, line 5" in str(err.value) and "[X]" in str(err.value)
    assert err.value.line == 5 and isinstance(err.value, ValueError)

    csv_path.write_text("kind,relation,name,template,subject,object\nfact,P36,,,France,\n")
    with pytest.raises(FactImportError, match="line 2: .*object"):
        import_facts(csv_path)
    csv_path.write_text("kind,relation,name,template,subject,object\nfacts,P36,,,France,Paris\n")
    with pytest.raises(FactImportError, match="line 2: unknown row kind"):
        import_facts(csv_path)
    csv_path.write_text("subject,object\nFrance,Paris\n")
    with pytest.raises(FactImportError, match="line 1: the header lacks"):
        import_facts(csv_path)

    jsonl = tmp_path / "bad.jsonl"
    good = json.dumps({"kind": "relation", "id": "P36", "name": "capital", "templates": ["[X] is [Y]"]})
    jsonl.write_text(good + "\n" + '{"kind": "fact", "relation": "P36", "subject": "France"\n')
    with pytest.raises(FactImportError, match=r"bad\.jsonl, line 2: not valid JSON"):
        import_facts(jsonl)
    jsonl.write_text(good + "\n\n" + json.dumps({"kind": "fact", "relation": "P36", "subject": "France"}) + "\n")
    with pytest.raises(FactImportError, match="line 3: the field 'object'"):
        import_facts(jsonl)
    jsonl.write_text(json.dumps({"kind": "relation", "id": "P36", "templates": ["no slots"]}) + "\n")
    with pytest.raises(FactImportError, match="line 1: .*no \\[X\\]"):
        import_facts(jsonl)

    with pytest.raises(FactImportError, match="no such file"):
        import_facts(tmp_path / "missing.csv")
    (tmp_path / "facts.txt").write_text("x")
    with pytest.raises(FactImportError, match="unknown file type"):
        import_facts(tmp_path / "facts.txt")
    (tmp_path / "notpararel").mkdir()
    with pytest.raises(FactImportError, match="PARAREL"):
        import_facts(tmp_path / "notpararel")


def _one_line(err) -> str:
    message = str(err.value)
    assert "\n" not in message and isinstance(err.value, FactImportError)
    return message


def test_csv_with_an_unterminated_quote_says_so(tmp_path):
    path = tmp_path / "quote.csv"
    path.write_text('kind,relation,name,template,subject,object\n'
                    'fact,P36,,,France,Paris\n'
                    'fact,P36,,,"Italy,Rome\n'
                    'fact,P36,,,Spain,Madrid\n')
    with pytest.raises(FactImportError) as err:
        import_facts(path)
    assert "quote.csv, line 3" in _one_line(err) and "never closed" in str(err.value)
    path.write_text('kind,relation,name,template,subject,object\nfact,P36,,,"Ita"ly,Rome\n')
    with pytest.raises(FactImportError, match=r"line 2: not valid CSV"):
        import_facts(path)


def test_a_one_mebibyte_field_survives_export_and_import(tmp_path):
    import csv

    limit = csv.field_size_limit()
    big = "x" * (1 << 20)
    fs = FactSet("big", {"P1": Relation("P1", "r", ("[X] is [Y] .",))}, [Fact("P1", "a", big)])
    assert import_facts(export_facts(fs, tmp_path / "big.csv")) == fs
    assert import_facts(export_facts(fs, tmp_path / "big.jsonl")) == fs
    assert csv.field_size_limit() >= max(limit, 1 << 20)  # raised, never lowered for other readers


def test_pararel_folder_with_a_directory_for_a_file_or_without_facts(tmp_path):
    root = tmp_path / "pararel"
    export_pararel(_sample(), root)
    (root / "pattern_data" / "graphs_json" / "P50.jsonl").mkdir()
    with pytest.raises(FactImportError) as err:
        import_facts(root)
    assert "P50.jsonl" in _one_line(err) and "folder" in str(err.value)
    (root / "pattern_data" / "graphs_json" / "P50.jsonl").rmdir()
    (root / "trex_lms_vocab" / "P37.jsonl").unlink()
    (root / "trex_lms_vocab" / "P37.jsonl").mkdir()
    with pytest.raises(FactImportError, match=r"P37\.jsonl: is a folder"):
        import_facts(root)

    empty = tmp_path / "empty"
    export_pararel(FactSet("e", {"P36": _sample().relation("P36")}, []), empty)
    with pytest.raises(FactImportError) as err:
        import_facts(empty)
    assert "no facts found" in _one_line(err)


def test_deeply_nested_jsonl_line_is_one_error(tmp_path):
    path = tmp_path / "deep.jsonl"
    path.write_text(json.dumps({"kind": "set", "name": "d"}) + "\n" + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(FactImportError) as err:
        import_facts(path)
    assert "deep.jsonl, line 2" in _one_line(err) and "nested too deeply" in str(err.value)


def test_minimal_hand_written_csv(tmp_path):
    """Relation rows are optional: templates (or a relation row) declare their relation; names default to
    Wikidata's. A fact alone never declares one: its relation would have no template, so no prompt."""
    path = tmp_path / "mine.csv"
    path.write_text("kind,relation,name,template,subject,object\n"
                    "template,P36,,The capital of [X] is [Y] .,,\n"
                    "relation,X1,,,,\n"
                    "fact,P36,,,France,Paris\n"
                    "fact,X1,,,a,b\n")
    fs = import_facts(path)
    assert fs.name == "mine" and fs.relation("P36").name == "capital" and fs.relation("X1").name == "X1"
    assert fs.facts_of("X1") == [Fact("X1", "a", "b")]
    path.write_text("kind,relation,template,subject,object\n"
                    "template,P36,The capital of [X] is [Y] .,,\n"
                    "fact,P36,,France,Paris\n"
                    "fact,X2,,a,b\n")
    with pytest.raises(FactImportError, match=r"line 4: a fact names relation X2, which no relation or template"):
        import_facts(path)


def test_export_rejects_unknown_suffix(tmp_path):
    with pytest.raises(ValueError, match=".csv or .jsonl"):
        export_facts(_sample(), tmp_path / "facts.xlsx")


# ---------------------------------------------------------------- built-in set

def test_builtin_set_size_and_shape(smol):
    fs = builtin_facts()
    assert len(fs.relations) >= 10
    for rid, relation in fs.relations.items():
        assert len(relation.templates) >= 5, rid
        assert all(t.rstrip(" .").endswith("[Y]") for t in relation.templates), rid
        assert len(fs.facts_of(rid)) >= 20, rid
        assert len(fs.objects_of(rid)) >= 2, rid  # otherwise an update has no other object to move to
    prompts, skipped = render_factset(fs, smol, "causal")
    assert skipped == [] and len(prompts) == sum(len(fs.relation(f.relation).templates) for f in fs.facts)


@pytest.mark.default_model
def test_default_model_knows_the_capital_of_france():
    import torch

    from kn_core.models import load_model

    lm = load_model()
    fs = builtin_facts()
    (prompt, *_), _ = render_prompts(Fact("P36", "France", "Paris"), fs.relation("P36"), lm.tokenizer, "causal")
    with torch.no_grad():
        logits = lm.model(**lm.tokenizer(prompt.text, return_tensors="pt")).logits[0, -1]
    assert int(logits.argmax()) == prompt.answer_ids[0]
