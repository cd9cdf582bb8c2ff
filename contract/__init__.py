"""The bundle contract: what exporters write and the runtime reads, defined once, below both.

models/ (the model) <- contract/ (this floor: bundle file, method and signature names, the target <-> backend map,
the audio window, the manifest and its typed reader, the PLE asset format) <- exporters/ and runtime_py/'s
components and executors <- session, engine <- bundle building, compare, harness, CLI. Nothing here imports
exporters/ or runtime_py/.
"""
