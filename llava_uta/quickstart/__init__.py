"""`llava-uta-quickstart`: the whole UTA + LLaVA pipeline on the embedded default, in one command."""
