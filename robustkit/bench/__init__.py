"""The benchmark runner behind ``robustkit bench``: see DESIGN.md section 6."""
