"""`mtpd bench`: tokens/s per draft policy, interleaved, and its plot."""
