"""Small shared utilities: atomic file writes and progress reporting."""
