"""BASED mixers as Megatron-Core modules."""
