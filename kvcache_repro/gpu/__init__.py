"""The GPU box: the prepared device run and the offline wheel bundle."""
