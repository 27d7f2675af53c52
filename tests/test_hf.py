"""
GPT-2 weights from and to Hugging Face (tools/hf.py), through train.py's real loading path, offline.

    torchrun --standalone --nproc_per_node=2 -m unittest tests/test_hf.py      (or 4; pytest launches both)

Nothing is downloaded: a small random GPT-2 is built with transformers (GPT2Config, every tensor perturbed so that
biases and norms are not their trivial init) and saved with save_pretrained into a temporary directory, which
train.py loads with --init_from=DIR (the ddp/custom run also profiles: a trace per rank). A step at learning rate 0
leaves the weights as loaded, so the checkpoint train.py writes must hold them: its logits equal transformers'
within 1e-5, and so do those of the Hugging Face directory `python -m tools.hf` exports from it (both ways), for single
(here), ddp, fsdp, tp, pp (2 processes, both variants) and 3d (4 processes: dp2·tp2 and pp2·tp2, both variants). The
eval loss train.py logs at step 0, computed by the sharded forward, equals transformers' on the same batch.
Vocabulary 97: TP splits it unevenly (49 + 48); block_size 16 of the model's 32 positions (cropped).
"""

import json
import os
import pickle
import shutil
import subprocess
import sys
import tempfile

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # before transformers is imported: never try the network

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

from tools import hf
import train
from model import GPT, GPTConfig
from parallel.checkpoint import load_checkpoint_file, resolve
from tests.distributed import REPO, DistributedTestCase, torchrun_launcher

VOCAB, POSITIONS, BLOCK = 97, 32, 16
TOLERANCE = 1e-5
PROFILE = dict(profile=True, profile_start=0, profile_steps=1)  # one run also checks tools/profiling.py on 2 ranks
CASES = {  # world size -> [(name, train.py overrides)]
    2: [(f"{s}/{v}", dict(parallel=s, variant=v, **extra, **(PROFILE if (s, v) == ("ddp", "custom") else {})))
        for s, extra in (("ddp", {}), ("fsdp", {}), ("tp", dict(sequence_parallel=True, loss_parallel=True)),
                         ("pp", {}))
        for v in ("pytorch", "custom")],
    4: [(f"3d/{v} dp{dp}·pp{pp}·tp{tp}", dict(parallel="3d", variant=v, dp_size=dp, pp_size=pp, tp_size=tp,
                                               sequence_parallel=True, loss_parallel=True))
        for v in ("pytorch", "custom") for dp, pp, tp in ((2, 1, 2), (1, 2, 2))],
}


def make_hf_model(path, vocab_size=VOCAB, n_positions=POSITIONS, seed=0, **options):
    """A random GPT2LMHeadModel (4 layers, 4 heads, 32 dim; GPT-2's tanh GELU unless options say otherwise) with
    every tensor perturbed (non-zero biases, norms not 1), saved to `path` with save_pretrained."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    special = 50256 if vocab_size > 50256 else None  # GPT-2's <|endoftext|>, if the vocabulary has it
    model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_positions=n_positions, n_embd=32, n_layer=4,
                                       n_head=4, bos_token_id=special, eos_token_id=special, **options))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(path)
    return path


def hf_logits(path, x):
    """transformers' logits (B, T, V) of the model at `path` on token ids x (B, T), in eval mode."""
    from transformers import GPT2LMHeadModel
    with torch.no_grad():
        return GPT2LMHeadModel.from_pretrained(path).eval()(x).logits


def our_logits(ckpt_path, x):
    """Logits (B, T, V) of model.py's GPT holding a checkpoint train.py wrote (single file or sharded)."""
    ckpt = load_checkpoint_file(ckpt_path)
    model = GPT(GPTConfig(**ckpt["model_args"]))
    state = dict(ckpt["model"])
    state.setdefault("lm_head.weight", state["transformer.wte.weight"])
    model.load_state_dict(state)
    with torch.no_grad():
        return model.eval()(x, x)[0]


def make_data(path, vocab_size=VOCAB, n=4000):
    """train.bin / val.bin of random tokens and a meta.pkl naming the vocabulary."""
    os.makedirs(path, exist_ok=True)
    rng = np.random.default_rng(0)
    for split in ("train", "val"):
        rng.integers(0, vocab_size, n, dtype=np.uint16).tofile(os.path.join(path, f"{split}.bin"))
    with open(os.path.join(path, "meta.pkl"), "wb") as f:
        pickle.dump({"vocab_size": vocab_size}, f)
    return path


def train_args(model_dir, data_dir, out_dir, **overrides):
    """train.py's command line for one step at learning rate 0 from `model_dir`, with an eval before and after."""
    cfg = {**dict(init_from=model_dir, data_dir=data_dir, dataset="random", out_dir=out_dir, max_iters=1,
                  eval_interval=1, eval_iters=1, learning_rate=0.0, decay_lr=False, block_size=BLOCK, batch_size=2,
                  gradient_accumulation_steps=2, dtype="float32", compile=False, timeout_s=120), **overrides}
    return [f"--{k}={v}" for k, v in cfg.items()]


def eval_batch(data_dir, rows):
    """x, y of train.py's first val eval batch over all data-parallel ranks: `rows` = dp size x eval batch size
    sequences at the offsets its get_batch draws for (seed 1337, split val, eval, step 0)."""
    data = np.memmap(os.path.join(data_dir, "val.bin"), dtype=np.uint16, mode="r")
    offsets = np.random.default_rng([1337, 1, 1, 0]).integers(0, len(data) - BLOCK, size=rows)
    seqs = torch.from_numpy(np.stack([data[i:i + BLOCK + 1] for i in offsets]).astype(np.int64))
    return seqs[:, :-1], seqs[:, 1:]


def check_run(testcase, model_dir, data_dir, out_dir, name, dp_rows):
    """The checks of the module docstring on the run train.py just wrote to out_dir."""
    x = torch.randint(0, VOCAB, (3, BLOCK), generator=torch.Generator().manual_seed(1))
    ref = hf_logits(model_dir, x)
    path = resolve(out_dir)  # the newest complete checkpoint: step_<iter>/ckpt.pt, or its DCP directory ckpt
    testcase.assertLess((our_logits(path, x) - ref).abs().max().item(), TOLERANCE, f"{name}: loaded")
    exported = hf.export_checkpoint(path, os.path.join(out_dir, "hf"))
    testcase.assertEqual((exported.vocab_size, exported.block_size), (VOCAB, BLOCK))
    testcase.assertLess((hf_logits(os.path.join(out_dir, "hf"), x) - ref).abs().max().item(), TOLERANCE,
                        f"{name}: exported")
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        logged = [json.loads(line) for line in f]
    val0 = next(r["val/loss"] for r in logged if r["iter"] == 0 and "val/loss" in r)
    xv, yv = eval_batch(data_dir, dp_rows)
    ref_loss = F.cross_entropy(hf_logits(model_dir, xv).reshape(-1, VOCAB), yv.reshape(-1)).item()
    testcase.assertLess(abs(val0 - ref_loss), TOLERANCE, f"{name}: eval loss {val0} vs transformers' {ref_loss}")


# ----------------------------------------------------------------------------------------------------------
# without a process group

@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory):
    d = tmp_path_factory.mktemp("hf")
    return make_hf_model(str(d / "model")), make_data(str(d / "data"))


def test_conversion_both_ways_is_exact():
    """from_hf then to_hf gives back every tensor of transformers' state_dict bitwise, the fused c_attn included."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=POSITIONS, n_embd=32, n_layer=2, n_head=4))
    config = hf.config_from_hf(model.config)
    ours = hf.from_hf(model.state_dict(), config)
    assert set(ours) == set(GPT(config).state_dict())
    back = hf.to_hf(ours, config)
    assert back.keys() == model.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())


def test_single_train_py_loads_and_exports(model_and_data, tmp_path):
    """single: train.py --init_from=DIR, then the export command `python -m tools.hf OUT_DIR HF_DIR` (its main)."""
    model_dir, data_dir = model_and_data
    out = str(tmp_path / "out")
    assert train.main(train_args(model_dir, data_dir, out, gradient_accumulation_steps=1)) == 0
    x = torch.randint(0, VOCAB, (3, BLOCK), generator=torch.Generator().manual_seed(1))
    ref = hf_logits(model_dir, x)
    assert (our_logits(resolve(out), x) - ref).abs().max().item() < TOLERANCE
    hf.main([out, str(tmp_path / "exported")])  # the export command, `python -m tools.hf OUT_DIR HF_DIR`
    assert (hf_logits(str(tmp_path / "exported"), x) - ref).abs().max().item() < TOLERANCE
    with open(os.path.join(out, "metrics.jsonl")) as f:
        val0 = next(r["val/loss"] for r in map(json.loads, f) if r["iter"] == 0 and "val/loss" in r)
    xv, yv = eval_batch(data_dir, 2)
    assert abs(val0 - F.cross_entropy(hf_logits(model_dir, xv).reshape(-1, VOCAB), yv.reshape(-1)).item()) < TOLERANCE


def test_gpt2_names_without_cache_are_one_line_errors(model_and_data, tmp_path):
    """init_from=gpt2 with an empty Hugging Face cache, offline: train.py exits with one line naming the cause."""
    model_dir, data_dir = model_and_data
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "empty-cache")}
    cmd = [sys.executable, "train.py", *train_args("gpt2", data_dir, str(tmp_path / "out"))]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "init_from='gpt2': not in the Hugging Face cache" in errors[0], result.stderr


def test_what_does_not_convert_is_a_one_line_error(model_and_data, tmp_path):
    """Options model.py lacks, more positions than the model has, and data of another vocabulary: ValueError."""
    model_dir, data_dir = model_and_data
    odd = make_hf_model(str(tmp_path / "odd"), scale_attn_by_inverse_layer_idx=True)
    cases = [(lambda: hf.load_pretrained(odd), "scale_attn_by_inverse_layer_idx"),
             (lambda: hf.load_pretrained(model_dir, block_size=POSITIONS + 1), "exceeds"),
             (lambda: train.check_data_vocab(make_data(str(tmp_path / "d65"), 65), VOCAB), "describes 65")]
    for load, words in cases:
        with pytest.raises(ValueError) as e:
            load()
        assert words in str(e.value) and "\n" not in str(e.value)


def test_sample_py_with_gpt2_weights_matches_transformers(tmp_path, tiktoken_cache, monkeypatch, capsys):
    """sample.py --init_from=DIR (GPT-2's 50257 tokens, its BPE through tiktoken) with top_k=1 continues a prompt
    with exactly transformers' greedy tokens."""
    import tiktoken
    from transformers import GPT2LMHeadModel
    import sample
    model_dir = make_hf_model(str(tmp_path / "bpe"), vocab_size=50257)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", tiktoken_cache)
    enc = tiktoken.get_encoding("gpt2")
    prompt = "Hello, I'm a language model,"
    with torch.no_grad():
        hf_model = GPT2LMHeadModel.from_pretrained(model_dir).eval()
        out = hf_model.generate(torch.tensor([enc.encode(prompt)]), max_new_tokens=8, do_sample=False,
                                pad_token_id=50256)
    capsys.readouterr()
    sample.main([f"--init_from={model_dir}", f"--start={prompt}", "--num_samples=1", "--max_new_tokens=8", "--top_k=1",
                 "--device=cpu", "--dtype=float32"])
    assert capsys.readouterr().out.split("\n---------------")[0] == enc.decode(out[0].tolist())


# ----------------------------------------------------------------------------------------------------------
# under torchrun

class TestHFEveryStrategy(DistributedTestCase):

    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        root = [tempfile.mkdtemp(prefix="test_hf_") if cls.rank == 0 else None]
        dist.broadcast_object_list(root, src=0)
        cls.root = root[0]
        if cls.rank == 0:
            make_hf_model(os.path.join(cls.root, "model"))
            make_data(os.path.join(cls.root, "data"))
        dist.barrier()

    @classmethod
    def tearDownClass(cls):
        dist.barrier()
        if cls.rank == 0:
            shutil.rmtree(cls.root, ignore_errors=True)

    def test_train_py_loads_and_exports(self):
        """For every strategy and variant at this world size: train.py --init_from=DIR, one step at lr 0, and the
        checks of the module docstring (on rank 0; every rank must pass)."""
        cases = CASES.get(self.world_size, [])
        self.assertTrue(cases)
        model_dir, data_dir = os.path.join(self.root, "model"), os.path.join(self.root, "data")
        for name, overrides in cases:
            with self.subTest(case=name):
                out = os.path.join(self.root, name.replace("/", "-").replace(" ", "-"))
                self.assertEqual(train.main(train_args(model_dir, data_dir, out, **overrides)), 0)
                if self.rank == 0:
                    dp = {"ddp": 2, "fsdp": 2, "tp": 1, "pp": 1}.get(overrides["parallel"], overrides.get("dp_size"))
                    check_run(self, model_dir, data_dir, out, name, dp * 2)
                    if overrides.get("profile"):  # a trace per rank, the peak memory of every rank in each record
                        for r in range(self.world_size):
                            with open(os.path.join(out, "profile", f"rank{r}.json")) as f:
                                self.assertIn("ProfilerStep#0", {e.get("name") for e in json.load(f)["traceEvents"]})
                        with open(os.path.join(out, "metrics.jsonl")) as f:
                            peaks = [r["peak_mem_mib"] for r in map(json.loads, f) if "peak_mem_mib" in r]
                        self.assertTrue(peaks and all(len(p) == self.world_size for p in peaks), peaks)
                dist.barrier()


test_torchrun = torchrun_launcher(__file__, nprocs=(2, 4), timeout_s=400)
