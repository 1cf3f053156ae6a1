"""What the HTTP side learns of a cluster's fault (no MLX here)."""


class RankLost(Exception):
    """A rank died or dropped: the request cannot finish, and the daemon stops so that its
    service manager restarts the whole group."""
