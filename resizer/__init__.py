"""resizer: a self-hosted, high-concurrency video transformation service."""

__version__ = "0.1.0"
