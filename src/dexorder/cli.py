"""``dexorder``: the developer commands (the local stack, the benchmarks, the chat client)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dexorder.devenv import stack


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dexorder", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    stack.add_arguments(commands.add_parser("devenv", help="local real services: up, down, status"))
    build = commands.add_parser(
        "build", help="build and cache the Go binaries (control plane, node, helm)"
    )
    build.add_argument(
        "targets", nargs="*", help="etcd, kwok, kubernetes (the default three), helm, node parts"
    )
    demo = commands.add_parser("demo", help="a working chat on embedded defaults (Ctrl-C stops it)")
    demo.add_argument("--port", type=int, default=8080, help="the gateway's port (0: any free one)")
    demo.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        help="where the demo keeps agents, logs, the URL and the token"
        " (default: ~/.local/share/dexorder/demo)",
    )
    demo.add_argument(
        "--kubernetes",
        action="store_true",
        help="agents from the operator on a local control plane (kwok) instead of local processes",
    )
    chat = commands.add_parser("chat", help="a terminal chat client of the WebSocket protocol")
    chat.add_argument("--url", help="gateway URL (default: the running demo's)")
    chat.add_argument(
        "--token",
        help="a JWT (default: the running demo's token, else the gateway's demo token endpoint)",
    )
    chat.add_argument(
        "--demo-dir", type=Path, default=None, help="the running demo's state directory"
    )
    args = parser.parse_args(argv)
    if args.command == "demo":
        from dexorder import demo as demo_module

        return demo_module.run(port=args.port, state_dir=args.state_dir, kubernetes=args.kubernetes)
    if args.command == "chat":
        from dexorder import chat_client

        return chat_client.main(args.url, args.token, args.demo_dir or chat_client.DEMO_DIR)
    if args.command == "devenv":
        return stack.dispatch(args)
    if args.command == "build":
        from dexorder.devenv import binaries

        binaries.build(args.targets or list(binaries.DEFAULT_TARGETS))
        return 0
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
