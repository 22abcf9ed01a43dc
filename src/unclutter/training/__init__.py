"""Training: the LLaVA-1.5 two-stage recipe with VMTC and CMAI active."""
