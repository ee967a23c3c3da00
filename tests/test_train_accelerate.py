"""End to end: `st-viomni train` under `accelerate launch` with 2 CPU processes (gloo).

The command is the one recipes/README.md gives for GPUs, with a CPU config (tests/distributed/accelerate-2cpu.yaml,
whose comments say why it reads MULTI_GPU); `st-viomni train` itself turns on `use_cpu` for several processes
without an accelerator:

    accelerate launch --config_file tests/distributed/accelerate-2cpu.yaml -m st_viomni.cli train RECIPE

A shrunk tiny-cpu.yaml (28 samples, 1 epoch, 4 per process) keeps it to about 30 s on 2 cores.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import yaml
from sentence_transformers import SentenceTransformer

TESTS = Path(__file__).parent
RECIPES = TESTS.parent / "recipes"
CONFIG = TESTS / "distributed" / "accelerate-2cpu.yaml"
PROBE = TESTS / "distributed" / "gather_probe"  # a sitecustomize.py that logs the loss's gathers per process
PER_DEVICE = 4


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_tiny_recipe_trains_under_accelerate_launch_with_two_cpu_processes(tmp_path):
    recipe = yaml.safe_load((RECIPES / "tiny-cpu.yaml").read_text())
    recipe["data"].update(train=[{"mini": 8, "split": "train"}], eval=[])
    recipe["training"].update(
        output_dir=str(tmp_path / "run"),
        num_train_epochs=1,
        per_device_train_batch_size=PER_DEVICE,
        logging_steps=1,
        save_strategy="no",
        # No use_cpu: with several processes and no accelerator, `st-viomni train` sets it (without it the
        # workers would not run data-parallel on CPU: each would train alone on all the data).
    )
    assert recipe["loss"]["gather_across_devices"] is True
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))

    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable)) or "accelerate"
    command = [accelerate, "launch", "--config_file", str(CONFIG), "--main_process_port", str(_free_port()),
               "-m", "st_viomni.cli", "train", str(path)]
    env = {
        **os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
        "TRANSFORMERS_VERBOSITY": "info",  # the trainer's run summary (examples, global batch)
        "PYTHONPATH": os.pathsep.join([str(PROBE), os.environ.get("PYTHONPATH", "")]),
        "ST_VIOMNI_GATHER_LOG": str(tmp_path / "gathers"),
    }
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]

    # Both processes ran the recipe to the end...
    assert output.count(f"trained model: {tmp_path / 'run' / 'final'}") == 2
    # ...as one data-parallel job: the global batch is 2 x the per-process batch, so an epoch has half the steps
    # one process would need.
    examples = int(re.search(r"Num examples = ([\d,]+)", output).group(1).replace(",", ""))
    assert re.search(r"Total train batch size \(w\. parallel, distributed & accumulation\) = (\d+)", output).group(1) \
        == str(2 * PER_DEVICE)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    steps = [entry["step"] for entry in metrics["log_history"] if "loss" in entry]
    assert examples >= 2 * 2 * PER_DEVICE and steps == list(range(1, examples // (2 * PER_DEVICE) + 1))

    # Cross-device in-batch negatives: at every step each process scored its rows against both processes'
    # rows (gathered over gloo), and the other process's rows are other samples.
    gathers = {}
    for rank in (0, 1):
        log = tmp_path / f"gathers.rank{rank}"
        assert log.is_file(), f"process {rank} never gathered"
        gathers[rank] = [json.loads(line) for line in log.read_text().splitlines()]
    assert len(gathers[0]) == len(gathers[1]) >= len(steps)
    for rank, records in gathers.items():
        for record in records:
            assert record["rank"] == rank and record["backend"] == "gloo"
            assert record["torch_world_size"] == record["accelerate_num_processes"] == 2
            assert record["accelerate_distributed_type"] == "DistributedType.MULTI_CPU"
            assert record["rows"] == PER_DEVICE and record["gathered_rows"] == 2 * PER_DEVICE
            assert record["own_rows_in_place"] and record["other_rows_differ"]

    final = tmp_path / "run" / "final"
    assert (final / "model.safetensors").is_file() and not list(final.rglob("*.bin"))
    model = SentenceTransformer(str(final))
    assert type(model) is SentenceTransformer and model.encode(["xin chào"], prompt_name="text_pair").shape == (1, 64)
