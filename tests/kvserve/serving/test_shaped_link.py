"""A real kernel-shaped link (two netns + veth + tc tbf) against the sender's token bucket."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import linktest  # noqa: E402  (test scaffolding beside this file)


@pytest.fixture(scope="module")
def netns():
    ok, why = linktest.netns_available()
    if not ok:
        pytest.skip(why)


@pytest.mark.parametrize("rate", [20, 80])
def test_paced_and_kernel_shaped_agree(netns, rate):
    before = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    r = linktest.compare(rate_mbps=rate, nbytes=int(rate * 1e6 / 8 * 0.6), repeats=2)
    print(r)
    assert r["rel_diff"] < 0.15, r
    # both are close to the configured rate (tbf also counts Ethernet/IP/TCP headers, ~4%)
    assert 0.85 * rate < r["kernel_shaped_mbps"] <= 1.02 * rate
    assert 0.9 * rate < r["paced_mbps"] <= 1.05 * rate
    # the test cleaned up its namespaces
    assert subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout == before
