"""scripts/gpu-smoke.sh without a GPU: the script parses, and its dry run validates the configs and starts nothing."""

from __future__ import annotations

import json
import subprocess
import sys

from configs.schema import REPO_ROOT


def test_gpu_smoke_script_parses():
    assert subprocess.run(["bash", "-n", str(REPO_ROOT / "scripts" / "gpu-smoke.sh")]).returncode == 0


def test_gpu_smoke_dry_run_validates_the_configs(tmp_path):
    proc = subprocess.run([sys.executable, "scripts/gpu_smoke.py", "--dry-run", "--out", str(tmp_path / "smoke"),
                           "--results", str(tmp_path / "gpu.json")], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["dry_run"] is True and report["validate_exit"] == 0 and len(report["config_hash"]) == 16
    assert not (tmp_path / "gpu.json").exists(), "a dry run writes no figures"


def test_gpu_smoke_refuses_a_config_that_would_not_use_the_gpu(tmp_path):
    import yaml

    broken = yaml.safe_load((REPO_ROOT / "configs" / "gpu-smoke.yaml").read_text())
    broken["train"]["use_gpu"] = False
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(broken))
    proc = subprocess.run([sys.executable, "-c", (
        "import sys, pathlib; sys.path.insert(0, 'scripts'); import gpu_smoke; "
        f"gpu_smoke.CONFIG = pathlib.Path({str(bad)!r}); "
        f"sys.argv = ['gpu_smoke.py', '--dry-run', '--out', {str(tmp_path / 'o')!r}]; gpu_smoke.main()")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "use_gpu" in proc.stderr


def test_gpu_smoke_trains_with_fsdp_and_bf16_mixed(tmp_path):
    """The smoke's train stage is the sharded, mixed-precision path (issue 34); a config that drops it is refused."""
    import yaml

    from configs.schema import parse_config

    raw = yaml.safe_load((REPO_ROOT / "configs" / "gpu-smoke.yaml").read_text())
    train = parse_config(raw, check_paths=False).train
    assert (train.strategy, train.precision) == ("fsdp", "bf16-mixed")
    raw["train"]["strategy"] = "ddp"
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(raw))
    proc = subprocess.run([sys.executable, "-c", (
        "import sys, pathlib; sys.path.insert(0, 'scripts'); import gpu_smoke; "
        f"gpu_smoke.CONFIG = pathlib.Path({str(bad)!r}); "
        f"sys.argv = ['gpu_smoke.py', '--dry-run', '--out', {str(tmp_path / 'o')!r}]; gpu_smoke.main()")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "train.strategy fsdp and train.precision bf16-mixed" in proc.stderr
