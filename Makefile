# nanoparallel
#   make train   set up .venv, prepare character-level Shakespeare, train a GPT with the custom DDP
#                (2 CPU processes with gloo, or every GPU of this machine with NCCL), then sample from it;
#                run again, it continues from its last checkpoint (init_from=auto)
#   make test    the whole test suite (pytest; distributed tests run under torchrun, 2 and 4 processes)
#   make bench   tokens/s of single vs DDP pytorch vs DDP custom on the CPU recipe
#   make gpu-check  on a machine with one GPU: the GPU test classes, every strategy's custom/triton/nccl variants,
#                all-reduce bandwidth, GPT-2 124M tokens/s and MFU; one report (out-gpu-check/...), at most 8 minutes.
#                Uses .venv's python if there is one, else the machine's ($(PYTHON)): a GPU machine has its own torch.
# Offline: export SHAKESPEARE_INPUT=/path/to/tinyshakespeare/input.txt (else prepare.py downloads it).

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCHRUN := $(PY) -m torch.distributed.run --standalone
NGPU := $(shell nvidia-smi -L 2>/dev/null | grep -c '^GPU')

ifeq ($(NGPU),0)
TRAIN_ARGS := --nproc_per_node=2 train.py config/train_shakespeare_char_ddp_custom_cpu.py
OUT_DIR := out-shakespeare-char-ddp-custom-cpu
else
TRAIN_ARGS := --nproc_per_node=$(NGPU) train.py config/train_shakespeare_char.py --parallel=ddp --variant=custom \
              --gradient_accumulation_steps=$(NGPU) --out_dir=out-shakespeare-char-ddp
OUT_DIR := out-shakespeare-char-ddp
endif

.PHONY: venv train test bench gpu-check clean

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -r requirements.txt
	touch $@

venv: $(VENV)/.installed

data/shakespeare_char/train.bin: | $(VENV)/.installed
	$(PY) data/shakespeare_char/prepare.py

train: $(VENV)/.installed data/shakespeare_char/train.bin
	$(TORCHRUN) $(TRAIN_ARGS) --init_from=auto
	$(PY) sample.py --out_dir=$(OUT_DIR) --num_samples=1 --max_new_tokens=300

test: $(VENV)/.installed
	$(PY) -m pytest -ra --durations=15 tests

bench: $(VENV)/.installed data/shakespeare_char/train.bin
	$(PY) -m bench.throughput

GPU_CHECK_PY := $(if $(wildcard $(PY)),$(PY),$(PYTHON))

gpu-check:
	@$(GPU_CHECK_PY) -m tools.gpu_check $(GPU_CHECK_ARGS)

clean:
	rm -rf out-* data/*/train.bin data/*/val.bin data/*/meta.pkl
