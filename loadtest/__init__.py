"""Load tests and benchmarks for resizer (see README and BENCHMARKS.md)."""
