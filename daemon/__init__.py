"""mtpd: an always-on MLX serving daemon with MTP speculative decoding."""

__version__ = "0.1.0"
