"""One source for parameter bounds and defaults: `validation.RANGES` is what the CLI's checks accept."""

import argparse

import pytest

from kn_core import validation as v
from kn_core.cli.checks import CHECKS


@pytest.mark.parametrize("dest", sorted(v.RANGES))
def test_cli_check_accepts_exactly_the_range(dest):
    allowed = v.RANGES[dest]
    check = CHECKS[dest]
    args = argparse.Namespace(force=False)
    integral = isinstance(allowed.minimum, int)
    step = 1 if integral else 1e-9
    check(allowed.minimum, args)
    with pytest.raises(v.ValidationError):
        check(allowed.minimum - step, args)
    if allowed.maximum is None:
        check(10 ** 6 if integral else 1e6, args)
    else:
        check(allowed.maximum, args)
        with pytest.raises(v.ValidationError):
            check(allowed.maximum + step, args)


def test_widget_maximum_is_the_range_or_the_cap():
    assert v.STEPS_RANGE.widget_maximum(200) == v.MAX_STEPS
    assert v.HOLD_OUT_RANGE.widget_maximum(20) == 20
