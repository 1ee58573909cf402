"""One progress bar for every long job: items/s on stderr, silent when stderr is not a terminal."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def progress(total: int, desc: str, unit: str = "img", enabled: bool | None = None) -> tqdm:
    """A tqdm bar; ``enabled=None`` shows it only on an interactive stderr."""
    disable = not (sys.stderr.isatty() if enabled is None else enabled)
    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, dynamic_ncols=True,
                disable=disable, file=sys.stderr)


def plural(n: int, noun: str, many: str | None = None) -> str:
    """``n`` and the noun in the right number, for the summaries: "1 unit", "2 units", "0 units"
    (``many``: an irregular plural)."""
    return f"{n} {noun if n == 1 else many or noun + 's'}"
