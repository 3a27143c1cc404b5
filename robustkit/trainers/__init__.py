"""Trainers (standard, pgd, verifiable, mixtrain): see DESIGN.md section 5."""
