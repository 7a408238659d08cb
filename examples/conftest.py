"""The example suite's knobs: which model sizes it trains, and each size's memory budget."""

from __future__ import annotations

import pytest

# What each size must fit in: a tiny model on a CPU runner, a 1B model on a 16 GiB
# card, an 8B model on a 24 GiB card.
BUDGETS = {"tiny": "16 MiB", "1b": "16 GiB", "3b": "24 GiB", "8b": "24 GiB"}


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    # On a CPU runner the GPU-only test is skipped: name it and say why in the short summary
    # (as -rs would), so that nobody reads the `s` as a test that silently did nothing.
    chars = config.option.reportchars
    if "s" not in chars and "a" not in chars and "A" not in chars and "N" not in chars:
        config.option.reportchars = chars + "s"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--model-sizes",
        default="tiny",
        help="comma-separated Llama sizes to train: tiny (CPU, seconds), 1b, 3b, 8b (GPU). Default: tiny.",
    )


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    if "size" not in metafunc.fixturenames:
        return
    sizes = [s.strip() for s in metafunc.config.getoption("model_sizes").split(",") if s.strip()]
    unknown = [s for s in sizes if s not in BUDGETS]
    if unknown:
        raise pytest.UsageError(f"--model-sizes: unknown size {unknown[0]!r}; choose from {', '.join(BUDGETS)}")
    metafunc.parametrize(
        "size", [pytest.param(s, marks=pytest.mark.gpumem(budget=BUDGETS[s], tolerance="2%")) for s in sizes]
    )
