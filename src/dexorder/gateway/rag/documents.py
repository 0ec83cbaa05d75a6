"""Finding and reading the documents to ingest: Markdown and text files. No Qdrant here,
so the command line can refuse a wrong path before loading anything heavy."""

from __future__ import annotations

from pathlib import Path

from dexorder.gateway.rag.errors import IngestError

# suffix -> whether the file is Markdown (headings and code fences mean something)
SUFFIXES: dict[str, bool] = {".md": True, ".markdown": True, ".txt": False}


def find_documents(path: Path) -> tuple[list[tuple[Path, str]], list[str]]:
    """(file, source name) for each document under ``path``, and the files skipped."""
    if path.is_file():
        if path.suffix.lower() not in SUFFIXES:
            raise IngestError(
                f"{path}: not a Markdown or text file (expected {', '.join(sorted(SUFFIXES))})"
            )
        return [(path, path.name)], []
    if not path.is_dir():
        raise IngestError(f"{path}: no such file or folder")
    documents: list[tuple[Path, str]] = []
    skipped: list[str] = []
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        relative = file.relative_to(path)
        if any(part.startswith(".") for part in relative.parts):
            continue  # .git and other hidden folders are not documents
        name = (Path(path.resolve().name) / relative).as_posix()
        if file.suffix.lower() in SUFFIXES:
            documents.append((file, name))
        else:
            skipped.append(name)
    return documents, skipped


def read_document(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise IngestError(
            f"{file}: not UTF-8 text ({error.reason} at byte {error.start})"
        ) from error
    except OSError as error:
        raise IngestError(f"cannot read {file}: {error}") from error
