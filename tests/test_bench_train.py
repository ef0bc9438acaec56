"""The training-throughput benchmark runs end to end through the real engine and prints its JSON."""

import json

from conftest import run_script


def test_train_throughput_prints_json_with_the_flop_convention(tmp_path):
    out = tmp_path / "tt.json"
    proc = run_script("-m", "bench.train_throughput", "--preset", "tiny", "--variants", "sdpa", "--steps", "1",
                      "--warmup", "1", "--batch_size", "2", "--out", str(out))
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == json.loads(out.read_text())
    assert result["device"].startswith("cpu") and "6N + 12*L*d*seq" in result["flop_convention"]
    (v,) = result["variants"]
    assert "error" not in v, v
    assert v["tokens_per_s"] > 0 and v["model_tflops"] > 0 and v["params_non_embedding"] > 0
    # the 6N + 12*L*d*seq convention and FlopCounterMode over a real step agree within 20% here
    step_tflop = v["model_flop_per_token"] * 2 * (v["config"]["text_len"] + v["config"]["image_fmap_size"] ** 2) / 1e12
    assert abs(v["counted_tflop_per_step"] - step_tflop) < 0.2 * step_tflop
