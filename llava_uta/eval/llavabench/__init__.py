"""LLaVA-Bench evaluation: answer (model), review (judge), summarize (scores); run as `llava-uta-bench`."""
