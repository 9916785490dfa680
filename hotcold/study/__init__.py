"""The study (design.md §6) and the demo: fixed vs adaptive vs dynamic placements, measured end to end."""
