"""Shared components above the executors (as in LiteRT-LM's runtime/components): tokenizer, chat template, sampler,
stop detection and PLE lookup live once here, so every backend behaves the same."""
