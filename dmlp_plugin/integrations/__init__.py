"""Bridges to other libraries' plugin systems (each needs its library: an optional extra)."""
