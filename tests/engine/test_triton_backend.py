"""The `triton` backend end to end (kernels under TRITON_INTERPRET=1 on the
CPU): the same greedy tokens and logprobs as the torch backend.  Run in a
subprocess because the interpreter is chosen when the kernels are imported."""

import json
import os
import subprocess
import sys
import textwrap

from ossbatch.engine.tiny_model import preset_config, write_random_checkpoint

SCRIPT = textwrap.dedent(
    """
    import json, sys, torch
    from ossbatch.engine.generate import SamplingParams, generate
    from ossbatch.engine.model import Transformer
    prompts = [[5, 17, 300, 4000, 20, 9, 11, 12, 13, 14, 15, 16], [7, 8, 9], [100] * 6]
    out = {}
    for backend in ("torch", "triton"):
        model = Transformer.from_checkpoint(sys.argv[1], torch.float32, backend=backend)
        completions, _ = generate(model, prompts, [SamplingParams(max_tokens=6)] * 3, [200002], logprobs=True)
        out[backend] = [(c.token_ids, c.logprobs) for c in completions]
    print(json.dumps(out))
    """
)


def test_triton_backend_equals_torch_backend(tmp_path):
    config = preset_config("tiny", num_hidden_layers=2, sliding_window=4)
    path = write_random_checkpoint(tmp_path / "m", config, seed=5)
    env = os.environ | {"TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(path)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for (torch_tokens, torch_lp), (triton_tokens, triton_lp) in zip(result["torch"], result["triton"]):
        assert triton_tokens == torch_tokens
        assert max(abs(a - b) for a, b in zip(torch_lp, triton_lp)) <= 1e-3


def test_ossbatch_run_backend_triton_equals_torch(tiny_model_dir, tmp_path):
    """The command line, under the interpreter it sets up itself when there is no GPU."""
    import pyarrow.parquet as pq

    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps({"id": f"r{i}", "prompt": f"Row {i} " * (i * 7 + 1)}) + "\n" for i in range(3)))
    outputs = {}
    for backend in ("torch", "triton"):
        out = tmp_path / backend
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        proc = subprocess.run(
            [sys.executable, "-m", "ossbatch.flows.cli", "run", "--model", str(tiny_model_dir), "--input", str(inp), "--output", str(out),
             "--orchestrator", "none", "--quiet", "--temperature", "0", "--max-tokens", "5", "--keep-token-ids", "--logprobs",
             "--backend", backend],
            capture_output=True, text=True, env=env, timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-3000:]
        outputs[backend] = {r["id"]: r for r in pq.read_table(sorted((out / "data").glob("*.parquet"))).to_pylist()}
    for row_id, expected in outputs["torch"].items():
        actual = outputs["triton"][row_id]
        assert actual["output_token_ids"] == expected["output_token_ids"]
        assert max(abs(a - b) for a, b in zip(actual["output_logprobs"], expected["output_logprobs"])) <= 1e-3
