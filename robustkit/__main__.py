"""``python -m robustkit`` runs the command-line interface (also what ``torchrun -m robustkit`` starts)."""

from robustkit.cli import main

if __name__ == "__main__":
    main()
