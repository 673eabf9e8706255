"""KVServe in disaggregated serving.

* :mod:`kvserve.serving.engine`  - prefill / decode workers (separate processes) and a router
* :mod:`kvserve.serving.store`   - prefix-KV stores (filesystem default, Redis)
* :mod:`kvserve.serving.bench`   - ``kvserve bench-serving``
* :mod:`kvserve.serving.demo`    - ``python -m kvserve.serving.demo``

Kept light: nothing heavy is imported here.
"""
