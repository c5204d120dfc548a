"""`raydistill VERB ...`: the command-line entry point.

Exit codes: 0 success, 1 the work failed (for `submit`: the job FAILED or was STOPPED, or the
cluster could not be reached), 2 bad input (config key, file, flag).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from typing import TYPE_CHECKING

from raydistill import submit
from raydistill.config import (
    ClassifierJob,
    ConfigError,
    EvalJob,
    PairsJob,
    PipelineJob,
    SamplerConfig,
    TeacherJob,
    TrainJob,
    TuneJob,
    from_dict,
    load,
    read_config,
    with_absolute_paths,
)

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

    from raydistill.models.conditioning import Conditioning
    from raydistill.models.sampling import SamplingPolicy

EXIT_FAILED, EXIT_BAD_INPUT = 1, 2

PLANNED = {
    "pairs": "generate teacher pairs / targets into WebDataset shards on Ray actors",
    "train": "distill a student with Ray Train + DeepSpeed ZeRO",
    "eval": "score the teacher, plain solvers and students: FID / KID, or exact distances",
    "run": "the whole pipeline: teacher -> classifier -> students -> eval -> report",
    "tune": "search a training job's keys with Ray Tune's ASHA, each trial scored by FID",
    "verify": "recompute shard checksums and counts against the manifest",
    "submit": "run pairs, train or run on a Ray cluster as a Ray job; a job's status, logs, stop",
}


def _config_args(parser: argparse.ArgumentParser, out_help: str) -> None:
    parser.add_argument("--config", required=True, help="YAML config file")
    parser.add_argument("--out", required=True, help=out_help)
    parser.add_argument("overrides", nargs="*", metavar="key=value",
                        help="config overrides, e.g. optim.steps=200 model.unet.base_channels=64")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or step lines")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="raydistill",
        description="Distill diffusion models into fast few-step students on Ray clusters.")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    p = verbs.add_parser("teacher", help="train a class-conditional teacher (CFG via label dropout)")
    _config_args(p, "checkpoint directory to write")
    p.set_defaults(handler=cmd_teacher)

    p = verbs.add_parser("classifier", help="train the domain classifier (sample accuracy, FID "
                                            "features)")
    _config_args(p, "classifier directory to write")
    p.set_defaults(handler=cmd_classifier)

    p = verbs.add_parser("sample", help="class-conditional samples as a PNG grid or .npz arrays")
    p.add_argument("--checkpoint", required=True, help="teacher or student checkpoint directory")
    p.add_argument("--out", required=True,
                   help="FILE.png: a grid, one row per class; FILE.npz: uint8 images [N,H,W,C] as "
                        "arr_0 and labels as arr_1 (guided-diffusion's evaluator layout)")
    p.add_argument("--steps", type=int, help="solver steps (default: a distilled student's own "
                                             "step count, else 64)")
    p.add_argument("--w", type=float, help="guidance strength, 0 = conditional (default: the one "
                                           "a distilled student has built in, else 1, clamped "
                                           "into a w-conditioned student's range)")
    p.add_argument("--solver", default="ddim", help="ddim | heun | dpmpp_2m")
    p.add_argument("--spacing", default="uniform_t", help="uniform_t | uniform_logsnr")
    p.add_argument("--stochastic", action=argparse.BooleanOptionalAction,
                   help="Meng et al.'s stochastic few-step sampler instead of an ODE solver "
                        "(default: on for a student distilled for it, else off)")
    p.add_argument("--force-sampler", action="store_true",
                   help="sample a distilled student with settings it was not distilled for "
                        "(steps, solver, spacing, sampler, w outside its range)")
    p.add_argument("--per-class", type=int, default=8,
                   help="samples per class, or per prompt of a text model (one row each)")
    p.add_argument("--prompts", help="a text model's prompt table (encoder_hidden_states "
                                     "[P, L, D], .safetensors or .npy); default: the one it was "
                                     "distilled with")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--classifier", help="classifier directory: report how many samples it "
                                        "recognises as their intended class")
    p.set_defaults(handler=cmd_sample)

    p = verbs.add_parser("pairs", help=PLANNED["pairs"])
    _config_args(p, "output location: a path or a URI (file://, s3://, ...)")
    p.add_argument("--address", help="Ray cluster address (default: start Ray locally)")
    p.set_defaults(handler=cmd_pairs)

    p = verbs.add_parser("verify", help=PLANNED["verify"])
    p.add_argument("uri", help="pairs location written by `raydistill pairs`")
    p.add_argument("--repair", action="store_true",
                   help="regenerate the shards that fail from their seeds (the job recorded in "
                        "pairs.json), on Ray")
    p.add_argument("--address", help="Ray cluster address for --repair (default: start Ray "
                                     "locally)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=cmd_verify)

    p = verbs.add_parser("train", help=PLANNED["train"])
    _config_args(p, "run directory: DIR/student is the consolidated student")
    p.add_argument("--resume", action="store_true",
                   help="continue the stopped run in --out from its last checkpoint")
    p.add_argument("--address", help="Ray cluster address (default: start Ray locally)")
    p.add_argument("--dry-run", action="store_true",
                   help="one step on a tiny random model of the diffusers teacher's family "
                        "(written to DIR/teacher; the run in DIR/run), every other key as "
                        "configured (raydistill.dryrun)")
    p.set_defaults(handler=cmd_train)
    p = verbs.add_parser("eval", help=PLANNED["eval"])
    _config_args(p, "evaluation directory: DIR/eval.json, DIR/samples/ROW (reused by a re-run)")
    p.add_argument("--address", help="Ray cluster address (default: start Ray locally)")
    p.set_defaults(handler=cmd_eval)
    p = verbs.add_parser("run", help=PLANNED["run"])
    _config_args(p, "pipeline directory: one subdirectory per stage, report.md, metrics.json")
    p.add_argument("--preset", help="one of the config's presets (default: its default_preset)")
    p.add_argument("--address", help="Ray cluster address (default: start Ray locally)")
    p.add_argument("--check", action="store_true",
                   help="only check every stage's job and print the plan: each stage, what it "
                        "reads, its key settings and whether the run would reuse it; nothing "
                        "runs and nothing is written")
    p.set_defaults(handler=cmd_run)
    p = verbs.add_parser("tune", help=PLANNED["tune"])
    _config_args(p, "search directory: trials/, results.md, results.json, best.yaml")
    p.add_argument("--resume", action="store_true",
                   help="continue the stopped search in --out (finished trials are kept)")
    p.add_argument("--address", help="Ray cluster address (default: start Ray locally)")
    p.set_defaults(handler=cmd_tune)
    p = verbs.add_parser("export", help="a student of a diffusers teacher as a diffusers UNet "
                                        "directory and DDIMScheduler config")
    p.add_argument("--checkpoint", required=True, help="student checkpoint directory")
    p.add_argument("--format", required=True, choices=["diffusers"], help="the export format")
    p.add_argument("--out", required=True, help="directory to write: unet/, scheduler/, "
                                                "raydistill.json (and lora/ for a student "
                                                "trained with memory.lora)")
    p.add_argument("--w", type=float, help="the guidance strength to build into a w-conditioned "
                                           "UNet2DModel student (it has no guidance input)")
    p.set_defaults(handler=cmd_export)
    _submit_parser(verbs.add_parser(
        "submit", help=PLANNED["submit"], formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Run a jobs/ entrypoint on a Ray cluster with the Ray Job Submission SDK: the "
                    "working directory\nis uploaded, the job's logs are streamed, and the command "
                    "exits 0 if the job SUCCEEDED,\n1 if it FAILED or was STOPPED. Or look after a "
                    "job by its id.",
        epilog="examples:\n"
               "  raydistill submit pairs --address http://HEAD:8265 -- \\\n"
               "      --config configs/smoke/pairs.yaml --out s3://bucket/pairs\n"
               "  raydistill submit run --no-wait -- --config configs/digits/pipeline.yaml "
               "--out /shared/runs/digits\n"
               "  raydistill submit logs raysubmit_XYZ --follow    # --address or $RAY_ADDRESS "
               "names the cluster"))
    return parser


def _submit_parser(p: argparse.ArgumentParser) -> None:
    actions = p.add_subparsers(dest="submit_verb", metavar="JOB | ACTION", required=True)
    cluster = argparse.ArgumentParser(add_help=False)
    cluster.add_argument("--address", help="the cluster's job server: the head's dashboard, e.g. "
                                           "http://HEAD:8265 (default: $RAY_ADDRESS)")
    for job, script in submit.JOBS.items():
        q = actions.add_parser(
            job, aliases=[script], parents=[cluster],
            help=f"python jobs/{script}.py ARGS on the cluster: `raydistill {job} ARGS` there",
            description=f"Run `python jobs/{script}.py ARGS` (`raydistill {job} ARGS`) on a Ray "
                        "cluster as a Ray job, streaming its logs to stdout; exit 0 if it "
                        "SUCCEEDED, 1 if it FAILED or was STOPPED. Ctrl-C stops following, not the "
                        "job. Paths in ARGS are read on the cluster, relative to the working "
                        "directory: outputs belong on storage every node reads (s3://, a shared "
                        "filesystem).")
        q.add_argument("--working-dir", default=submit.checkout_root(), metavar="DIR",
                       help="directory uploaded with the job, its current directory there, and "
                            "first on its PYTHONPATH (default: the checkout raydistill runs from, "
                            "%(default)s); .git, .venv, runs/, caches and what .gitignore lists "
                            "stay behind")
        q.add_argument("--runtime-env", metavar="FILE",
                       help="YAML or JSON mapping of further Ray runtime_env keys (env_vars, pip, "
                            "conda, excludes, ...)")
        q.add_argument("--pip", action="append", default=[], metavar="PACKAGE",
                       help="a pip requirement installed for the job (repeatable)")
        q.add_argument("--entrypoint-gpus", type=float, metavar="N",
                       help="GPUs reserved for the job's driver process, which then runs on a GPU "
                            "node: `run` trains the teacher and the classifier there")
        q.add_argument("--job-id", help="the job's submission id (default: one Ray makes up)")
        q.add_argument("--no-wait", action="store_true",
                       help="print the job id and return once the job is submitted")
        q.add_argument("args", nargs="*", metavar="-- ARGS",
                       help=f"the arguments of `raydistill {job}`, after --")
        q.set_defaults(handler=cmd_submit, submit_action=_submit_job, job=job)
    q = actions.add_parser("status", parents=[cluster],
                           help="a job's status; exit 1 if it FAILED or was STOPPED")
    q.add_argument("job_id", metavar="JOB_ID")
    q.set_defaults(handler=cmd_submit, submit_action=_submit_status)
    q = actions.add_parser("logs", parents=[cluster], help="a job's logs so far, or --follow them")
    q.add_argument("job_id", metavar="JOB_ID")
    q.add_argument("--follow", action="store_true",
                   help="stream the logs until the job ends; exit as a waited submit does")
    q.set_defaults(handler=cmd_submit, submit_action=_submit_logs)
    q = actions.add_parser("stop", parents=[cluster],
                           help="stop a job (SIGTERM, then SIGKILL) and wait until it has ended; "
                                f"exit 1 if it has not within {submit.STOP_WAIT_S:g} s")
    q.add_argument("job_id", metavar="JOB_ID")
    q.set_defaults(handler=cmd_submit, submit_action=_submit_stop)


def cmd_teacher(args: argparse.Namespace) -> int:
    from raydistill.models.checkpoint import check_replaceable
    from raydistill.pretrain.teacher import train_teacher

    job = load(TeacherJob, args.config, args.overrides)
    if job.pretrained is not None:
        raise ConfigError("pretrained", "names a teacher to distil in a pipeline (raydistill run); "
                                        "raydistill teacher trains one")
    check_replaceable(args.out)
    result = train_teacher(job, args.out, progress=not args.quiet)
    print(f"teacher: wrote {args.out} (fingerprint {result.fingerprint[:12]}, held-out loss "
          f"{result.eval_loss_start:.4f} -> {result.eval_loss_end:.4f}); preview "
          f"{os.path.join(args.out, 'preview.png')}")
    return 0


def cmd_classifier(args: argparse.Namespace) -> int:
    from raydistill.models.checkpoint import check_replaceable
    from raydistill.pretrain.classifier import train_classifier

    job = load(ClassifierJob, args.config, args.overrides)
    check_replaceable(args.out)
    result = train_classifier(job, args.out, progress=not args.quiet)
    print(f"classifier: wrote {args.out} (held-out accuracy {result.test_accuracy:.2%}, "
          f"train {result.train_accuracy:.2%})")
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from raydistill.devices import resolve_device
    from raydistill.models import load_checkpoint, load_classifier
    from raydistill.sampling import sample_classes, save_arrays, save_grid

    flags = _sampler_flags(args)
    if not os.path.isdir(args.checkpoint):
        raise ConfigError("--checkpoint", f"no such directory: {args.checkpoint}")
    if args.classifier and not os.path.isdir(args.classifier):
        raise ConfigError("--classifier", f"no such directory: {args.classifier}")
    if not args.out.lower().endswith((".png", ".npz")):
        raise ConfigError("--out", f"must be a .png (grid) or .npz (arrays) file, got {args.out}")
    device = resolve_device(args.device, "--device")
    checkpoint = load_checkpoint(args.checkpoint)
    if checkpoint.config.kind not in ("unet", "diffusers"):
        raise ConfigError("--checkpoint", "sample grids need an image model, not a "
                                          f"{checkpoint.config.kind}")
    policy = checkpoint.sampling
    sampler, stochastic = _sampler(args, policy, flags)
    conditioning = _conditioning(args, checkpoint.conditioning)
    classifier = load_classifier(args.classifier)[0] if args.classifier else None
    checkpoint.network.to(device)
    if conditioning.autoencoder is not None:
        conditioning.autoencoder.to(device)
    images, labels = sample_classes(checkpoint.w_denoiser, checkpoint.denoiser.schedule,
                                    shape=checkpoint.data_shape,
                                    conditions=conditioning.conditions, sampler=sampler,
                                    seed=args.seed, device=device,
                                    stochastic=policy.stochastic_sampler if stochastic else None)
    images = conditioning.images(images).clamp(-1, 1)       # a latent model's decoded
    if args.out.lower().endswith(".npz"):
        save_arrays(images, labels, args.out)
    else:
        save_grid(images, conditioning.num_classes, args.out)
    how = policy.stochastic_solver if stochastic else sampler.solver
    line = f"sample: wrote {args.out} ({len(labels)} samples, {sampler.steps} {how} steps, " \
           f"w={sampler.w:g})"
    if classifier is not None:
        line += f"; classifier recognises {classifier.accuracy(images, labels):.1%} as intended"
    print(line)
    return 0


def _sampler_flags(args: argparse.Namespace) -> SamplerConfig:
    """The sampler `raydistill sample`'s flags give, checked before the model loads (the steps and
    w not given are the model's: `_sampler`)."""
    fields = {"steps": 1 if args.steps is None else args.steps,
              "w": 1.0 if args.w is None else args.w, "solver": args.solver,
              "spacing": args.spacing, "per_class": args.per_class}
    try:
        return from_dict(SamplerConfig, fields)
    except ConfigError as err:
        raise ConfigError("--" + err.key.replace("_", "-"), err.message) from None


def _sampler(args: argparse.Namespace, policy: SamplingPolicy,
             flags: SamplerConfig) -> tuple[SamplerConfig, bool]:
    """The sampler and whether it is stochastic: the flags given, the model's sampling policy's
    defaults for the rest, refused (naming the flag) where the policy forbids them unless
    --force-sampler."""
    sampler = dataclasses.replace(
        flags, steps=policy.default_steps(64) if args.steps is None else flags.steps,
        w=policy.default_w if args.w is None else flags.w)
    stochastic = policy.default_stochastic if args.stochastic is None else args.stochastic
    force = {"force": args.force_sampler, "force_key": "--force-sampler"}
    policy.check_guidance(sampler.w, sampler.w, "--w", **force)
    policy.check_sampler(steps=sampler.steps, solver=sampler.solver, spacing=sampler.spacing,
                         stochastic=stochastic, **force,
                         keys={"steps": "--steps", "solver": "--solver", "spacing": "--spacing",
                               "stochastic": "--stochastic" if stochastic else "--no-stochastic"})
    return sampler, stochastic


def _conditioning(args: argparse.Namespace, conditioning: Conditioning) -> Conditioning:
    """The model's conditioning with the prompt table --prompts gives (a text model needs one,
    recorded or given), its problems named as --prompts'."""
    if args.prompts:
        if not conditioning.text:
            raise ConfigError("--prompts", "the model is not text-conditioned")
        conditioning = conditioning.with_prompts(args.prompts)
    if conditioning.text and not conditioning.prompts:
        raise ConfigError("--prompts", "is required: the model is text-conditioned and records "
                                       "no prompt table")
    try:
        conditioning.conditions                                  # noqa: B018  (checks the table)
    except ConfigError as err:
        raise ConfigError("--prompts", err.message) from None
    return conditioning


def cmd_pairs(args: argparse.Namespace) -> int:
    from raydistill.cluster import init_ray
    from raydistill.pairs.pool import plan_pairs, run_pairs

    job = with_absolute_paths(load(PairsJob, args.config, args.overrides))
    plan = plan_pairs(job, args.out)
    for name, why in plan.lost.items():
        print(f"pairs: {name} is listed in the manifest but {why}: regenerating it")
    if plan.todo:
        init_ray(args.address)
    result = run_pairs(plan, progress=not args.quiet)
    print(f"pairs: {result.generated} shards generated in {result.seconds:.1f} s "
          f"({result.pairs_per_second:.1f} pairs/s, {result.teacher_evaluations:,} teacher "
          f"evaluations); {args.out} holds {result.total} shards")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from raydistill.train.driver import TrainingFailed, train

    out = args.out
    if args.dry_run:
        from raydistill.dryrun import dry_run_job

        if args.resume:
            raise ConfigError("--resume", "a dry run starts afresh: leave out --resume")
        if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
            raise ConfigError(out, "is not empty; a dry run needs a new --out")
        job, line = dry_run_job(read_config(args.config, args.overrides), out)
        out = os.path.join(out, "run")
        print(line, flush=True)
    else:
        job = load(TrainJob, args.config, args.overrides)
    try:
        result = train(job, out, resume=args.resume, address=args.address,
                       progress=not args.quiet)
    except TrainingFailed as err:
        print(f"raydistill train: error: {err}", file=sys.stderr)
        return EXIT_FAILED
    metrics = result.metrics
    print(f"train: {job.method} student after {result.steps} steps (loss {metrics['loss']:.4g}; "
          f"{metrics['nan_skipped']} non-finite micro-batches skipped; resumed "
          f"{metrics['resumes']} times): {result.student}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from raydistill.cluster import init_ray
    from raydistill.eval.evaluate import evaluate

    job = with_absolute_paths(load(EvalJob, args.config, args.overrides))
    init_ray(args.address)
    report = evaluate(job, args.out, progress=not args.quiet)
    print(f"eval: {len(report['rows'])} samplers scored on {job.num_samples} samples each at "
          f"w={job.w:g} ({report['metric'].split(':')[0]}); {os.path.join(args.out, 'eval.json')}")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from raydistill.pipeline.plan import format_plan
    from raydistill.pipeline.report import write_report
    from raydistill.pipeline.run import Pipeline
    from raydistill.train.driver import TrainingFailed

    job = load(PipelineJob, args.config, args.overrides, preset=args.preset)
    pipeline = Pipeline(job, args.out, address=args.address, progress=not args.quiet)
    plan = pipeline.check()
    if args.check:
        reused = sum(p.verdict.startswith("reused") for p in plan)
        print(f"run --check: {len(plan)} stages checked, every job valid; {len(plan) - reused} "
              f"would run, {reused} be reused ({pipeline.out})\n{format_plan(plan)}")
        return 0
    try:
        outcomes = pipeline.run()
    except TrainingFailed as err:
        print(f"raydistill run: error: {err}", file=sys.stderr)
        return EXIT_FAILED
    finally:                         # the report states what finished, and only that
        if os.path.isdir(pipeline.out):
            write_report(pipeline.out, pipeline.stages,
                         {o.name: o.ran for o in pipeline.outcomes}, job.goals)
    ran = [o.name for o in outcomes if o.ran]
    print(f"run: {len(outcomes)} stages done ({len(ran)} ran, {len(outcomes) - len(ran)} reused); "
          f"{os.path.join(pipeline.out, 'report.md')}")
    return 0


def cmd_tune(args: argparse.Namespace) -> int:
    from raydistill.pipeline.tune import BEST, RESULTS, tune
    from raydistill.train.driver import TrainingFailed

    job = load(TuneJob, args.config, args.overrides)
    try:
        results = tune(job, args.out, resume=args.resume, address=args.address, quiet=args.quiet)
    except TrainingFailed as err:
        print(f"raydistill tune: error: {err}", file=sys.stderr)
        return EXIT_FAILED
    stopped = sum(t["stopped_early"] for t in results["trials"])
    failed = sum(t["error"] is not None for t in results["trials"])
    best = f"best {results['best']}: {os.path.join(args.out, BEST)}" if results["best"] \
        else "no trial reached the last rung"
    print(f"tune: {len(results['trials'])} trials ({stopped} stopped early, {failed} failed); "
          f"{best}; {os.path.join(args.out, RESULTS)}.md")
    return EXIT_FAILED if results["best"] is None else 0


def cmd_export(args: argparse.Namespace) -> int:
    from safetensors.torch import load_file

    from raydistill.models.checkpoint import load_checkpoint
    from raydistill.models.export import export_diffusers
    from raydistill.models.lora import ADAPTER_FILE

    if not os.path.isdir(args.checkpoint):
        raise ConfigError("--checkpoint", f"no such directory: {args.checkpoint}")
    kept = os.path.join(args.checkpoint, ADAPTER_FILE)
    record = export_diffusers(load_checkpoint(args.checkpoint), args.out, w=args.w,
                              adapters=load_file(kept) if os.path.isfile(kept) else None)
    how = f"{record['steps']} DDIM steps" if record["steps"] else "any number of DDIM steps"
    built_in = f", w={record['w_built_in']:g} built in" if record["w_built_in"] is not None else ""
    lora = f"; its LoRA for the teacher's UNet: {record['lora']}" if record["lora"] else ""
    print(f"export: wrote {args.out} (diffusers {how}{built_in}{lora})")
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from raydistill.pairs.verify import verify_pairs

    report = verify_pairs(args.uri)
    if report.ok:
        print(f"verify: ok: {report.summary()}")
        return 0
    for problem in report.problems:
        print(f"verify: {problem}", file=sys.stderr)
    if args.repair and report.bad:
        report = _repair(args, sorted(report.bad))
        if report.ok:
            print(f"verify: ok after repair: {report.summary()}")
            return 0
    print(f"verify: {len(report.problems)} bad or missing shards; {report.summary()}",
          file=sys.stderr)
    return EXIT_FAILED


def _repair(args: argparse.Namespace, bad: list[str]):
    """Regenerate `bad` shards from their seeds with the job recorded in the pair set (checked in
    full before any shard is dropped), then verify again."""
    from raydistill.cluster import init_ray
    from raydistill.pairs.pool import plan_pairs, run_pairs
    from raydistill.pairs.verify import forget_shards, recorded_job, verify_pairs

    job = recorded_job(args.uri)
    plan_pairs(job, args.uri)
    forget_shards(args.uri, bad)
    plan = plan_pairs(job, args.uri)
    init_ray(args.address)
    result = run_pairs(plan, progress=not args.quiet)
    print(f"verify: regenerated {result.generated} shards from their seeds ({', '.join(bad)})")
    return verify_pairs(args.uri)


def cmd_submit(args: argparse.Namespace) -> int:
    """`raydistill submit JOB | ACTION`: a cluster that cannot be reached or refuses a request is
    one line on stderr and exit 1."""
    try:
        with submit.quiet_sdk():
            return args.submit_action(args)
    except submit.ClusterError as err:
        print(f"raydistill submit: error: {err}", file=sys.stderr)
        return EXIT_FAILED


def _submit_job(args: argparse.Namespace) -> int:
    env = submit.runtime_env(args.job, args.working_dir, args.runtime_env, args.pip)
    command = submit.entrypoint(args.job, args.args)
    client = submit.connect(args.address)
    job_id = submit.submit_job(client, command, env, job_id=args.job_id,
                               entrypoint_gpus=args.entrypoint_gpus)
    if args.no_wait:
        print(job_id)
        print(f"submit: {job_id} submitted; follow it with `{_again('logs', job_id, args)} "
              f"--follow`", file=sys.stderr)
        return 0
    print(f"submit: {job_id} submitted: {command}", file=sys.stderr)
    return _follow(client, job_id, args)


def _follow(client: JobSubmissionClient, job_id: str, args: argparse.Namespace) -> int:
    try:
        info = submit.follow(client, job_id)
    except KeyboardInterrupt:
        print(f"submit: stopped following {job_id}; the job keeps running (stop it with "
              f"`{_again('stop', job_id, args)}`)", file=sys.stderr)
        return EXIT_FAILED
    print(f"submit: {submit.summary(job_id, info)}", file=sys.stderr)
    return submit.exit_code(info)


def _again(action: str, job_id: str, args: argparse.Namespace) -> str:
    """The command line that runs `action` on the job, against the same cluster."""
    return f"raydistill submit {action} {job_id}" + (f" --address {args.address}"
                                                     if args.address else "")


def _submit_status(args: argparse.Namespace) -> int:
    client = submit.connect(args.address)
    with submit.sdk_errors():
        info = client.get_job_info(args.job_id)
    print(f"submit: {submit.summary(args.job_id, info)}")
    return submit.exit_code(info)


def _submit_logs(args: argparse.Namespace) -> int:
    client = submit.connect(args.address)
    if args.follow:
        return _follow(client, args.job_id, args)
    with submit.sdk_errors():
        sys.stdout.write(client.get_job_logs(args.job_id))
    return 0


def _submit_stop(args: argparse.Namespace) -> int:
    client = submit.connect(args.address)
    with submit.sdk_errors():
        client.stop_job(args.job_id)
    info = submit.wait(client, args.job_id, submit.STOP_WAIT_S)
    if not info.status.is_terminal():
        print(f"raydistill submit: error: {args.job_id} is still {info.status.value} "
              f"{submit.STOP_WAIT_S:g} s after the stop request (Ray stops a job that waits for "
              f"resources once it gets them)", file=sys.stderr)
        return EXIT_FAILED
    print(f"submit: {submit.summary(args.job_id, info)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except ConfigError as err:
        print(f"raydistill {args.verb}: error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"raydistill {args.verb}: interrupted", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
