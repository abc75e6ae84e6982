"""The field's benchmark files (CounterFact, zsRE, KnowEdit, MQuAKE, EasyEdit requests) read into EditCases,
as facts and as batch requests; fixtures in tests/data are shaped like the real records."""

import json
from pathlib import Path

import pytest

from kn_core.batch_requests import BatchError, parse_requests
from kn_core.fact_files import FactImportError, import_facts
from kn_core.field_formats import FieldFormatError, detect_format, read_field_file

DATA = Path(__file__).parent / "data"
FILES = {"counterfact": "counterfact_sample.json", "zsre": "zsre_mend_eval_sample.json",
         "knowedit": "knowedit_sample.json", "mquake": "mquake_sample.json", "easyedit": "easyedit_requests.jsonl"}


@pytest.mark.parametrize("fmt", sorted(FILES))
def test_every_format_is_detected_and_named(fmt):
    read = read_field_file(DATA / FILES[fmt])
    assert read.format == fmt and len(read.cases) == 2
    assert fmt in read.summary()
    for case in read.cases:
        assert case.subject in case.prompt and "{}" not in case.prompt


def test_counterfact_fields():
    case = read_field_file(DATA / FILES["counterfact"]).cases[0]
    assert case.prompt == "The mother tongue of Danielle Darrieux is"
    assert (case.target_true, case.target_new, case.relation_id) == ("French", "English", "P103")
    assert len(case.paraphrases) == 2 and case.paraphrases[0].endswith("Danielle Darrieux, a native")
    assert case.neighborhood[0] == ("The mother tongue of Léon Blum is", ("French",))
    assert len(case.generation_prompts) == 2 and len(case.attribute_prompts) == 2
    assert case.template() == "The mother tongue of [X] is [Y]"


def test_zsre_follows_easyedit_alt_is_new_answers_is_truth():
    read = read_field_file(DATA / FILES["zsre"])
    case = read.cases[0]
    assert (case.target_new, case.target_true) == ("University of Michigan", "Illinois Institute of Technology")
    assert case.paraphrases == ("What university did Watts Humphrey take part in?",)
    assert case.locality == {"neighborhood": (("nq question: who played desmond doss father in hacksaw ridge",
                                                ("Hugo Weaving",)),)}
    left = {x["field"]: x for x in read.left_out}
    assert set(left) == {"pred", "cond"} and left["pred"]["records"] == 2 and left["cond"]["reason"]


def test_knowedit_keeps_every_group_under_its_name_with_aliases():
    case = read_field_file(DATA / FILES["knowedit"]).cases[0]
    assert set(case.portability) == {"Subject_Aliasing", "Logical_Generalization", "Reasoning"}
    assert set(case.locality) == {"Relation_Specificity", "Forgetfulness"}
    assert case.portability["Logical_Generalization"][0][1] == ("Africa", "African continent")
    assert case.paraphrases == ("Rickenbacker 4001 is associated with the country named",)
    second = read_field_file(DATA / FILES["knowedit"]).cases[1]
    assert second.target_true == "Illinois Institute of Technology"  # a list: the first is scored


def test_mquake_edits_questions_and_aliases():
    read = read_field_file(DATA / FILES["mquake"])
    first, second = read.cases
    assert first.prompt == "Ellie Kemper is a citizen of" and first.target_new == "Croatia"
    assert len(first.questions) == 3 and first.new_answers[0] == "Kolinda Grabar-Kitarović"
    assert "Grabar-Kitarović" in first.new_answers and first.answers == ("Joe Biden", "Joseph Biden", "Biden")
    assert first.single_hops[0] == ("Ellie Kemper is a citizen of", ("Croatia", "Republic of Croatia", "HR"))
    assert [e.subject for e in second.edits()] == ["Australia", "Pokémon"]
    assert {x["field"] for x in read.left_out} == {"orig", "single_hops"}


def test_easyedit_flat_keys():
    case = read_field_file(DATA / FILES["easyedit"]).cases[0]
    assert case.paraphrases == ("What is the name of the architect who designed Lahti Town Hall?",)
    assert case.locality["neighborhood"][0][1] == ("Norway",)
    assert case.portability["portability"][0] == ("What is the nationality of the designer of Lahti Town Hall?",
                                                  ("Finnish",))


def test_containers_array_lines_and_records(tmp_path):
    records = json.loads((DATA / FILES["counterfact"]).read_text())
    lines = tmp_path / "cf.jsonl"
    lines.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    wrapped = tmp_path / "cf.json"
    wrapped.write_text(json.dumps({"records": records}))
    for path, container in ((DATA / FILES["counterfact"], "json array"), (lines, "json lines"),
                            (wrapped, "records object")):
        read = read_field_file(path)
        assert read.container == container and [c.prompt for c in read.cases] == \
            [c.prompt for c in read_field_file(DATA / FILES["counterfact"]).cases]


def test_bad_records_are_named(tmp_path):
    bad = tmp_path / "bad.json"
    record = json.loads((DATA / FILES["counterfact"]).read_text())[0]
    record["requested_rewrite"]["prompt"] = "The mother tongue of Nobody is"  # no {} and not the subject
    bad.write_text(json.dumps([json.loads((DATA / FILES["counterfact"]).read_text())[1], record]))
    with pytest.raises(FieldFormatError, match=r"record 2 \(counterfact\).*'Danielle Darrieux' does not occur"):
        read_field_file(bad)
    mixed = tmp_path / "mixed.json"
    good = json.loads((DATA / FILES["counterfact"]).read_text())[1]
    mixed.write_text(json.dumps([good, {"src": "x?", "alt": "a", "answers": ["b"], "subject": "x"}]))
    with pytest.raises(FieldFormatError, match="record 2 is not counterfact"):
        read_field_file(mixed)
    unknown = tmp_path / "unknown.json"
    unknown.write_text(json.dumps([{"question": "q"}]))
    with pytest.raises(FieldFormatError, match="not a known benchmark format"):
        read_field_file(unknown)
    assert detect_format({"kind": "fact"}) is None


@pytest.mark.parametrize("fmt", sorted(FILES))
def test_import_facts_reads_the_field_formats(fmt):
    factset = import_facts(DATA / FILES[fmt])
    assert len(factset.facts) >= 2
    for fact in factset.facts:
        assert factset.relation(fact.relation).templates


def test_counterfact_facts_share_the_relation_template():
    factset = import_facts(DATA / FILES["counterfact"])
    assert factset.relation("P103").templates == ("The mother tongue of [X] is [Y]",)


def test_import_facts_names_a_bad_benchmark_record(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"src": "What?", "alt": "a", "answers": ["b"], "subject": "Nobody"}]))
    with pytest.raises(FactImportError, match="record 1 .*'Nobody' does not occur"):
        import_facts(bad)


@pytest.mark.parametrize("fmt", sorted(FILES))
def test_batch_requests_from_every_format(fmt):
    parsed = parse_requests(DATA / FILES[fmt], None, "update")
    assert parsed.format == fmt
    edits = sum(len(c.edits()) for c in read_field_file(DATA / FILES[fmt]).cases)
    assert len(parsed.requests) + len(parsed.bad) == edits
    if fmt == "zsre":  # zsRE has cases whose alt is the answer: no update, listed with the reason
        assert parsed.bad == [(2, "'target_new' equals the current object 'Lecanorales'; an update needs another "
                                  "object")]
    first = parsed.requests[0]
    assert first.case is not None and first.new_object and first.fact.subject in first.case.prompt
    assert first.main_template == first.relation.templates[0]


def test_batch_request_suppress_ignores_the_new_target():
    parsed = parse_requests(DATA / FILES["counterfact"], None, "suppress")
    assert all(r.new_object is None and r.kind == "suppress" for r in parsed.requests)


def test_batch_request_without_ground_truth_is_a_bad_line(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(json.dumps({"prompt": "Who designed X?", "subject": "X", "target_new": "Y",
                                "rephrase_prompt": "X was designed by whom?"}) + "\n")
    parsed = parse_requests(path, None, "update")
    assert parsed.bad and "no ground truth" in parsed.bad[0][1]
    with pytest.raises(BatchError, match="1 bad request"):
        parsed.refuse_or_skip(False)
