"""cope-megatron: position-encoding ablations (CoPE and friends) on Megatron-Core + DeepSpeed."""
