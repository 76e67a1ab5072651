"""``python -m cpift_merge ...``: the ``cpift`` command (also what ``torchrun -m`` runs)."""

from cpift_merge.cli import main

if __name__ == "__main__":
    main(prog_name="cpift")
