"""Where drafts come from: the MTP drafter's session across rounds, the context lookup, the target's phrasebook."""
