"""FLOPs of a run (experts/budget.py) against the paper's Table 3."""

from __future__ import annotations

import pytest

from smalltalk.experts.budget import paper_router_overhead


def test_paper_table3_router_overhead():
    # 335M x 4: routers 128k steps at batch 32 on S=1024, experts 256k steps at batch 128, prefix 256.
    assert paper_router_overhead(4, 128_000, 32, 1024, 256, 256_000, 128) / 1e19 == pytest.approx(0.22, abs=0.005)
    assert paper_router_overhead(32, 128_000, 32, 1024, 256, 512_000, 128) / 1e19 == pytest.approx(18.94, abs=0.01)
