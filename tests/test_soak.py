"""The soak script, short: 150 mixed requests (bad input, disconnects, streams) must break nothing.

`bench/soak.py` starts its own server. Asserted: no 5xx, no error event in a stream, no hung
request, no malformed stream, no bad input accepted, nothing left running once idle. Memory is
checked through MLX's own count, not RSS: over so few requests RSS moves by several percent
with the allocator and the prefix cache filling up (the full run's RSS figures are in
bench/NOTES.md), while MLX's active memory may grow by the prefix cache's budget (8 MB) and no
more. When stored prefixes pinned whole batch buffers, it grew by about 90 MB over this span.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

SOAK = Path(__file__).parent.parent / "bench" / "soak.py"


def load_soak() -> ModuleType:
    spec = importlib.util.spec_from_file_location("soak", SOAK)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses resolve annotations through it
    spec.loader.exec_module(module)
    return module


def test_short_soak_breaks_nothing() -> None:
    soak = load_soak()
    args = soak.build_parser().parse_args(
        ["--requests", "150", "--baseline-after", "50", "--timeout", "30", "--max-seconds", "120"]
    )
    result = soak.run(args)
    print(soak.report(result))
    assert not result.stopped_early
    assert result.completed > 75 and result.disconnected > 10 and result.bad_input_sent > 0
    assert result.server_errors == 0, result.examples
    assert result.stream_error_events == 0, result.examples
    assert result.hung == 0, result.examples
    assert result.malformed_streams == 0, result.examples
    assert result.bad_input_accepted == 0, result.examples
    assert result.running_when_idle == 0 and result.queued_when_idle == 0
    growth = result.mlx_active_final_bytes - result.mlx_active_baseline_bytes
    assert result.mlx_active_baseline_bytes > 0
    assert growth <= (8 + 2) << 20, (result.mlx_active_baseline_bytes, growth)
