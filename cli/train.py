"""`adapterhub train` (a recipe, flags override its fields) and `adapterhub eval` (base, adapter, data)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from cli.common import print_json, run_cli


def _quiet_optional_kernels() -> None:
    # bitsandbytes warns at import that an optional CPU kernel package is absent; nothing is wrong.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def _print_summary(record: dict, output_dir: Path) -> None:
    m = record["metrics"]

    def fmt(v: float | None, spec: str) -> str:
        return "n/a" if v is None else format(v, spec)

    typer.echo(f"adapter written to {output_dir}")
    typer.echo(f"{'':>10} {'loss':>9} {'ppl':>9} {'exact':>7}")
    for who in ("base", "adapter"):
        x = m[who]
        typer.echo(
            f"{who:>10} {fmt(x['loss'], '.4f'):>9} {fmt(x['perplexity'], '.2f'):>9} "
            f"{fmt(x['exact_match'], '.3f'):>7}"
        )
    g = m["transfer_gain"]
    typer.echo(f"{'gain':>10} {fmt(g['loss'], '+.4f'):>9} {'':>9} {fmt(g['exact_match'], '+.3f'):>7}")
    procs = record.get("processes", {}).get("world_size", 1)
    typer.echo(
        f"{record['steps']} steps in {record['train_seconds']:.1f}s "
        f"({record['tokens_per_second']} tokens/s"
        + (f" over {procs} processes" if procs > 1 else "")
        + f"), peak RSS {record['peak_rss_mb']:.0f} MiB"
        + (" (main process)" if procs > 1 else "")
    )
    for w in record.get("warnings", []):
        typer.secho(f"WARNING: {w}", err=True, fg=typer.colors.RED, bold=True)


def register(app: typer.Typer) -> None:
    @app.command("train")
    @run_cli
    def train_cmd(
        recipe: Annotated[Path, typer.Argument(help="recipe YAML (examples: adapters/)")],
        base: Annotated[
            str | None, typer.Option(help="base model directory ('embedded': the built-in one)")
        ] = None,
        method: Annotated[str | None, typer.Option(help="lora or qlora")] = None,
        data: Annotated[Path | None, typer.Option(help="training JSONL")] = None,
        eval_data: Annotated[
            Path | None, typer.Option(help="held-out JSONL (default: split off data)")
        ] = None,
        rank: Annotated[int | None, typer.Option(help="LoRA rank")] = None,
        alpha: Annotated[float | None, typer.Option(help="LoRA alpha")] = None,
        dropout: Annotated[float | None, typer.Option(help="LoRA dropout")] = None,
        target_modules: Annotated[
            str | None, typer.Option(help="'all-linear' or comma-separated module names")
        ] = None,
        layers: Annotated[str | None, typer.Option(help="layers_to_transform, comma-separated")] = None,
        learning_rate: Annotated[float | None, typer.Option("--learning-rate", "--lr")] = None,
        epochs: Annotated[float | None, typer.Option()] = None,
        max_steps: Annotated[int | None, typer.Option()] = None,
        batch_size: Annotated[int | None, typer.Option()] = None,
        grad_accum: Annotated[int | None, typer.Option(help="gradient_accumulation_steps")] = None,
        max_seq_len: Annotated[int | None, typer.Option()] = None,
        seed: Annotated[int | None, typer.Option()] = None,
        eval_fraction: Annotated[float | None, typer.Option()] = None,
        output_dir: Annotated[Path | None, typer.Option(help="default: runs/<name>")] = None,
        device: Annotated[str | None, typer.Option(help="auto, cpu or cuda")] = None,
        format: Annotated[
            str | None,
            typer.Option(help="auto, prompt_completion, chat (OpenAI messages), alpaca, sharegpt or text"),
        ] = None,
        skip_bad_lines: Annotated[
            bool | None, typer.Option("--skip-bad-lines", help="skip and report bad records")
        ] = None,
        overlong: Annotated[
            str | None, typer.Option(help="examples over max_seq_len: truncate or drop")
        ] = None,
        processes: Annotated[
            int, typer.Option(help="data-parallel processes on this machine (gloo on CPU, NCCL on GPUs)")
        ] = 1,
        set_: Annotated[
            list[str] | None,
            typer.Option("--set", help="any recipe field: --set warmup_steps=10 (repeatable)"),
        ] = None,
        resume: Annotated[bool, typer.Option("--resume", help="continue from the newest checkpoint")] = False,
        verbose: Annotated[
            bool, typer.Option("--verbose", help="also show third-party warnings and loader bars")
        ] = False,
        overwrite: Annotated[
            bool, typer.Option("--overwrite", help="replace a previous run in output_dir")
        ] = False,
        progress: Annotated[bool, typer.Option("--progress/--no-progress")] = True,
        as_json: Annotated[bool, typer.Option("--json", help="print the training record as JSON")] = False,
    ) -> None:
        """Train a LoRA/QLoRA adapter from a recipe; flags override the recipe's fields."""
        _quiet_optional_kernels()
        import sys

        from adapterhub_lite.training import load_recipe, recipe_overrides, train
        from adapterhub_lite.training.launch import child_argv, launch_processes

        flags = dict(
            base=base, method=method, data=data, eval_data=eval_data, rank=rank, alpha=alpha,
            dropout=dropout, target_modules=target_modules, layers_to_transform=layers,
            learning_rate=learning_rate, epochs=epochs, max_steps=max_steps, batch_size=batch_size,
            gradient_accumulation_steps=grad_accum, max_seq_len=max_seq_len, seed=seed,
            eval_fraction=eval_fraction, output_dir=output_dir, device=device, format=format,
            skip_bad_lines=skip_bad_lines, overlong=overlong,
        )  # fmt: skip
        loaded = load_recipe(recipe, recipe_overrides(flags, set_))
        if processes != 1:  # the children print the summary (the main one) or their error
            launch_processes(processes, child_argv(sys.argv), loaded.resolved_output_dir)
            return
        from adapterhub_lite.quiet import quiet_third_party

        with quiet_third_party(verbose):
            result = train(loaded, resume=resume, progress=progress, overwrite=overwrite)
        if not result.main:
            return
        if as_json:
            print_json(result.record)
        else:
            _print_summary(result.record, result.output_dir)

    @app.command("eval")
    @run_cli
    def eval_cmd(
        data: Annotated[Path, typer.Option(help="JSONL in a training format; every line is evaluated")],
        base: Annotated[
            str | None, typer.Option(help="base model directory (default: the adapter's base, else embedded)")
        ] = None,
        adapter: Annotated[
            Path | None, typer.Option(help="PEFT adapter or bundle directory; omitted: the base alone")
        ] = None,
        format: Annotated[
            str, typer.Option(help="auto, prompt_completion, chat (OpenAI messages), alpaca, sharegpt, text")
        ] = "auto",
        quantization: Annotated[
            str | None, typer.Option(help="none or nf4 (default: nf4 for a QLoRA adapter, else none)")
        ] = None,
        device: Annotated[str | None, typer.Option(help="cpu or cuda (default: cuda if present)")] = None,
        max_seq_len: Annotated[int, typer.Option()] = 512,
        max_new_tokens: Annotated[int, typer.Option(help="generation budget for exact match")] = 16,
        exact_match: Annotated[
            bool | None,
            typer.Option("--exact-match/--no-exact-match", help="default: on where every answer is short"),
        ] = None,
        predictions: Annotated[
            bool, typer.Option("--predictions", help="include every generated answer")
        ] = False,
        as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
        verbose: Annotated[
            bool, typer.Option("--verbose", help="also show third-party warnings and loader bars")
        ] = False,
    ) -> None:
        """Loss, perplexity and exact match of a base (and base + adapter, with the transfer gain)."""
        _quiet_optional_kernels()
        from adapterhub_lite.evaluation import evaluate_file
        from adapterhub_lite.quiet import quiet_third_party

        with quiet_third_party(verbose):
            report = evaluate_file(
                data,
                base=base,
                adapter=adapter,
                format=format,
                quantization=quantization,
                device=device,
                max_seq_len=max_seq_len,
                max_new_tokens=max_new_tokens,
                exact_match=exact_match,
                with_predictions=predictions,
            )
        if as_json:
            print_json(report)
            return
        typer.echo(f"data: {report['data']['path']} ({report['data']['examples']} examples)")
        typer.echo(f"base: {report['base']['path']} {report['base']['fingerprint'][:19]}")
        if report["adapter"]:
            typer.echo(f"adapter: {report['adapter']['path']}")
        for who, m in report["metrics"].items():
            if who == "transfer_gain":
                em = "n/a" if m["exact_match"] is None else f"{m['exact_match']:+.3f}"
                typer.echo(f"{'gain':>8}: loss {m['loss']:+.4f}  exact_match {em}")
                continue
            em = "n/a" if m["exact_match"] is None else f"{m['exact_match']:.3f}"
            typer.echo(f"{who:>8}: loss {m['loss']:.4f}  perplexity {m['perplexity']:.2f}  exact_match {em}")
        if report.get("negative_transfer"):
            typer.secho(
                "WARNING: negative transfer: the adapter is worse than the base here",
                err=True,
                fg=typer.colors.RED,
                bold=True,
            )
