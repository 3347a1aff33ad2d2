"""What a run writes beside its results: the resolved config, provenance, a rich config tree."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from rich.tree import Tree

PACKAGES = ["torch", "lightning", "hydra-core", "omegaconf", "torchmetrics", "wandb", "cimssm"]


def git_commit(root: Path) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def provenance() -> dict:
    versions = {}
    for pkg in PACKAGES:
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    root = Path(__file__).resolve().parents[3]
    return {
        "git_commit": git_commit(root),
        "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
        "cwd": os.getcwd(),
        "python": sys.version.split()[0],
        "packages": versions,
    }


def write_run_files(cfg: DictConfig, run_dir: Path) -> None:
    """Save the resolved config and provenance; never overwrite an earlier run's files."""
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = run_dir / "config_resolved.yaml"
    if cfg_path.exists():  # a resumed run keeps its first config; the new one goes beside it
        n = 1
        while (run_dir / f"config_resolved.{n}.yaml").exists():
            n += 1
        cfg_path = run_dir / f"config_resolved.{n}.yaml"
    cfg_path.write_text(OmegaConf.to_yaml(cfg, resolve=True))
    prov_path = run_dir / "provenance.json"
    history = json.loads(prov_path.read_text()) if prov_path.exists() else []
    history.append(provenance())
    prov_path.write_text(json.dumps(history, indent=2))


def print_config_tree(cfg: DictConfig, console: Console | None = None) -> None:
    """Print the resolved config as a rich tree, one branch per group."""
    tree = Tree("config", guide_style="dim")
    container = OmegaConf.to_container(cfg, resolve=True)
    for key, value in container.items():
        branch = tree.add(f"[bold]{key}[/bold]")
        if isinstance(value, dict):
            branch.add(OmegaConf.to_yaml(OmegaConf.create(value)).rstrip() or "{}")
        else:
            branch.add(repr(value))
    (console or Console(stderr=False)).print(tree)
