"""The bottom layer, which uses no other: atomic writes, command-line help, provenance, metrics."""
