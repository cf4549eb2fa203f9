"""The phase-based trainer behind ``r1mega pipeline``: config (phase list), session (what phases
share), phases (the kinds), rejection (the rejection-sampling filter), report (the per-phase
table) and loop (runs them, resumably)."""
