"""Per-resblock gradient scaling (paper appendix D): exact in fp32, better fp16 gradients, overflow kept
to its branch, and the real DeepSpeed fp16 engine trains and resumes with it on CPU."""

import copy
import json

import pytest
import torch

from dalle_ar.config import ConfigError, DalleConfig, TrainConfig, preset
from dalle_ar.engine import Trainer, build_ds_config, setup_distributed
from dalle_ar.model import DalleTransformer
from dalle_ar.model.grad_scale import ResblockGradScaler
from dalle_ar.model.parallelize import apply_activation_checkpointing, apply_resblock_grad_scaling

CFG = DalleConfig(text_vocab_size=64, text_len=8, num_image_tokens=64, image_fmap_size=4, dim=64, depth=4, heads=4,
                  attention="sparse")


def batch(seed=0, n=4):
    g = torch.Generator().manual_seed(seed)
    return (torch.randint(0, CFG.num_text_tokens, (n, CFG.text_len), generator=g),
            torch.randint(0, CFG.num_image_tokens, (n, CFG.image_seq_len), generator=g))


def grads(model, loss_scale=1.0, data=None):
    for p in model.parameters():
        p.grad = None
    loss, _ = model.loss(*(data or batch()))
    (loss * loss_scale).backward()
    return {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("extras", [{}, {"sandwich_norm": True, "rotary": True}])
@pytest.mark.parametrize("recompute", [False, True])
def test_fp32_gradients_are_bit_identical_at_any_power_of_two_scales(extras, recompute):
    torch.manual_seed(0)
    ref = DalleTransformer(DalleConfig(**{**CFG.__dict__, **extras}))
    model = copy.deepcopy(ref)
    if recompute:
        apply_activation_checkpointing(model)
    scaler = apply_resblock_grad_scaling(model)
    scaler.scales.copy_(2.0 ** torch.randint(-12, 24, scaler.scales.shape).float())
    scaler.set_loss_scale(2.0 ** 5)
    want, got = grads(ref), grads(model, loss_scale=2.0 ** 5)
    for name in want:
        assert torch.equal(want[name] * 2 ** 5, got[name]), name
    assert not scaler.overflow.any()
    # no gradient, no scaling: eval forwards are the plain model's
    with torch.no_grad():
        assert torch.equal(ref(*batch())[1], model(*batch())[1])


def test_torch_compile_keeps_the_scaling():
    """--compile with --resblock_grad_scaling: the compiled graph reads the current scales (not constants
    baked in at compile time), flags overflows and skips the step the same way."""
    torch.manual_seed(0)
    ref = DalleTransformer(DalleConfig(**{**CFG.__dict__, "depth": 1}))
    model = copy.deepcopy(ref)
    scaler = apply_resblock_grad_scaling(model)
    model.compile()
    scaler.scales.copy_(torch.tensor([2.0 ** -3, 2.0 ** 9]))
    scaler.set_loss_scale(2.0 ** 5)
    want, got = grads(ref), grads(model, loss_scale=2.0 ** 5)
    for name in want:
        torch.testing.assert_close(got[name], want[name] * 2 ** 5, rtol=1e-4, atol=1e-6, msg=name)
    assert not scaler.overflow.any()
    scaler.scales[1] = float("inf")  # after compilation: branch 1 overflows now
    got = grads(model, loss_scale=2.0 ** 5)
    assert scaler.overflow.tolist() == [False, True] and torch.isnan(got["bos"]).all()


def block_grad_error(ref_grads, model_grads, loss_scale):
    errs = [((model_grads[n].float() / loss_scale - g).norm() / g.norm()).item()
            for n, g in ref_grads.items() if n.startswith("blocks")]
    return sum(errs) / len(errs)


def test_fp16_activation_gradients_keep_their_precision_under_a_low_loss_scale():
    """A low global scale (as one overflowing block forces on the whole net) lets the activation gradients
    underflow in fp16; per-branch scales keep them, so the block gradients stay close to fp32's."""
    torch.manual_seed(0)
    ref = DalleTransformer(DalleConfig(**{**CFG.__dict__, "depth": 8}))
    want = grads(ref)
    S = 2.0 ** -8
    plain = copy.deepcopy(ref).half()
    scaled = copy.deepcopy(ref)
    scaler = apply_resblock_grad_scaling(scaled, init_scale=2.0 ** 12)
    scaled.half()
    scaler.set_loss_scale(S)
    plain_err = block_grad_error(want, grads(plain, S), S)
    scaled_err = block_grad_error(want, grads(scaled, S), S)
    assert not scaler.overflow.any()
    assert scaled_err < 0.05 and scaled_err < plain_err / 3, (plain_err, scaled_err)


def test_an_overflow_stays_in_its_branch_skips_the_step_and_lowers_only_its_scale():
    torch.manual_seed(0)
    model = DalleTransformer(CFG)
    scaler = apply_resblock_grad_scaling(model, init_scale=2.0 ** 10, window=3, max_scale=2.0 ** 48)
    model.half()
    scaler.scales[5] = 2.0 ** 40  # branch 5 (layer 2's MLP): its gradients overflow fp16
    got = grads(model)
    assert scaler.overflow.tolist() == [i == 5 for i in range(8)]
    for name, g in got.items():  # the branches below got a zero (filtered) gradient from it, not inf
        if name.startswith(("blocks.0.", "blocks.1.", "blocks.2.ln_1", "blocks.2.attn")):
            assert torch.isfinite(g).all(), name
    # the embeddings' gradients (computed last) carry the overflow to the optimizer: the step is skipped
    assert torch.isnan(got["image_emb.weight"]).all() and torch.isnan(got["bos"]).all()
    scaler.update()
    assert scaler.scales[5] == 2.0 ** 39 and (scaler.scales[:5] == 2.0 ** 10).all()
    assert not scaler.overflow.any()
    for _ in range(3):  # `window` clean steps double every scale; branch 5's counter restarted
        scaler.update()
    assert (scaler.scales[:5] == 2.0 ** 11).all() and scaler.scales[5] == 2.0 ** 40


def test_scale_schedule_clamps_and_round_trips():
    s = ResblockGradScaler(2, init_scale=1.0, window=1, min_scale=0.5, max_scale=4.0)
    for _ in range(5):
        s.update()
    assert s.scales.tolist() == [4.0, 4.0]
    for _ in range(4):
        s.overflow[0] = True
        s.update()
    assert s.scales.tolist() == [0.5, 4.0]
    t = ResblockGradScaler(2)
    t.load_checkpoint_state(s.checkpoint_state())
    assert torch.equal(t.scales, s.scales) and torch.equal(t.clean, s.clean)


# -- through the real DeepSpeed fp16 engine ----------------------------------------------------
MODEL = preset(DalleConfig, "tiny", dim=32, depth=2, heads=2, text_vocab_size=40, text_len=8, image_fmap_size=4,
               num_image_tokens=64)


def stream():
    """Two fixed batches, alternating: the model can overfit them within a few steps."""
    i = 0
    while True:
        g = torch.Generator().manual_seed(i % 2)
        yield (torch.randint(0, MODEL.num_text_tokens, (4, MODEL.text_len), generator=g),
               torch.randint(0, MODEL.num_image_tokens, (4, MODEL.image_seq_len), generator=g))
        i += 1


@pytest.fixture
def cpu_fp16(monkeypatch):
    """DeepSpeed refuses fp16 on a CPU without AVX512-FP16 (a capability check, not a missing kernel: its
    fp16 optimizers are plain torch and run). Let it, so the fp16 engine path is tested here."""
    setup_distributed()
    from deepspeed.accelerator import get_accelerator

    monkeypatch.setattr(get_accelerator(), "is_fp16_supported", lambda: True)


def test_config_errors(tmp_path, cpu_fp16):
    with pytest.raises(ConfigError, match="resblock_grad_scaling is for --precision fp16"):
        build_ds_config(TrainConfig(precision="fp32", resblock_grad_scaling=True))
    cfg = TrainConfig(out=str(tmp_path), precision="fp16", resblock_grad_scaling=True, wandb="disabled")
    with pytest.raises(ConfigError, match="Linear has no resblocks"):
        Trainer(torch.nn.Linear(2, 2), cfg, name="x", export_config={})


def fp16_run(tmp_path, out, steps, save_every=0, stop_at=None, precision="fp16", after_step=None, stage=2):
    ds = tmp_path / "ds_fp16.json"  # small window: the scales move within a short run
    ds.write_text(json.dumps({"fp16": {"initial_scale_power": 8, "loss_scale_window": 2}}))
    torch.manual_seed(0)
    cfg = TrainConfig(out=str(tmp_path / out), steps=steps, batch_size=4, zero_stage=stage, lr=3e-3, warmup_steps=2,
                      precision=precision, resblock_grad_scaling=precision == "fp16", ds_config=str(ds),
                      save_every=save_every, log_every=1, wandb="disabled", progress=False)
    trainer = Trainer(DalleTransformer(MODEL), cfg, name="fp16", export_config={"model": MODEL.__dict__})

    def on_step(t):
        if after_step is not None:
            after_step(t)
        if t.step == stop_at:
            raise KeyboardInterrupt

    try:
        trainer.fit(stream(), lambda e, b, s: e.module.loss_from_logits(*e(*b), *b), on_step=on_step)
    except KeyboardInterrupt:
        pass
    return trainer


def losses(tmp_path, out):
    return [json.loads(line) for line in (tmp_path / out / "metrics.jsonl").read_text().splitlines()]


def test_fp16_engine_trains_with_resblock_scales_and_resumes_them(tmp_path, cpu_fp16):
    straight = fp16_run(tmp_path, "a", steps=8)
    fp16_run(tmp_path, "fp32", steps=8, precision="fp32")
    fp16, fp32 = [r["loss"] for r in losses(tmp_path, "a")], [r["loss"] for r in losses(tmp_path, "fp32")]
    assert fp16[-1] < fp16[0] - 0.3  # it learns, as fp32 training does
    assert max(abs(a - b) for a, b in zip(fp16, fp32)) < 0.08, (fp16, fp32)  # fp16 weights: ~1% apart
    last = losses(tmp_path, "a")[-1]
    assert last["loss_scale"] >= 2 ** 8 and last["overflow_skipped_steps"] == 0
    assert (straight.grad_scaler.scales > 2.0 ** 8).all()  # clean steps grew every branch's scale
    fp16_run(tmp_path, "b", steps=8, save_every=2, stop_at=5)  # "crash" after step 5: step 4 is saved
    resumed = fp16_run(tmp_path, "b", steps=8, save_every=2)
    assert torch.equal(resumed.grad_scaler.scales, straight.grad_scaler.scales)
    assert torch.equal(resumed.grad_scaler.clean, straight.grad_scaler.clean)
    assert [r["loss"] for r in losses(tmp_path, "b") if r["step"] > 4][-3:] == fp16[-3:]


def test_fp16_engine_a_branch_overflow_skips_steps_without_lowering_the_global_scale(tmp_path, cpu_fp16):
    straight = fp16_run(tmp_path, "a", steps=10)

    def too_high(trainer):  # after step 3, branch 1 (layer 0's MLP) gets a scale its gradients overflow at
        if trainer.step == 3:
            trainer.grad_scaler.scales[1] = 2.0 ** 24

    run = fp16_run(tmp_path, "b", steps=10, after_step=too_high)
    log = losses(tmp_path, "b")
    skipped = log[-1]["overflow_skipped_steps"]
    assert 1 <= skipped <= 6
    global_scales = [r["loss_scale"] for r in log]
    assert global_scales == sorted(global_scales)  # DeepSpeed's scale never went down
    assert run.grad_scaler.scales[1] < 2.0 ** 24  # the branch's own scale came down instead
    others = [0, 2, 3]  # the other branches kept their schedule
    assert torch.equal(run.grad_scaler.scales[others], straight.grad_scaler.scales[others])
    assert log[-1]["loss"] < log[2]["loss"]  # and training went on after the skipped steps


@pytest.mark.parametrize("stage", [0, 1, 3])
def test_fp16_resblock_scaling_trains_at_every_zero_stage(tmp_path, cpu_fp16, stage):
    """The parameter-gradient hooks run before DeepSpeed's own (fp16 optimizer, ZeRO-1 partitions,
    ZeRO-3 partitioned parameters)."""
    run = fp16_run(tmp_path, "a", steps=6, stage=stage)
    log = losses(tmp_path, "a")
    assert log[-1]["loss"] < log[0]["loss"] - 0.2 and log[-1]["overflow_skipped_steps"] == 0
    assert (run.grad_scaler.scales == 2.0 ** 11).all()  # 2**8, doubled every 2 clean steps
