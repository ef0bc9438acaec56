# `make demo`: set up and run the whole pipeline on the synthetic shapes world (CPU: ~15 min).
# `make test`: set up and run the test suite. See README.md.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO   ?= outputs/demo

.PHONY: setup demo test bench clean

setup: $(STAMP)

# torch/torchvision are pinned to the builds on this machine's disk (constraints.txt): an unpinned torch
# would pull a newer multi-GB build, and deepspeed 0.19.8 breaks 0-dim parameters.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -c constraints.txt -e '.[test]'
	touch $(STAMP)

demo: setup
	rm -rf $(DEMO) && mkdir -p $(DEMO) && date +%s > $(DEMO)/.start
	$(PY) train/make_shards.py synthetic --out $(DEMO)/data/shapes --num 8000
	$(PY) train/train_tokenizer.py --data $(DEMO)/data/shapes --out $(DEMO)/runs/tokenizer --vocab_size 512
	$(PY) train/train_dvae.py --data $(DEMO)/data/shapes --out $(DEMO)/runs/dvae \
		--steps 1000 --batch_size 32 --lr 3e-3 --warmup_steps 50 --ema_decay 0.99 --sample_every 250
	$(PY) -m bench.dvae_quality --dvae $(DEMO)/runs/dvae/export --synthetic 1024 --grid $(DEMO)/dvae_heldout.png \
		--out $(DEMO)/dvae_quality.json
	$(PY) train/encode.py --dvae $(DEMO)/runs/dvae/export --data $(DEMO)/data/shapes --out $(DEMO)/data/tokens
	$(PY) train/train_dalle.py --data $(DEMO)/data/tokens --tokenizer $(DEMO)/runs/tokenizer --out $(DEMO)/runs/dalle \
		--steps 800 --batch_size 32 --lr 1e-3 --warmup_steps 50
	$(PY) train/train_clip.py --data $(DEMO)/data/shapes --out $(DEMO)/runs/clip \
		--steps 200 --batch_size 64 --lr 1e-3 --warmup_steps 20
	$(PY) sample/generate.py --dalle $(DEMO)/runs/dalle/export --clip $(DEMO)/runs/clip/export \
		--synthetic_prompts 8 --num_candidates 16 --top_k_rerank 4 --temperature 0.7 --out $(DEMO)
	$(PY) sample/generate.py --dalle $(DEMO)/runs/dalle/export --clip $(DEMO)/runs/clip/export \
		--synthetic_prompts 64 --num_candidates 16 --top_k_rerank 4 --temperature 0.7 --out $(DEMO)/eval
	@echo "demo finished in $$(( $$(date +%s) - $$(cat $(DEMO)/.start) )) s: see $(DEMO)/grid.png and $(DEMO)/scores.json"

test: setup
	$(PY) -m pytest -q

bench: setup
	$(PY) -m bench.train_throughput --out bench/results/train_throughput_$$(hostname).json
	$(PY) -m bench.sample_speed --out bench/results/sample_speed_$$(hostname).json
	$(PY) -m bench.dvae_speed --out bench/results/dvae_speed_$$(hostname).json

clean:
	rm -rf outputs
