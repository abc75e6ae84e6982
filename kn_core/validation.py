"""Checks of user-facing parameters, shared by the `kn` CLI and the Python API.

Each `check_*` returns the value (normalised where that is unambiguous) or raises `ValidationError`, a
ValueError whose one-line message names the parameter, the bad value and what is allowed. Call them before
loading a model or computing anything, so bad input costs nothing.
"""

from __future__ import annotations

import math
import numbers
import os
import re
from dataclasses import dataclass
from pathlib import Path

MAX_STEPS = 1000  # more integration steps only on purpose (--force): 1000 steps already take ~50x the paper's 20


@dataclass(frozen=True)
class Range:
    """The closed interval [minimum, maximum] a numeric parameter may take (None: unbounded on that side). The one
    source of a parameter's bounds: the checks below, the CLI's (`cli/checks.py`) and the app's spin boxes read
    it, so the app cannot offer what the engine refuses, nor refuse what it accepts. A widget that needs a finite
    top for an unbounded range picks its own (`widget_maximum`)."""
    minimum: float | None
    maximum: float | None

    def widget_maximum(self, cap: float) -> float:
        """The top of a spin box: the range's maximum, or `cap` where the range has none."""
        return cap if self.maximum is None else self.maximum


STEPS_RANGE = Range(1, MAX_STEPS)  # integration steps (more only with --force)
FRACTION_RANGE = Range(0.0, 1.0)  # the coarse threshold t and the refinement share p
HOLD_OUT_RANGE = Range(0, None)  # templates held out of attribution (for generality)
ERASE_K_RANGE = Range(1, None)  # erase's most frequent neurons
MAX_NEURONS_RANGE = Range(2, None)  # degeneracy: the neurons whose pairs are tried
PROMPTS_PER_FACT_RANGE = Range(3, None)  # refinement needs at least 3 prompts per fact
# by the CLI's option dest (`--k` is erase's k)
RANGES = {"steps": STEPS_RANGE, "t": FRACTION_RANGE, "p": FRACTION_RANGE, "hold_out": HOLD_OUT_RANGE,
          "k": ERASE_K_RANGE, "max_neurons": MAX_NEURONS_RANGE, "prompts_per_fact": PROMPTS_PER_FACT_RANGE}


class ValidationError(ValueError):
    """A parameter is out of its allowed range; the message names it, its value and the range."""


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _fail(name: str, value, allowed: str):
    raise ValidationError(f"{name} = {_show(value)} is not allowed: {allowed}")


def check_int(name: str, value, minimum: int | None = None, maximum: int | None = None, hint: str = "") -> int:
    """An integer (not a bool, float or string) in [minimum, maximum]."""
    bounds = _bounds(minimum, maximum)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        _fail(name, value, f"expected an integer{bounds}{hint}")
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        _fail(name, value, f"expected an integer{bounds}{hint}")
    return value


def _bounds(minimum, maximum) -> str:
    if minimum is not None and maximum is not None:
        return f" from {minimum} to {maximum}"
    if minimum is not None:
        return f" >= {minimum}"
    if maximum is not None:
        return f" <= {maximum}"
    return ""


def check_steps(value, force: bool = False, name: str = "steps") -> int:
    """Integration steps: 1..MAX_STEPS, more only with force (the cost grows linearly)."""
    hint = "" if force else " (more only with --force / force=True; the paper uses 20)"
    return check_int(name, value, STEPS_RANGE.minimum, None if force else STEPS_RANGE.maximum, hint)


def check_number(name: str, value, minimum: float | None = None, maximum: float | None = None,
                 positive: bool = False) -> float:
    """A finite real number (not a bool or string) in [minimum, maximum]; > 0 when `positive`."""
    allowed = "a finite number" + (" > 0" if positive else "") + _bounds(minimum, maximum)
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        _fail(name, value, f"expected {allowed}")
    number = float(value)
    if (not math.isfinite(number) or (positive and number <= 0) or (minimum is not None and number < minimum)
            or (maximum is not None and number > maximum)):
        _fail(name, value, f"expected {allowed}")
    return number


def check_fraction(name: str, value) -> float:
    """A threshold or share in [0, 1] (the coarse threshold t, the refinement share p)."""
    return check_number(name, value, FRACTION_RANGE.minimum, FRACTION_RANGE.maximum)


def check_positive(name: str, value) -> float:
    """A finite number > 0 (a memory budget, a scale)."""
    return check_number(name, value, positive=True)


def check_text(name: str, value, allow_blank: bool = False) -> str:
    """Text a tokenizer can take: a str of valid Unicode (no lone surrogates), without NUL characters, and
    (unless allow_blank) not empty or whitespace only."""
    if not isinstance(value, str):
        _fail(name, value, "expected text (a str)")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        _fail(name, value, f"expected valid Unicode text (a lone surrogate {value[exc.start]!r} at position "
                           f"{exc.start}; was the input decoded with the right encoding?)")
    if "\x00" in value:
        _fail(name, value, f"expected text without NUL characters (one at position {value.index(chr(0))})")
    if not allow_blank and not value.strip():
        _fail(name, value, "expected non-empty text (not only whitespace)")
    return value


def check_token_ids(name: str, ids, vocab_size: int) -> tuple[int, ...]:
    """A non-empty sequence of token ids in [0, vocab_size)."""
    if isinstance(ids, (str, bytes)) or not hasattr(ids, "__iter__"):
        _fail(name, ids, f"expected a sequence of token ids from 0 to {vocab_size - 1}")
    out = tuple(ids)
    if not out:
        _fail(name, ids, "expected at least one token id")
    for k, token in enumerate(out):
        check_int(f"{name}[{k}]", token, 0, vocab_size - 1, " (the model's vocabulary)")
    return out


def check_output_file(name: str, path) -> Path:
    """A file to write: its folder exists and is writable, and the path is not a folder or a special file (a
    FIFO would block the writer, a device would take the bytes)."""
    path = Path(_path_text(name, path))
    if path.is_dir():
        _fail(name, str(path), "expected a file name, not an existing folder")
    if path.exists() and not path.is_file():
        _fail(name, str(path), "that is a special file (a FIFO, device or socket), not a regular file; choose "
                               "another name")
    folder = path.parent
    if not folder.is_dir():
        _fail(name, str(path), f"the folder {str(folder)!r} does not exist; create it first")
    if not os.access(folder, os.W_OK | os.X_OK):
        _fail(name, str(path), f"the folder {str(folder)!r} is not writable")
    return path


def check_output_folder(name: str, path) -> Path:
    """A folder to write into: an existing writable folder, or a new one whose nearest existing parent is a
    writable folder; never an existing file."""
    path = Path(_path_text(name, path))
    if path.exists() and not path.is_dir():
        _fail(name, str(path), "expected a folder, but that is an existing file")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        _fail(name, str(path), f"{str(existing)!r} is a file, so the folder cannot be created")
    if not os.access(existing, os.W_OK | os.X_OK):
        _fail(name, str(path), f"the folder {str(existing)!r} is not writable")
    return path


def check_input_file(name: str, path) -> Path:
    """An existing regular file to read."""
    path = Path(_path_text(name, path))
    if not path.exists():
        _fail(name, str(path), "no such file")
    if not path.is_file():
        _fail(name, str(path), "expected a regular file")
    if not os.access(path, os.R_OK):
        _fail(name, str(path), "the file is not readable")
    return path


def _path_text(name: str, path) -> str:
    text = os.fspath(path) if isinstance(path, os.PathLike) else path
    return check_text(name, text)


def check_choice(name: str, value, choices) -> object:
    """One of `choices`."""
    if value not in choices:
        _fail(name, value, "expected one of " + ", ".join(repr(c) for c in choices))
    return value


_DEVICE = re.compile(r"auto|cpu|mps|cuda(:\d+)?")


def check_device_name(name: str, value) -> str:
    """A device spelled as auto, cpu, mps, cuda or cuda:N (whether it exists is the loader's check)."""
    if not isinstance(value, str) or not _DEVICE.fullmatch(value):
        _fail(name, value, "expected auto, cpu, mps, cuda or cuda:N (N a GPU number)")
    return value


class NonFiniteOutputError(ValueError):
    """A model's output holds NaN or infinity (its weights, its config, an overflow in its dtype, or an edit):
    refused, never shown or stored as a probability."""


def check_finite_output(logits, what: str = "the model's output") -> None:
    """Refuses logits with NaN or +infinity (-infinity is a token the model rules out, a valid logit)."""
    import torch

    bad = torch.isnan(logits) | torch.isposinf(logits)
    if bool(bad.any()):
        raise NonFiniteOutputError(
            f"{what} is NaN or infinite ({int(bad.sum())} of {bad.numel()} logits): the weights, the config or an "
            f"edit (a huge --lambda2 or --factor) overflow; with float16/bfloat16 use --dtype float32, else check "
            f"the model's files; nothing was stored")


SHOWN_CHARS = 200  # of a user's field quoted in an error line


def shown(value, limit: int = SHOWN_CHARS) -> str:
    """repr(value) for an error line, at most about `limit` characters (a 12 MB field is not echoed whole)."""
    if isinstance(value, str) and len(value) > limit:
        return f"{value[:limit]!r}... ({len(value):,} characters)"
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def shortened(message: str, limit: int = SHOWN_CHARS) -> str:
    """An error line with every stretch between quotes longer than 2 x `limit` characters cut to its first and
    last `limit` (saying how much was cut; the end keeps the fix): whichever layer quoted a user's 12 MB field,
    the line stays readable. Linear in the length."""
    if len(message) <= 4 * limit:
        return message
    pieces = re.split(r"(['\"])", message)
    # pieces[2], [6], ... lie between an opening and a closing quote (a quoted field); our own unquoted text (a list
    # of supported families, say) stays whole unless it is absurdly long (quotes inside a field shift the count)
    return "".join(p if len(p) <= (2 * limit if k % 4 == 2 else 50 * limit) else
                   f"{p[:limit]} [... {len(p) - 2 * limit:,} characters cut ...] {p[-limit:]}"
                   for k, p in enumerate(pieces))


_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")  # what spreadsheets read as a formula (OWASP: CSV injection)
_PLAIN_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?|[+-]?(inf|nan|infinity)", re.IGNORECASE)


def csv_cell(value):
    """A CSV cell a spreadsheet shows as text: a text cell that starts like a formula gets a leading single
    quote (OWASP); numbers, and text that is just a number ("-0.25"), stay as they are."""
    if isinstance(value, str) and value.startswith(_FORMULA_START) and not _PLAIN_NUMBER.fullmatch(value):
        return "'" + value
    return value


def csv_row(row) -> list:
    return [csv_cell(value) for value in row]


def csv_uncell(text: str) -> str:
    """What `csv_cell` wrote, read back: the quote it added before a formula character is dropped."""
    return text[1:] if text.startswith("'") and text[1:].startswith(_FORMULA_START) else text


_MARKDOWN_SPECIAL = re.compile(r"([\\`<>|]|(?<=\])\()")  # and "(" after "]": no [text](link) or ![image](src)


def markdown_text(text: str) -> str:
    """A user's text (a fact, a template, a reason) as plain text inside Markdown: one line, and the characters
    that would start HTML (<script>, <img onerror>), a link or image (the "(" of "](javascript:..)"), a code
    span or a table cell escaped with a backslash (CommonMark); templates keep their [X] and [Y] as they are.
    report.html shows them as the characters."""
    one_line = " ".join(str(text).replace("\x01", "").splitlines())
    return re.sub(r"(?i)javascript:", "javascript\\:", _MARKDOWN_SPECIAL.sub(r"\\\1", one_line))


def markdown_safe(tree):
    """`markdown_text` over every string value of a report (dict keys and numbers unchanged)."""
    if isinstance(tree, str):
        return markdown_text(tree)
    if isinstance(tree, dict):
        return {key: markdown_safe(value) for key, value in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [markdown_safe(value) for value in tree]
    return tree
