"""What happens to a series: when it is complete (tracker), which rules fire, and compiling the rules."""
