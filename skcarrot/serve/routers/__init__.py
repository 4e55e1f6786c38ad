"""One router per concern: images, scoring, zero-shot, account, operations."""
