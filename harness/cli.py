"""The ``trilemma`` command: run, status, list, suites, show, report, compare, eval, sample, export,
profile, gpu-check.

User errors (a bad suite file, an unknown model, missing data) end in one line on stderr and exit
status 2; nothing half-written is left behind, because results are only ever replaced atomically.
A disk that fills stops the suite the same way (one line naming the file, which is left as it was). A
run pre-empted by SIGTERM (or submitit's SIGUSR1/SIGUSR2) writes its checkpoint and result, prints one
line and exits with status 128 + the signal's number (143 for SIGTERM); the same command resumes it.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from trilemma.contract.errors import TrilemmaError
from trilemma.run.preemption import Preempted

PLUGIN_HELP = "a Python file or module that registers model families (repeatable)"

DEFAULT_RESULTS = Path("results")
DEFAULT_REPORTS = Path("reports")


def _tolerance(text: str) -> float:
    """A relative tolerance: a finite number >= 0 (argparse turns the ValueError into a usage error)."""
    import math

    value = float(text)
    if not (math.isfinite(value) and value >= 0):
        raise ValueError(text)
    return value


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    try:
        # Overrides (key=value) may come after options too, which argparse alone does not allow.
        args, extra = parser.parse_known_args(argv)
        if extra and getattr(args, "command", None) in ("run", "report", "status"):
            args.overrides += [e for e in extra if "=" in e and not e.startswith("-")]
            extra = [e for e in extra if not ("=" in e and not e.startswith("-"))]
        if extra:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as e:  # a usage error (one line, printed) or --help
        return e.code if isinstance(e.code, int) else 2
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    args.argv = list(argv) if argv is not None else None
    try:
        code = args.func(args) or 0
    except TrilemmaError as e:
        print(f"trilemma: error: {e}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("trilemma: interrupted; run the same command again to resume", file=sys.stderr)
        code = 130
    except Preempted as e:  # SIGTERM or submitit's signal: checkpoint written, the run resumable
        print(f"trilemma: {e}", file=sys.stderr)
        code = e.exit_status
    except BrokenPipeError:  # the reader went away (`trilemma list | head`): not an error of ours
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = 0
    distributed = sys.modules.get("trilemma.run.distributed")
    if distributed is not None and distributed.active():  # a torchrun rank ends here: see leave()
        distributed.leave(code)
    return code


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line ("trilemma run: error: ..."), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _command(sub, func, name: str, **texts: str) -> argparse.ArgumentParser:
    """A subcommand (``help=``, ``description=``) that ``func(args)`` runs; the caller adds its arguments."""
    parser = sub.add_parser(name, **texts)
    parser.set_defaults(func=func)
    return parser


# --- options several commands share -----------------------------------------------------------------
def _plugin_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--plugin", action="append", default=[], metavar="FILE_OR_MODULE", help=PLUGIN_HELP)


def _device_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")


def _evaluations_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--evaluations", choices=("own", "latest"), default="own",
                        help="latest: FID, NLL and coverage from each run's latest `trilemma eval` re-measurement, "
                             "where it has one (default own: the run's own figures)")


def _results_folder_options(parser: argparse.ArgumentParser) -> None:
    """Where a suite's results are: the overrides and name it was run with, and the results root."""
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="the overrides the suite was run with (they name its results folder)")
    parser.add_argument("--name", help="the results folder's name, as given to trilemma run --name")
    parser.add_argument("--results", type=Path, default=DEFAULT_RESULTS)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="trilemma", description="Train and measure deep generative models "
                                "under one runner, and report where each stands on the trilemma of "
                                "quality, coverage and speed.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    run = _command(sub, cmd_run, "run",
                   help="train and measure every run of a suite (resumes, skips done runs)",
                   description="Train and measure every run of a suite. Runs already done with the "
                   "same config are skipped; interrupted runs resume from their checkpoint.")
    run.add_argument("suite", help="suite YAML file (e.g. suites/mnist.yaml) or the name of a bundled suite "
                     "(e.g. mnist; see trilemma suites)")
    run.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                     help="override suite settings, e.g. train.max_seconds=30 eval.fid_samples=500")
    run.add_argument("--models", help="comma-separated subset of the suite's models")
    _plugin_option(run)
    run.add_argument("--device", help="auto, cpu, cuda or cuda:N (overrides the suite's device)")
    run.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="results root (default: results/)")
    run.add_argument("--name", help="the results folder's name (default: the suite's name; with KEY=VALUE "
                     "overrides, the suite's name plus a hash of them, so a variant never replaces the "
                     "suite's own results)")
    run.add_argument("--dry-run", action="store_true",
                     help="print one line per expanded run (model, preset, dataset, seed, budget, "
                          "status) and each model's parameter count; run nothing")
    run.add_argument("--verbose", action="store_true", help="with --dry-run: each run's full resolved config")
    run.add_argument("--estimate", action="store_true",
                     help="with --dry-run (implied): also count each model's FLOPs per training step "
                     "(on this machine) and print an estimate of the suite's GPU-hours")
    run.add_argument("--in-process", action="store_true",
                     help="run each run in this process, not a fresh worker (for a debugger; its timings "
                     "then carry the process's history)")
    run.add_argument("--nproc", type=int, default=1, metavar="N",
                     help="train each run data-parallel over N processes (starts torchrun; one GPU each)")
    run.add_argument("--launcher", choices=("none", "submitit"), default="none",
                     help="submitit: each model's runs as one job (SLURM, or local processes), in parallel")
    run.add_argument("--executor", choices=("auto", "local", "slurm"), help="submitit executor "
                     "(default: the suite's launcher.executor; auto: SLURM where srun exists)")
    run.add_argument("--jobs", type=int, metavar="N", help="jobs at once (launcher.jobs)")
    run.add_argument("--partition", help="SLURM partition (launcher.partition)")
    run.add_argument("--gpus-per-job", type=int, metavar="N", help="GPUs per job (launcher.gpus_per_job)")
    run.add_argument("--time-minutes", type=int, metavar="N",
                     help="a job's time limit (launcher.time_minutes)")
    run.add_argument("--no-wait", action="store_true", help="with --launcher submitit: return once submitted")

    status = _command(sub, cmd_status, "status",
                      help="where every run of a suite stands (done, partial, new, ...)",
                      description="Print the status of every run of a suite in a results folder.")
    status.add_argument("suite", help="suite YAML file or a bundled suite's name")
    _results_folder_options(status)
    _plugin_option(status)

    ls = _command(sub, cmd_list, "list",
                  help="list the registered models with their capabilities",
                  description="List the registered model families, their capabilities and presets.")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    _plugin_option(ls)

    _command(sub, cmd_suites, "suites",
                      help="list the suites that ship with trilemma (run them by name)",
                      description="List the bundled suites: `trilemma run NAME` runs one from "
                      "anywhere.")

    show = _command(sub, cmd_show, "show",
                    help="summarize the results of a suite or a run",
                    description="Summarize results: a suite's results folder (a table of runs) or "
                    "one run's folder or result.json (every measurement).")
    show.add_argument("path", type=Path, help="results/<suite>, results/<suite>/<run> or a result.json")
    show.add_argument("--timings", action="store_true", help="each phase's seconds, per run and summed")
    _evaluations_option(show)

    report = _command(sub, cmd_report, "report",
                      help="build the comparison table and plots of a suite",
                      description="Build reports/<suite>/: table.md, table.tex, table.csv, plots and "
                      "index.md, from results/<suite>/.")
    report.add_argument("suite", help="suite name or suite YAML file")
    _evaluations_option(report)
    _results_folder_options(report)
    report.add_argument("--out", type=Path, default=DEFAULT_REPORTS)
    report.add_argument("--protocols", choices=("refuse", "split"), default="refuse",
                        help="runs measured under different protocols (budget, FID n, extractor, device "
                             "class, versions, ...): stop with an error naming the difference (refuse, "
                             "the default), or write one report per protocol (split)")

    compare = _command(sub, cmd_compare, "compare",
                       help="compare two results folders; non-zero exit on a regression",
                       description="Print what changed between two results folders and exit 1 when a "
                       "metric got worse beyond the suite's tolerance.")
    compare.add_argument("a", type=Path, help="reference results (e.g. the last nightly)")
    compare.add_argument("b", type=Path, help="new results")
    compare.add_argument("--tolerance", type=_tolerance, default=None,
                         help="relative tolerance for metrics the suite sets none for (default: per-metric built-ins)")

    evaluate = _command(sub, cmd_eval, "eval",
                        help="re-measure a finished run's saved model, without retraining",
                        description="Re-measure the saved model (model.safetensors) of a finished run: "
                        "FID with the run's own seed stream (at the run's n it reproduces the run's "
                        "figure), and optionally the NLL. The figures are appended to the result's "
                        "'evaluations' with their protocol.")
    evaluate.add_argument("run_dir", type=Path, help="a run folder, e.g. results/mnist/dcgan-mnist-s0")
    evaluate.add_argument("--fid-samples", type=int, metavar="N", help="FID@N (default: the run's own n)")
    evaluate.add_argument("--nll", action="store_true", help="measure the NLL on the test split")
    evaluate.add_argument("--nll-draws", type=int, metavar="K",
                          help="dequantization draws per image: K > 1 gives a flow's importance-weighted "
                               "NLL, an estimate where one draw gives a bound (default: the run's)")
    evaluate.add_argument("--coverage-samples", type=int, metavar="N",
                          help="score MNIST classes or Stacked MNIST modes of N samples (the FID's first "
                               "ones and more, by its seed stream; Stacked MNIST's literature n is 26000)")
    evaluate.add_argument("--sampler", help="sampler to measure (default: the model's first)")
    _device_option(evaluate)
    _plugin_option(evaluate)

    sample = _command(sub, cmd_sample, "sample",
                      help="draw samples from a finished run's saved model into a PNG grid",
                      description="Draw samples from the saved model (model.safetensors) of a "
                      "finished run and write them as one PNG grid.")
    sample.add_argument("run_dir", type=Path, help="a run folder, e.g. results/mnist/dcgan-mnist-s0")
    sample.add_argument("-n", type=int, default=64, help="number of samples (default 64)")
    sample.add_argument("-o", "--out", type=Path, default=Path("samples.png"), help="output PNG (default samples.png)")
    sample.add_argument("--sampler", help="sampler (default: the model's first)")
    sample.add_argument("--seed", type=int, default=0, help="seed of the draws (default 0)")
    _device_option(sample)
    _plugin_option(sample)

    export = _command(sub, cmd_export, "export",
                      help="write a finished run's model (weights, config, model card) to a folder",
                      description="Write the evaluated weights (model.safetensors), the config that rebuilds "
                      "the model (model.json) and a model card (README.md) of a finished run to a folder, "
                      "which a suite entry's `weights:` measures again.")
    export.add_argument("run_dir", type=Path, help="a run folder, e.g. results/mnist/dcgan-mnist-s0")
    export.add_argument("-o", "--out", type=Path, required=True, help="the folder to write")
    _plugin_option(export)

    profile = _command(sub, cmd_profile, "profile",
                       help="time the evaluation path (--eval) or a family's training "
                       "(--model) on this machine",
                       description="--eval: time the evaluation path: feature extraction by trilemma "
                       "against its previous extractor and torch-fidelity's calculate_metrics, in one "
                       "process, against the machine's convolution throughput; a FID-50k end to end on "
                       "a GPU. --model NAME: a family's training throughput under fp32 eager, bf16 "
                       "eager and bf16 compiled, side by side, with FLOPs per image counted and the MFU.")
    profile.add_argument("--eval", action="store_true", help="profile the evaluation path")
    profile.add_argument("--model", help="profile this family's training step")
    profile.add_argument("--preset", default="tiny", help="the family's preset (default tiny)")
    profile.add_argument("--batch", type=int, default=64, help="--model: training batch (default 64)")
    profile.add_argument("--steps", type=int, default=5, help="--model: timed steps per setting (default 5)")
    profile.add_argument("--warmup", type=int, default=2, help="--model: untimed steps first (default 2; "
                         "compilation happens in them)")
    profile.add_argument("--no-compile", action="store_true", help="--model: leave out the compiled setting")
    profile.add_argument("--images", type=int, default=100, help="images per timed pass (default 100)")
    profile.add_argument("--repeats", type=int, default=3, help="timed passes (median; default 3)")
    profile.add_argument("--shape", default="1x28x28", help="image shape CxHxW (default 1x28x28, MNIST)")
    _device_option(profile)
    profile.add_argument("--fid-weights", help="Inception weights (default $TRILEMMA_FID_WEIGHTS, else download)")
    profile.add_argument("-o", "--out", type=Path, help="also write the record as JSON here")

    gpu = _command(sub, cmd_gpu_check, "gpu-check",
                   help="what works on this device: every family built, trained and "
                   "sampled, a FID-50k timed; one report", description="Build every family's cifar10_gpu "
                   "preset (tiny on the CPU), time a few bf16 compiled training steps and one sampling "
                   "call of each, time a FID-50k end to end, and write reports/gpu-check/report.md and "
                   "report.json (trilemma.run.gpu_check).")
    _device_option(gpu)
    gpu.add_argument("--models", help="comma-separated families (default: every registered one)")
    gpu.add_argument("--preset", help="default cifar10_gpu on CUDA, tiny on the CPU")
    gpu.add_argument("--steps", type=int, default=3, help="timed training steps per family (default 3)")
    gpu.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation; default 2)")
    gpu.add_argument("--batch", type=int, help="training batch (default 64 on CUDA, 8 on the CPU)")
    gpu.add_argument("--sample-batch", type=int, help="samples per sampling call (default by sampler kind)")
    gpu.add_argument("--no-compile", action="store_true", help="train eager (bf16 autocast still)")
    gpu.add_argument("--budget", type=float, default=480.0, help="seconds after which no family starts (480)")
    gpu.add_argument("--family-seconds", type=float, default=150.0, help="one family's limit (150 s)")
    gpu.add_argument("--fid-model", default="dcgan", help="the family whose samples the FID times (dcgan)")
    gpu.add_argument("--fid-samples", "--fid-n", type=int, dest="fid_samples",
                     help="FID samples (default 50000 on CUDA; skipped on the CPU; 0 skips)")
    gpu.add_argument("--fid-dataset", default="auto", help="the FID reference: cifar10 (under $TRILEMMA_DATA), a "
                     "folder with train.npz, or auto (cifar10, else $TRILEMMA_DATA/cifar10-subset)")
    gpu.add_argument("-o", "--out", type=Path, default=DEFAULT_REPORTS / "gpu-check", help="report folder")
    return p


def cmd_run(args) -> int:
    from trilemma.run.runner import resolve_device, run_suite, status_of
    from trilemma.run.settings import expand, load_suite, to_yaml

    suite = load_suite(args.suite, args.overrides, args.plugin, name=args.name)
    if args.device:
        suite.device = args.device
    only = None
    if args.models is not None:
        only = [m.strip() for m in args.models.split(",") if m.strip()]
        if not only:
            raise TrilemmaError("--models names no model; give a comma-separated list, e.g. --models vae,ddpm")
    check_results_root(args.results)
    runs = expand(suite, only)
    if args.dry_run or args.estimate:
        from trilemma.run.estimate import render_estimate, suite_estimate

        estimates = {e["run"]: e for e in suite_estimate(runs, flops=args.estimate)}  # builds each model
        rows = []
        for run in runs:
            status = status_of(args.results, run)
            if args.verbose:
                print(f"# {run.name} [{status}]")
                print(to_yaml(run.config.to_dict()))
            rows.append(dry_run_row(run, status, estimates.get(run.name, {})))
        if not args.verbose:
            widths = [max(len(r[i]) for r in [DRY_RUN_HEADER, *rows]) for i in range(len(DRY_RUN_HEADER))]
            for r in [DRY_RUN_HEADER, *rows]:
                print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
        if args.estimate:
            print(render_estimate(list(estimates.values())))
        print(f"{len(runs)} runs in suite {suite.name!r}"
              + ("" if args.verbose else "; --verbose prints their full configs")
              + ("" if args.estimate else "; --estimate its GPU-hours from FLOPs")
              + ("" if args.verbose else "; paper params: its paper's CIFAR-10 model (trilemma/contract/"
                 "literature_sizes.csv), † beyond 10 %"))
        return 0
    if args.nproc < 1:
        raise TrilemmaError(f"--nproc {args.nproc}: give at least 1 process")
    for r in runs:  # found here, not by one rank alone after the others have started
        if r.config.weights and args.nproc > 1:
            raise TrilemmaError(f"{r.name}: pretrained weights are measured by one process; leave out --nproc")
        if r.config.train.batch_size % args.nproc:
            raise TrilemmaError(f"{r.name}: train.batch_size {r.config.train.batch_size} does not divide over "
                                f"--nproc {args.nproc} processes")
    if args.launcher == "submitit":
        return _submit(suite, runs, args)
    from trilemma.run import distributed

    if args.nproc > 1 and not distributed.launched():  # this process becomes torchrun's launcher
        argv = args.argv if args.argv is not None else sys.argv[1:]
        return distributed.relaunch(args.nproc, _argv_without(argv, "--nproc"))
    import torch

    device = resolve_device(suite.device)
    torch.set_num_threads(suite.threads or torch.get_num_threads())  # explicit: recorded with every speed
    if distributed.launched():
        from trilemma.run.launch import run_suite_parallel

        device = distributed.init(device)
        outcome = run_suite_parallel(suite, runs, args.results, device)
        if not distributed.is_main():
            return 0
    else:
        outcome = run_suite(suite, runs, args.results, device, isolate=not args.in_process)
    return _outcome(suite.name, outcome, args.results)


def _outcome(suite: str, outcome: dict[str, str], results: Path) -> int:
    """The suite's last lines: how many runs are done, incomplete and failed, a line for each that is
    not done (its error's first line), and the exit status: 1 unless every run is done."""
    from trilemma.results.io import read_result
    from trilemma.results.show import problems

    counts = {s: list(outcome.values()).count(s) for s in ("done", "incomplete", "failed")}
    others = len(outcome) - sum(counts.values())
    print(f"suite {suite}: " + ", ".join(f"{n} {s}" for s, n in counts.items() if n or s == "done")
          + (f", {others} other" if others else "") + f"; results in {results / suite}")
    for run, status in outcome.items():
        if status != "done":
            try:
                result = read_result(results / suite / run)
            except TrilemmaError:
                result = None
            lines = problems([result]) if result else []
            print("  " + (lines[0] if lines else f"{run}: {status}"))
    return 0 if counts["done"] == len(outcome) else 1


def _argv_without(argv: list[str], option: str) -> list[str]:
    """``argv`` without ``option`` and its value (``--nproc 2`` or ``--nproc=2``)."""
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == option:
            skip = True
        elif not item.startswith(option + "="):
            out.append(item)
    return out


def _submit(suite, runs, args) -> int:
    """``--launcher submitit``: one job per model, each running this command for that model alone."""
    import dataclasses

    from trilemma.contract.typed import build
    from trilemma.run.launch import submit_suite
    from trilemma.run.settings import LauncherConfig

    options = {"executor": args.executor, "jobs": args.jobs, "partition": args.partition,
               "gpus_per_job": args.gpus_per_job, "time_minutes": args.time_minutes,
               "nproc": args.nproc if args.nproc > 1 else None}  # --nproc: data parallel inside each job
    launcher = build(LauncherConfig, {**dataclasses.asdict(suite.launcher),
                                      **{k: v for k, v in options.items() if v is not None}},
                     "command line", "launcher.")
    base = [args.suite, *args.overrides, "--results", str(args.results.absolute())]
    base += ["--name", args.name] if args.name else []
    base += ["--device", args.device] if args.device else []
    base += [item for p in args.plugin for item in ("--plugin", p)]
    base += ["--nproc", str(launcher.nproc)] if launcher.nproc > 1 else []
    outcome = submit_suite(runs, lambda model: ["run", *base, "--models", model], launcher, args.results,
                           wait=not args.no_wait)
    if args.no_wait:
        print(f"suite {suite.name}: {len(outcome)} jobs submitted; see `trilemma status {args.suite}`")
        return 0
    failed = [m for m, status in outcome.items() if status != "done"]
    print(f"suite {suite.name}: {len(outcome) - len(failed)} jobs done, {len(failed)} failed"
          + (f" ({', '.join(failed)})" if failed else "") + f"; results in {args.results / suite.name}")
    return 1 if failed else 0


def cmd_status(args) -> int:
    from trilemma.run.runner import status_of
    from trilemma.run.settings import expand, load_suite

    suite = load_suite(args.suite, args.overrides, args.plugin, name=args.name)
    runs = expand(suite)
    statuses = [status_of(args.results, run) for run in runs]
    width = max(len(r.name) for r in runs)
    for run, status in zip(runs, statuses):
        print(f"{run.name:<{width}} {status}")
    counts = {s: statuses.count(s) for s in dict.fromkeys(statuses)}
    print(f"suite {suite.name}: " + ", ".join(f"{n} {s}" for s, n in counts.items()))
    return 0


DRY_RUN_HEADER = ("run", "model", "preset", "dataset", "seed", "budget", "paper params", "ours/paper",
                  "params", "NFE", "status")


def dry_run_row(run, status: str, estimate: dict) -> tuple[str, ...]:
    """One line of ``run --dry-run``: what the run is, its training budget, its size (parameters beside
    those of the paper's CIFAR-10 model, their ratio marked † beyond 10 %, and the default sampler's NFE)
    and where it stands."""
    from trilemma.contract.literature import paper_params, paper_sized
    from trilemma.results.protocol import fingerprint
    from trilemma.run.data import dataset_label

    cfg = run.config
    budget = "pretrained" if cfg.weights else fingerprint({"config": cfg.to_dict()})["budget"] or "?"
    params = f"{estimate['params']:,}" if "params" in estimate else "?"
    paper, ours = paper_params(cfg.model), estimate.get("params")
    ratio = "-"
    if paper and ours:  # the paper's model is CIFAR-10's: on other data the ratio only says how far off
        ratio = f"{ours / paper:.2f}" + ("" if paper_sized(cfg.model, ours) else "†")
    return (run.name, cfg.model, str(cfg.preset), dataset_label(cfg.data), str(cfg.seed), budget,
            f"{paper:,}" if paper else "-", ratio, params, str(estimate.get("nfe", "?")), status)


def check_results_root(root: Path) -> None:
    """The results root is a folder, or can be made one: checked before anything runs."""
    import tempfile

    if root.exists() and not root.is_dir():
        raise TrilemmaError(f"--results {root} is a file, not a folder")
    existing = root.absolute()
    while not existing.exists():
        existing = existing.parent
    try:  # a probe file, removed at once: permissions alone do not tell (root, read-only mounts)
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise TrilemmaError(f"--results {root}: cannot write in {existing} ({e.strerror})") from None


def cmd_list(args) -> int:
    from trilemma.contract.literature import CONDITIONING, literature_comparison
    from trilemma.contract.registry import broken, get_model_class, load_plugins, model_names

    load_plugins(args.plugin, "--plugin")
    unusable = broken()  # a family that fails to load is named; the others still list
    models = {name: get_model_class(name) for name in model_names() if name not in unusable}
    # The literature FID each family's default variant is compared with (the report's FID (lit.)).
    lit = {name: literature_comparison(name, cls.literature, (cls.reported or {}).get("fid"),
                                       (cls.reported or {}).get("source"), cls.capabilities.conditional)
           for name, cls in models.items()}
    if args.json:
        print(json.dumps({name: {"paper": cls.paper, "family": cls.family,
                                 "capabilities": cls.capabilities.as_dict(), "presets": list(cls.presets),
                                 "literature": vars(lit[name])}
                          for name, cls in models.items()}, indent=2))
    else:
        width = max([5, *map(len, models)])
        print(f"{'model':<{width}} {'family':<6} {'density':<8} {'free-form':<10} {'sampling':<15} "
              f"{'marks':<5} {'lit. FID':<8} presets")
        for name, cls in models.items():
            c = cls.capabilities
            marks = ("c" if c.conditional else "") + ("r" if c.any_resolution else "")
            free = "yes" if c.free_form_jacobian else "no"
            fid = lit[name].fid + lit[name].mark if lit[name].fid else "-"
            print(f"{name:<{width}} {cls.family:<6} {c.density:<8} {free:<10} {c.sampling:<15} "
                  f"{marks or '-':<5} {fid:<8} {', '.join(cls.presets)}")
        print("\nvariants: the one we run by default, and the literature figure's")
        for name, cls in models.items():
            if lit[name].text():
                print(f"  {name}: ours {CONDITIONING[bool(cls.capabilities.conditional)]}; {lit[name].text()}")
        print("\n" + LIST_LEGEND)
    for name, why in unusable.items():
        print(f"trilemma: error: {why}", file=sys.stderr)
    return 1 if unusable else 0


LIST_LEGEND = """\
family     the review's section: GAN, EBM (diffusion and score models with it, as the review groups
           them), VAE, AR (autoregressive), Flow; OT (optimal transport)
density    exact: log p(x); bound: an upper bound on -log p(x); estimate: a Monte-Carlo estimate of
           it; none: no likelihood (no NLL is measured)
free-form  yes: an unconstrained network (no invertibility or causal masking)
sampling   one_pass: one network pass; iterative: a chain of network steps; autoregressive: pixel by
           pixel; mcmc: Markov chain Monte Carlo (Langevin)
marks      c: class-conditional (trained on labels); r: samples at any resolution (a 2x grid too)
lit. FID   the CIFAR-10 FID the report sets beside ours: the review's row (else the family's paper), or
           the paper's figure for the variant we run by default (‡); §: of another variant, none found
           for ours; the variants block names both variants and the figure's source
presets    sizes: tiny (the tests), mnist and cifar10 (CPU suites), *_gpu (the GPU suites)"""


def cmd_suites(args) -> int:
    from trilemma.results.suites import bundled_suites, read_suite_values

    suites = bundled_suites()
    if not suites:
        raise TrilemmaError("no bundled suites found (is trilemma installed with its package data?)")
    width = max(len(name) for name in suites)
    for name, path in suites.items():
        description = read_suite_values(path).get("description") or ""
        print(f"{name:<{width}}  {description}")
    print(f"\nrun one with `trilemma run NAME`; the files are in {next(iter(suites.values())).parent}")
    return 0


def cmd_show(args) -> int:
    from trilemma.results.show import show

    print(show(args.path, timings=args.timings, evaluations=args.evaluations))
    return 0


def cmd_report(args) -> int:
    from trilemma.report.build import build_report

    from trilemma.report.load import suite_name

    out = build_report(suite_name(args.suite, args.overrides, args.name), args.results, args.out,
                       args.protocols, args.evaluations)
    print(f"report written to {out}")
    return 0


def cmd_compare(args) -> int:
    from trilemma.results.compare import compare

    text, regressed = compare(args.a, args.b, args.tolerance)
    print(text)
    return 1 if regressed else 0


def cmd_eval(args) -> int:
    from trilemma.contract.registry import load_plugins
    from trilemma.run.saved import evaluate_saved

    load_plugins(args.plugin, "--plugin")
    if args.nll_draws is not None and args.nll_draws < 1:
        raise TrilemmaError(f"--nll-draws must be at least 1, got {args.nll_draws}")
    evaluate_saved(args.run_dir, args.fid_samples, args.nll or args.nll_draws is not None, args.sampler,
                   args.device, args.nll_draws, args.coverage_samples)
    print(f"re-measured {args.run_dir}; the figures are in its result.json under 'evaluations'")
    return 0


def cmd_profile(args) -> int:
    if args.model:
        return _profile_train(args)
    if not args.eval:
        raise TrilemmaError("trilemma profile needs --eval (the evaluation path) or --model NAME (training)")
    from trilemma.measure import fid as fidlib
    from trilemma.measure.profile_eval import profile_eval, render
    from trilemma.results.io import atomic_write_json
    from trilemma.run.runner import resolve_device

    try:
        channels, height, width = (int(v) for v in args.shape.lower().split("x"))
    except ValueError:
        raise TrilemmaError(f"--shape {args.shape!r}: write CxHxW, e.g. 3x32x32") from None
    if channels not in (1, 3) or height != width or height < 4 or args.images < 8 or args.repeats < 1:
        raise TrilemmaError("--shape needs 1 or 3 channels and a square of at least 4; --images at least 8; "
                            "--repeats at least 1")
    record = profile_eval(fidlib.weights_path(args.fid_weights), resolve_device(args.device), args.images,
                          args.repeats, channels, height)
    print(render(record))
    if args.out:
        atomic_write_json(args.out, record)
    return 0


def _profile_train(args) -> int:
    from trilemma.contract.registry import get_model_class
    from trilemma.results.io import atomic_write_json
    from trilemma.run.profile_train import SETTINGS, profile_train, render
    from trilemma.run.runner import resolve_device

    cls = get_model_class(args.model)
    if args.preset not in cls.presets:
        raise TrilemmaError(f"--preset {args.preset!r}: {args.model} has presets {', '.join(cls.presets)}")
    try:
        shape = tuple(int(v) for v in args.shape.lower().split("x"))
    except ValueError:
        raise TrilemmaError(f"--shape {args.shape!r}: write CxHxW, e.g. 3x32x32") from None
    if len(shape) != 3 or args.batch < 1 or args.steps < 1 or args.warmup < 0:
        raise TrilemmaError("--shape is CxHxW; --batch and --steps at least 1; --warmup 0 or more")
    settings = [s for s in SETTINGS if not (args.no_compile and s[1])]
    record = profile_train(args.model, args.preset, shape, args.batch, args.steps, args.warmup,
                           resolve_device(args.device), settings=settings)
    print(render(record))
    if args.out:
        atomic_write_json(args.out, record)
    return 0


def cmd_gpu_check(args) -> int:
    from trilemma.run.gpu_check import run_from_args

    return run_from_args(args)


def cmd_export(args) -> int:
    from trilemma.contract.registry import load_plugins
    from trilemma.run.export import export_run

    load_plugins(args.plugin, "--plugin")
    out = export_run(args.run_dir, args.out)
    print(f"exported {args.run_dir} to {out}: model.safetensors, model.json, README.md")
    return 0


def cmd_sample(args) -> int:
    from trilemma.contract.registry import load_plugins
    from trilemma.run.saved import sample_saved

    load_plugins(args.plugin, "--plugin")
    out = sample_saved(args.run_dir, args.n, args.out, args.sampler, args.seed, args.device)
    print(f"{args.n} samples written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
