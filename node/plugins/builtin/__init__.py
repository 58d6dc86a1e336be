"""Plugins that ship with the node: useful on day one, and examples for plugin authors."""
