"""``specquant export``: write a saved quantized model (a run folder or its model file) in a format
another runtime reads: GGUF for llama.cpp, ONNX for onnxruntime.  The codes are specquant's own; a
layer the format cannot hold exactly is refused with one line, never re-rounded."""
from __future__ import annotations

import os
from pathlib import Path

from specquant.cli.common import UI, CLIError, emit_json, load_saved_model
from specquant.report.run_folder import MODEL_FILE, RunFolderError, verify_run_folder
from specquant.report.table import format_table

FORMATS = ("gguf", "onnx")


def _model_file(target: str) -> Path:
    path = Path(target).expanduser()
    if path.is_dir():
        try:
            verify_run_folder(path)
        except RunFolderError as e:
            raise CLIError(str(e)) from None
        path = path / MODEL_FILE
    if not path.is_file():
        raise CLIError(f"{target!r} is neither a run folder (of 'specquant quantize --out') nor a saved model file")
    if not os.access(path, os.R_OK):
        raise CLIError(f"cannot read {str(path)!r}: permission denied")
    return path


def cmd_export(args, argv: list[str]) -> int:
    ui = UI(args.quiet)
    out = Path(args.out).expanduser()
    if out.is_dir():
        raise CLIError(f"--out {args.out!r} is a folder; give the file to write")
    if out.exists() and not args.overwrite:
        raise CLIError(f"--out {args.out!r} exists; pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise CLIError(f"--out {args.out!r}: folder {str(out.parent)!r} does not exist")
    path = _model_file(args.target)
    ui.say(f"loading {path} ...")
    model, entry = load_saved_model(path, args.allow_entry_point)
    if args.format == "gguf":
        from specquant.export.gguf import export_gguf, vocab_for_entry

        if entry.kind != "lm":
            raise CLIError(f"GGUF holds language models; {entry.id!r} is a {entry.kind} (use --format onnx)")
        vocab = vocab_for_entry(entry, int(model.config.vocab_size), args.data_dir)
        result = export_gguf(model, out, vocab, name=Path(entry.id).name, float_type=args.float_type.upper())
    else:
        from specquant.export.onnx import export_onnx

        result = export_onnx(model, out, example=entry_example(entry, args.data_dir))
    row = result.to_dict()
    ui.say(format_table([row], [("file", "file"), ("format", "format"), ("type", "type"), ("bytes", "bytes")]))
    for note in row.get("notes") or []:
        ui.say(f"  {note}")
    if args.json:
        emit_json(row)
    return 0


def entry_example(entry, data_dir=None):
    """An example input for tracing and checking the model of ``entry``: two calibration samples
    (seed 0), one calibration window of 64 tokens for a language model, or (a user's model) the first
    samples of its test file."""
    try:
        if entry.kind == "lm":
            return entry.calib(1, 0, data_dir, seq_len=64)
        if not entry.input_shape:  # your own model: its test file gives the shape
            return entry.test(data_dir)[0][:2]
        return entry.calib(2, 0, data_dir)
    except ValueError as e:
        raise CLIError(f"no example input for {entry.id!r}: {e}") from None
