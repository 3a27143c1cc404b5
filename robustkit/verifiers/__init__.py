"""The bound engine (interval, symbolic, crown, exact): see DESIGN.md section 3."""
