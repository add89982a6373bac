"""kdpipe's stages: one package per stage, the shared artifact contracts, and the modules every stage uses.

Common: ``shardio`` (tars), ``imaging`` (the decode + preprocessing policy), ``models``, ``views``.
Contracts: ``artifacts``. Stage packages: ``ingest``, ``teacher``, ``logits``, ``dedup``, ``select``,
``reshard``, ``train``, ``evaluate``, ``summary``. A stage knows its inputs and outputs, not the CLI; it imports
the common modules, ``artifacts`` and ``pipeline``'s core, never another stage package (ARCHITECTURE.md).
"""
