"""Models (a common package every stage may use): classifiers by architecture name, and top-1 on a dataset.

- ``classifiers``: ``build_model(arch, num_classes)`` (``smallcnn`` or any torchvision classification model; no
  downloads), ``classifier_head``, ``features_and_logits`` (penultimate features for dedup embeddings).
- ``evaluation``: ``accuracy(model, manifest, preprocess)``: top-1 through the centre view, used by training
  (per-epoch eval) and by teacher cards.
"""
