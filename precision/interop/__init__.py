"""Interoperability with other precision tools: msprobe (mindstudio-probe) dumps in, msprobe compare results out."""
