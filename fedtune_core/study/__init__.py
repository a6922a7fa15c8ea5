"""How a profile becomes verdicts: profiles, selection, the grid, reports, plots."""
