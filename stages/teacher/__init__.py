"""The teacher stage's import half: existing weights -> a teacher card (training a teacher is ``stages.train``).

- ``stage``: ``import_teacher`` (safetensors or a weights-only state dict; never plain pickle) and
  ``class_names_from`` (``--classes``).
"""
