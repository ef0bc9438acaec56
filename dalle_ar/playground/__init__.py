"""The browser playground (gradio): `dalle-ar serve --dalle runs/dalle/export [--clip ...] [--prior ... --decoder ...]`
or `python -m dalle_ar.playground ...`. gradio is imported only when the page is built (`pip install -e '.[play]'`)."""

from __future__ import annotations


def main(argv: list[str] | None = None) -> None:
    """Parse the serve flags (--dalle --dvae --clip --prior --decoder --upsampler --host --port --device
    --batch-size), load the exports once and serve the page until Ctrl+C."""
    from dalle_ar.playground.app import main as serve

    serve(argv)
