"""The DeepSpeed engine on CPU: ZeRO stages, resume, export."""

import json
import os

import pytest
import torch
from conftest import run_script

from dalle_ar import models
from dalle_ar.config import ConfigError, DalleConfig, TrainConfig, preset
from dalle_ar.engine import Trainer, build_ds_config, fp16_supported, param_groups
from dalle_ar.model.parallelize import activation_checkpointed, apply_activation_checkpointing
from dalle_ar.model import DalleTransformer

MODEL = preset(DalleConfig, "tiny", dim=32, depth=2, heads=2, text_vocab_size=40, text_len=8, image_fmap_size=4,
               num_image_tokens=64)


def stream(seed=0):
    """Deterministic batches: batch i depends only on (seed, i)."""
    i = 0
    while True:
        g = torch.Generator().manual_seed(seed * 100003 + i)
        yield (torch.randint(0, MODEL.num_text_tokens, (4, MODEL.text_len), generator=g),
               torch.randint(0, MODEL.num_image_tokens, (4, MODEL.image_seq_len), generator=g))
        i += 1


def loss_fn(engine, batch, step):
    return engine.module.loss_from_logits(*engine(*batch), *batch)


class Crash(Exception):
    pass


def crash_at(step):
    def on_step(trainer):
        if trainer.step == step:
            raise Crash(f"simulated crash at step {step}")
    return on_step


def train(out, steps, stage, save_every=0, on_step=None, **kw):
    torch.manual_seed(0)
    cfg = TrainConfig(out=str(out), steps=steps, batch_size=4, zero_stage=stage, lr=3e-3, warmup_steps=2,
                      save_every=save_every, progress=False, **{"wandb": "disabled", **kw})
    trainer = Trainer(DalleTransformer(MODEL), cfg, name="test", export_config={"model": MODEL.__dict__})
    export = trainer.fit(stream(), loss_fn, on_step=on_step)
    return trainer, export


def weights(export):
    return models.load(export, kind="dalle")[0].state_dict()


def assert_resumed_exactly_and_learned(straight, export, stage):
    """The resumed run's export equals the straight run's, and the model beats its init on the training stream."""
    a, b = weights(straight), weights(export)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"stage {stage}: {k} differs after resume"
    model = DalleTransformer(MODEL)
    init_loss = model.loss(*next(stream()))[0].item()
    model.load_state_dict(a)
    assert model.loss(*next(stream()))[0].item() < init_loss - 0.1


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_zero_stage_trains_and_resumes_step_exact(tmp_path, stage):
    # one straight run of 8 steps
    _, straight = train(tmp_path / "a", steps=8, stage=stage)
    # the same run crashes at step 5 (last checkpoint: step 4); a new Trainer resumes and finishes
    with pytest.raises(Crash):
        train(tmp_path / "b", steps=8, stage=stage, save_every=2, on_step=crash_at(5))
    assert (tmp_path / "b" / "checkpoints" / "latest").read_text().strip() == "step_00000004"
    # every checkpoint carries consolidated weights that load without DeepSpeed (ZeRO-3: gathered shards)
    mid = weights(tmp_path / "b" / "checkpoints" / "step_00000004" / "export")
    assert mid.keys() == DalleTransformer(MODEL).state_dict().keys()
    resumed, export = train(tmp_path / "b", steps=8, stage=stage, save_every=2)
    assert resumed.step == 8
    assert_resumed_exactly_and_learned(straight, export, stage)


def test_checkpoints_are_pruned_and_latest_points_to_the_end(tmp_path):
    trainer, _ = train(tmp_path, steps=6, stage=2, save_every=2, keep_checkpoints=2)
    ckpts = sorted(p.name for p in (tmp_path / "checkpoints").glob("step_*"))
    assert ckpts == ["step_00000004", "step_00000006"]
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000006"
    assert (tmp_path / "train_config.json").exists() and (tmp_path / "export" / "config.json").exists()


def test_ds_config_overrides_and_errors(tmp_path):
    cfg = TrainConfig(batch_size=3, grad_accum=5, zero_stage=3, grad_clip=0.5, precision="fp32")
    ds = build_ds_config(cfg)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (3, 5)
    assert ds["zero_optimization"]["stage"] == 3 and ds["gradient_clipping"] == 0.5 and not ds["bf16"]["enabled"]
    bad = tmp_path / "ds.json"
    bad.write_text('{"optimizer": {"type": "AdamW"}}')
    with pytest.raises(ConfigError, match="optimizer"):
        build_ds_config(TrainConfig(ds_config=str(bad)))
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="ds.json"):
        build_ds_config(TrainConfig(ds_config=str(bad)))


def test_ema_is_exported_and_resumes_step_exact(tmp_path):
    trainer, straight = train(tmp_path / "a", steps=8, stage=2, ema_decay=0.9)
    with pytest.raises(Crash):
        train(tmp_path / "b", steps=8, stage=2, save_every=2, on_step=crash_at(5), ema_decay=0.9)
    _, resumed = train(tmp_path / "b", steps=8, stage=2, save_every=2, ema_decay=0.9)
    a, b = weights(straight), weights(resumed)
    for k in a:
        assert torch.equal(a[k], b[k]), f"EMA {k} differs after resume"
    raw = dict(trainer.module.named_parameters())
    assert trainer.ema.updates == 8
    assert any(not torch.equal(a[k], raw[k].detach().float()) for k in raw)  # the export is the average, not the last step
    with pytest.raises(ConfigError, match="ema_decay"):
        train(tmp_path / "c", steps=1, stage=3, ema_decay=0.9)


def test_ds_config_json_values_are_used_unless_a_flag_overrides_them(tmp_path):
    import argparse

    from dalle_ar.cli import add_config_args, resolve

    ds = tmp_path / "ds.json"
    ds.write_text('{"train_micro_batch_size_per_gpu": 7, "gradient_clipping": 0.5, "zero_optimization": {"stage": 1}}')
    parser = argparse.ArgumentParser()
    add_config_args(parser, TrainConfig)
    cfg = resolve(parser.parse_args(["--ds_config", str(ds)]), TrainConfig)
    assert (cfg.batch_size, cfg.grad_clip, cfg.zero_stage, cfg.grad_accum) == (7, 0.5, 1, 1)
    cfg = resolve(parser.parse_args(["--ds_config", str(ds), "--grad_clip", "2", "--zero-stage", "3"]), TrainConfig)
    assert (cfg.batch_size, cfg.grad_clip, cfg.zero_stage) == (7, 2.0, 3)
    built = build_ds_config(cfg)
    assert built["gradient_clipping"] == 2.0 and built["train_micro_batch_size_per_gpu"] == 7
    assert built["zero_optimization"]["stage"] == 3


def test_fp16_offload_and_checkpointing_settings(tmp_path):
    ds = build_ds_config(TrainConfig(zero_stage=3, offload="cpu", precision="fp32"))
    zero = ds["zero_optimization"]
    assert zero["offload_optimizer"]["device"] == "cpu" and zero["offload_param"]["device"] == "cpu"
    assert "offload_param" not in build_ds_config(TrainConfig(zero_stage=2, offload="cpu", precision="fp32"))["zero_optimization"]
    nvme = build_ds_config(TrainConfig(zero_stage=2, offload="nvme", nvme_path="/nvme", precision="fp32"))
    assert nvme["zero_optimization"]["offload_optimizer"] == {"device": "nvme", "pin_memory": True, "nvme_path": "/nvme"}
    with pytest.raises(ConfigError, match="nvme_path"):
        build_ds_config(TrainConfig(offload="nvme", precision="fp32"))
    with pytest.raises(ConfigError, match="ZeRO"):
        build_ds_config(TrainConfig(zero_stage=0, offload="cpu", precision="fp32"))
    with pytest.raises(ConfigError, match="ZeRO 3 shards: pass --zero_stage 0, 1 or 2, or --ema_decay 0"):
        build_ds_config(TrainConfig(zero_stage=3, ema_decay=0.99, precision="fp32"))
    assert build_ds_config(TrainConfig(zero_stage=3, ema_decay=0.0, precision="fp32"))["zero_optimization"]["stage"] == 3
    if not fp16_supported():
        with pytest.raises(ConfigError, match="fp16 needs a CUDA GPU"):
            build_ds_config(TrainConfig(precision="fp16"))


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = DalleTransformer(MODEL)
    batch = next(stream())
    grads = []
    for enable in (False, True):
        model.zero_grad()
        if enable:
            apply_activation_checkpointing(model)
        model.loss(*batch)[0].backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_checkpointed_training_runs_through_the_engine(tmp_path):
    trainer, export = train(tmp_path, steps=2, stage=2, activation_checkpointing=True)
    assert activation_checkpointed(trainer.module) and (export / "model.safetensors").exists()


@pytest.mark.parametrize("stage", [2, 3])
def test_cpu_offload_trains_and_exports(tmp_path, stage):
    trainer, export = train(tmp_path, steps=3, stage=stage, offload="cpu")
    assert trainer.step == 3 and (export / "model.safetensors").exists()
    assert trainer.engine.config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


def test_plateau_halving_schedule():
    from dalle_ar.engine import PlateauHalving

    falling = PlateauHalving(patience=3, threshold=0.01, max_halvings=5, smoothing=0.0)
    for i in range(50):
        falling.observe(10.0 * 0.9 ** i)
    assert falling.halvings == 0
    flat = PlateauHalving(patience=3, threshold=0.01, max_halvings=2, smoothing=0.0)
    for _ in range(4):
        flat.observe(1.0)
    assert flat.halvings == 1 and flat.factor == 0.5  # best set at step 1, then 3 steps without improvement
    for _ in range(20):
        flat.observe(1.0)
    assert flat.halvings == 2  # capped


def test_plateau_schedule_through_the_engine_halves_lr_and_resumes(tmp_path):
    kw = dict(lr_schedule="plateau", plateau_patience=2, plateau_threshold=0.9, plateau_halvings=3)
    trainer, straight = train(tmp_path / "a", steps=8, stage=2, **kw)  # loss never falls 90%: halve every 2 steps
    assert trainer.plateau.halvings == 3
    assert trainer.scheduler.get_last_lr()[0] == pytest.approx(3e-3 / 8)
    with pytest.raises(Crash):
        train(tmp_path / "b", steps=8, stage=2, save_every=2, on_step=crash_at(5), **kw)
    resumed, export = train(tmp_path / "b", steps=8, stage=2, save_every=2, **kw)
    a, b = weights(straight), weights(export)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ConfigError, match="lr_schedule"):
        train(tmp_path / "c", steps=1, stage=0, lr_schedule="step")


def test_weight_decay_skips_embeddings_norms_and_biases():
    model = DalleTransformer(MODEL)
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "blocks.0.attn.qkv.weight" in decayed or any(n.startswith("blocks.0.attn") for n in decayed)
    assert "blocks.0.mlp.fc.weight" in decayed and "to_image_logits.weight" in decayed
    assert not any("emb" in n or "image_row" in n or "text_pos" in n or "ln" in n or n.endswith("bias") or n == "bos"
                   for n in decayed), decayed
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_ds_config_json_is_read_once_and_carried(tmp_path):
    import argparse

    from dalle_ar.cli import add_config_args, resolve

    ds = tmp_path / "ds.json"
    ds.write_text('{"train_micro_batch_size_per_gpu": 7, "zero_optimization": {"stage": 1, "overlap_comm": true}}')
    parser = argparse.ArgumentParser()
    add_config_args(parser, TrainConfig)
    cfg = resolve(parser.parse_args(["--ds_config", str(ds), "--precision", "fp32"]), TrainConfig)
    ds.unlink()  # the engine uses the copy the CLI read, not the file again
    built = build_ds_config(cfg)
    assert built["train_micro_batch_size_per_gpu"] == 7 and built["zero_optimization"]["overlap_comm"] is True
    assert build_ds_config(cfg) == built  # the carried copy is not changed by building


def test_checkpoints_keep_their_client_state_keys(tmp_path):
    """Older checkpoints resume: the checkpointer writes the client_state keys the engine always wrote."""
    trainer, _ = train(tmp_path, steps=1, stage=0, ema_decay=0.9, lr_schedule="plateau")
    state = trainer.checkpointer.client_state()
    assert list(state) == ["step", "consumed", "nonfinite", "rng", "ema", "ema_updates", "plateau"]
    assert (state["step"], state["consumed"], state["ema_updates"]) == (1, 1, 1)


def test_a_resumed_run_continues_its_wandb_run(tmp_path):
    """The wandb run id lives in the run directory, so a resume (online too) logs into the same wandb run; the run's
    name and entity come from --wandb_name / --wandb_entity."""
    first, _ = train(tmp_path / "r", steps=2, stage=0, save_every=1, wandb="offline", wandb_name="my-run")
    run_id = (tmp_path / "r" / "wandb_run_id").read_text()
    assert first.logger.wandb_run.id == run_id and first.logger.wandb_run.name == "my-run"
    again, _ = train(tmp_path / "r", steps=4, stage=0, save_every=1, wandb="offline", wandb_name="my-run")
    assert again.step == 4 and again.logger.wandb_run.id == run_id


def test_a_run_started_under_another_processs_wandb_service_starts_its_own(tmp_path):
    """A parent that used wandb leaves WANDB_SERVICE to the trainers it starts; its service holds the id of a run killed
    mid-step and refuses the resume. The trainer uses a service of its own: here the inherited token names another
    pid and a socket that does not exist, and the run still logs. In a subprocess: this process's wandb is set up."""
    import subprocess
    import sys

    from conftest import ROOT, script_env

    code = ("import os, sys; from pathlib import Path; from dalle_ar.engine.logger import RunLogger\n"
            "log = RunLogger(Path(sys.argv[1]), enabled=True)\n"
            "log.start_wandb('offline', 'p', 'n', {})\n"
            "log.log({'loss': 1.0}, step=1); log.finish({})\n"
            "print(os.environ['WANDB_SERVICE'].split('-')[1] == str(os.getpid()))")
    env = {**script_env(), "WANDB_SERVICE": f"3-{os.getpid()}-unix-{tmp_path / 'no-such.sock'}"}
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "True"
    assert len(list(tmp_path.glob("wandb/offline-run-*"))) == 1


def test_deepspeed_cli_convention_is_accepted(tmp_path):
    """`deepspeed train/x.py --deepspeed --deepspeed_config ds.json` (DeepSpeed's add_config_arguments habit) and the
    launcher's --local_rank parse; --deepspeed_config is --ds_config."""
    import json

    from dalle_ar.cli import parse

    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 2}))
    args, cfg = parse("x", TrainConfig, argv=["--deepspeed", "--deepspeed_config", str(ds), "--local_rank=1"])
    assert args.deepspeed and args.local_rank == 1
    assert (cfg.ds_config, cfg.batch_size, cfg.grad_accum) == (str(ds), 3, 2)


def hidden_update_singular_values(out, stage, optimizer):
    """Singular values of one hidden matrix's first update, divided by the learning rate."""
    torch.manual_seed(0)
    lr = 1e-2
    cfg = TrainConfig(out=str(out), steps=1, batch_size=4, zero_stage=stage, lr=lr, muon_lr=lr, warmup_steps=0,
                      weight_decay=0.0, optimizer=optimizer, grad_clip=0.0, progress=False, wandb="disabled",
                      muon_momentum=0.95)
    model = DalleTransformer(MODEL)
    before = model.blocks[0].mlp.fc.weight.detach().clone()
    trainer = Trainer(model, cfg, name="test", export_config={"model": MODEL.__dict__})
    trainer.fit(stream(), loss_fn)
    return torch.linalg.svdvals((before - trainer.module.blocks[0].mlp.fc.weight.detach()) / lr)


@pytest.mark.parametrize("stage", [0, 2])
def test_muon_orthogonalises_hidden_matrices_and_resumes_step_exact(tmp_path, monkeypatch, deepspeed_newton_schulz,
                                                                    stage):
    # on CPU the Gram iteration in fp32 in DeepSpeed's place (its own runs in bf16)
    bf16 = deepspeed_newton_schulz.zeropower_via_newtonschulz5
    from dalle_ar.engine import optim

    calls = []
    monkeypatch.setattr(optim, "gram_newton_schulz", lambda g, steps: calls.append(g.shape) or optim.newton_schulz(g, steps))
    # Muon's update of a hidden matrix is its momentum orthogonalised: every singular value near 1 (times
    # sqrt(rows / cols) for a tall one), where AdamW's is not; a Muon run that fell back to SGD or Adam fails here
    # (the last singular value is 0: fc's input is a LayerNorm output, whose features sum to zero)
    sv = hidden_update_singular_values(tmp_path / "muon", stage, "muon")[:-1]
    scale = 4 ** 0.5  # fc is (4 dim, dim)
    assert sv.min() > 0.6 * scale and sv.max() < 1.2 * scale, sv
    adamw = hidden_update_singular_values(tmp_path / "adamw", stage, "adamw")[:-1]
    assert adamw.max() / adamw.min() > 3, adamw
    # it trains, and a crash at step 5 resumes to the same weights as a straight run (momentum restored, on every
    # stage: test_zero2_muon_keeps_the_momentum_of_every_matrix_as_stage_0_does)
    kw = dict(optimizer="muon", grad_clip=0.0, muon_lr=0.02, muon_momentum=0.95)
    _, straight = train(tmp_path / "a", steps=8, stage=stage, **kw)
    with pytest.raises(Crash):
        train(tmp_path / "b", steps=8, stage=stage, save_every=2, on_step=crash_at(5), **kw)
    _, export = train(tmp_path / "b", steps=8, stage=stage, save_every=2, **kw)
    assert_resumed_exactly_and_learned(straight, export, stage)
    assert deepspeed_newton_schulz.zeropower_via_newtonschulz5 is not bf16
    assert calls, calls  # fp32 Muon takes the Gram method


def test_muon_keeps_the_models_matrix_order_and_its_checkpoints_record_it(tmp_path, deepspeed_newton_schulz):
    """DeepSpeed's MuonWithAuxAdam sorts its matrices by shape, largest first; ZeRO 1/2 then gave one rank of the demo's
    transformer seven large matrices and the other ten, each about as slow to orthogonalise. Ours keeps the model's
    order (block by block, whole blocks per rank), checkpoints say so, and one that does not is refused by name."""
    kw = dict(optimizer="muon", grad_clip=0.0, muon_lr=0.02)
    trainer, _ = train(tmp_path / "a", steps=2, stage=2, save_every=1, **kw)
    hidden = [id(p) for p in trainer.module.muon_params()]
    assert [id(p) for p in trainer.optimizer.bit16_groups[0]] == hidden
    shapes = [tuple(p.shape) for p in trainer.module.muon_params()]
    assert shapes != sorted(shapes, reverse=True)  # DeepSpeed's order would differ here
    assert trainer.checkpointer.client_state()["muon_order"] == "model"
    states = tmp_path / "a" / "checkpoints" / "step_00000002" / "mp_rank_00_model_states.pt"
    state = torch.load(states, weights_only=False)
    del state["muon_order"]  # a checkpoint of the shape-sorted order, as dalle-ar wrote them before
    torch.save(state, states)
    with pytest.raises(ConfigError, match="model's order.*--no-resume"):
        train(tmp_path / "a", steps=4, stage=2, save_every=1, **kw)


def test_adamw_is_torchs_fused_kernel_on_every_device_unless_told_otherwise(tmp_path):
    from dalle_ar.engine.optim import build_optimizer

    model = DalleTransformer(MODEL)  # fused on the CPU too: one pass over the parameters, 7x the for-loop's speed
    assert build_optimizer(model, TrainConfig(out=str(tmp_path))).defaults["fused"] is True
    assert not build_optimizer(model, TrainConfig(out=str(tmp_path), fused_adamw=False)).defaults["fused"]


def test_no_muon_compile_runs_deepspeeds_muon_update_uncompiled(tmp_path, deepspeed_newton_schulz):
    from deepspeed.runtime.zero import stage_1_and_2
    from deepspeed.runtime.zero.muon import muon_optimizer, original_muon

    kw = dict(optimizer="muon", grad_clip=0.0, muon_lr=0.02)
    eager, _ = train(tmp_path / "eager", steps=2, stage=2, muon_compile=False, **kw)
    assert eager.step == 2
    plain = stage_1_and_2.muon_update
    assert original_muon.muon_update._torchdynamo_orig_callable is plain and muon_optimizer.muon_update is plain
    train(tmp_path / "compiled", steps=1, stage=2, **kw)  # the default: DeepSpeed's function, compiled
    compiled = stage_1_and_2.muon_update
    assert compiled is muon_optimizer.muon_update and compiled is not plain
    assert compiled._torchdynamo_orig_callable is plain


def test_zero2_muon_keeps_the_momentum_of_every_matrix_as_stage_0_does(tmp_path, deepspeed_newton_schulz):
    """deepspeed 0.19.7's ZeRO-1/2 Muon re-copies the step's momentum from the committed one before each matrix of a
    rank's partition, so only the partition's last matrix kept its momentum (`zero_muon_keeps_every_momentum` copies
    it once per pass). Stage 0 is Muon on the averaged gradient: with momentum 0.95 ZeRO 2 ends where it does, for
    every hidden matrix, and far from where momentum 0 ends."""

    def hidden(stage, momentum):
        torch.manual_seed(0)
        cfg = TrainConfig(out=str(tmp_path / f"{stage}_{momentum}"), steps=3, batch_size=4, zero_stage=stage,
                          lr=3e-3, muon_lr=0.02, warmup_steps=0, weight_decay=0.0, optimizer="muon", grad_clip=0.0,
                          muon_momentum=momentum, progress=False, wandb="disabled")
        trainer = Trainer(DalleTransformer(MODEL), cfg, name="test", export_config={"model": MODEL.__dict__})
        trainer.fit(stream(), loss_fn)
        return [p.detach().clone() for p in trainer.module.muon_params()]

    exact, no_momentum, zero2 = hidden(0, 0.95), hidden(0, 0.0), hidden(2, 0.95)
    apart = lambda a, b: (a - b).abs().max().item()
    effect = [apart(e, n) for e, n in zip(exact, no_momentum)]  # what the momentum does to each matrix in 3 steps
    assert min(effect) > 3e-3, effect
    # the AdamW half's rounding, carried into the matrices: well under the momentum's effect on every one
    gaps = [apart(z, e) for z, e in zip(zero2, exact)]
    assert max(gaps) < 2e-3 and all(g < 0.25 * m for g, m in zip(gaps, effect)), (gaps, effect)


def test_fp32_newton_schulz_is_deepspeeds_up_to_bf16_rounding(deepspeed_newton_schulz):
    """The fp32 iteration Muon takes on CPU gives DeepSpeed's (bf16) result up to bf16 rounding, for wide, tall and
    square matrices and a batch of them."""
    from dalle_ar.engine.optim import newton_schulz

    torch.manual_seed(0)
    for shape in ((32, 96), (96, 32), (48, 48), (3, 40, 24)):
        g = torch.randn(shape)
        mine, deepspeeds = newton_schulz(g), deepspeed_newton_schulz.zeropower_via_newtonschulz5(g, 5).float()
        assert mine.dtype == torch.float32 and mine.shape == g.shape
        assert (mine - deepspeeds).norm() < 0.06 * deepspeeds.norm(), (mine - deepspeeds).norm() / deepspeeds.norm()
        sv = torch.linalg.svdvals(mine)  # near 1, but for the few smallest of a nearly singular square matrix
        assert sv.max() < 1.2 and (sv > 0.6).float().mean() > 0.9, sv


def test_gram_newton_schulz_is_the_standard_iteration_up_to_fp32_rounding():
    """The Gram iteration fp32 Muon takes computes the standard one's result: for wide, tall and square matrices,
    a batch of them, and a nearly low-rank gradient-like one (whose tiny singular values the restart keeps sane)."""
    from dalle_ar.engine.optim import gram_newton_schulz, newton_schulz

    torch.manual_seed(0)
    low_rank = torch.randn(64, 4) @ torch.randn(4, 256) + 1e-3 * torch.randn(64, 256)
    for g in (torch.randn(32, 96), torch.randn(96, 32), torch.randn(48, 48), torch.randn(3, 40, 24), low_rank):
        gram, standard = gram_newton_schulz(g, 5), newton_schulz(g, 5)
        assert gram.dtype == torch.float32 and gram.shape == g.shape
        assert (gram - standard).norm() < 1e-4 * standard.norm(), (gram - standard).norm() / standard.norm()


def test_muon_settings_that_cannot_work_are_refused(tmp_path):
    with pytest.raises(ConfigError, match="--grad_clip 0"):
        TrainConfig(optimizer="muon", zero_stage=2, grad_clip=1.0)
    with pytest.raises(ConfigError, match=r"reduced\): drop --offload, or use --optimizer adamw"):
        TrainConfig(optimizer="muon", zero_stage=2, grad_clip=0.0, offload="cpu")
    with pytest.raises(ConfigError, match=r"reduced\): pass --zero_stage 0, 1 or 2, or use --optimizer adamw"):
        TrainConfig(optimizer="muon", zero_stage=3, grad_clip=0.0)
    with pytest.raises(ConfigError, match="pass --zero_stage 0, 1 or 2 and drop --offload, or"):
        TrainConfig(optimizer="muon", zero_stage=3, grad_clip=0.0, offload="cpu")
    TrainConfig(optimizer="muon", zero_stage=0, grad_clip=1.0)  # stage 0 clips the raw gradients
    TrainConfig(optimizer="muon", zero_stage=2, grad_clip=0.0)  # with its momentum (zero_muon_keeps_every_momentum)
    with pytest.raises(ConfigError, match="muon_params"):
        Trainer(torch.nn.Linear(4, 4), TrainConfig(out=str(tmp_path / "x"), optimizer="muon", grad_clip=0.0,
                                                   muon_momentum=0.0, progress=False, wandb="disabled"),
                name="test", export_config={})


def test_deepspeeds_bugs_the_engine_works_around_are_still_there():
    """docs/upstream/deepspeed_repro.py in a process of its own (no dalle_ar patch applied): the pinned deepspeed's
    ZeRO 2 loses the momentum of all but the last Muon matrix of a partition, its `muon_update` cannot step a conv
    kernel, and its ZeRO-0 gradient clipping raises for a 0-dim parameter; with `zero_muon_keeps_every_momentum` and
    `deepspeed_clips_zero_dim_gradients` applied, ZeRO 2 ends where ZeRO 0 ends and the clipped step runs. When an
    upgrade fixes a bug, this fails and names the workaround to drop."""
    report = json.loads(run_script("docs/upstream/deepspeed_repro.py", "--patched").stdout.strip().splitlines()[-1])
    version = f"deepspeed {report['deepspeed']}"
    zero2, conv, clip = (report[k] for k in ("zero2_keeps_only_the_last_matrix_momentum", "muon_update_on_conv_kernels",
                                             "zero0_clip_on_a_0_dim_parameter"))
    assert zero2["present"] and zero2["matrices_that_lost_their_momentum"] == [0], (
        f"{version} keeps every matrix's momentum at ZeRO 2: drop zero_muon_keeps_every_momentum", zero2)
    assert conv["present"], f"{version} steps conv kernels: MuonWithKernels can go ({conv})"
    assert clip["present"], f"{version} clips 0-dim gradients at ZeRO 0: drop deepspeed_clips_zero_dim_gradients"
    fixed = report["zero2_with_dalle_ar_fix"]
    assert not fixed["present"] and max(fixed["max_abs_gap_zero2_to_zero0"]) == 0.0, fixed
    assert report["zero0_clip_with_dalle_ar_fix"] == {"present": False, "step": "ok"}


def test_zero_0_clips_a_0_dim_parameters_gradient_with_the_others(tmp_path):
    """deepspeed 0.19.7 clips fp32 gradients at ZeRO 0 by multiplying each in place by a 1-element tensor, which the
    gradient of a 0-dim parameter (open_clip's `logit_scale`) cannot take: `train_clip.py --zero_stage 0` raised at its
    first step. The Trainer's engine clips it with the others, as torch's clip_grad_norm_ does."""
    import copy

    from torch import nn

    class Scaled(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)
            self.logit_scale = nn.Parameter(torch.tensor(2.0))

        def forward(self, x):
            return (self.lin(x) * self.logit_scale.exp()).pow(2).mean()

    torch.manual_seed(0)
    model, x = Scaled(), torch.randn(4, 4)
    reference = copy.deepcopy(model)
    reference(x).backward()
    total = torch.nn.utils.clip_grad_norm_(reference.parameters(), 1e-3)
    assert total > 1e-2  # so the clip acts
    cfg = TrainConfig(out=str(tmp_path), steps=1, batch_size=4, zero_stage=0, grad_clip=1e-3, progress=False,
                      wandb="disabled", save_every=0)
    trainer = Trainer(model, cfg, name="test", export_config={})
    seen = []
    step = trainer.engine.optimizer.step
    trainer.engine.optimizer.step = lambda *a, **k: (seen.append([p.grad.clone() for p in model.parameters()]),
                                                     step(*a, **k))[1]
    trainer.engine.backward(trainer.engine(x))
    trainer.engine.step()
    assert len(seen) == 1 and seen[0][0].dim() == 0  # logit_scale (a module's own parameters come first)
    for got, want in zip(seen[0], (p.grad for p in reference.parameters())):
        torch.testing.assert_close(got, want)
