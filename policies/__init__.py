"""Draft-length policies: how many tokens the drafter proposes at each step."""
