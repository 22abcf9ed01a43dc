"""Model construction helpers (tiny random LLaVA models built from configs, for tests and benchmarks)."""
