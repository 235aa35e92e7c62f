"""`distill` command line: run the loop, run one stage, build the tiny model."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from distill.core.stages import STAGE_NAMES
from distill.models.config import TinyModelConfig


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distill", description="Iterative self-distillation for audio LMs")
    sub = parser.add_subparsers(dest="command", required=True)
    add_loop_commands(sub)
    add_round_commands(sub)
    add_run_dir_commands(sub)
    add_tool_commands(sub)
    return parser


def add_loop_commands(sub) -> None:
    """`run`, `stage`: the loop, or stages of one round."""
    p_run = sub.add_parser("run", help="run (or resume) the round loop")
    p_run.add_argument("config")
    p_run.add_argument("overrides", nargs="*", help="key=value config overrides")

    p_stage = sub.add_parser(
        "stage", help="run stages of one round (e.g. a Slurm array task sampling a shard)"
    )
    p_stage.add_argument(
        "stage",
        type=stage_list,
        help=f"one of {', '.join(STAGE_NAMES)}, or several in order "
        "joined by commas (export,eval: one engine for both)",
    )
    p_stage.add_argument("config")
    p_stage.add_argument("--round", type=int, required=True)
    p_stage.add_argument("overrides", nargs="*")


def add_round_commands(sub) -> None:
    """`eval`, `export`, `push`: work on one round's directory."""
    p_eval = sub.add_parser("eval", help="(re-)evaluate a round's exported model (eval.* overrides allowed)")
    p_eval.add_argument("round_dir", help="e.g. checkpoints/demo_cpu/round_002")
    p_eval.add_argument("overrides", nargs="*", help="eval.key=value overrides (e.g. eval.k=8)")

    p_export = sub.add_parser(
        "export",
        help="export a trained round: its model directory for vLLM and the hub, "
        "the gate, the model card, the serve command (export.* overrides allowed)",
    )
    p_export.add_argument("round_dir", help="e.g. checkpoints/demo_cpu/round_002")
    p_export.add_argument("overrides", nargs="*", help="export.key=value overrides (e.g. export.probes=8)")

    add_push_command(sub)


def add_run_dir_commands(sub) -> None:
    """`report`, `status`, `slurm`: work on a whole run."""
    p_report = sub.add_parser("report", help="write a self-contained HTML report of a run")
    p_report.add_argument("run_dir", help="e.g. checkpoints/demo_cpu")
    p_report.add_argument("--out", default="", help="output file (default: RUN_DIR/report.html)")
    p_report.add_argument(
        "--samples", type=int, default=3, help="sample traces shown per round, with their audio"
    )

    p_status = sub.add_parser("status", help="where a run stands: stages, shards, the running stage's ETA")
    p_status.add_argument("run_dir", help="e.g. checkpoints/demo_cpu")

    p_slurm = sub.add_parser("slurm", help="run the loop as Slurm jobs")
    slurm_sub = p_slurm.add_subparsers(dest="slurm_command", required=True)
    p_submit = slurm_sub.add_parser(
        "submit",
        help="submit the missing jobs of rounds up to --rounds, chained "
        "with afterok (re-run it after a failure: only what is missing goes)",
    )
    p_submit.add_argument("config")
    p_submit.add_argument("--rounds", type=int, required=True)
    p_submit.add_argument(
        "--dry-run", action="store_true", help="print the plan and the scripts, submit nothing"
    )
    p_submit.add_argument(
        "overrides", nargs="*", help="key=value config overrides (e.g. slurm.partition=gpu)"
    )


def add_push_command(sub) -> None:
    p_push = sub.add_parser("push", help="upload a round's exported model (and kept traces) to the HF Hub")
    p_push.add_argument("round_dir", help="e.g. checkpoints/demo_cpu/round_002")
    p_push.add_argument(
        "--repo-id", required=True, help="model repository; the round goes to branch round-NNN"
    )
    p_push.add_argument(
        "--dataset-repo-id", default="", help="also push the kept traces and their audio here"
    )
    p_push.add_argument(
        "--public", action="store_true", help="create new repositories public (default: private)"
    )
    p_push.add_argument(
        "--dry-run", action="store_true", help="print the files and the branch, upload nothing"
    )


def add_tool_commands(sub) -> None:
    """`make-tiny-model`, `data`: tools outside the loop."""
    p_tiny = sub.add_parser(
        "make-tiny-model", help="build a tiny random model of a supported family that vLLM loads"
    )
    p_tiny.add_argument("out")
    p_tiny.add_argument(
        "--family", default=TinyModelConfig.family, help="model family (distill/models): %(default)s"
    )

    p_data = sub.add_parser(
        "data", help="check or convert item sources (JSONL, MMAU JSON, datasets, parquet)"
    )
    data_sub = p_data.add_subparsers(dest="data_command", required=True)
    for name, text in (
        ("validate", "report every bad item (file, line, reason); exit 1 if any"),
        ("import", "convert a source to a distill JSONL manifest, setting bad items aside"),
    ):
        p = data_sub.add_parser(name, help=text)
        p.add_argument("source", help="manifest .jsonl, MMAU-style .json, save_to_disk folder or .parquet")
        if name == "import":
            p.add_argument("out", help="output manifest (.jsonl); bad items go to OUT.rejects.jsonl")
            p.add_argument("--strict", action="store_true", help="fail if any item is bad")
        else:
            p.add_argument("--rejects", help="also write the rejects as JSONL here")
        p.add_argument("--format", default="auto", help="auto, jsonl, mmau, hf_disk or parquet")
        p.add_argument(
            "--audio-root",
            default="",
            help="folder relative audio paths start from (default: the source's folder)",
        )
        p.add_argument(
            "--field",
            action="append",
            default=[],
            metavar="ITEM_FIELD=COLUMN",
            help="map a column the readers do not know (e.g. --field question=prompt_text)",
        )
        p.add_argument("--config", help="config whose data.audio policy and data.sample_rate apply")
        p.add_argument(
            "overrides", nargs="*", help="key=value config overrides (e.g. data.audio.max_seconds=10)"
        )


def data_command(args: argparse.Namespace) -> int:
    from data_pipelines.sources import Source
    from distill.config import load_data_config
    from distill.core.schema import ConfigError
    from distill.data import import_command, validate_command

    bad = [f for f in args.field if "=" not in f]
    if bad:
        raise ConfigError(f"--field {bad[0]!r}: expected ITEM_FIELD=COLUMN")
    overrides = [*args.overrides, *(["data.strict=true"] if getattr(args, "strict", False) else [])]
    data = load_data_config(args.config, overrides)
    source = Source(
        args.source, args.format, fields=dict(f.split("=", 1) for f in args.field), audio_root=args.audio_root
    )
    if args.data_command == "validate":
        return validate_command(data, source, Path(args.rejects) if args.rejects else None)
    return import_command(data, source, Path(args.out))


def stage_list(value: str) -> list[str]:
    """`sample`, or stages in order joined by commas (`export,eval`)."""
    stages = value.split(",")
    bad = [x for x in stages if x not in STAGE_NAMES]
    if bad:
        raise argparse.ArgumentTypeError(
            f"unknown stage(s) {', '.join(bad)} (known: {', '.join(STAGE_NAMES)})"
        )
    return stages


def round_dir_arg(value: str):
    """A round directory given on the command line (round_NNN inside a run directory)."""
    from distill.core.rundir import RoundDir

    path = Path(value)
    if not (path.name.startswith("round_") and path.name[6:].isdigit()):
        raise ValueError(f"{path}: not a round directory (round_NNN inside a run directory)")
    if not path.is_dir():
        raise ValueError(f"{path}: no such round directory")
    return RoundDir(path.parent, int(path.name[6:]))


def slurm_command(args: argparse.Namespace) -> int:
    """`distill slurm submit`: set the run up and submit the jobs of what is missing."""
    from distill import loop
    from distill.config import load_config
    from distill.core.locks import RUN_UNIT, unit_lock
    from distill.slurm import submit

    cfg = load_config(args.config, args.overrides)
    run = loop.RunDir(cfg.run_dir)
    if args.dry_run:  # changes nothing
        loop.check_resume(cfg, run)
        lines = submit(cfg, run, args.rounds, True)
    else:
        # The jobs run on the run's saved config, so the run is set up first (data validated, base
        # model built), unless a `distill run` holds it.
        with unit_lock(run.path, RUN_UNIT, exclusive=False):
            loop.init_run_dir(cfg, run)
            lines = submit(cfg, run, args.rounds, False)
    for line in lines:
        print(line)
    return 0


def engine_command(args: argparse.Namespace) -> int:
    """`distill run`, `stage`, `eval` and `export`: the commands that start engines and training."""
    from distill import loop
    from distill.config import load_config
    from distill.core.schema import ConfigError

    if args.command in ("eval", "export"):
        rd = round_dir_arg(args.round_dir)
        bad = [o for o in args.overrides if not o.startswith(f"{args.command}.")]
        if bad:
            raise ConfigError(
                f"{bad[0]}: distill {args.command} takes {args.command}.* overrides only (the rest is "
                "the run's)"
            )
        cfg = load_config(rd.path.parent / "config.yaml", args.overrides)
        run = loop.RunDir(rd.path.parent)
        if args.command == "eval":
            loop.evaluate_round(cfg, run, rd.index)
        else:
            print(f"serve it with: {loop.export_round(cfg, run, rd.index)['serve']}")
        return 0
    cfg = load_config(args.config, args.overrides)
    if args.command == "run":
        loop.run_loop(cfg)
    else:
        loop.run_stages(cfg, args.round, args.stage)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Overrides may also follow options (`stage sample CFG --round 1 key=value`): collect them.
    args, extra = parser.parse_known_args(argv)
    unknown = [e for e in extra if e.startswith("-") or "=" not in e]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if hasattr(args, "overrides"):
        args.overrides = [*args.overrides, *extra]
    from distill.core.schema import ConfigError

    try:
        if args.command == "make-tiny-model":
            from distill.models.config import TinyModelConfig
            from distill.models.registry import build_tiny_model, family_named

            family_named(args.family, "--family")
            print(build_tiny_model(args.out, TinyModelConfig(family=args.family)))
            return 0
        if args.command == "data":
            return data_command(args)
        if args.command == "report":
            from distill.report import write_report

            out = Path(args.out) if args.out else Path(args.run_dir) / "report.html"
            print(write_report(Path(args.run_dir), out, args.samples))
            return 0
        if args.command == "status":
            from distill.status import run_status

            print(run_status(Path(args.run_dir)))
            return 0
        if args.command == "push":
            from distill.export.hub import push_round

            rd = round_dir_arg(args.round_dir)
            for line in push_round(rd, args.repo_id, args.dataset_repo_id, not args.public, args.dry_run):
                print(line)
            return 0
        if args.command == "slurm":
            if args.rounds < 0:
                raise ConfigError(f"--rounds {args.rounds}: must be >= 0")
            args.overrides = [*args.overrides, f"loop.rounds={max(1, args.rounds)}"]
            return slurm_command(args)
        from distill.core.processes import owning_processes

        # run, stage, eval and export start processes (training ranks, engines): they end with this one.
        with owning_processes():
            return engine_command(args)
    except ConfigError as exc:
        print(f"distill: config error: {exc}", file=sys.stderr)
        return 2
    # Manifest, audio and export-gate errors are ValueError/RuntimeError subclasses.
    except (OSError, RuntimeError, ValueError) as exc:
        if os.environ.get("DISTILL_TRACEBACK"):
            raise
        print(f"distill: error: {exc}\n(set DISTILL_TRACEBACK=1 for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
