"""kdpipe's stages: one module (or package) per stage. A stage knows its inputs and outputs, not the CLI."""
