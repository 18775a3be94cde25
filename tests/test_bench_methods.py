"""scripts/bench_methods.py at a tiny budget on the micro model: every arm measured, the report written, the cache
consistency of plain RoPE at float noise and transformers' dynamic visibly off."""

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_methods", ROOT / "scripts" / "bench_methods.py")
bm = sys.modules["bench_methods"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bm)


def test_every_arm_at_a_tiny_budget(micro, tmp_path):
    out = tmp_path / "methods"
    assert bm.main(["--model", str(micro), "--lengths", "32,64", "--decode-tokens", "2", "--repeats", "1",
                    "--out", str(out)]) == 0
    doc = json.loads(out.with_suffix(".json").read_text())
    assert list(doc["arms"]) == list(bm.ARMS) and doc["original"] == 64
    for rows in doc["arms"].values():
        assert [r["length"] for r in rows] == [32, 64] and all(r["prefill_tok_s"] > 0 for r in rows)
    c = doc["consistency"]
    assert c["rope"] < 1e-4 < c["hf-dynamic x4"]
    md = out.with_suffix(".md").read_text()
    assert md.count("\n| nbce | ") == 2 and "| consistent_dynamic x4 |" in md
    assert bm.main(["--arms", "rope,nope", "--out", str(out)]) == 2
