"""Fine-tune at long context on accelerate: full-length windows or PoSE position skipping."""
