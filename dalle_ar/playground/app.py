"""The browser playground: a gradio page over the same pipeline objects as the scripts.

    dalle-ar serve --dalle runs/dalle/export --clip runs/clip/export [--prior P --decoder D]
    python -m dalle_ar.playground --dalle runs/dalle/export ...        # the same

`Playground` loads the models once and answers requests with `DallePipeline` (the AR backend, with priming and
inpainting) and `UnclipPipeline` (text to image and variations): the same calls as sample/generate.py and
sample/unclip_edit.py, ranked by one CLIP. It knows nothing of gradio; `build_app` lays the page out and turns a
request's errors into messages in the page. The server binds to 127.0.0.1 unless --host says otherwise, sends no
telemetry, and runs one request at a time (the others wait in the queue, their place shown).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Callable

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"  # before gradio is imported: no telemetry, no version check

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from dalle_ar.clip import ClipScorer, best_first, clip_score  # noqa: E402
from dalle_ar.config import ConfigError, DataError, SampleConfig  # noqa: E402
from dalle_ar.data import synthetic  # noqa: E402
from dalle_ar.pipeline import DallePipeline, load_image  # noqa: E402

EXAMPLES = synthetic.heldout_captions(8)  # one-click prompts from the held-out world
MAX_PROMPT_CHARS = 400
MAX_CANDIDATES = 64
QUEUE_SIZE = 16  # requests waiting beyond this are refused with a message
SHOW_SIZE = 192  # kept images are enlarged (nearest neighbour) to at least this side for the page
PRIME_MODES = ("off", "keep the top rows", "regenerate a box", "regenerate the border")
BACKENDS = ("AR", "unCLIP", "both")
REQUEST_ERRORS = (ConfigError, DataError, FileNotFoundError, ValueError)  # a message to the user, not a bug


class Playground:
    """The loaded models and what one request does with them. Ranking: the CLIP of --clip, else the unCLIP
    prior's, scores both backends' candidates (same scorer, so side-by-side scores compare)."""

    def __init__(self, dalle: DallePipeline | None = None, unclip=None, scorer: ClipScorer | None = None,
                 names: dict | None = None):
        if dalle is None and unclip is None:
            raise ConfigError("nothing to serve: pass --dalle <transformer export> and/or --prior <export> --decoder <export>")
        self.dalle, self.unclip, self.scorer = dalle, unclip, scorer
        self.names = names or {}

    @classmethod
    def load(cls, dalle: str | None = None, clip: str | None = None, prior: str | None = None,
             decoder: str | None = None, dvae: str | None = None, upsampler: str | None = None,
             device: str = "cpu") -> "Playground":
        """Load each export once (a bad path fails here, before the server starts)."""
        if bool(prior) != bool(decoder):
            raise ConfigError("--prior and --decoder go together: pass both unCLIP exports (train/train_prior.py, "
                              "train/train_decoder.py), or neither")
        if not dalle and not prior:
            raise ConfigError("nothing to serve: pass --dalle <transformer export> and/or --prior <export> --decoder <export>")
        for flag, path in (("--dalle", dalle), ("--prior", prior), ("--decoder", decoder), ("--upsampler", upsampler)):
            if path and not (Path(path) / "config.json").is_file():
                raise FileNotFoundError(f"{flag} {path}: not an export directory (no config.json); pass the `export` "
                                        f"directory a trainer wrote, e.g. runs/<name>/export")
        scorer = ClipScorer.load(clip, device) if clip else None
        unclip = None
        if prior:
            from dalle_ar.unclip.pipeline import UnclipPipeline

            unclip = UnclipPipeline.load(prior, decoder, clip, device, upsampler)
            scorer = scorer or unclip.clip
        pipe = DallePipeline.load(dalle, dvae=dvae, clip=scorer, device=device) if dalle else None
        names = {"dalle": dalle, "prior": prior, "decoder": decoder, "clip": clip or (prior and "the prior's CLIP")}
        return cls(pipe, unclip, scorer, names)

    @property
    def backends(self) -> list[str]:
        return [b for b, on in zip(BACKENDS, (self.dalle, self.unclip, self.dalle and self.unclip)) if on]

    # -- requests -------------------------------------------------------------------------------------
    def check_prompt(self, prompt: str, backends: list[str]) -> str:
        prompt = (prompt or "").strip()
        if not prompt:
            raise ConfigError("empty prompt: type a caption, or click one of the examples")
        if len(prompt) > MAX_PROMPT_CHARS:
            raise ConfigError(f"prompt too long: {len(prompt)} characters, at most {MAX_PROMPT_CHARS}; shorten it")
        for b in backends:
            (self.dalle if b == "AR" else self.unclip).check_prompt(prompt)
        return prompt

    def _backends(self, backend: str) -> list[str]:
        if backend not in BACKENDS:
            raise ConfigError(f"backend {backend!r}: choose one of {', '.join(self.backends)}")
        wanted = ["AR", "unCLIP"] if backend == "both" else [backend]
        for b in wanted:
            if (self.dalle if b == "AR" else self.unclip) is None:
                flags = "--dalle" if b == "AR" else "--prior and --decoder"
                raise ConfigError(f"the {b} backend is not loaded: start the server with {flags}")
        return wanted

    def generate(self, prompt: str, backend: str = "AR", num_candidates: int = 8, keep: int = 4, *,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 0.0, cond_scale: float = 1.0,
                 seed: int = 0, prior_steps: int = 64, decoder_steps: int = 64, decoder_guidance: float = 3.0,
                 image: str | None = None, prime_mode: str = "off", prime_rows: int = 0, inpaint_box: str = "",
                 inpaint_border: int = 0, batch_size: int = 64,
                 progress: Callable[[float, str], None] | None = None) -> dict:
        """{backend: {"images": kept (k, 3, H, W) best first, "kept": per kept image its rank, candidate index,
        CLIP cosine and score and, for a shapes-world caption, the check verdict and its problems, "seconds",
        "num_candidates"}}, for each backend asked."""
        backends = self._backends(backend)
        prompt = self.check_prompt(prompt, backends)
        N, seed = int(num_candidates), int(seed)
        if not 1 <= N <= MAX_CANDIDATES:
            raise ConfigError(f"candidates: {N}; pick 1 to {MAX_CANDIDATES}")
        keep = max(1, min(int(keep), N))
        if not temperature > 0:
            raise ConfigError(f"temperature {temperature}: must be above 0")
        if not 0 <= top_p <= 1 or int(top_k) < 0:
            raise ConfigError(f"top-k {top_k}, top-p {top_p}: top-k is a token count >= 0, top-p in [0, 1] (0 = off)")
        if prime_mode not in PRIME_MODES:
            raise ConfigError(f"image mode {prime_mode!r}: one of {', '.join(PRIME_MODES)}")
        priming = prime_mode != "off"
        if priming and "AR" not in backends:
            raise ConfigError("priming and inpainting are AR features: pick the AR backend, or make unCLIP variations")
        if priming and not image:
            raise ConfigError(f"'{prime_mode}' starts from an image: upload one first")
        cfg = SampleConfig(num_candidates=N, top_k_rerank=keep, temperature=float(temperature), top_k=int(top_k),
                           top_p=float(top_p), cond_scale=float(cond_scale), seed=seed, batch_size=int(batch_size),
                           prime_rows=int(prime_rows) if prime_mode == PRIME_MODES[1] else 0,
                           inpaint_box=inpaint_box.strip() if prime_mode == PRIME_MODES[2] else "",
                           inpaint_border=int(inpaint_border) if prime_mode == PRIME_MODES[3] else 0,
                           prior_steps=int(prior_steps), decoder_steps=int(decoder_steps),
                           decoder_guidance=float(decoder_guidance))
        out = {}
        if "AR" in backends:
            known = self.dalle.known_region(cfg, image if priming else None)
            report = None if progress is None else (lambda done, total: progress(done / total, "AR: drawing image tokens"))
            r = self.dalle([prompt], cfg, *known, callback=report)
            cosine = None if r["clip_cosine"] is None else r["clip_cosine"][0]
            out["AR"] = self._ranked(prompt, r["images"][0], cosine, keep, r["seconds"])
        if "unCLIP" in backends:
            if progress is not None:
                progress(0.0, "unCLIP: prior and decoder")
            start = time.perf_counter()
            images = self.unclip.generate([prompt], N, seed=seed, prior_steps=cfg.prior_steps,
                                          decoder_steps=cfg.decoder_steps, prior_guidance=cfg.prior_guidance,
                                          decoder_guidance=cfg.decoder_guidance, batch_size=cfg.batch_size,
                                          progress=progress is not None)[0].float()
            seconds = time.perf_counter() - start
            cosine = self.scorer.scores(images, [prompt])[:, 0].cpu() if self.scorer is not None else None
            out["unCLIP"] = self._ranked(prompt, images, cosine, keep, seconds)
        return out

    def variations(self, image: str | None, n: int = 8, *, seed: int = 0, decoder_steps: int = 64,
                   decoder_guidance: float = 3.0, progress: Callable[[float, str], None] | None = None) -> dict:
        """unCLIP variations of an uploaded image (images sharing its CLIP image embedding), ranked by their CLIP
        cosine to it: {"unCLIP": the same record as `generate`'s}."""
        if self.unclip is None:
            raise ConfigError("variations need the unCLIP backend: start the server with --prior and --decoder")
        if not image:
            raise ConfigError("variations start from an image: upload one first")
        n = int(n)
        if not 1 <= n <= MAX_CANDIDATES:
            raise ConfigError(f"candidates: {n}; pick 1 to {MAX_CANDIDATES}")
        source = load_image(image, self.unclip.input_size)[0]
        if progress is not None:
            progress(0.0, "unCLIP: variations")
        start = time.perf_counter()
        images = self.unclip.variations(source, n, seed=int(seed), steps=int(decoder_steps),
                                        guidance=float(decoder_guidance), progress=progress is not None).float()
        seconds = time.perf_counter() - start
        cosine = (self.unclip.image_embed(images) @ self.unclip.image_embed(source[None]).T)[:, 0].cpu()
        return {"unCLIP": self._ranked(None, images, cosine, n, seconds)}

    @staticmethod
    def _ranked(prompt: str | None, images: torch.Tensor, cosine: torch.Tensor | None, keep: int,
                seconds: float) -> dict:
        order = best_first(cosine) if cosine is not None else torch.arange(len(images))
        top = order[:keep].tolist()
        checkable = prompt is not None and synthetic.is_caption(prompt)
        kept = []
        for rank, j in enumerate(top):
            row = {"rank": rank + 1, "candidate": j}
            if cosine is not None:
                row["clip_cosine"] = round(float(cosine[j]), 4)
                row["clip_score"] = round(float(clip_score(cosine[j])), 2)
            if checkable:
                row["problems"] = synthetic.diagnose(images[j], prompt)
                row["check"] = not row["problems"]
            kept.append(row)
        return {"images": images[top], "kept": kept, "seconds": round(seconds, 3), "num_candidates": len(images)}


# -- the page -----------------------------------------------------------------------------------------------
def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) in [0, 1] -> PIL, enlarged by a whole factor (nearest) to at least SHOW_SIZE: the models' 32-64 px
    images would otherwise be smoothed by the browser."""
    array = image.clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).numpy()
    pil = Image.fromarray(array)
    factor = max(1, -(-SHOW_SIZE // max(pil.size)))
    return pil.resize((pil.width * factor, pil.height * factor), Image.NEAREST) if factor > 1 else pil


def caption_of(row: dict) -> str:
    """A kept image's short label in the gallery: rank, CLIP score, and the check verdict (the table has the rest)."""
    parts = [f"#{row['rank']}"]
    if "clip_score" in row:
        parts.append(f"CLIP {row['clip_score']:.1f}")
    if "check" in row:
        parts.append("✓" if row["check"] else "✗")
    return " ".join(parts)


def summary(results: dict, scorer_name: str | None, variations: bool = False) -> str:
    """The status panel: per backend the time taken and how the kept images were chosen, then a table of them."""
    parts = []
    for backend, r in results.items():
        n, kept = r["num_candidates"], r["kept"]
        line = (f"**{backend}**: {n} {'variations' if variations else 'candidates'} in {r['seconds']:.2f} s "
                f"({r['seconds'] / n:.3f} s per image)")
        scored = "clip_score" in kept[0]
        if variations:
            line += ", ranked by CLIP cosine to the uploaded image"
        else:
            line += (f", kept the {len(kept)} best by CLIP ({scorer_name})" if scored
                     else f", kept the first {len(kept)} (no CLIP loaded: pass --clip to rank)")
        checks = [row["check"] for row in kept if "check" in row]
        if checks:
            line += f"; shapes-world check: {sum(checks)} of {len(checks)} kept match the caption"
        rows = ["| rank | CLIP score | cosine |" + (" check |" if checks else ""),
                "|---|---|---|" + ("---|" if checks else "")]
        for row in kept:
            cells = [f"#{row['rank']}", f"{row['clip_score']:.1f}" if scored else "-",
                     f"{row['clip_cosine']:.3f}" if scored else "-"]
            if checks:
                cells.append("✓ matches" if row["check"] else f"✗ {row['problems'][0]}")
            rows.append("| " + " | ".join(cells) + " |")
        parts.append(line + "\n\n" + "\n".join(rows))
    return "\n\n".join(parts)


def details(results: dict, **request) -> dict:
    """What the page shows in its JSON panel (and what an API client reads): the request and, per backend, the
    seconds and the kept images' scores."""
    return {**request, **{b: {k: v for k, v in r.items() if k != "images"} for b, r in results.items()}}


def build_app(play: Playground, batch_size: int = 64):
    """The gradio Blocks page over `play`. One request runs at a time (concurrency_id "models"); the rest queue."""
    import gradio as gr

    def fail(e: BaseException):
        if isinstance(e, gr.Error):
            return e
        if isinstance(e, REQUEST_ERRORS):
            return gr.Error(str(e), print_exception=False)
        traceback.print_exc()  # a bug: the trace goes to the server's log, a line to the page
        return gr.Error(f"internal error ({e.__class__.__name__}: {e}); the server log has the details",
                        print_exception=False)

    def gallery(results: dict, backend: str):
        r = results.get(backend)
        if r is None:
            return []
        return [(to_pil(im), caption_of(row)) for im, row in zip(r["images"], r["kept"])]

    def on_generate(prompt, backend, num_candidates, keep, temperature, top_k, top_p, cond_scale, seed,
                    prior_steps, decoder_steps, decoder_guidance, image, prime_mode, prime_rows, inpaint_box,
                    inpaint_border, progress=gr.Progress(track_tqdm=True)):
        try:
            results = play.generate(prompt, backend, num_candidates, keep, temperature=temperature, top_k=top_k,
                                    top_p=top_p, cond_scale=cond_scale, seed=seed, prior_steps=prior_steps,
                                    decoder_steps=decoder_steps, decoder_guidance=decoder_guidance, image=image,
                                    prime_mode=prime_mode, prime_rows=prime_rows, inpaint_box=inpaint_box,
                                    inpaint_border=inpaint_border, batch_size=batch_size,
                                    progress=lambda f, desc: progress(f, desc=desc))
        except BaseException as e:
            raise fail(e) from None
        info = details(results, prompt=prompt.strip(), seed=int(seed), backend=backend)
        return (gallery(results, "AR"), gallery(results, "unCLIP"),
                summary(results, play.names.get("clip")), info)

    def on_variations(image, num_candidates, seed, decoder_steps, decoder_guidance,
                      progress=gr.Progress(track_tqdm=True)):
        try:
            results = play.variations(image, num_candidates, seed=seed, decoder_steps=decoder_steps,
                                      decoder_guidance=decoder_guidance, progress=lambda f, desc: progress(f, desc=desc))
        except BaseException as e:
            raise fail(e) from None
        return (gr.skip(), gallery(results, "unCLIP"), summary(results, None, variations=True),
                details(results, seed=int(seed), backend="unCLIP variations"))

    def on_upload(image):
        if not image:
            return None
        try:
            return to_pil(load_image(image, 256)[0])
        except BaseException as e:
            raise fail(e) from None

    has_ar, has_unclip = play.dalle is not None, play.unclip is not None
    columns = 2 if has_ar and has_unclip else 4  # side by side: two half-width galleries
    with gr.Blocks(title="dalle-ar playground", analytics_enabled=False) as demo:
        gr.Markdown("# dalle-ar playground\nText to image with the DALL-E transformer (AR, reranked by CLIP) and the "
                    "unCLIP baseline. One request runs at a time; others wait in the queue, their place shown on "
                    "the output.")
        with gr.Row():
            with gr.Column(scale=2):
                prompt = gr.Textbox(label="Prompt", placeholder="a small red circle on the left", lines=2,
                                    max_length=MAX_PROMPT_CHARS, elem_id="prompt")
                gr.Examples(EXAMPLES, inputs=prompt, label="Held-out shapes-world prompts (checked against the pixels)")
                backend = gr.Radio(play.backends, value=play.backends[-1] if has_ar and has_unclip else play.backends[0],
                                   label="Backend", elem_id="backend")
                with gr.Row():
                    num_candidates = gr.Slider(1, MAX_CANDIDATES, value=8, step=1, label="Candidates", elem_id="candidates")
                    keep = gr.Slider(1, MAX_CANDIDATES, value=4, step=1, label="Keep (best by CLIP)", elem_id="keep")
                    seed = gr.Number(0, precision=0, label="Seed", elem_id="seed")
                with gr.Accordion("AR sampling", open=has_ar, visible=has_ar):
                    with gr.Row():
                        temperature = gr.Slider(0.05, 2.0, value=1.0, step=0.05, label="Temperature")
                        top_k = gr.Slider(0, 512, value=0, step=1, label="Top-k (0 = off)")
                        top_p = gr.Slider(0.0, 1.0, value=0.0, step=0.01, label="Top-p (0 = off)")
                        cond_scale = gr.Slider(1.0, 8.0, value=1.0, step=0.5, label="Guidance scale (1 = off)")
                with gr.Accordion("unCLIP sampling", open=False, visible=has_unclip):
                    with gr.Row():
                        prior_steps = gr.Slider(2, 256, value=64, step=1, label="Prior DDIM steps")
                        decoder_steps = gr.Slider(2, 256, value=64, step=1, label="Decoder DDIM steps")
                        decoder_guidance = gr.Slider(1.0, 8.0, value=3.0, step=0.5, label="Decoder guidance (1 = off)")
                with gr.Accordion("Start from an image", open=False):
                    with gr.Row():
                        upload = gr.File(label="Image (PNG/JPEG)", file_types=["image"], type="filepath",
                                         elem_id="upload")
                        preview = gr.Image(label="As the models see it", interactive=False, height=160)
                    prime_mode = gr.Radio(list(PRIME_MODES), value="off", label="AR: priming / inpainting",
                                          visible=has_ar, info="the rest is sampled from the prompt; cells see only "
                                          "known cells before them in raster order")
                    with gr.Row(visible=has_ar):
                        prime_rows = gr.Number(4, precision=0, label="Top rows to keep (grid cells)")
                        inpaint_box = gr.Textbox("0.25,0.25,0.75,0.75", label="Box x0,y0,x1,y1 (cells, or fractions)")
                        inpaint_border = gr.Number(2, precision=0, label="Border width (grid cells)")
                    vary = gr.Button("unCLIP variations of the image", visible=has_unclip, elem_id="variations")
                run = gr.Button("Generate", variant="primary", elem_id="generate")
            with gr.Column(scale=3):
                status = gr.Markdown("Type a prompt and press Generate.", elem_id="status")
                with gr.Row():
                    ar_gallery = gr.Gallery(label="AR (DALL-E transformer)", columns=columns, height="auto", object_fit="contain",
                                            visible=has_ar, elem_id="ar_gallery")
                    unclip_gallery = gr.Gallery(label="unCLIP", columns=columns, height="auto", object_fit="contain", visible=has_unclip,
                                                elem_id="unclip_gallery")
                with gr.Accordion("Scores (JSON)", open=False):
                    info = gr.JSON(label="Request and scores")

        outputs = [ar_gallery, unclip_gallery, status, info]
        run.click(on_generate, [prompt, backend, num_candidates, keep, temperature, top_k, top_p, cond_scale, seed,
                                prior_steps, decoder_steps, decoder_guidance, upload, prime_mode, prime_rows,
                                inpaint_box, inpaint_border], outputs, api_name="generate", concurrency_id="models",
                  concurrency_limit=1)
        prompt.submit(on_generate, [prompt, backend, num_candidates, keep, temperature, top_k, top_p, cond_scale,
                                    seed, prior_steps, decoder_steps, decoder_guidance, upload, prime_mode,
                                    prime_rows, inpaint_box, inpaint_border], outputs, api_name=False,
                      concurrency_id="models", concurrency_limit=1)
        vary.click(on_variations, [upload, num_candidates, seed, decoder_steps, decoder_guidance], outputs,
                   api_name="variations", concurrency_id="models", concurrency_limit=1)
        upload.change(on_upload, upload, preview, api_name=False)
    demo.queue(default_concurrency_limit=1, max_size=QUEUE_SIZE)
    return demo


def launch(demo, host: str = "127.0.0.1", port: int = 7860, block: bool = True) -> str:
    """Serve `demo` on host:port (no share link, no server-side rendering server, no telemetry); the URL."""
    try:
        demo.launch(server_name=host, server_port=port, share=False, inbrowser=False, quiet=True, ssr_mode=False,
                    prevent_thread_lock=True, show_error=False, mcp_server=False, pwa=False)
    except OSError as e:
        raise ConfigError(f"--host {host} --port {port}: cannot serve there ({e}); pass another --port") from None
    url = f"http://{host}:{demo.server_port}/"
    print(f"dalle-ar playground at {url} (Ctrl+C to stop)", flush=True)
    if block:
        try:
            demo.block_thread()
        except KeyboardInterrupt:
            pass
    return url


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dalle-ar serve", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dalle", default=None, help="transformer export directory (train/train_dalle.py): the AR backend")
    p.add_argument("--dvae", default=None, help="dVAE export (default: the one the transformer's config.json names)")
    p.add_argument("--clip", default=None, help="CLIP for ranking: an export directory or ARCH:/local/weights "
                   "(default: the unCLIP prior's CLIP when --prior is given)")
    p.add_argument("--prior", default=None, help="unCLIP prior export (train/train_prior.py)")
    p.add_argument("--decoder", default=None, help="unCLIP decoder export (train/train_decoder.py)")
    p.add_argument("--upsampler", default=None, help="optional unCLIP upsampler export")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", "--batch_size", dest="batch_size", type=int, default=64,
                   help="candidates per forward pass (default: 64; same seed and batch size -> same images)")
    return p


def main(argv: list[str] | None = None) -> None:
    """`dalle-ar serve ...`: load the exports (a bad one is a one-line error), then serve until Ctrl+C."""
    args = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if importlib.util.find_spec("gradio") is None:
        raise ConfigError("the playground needs gradio: pip install -e '.[play]'")
    play = Playground.load(args.dalle, args.clip, args.prior, args.decoder, args.dvae, args.upsampler, args.device)
    launch(build_app(play, args.batch_size), args.host, args.port)
