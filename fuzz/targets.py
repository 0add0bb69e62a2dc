"""One target per input kind: write the mutated bytes where the file belongs, then use the model as a
user would (portinfer.load, the chat template, encode, two generated tokens, decode).

The oracle: a case ends in a load, or in one of the documented error types, raised by portinfer itself
(the innermost frame is in the portinfer package) with a message that names the file it read. At use
(after a load), a ValueError from portinfer's own input checks (a prompt longer than a mutated context,
say), ChatTemplateError, or NonFiniteError (weights whose bytes became NaN) is a documented answer too.
Anything else is a finding.
"""
from __future__ import annotations

import os
import shutil
import traceback
from pathlib import Path

KINDS = ("gguf", "safetensors", "config", "generation_config", "tokenizer", "tokenizer_config")
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there, 12 + 3?"}]


class Finding(Exception):
    """A case that ended outside the documented errors (the message holds the traceback)."""


def documented_errors():
    from portinfer.runtime import CheckpointError, ConfigError
    from portinfer.runtime.tokenizer import ChatTemplateError, TokenizerError

    return (CheckpointError, ConfigError, TokenizerError, ChatTemplateError, FileNotFoundError)


def _raised_by_portinfer(exc) -> bool:
    import portinfer

    root = os.path.dirname(portinfer.__file__)
    frames = traceback.extract_tb(exc.__traceback__)
    return bool(frames) and frames[-1].filename.startswith(root)


class Target:
    """Cases of one kind in a scratch directory: the seed directory with one file replaced."""

    def __init__(self, kind: str, seeds: dict, scratch: Path):
        self.kind = kind
        self.scratch = Path(scratch) / kind
        shutil.rmtree(self.scratch, ignore_errors=True)
        self.scratch.mkdir(parents=True)
        if kind == "gguf":
            self.seeds = [Path(seeds["smollm2.gguf"]), Path(seeds["llama3.gguf"])]
        else:
            from .mutate import KIND_FILES

            self.file = KIND_FILES[kind]
            self.seeds = [Path(seeds["llama3-hf"]) / self.file]
            self.case_dir = self.scratch / "model"
            self.case_dir.mkdir()
            for f in Path(seeds["llama3-hf"]).iterdir():
                if f.name != self.file:
                    os.symlink(f, self.case_dir / f.name)

    def seed_bytes(self):
        return [p.read_bytes() for p in self.seeds]

    def write(self, data: bytes) -> Path:
        if self.kind == "gguf":
            path = self.scratch / "case.gguf"
            path.write_bytes(data)
            return path
        (self.case_dir / self.file).write_bytes(data)
        return self.case_dir

    def run(self, data: bytes) -> str:
        """'loaded' or the documented error's type name; raises Finding otherwise."""
        path = self.write(data)
        return exercise(path, path.name if self.kind == "gguf" else self.file)


def exercise(path: Path, file_name: str) -> str:
    import portinfer
    from portinfer.runtime import NonFiniteError
    from portinfer.runtime.tokenizer import ChatTemplateError

    documented = documented_errors()
    try:
        model = portinfer.load(path, backend="torch", fallback="allow")
    except documented as exc:
        message = str(exc)
        if not _raised_by_portinfer(exc) and not isinstance(exc, FileNotFoundError):
            raise Finding(_describe("load", exc)) from None
        if file_name not in message and str(path) not in message:
            raise Finding(f"load: {type(exc).__name__} does not name the file {file_name}: {message[:300]}") from None
        return type(exc).__name__
    except Exception as exc:
        raise Finding(_describe("load", exc)) from None
    except BaseException as exc:  # e.g. a Rust panic from a native library (pyo3's PanicException)
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        raise Finding(_describe("load", exc)) from None
    try:
        if model.tokenizer is not None and model.tokenizer.chat_template:
            prompt = model.apply_chat_template(MESSAGES)
        else:
            prompt = "Hi there" if model.tokenizer is not None else [1, 2, 3]
        result = model.generate(prompt, max_new_tokens=2, seed=0)
        if model.tokenizer is not None:
            model.tokenizer.decode(result.token_ids)
        return "loaded"
    except (ChatTemplateError, NonFiniteError) as exc:
        return type(exc).__name__
    except ValueError as exc:
        if _raised_by_portinfer(exc):
            return "ValueError(use)"
        raise Finding(_describe("use", exc)) from None
    except Exception as exc:
        raise Finding(_describe("use", exc)) from None


def _describe(stage, exc) -> str:
    tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)[-6:])
    return f"{stage}: {type(exc).__name__}: {str(exc)[:300]}\n{tb}"
