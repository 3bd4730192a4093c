"""The bottom layer: the family contract, its registry, likelihood (bits/dim), typed settings, errors."""
