"""Versioned JSON Schemas of every manifest kind (``<kind>.schema.json``) and small example manifests.

It is a package only so that an installed kdpipe finds its schemas with ``importlib.resources``.
"""
