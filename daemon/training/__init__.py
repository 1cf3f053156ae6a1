"""`mtpd train-drafter`: training an MTP drafter for a model that ships none."""
