"""Loading the target model and its MTP drafter: GGUF and mlx-lm checkpoints, tokenizers, chat prompts, drafter files."""
