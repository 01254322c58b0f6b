"""Errors the Vertex tooling raises on purpose.

Configuration mistakes are caught before any call to Google, so that a typo
never costs a half-created endpoint; they are ``ValueError`` subclasses so that
callers who only care about "bad input" can catch one thing.
"""


class VertexConfigError(ValueError):
    """A flag, env var or machine choice that cannot work; raised before any request."""


class SecretInEnvError(VertexConfigError):
    """An env key that looks like a secret was about to be stored in a Model in plain text."""


class DeployError(RuntimeError):
    """Vertex accepted the request but the deployment did not become serviceable."""


class PredictionError(RuntimeError):
    """The endpoint answered, but not with a usable answer (an error status, a cut stream)."""
