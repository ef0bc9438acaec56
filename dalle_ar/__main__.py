"""`python -m dalle_ar <subcommand> ...`: the `dalle-ar` command (dalle_ar/command.py)."""

from dalle_ar.command import main

main()
