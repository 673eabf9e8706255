"""KVServe in disaggregated serving.

* :mod:`kvserve.serving.transport`      - the authenticated, paced KV channel
* :mod:`kvserve.serving.push`           - decide, encode, send, observe, re-plan (one request's KV)
* :mod:`kvserve.serving.engine`         - prefill / decode workers (separate processes) and a router
* :mod:`kvserve.serving.store`          - bundle stores (directory, Redis) and the prefix cache
* :mod:`kvserve.serving.paged`          - vLLM paged-cache layout math (gather / scatter)
* :mod:`kvserve.serving.vllm_connector` - the vLLM v1 KV connector (imports vLLM)
* :mod:`kvserve.serving.demo`           - ``kvserve demo``

Kept light: nothing heavy is imported here.
"""
