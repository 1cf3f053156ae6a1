"""The operating system's side: launchd / systemd service files, logging."""
