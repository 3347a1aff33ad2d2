"""Sweeps: failing jobs are recorded, summaries and plots, eval over a sweep dir, W&B groups, launchers."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import CONF, DATA_TINY, TINY, run_cli
from hydra import compose, initialize_config_dir

from cimssm.config.validate import ConfigError
from cimssm.sweeps import load_sweep, plot_metric_vs_ace, plot_metric_vs_noise, write_sweep_summary
from cimssm.sweeps.checkpoints import expand_sweep_dir
from cimssm.sweeps.collect import aggregate_seeds, independent_axes

TINY_RUN = ["model=s4d_tiny", "data=selective_copy", *TINY, *DATA_TINY["selective_copy"], "threads=1"]
NOISE = ["noise=gauss_1pct", "noise.chips=2", "noise.eval_levels=[0.0,0.02]"]


# ------------------------------------------------------------------------ a real tiny multirun
@pytest.fixture(scope="module")
def multirun(tmp_path_factory):
    """Two seeds x d_model in {16, -3}: the -3 jobs compose but fail validation inside the job."""
    sweep = tmp_path_factory.mktemp("sweeps") / "sweep"
    proc = run_cli(
        [
            "train.py",
            "-m",
            *TINY_RUN,
            *NOISE,
            "logger=[csv,wandb]",
            "model.d_model=16,-3",
            "seed=1,2",
            f"hydra.sweep.dir={sweep}",
        ],
        timeout=300,
    )
    return sweep, proc


def test_multirun_goes_on_past_a_failing_job(multirun):
    sweep, proc = multirun
    assert proc.returncode == 0, proc.stderr[-3000:]
    overrides = {
        d.name: yaml.safe_load((d / ".hydra" / "overrides.yaml").read_text())
        for d in sweep.iterdir()
        if (d / ".hydra").is_dir()
    }
    failed = {name for name, ov in overrides.items() if "model.d_model=-3" in ov}
    assert len(overrides) == 4 and len(failed) == 2
    for name in failed:
        record = json.loads((sweep / name / "FAILED.json").read_text())
        assert record["error"] == "ConfigError: model.d_model=-3 is not allowed: must be > 0"
        assert "model.d_model=-3" in record["overrides"]
    for name in set(overrides) - failed:
        assert (sweep / name / "DONE").is_file() and not (sweep / name / "FAILED.json").exists()


def test_multirun_summary_has_every_job(multirun):
    sweep, _ = multirun
    df = pd.read_csv(sweep / "sweep_summary.csv")
    jobs = df.drop_duplicates("job").set_index("job")
    assert sorted(jobs["status"]) == ["failed", "failed", "ok", "ok"]
    ok = df[df["status"] == "ok"]
    assert len(ok) == 2 * 2  # two finished jobs x two noise levels
    assert set(ok["level"]) == {0.0, 0.02} and (ok["chips"] == 2).all()
    assert ok["ppl_mean"].notna().all() and ok["noise/acc@0.02_mean"].notna().all()
    assert set(ok["seed"]) == {1, 2} and (ok["model.d_model"] == 16).all()
    assert jobs.loc[jobs["status"] == "failed", "error"].str.contains("model.d_model=-3").all()
    seeds = pd.read_csv(sweep / "sweep_summary_seeds.csv")  # finished jobs only: one point per level
    assert list(seeds["level"]) == [0.0, 0.02] and (seeds["n_seeds"] == 2).all()
    per_seed = ok[ok["level"] == 0.02]["ppl_mean"]
    assert seeds["ppl_mean_seed_mean"].iloc[1] == pytest.approx(per_seed.mean())
    assert seeds["ppl_mean_seed_std"].iloc[1] == pytest.approx(per_seed.std(ddof=1))
    md = (sweep / "sweep_summary.md").read_text()
    assert "## Failed jobs" in md and "## Across seeds" in md
    for name in ("sweep_ppl_vs_noise", "sweep_ppl_vs_ace"):
        for ext in (".png", ".svg"):
            assert (sweep / f"{name}{ext}").stat().st_size > 1000


def _wandb_records(path: Path):
    """Records of a W&B transaction log (.wandb): 7-byte header, then LevelDB-log blocks of 32 KiB."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, buf = path.read_bytes(), 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            break
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record


def test_wandb_offline_run_per_job_in_the_sweep_group(multirun):
    sweep, _ = multirun
    runs = sorted(sweep.glob("*/wandb/offline-run-*/run-*.wandb"))
    assert len(runs) == 2  # the two jobs that got past validation
    names = set()
    for path in runs:
        run = next(r.run for r in _wandb_records(path) if r.WhichOneof("record_type") == "run")
        assert run.run_group == f"default-{sweep.name}"
        assert run.job_type == "train"
        assert "model=s4d" in run.tags and "noise=gauss_1pct" in run.tags
        names.add(run.display_name)
        job = path.parents[2]
        assert (job / ".hydra").is_dir()
        media = path.parent / "files" / "media"
        assert list(media.glob("images/noise/*.png")) and list(media.glob("table/noise/*.table.json"))
    # Named after the swept keys only (fixed overrides are in the config).
    assert {n.split(":", 1)[1] for n in names} == {"model.d_model=16,seed=1", "model.d_model=16,seed=2"}


def test_eval_multirun_over_a_sweep_dir_reproduces_training_noise_eval(multirun, tmp_path):
    sweep, _ = multirun
    out = tmp_path / "eval_sweep"
    proc = run_cli(
        [
            "eval.py",
            "-m",
            f"sweep_dir={sweep}",
            "noise=gauss_1pct",
            "noise.chips=2",
            "noise.eval_levels=[0.0,0.02]",
            "limit_batches=2",
            f"hydra.sweep.dir={out}",
        ],
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    evals = load_sweep(out)
    assert (evals["status"] == "ok").all() and evals["job"].nunique() == 2
    assert set(evals["seed"]) == {1, 2}  # labelled with the training jobs' axes
    train = load_sweep(sweep)
    train = train[train["status"] == "ok"]
    key = ["seed", "level"]
    merged = evals.merge(train, on=key, suffixes=("_eval", "_train"))
    assert len(merged) == 4
    # Same checkpoint, seed and chips: the same numbers as the after-fit evaluation.
    assert (merged["ppl_mean_eval"] - merged["ppl_mean_train"]).abs().max() < 1e-6


# ------------------------------------------------------------------------------ synthetic sweeps
LEVELS = [0.0, 0.01, 0.02]


def _acc(quant: str, seed: int, level: float, chip: int) -> float:
    base = {"fp32": 0.9, "w4a8": 0.8}[quant] + 0.01 * seed
    return base - (2.0 if quant == "fp32" else 1.0) * level - 0.001 * chip


def make_job(root: Path, num: int, quant: str | None, seed: int, status: str = "ok") -> Path:
    job = root / str(num)
    (job / ".hydra").mkdir(parents=True)
    overrides = [f"quant={quant}", f"seed={seed}"] if quant else ["model.d_model=-3", f"seed={seed}"]
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if status == "failed":
        (job / "FAILED.json").write_text(
            json.dumps({"error": "ConfigError: model.d_model=-3 is not allowed"})
        )
        return job
    bits = None if quant == "fp32" else 4
    cfg = {
        "experiment_name": "synthetic",
        "seed": seed,
        "model": {"name": "s4d"},
        "data": {"name": "smnist"},
        "quant": {
            "name": quant,
            "mode": "qat",
            "weight_bits": bits,
            "act_bits": bits and 8,
            "ssm_bits": None,
        },
        "noise": {"name": "gauss_1pct", "train": False},
    }
    (job / "config_resolved.yaml").write_text(yaml.safe_dump(cfg))
    if status == "incomplete":
        return job
    (job / "metrics_final.json").write_text(
        json.dumps({"test/acc": _acc(quant, seed, 0.0, 0), "test/loss": 0.5})
    )
    ace = 1.0e6 if quant == "fp32" else 1.0e5
    (job / "cost.json").write_text(
        json.dumps({"total": {"ace": ace, "params": 100}, "ratio_vs_fp32": {"ace": ace / 1.0e6}})
    )
    rows = [
        {
            "profile": "gauss_1pct",
            "kind": "gaussian",
            "level": lv,
            "t_inference": 0.0,
            "chip": c,
            "seed": 7,
            "status": "ok",
            "replicated": False,
            "loss": 0.5,
            "acc": _acc(quant, seed, lv, c),
        }
        for lv in LEVELS
        for c in range(3)
    ]
    pd.DataFrame(rows).to_csv(job / "noise_eval.csv", index=False)
    (job / "DONE").write_text("finished\n")
    return job


@pytest.fixture
def synthetic_sweep(tmp_path):
    root = tmp_path / "sweep"
    num = 0
    for quant in ("fp32", "w4a8"):
        for seed in (1, 2):
            make_job(root, num, quant, seed)
            num += 1
    make_job(root, num, None, 3, status="failed")
    make_job(root, num + 1, "w4a8", 3, status="incomplete")
    return root


def test_load_sweep_means_and_stds_over_chips(synthetic_sweep):
    df = load_sweep(synthetic_sweep)
    assert df["job"].nunique() == 6
    statuses = df.drop_duplicates("job").set_index("job")["status"].to_dict()
    assert statuses == {"0": "ok", "1": "ok", "2": "ok", "3": "ok", "4": "failed", "5": "incomplete"}
    row = df[(df["job"] == "2") & (df["level"] == 0.01)].iloc[0]
    chips = [_acc("w4a8", 1, 0.01, c) for c in range(3)]
    mean = sum(chips) / 3
    assert row["quant"] == "w4a8" and row["seed"] == 1 and row["chips"] == 3
    assert row["acc_mean"] == pytest.approx(mean)
    assert row["acc_std"] == pytest.approx(math.sqrt(sum((a - mean) ** 2 for a in chips) / 2))
    assert row["cost/ace"] == 1.0e5 and row["cost/ace_ratio_vs_fp32"] == pytest.approx(0.1)
    assert independent_axes(df) == ["quant"]  # weight bits follow quant; seeds are not an axis


def test_aggregate_seeds_mean_and_std_across_seeds(synthetic_sweep):
    seeds = aggregate_seeds(load_sweep(synthetic_sweep))
    row = seeds[(seeds["quant"] == "fp32") & (seeds["level"] == 0.02)].iloc[0]
    per_seed = [sum(_acc("fp32", s, 0.02, c) for c in range(3)) / 3 for s in (1, 2)]
    assert row["n_seeds"] == 2
    assert row["acc_mean_seed_mean"] == pytest.approx(sum(per_seed) / 2)
    assert row["acc_mean_seed_std"] == pytest.approx(abs(per_seed[0] - per_seed[1]) / math.sqrt(2))


def test_summarize_script_writes_table_markdown_and_plots(synthetic_sweep):
    proc = run_cli(["scripts/summarize_sweep.py", str(synthetic_sweep)], timeout=120)
    assert proc.returncode == 0, proc.stderr
    table = pd.read_csv(synthetic_sweep / "sweep_summary.csv")
    assert len(table) == 4 * len(LEVELS) + 2  # finished jobs x levels, plus the failed and the incomplete job
    md = (synthetic_sweep / "sweep_summary.md").read_text()
    assert md.strip() == proc.stdout.strip()
    assert "6 jobs: 1 failed, 1 incomplete, 4 ok." in md
    fp32_seed1 = f"| 0 | ok | fp32 | 1 | {_acc('fp32', 1, 0.0, 0):.4g} | 1e+06 |"
    assert fp32_seed1 in md
    assert "| 4 | ConfigError: model.d_model=-3 is not allowed |" in md
    assert "## Across seeds" in md and "| fp32 | 2 |" in md
    for name in ("sweep_acc_vs_noise", "sweep_acc_vs_ace"):
        png = synthetic_sweep / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
        assert "<svg" in (synthetic_sweep / f"{name}.svg").read_text()[:2000]


def test_summarize_script_refuses_a_missing_dir(tmp_path):
    proc = run_cli(["scripts/summarize_sweep.py", str(tmp_path / "nope")], timeout=60)
    assert proc.returncode == 2 and "is not a directory" in proc.stderr


def test_plot_functions_draw_one_line_per_axis_value(synthetic_sweep, tmp_path):
    df = load_sweep(synthetic_sweep)
    fig = plot_metric_vs_noise(df, "acc", path=tmp_path / "noise")
    (ax,) = fig.axes
    assert sorted(line.get_label() for line in ax.get_lines()) == ["quant=fp32", "quant=w4a8"]
    fp32 = next(line for line in ax.get_lines() if line.get_label() == "quant=fp32")
    # Seeds averaged: at 2 % the mean over seeds of the chip means.
    expected = sum(sum(_acc("fp32", s, 0.02, c) for c in range(3)) / 3 for s in (1, 2)) / 2
    assert list(fp32.get_xdata()) == [0.0, 1.0, 2.0] and fp32.get_ydata()[-1] == pytest.approx(expected)
    assert (tmp_path / "noise.png").stat().st_size > 0 and (tmp_path / "noise.svg").stat().st_size > 0
    fig = plot_metric_vs_ace(df, hue="quant")
    assert fig.axes[0].get_xscale() == "log" and len(fig.axes[0].containers) == 2


def test_load_sweep_of_an_empty_or_missing_dir(tmp_path):
    assert load_sweep(tmp_path).empty
    with pytest.raises(FileNotFoundError):
        load_sweep(tmp_path / "missing")


# --------------------------------------------------------------------- eval over a sweep dir
def _fake_checkpoints(root: Path) -> list[Path]:
    out = []
    for num, name in ((0, "best-4.ckpt"), (1, "best-step=8.ckpt")):
        job = root / str(num)
        (job / "checkpoints").mkdir(parents=True)
        (job / ".hydra").mkdir()
        (job / ".hydra" / "overrides.yaml").write_text("- seed=1\n")
        (job / "checkpoints" / "last.ckpt").write_bytes(b"x")
        (job / "checkpoints" / name).write_bytes(b"x")
        out.append(job / "checkpoints" / name)
    failed = root / "2"
    (failed / "checkpoints").mkdir(parents=True)
    (failed / "checkpoints" / "last.ckpt").write_bytes(b"x")
    (failed / "FAILED.json").write_text("{}")
    return out


def test_expand_sweep_dir_lists_each_finished_jobs_checkpoint(tmp_path):
    best = _fake_checkpoints(tmp_path)
    argv = expand_sweep_dir(["eval.py", "-m", f"sweep_dir={tmp_path}", "noise=pcm"])
    assert argv[:3] == ["eval.py", "-m", "noise=pcm"]
    assert argv[3] == "ckpt_path=" + ",".join(f"'{p}'" for p in best)
    last = expand_sweep_dir(["eval.py", "-m", f"sweep_dir={tmp_path}", "sweep_ckpt=last"])
    assert last[-1].count("last.ckpt") == 2
    from hydra.core.override_parser.overrides_parser import OverridesParser

    (override,) = OverridesParser.create().parse_overrides([argv[3]])
    assert [v.text for v in override.value().list] == [str(p) for p in best]


@pytest.mark.parametrize(
    "args,needle",
    [
        (["-m", "sweep_dir={root}/missing"], "no such directory"),
        (["sweep_dir={root}"], "holds 2 checkpoints: add -m"),
        (["-m", "sweep_dir={root}", "ckpt_path=x.ckpt"], "either sweep_dir or ckpt_path"),
        (["-m", "sweep_dir={root}", "sweep_ckpt=worst"], "sweep_ckpt='worst' is not allowed"),
        (["-m", "sweep_dir={root}/0/.hydra"], "holds no checkpoints"),
    ],
)
def test_expand_sweep_dir_errors_are_one_line(tmp_path, args, needle):
    _fake_checkpoints(tmp_path)
    with pytest.raises(ConfigError, match=needle):
        expand_sweep_dir(["eval.py", *[a.format(root=tmp_path) for a in args]])


def test_eval_cli_sweep_dir_error_exits_2(tmp_path):
    proc = run_cli(["eval.py", "-m", f"sweep_dir={tmp_path / 'missing'}"], timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"config error: sweep_dir={tmp_path / 'missing'}: no such directory; give a multirun dir of train.py"
    ]


# --------------------------------------------------------------------------- launcher configs
def _hydra_cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("train", overrides=overrides, return_hydra_config=True)


@pytest.mark.parametrize(
    "launcher,target,threads",
    [
        ("parallel", "JoblibLauncher", "1"),
        ("slurm", "SlurmLauncher", "4"),
        ("submitit", "LocalLauncher", "1"),
    ],
)
def test_launcher_configs_extend_the_plugins(launcher, target, threads):
    cfg = _hydra_cfg([f"hydra/launcher={launcher}"])
    assert cfg.hydra.launcher._target_.endswith(target)
    assert cfg.hydra.job.env_set.CIMSSM_THREADS == threads
    assert cfg.hydra.callbacks.sweep_summary._target_.endswith("SweepSummaryCallback")


def test_parallel_launcher_n_jobs_from_the_command_line():
    cfg = _hydra_cfg(["hydra/launcher=parallel", "hydra.launcher.n_jobs=4"])
    assert cfg.hydra.launcher.n_jobs == 4 and cfg.hydra.launcher.prefer == "processes"


def test_optuna_search_config_composes():
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    cfg = _hydra_cfg(["hparams_search=optuna", "hydra.sweep.dir=/tmp/x"])
    assert cfg.optimized_metric == "noise/acc@0.01_mean"
    assert cfg.hydra.sweeper._target_.endswith("OptunaSweeper")
    assert cfg.hydra.sweeper.storage == "sqlite:////tmp/x/optuna.db"
    assert cfg.hydra.sweeper.direction == "maximize" and set(cfg.hydra.sweeper.params) == {
        "optimizer.lr",
        "optimizer.weight_decay",
    }


def _sqlalchemy_works_with_optuna() -> bool:
    from importlib import metadata

    try:
        return (
            int(metadata.version("optuna")[0]) >= 3 or int(metadata.version("sqlalchemy").split(".")[0]) < 2
        )
    except metadata.PackageNotFoundError:
        return False


@pytest.mark.slow
def test_optuna_search_in_memory_returns_the_noise_objective(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    sweep = tmp_path / "search"
    proc = run_cli(
        [
            "train.py",
            "hparams_search=optuna",
            *TINY_RUN,
            "noise=gauss_1pct",
            "noise.chips=2",
            "hydra.sweeper.n_trials=2",
            "hydra.sweeper.storage=null",
            f"hydra.sweep.dir={sweep}",
        ],
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert 0.0 <= results["best_value"] <= 1.0
    df = load_sweep(sweep)
    assert df["job"].nunique() == 2 and (df["status"] == "ok").all()
    assert results["best_value"] == pytest.approx(df["noise/acc@0.01_mean"].max())


@pytest.mark.slow
@pytest.mark.skipif(
    not _sqlalchemy_works_with_optuna(),
    reason="optuna 2.x SQLite storage needs SQLAlchemy<2 (pip install -e '.[optuna]')",
)
def test_optuna_sqlite_storage_resumes_in_the_sweep_dir(tmp_path):
    sweep = tmp_path / "search"
    args = [
        "train.py",
        "hparams_search=optuna",
        *TINY_RUN,
        "noise=gauss_1pct",
        "noise.chips=2",
        "hydra.sweeper.n_trials=1",
        f"hydra.sweep.dir={sweep}",
    ]
    first = run_cli(args, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    assert (sweep / "optuna.db").is_file()
    jobs_before = {p.name for p in sweep.iterdir() if (p / ".hydra").is_dir()}
    second = run_cli(args, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    import optuna

    study = optuna.load_study(study_name="default", storage=f"sqlite:///{sweep / 'optuna.db'}")
    assert len(study.trials) == 2
    jobs_after = {p.name for p in sweep.iterdir() if (p / ".hydra").is_dir()}
    assert jobs_before < jobs_after and len(jobs_after) == 2  # the first session's job dir is kept


@pytest.mark.slow
def test_parallel_launcher_runs_the_jobs(tmp_path):
    sweep = tmp_path / "parallel"
    proc = run_cli(
        [
            "train.py",
            "-m",
            "hydra/launcher=parallel",
            *[a for a in TINY_RUN if a != "threads=1"],
            "seed=1,2",
            f"hydra.sweep.dir={sweep}",
        ],
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    df = load_sweep(sweep)
    assert sorted(df["seed"]) == [1, 2] and (df["status"] == "ok").all()


def test_write_sweep_summary_returns_its_files_and_keeps_job_outputs(synthetic_sweep):
    before = {p: p.read_bytes() for p in synthetic_sweep.rglob("*") if p.is_file()}
    paths = write_sweep_summary(synthetic_sweep, metric="loss")
    assert {p.name for p in paths.values()} == {
        "sweep_summary.csv",
        "sweep_summary_seeds.csv",
        "sweep_summary.md",
        "sweep_loss_vs_noise.png",
        "sweep_loss_vs_ace.png",
    }
    assert all(p.read_bytes() == data for p, data in before.items())  # derived files only
