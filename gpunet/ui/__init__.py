"""What a notebook shows: job progress, the network's status, the session's usage."""
