"""LLaVA training with the UTA tower: arguments, trainer, entry point, LoRA merge, and the tiny embedded LM."""
