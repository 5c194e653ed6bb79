"""thriftgate: a transparent, cost-cutting reverse proxy for the OpenAI API."""

__version__ = "0.1.0"
