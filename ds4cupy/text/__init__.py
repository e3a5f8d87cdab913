"""Text in and out of the model: tokenizer, DeepSeek-V4 chat encoding, output parser, sampler, generator.

Depends on nothing in ds4cupy but `format` (a generator drives any object that keeps the Session contract)."""
