"""`llava-uta-quickstart`: ShapesWorld -> teacher CLIP -> UTA student -> LLaVA stages 1 and 2 -> LLaVA-Bench.

    llava-uta-quickstart                 # the default profile: LLaVA on SmolLM2 (about an hour on 2 CPU cores)
    llava-uta-quickstart --compare       # + MIM, feature distillation and CLS-only students, block and random
                                         #   masking, and LLaVA with the teacher's tower instead of UTA's
    llava-uta-quickstart --compare --llava-seeds 2   # every LLaVA tower trained with two seeds (the spread)
    llava-uta-quickstart --fast          # a small world and a few steps per stage (tests, about 3 minutes)
    llava-uta-quickstart --serve         # then open the web demo on the trained LLaVA
    llava-uta-quickstart --dry-run       # print each stage's shell command instead of running it

Each stage is a real run of one of the project's tools; a finished stage is skipped, so Ctrl-C and rerun
resumes. The results (markdown tables, PNG plots) go to RUNS/results.md and RUNS/plots/.
"""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

from llava_uta.argparsing import ArgumentParser
from llava_uta.quickstart.pipeline import Layout, Pipeline, RunState, run_stages
from llava_uta.quickstart.profiles import LANGUAGE_MODELS, Profile, get_profile
from llava_uta.quickstart.report import write_report

BUDGETS = [f.name for f in fields(Profile) if f.type == "int"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(prog="llava-uta-quickstart", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fast", action="store_true", help="the small profile used by the tests")
    parser.add_argument("--compare", action="store_true", help="also run the baselines and ablations")
    parser.add_argument("--ladder", action="store_true",
                        help="also run the shape ladder: stage 2 on the scenes in words, LLaVA on a symbolic tower, "
                        "and a probe of the UTA tower's merged tokens")
    parser.add_argument("--serve", action="store_true", help="finish by serving the web demo on the trained model")
    parser.add_argument("--dry-run", action="store_true",
                        help="print the equivalent shell command of every stage (done ones marked) and run nothing")
    parser.add_argument("--data", type=Path, help="ShapesWorld folder (default playground/data/shapes[-fast])")
    parser.add_argument("--runs", type=Path, help="outputs (default runs/shapes[-fast])")
    parser.add_argument("--lm", choices=sorted(LANGUAGE_MODELS),
                        help="the LLM LLaVA is built on (default: the profile's: smollm2, tiny with --fast)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--llava-seeds", type=int, default=1,
                        help="train and evaluate LLaVA on every tower with this many seeds (SEED, SEED + 1, ...): "
                        "the spread of the tower comparison; seed SEED keeps llava/TOWER, the others llava/TOWER-seedN")
    parser.add_argument("--host", default="127.0.0.1", help="with --serve")
    parser.add_argument("--port", type=int, default=7860, help="with --serve")
    for name in BUDGETS:
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, help="override the profile's budget")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    name = "fast" if args.fast else "default"
    suffix = "-fast" if args.fast else ""
    profile = get_profile(name, lm=args.lm, **{b: getattr(args, b) for b in BUDGETS})
    layout = Layout(args.data or Path(f"playground/data/shapes{suffix}"), args.runs or Path(f"runs/shapes{suffix}"))
    try:
        state = RunState(layout.state, profile, name)
        stages = Pipeline(layout, profile, args.seed, args.llava_seeds).stages(args.compare, args.ladder)
    except ValueError as err:
        raise SystemExit(f"llava-uta-quickstart: {err}") from None
    if args.dry_run:
        for stage in stages:
            print(f"# {stage.title}{' (done)' if state.done(stage) else ''}\n{stage.command()}")
        return
    layout.runs.mkdir(parents=True, exist_ok=True)
    run_stages(stages, state)
    print("\n" + write_report(layout, stages, state.data, name), end="")
    print(f"results: {layout.results} (plots in {layout.plots})")
    if args.serve:
        from llava_uta.serve.web import main as serve

        serve(["--model-path", str(layout.llava("uta", 2)), "--shapes-dir", str(layout.data),
               "--host", args.host, "--port", str(args.port)])


if __name__ == "__main__":
    main()
