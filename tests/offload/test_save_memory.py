"""Host memory while the final model is saved from the offload tiers: the streamed save (one block read at a time)
stays within ~2 blocks + the modules outside the blocks + a little overhead above the RSS before it; today's
path (every block back into the model, then save_pretrained) needs all the blocks at once and exceeds that.

Measured in a fresh process (its allocator is this test's alone): the peak RSS (VmHWM of /proc/self/status,
reset through /proc/self/clear_refs before each phase) against the RSS just before (psutil)."""

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

_ROOT = Path(__file__).resolve().parents[2]
_CHILD = textwrap.dedent("""
    import json, sys, psutil, torch
    from pathlib import Path
    from transformers import AutoConfig, AutoModelForCausalLM
    from lowmem.model_save import save_atomically, save_streamed
    from lowmem.models import save_pretrained
    from lowmem.offload.firstorder import FirstOrderEngine
    from lowmem.optim import create_optimizer
    from tests.conftest import _char_tokenizer

    def hwm():
        line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM"))
        return int(line.split()[1]) * 1024

    def peak_above_rss(save):
        before = psutil.Process().memory_info().rss
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # the peak RSS starts again from the current RSS
        save()
        return hwm() - before

    out = Path(sys.argv[1])
    cfg = AutoConfig.for_model("llama", hidden_size=512, intermediate_size=2048, num_hidden_layers=8,
                               num_attention_heads=8, num_key_value_heads=8, vocab_size=128)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg)
    block = sum(p.numel() * 4 for p in model.model.layers[0].parameters())
    outside = sum(p.numel() * 4 for n, p in model.named_parameters() if ".layers." not in n)
    eng = FirstOrderEngine(model, create_optimizer(model, "adamw", lr=1e-3),
                           dict(nvme_dir=str(out / "nvme"), host_memory_budget_gb=0.0), device="cpu")
    tok = _char_tokenizer(bos=True)
    streamed = peak_above_rss(lambda: save_atomically(out / "streamed", lambda d: save_streamed(
        model, tok, d, eng.export_parts())))

    def old():
        eng.close()
        save_atomically(out / "memory", lambda d: save_pretrained(model, tok, d))
    print(json.dumps({"block": block, "outside": outside, "blocks": 8, "streamed": streamed,
                      "old": peak_above_rss(old)}))
""")


def test_streamed_save_holds_about_one_block(tmp_path):
    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("needs Linux's /proc/self/clear_refs to reset the peak RSS")
    done = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path)], cwd=_ROOT, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    budget = 2 * got["block"] + got["outside"] + 16 * 2**20  # 16 MiB: allocator and safetensors overhead
    assert got["streamed"] < budget, got
    assert got["old"] > budget and got["old"] > got["blocks"] * got["block"], got
