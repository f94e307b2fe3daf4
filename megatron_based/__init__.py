"""megatron-based: BASED layers for Megatron-Core."""
