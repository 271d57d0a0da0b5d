"""Loading models: the architecture registry, local or hub folders, and GGUF files."""
