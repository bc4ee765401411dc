"""Analysis: comparisons of captures, and the findings and verdicts drawn from them."""
