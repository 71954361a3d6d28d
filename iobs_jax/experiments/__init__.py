"""Experiments the commands and benchmarks run: engines, tables and figures (they use the
library; nothing in the library uses them)."""
