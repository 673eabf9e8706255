"""The one public exception of :mod:`enec`."""


class EnecError(ValueError):
    """Raised for every malformed, truncated or corrupted ENEC stream or checkpoint,
    and for inputs ENEC cannot compress (unsupported dtype, bad ``out`` buffer)."""
