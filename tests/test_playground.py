"""The browser playground (dalle_ar/playground) served on loopback with tiny untrained exports, driven through gradio's
own client as a browser would drive it: a prompt gives ranked images with their CLIP scores and the shapes-world
verdict, priming and variations work from an uploaded image, and bad input comes back as a message. Also the
pipeline pieces the page relies on (the progress callback, the prompt check, the image check)."""

import socket
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, script_env, tiny_exports
from PIL import Image

from dalle_ar.config import ConfigError, SampleConfig
from dalle_ar.data import synthetic
from dalle_ar.pipeline import DallePipeline, load_image
from dalle_ar.playground.app import EXAMPLES, Playground, build_app, launch

gradio_client = pytest.importorskip("gradio_client")  # installed by `make setup` (the [play] extra)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    return tiny_exports(tmp_path_factory.mktemp("playground"), vocab_size=400, text_len=16, image_fmap_size=16)


@pytest.fixture(scope="module")
def play(exports):
    return Playground.load(str(exports["dalle"]), str(exports["clip"]), str(exports["prior"]), str(exports["decoder"]))


@pytest.fixture(scope="module")
def client(play):
    demo = build_app(play, batch_size=8)
    url = launch(demo, "127.0.0.1", free_port(), block=False)
    try:
        yield gradio_client.Client(url, verbose=False)
    finally:
        demo.close()


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    path = tmp_path_factory.mktemp("upload") / "scene.png"
    synthetic.make_example(0, image_size=32)[0].save(path)
    return path


FAST = dict(temperature=1.0, top_k=0, top_p=0.0, cond_scale=1.0, seed=0, prior_steps=2, decoder_steps=2,
            decoder_guidance=3.0, image=None, prime_mode="off", prime_rows=0, inpaint_box="", inpaint_border=0)


def generate(client, prompt, backend="both", num_candidates=4, keep=2, **overrides):
    return client.predict(prompt, backend, num_candidates, keep, *{**FAST, **overrides}.values(), api_name="/generate")


def test_prompt_gives_kept_images_best_first_with_scores_and_verdicts(client):
    prompt = EXAMPLES[0]
    ar, unclip, status, info = generate(client, prompt)
    assert len(ar) == 2 and len(unclip) == 2
    for backend, gallery in (("AR", ar), ("unCLIP", unclip)):
        kept = info[backend]["kept"]
        cosines = [row["clip_cosine"] for row in kept]
        assert cosines == sorted(cosines, reverse=True) and info[backend]["num_candidates"] == 4
        assert all(isinstance(row["check"], bool) for row in kept)  # a shapes-world caption: checked
        for item, row in zip(gallery, kept):
            assert Image.open(item["image"]).size[0] >= 192  # enlarged for the page
            assert item["caption"] == f"#{row['rank']} CLIP {row['clip_score']:.1f} {'✓' if row['check'] else '✗'}"
    assert "**AR**: 4 candidates in" in status and "s per image" in status and "shapes-world check" in status
    assert "| #1 | " in status and "| #2 | " in status  # the table of kept images
    assert info["prompt"] == prompt and info["seed"] == 0


def test_same_request_same_images_as_the_pipeline_directly(client, play):
    """The page samples through DallePipeline itself: its kept AR image is the pipeline's best candidate."""
    prompt = "a small red circle on the left"
    _, _, _, info = generate(client, prompt, backend="AR", num_candidates=3, keep=1, seed=7)
    direct = play.dalle([prompt], SampleConfig(num_candidates=3, top_k_rerank=1, seed=7, batch_size=8))
    assert info["AR"]["kept"][0]["candidate"] == int(direct["clip_cosine"][0].argmax())
    assert info["AR"]["kept"][0]["clip_cosine"] == pytest.approx(float(direct["clip_cosine"][0].max()), abs=1e-4)
    assert "unCLIP" not in info


def test_priming_and_variations_start_from_an_uploaded_image(client, picture):
    upload = gradio_client.handle_file(str(picture))
    ar, _, status, info = generate(client, EXAMPLES[1], backend="AR", num_candidates=2, keep=2, image=upload,
                                   prime_mode="keep the top rows", prime_rows=2)
    assert len(ar) == 2 and "AR" in info
    ar, _, _, _ = generate(client, EXAMPLES[1], backend="AR", num_candidates=2, keep=1, image=upload,
                           prime_mode="regenerate a box", inpaint_box="1,1,3,3")
    assert len(ar) == 1
    _, unclip, status, info = client.predict(upload, 3, 0, 2, 3.0, api_name="/variations")
    assert len(unclip) == 3 and "3 variations" in status
    cosines = [row["clip_cosine"] for row in info["unCLIP"]["kept"]]
    assert cosines == sorted(cosines, reverse=True)
    assert unclip[0]["caption"].startswith("#1 CLIP") and "ranked by CLIP cosine to the uploaded image" in status


@pytest.mark.parametrize("request_, message", [
    (dict(prompt="   "), "empty prompt"),
    (dict(prompt="a red circle " * 40), "prompt too long: 519 characters, at most 400"),
    (dict(prompt="a " * 30), "prompt too long: 30 BPE tokens, the model reads at most 16"),
    (dict(prime_mode="keep the top rows", prime_rows=2), "starts from an image: upload one first"),
    (dict(prime_mode="regenerate a box", backend="unCLIP"), "priming and inpainting are AR features"),
    (dict(prime_mode="regenerate a box", inpaint_box="1,1", image="upload"), r"inpaint box \(1, 1\): needs 4 values"),
    (dict(temperature=0.0), "Value 0.0 is less than minimum value 0.05"),  # the page's own range check
])
def test_bad_request_gets_a_message(client, picture, request_, message):
    args = {"prompt": EXAMPLES[0], **request_}
    if args.get("image") == "upload":
        args["image"] = gradio_client.handle_file(str(picture))
    with pytest.raises(gradio_client.exceptions.AppError, match=message) as e:
        generate(client, **args)
    assert "Traceback" not in str(e.value)


def test_a_file_that_is_not_an_image_gets_a_message(client, tmp_path):
    fake = tmp_path / "notes.png"
    fake.write_text("not a picture")
    with pytest.raises(gradio_client.exceptions.AppError, match="notes.png: not an image that can be read"):
        client.predict(gradio_client.handle_file(str(fake)), 2, 0, 2, 3.0, api_name="/variations")
    text = tmp_path / "notes.txt"
    text.write_text("not a picture")
    with pytest.raises(gradio_client.exceptions.AppError, match="Invalid file type"):
        client.predict(gradio_client.handle_file(str(text)), 2, 0, 2, 3.0, api_name="/variations")


def test_requests_run_one_at_a_time(client, play):
    """Every model event shares one queue slot: a second request waits (its place is shown) instead of
    sampling beside the first."""
    demo = build_app(play)
    model_events = [fn for fn in demo.fns.values() if fn.name in ("on_generate", "on_variations")]
    assert len(model_events) == 3  # Generate, Enter in the prompt box, Variations
    assert all(fn.concurrency_id == "models" and fn.concurrency_limit == 1 for fn in model_events)
    jobs = [client.submit(EXAMPLES[i], "AR", 2, 1, *FAST.values(), api_name="/generate") for i in range(2)]
    assert [len(job.result(timeout=120)[0]) for job in jobs] == [1, 1]


def test_startup_refuses_what_is_not_an_export_in_one_line(exports, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dalle_ar.playground", "--dalle", str(tmp_path), "--port", "0"],
                          cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.strip() == (f"error: --dalle {tmp_path}: not an export directory (no config.json); pass the "
                                   f"`export` directory a trainer wrote, e.g. runs/<name>/export")
    with pytest.raises(ConfigError, match="--prior and --decoder go together"):
        Playground.load(str(exports["dalle"]), prior=str(exports["prior"]))
    with pytest.raises(ConfigError, match="a dvae export, expected dalle"):
        Playground.load(str(exports["dvae"]))


def test_a_port_in_use_is_a_one_line_error(play):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"--host 127.0.0.1 --port {port}: cannot serve there .*; pass another --port"):
            launch(build_app(play), "127.0.0.1", port, block=False)


# -- what the page needs from the pipelines --------------------------------------------------------------------
def test_progress_callback_counts_every_token_and_leaves_the_images_alone(play):
    pipe: DallePipeline = play.dalle
    cfg = SampleConfig(num_candidates=5, top_k_rerank=1, seed=3, batch_size=2)
    seen = []
    with_cb = pipe(["a large blue square"], cfg, callback=lambda done, total: seen.append((done, total)))
    plain = pipe(["a large blue square"], cfg)
    total = 5 * pipe.transformer.config.image_seq_len
    assert seen[-1] == (total, total) and len(seen) == 3 * pipe.transformer.config.image_seq_len  # 3 chunks
    assert all(a < b for (a, _), (b, _) in zip(seen, seen[1:]))
    assert torch.equal(with_cb["images"], plain["images"])


def test_prompt_check_refuses_empty_and_overlong_captions(play):
    play.dalle.check_prompt("a small red circle on the left")
    with pytest.raises(ConfigError, match="empty prompt"):
        play.unclip.check_prompt(" \n")
    with pytest.raises(ConfigError, match="prompt too long: .* BPE tokens, the model reads at most 16"):
        play.dalle.check_prompt("a large purple circle below a large red square to the left of a small green triangle")


def test_load_image_names_a_file_that_is_not_an_image(tmp_path):
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    with pytest.raises(ConfigError, match="broken.jpg: not an image that can be read"):
        load_image(bad, 32)
