"""Independent GPT-2 ports used to check that correct implementations never false-alarm."""
