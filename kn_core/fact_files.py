"""Fact-set files: importing and exporting CSV, JSON Lines and PARAREL folders, and the built-in set.

Every reader collects into a `_Builder`, so a fact set exists only once all of its input parsed; malformed
input raises `FactImportError` naming the file, the line and the problem. Writers replace a file only once
it is complete. Formats: docs/FACTS_FORMAT.md.
"""

from __future__ import annotations

import csv
import json
import re
import uuid
from importlib import resources
from pathlib import Path

from .facts import Fact, FactSet, Relation, validate_template
from .validation import csv_row, csv_uncell  # export_facts protects formula-like cells, the import reads them back

_SAFE_ID = re.compile(r"^[A-Za-z0-9_.-]+$")
BUILTIN_FILE = "builtin_facts.jsonl"


class FactImportError(ValueError):
    """A fact file or folder that cannot be read; the message names the file, the line and the problem."""

    def __init__(self, path, line: int | None, problem: str):
        self.path, self.line, self.problem = str(path), line, problem
        where = f"{path}, line {line}" if line is not None else str(path)
        super().__init__(f"{where}: {problem}")


class _Builder:
    """Collects relations and facts while a file is read; the FactSet exists only once all of it parsed."""

    def __init__(self, path):
        self.path = path
        self.names: dict[str, str] = {}
        self.templates: dict[str, list[str]] = {}
        self.facts: dict[Fact, None] = {}  # ordered, duplicates dropped
        self.undeclared: dict[str, object] = {}  # relations named only by facts -> the first such line

    def fail(self, line, problem):
        raise FactImportError(self.path, line, problem)

    def relation(self, line, rid, name=None, declare=True):
        rid = (rid or "").strip()
        if not rid:
            self.fail(line, "missing relation id")
        if rid not in self.templates:
            self.templates[rid] = []
            if not declare:
                self.undeclared[rid] = line
        if declare:
            self.undeclared.pop(rid, None)
        if name:
            if self.names.get(rid, name) != name:
                self.fail(line, f"relation {rid} is named both {self.names[rid]!r} and {name!r}")
            self.names[rid] = name
        return rid

    def template(self, line, rid, template):
        rid = self.relation(line, rid)
        try:
            validate_template(template)
        except ValueError as exc:
            self.fail(line, str(exc))
        if template not in self.templates[rid]:
            self.templates[rid].append(template)

    def fact(self, line, rid, subject, obj):
        rid = self.relation(line, rid, declare=False)
        try:
            self.facts[Fact(rid, (subject or "").strip(), (obj or "").strip())] = None
        except ValueError as exc:
            self.fail(line, str(exc))

    def build(self, name) -> FactSet:
        for rid, line in self.undeclared.items():  # it would have no templates, so its facts no prompt at all
            self.fail(line, f"a fact names relation {rid}, which no relation or template line declares; add the "
                            f"relation with its templates (with [X] and [Y]) or drop its facts")
        relations = {rid: Relation(rid, self.names.get(rid) or RELATION_NAMES.get(rid, rid), tuple(ts))
                     for rid, ts in self.templates.items()}
        return FactSet(name, relations, list(self.facts))


CSV_COLUMNS = ["kind", "relation", "name", "template", "subject", "object"]


# csv's default limit (128 KiB a field) is below what export_facts may write; a field can never be larger
# than its file, and 2**31 - 1 fits the C long that csv.field_size_limit takes on every platform.
_CSV_FIELD_CAP = 2**31 - 1


def _csv_rows(path: Path, b: _Builder, handle):
    """(line where the row starts, cells) for each row; a malformed row fails naming that line."""
    csv.field_size_limit(max(csv.field_size_limit(), min(_CSV_FIELD_CAP, path.stat().st_size + 1)))
    reader = csv.reader(handle, strict=True)
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            if "unexpected end of data" in str(exc):
                b.fail(start, 'a quoted field is never closed (an unterminated ") before the end of the file; '
                              'close the quote or double a quote inside a field ("")')
            b.fail(reader.line_num, f"not valid CSV ({exc}); a quote inside a quoted field must be doubled (\"\")")
        yield start, row


def _import_csv(path: Path) -> FactSet:
    b = _Builder(path)
    set_name = path.stem
    try:
        with open(path, newline="", encoding="utf-8-sig") as handle:  # -sig: spreadsheets write a BOM
            rows = _csv_rows(path, b, handle)
            _, header = next(rows, (1, None))
            if header is None:
                b.fail(1, "the file is empty; expected the header " + ",".join(CSV_COLUMNS))
            header = [h.strip().lower() for h in header]
            missing = [c for c in ("kind", "relation") if c not in header]
            if missing:
                b.fail(1, f"the header lacks the column(s) {', '.join(missing)}; expected " + ",".join(CSV_COLUMNS))
            for line, row in rows:
                if not any(cell.strip() for cell in row):
                    continue
                if len(row) > len(header):
                    b.fail(line, f"{len(row)} cells but the header has {len(header)} columns")
                cells = {h: csv_uncell(row[i]) if i < len(row) else "" for i, h in enumerate(header)}
                kind = cells["kind"].strip().lower()
                if kind == "set":
                    set_name = cells.get("name", "").strip() or set_name
                elif kind == "relation":
                    b.relation(line, cells["relation"], cells.get("name", "").strip() or None)
                elif kind == "template":
                    b.template(line, cells["relation"], cells.get("template", ""))
                elif kind == "fact":
                    b.fact(line, cells["relation"], cells.get("subject"), cells.get("object"))
                else:
                    b.fail(line, f"unknown row kind {cells['kind']!r}; use set, relation, template or fact")
    except UnicodeDecodeError as exc:
        b.fail(None, f"not a readable UTF-8 CSV file ({exc})")
    except OSError as exc:
        b.fail(None, f"cannot be read ({exc.strerror or exc})")
    return b.build(set_name)


def _jsonl_records(path: Path, b: _Builder):
    """(line number, dict) for each non-blank line of a JSON Lines file."""
    try:
        with open(path, encoding="utf-8") as handle:
            for number, raw in enumerate(handle, 1):
                if not raw.strip():
                    continue
                text = raw.rstrip("\r\n")  # with its newline, an error at the line's end was put at column 1
                try:
                    record = json.loads(text)
                except json.JSONDecodeError as exc:
                    where = (f"at the end of the line (column {exc.colno}): each record must be one JSON object on "
                             "one line" if exc.pos >= len(text.rstrip()) else f"at column {exc.colno}")
                    b.fail(number, f"not valid JSON ({exc.msg} {where})")
                except RecursionError:
                    b.fail(number, "the JSON is nested too deeply to be a record; expected a flat {...} object")
                if not isinstance(record, dict):
                    b.fail(number, "expected a JSON object ({...}) on each line")
                yield number, record
    except UnicodeDecodeError as exc:
        b.fail(None, f"not a readable UTF-8 file ({exc})")
    except OSError as exc:  # e.g. a directory where a file should be, or no permission
        b.fail(None, f"cannot be read as a file ({exc.strerror or exc})")


def _text(b: _Builder, line, record, key, required=True) -> str:
    value = record.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str):
        b.fail(line, f"the field {key!r} must be text" + ("" if key in record else " and is missing"))
    return value


def _import_jsonl(path: Path) -> FactSet:
    b = _Builder(path)
    set_name = path.stem
    for line, record in _jsonl_records(path, b):
        kind = record.get("kind")
        if kind == "set":
            set_name = _text(b, line, record, "name")
        elif kind == "relation":
            rid = b.relation(line, _text(b, line, record, "id"), _text(b, line, record, "name", False) or None)
            templates = record.get("templates", [])
            if not isinstance(templates, list):
                b.fail(line, "the field 'templates' must be a list of texts")
            for template in templates:
                if not isinstance(template, str):
                    b.fail(line, f"template {template!r} is not text")
                b.template(line, rid, template)
        elif kind == "template":
            b.template(line, _text(b, line, record, "relation"), _text(b, line, record, "template"))
        elif kind == "fact":
            b.fact(line, _text(b, line, record, "relation"), _text(b, line, record, "subject"),
                   _text(b, line, record, "object"))
        else:
            b.fail(line, f"unknown or missing 'kind' {kind!r}; use set, relation, template or fact")
    return b.build(set_name)


def _pararel_root(path: Path) -> Path | None:
    for root in (path, path / "data"):
        if (root / "pattern_data" / "graphs_json").is_dir() and (root / "trex_lms_vocab").is_dir():
            return root
    return None


def _import_pararel(folder: Path, root: Path) -> tuple[FactSet, list[dict]]:
    """The fact set, and the facts files left out because no pattern file gives their relation templates (the
    PARAREL dev folder has two), for `import_facts_described` to list."""
    patterns = sorted((root / "pattern_data" / "graphs_json").glob("*.jsonl"))
    if not patterns:
        raise FactImportError(root / "pattern_data" / "graphs_json", None, "no relation files (P*.jsonl) found")
    for file in patterns + sorted((root / "trex_lms_vocab").glob("*.jsonl")):
        if not file.is_file():
            raise FactImportError(file, None, "is a folder or a special file, not a JSON Lines file; remove or "
                                              "replace it")
    names = {}
    for candidate in (root / "relations.jsonl", folder / "relations.jsonl"):
        if candidate.is_file():  # optional, LAMA-style: {"relation": "P36", "label": "capital"}
            nb = _Builder(candidate)
            for line, record in _jsonl_records(candidate, nb):
                names[_text(nb, line, record, "relation")] = _text(nb, line, record, "label", False)
            break
    builders = []
    merged = _Builder(folder)
    for pattern_file in patterns:
        rid = pattern_file.stem
        b = _Builder(pattern_file)
        merged.relation(None, rid, names.get(rid) or None)
        for line, record in _jsonl_records(pattern_file, b):
            b.template(line, rid, _text(b, line, record, "pattern"))
        builders.append(b)
        vocab = root / "trex_lms_vocab" / pattern_file.name
        if vocab.is_file():
            vb = _Builder(vocab)
            for line, record in _jsonl_records(vocab, vb):
                vb.fact(line, rid, _text(vb, line, record, "sub_label"), _text(vb, line, record, "obj_label"))
            builders.append(vb)
    for b in builders:
        for rid, templates in b.templates.items():
            merged.templates[rid].extend(t for t in templates if t not in merged.templates[rid])
        merged.facts.update(b.facts)
    if not merged.facts:
        raise FactImportError(root / "trex_lms_vocab", None, "no facts found: expected P*.jsonl files named like "
                                                            "the relations, with sub_label and obj_label on each line")
    with_templates = {p.name for p in patterns}
    left = [{"field": f"trex_lms_vocab/{vocab.name}", "records": _count_lines(vocab),
             "reason": f"no pattern_data/graphs_json/{vocab.name}, so no templates to ask these facts with"}
            for vocab in sorted((root / "trex_lms_vocab").glob("*.jsonl")) if vocab.name not in with_templates]
    return merged.build(folder.name), left


def _count_lines(path: Path) -> int:
    with open(path, encoding="utf-8", errors="replace") as handle:
        return sum(1 for line in handle if line.strip())


def import_facts(path) -> FactSet:
    """Reads a PARAREL folder, a .csv / .jsonl file in our format, or a benchmark file of the field (CounterFact,
    zsRE, KnowEdit, MQuAKE, EasyEdit requests: `field_formats`, their facts only). Raises FactImportError (file, line,
    problem) on malformed input; nothing is returned half-read."""
    return import_facts_described(path)[0]


def import_facts_described(path) -> tuple[FactSet, str, list[dict]]:
    """`import_facts`, with what was read ("kn" for our formats and PARAREL folders, else the benchmark file's
    format, container and case count) and what the fact set left out of a benchmark file or PARAREL folder
    ({"field", "records", "reason"}), for the CLI's and the app's import messages."""
    path = Path(path).expanduser()
    if path.is_dir():
        root = _pararel_root(path)
        if root is None:
            raise FactImportError(path, None, "a folder must be a PARAREL checkout (with pattern_data/graphs_json "
                                              "and trex_lms_vocab, at its top or under data/)")
        factset, left = _import_pararel(path, root)
        return factset, "kn", left
    if not path.is_file():
        raise FactImportError(path, None, "no such file or folder")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _import_csv(path), "kn", []
    if suffix in (".jsonl", ".json"):
        from .field_formats import FieldFormatError, import_field_facts, is_field_file

        if is_field_file(path):  # CounterFact, zsRE, KnowEdit, MQuAKE, EasyEdit requests (field_formats)
            try:
                factset, read, left = import_field_facts(path)
            except FieldFormatError as exc:
                raise FactImportError(path, None, str(exc).removeprefix(f"{path}: ")) from None
            return factset, read.summary(), left
        return _import_jsonl(path), "kn", []
    raise FactImportError(path, None, f"unknown file type {suffix!r}; use .csv, .jsonl or a PARAREL folder")


def _write_atomic(path: Path, text: str) -> None:
    # Write beside, then rename: an interrupted export never leaves a truncated file in place.
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8", newline="")
    tmp.replace(path)


def export_facts(factset: FactSet, path) -> Path:
    """Writes ``factset`` as .csv or .jsonl (by suffix); import_facts reads it back equal."""
    path = Path(path).expanduser()
    suffix = path.suffix.lower()
    if suffix == ".csv":
        import io

        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        writer.writerow(["set", "", factset.name, "", "", ""])
        for relation in factset.relations.values():
            writer.writerow(csv_row(["relation", relation.id, relation.name, "", "", ""]))
            for template in relation.templates:
                writer.writerow(csv_row(["template", relation.id, "", template, "", ""]))
        for fact in factset.facts:
            writer.writerow(csv_row(["fact", fact.relation, "", "", fact.subject, fact.object]))
        _write_atomic(path, out.getvalue())
    elif suffix == ".jsonl":
        lines = [{"kind": "set", "name": factset.name}]
        lines += [{"kind": "relation", "id": r.id, "name": r.name, "templates": list(r.templates)}
                  for r in factset.relations.values()]
        lines += [{"kind": "fact", "relation": f.relation, "subject": f.subject, "object": f.object}
                  for f in factset.facts]
        _write_atomic(path, "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines))
    else:
        raise ValueError(f"cannot export to {path.name}: use a .csv or .jsonl file name")
    return path


def export_pararel(factset: FactSet, folder) -> Path:
    """Writes PARAREL's layout (pattern_data/graphs_json, trex_lms_vocab) plus a LAMA-style relations.jsonl
    with the relation names. Importing the folder gives the same relations and facts; the set's name becomes
    the folder's name."""
    folder = Path(folder).expanduser()
    for rid in factset.relations:
        if not _SAFE_ID.match(rid):
            raise ValueError(f"relation id {rid!r} cannot be a PARAREL file name; use letters, digits, _ . -")
    patterns, vocab = folder / "pattern_data" / "graphs_json", folder / "trex_lms_vocab"
    patterns.mkdir(parents=True, exist_ok=True)
    vocab.mkdir(parents=True, exist_ok=True)
    for relation in factset.relations.values():
        _write_atomic(patterns / f"{relation.id}.jsonl", "".join(
            json.dumps({"pattern": t, "lemma": None, "tense": None}, ensure_ascii=False) + "\n"
            for t in relation.templates))
        _write_atomic(vocab / f"{relation.id}.jsonl", "".join(
            json.dumps({"sub_label": f.subject, "obj_label": f.object,
                        "uuid": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{f.relation}|{f.subject}|{f.object}"))},
                       ensure_ascii=False) + "\n"
            for f in factset.facts_of(relation.id)))
    _write_atomic(folder / "relations.jsonl", "".join(
        json.dumps({"relation": r.id, "label": r.name}, ensure_ascii=False) + "\n"
        for r in factset.relations.values()))
    return folder


def builtin_facts() -> FactSet:
    """The fact set shipped with the package (kn_core/data/builtin_facts.jsonl)."""
    source = resources.files("kn_core") / "data" / BUILTIN_FILE
    with resources.as_file(source) as path:
        return _import_jsonl(Path(path))


# Wikidata labels of PARAREL's relations, used when an imported folder does not name them.
RELATION_NAMES = {
    "P17": "country", "P19": "place of birth", "P20": "place of death", "P27": "country of citizenship",
    "P30": "continent", "P36": "capital", "P37": "official language", "P39": "position held",
    "P47": "shares border with", "P101": "field of work", "P103": "native language", "P106": "occupation",
    "P108": "employer", "P127": "owned by", "P131": "located in the administrative territorial entity",
    "P136": "genre", "P138": "named after", "P140": "religion", "P159": "headquarters location",
    "P176": "manufacturer", "P178": "developer", "P190": "twinned administrative body",
    "P264": "record label", "P276": "location", "P279": "subclass of", "P361": "part of",
    "P364": "original language of film or TV show", "P407": "language of work or name",
    "P413": "position played on team", "P449": "original broadcaster", "P463": "member of",
    "P495": "country of origin", "P527": "has part", "P530": "diplomatic relation", "P740": "location of formation",
    "P937": "work location", "P1001": "applies to jurisdiction", "P1303": "instrument",
    "P1376": "capital of", "P1412": "languages spoken, written or signed",
}
