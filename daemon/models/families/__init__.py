"""One adapter per model family group that ships an MTP layer (the contract: daemon.models.family)."""
