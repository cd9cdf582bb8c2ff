"""Reference runtime for gemma3n-mobile bundles (engine, session, executors per backend) and the g3n CLI."""
