"""The one public exception of :mod:`kvserve`."""


class KVServeError(ValueError):
    """Raised for every malformed, truncated or corrupted bundle and every invalid config.

    Subclasses :class:`ValueError` so callers that already catch bad input keep working.
    """


class KVServeConnectorError(KVServeError):
    """A vLLM connector setting, paged-cache layout or stored bundle the connector cannot serve."""
