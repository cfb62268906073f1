"""`adapterhub pack`, `verify`, `sign` and `keys ...`: making and checking adapter bundles."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from adapterhub_lite.display import safe
from cli.common import print_json, run_cli

_TRUSTED_HELP = (
    "public key (hex, .pub file or key name) whose signature is required; repeat or comma-separate"
)


def _split(values: list[str] | None) -> list[str]:
    return [v.strip() for item in values or [] for v in item.split(",") if v.strip()]


def register(app: typer.Typer) -> None:
    @app.command("pack")
    @run_cli
    def pack(
        adapter_dir: Annotated[
            Path,
            typer.Argument(
                help="a PEFT LoRA adapter directory (`adapterhub train` "
                "output or any PEFT save_pretrained directory)"
            ),
        ],
        out: Annotated[
            Path | None,
            typer.Option(
                "--out",
                "-o",
                help="bundle path; a name ending .tar writes one archive file; "
                "default ./NAME-VERSION.bundle (or .bundle.tar with --archive)",
            ),
        ] = None,
        namespace: Annotated[
            str, typer.Option("--namespace", "-n", envvar="ADAPTERHUB_NAMESPACE", help="owner namespace")
        ] = "local",
        name: Annotated[str | None, typer.Option(help="adapter name; default: the directory name")] = None,
        version: Annotated[str, typer.Option("--version", "-v", help="semantic version")] = "0.1.0",
        base: Annotated[
            str | None,
            typer.Option(
                help="base model directory it was trained on; default: the "
                "training record's base, else the embedded base"
            ),
        ] = None,
        license: Annotated[str, typer.Option(help="license id for the adapter card")] = "apache-2.0",
        description: Annotated[str, typer.Option(help="one-paragraph description")] = "",
        tag: Annotated[list[str] | None, typer.Option("--tag", help="search tag (repeatable)")] = None,
        sign: Annotated[str | None, typer.Option("--sign", help="sign with this key (name or file)")] = None,
        max_lora_rank: Annotated[
            int | None, typer.Option(help="refuse ranks above the server's limit")
        ] = None,
        archive: Annotated[
            bool, typer.Option("--archive", help="write one reproducible .tar file (implied by -o NAME.tar)")
        ] = False,
        as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    ) -> None:
        """Pack an adapter directory into a verified bundle pinned to its base model."""
        from adapterhub_lite.bundles import check_bundle, pack_bundle

        name = name or adapter_dir.resolve().name
        warnings: list[str] = []
        archive = archive or (out is not None and out.name.endswith(".tar"))  # `-o geo.tar`: an archive
        out = out or Path(f"{name}-{version}.bundle" + (".tar" if archive else ""))
        pack_bundle(
            adapter_dir,
            out,
            namespace=namespace,
            name=name,
            version=version,
            base_dir=base,
            license=license,
            signing_key=sign,
            max_lora_rank=max_lora_rank,
            archive=archive,
            description=description,
            tags=tag or [],
            progress=not as_json,
            on_warning=warnings.append,
        )
        m = check_bundle(out, vllm_check=False).manifest
        if as_json:
            print_json(
                {
                    "path": str(out),
                    "ref": m.ref,
                    "digest": m.digest,
                    "base": m.base.model_dump(),
                    "warnings": warnings,
                }
            )
        else:
            typer.echo(
                f"packed {m.ref} -> {safe(out, None)}\n  digest {m.digest}\n"
                f"  base   {safe(m.base.name)} ({m.base.fingerprint})"
            )
            for line in warnings:
                typer.echo(f"warning: {safe(line, 400)}", err=True)

    @app.command("verify")
    @run_cli
    def verify(
        bundle: Annotated[Path, typer.Argument(help="a bundle directory or archive")],
        base: Annotated[
            str | None, typer.Option(help="refuse unless the bundle is for this base model")
        ] = None,
        max_lora_rank: Annotated[int | None, typer.Option(help="the server's --max-lora-rank")] = None,
        trusted_keys: Annotated[list[str] | None, typer.Option("--trusted-keys", help=_TRUSTED_HELP)] = None,
        no_vllm: Annotated[bool, typer.Option("--no-vllm", help="skip asking vLLM's own validator")] = False,
        as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    ) -> None:
        """Check a bundle: schema, hashes, card, signatures, base match and vLLM compatibility."""
        from tqdm import tqdm

        from adapterhub_lite.bundles import check_bundle

        with tqdm(unit="B", unit_scale=True, desc=f"verify {bundle.name}", disable=as_json) as bar:
            result = check_bundle(
                bundle,
                progress=bar.update,
                base_dir=base,
                max_lora_rank=max_lora_rank,
                trusted_keys=_split(trusted_keys),
                vllm_check=False if no_vllm else None,
            )
        m = result.manifest
        if as_json:
            print_json(
                {
                    "ok": True,
                    "ref": m.ref,
                    "digest": m.digest,
                    "form": result.form,
                    "signers": result.signers,
                    "base_checked": result.base_checked,
                    "warnings": result.warnings,
                    "manifest": m.model_dump(mode="json"),
                }
            )
        else:
            # Everything but the digests and counts comes from the bundle: escaped, bounded.
            targets = safe(", ".join(m.adapter.target_modules))
            typer.echo(
                f"ok: {m.ref} ({result.form})\n  digest  {m.digest}\n  base    {safe(m.base.name)} "
                f"({m.base.fingerprint}){' shapes checked' if result.base_checked else ''}\n"
                f"  adapter rank {m.adapter.rank} on {targets}, {m.adapter.parameter_count:,} parameters\n"
                f"  license {safe(m.license)}\n"
                f"  signed  {', '.join(result.signers) or 'no'}"
            )
            for line in result.warnings:
                typer.echo(f"warning: {safe(line, 400)}", err=True)

    @app.command("sign")
    @run_cli
    def sign_cmd(
        bundle: Annotated[Path, typer.Argument(help="a bundle directory")],
        key: Annotated[str, typer.Option("--key", help="key name or private key file")],
    ) -> None:
        """Add your signature to a bundle directory (its digest does not change)."""
        from adapterhub_lite.bundles import sign_bundle

        typer.echo("signed by " + ", ".join(sign_bundle(bundle, key)))  # key ids: hex, made here

    keys_app = typer.Typer(help="Ed25519 signing keys, kept in the user's config dir (private keys 0600).")
    app.add_typer(keys_app, name="keys")

    @keys_app.command("generate")
    @run_cli
    def keys_generate(
        name: Annotated[str, typer.Argument(help="a name for the key pair")],
        as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    ) -> None:
        """Create a new signing key pair."""
        from adapterhub_lite.bundles import generate_key

        k = generate_key(name)
        if as_json:
            print_json({"name": k.name, "key_id": k.key_id, "public_key": k.public_key, "path": str(k.path)})
        else:
            typer.echo(
                f"created {k.name}: {k.key_id}\n  public key {k.public_key}\n"
                f"  private key {safe(k.path, None)} (0600)"
            )

    @keys_app.command("list")
    @run_cli
    def keys_list(
        as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
    ) -> None:
        """List your signing keys."""
        from adapterhub_lite.bundles import list_keys
        from adapterhub_lite.bundles.signing import keys_dir

        keys = list_keys()
        if as_json:
            print_json([{"name": k.name, "key_id": k.key_id, "public_key": k.public_key} for k in keys])
        elif not keys:
            typer.echo(
                f"no keys in {safe(keys_dir(), None)} (create one with `adapterhub keys generate NAME`)"
            )
        else:
            for k in keys:
                typer.echo(f"{safe(k.name)}\t{k.key_id}\t{k.public_key}")
