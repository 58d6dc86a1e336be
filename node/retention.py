"""Scheduled clean-up by age and disk watermark: placeholder, being written (issue 6)."""
