"""python -m dalle_ar.playground --dalle runs/dalle/export [--clip ...] [--prior ... --decoder ...]"""

from dalle_ar.cli import run_cli
from dalle_ar.playground import main

if __name__ == "__main__":
    run_cli(main)
