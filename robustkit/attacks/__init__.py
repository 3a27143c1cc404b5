"""Attacks (PGD, Carlini-Wagner, the interval attack, foolbox adapter, worst case): see DESIGN.md section 4."""
