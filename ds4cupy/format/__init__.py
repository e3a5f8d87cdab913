"""The ds4 GGUF contract: metadata <-> ModelConfig, the tensor layout, block formats, reading and writing files.

Depends on nothing else in ds4cupy (gguf and NumPy only)."""
