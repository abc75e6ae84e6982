"""The layers of docs/ARCHITECTURE.md, checked: each module of kn_core and kn_gui imports only from its own layer
or the layers below it (read from the source with `ast`, nothing is imported), kn_core never imports kn_gui, and
every module has a place in the map (a new module must be placed, here and in ARCHITECTURE.md)."""

from __future__ import annotations

import ast
import re

import pytest

from test_imports import ROOT, imported_names, modules_of

# bottom to top; a name covers the module and, for a package, everything inside it. Same order and names as the
# "The layers" section of docs/ARCHITECTURE.md.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("Bottom", ("kn_core", "tasks", "validation", "jsonio", "selection", "history", "facts", "fact_files", "field_formats",
                "scores_file", "store")),
    ("Model access", ("families", "discover", "ffn", "moe", "hooks", "encoding", "models", "model_checks")),
    ("Science", ("attribution", "passes", "quadrature", "neurons", "edits", "edit_stack", "evaluation", "edit_plan",
                 "experiments", "specificity", "syntax", "tracing", "metrics", "degeneracy", "batch_requests",
                 "protocols")),
    ("Whole sets", ("runner", "cluster", "batch")),
    ("Front ends", ("cli", "reproduce", "report", "bench", "bench_report", "bench_cluster")),
    ("App", ("kn_gui",)),
]


def layer_of(module: str) -> int | None:
    """The layer index of a dotted module name of ours (None: not in the map)."""
    if module == "kn_gui" or module.startswith("kn_gui."):
        return len(LAYERS) - 1
    if module == "kn_core":
        return 0
    top = module.split(".")[1]
    for index, (_, names) in enumerate(LAYERS):
        if top in names:
            return index
    return None


def ours() -> dict:
    return {**modules_of("kn_core"), **modules_of("kn_gui")}


def layering_violations() -> list[str]:
    modules = ours()
    found = []
    for name, path in modules.items():
        level = layer_of(name)
        for target in sorted(imported_names(name, path)):
            if target not in modules or name.startswith(target + "."):
                continue  # third-party, an imported name (not a module), or the module's own parent package
            if layer_of(target) > level:
                found.append(f"{name} ({LAYERS[level][0]}) imports {target} ({LAYERS[layer_of(target)][0]})")
    return found


def test_every_module_has_a_layer():
    missing = sorted(name for name in ours() if layer_of(name) is None)
    assert not missing, f"place these modules in LAYERS and in docs/ARCHITECTURE.md: {missing}"


def test_each_module_imports_only_its_layer_or_below():
    assert layering_violations() == []


def test_the_check_sees_an_upward_import(tmp_path, monkeypatch):
    """The checker itself: a bottom module importing a science module is reported."""
    import test_layers

    fake = {"kn_core.store.fake": tmp_path / "fake.py", "kn_core.neurons": ROOT / "kn_core" / "neurons.py"}
    fake["kn_core.store.fake"].write_text("from .. import neurons\n")
    monkeypatch.setattr(test_layers, "ours", lambda: fake)
    assert layering_violations() == ["kn_core.store.fake (Bottom) imports kn_core.neurons (Science)"]


def test_kn_core_never_imports_kn_gui():
    for name, path in modules_of("kn_core").items():
        assert not [m for m in imported_names(name, path) if m.split(".")[0] == "kn_gui"], name


def _doc_layers() -> dict[str, str]:
    """{layer name: its bullet's text} from ARCHITECTURE.md's "The layers" section."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    section = text.split("## The layers", 1)[1].split("\n## ", 1)[0]
    return {m.group(1): m.group(2) for m in re.finditer(r"^- \*\*(.+?)\.\*\*(.*?)(?=^- \*\*|\Z)", section,
                                                         re.S | re.M)}


@pytest.mark.parametrize("layer", [name for name, _ in LAYERS])
def test_architecture_md_names_each_module_in_its_layer(layer):
    bullets = _doc_layers()
    assert layer in bullets, f"docs/ARCHITECTURE.md has no '- **{layer}.**' bullet (it has {list(bullets)})"
    names = dict(LAYERS)[layer]
    unnamed = [n for n in names if n not in ("kn_core", "kn_gui")
               and not re.search(rf"`{re.escape(n)}(\.py|/)`", bullets[layer])]
    assert not unnamed, f"the {layer} bullet of docs/ARCHITECTURE.md does not name {unnamed}"


# Modules that call a tokenizer themselves, and why; model inputs are encoded only by encoding.py (ARCHITECTURE.md)
TOKENIZES = {
    "kn_core.encoding": "the encoder of model inputs",
    "kn_core.facts": "finds an answer's tokens when rendering a prompt (the tokenizer is passed in)",
    "kn_core.tracing": "the subject's tokens: their span in an encoded prompt, their embeddings' spread (noise scale)",
    "kn_core.evaluation": "counts an answer's tokens for a generation budget",
}


def _calls_a_tokenizer(path) -> bool:
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call):
            func = node.func
            name = func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else ""
            if name in ("tokenizer", "tok"):
                return True
    return False


def test_only_encoding_encodes_model_inputs():
    calling = {name for name, path in modules_of("kn_core").items() if _calls_a_tokenizer(path)}
    assert calling <= set(TOKENIZES), f"encode through kn_core.encoding instead: {sorted(calling - set(TOKENIZES))}"
    assert "kn_core.encoding" in calling  # the check sees a call
