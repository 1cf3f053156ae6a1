"""Decoding: prompt ids in, typed records out. Plain and speculative steps, verification, sampling,
stops, the near-tie guard, the prompt cache."""
