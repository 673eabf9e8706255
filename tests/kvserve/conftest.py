"""Load common.py under a unique module name (tests/ has no __init__.py; enec has its own helpers)."""
import importlib.util
import pathlib
import sys

if "kvserve_test_common" not in sys.modules:
    _spec = importlib.util.spec_from_file_location("kvserve_test_common", pathlib.Path(__file__).with_name("common.py"))
    _mod = importlib.util.module_from_spec(_spec)
    sys.modules["kvserve_test_common"] = _mod
    _spec.loader.exec_module(_mod)
