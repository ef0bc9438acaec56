"""The runnable scripts, importable as `dalle_ar._scripts.train.<name>` and `dalle_ar._scripts.sample.<name>` for the
`dalle-ar` command. The files stay where users run them, in the repository's train/ and sample/: an installed copy of
the project carries them here (pyproject.toml maps these packages onto those directories), and in a checkout or an
editable install this package finds them in the repository itself."""

from pathlib import Path

_here, _repo = Path(__file__).parent, Path(__file__).resolve().parents[2]
if not (_here / "train").is_dir() and (_repo / "train" / "train_dalle.py").is_file():
    __path__.append(str(_repo))  # noqa: F821 (the package's module search path): train/ and sample/ in the checkout
