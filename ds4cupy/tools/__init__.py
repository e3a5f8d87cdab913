"""Tools around the engine: model generators (make_model, synthetic, demo, convert), inspection (info), measuring and
checking (bench, verify, hf_oracle) and the `run` CLI. They use engines, text, memory and format; the server uses the
demo model from here."""
