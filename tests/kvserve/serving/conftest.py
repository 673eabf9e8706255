"""One SmolLM2 instance per test session for the serving tests (1 torch thread)."""
import pytest


@pytest.fixture(scope="session")
def serving_model():
    pytest.importorskip("transformers")
    import torch

    from kvserve.serving import engine

    from kvserve.stages import codecs

    torch.set_num_threads(1)
    codecs.set_threads(1)  # numba's spinning pool would otherwise starve torch on a small machine
    try:
        return engine.load_model_fast("smollm2")
    except Exception as exc:  # model package missing
        pytest.skip(f"SmolLM2 unavailable: {exc}")
