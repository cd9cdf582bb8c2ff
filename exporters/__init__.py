"""Lowering of the models/ definitions to LiteRT, ExecuTorch and Core ML (see the exporters issue)."""
