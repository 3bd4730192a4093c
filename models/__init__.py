"""The built-in model families, one file each; ``blocks`` and ``parts`` hold what they share.

Families are registered through the ``trilemma.models`` entry-point group in ``pyproject.toml``
(``dcgan = "trilemma.models.dcgan:DCGAN"``), the same way an outside package registers its own, and
imported only when asked for: importing this package imports no family. ``README.md`` beside this
file is the checklist for adding one.
"""
