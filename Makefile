# `make demo`: set up and run the whole pipeline on the synthetic shapes world with the Muon recipe (20,000 images; the
# dVAE and the transformer trained with Muon, the transformer's 575 steps with momentum; the CLIP's 350 steps; sampled
# at temperature 0.35): 871-901 s with setup from fresh clones of three seeds on a 148-149 GFLOP/s 2-core AVX2 CPU (seed 0
# on a machine's first run, with an empty torch Inductor cache: 905 s; bench/results/demo_fast_zen2_cpu.json), 836-972 s
# on a 2-core Zen 3 at 172-189 (seed 0: 935 s at 178, 859 s at 188; seed 1: 836 s at 189, 972 s as it fell to 172; with
# uv's 43-46 s of setup, seed 0 took 1,012-1,051 s while the VM read 93-170: bench/results/setup_uv_zen3_cpu.json); CLIP top-1 96.9% +- 1.6 (at least 95.3%), 93.4% +- 1.1 of candidates right, rerank
# efficiency at least 0.95 (bench/results/demo_seeds_muon_t035_zen3_cpu.json).
# `make demo DALLE_STEPS=650 DALLE_IMAGES=32000 CLIP_STEPS=400`: the recipe before it (16.3 min, CLIP top-1 97.4% +- 0.9,
# 93.9% +- 2.9 of candidates right: demo_speed_zen2_cpu.json, demo_steps650_zen2_cpu.json). `make demo OPTIMIZER=adamw`:
# the AdamW recipe (8,000 images), the default before Muon: 27-35 min on 142-194 GFLOP/s machines, CLIP top-1 89.6% +-
# 3.6 over three seeds.
# `make test`: set up and run the test suite. See README.md.
# `make play`: the browser playground on the demo's models (runs `make demo` first when they are missing).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
DEMO   ?= outputs/demo
SEED   ?= 0
SEEDS  ?= 0 1 2
# the demo transformer's steps: with Muon (the default), 575 on 20,000 images (with momentum: on three seeds CLIP top-1
# 96.9% / 96.9% / 95.3%, rerank efficiency at least 0.95, with the CLIP's 350 steps, the job fitting 15 minutes with
# setup on the 2-core CPU: bench/results/demo_fast_zen2_cpu.json; 650 on 32,000 images with the CLIP's 400 steps drew
# CLIP top-1 100% / 96.9% / 96.9% and rerank efficiency at least 0.97, in 16.3 minutes; 800, 98.4% +- 2.7:
# bench/results/demo_steps650_zen2_cpu.json);
# with AdamW, 1,600 (3,200 draw more correct candidates from every seed's tokens, for ~11 more minutes:
# bench/results/transformer_steps_seeds_zen4_cpu.json)
DALLE_STEPS ?= $(if $(filter muon,$(DALLE_OPTIMIZER)),575,1600)
# the images the transformer trains on. The dVAE, the tokenizer and the CLIP train on the first 8,000 of them (shards
# 000000-000007 at make_shards.py's 1,000 images per shard: BASE_SHARDS) whatever this is. 20,000 with Muon (the
# default: its 575 steps of 32 draw 18,400 samples, and 12,000 fewer images to render and encode take ~35 s less),
# 8,000 with AdamW (its former default; DALLE_IMAGES=32000 with DALLE_STEPS=3200 draws more correct candidates and a CLIP
# top-1 of at least 92% on every seed: bench/results/transformer_data_steps_zen4_cpu.json)
DALLE_IMAGES ?= $(if $(filter muon,$(DALLE_OPTIMIZER)),20000,8000)
# the CLIP's steps (batch 64): 350 in the Muon recipe, so that it ends with the dVAE and its encoding of the images (400
# in the AdamW recipe, as measured). On the same 16 candidates per prompt of a seed-2 transformer the 350-step CLIP and
# the 400-step one both pick 95.3% right (bench/results/demo_fast_zen2_cpu.json); 1,000 steps were no better than 400
# (rerank_clip_steps_cpu.json).
CLIP_STEPS ?= $(if $(filter muon,$(DALLE_OPTIMIZER)),350,400)
# the optimizer of the demo's dVAE and transformer: adamw, or muon (DeepSpeed's Muon on the hidden weight matrices and
# conv kernels, AdamW on the rest; orthogonalised in fp32 on CPU). DVAE_OPTIMIZER / DALLE_OPTIMIZER
# set one each.
OPTIMIZER ?= muon
# the transformer's: Muon at lr 0.01 with momentum 0.95 (at ZeRO 2, which keeps every matrix's momentum:
# dalle_ar.engine.optim.zero_muon_keeps_every_momentum). On the 32,000-image tokens of three seeds, 800 such steps drew
# 95.1% +- 1.0 correct candidates and a CLIP top-1 of at least 98.4%, against 92.3% +- 3.1 and 95.3% for 1,200 steps
# without momentum at lr 0.05, the recipe before it; 500 left the rerank efficiency under 0.95 on one seed
# (bench/results/transformer_muon_momentum_cpu.json).
# DALLE_MUON="--muon_lr 0.05 --muon_momentum 0" with DALLE_STEPS=1200 is the recipe before it.
DALLE_OPTIMIZER ?= $(OPTIMIZER)
DALLE_MUON ?= --muon_lr 0.01 --muon_momentum 0.95
DALLE_OPT_FLAGS = --optimizer $(DALLE_OPTIMIZER)$(if $(filter muon,$(DALLE_OPTIMIZER)), --grad_clip 0 --no-muon_compile $(DALLE_MUON))
# the comparisons' AR transformer (compare-matched, compare-scaling) trains with the demo transformer's optimizer too
COMPARE_AR_ARGS = --transformer-args="$(DALLE_OPT_FLAGS)"
# and their unCLIP decoder, which reads the caption: with Muon (the default) on its U-Net's hidden kernels (ZeRO stage 0,
# one process; AdamW on the rest): at the 6e13 budget's 1,201 steps, beside the same prior, it drew more right images
# than AdamW on two seeds (bench/results/unclip_decoder_muon_cpu.json; DECODER_OPTIMIZER=adamw: the recipe before it).
# Its Muon lr, DECODER_MUON_LR: 0.01, of 0.005 / 0.01 / 0.02 / 0.04 at that budget the one that drew the most right
# images (single objects 97.6% against 66.9% at 0.02, the lr before it: bench/results/unclip_decoder_muon_lr_cpu.json).
DECODER_OPTIMIZER ?= $(OPTIMIZER)
DECODER_MUON_LR ?= 0.01
DECODER_OPT_FLAGS = --optimizer $(DECODER_OPTIMIZER)$(if $(filter muon,$(DECODER_OPTIMIZER)), --zero_stage 0 --grad_clip 0 --muon_lr $(DECODER_MUON_LR))
COMPARE_UNCLIP_ARGS = --decoder-args="--use_caption $(DECODER_OPT_FLAGS)"
# the dVAE's: Muon at lr 0.02 on its residual blocks' kernels (ZeRO stage 0, one process) passes the reconstruction
# check on more held-out images in 2,500 steps than AdamW in 4,500 (bench/results/dvae_muon_zen4_cpu.json)
DVAE_OPTIMIZER ?= $(OPTIMIZER)
DVAE_STEPS ?= $(if $(filter muon,$(DVAE_OPTIMIZER)),2500,4500)
DVAE_OPT_FLAGS = --optimizer $(DVAE_OPTIMIZER)$(if $(filter muon,$(DVAE_OPTIMIZER)), --zero_stage 0 --grad_clip 0 --muon_lr 0.02)
BASE_SHARDS = $(DEMO)/data/shapes/{000000..000007}.tar
COMPARE ?= outputs/compare
BUDGET  ?= 5e13
MATCHED ?= outputs/compare_matched_$(BUDGET)
BUDGETS ?= 1.5e13,3e13,6e13
SCALING ?= outputs/compare_scaling
HOST    ?= 127.0.0.1
PORT    ?= 7860
# a demo stage, timed into $(DEMO)/stages.json
STAGE   = $(PY) -m bench.stage --log $(DEMO)/stages.json --name
# threads per process of the demo's two concurrent parts: half the cores
NPROC   := $(shell nproc 2>/dev/null || echo 2)
THREADS ?= $(shell n=$(NPROC); echo $$(( n > 1 ? n / 2 : 1 )))
THREADS_ENV = OMP_NUM_THREADS=$(THREADS) MKL_NUM_THREADS=$(THREADS)
# `make test`'s pytest-xdist workers, each given a whole test file (its module fixtures are built once) and its share
# of the cores
TEST_WORKERS ?= 2

.PHONY: setup setup-dev demo demo-clip demo-dvae demo-tokens demo-dvae-check demo-tokenizer demo-seeds test test-browser play bench clean compare compare-models compare-matched \
	compare-scaling

# `make setup`: what the demo, the comparisons and the benchmarks run on; `make setup-dev` adds the test and playground
# extras (`make test`, `make play`), which the demo does without (17 s less setup on the 2-core CPU).
setup: $(STAMP)
setup-dev: $(DEV_STAMP)

# torch/torchvision are pinned to the builds on this machine's disk (constraints.txt): an unpinned torch
# would pull a newer multi-GB build, and deepspeed 0.19.8 breaks 0-dim parameters.
# uv installs the packages (uv itself from the venv's pip, pinned in constraints.txt): it unpacks wheels on every core,
# so torch's ~5 GB (the CUDA build and its NVIDIA libraries) install in ~17 s against ~42 s with pip, and the whole
# setup takes ~43 s against ~65 s on the 2-core CPU, with the same versions of every package. uv does not read pip's
# configuration: it gets the package indexes, wheel folders and no-index pip is configured with (a machine's local
# mirror, say) as flags, and takes the best version found on any of them, as pip does.
UV_INSTALL = UV_CACHE_DIR=$(UV_CACHE_DIR) $(VENV)/bin/uv pip install -q --python $(PY) -c constraints.txt --index-strategy unsafe-best-match $(UV_INDEXES)
# uv's cache of unpacked wheels: in the venv unless UV_CACHE_DIR is set, so it is on the venv's file system (uv
# hardlinks from it: no second copy) and needs no writable home directory
UV_CACHE_DIR ?= $(VENV)/.uv-cache
# pip's indexes, wheel folders and no-index as uv flags (`pip config list` prints each option as
# <where>.<option>='<values>', the values apart by spaces or, from a config file's lines, by \n), read once, when a
# recipe needs them
PIP_INDEXES = $(PYTHON) -m pip config list 2>/dev/null | \
	sed -n "s/^[^=]*\.\(index-url\|extra-index-url\|find-links\|no-index\)='\(.*\)'$$/\1 \2/p" | sed 's/\\n/ /g' | \
	awk '$$1 == "no-index" { if (tolower($$2) ~ /^(1|y|yes|t|true|on)$$/) printf "--no-index "; next } \
		{ for (i = 2; i <= NF; i++) printf "--%s %s ", $$1, $$i }'
UV_INDEXES = $(eval UV_INDEXES := $(shell $(PIP_INDEXES)))$(UV_INDEXES)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -c constraints.txt uv
	$(UV_INSTALL) torch==2.14.1 torchvision==0.29.1 pip
	# the bytecode of torch and of what came with it (numpy, sympy, networkx, ...) compiles on both cores while uv
	# installs the rest (uv compiles nothing): 10-11 s after it on the 2-core CPU. All of it, or with
	# PYTHONDONTWRITEBYTECODE set every process compiles what is missing again (sympy, networkx, numpy, ...: 2.7 s of
	# each `import deepspeed`). A file that does not compile is left to Python to compile on import.
	site=$$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') && \
		{ $(PY) -m compileall -q -j 0 $$(ls -d "$$site"/*/ "$$site"/*.py) >/dev/null 2>&1 & } && \
		$(UV_INSTALL) -e . && wait
	touch $(STAMP)

$(DEV_STAMP): $(STAMP)
	$(UV_INSTALL) -e '.[test,play]'
	# OpenAI's own dall_e package, so the tests convert pickles made by their code (its requirements list pins
	# test tools and blobfile we do not need; what it imports, attrs and requests, comes with [test] and wandb)
	$(UV_INSTALL) --no-deps dall-e==0.1
	touch $(DEV_STAMP)

# The CLIP trains beside the dVAE and its encoding of the images (`make -j2` of the targets below), each process on
# half the cores (THREADS): on the 2-core CPU one thread per process is faster than two for the dVAE (4,500 steps:
# 701-746 s on one thread beside another job, 817 s alone on two), and the CLIP's ~7 minutes on one thread hide beside
# the dVAE. The transformer, which runs alone, trains data-parallel on two ranks of half the cores each (torchrun,
# DeepSpeed ZeRO-2 over gloo), 16 sequences per rank: the demo's global batch of 32, at 1.58 steps/s on the 2-core CPU
# against 1.0 for one process of batch 32 on one thread (same machine, same minute; ~1.0 on two threads), 1.63 since
# each rank orthogonalises whole blocks (dalle_ar/engine/optim.py) with DeepSpeed's muon_update uncompiled
# (--no-muon_compile: as fast, without 12-19 s of compiling).
# The dVAE decodes its images in one loader worker (--num_workers 1): the same batches in the same order, so the same
# weights bit for bit, ~12% faster on the 2-core CPU (the PNG decoding overlaps the training step). 4,500 crop steps
# pass the caption check on 97.3% of held-out reconstructions against 92.7% for 3,000 (bench/results/dvae_crop_steps_cpu.json).
# The transformer trains at lr 2e-3: for the same 800 steps it draws 60% correct candidates against 48% at 1e-3 and 56%
# at 3e-3 (bench/transformer_recipes.py; bench/results/transformer_lr_cpu.json).
# The eval samples at temperature 0.35: of 0.25 / 0.35 / 0.5 / 0.7, the one whose CLIP top-1 was highest on 64
# development prompts over six Muon-recipe transformers (96.9% against 92.2% at 0.7); on the held-out prompts it drew
# more correct candidates from all six (+2.0 to +6.1 points) and a CLIP top-1 of 95.0% +- 2.3 against 93.8% +- 2.6
# (bench/results/demo_temperature_muon_cpu.json). It costs no training, so no stage's time changes. The AdamW recipe keeps
# 0.7: there a lower temperature drew more correct candidates but no better top-1 (demo_temperature_cpu.json).
DEMO_TEMPERATURE ?= $(if $(filter muon,$(DALLE_OPTIMIZER)),0.35,0.7)
demo: setup
	@test $(DALLE_IMAGES) -ge 8000 2>/dev/null || { echo "DALLE_IMAGES=$(DALLE_IMAGES): give at least 8000 (the dVAE, tokenizer and CLIP train on the first 8,000 images)"; exit 2; }
	@for v in DVAE_OPTIMIZER=$(DVAE_OPTIMIZER) DALLE_OPTIMIZER=$(DALLE_OPTIMIZER); do case "$$v" in *=adamw|*=muon) ;; \
		*) echo "$$v: use adamw or muon"; exit 2;; esac; done
	rm -rf $(DEMO) && mkdir -p $(DEMO) && date +%s > $(DEMO)/.start
	$(PY) -m bench.machine --out $(DEMO)/machine.json
	$(STAGE) shards -- $(PY) train/make_shards.py synthetic --out $(DEMO)/data/shapes --num $(DALLE_IMAGES)
	@echo "the CLIP trains beside the dVAE, $(THREADS) thread(s) each, then the transformer on 2 ranks; CLIP progress: tail -f $(DEMO)/clip.log"
	$(MAKE) --no-print-directory -j2 demo-clip demo-tokens demo-dvae-check demo-tokenizer
	$(THREADS_ENV) $(STAGE) transformer -- $(PY) -m torch.distributed.run --standalone --nproc_per_node 2 \
		train/train_dalle.py --data $(DEMO)/data/tokens --tokenizer $(DEMO)/runs/tokenizer --out $(DEMO)/runs/dalle \
		--steps $(DALLE_STEPS) --batch_size 16 --lr 2e-3 --warmup_steps 50 --seed $(SEED) $(DALLE_OPT_FLAGS)
	$(STAGE) eval -- $(PY) sample/generate.py --dalle $(DEMO)/runs/dalle/export --clip $(DEMO)/runs/clip/export \
		--synthetic_prompts 64 --num_candidates 16 --top_k_rerank 4 --temperature $(DEMO_TEMPERATURE) --seed $(SEED) --out $(DEMO)/eval \
		--grid_prompts 8
	cp $(DEMO)/eval/grid.png $(DEMO)/eval/candidates.png $(DEMO)/
	echo $$(( $$(date +%s) - $$(cat $(DEMO)/.start) )) > $(DEMO)/.seconds
	@echo "demo finished in $$(cat $(DEMO)/.seconds) s ($$(cat $(DEMO)/machine.json)): see $(DEMO)/grid.png, $(DEMO)/eval/scores.json"

# The demo's concurrent parts (run by `make demo -j2` after the shards, before the transformer): the CLIP on one core;
# the dVAE on the other, then the encoding of the images into tokens there, and the dVAE's check and the tokenizer on the
# first core free (on the 2-core CPU the dVAE took 353-380 s and the encoding of 20,000 images 42-44 s, the CLIP's 350
# steps 386-400 s, the check 14-15 s).
# The CLIP reads 16 caption tokens: the shapes world's longest caption is 14 with its start and end tokens, and a
# step (with four wrong captions) took 1.38 s beside the dVAE against 1.83 s at the default 32 (a longer caption is cut
# and counted in clip.log).
# Two one-attribute-wrong captions per caption (--hard_negatives 2), not four: 400 steps in 434-452 s instead of 591-606
# beside another one-thread job, and on the same 16 candidates per prompt the same top-1: 96.9% for both over the three
# seeds' 800-step transformers, 95.3% for both over two 500-step ones (bench/results/rerank_clip_hard_negatives_cpu.json).
demo-clip:
	$(THREADS_ENV) $(STAGE) clip -- $(PY) train/train_clip.py --data '$(BASE_SHARDS)' --out $(DEMO)/runs/clip \
		--steps $(CLIP_STEPS) --batch_size 64 --lr 1e-3 --warmup_steps 20 --hard_negatives 2 --context_length 16 --seed $(SEED) \
		> $(DEMO)/clip.log 2>&1 \
		|| { tail -n 20 $(DEMO)/clip.log; echo "CLIP training failed: $(DEMO)/clip.log"; exit 1; }

demo-dvae:
	$(THREADS_ENV) $(STAGE) dvae -- $(PY) train/train_dvae.py --data '$(BASE_SHARDS)' --out $(DEMO)/runs/dvae \
		--steps $(DVAE_STEPS) --crop_size 32 --batch_size 32 --lr 3e-3 --warmup_steps 50 --ema_decay 0.99 --sample_every 1000 --num_workers 1 --seed $(SEED) \
		$(DVAE_OPT_FLAGS)

demo-tokens: demo-dvae
	$(THREADS_ENV) $(STAGE) encode -- $(PY) train/encode.py --dvae $(DEMO)/runs/dvae/export --data $(DEMO)/data/shapes --out $(DEMO)/data/tokens \
		--batch_size 64 --num_workers 1

demo-dvae-check: demo-dvae
	$(THREADS_ENV) $(STAGE) dvae_quality -- $(PY) -m bench.dvae_quality --dvae $(DEMO)/runs/dvae/export --synthetic 1024 --grid $(DEMO)/dvae_heldout.png \
		--out $(DEMO)/dvae_quality.json

# the transformer's BPE tokenizer (4 s), on the first core free after the CLIP or the dVAE: off the dVAE's path
demo-tokenizer:
	$(STAGE) tokenizer -- $(PY) train/train_tokenizer.py --data '$(BASE_SHARDS)' --out $(DEMO)/runs/tokenizer --vocab_size 512

# `make demo-seeds [SEEDS="0 1 2"]`: the demo once per training/sampling seed (same data, same held-out prompts), then
# the spread of every figure (bench/demo_spread.py): the noise a recipe change has to beat. ~20 min per seed. Writes
# bench/results/demo_seeds_<OPTIMIZER>_cpu.json (demo_seeds_cpu.json is the AdamW recipe's, from before that name,
# demo_seeds_muon_lr05_cpu.json the Muon recipe's before the transformer's momentum, and demo_seeds_muon_cpu.json, as
# committed, was made while the CLIP trained on four wrong captions per caption).
demo-seeds: setup
	for s in $(SEEDS); do $(MAKE) demo DEMO=outputs/demo_seed$$s SEED=$$s || exit 1; done
	$(PY) -m bench.demo_spread $(foreach s,$(SEEDS),outputs/demo_seed$(s)) --out bench/results/demo_seeds_$(OPTIMIZER)_cpu.json

# The evaluator CLIP of the comparisons: the demo CLIP's architecture, its own seed, trained 2.5x longer (1,000 steps,
# ~16 min on the 2-core CPU) so that it tells a render from a one-attribute-changed render (bench.clip_discrimination:
# bench/results/clip_discrimination_eval_cpu.json); the 150-step CLIP it replaces was not shown to discriminate.
EVAL_CLIP = $(PY) train/train_clip.py --data $(DEMO)/data/shapes --out $(COMPARE)/runs/eval_clip --seed 1 \
	--steps 1000 --batch_size 64 --lr 1e-3 --warmup_steps 20 --hard_negatives 4 --save_every 0

# `make compare`: AR (the demo's dVAE + transformer) versus unCLIP (a tiny prior + decoder trained here on the
# same shards and the same CLIP; the decoder reads the caption and trains with DECODER_OPT_FLAGS, as in the matched
# comparisons) on held-out shapes prompts, scored by a second, independently trained evaluator CLIP. Reuses $(DEMO)
# (runs `make demo` first when it is missing) and an evaluator CLIP already trained in $(COMPARE) (compare-matched
# and compare-scaling share it). docs/compare (the default demo's models): 35 min on a 2-core Zen 3 at 180 GFLOP/s
# after the demo and the evaluator, the decoder's first 13 min beside another job (0.8 s a step alone); ~16 more to
# train the evaluator. With the AdamW decoder without the caption, before: 18 min on a Zen 2 at 150.
# `make compare-scaling OPTIMIZER=adamw DEMO=outputs/demo_adamw BUDGETS=2.2e13,4.4e13,8.8e13` runs on the AdamW recipe
# (the make variables reach the demo it trains first): docs/compare/scaling_adamw.
compare-models: setup
	@test -d $(DEMO)/runs/dalle/export || $(MAKE) demo
	mkdir -p $(COMPARE) && date +%s > $(COMPARE)/.start
	@test -d $(COMPARE)/runs/eval_clip/export || $(EVAL_CLIP)
	$(PY) train/precompute_clip.py --clip $(DEMO)/runs/clip/export --data '$(DEMO)/data/shapes/00000{0..2}.tar' \
		--out $(COMPARE)/data/shapes_clip --num_workers 0
	$(PY) train/train_prior.py --data $(COMPARE)/data/shapes_clip --tokenizer $(DEMO)/runs/tokenizer \
		--out $(COMPARE)/runs/prior --dim 128 --depth 2 --steps 500 --batch_size 64 --lr 1e-3 --warmup_steps 20 \
		--ema_decay 0.99 --save_every 0 --eval_samples 32 --eval_steps 8
	$(PY) train/train_decoder.py --data '$(DEMO)/data/shapes/00000{0..2}.tar' --embeddings $(COMPARE)/data/shapes_clip \
		--out $(COMPARE)/runs/decoder --image_size 32 --channels 32 --channel_mult 1,2,2 --num_res_blocks 1 \
		--attention_resolutions 8 --head_channels 32 --steps 1500 --batch_size 32 --lr 1e-3 --warmup_steps 50 \
		--ema_decay 0.995 --save_every 0 --sample_steps 32 --sample_every 500 \
		--use_caption --tokenizer $(DEMO)/runs/tokenizer $(DECODER_OPT_FLAGS)
	@echo "compare models trained in $$(( $$(date +%s) - $$(cat $(COMPARE)/.start) )) s"

compare: compare-models
	$(PY) sample/compare.py --ar $(DEMO)/runs/dalle/export --unclip-prior $(COMPARE)/runs/prior/export \
		--unclip-decoder $(COMPARE)/runs/decoder/export --clip $(DEMO)/runs/clip/export \
		--eval-clip $(COMPARE)/runs/eval_clip/export --synthetic-prompts 16 --samples-per-prompt 4 --seed 0 \
		--ar-rerank 1,4,16 --ar-temperature 1.0,0.7 --unclip-guidance 1,3 --unclip-steps 16,64 --real-images 256 --out $(COMPARE)/report
	@echo "compare finished in $$(( $$(date +%s) - $$(cat $(COMPARE)/.start) )) s: see $(COMPARE)/report/report.md"

# `make compare-matched [BUDGET=5e13]`: the same comparison at a matched training budget. train/train_matched.py
# --train-budget-flops trains the AR transformer and the unCLIP prior + decoder, on the demo's shapes (20,000 in the
# Muon recipe, 8,000 in the AdamW one: images, and their tokens for AR), for the steps that bring each backend's
# training FLOPs to $(BUDGET): the demo's dVAE counts in AR's, the prior gets 2% of unCLIP's (make compare's split).
# Same model recipes as `make compare` (but the transformer with the demo transformer's optimizer, and the decoder
# reading the caption, with DECODER_OPTIMIZER), and the same evaluation (it then runs sample/compare.py on the
# exports); reuses the demo's dVAE, tokenizer and CLIP and compare-models' evaluator CLIP (trained here when missing:
# +16 min). The default budget is about half the AdamW demo's AR (its dVAE + ~780 transformer steps). Rerunning skips
# finished runs. The two backends train at once, one process each on half the cores: on the default demo's models,
# 24 min (1,466 s) on a 2-core Zen 3 at 180 GFLOP/s after the demo and the evaluator CLIP (the decoder's 1,001 steps
# 18 min after the prior, beside the transformer); at DECODER_MUON_LR=0.02, 21 min (1,254 s) on a Zen 2 at 148-153.
compare-matched: setup
	@test -f $(DEMO)/data/tokens/meta.json || $(MAKE) demo
	mkdir -p $(MATCHED) && date +%s > $(MATCHED)/.start
	@test -d $(COMPARE)/runs/eval_clip/export || $(EVAL_CLIP)
	$(PY) train/train_matched.py --train-budget-flops $(BUDGET) --train-images $(DEMO)/data/shapes \
		--train-tokens $(DEMO)/data/tokens --tokenizer $(DEMO)/runs/tokenizer --dvae $(DEMO)/runs/dvae/export \
		--clip $(DEMO)/runs/clip/export --eval-clip $(COMPARE)/runs/eval_clip/export --synthetic-prompts 16 \
		--samples-per-prompt 4 --seed 0 --ar-rerank 1,4,16 --ar-temperature 1.0,0.7 --unclip-guidance 1,3 \
		--unclip-steps 16,64 --real-images 256 $(COMPARE_AR_ARGS) $(COMPARE_UNCLIP_ARGS) --out $(MATCHED)
	@echo "compare-matched finished in $$(( $$(date +%s) - $$(cat $(MATCHED)/.start) )) s: see $(MATCHED)/report.md"

# `make compare-scaling [BUDGETS=1.5e13,3e13,6e13]`: compare-matched at each budget in $(BUDGETS) (train/compare_scaling.py
# runs train/train_matched.py per budget into $(SCALING)/budget_<B>, all on one CLIP-embedding precompute), then each
# backend's best setting per budget side by side: caption accuracy (all, 1-shape and 2-shape prompts), evaluator CLIP
# score, FD and seconds per image against training FLOPs, and a verdict computed from those numbers, in
# docs/compare/scaling. Same demo models and evaluator CLIP as compare-matched; rerunning skips finished budgets.
# AR and unCLIP train at once, one process each on half the cores: docs/compare/scaling (the default demo's models)
# took 57.5 min on a 2-core Zen 3 at 175-181 GFLOP/s after the demo and the evaluator CLIP (+16 min); the same work
# (DECODER_MUON_LR=0.02) 50 min on a 2-core Zen 2 at 150-152, with the AdamW decoder (DECODER_OPTIMIZER=adamw) 49. At
# BUDGETS=2.2e13,4.4e13,8.8e13 with the AdamW decoder, docs/compare/scaling_to_8.8e13 took 69 min at 152 GFLOP/s, and
# docs/compare/scaling_adamw (the AdamW recipe's) 55 min at 183. AR samples at the demo's temperature (DEMO_TEMPERATURE:
# 0.35 for the Muon transformer, 0.7 for AdamW's): on the committed run's models, 0.35 drew as many right images as 0.7
# or more at every budget and both rerank settings (bench/results/compare_scaling_temperature_cpu.json).
compare-scaling: setup
	@test -f $(DEMO)/data/tokens/meta.json || $(MAKE) demo
	mkdir -p $(SCALING) && date +%s > $(SCALING)/.start
	@test -d $(COMPARE)/runs/eval_clip/export || $(EVAL_CLIP)
	$(PY) train/compare_scaling.py --budgets $(BUDGETS) --train-images $(DEMO)/data/shapes \
		--train-tokens $(DEMO)/data/tokens --tokenizer $(DEMO)/runs/tokenizer --dvae $(DEMO)/runs/dvae/export \
		--clip $(DEMO)/runs/clip/export --eval-clip $(COMPARE)/runs/eval_clip/export --synthetic-prompts 32 \
		--samples-per-prompt 4 --seed 0 --ar-rerank 1,16 --ar-temperature $(DEMO_TEMPERATURE) --ar-top-k 16 --unclip-guidance 1,3 \
		--unclip-steps 16,64 --real-images 256 $(COMPARE_AR_ARGS) $(COMPARE_UNCLIP_ARGS) --out $(SCALING) \
		--report docs/compare/scaling
	@echo "compare-scaling finished in $$(( $$(date +%s) - $$(cat $(SCALING)/.start) )) s: see docs/compare/scaling/report.md"

test: setup-dev
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# `make test-browser`: tests/browser drives the playground in a real headless chromium (Debian's chromium and
# chromium-driver, installed here when missing; selenium is pointed at /usr/bin/chromedriver, nothing is downloaded).
test-browser: setup-dev
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver)
	$(UV_INSTALL) -e '.[test,play,browser]'
	$(PY) -m pytest -q -o addopts=-ra tests/browser

# `make play [HOST=127.0.0.1 PORT=7860]`: serve the playground on the demo's transformer and CLIP (and on the unCLIP
# prior + decoder of `make compare-models` when they are there); prints the URL. Ctrl+C stops it.
play: setup-dev
	@test -d $(DEMO)/runs/dalle/export -a -d $(DEMO)/runs/clip/export || $(MAKE) demo
	$(PY) -m dalle_ar.playground --dalle $(DEMO)/runs/dalle/export --clip $(DEMO)/runs/clip/export \
		$$(test -d $(COMPARE)/runs/prior/export -a -d $(COMPARE)/runs/decoder/export && \
		   echo --prior $(COMPARE)/runs/prior/export --decoder $(COMPARE)/runs/decoder/export) \
		--host $(HOST) --port $(PORT)

bench: setup
	$(PY) -m bench.train_throughput --out bench/results/train_throughput_$$(hostname).json
	$(PY) -m bench.sample_speed --out bench/results/sample_speed_$$(hostname).json
	$(PY) -m bench.dvae_speed --out bench/results/dvae_speed_$$(hostname).json

clean:
	rm -rf outputs
