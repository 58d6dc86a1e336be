"""Plugins: the algorithms a rule runs on a series (see docs for the plugin API)."""
