"""Results: the schema, atomic reading and writing, provenance, and the ``show`` and ``compare`` commands."""
