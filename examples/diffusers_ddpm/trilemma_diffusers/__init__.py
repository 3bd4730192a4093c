"""A trilemma family from an outside library: diffusers' DDPM (``trilemma_diffusers.ddpm``)."""
