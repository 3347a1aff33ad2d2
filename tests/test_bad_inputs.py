"""Bad command lines: each exits non-zero with one line naming the key or file and what is allowed.

Every row runs ``train.py`` or ``eval.py`` as its own process, from a fresh working directory,
and checks: exit status (2 for configuration errors), exactly one line on stderr, no traceback,
the expected words in that line, and that nothing is left under ``outputs/`` except the job's
own log file (no checkpoints, metrics, csv, .hydra record).

A fresh interpreter spends ~10 s importing torch and Lightning, which for 40 rows is minutes.
The rows therefore run in processes forked from a warm interpreter (a multiprocessing
forkserver that has imported the heavy modules and nothing else): each row is still a separate
process executing the entry point's ``__main__`` with its own argv, cwd, stdout and stderr, and
``test_warm_runner_matches_a_fresh_interpreter`` checks that a cold ``python train.py`` prints the
same line as the warm one. :func:`run_entry` / :func:`start_entry` are reused by
test_reliability.py (kill -9 and NaN tests).
"""

from __future__ import annotations

import multiprocessing
import os
import runpy
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pytest
import torch
from conftest import DATA_TINY, ROOT, TINY, compose_cfg, run_cli

# ~60 rows at about a second each (Hydra composes the config twice per run), plus the warm-up.
pytestmark = pytest.mark.slow

PRELOAD = [
    "pytest",
    "conftest",
    "test_bad_inputs",  # the children's target lives here: imported once, in the server
    "torch",
    "numpy",
    "lightning.pytorch",
    "hydra",
    "omegaconf",
    "rich",
    "cimssm.pipeline",
    "cimssm.callbacks",
    "cimssm.callbacks.checkpointing",
    "cimssm.callbacks.numerics",
    "cimssm.callbacks.noise_eval",
    "cimssm.callbacks.post_training",
    "cimssm.callbacks.cost_report",
    "cimssm.models.s4d",
    "cimssm.data.selective_copy",
    "cimssm.evaluation",
]
CHILD_ENV = {
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "HYDRA_FULL_ERROR": "0",
    "CIMSSM_THREADS": "1",
    "OMP_NUM_THREADS": "1",
}

# Rows running at once (2 cores here; a row mostly waits on Hydra composing the config).
PARALLEL = 3
_context = None


def warm_context():
    """The forkserver context whose server has imported :data:`PRELOAD` (started on first use)."""
    global _context
    if _context is None:
        ctx = multiprocessing.get_context("forkserver")
        ctx.set_forkserver_preload(PRELOAD)
        _context = ctx
    return _context


def _entry_child(script: str, argv: list[str], cwd: str, out: str, err: str) -> None:
    """Runs in the forked process: the entry point's __main__ with its own argv, cwd and streams."""
    os.chdir(cwd)
    os.environ.update(CHILD_ENV)
    warnings.simplefilter("ignore")
    torch.set_num_threads(1)
    for fd, path in ((1, out), (2, err)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), fd)
    sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 - the process owns fd 1/2
    sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115
    sys.argv = [script, *argv]
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    runpy.run_path(script, run_name="__main__")


class Entry:
    """A running entry-point process (``start_entry``); ``wait()`` gives a CompletedProcess."""

    def __init__(self, script: str, argv: list[str], cwd: Path):
        self.args = [script, *argv]
        self._dir = Path(tempfile.mkdtemp(prefix="cimssm-entry-"))
        self.out, self.err = self._dir / "stdout", self._dir / "stderr"
        self.process = warm_context().Process(
            target=_entry_child, args=(str(ROOT / script), list(argv), str(cwd), str(self.out), str(self.err))
        )
        self.process.start()

    def kill(self) -> None:
        """SIGKILL: no handler, no cleanup, like a pre-empted job."""
        self.process.kill()

    def wait(self, timeout: float = 300) -> subprocess.CompletedProcess:
        self.process.join(timeout)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
            raise TimeoutError(f"{' '.join(self.args)} did not finish in {timeout} s")
        read = lambda p: p.read_text() if p.exists() else ""  # noqa: E731
        return subprocess.CompletedProcess(self.args, self.process.exitcode, read(self.out), read(self.err))


def start_entry(script: str, argv: list[str], cwd: Path) -> Entry:
    return Entry(script, argv, cwd)


def run_entry(script: str, argv: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return Entry(script, argv, cwd).wait(timeout)


# ----------------------------------------------------------------------------------- fixtures
TINY_TRAIN = ["model=s4d_tiny", "data=selective_copy", *TINY, *DATA_TINY["selective_copy"], "threads=1"]


def _tiny_checkpoint(directory: Path) -> Path:
    from cimssm.pipeline import train

    cfg = compose_cfg(
        [*TINY_TRAIN, "trainer.max_steps=2", "callbacks=default", "callbacks.rich_progress_bar=null",
         "callbacks.lr_monitor=null", "test_after_fit=false"],
        output_dir=directory,
    )  # fmt: skip
    train(cfg)
    return directory / "checkpoints" / "last.ckpt"


def _edited(ckpt: dict, path: Path, edit) -> Path:
    import copy

    data = copy.deepcopy(ckpt)
    edit(data)
    torch.save(data, path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Checkpoints and files the bad command lines point at (outside any outputs/ dir)."""
    base = tmp_path_factory.mktemp("bad_inputs_files")
    good = _tiny_checkpoint(base / "tiny")
    ckpt = torch.load(good, weights_only=True)
    raw = good.read_bytes()
    out = {"good": good}
    out["truncated"] = base / "truncated.ckpt"
    out["truncated"].write_bytes(raw[: len(raw) // 2])
    out["empty"] = base / "empty.ckpt"
    out["empty"].write_bytes(b"")
    out["garbage"] = base / "garbage.ckpt"
    out["garbage"].write_bytes(os.urandom(4096))
    out["weights_only"] = base / "weights_only.ckpt"
    torch.save({"net.encoder.weight": torch.zeros(2, 2)}, out["weights_only"])
    out["no_config"] = _edited(ckpt, base / "no_config.ckpt", lambda d: d.pop("hyper_parameters"))

    def evil_target(d):
        d["hyper_parameters"]["cfg"]["model"]["_target_"] = "os.system"

    out["evil_target"] = _edited(ckpt, base / "evil_target.ckpt", evil_target)

    def evil_nested(d):
        d["hyper_parameters"]["cfg"]["callbacks"] = {
            "x": {"_target_": "torch.nn.modules.module.torch.load", "f": "/etc/passwd"}
        }

    out["evil_nested"] = _edited(ckpt, base / "evil_nested.ckpt", evil_nested)

    def bigger_model(d):
        d["hyper_parameters"]["cfg"]["model"]["d_model"] = 32

    out["mismatch"] = _edited(ckpt, base / "mismatch.ckpt", bigger_model)

    class Payload:
        def __reduce__(self):
            return (os.system, ("touch PWNED",))

    out["pickle_payload"] = base / "pickle_payload.ckpt"
    torch.save({"state_dict": {}, "payload": Payload()}, out["pickle_payload"])
    out["a_file"] = base / "not_a_dir.txt"
    out["a_file"].write_text("x")
    out["dir"] = base
    return out


# -------------------------------------------------------------------------------- the table
# (id, script, argv, expected words in the one stderr line, exit status). `{name}` is replaced
# by the path of files[name]. Each row also gets hydra.run.dir=outputs/runs/bad/<id>.
TRAIN, EVAL = "train.py", "eval.py"
# fmt: off
CASES = [
    # Hydra composition: unknown group option / key, bad syntax
    ("unknown_model", TRAIN, ["model=resnet"], ["model/resnet", "Available options", "s4d"], 2),
    ("unknown_data", TRAIN, ["data=imagenet"], ["data/imagenet", "Available options"], 2),
    ("unknown_trainer", TRAIN, ["trainer=tpu"], ["trainer/tpu", "Available options"], 2),
    ("unknown_key", TRAIN, ["model.d_modle=16"], ["model.d_modle"], 2),
    ("unknown_appended_key", TRAIN, ["+model.d_modle=16"], ["model.d_modle", "allowed keys", "d_model"], 2),
    ("unknown_quant_part_key", TRAIN, ["+quant.parts.A_real.bitz=4"], ["quant.parts.A_real.bitz", "allowed keys"], 2),
    ("bad_override_syntax", TRAIN, ["model.d_model=[16,"], ["model.d_model=[16,", "override_grammar"], 2),
    # wrong types
    ("d_model_not_int", TRAIN, ["model.d_model=abc"], ["model.d_model", "wrong type", "int"], 2),
    ("lr_not_float", TRAIN, ["optimizer.lr=fast"], ["optimizer.lr", "wrong type", "float"], 2),
    ("seed_not_int", TRAIN, ["seed=abc"], ["seed", "wrong type", "int"], 2),
    ("bits_not_int", TRAIN, ["quant.weight_bits=8.5"], ["quant.weight_bits", "wrong type", "int"], 2),
    ("eval_levels_not_list", TRAIN, ["noise=gauss_1pct", "noise.eval_levels=0.1"], ["noise.eval_levels", "list"], 2),
    # ranges
    ("d_model_negative", TRAIN, ["model.d_model=-3"], ["model.d_model=-3", "must be > 0"], 2),
    ("weight_bits_0", TRAIN, ["quant.weight_bits=0"], ["quant.weight_bits=0", ">= 1", "<= 16"], 2),
    ("act_bits_33", TRAIN, ["quant.act_bits=33"], ["quant.act_bits=33", "<= 16"], 2),
    ("part_bits_33", TRAIN, ["+quant.parts.C.bits=33"], ["quant.parts.C.bits=33", "<= 16"], 2),
    ("noise_negative", TRAIN, ["noise=gauss_1pct", "noise.level=-0.01"], ["noise.level=-0.01", ">= 0"], 2),
    ("eval_level_negative", TRAIN, ["noise=gauss_1pct", "noise.eval_levels=[0,-0.1]"], ["noise.eval_levels", "-0.1", ">= 0"], 2),
    ("t_inference_negative", TRAIN, ["noise=pcm", "noise.t_inference=[-1]"], ["noise.t_inference", ">= 0"], 2),
    ("chips_zero", TRAIN, ["noise=gauss_1pct", "noise.chips=0"], ["noise.chips=0", "> 0"], 2),
    ("dropout_one", TRAIN, ["model.dropout=1.0"], ["model.dropout=1.0", "< 1"], 2),
    ("quant_mode_unknown", TRAIN, ["quant.mode=fast"], ["quant.mode='fast'", "qat", "ptq"], 2),
    ("on_nan_unknown", TRAIN, ["numerics.on_nan=ignore"], ["numerics.on_nan='ignore'", "stop", "skip"], 2),
    ("betas_one_number", TRAIN, ["optimizer.betas=[0.9]"], ["optimizer.betas", "two numbers"], 2),
    ("hpd_rank_too_large", TRAIN, ["model=mamba_tiny", "decomp=hpd", "decomp.rank=4096"], ["rank", "4096"], 2),
    # data that is not there
    ("smnist_missing_dir", TRAIN, ["data=smnist", "data.data_dir=/nonexistent/mnist"], ["data.data_dir", "/nonexistent/mnist", "does not exist"], 2),
    ("scifar_dir_is_file", TRAIN, ["data=scifar", "data.data_dir={a_file}"], ["data.data_dir", "not a directory"], 2),
    ("shakespeare_missing_dir", TRAIN, ["data=shakespeare_char", "data.data_dir=/nonexistent/plays"], ["data.data_dir", "/nonexistent/plays"], 2),
    ("hf_model_path_missing", TRAIN, ["model=mamba_hf", "model.path=/nonexistent/hf"], ["model (mamba_hf)", "/nonexistent/hf", "does not exist"], 2),
    ("output_dir_is_a_file", TRAIN, ["output_dir={a_file}"], ["output_dir=", "not_a_dir.txt", "not a directory"], 2),
    # checkpoints for training (resume)
    ("resume_missing_ckpt", TRAIN, ["ckpt_path=/nonexistent/last.ckpt"], ["ckpt_path=/nonexistent/last.ckpt", "no such file", ".ckpt"], 2),
    ("resume_last_none", TRAIN, ["experiment_name=never_ran", "ckpt_path=last"], ["ckpt_path=last", "never_ran"], 2),
    ("resume_truncated", TRAIN, ["ckpt_path={truncated}"], ["truncated.ckpt", "truncated or corrupt"], 2),
    ("resume_empty", TRAIN, ["ckpt_path={empty}"], ["empty.ckpt", "is empty"], 2),
    ("resume_garbage", TRAIN, ["ckpt_path={garbage}"], ["garbage.ckpt", "not a readable checkpoint"], 2),
    ("resume_other_model", TRAIN, ["ckpt_path={good}", "model=mamba_tiny"], ["last.ckpt", "model=s4d", "model=mamba", "do not fit"], 2),
    ("resume_other_size", TRAIN, ["ckpt_path={good}", "model.d_model=32"], ["last.ckpt", "d_model=16", "d_model=32"], 2),
    ("resume_other_data", TRAIN, ["ckpt_path={good}", "data=shakespeare_char", "data.limit_chars=20000", "data.seq_len=16"], ["data=selective_copy", "data=shakespeare_char"], 2),
    ("resume_evil_target", TRAIN, ["ckpt_path={evil_target}"], ["model._target_", "os.system", "not allowed"], 2),
    # checkpoints for evaluation
    ("eval_no_ckpt", EVAL, [], ["ckpt_path"], 2),
    ("eval_missing_ckpt", EVAL, ["ckpt_path=/nonexistent/x.ckpt"], ["ckpt_path=/nonexistent/x.ckpt", "no such file"], 2),
    ("eval_directory", EVAL, ["ckpt_path={dir}"], ["ckpt_path=", "not a file"], 2),
    ("eval_truncated", EVAL, ["ckpt_path={truncated}"], ["truncated.ckpt", "truncated or corrupt"], 2),
    ("eval_plain_state_dict", EVAL, ["ckpt_path={weights_only}"], ["weights_only.ckpt", "not a Lightning checkpoint"], 2),
    ("eval_no_stored_config", EVAL, ["ckpt_path={no_config}"], ["no_config.ckpt", "no stored cimssm config"], 2),
    ("eval_weights_of_other_model", EVAL, ["ckpt_path={mismatch}"], ["mismatch.ckpt", "do not fit"], 2),
    ("eval_evil_target", EVAL, ["ckpt_path={evil_target}"], ["model._target_", "os.system", "not allowed", "cimssm."], 2),
    ("eval_evil_nested_target", EVAL, ["ckpt_path={evil_nested}"], ["callbacks.x._target_", "torch.serialization", "not allowed"], 2),
    ("eval_pickle_payload", EVAL, ["ckpt_path={pickle_payload}"], ["pickle_payload.ckpt", "refused", "system", "weights_only"], 2),
    ("eval_bad_split", EVAL, ["ckpt_path={good}", "split=train"], ["split='train'", "test", "val"], 2),
    ("eval_negative_noise", EVAL, ["ckpt_path={good}", "noise=gauss_1pct", "noise.level=-1"], ["noise.level=-1", ">= 0"], 2),
    ("eval_unknown_data_key", EVAL, ["ckpt_path={good}", "+data.data_dir=/x"], ["data.data_dir", "allowed keys"], 2),
    # incompatible combinations
    ("hf_without_path", TRAIN, ["model=mamba_hf"], ["model.path", "required"], 2),
    ("scan_state_bits_on_s4d", TRAIN, ["model=s4d_tiny", "+quant.parts.scan_state.bits=8"], ["scan_state"], 2),
    ("checkpoint_link", TRAIN, ["callbacks=default", "callbacks.model_checkpoint.save_last=link"], ["save_last", "link", "real file"], 2),
    ("checkpoint_every_zero", TRAIN, ["callbacks=default", "callbacks.model_checkpoint.every_n_train_steps=0"], ["every_n_train_steps=0", ">= 1"], 2),
    ("trainer_precision", TRAIN, ["trainer.precision=banana"], ["trainer", "precision", "banana"], 2),
]
# fmt: on


def _argv(argv: list[str], files: dict[str, Path]) -> list[str]:
    return [a.format(**{k: str(v) for k, v in files.items()}) for a in argv]


def _leftovers(outputs: Path) -> list[str]:
    """Files under outputs/ other than a job's own log."""
    if not outputs.exists():
        return []
    return sorted(
        str(p.relative_to(outputs)) for p in outputs.rglob("*") if p.is_file() and p.suffix != ".log"
    )


def _command(case: tuple, files: dict[str, Path]) -> list[str]:
    name, script, argv = case[:3]
    small = [] if script == EVAL else ["model=s4d_tiny", "data=selective_copy", *TINY, "threads=1"]
    # The row's own overrides come last so that they win over the tiny defaults.
    return [*small, *_argv(argv, files), f"hydra.run.dir=outputs/runs/bad/{name}"]


@pytest.fixture(scope="module")
def results(files, tmp_path_factory):
    """Run every row, a few at a time, each in its own fresh working directory."""
    from multiprocessing.connection import wait

    base = tmp_path_factory.mktemp("bad_rows")
    pending, running, done = list(CASES), {}, {}
    while pending or running:
        while pending and len(running) < PARALLEL:
            case = pending.pop(0)
            cwd = base / case[0]
            cwd.mkdir()
            running[case[0]] = (start_entry(case[1], _command(case, files), cwd), cwd)
        wait([entry.process.sentinel for entry, _ in running.values()], timeout=180)
        for name, (entry, cwd) in list(running.items()):
            if not entry.process.is_alive():
                done[name] = (entry.wait(), cwd)
                del running[name]
    return done


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_command_line(case, results):
    name, script, argv, expected, status = case
    if name == "hpd_rank_too_large" and not (ROOT / "conf" / "decomp" / "hpd.yaml").exists():
        pytest.skip("decomp=hpd is not in this tree")
    proc, cwd = results[name]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == status, (proc.returncode, proc.stderr[-3000:], proc.stdout[-2000:])
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    assert len(lines) == 1, proc.stderr
    for word in expected:
        assert word in lines[0], (word, lines[0])
    assert _leftovers(cwd / "outputs") == []
    assert not (cwd / "PWNED").exists()


def test_table_is_large_enough():
    assert len(CASES) >= 30
    assert len({c[0] for c in CASES}) == len(CASES)


def test_warm_runner_matches_a_fresh_interpreter(tmp_path):
    """The forked rows behave like a cold `python train.py` (same line, same status)."""
    args = ["model.d_model=-3", f"hydra.run.dir={tmp_path / 'outputs' / 'cold'}"]
    cold = run_cli(["train.py", *args], cwd=ROOT, timeout=300)
    warm = run_entry(TRAIN, args, tmp_path)
    assert cold.returncode == warm.returncode == 2
    assert (
        cold.stderr.strip()
        == warm.stderr.strip()
        == "config error: model.d_model=-3 is not allowed: must be > 0"
    )
