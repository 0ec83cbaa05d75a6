"""``dexorder-gateway rag ...``: fill and query the knowledge base.

rag ingest PATH [--user U]   a Markdown or text file, or a folder of them; without
                             --user, into the shared knowledge base every user sees
rag search QUERY [--user U]  what a user's message would retrieve (a debugging aid)
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from dexorder.gateway.rag import SHARED_OWNER
from dexorder.gateway.rag.documents import find_documents
from dexorder.gateway.rag.errors import RagError
from dexorder.gateway.settings import GatewaySettings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dexorder-gateway rag", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    ingest = commands.add_parser("ingest", help="add Markdown and text files")
    ingest.add_argument("path", type=Path)
    ingest.add_argument("--user", help="the owner's user id (default: shared with everyone)")
    search = commands.add_parser("search", help="show what a query retrieves")
    search.add_argument("query")
    search.add_argument("--user", default="", help="search as this user (default: shared only)")
    return parser


def _owner_label(owner: str) -> str:
    return "the shared knowledge base" if owner == SHARED_OWNER else f"user {owner}"


async def _ingest(settings: GatewaySettings, path: Path, user: str | None) -> int:
    if user == SHARED_OWNER:
        raise RagError(f"--user {SHARED_OWNER!r} is reserved; omit --user to share documents")
    owner = SHARED_OWNER if user is None else user
    find_documents(path)  # a wrong path fails before the model and Qdrant are opened
    from dexorder.gateway.rag.embeddings import describe
    from dexorder.gateway.rag.ingest import ingest_path
    from dexorder.gateway.rag.retriever import Retriever

    retriever = await Retriever.open(settings)
    try:
        report = await ingest_path(retriever.store, retriever.embedder, path, owner)
    finally:
        await retriever.aclose()
    print(
        f"ingested {path} into {_owner_label(owner)} ({settings.rag_collection}, "
        f"{describe(retriever.embedder)}): {report.summary()} in {report.seconds:.1f} s"
    )
    return 0


async def _search(settings: GatewaySettings, query: str, user: str) -> int:
    from dexorder.gateway.rag.retriever import Retriever

    retriever = await Retriever.open(settings)
    try:
        chunks = await retriever.search(user or SHARED_OWNER, query)
    finally:
        await retriever.aclose()
    if not chunks:
        print(f"nothing scored at least {retriever.score_threshold}")
    for number, chunk in enumerate(chunks, start=1):
        print(f"[{number}] {chunk.score:.3f} {chunk.label}")
    return 0


def main(settings: GatewaySettings, argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "ingest":
            return asyncio.run(_ingest(settings, args.path, args.user))
        return asyncio.run(_search(settings, args.query, args.user))
    except RagError as error:
        print(f"dexorder-gateway rag: {error}", file=sys.stderr)
        return 1
