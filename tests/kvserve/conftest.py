"""Load common.py under a unique module name (tests/ has no __init__.py; enec has its own helpers),
and put this folder on sys.path for ``kvserve_servers`` (relays and a Redis launcher)."""
import importlib.util
import pathlib
import sys

_HERE = str(pathlib.Path(__file__).parent)
if _HERE not in sys.path:
    sys.path.insert(0, _HERE)

if "kvserve_test_common" not in sys.modules:
    _spec = importlib.util.spec_from_file_location("kvserve_test_common", pathlib.Path(__file__).with_name("common.py"))
    _mod = importlib.util.module_from_spec(_spec)
    sys.modules["kvserve_test_common"] = _mod
    _spec.loader.exec_module(_mod)
