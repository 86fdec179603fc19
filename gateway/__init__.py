"""gateway: a reverse-proxy security gateway for HTTP APIs."""

__version__ = "0.1.0"
