"""One module per RoPE scaling method; each is a pure function (spec, target_length, **params) → Scaling."""
