"""``import-msprobe``: an msprobe L0 tensor dump as a capture; ``export-msprobe``: a comparison as msprobe's compare
result CSV (precision.interop). Nothing heavy is imported until a command runs."""

from __future__ import annotations

from precision.cli.parser import EXIT_OK


def add_command(subparsers) -> None:
    p = subparsers.add_parser("import-msprobe", help="turn an msprobe L0 tensor dump into a capture that compare and report accept")
    p.add_argument("dump_dir", metavar="DUMP_DIR", help="msprobe's dump_path (or one step<N>/ or step<N>/<rank>/ directory in it)")
    p.add_argument("--model", required=True, help="the Hugging Face model directory the dumped run used (its sizes and tokenizer)")
    p.add_argument("--out", required=True, help="capture directory to write")
    p.add_argument("--teacher-forcing", metavar="REFERENCE_CAPTURE",
                   help="the reference capture whose prompts + continuations the dumped run was fed (pass k = prompt k)")
    p.add_argument("--prompts", help="the prompt set the dumped run was fed, when the dump lacks the embedding's token ids")
    p.add_argument("--trust-remote-code", action="store_true", help="allow the model's own tokenizer code to run (off unless asked)")
    p.add_argument("--force", action="store_true", help="replace a capture precision-check wrote before in --out")
    p.set_defaults(handler=handle_import)

    p = subparsers.add_parser("export-msprobe", help="write msprobe_compare.csv (msprobe's compare result columns) from a comparison")
    p.add_argument("comparison", metavar="COMPARISON_DIR", help="comparison.json or the run/comparison directory holding it")
    p.add_argument("--out", help="directory to write msprobe_compare.csv into (default: beside comparison.json)")
    p.add_argument("--config", help="TOML file with a [thresholds] table (the verdict behind the Result column)")
    p.add_argument("--threshold", action="append", metavar="NAME=VALUE", help="override one verdict threshold; repeatable")
    p.set_defaults(handler=handle_export)


def handle_import(args) -> int:
    from precision import import_msprobe

    result = import_msprobe(args.dump_dir, args.model, args.out, teacher_forcing=args.teacher_forcing, prompts=args.prompts,
                            force=args.force, trust_remote_code=args.trust_remote_code)
    reader = result.reader
    print(f"imported {len(reader.prompts)} forward pass(es) of {args.dump_dir} ({reader.dtype}) into {reader.path}")
    print(f"residual stream: {result.residual} convention (recorded in the manifest under backend.msprobe)")
    print("the dump lacks: " + (", ".join(result.missing) if result.missing else "nothing (embed, every layer, final_norm, logits)"))
    for note in result.notes:
        print(f"converted: {note}")
    return EXIT_OK


def handle_export(args) -> int:
    from precision.cli import values
    from precision import export_msprobe

    path = export_msprobe(args.comparison, out=args.out, thresholds=values.thresholds(args.config, args.threshold))
    print(f"wrote {path}")
    return EXIT_OK
